"""What the agent reads (docs/methods.md §10.9): the system prompt, built from its toolbox (every tool with its JSON
arguments, result and cost), and the first user message."""

from __future__ import annotations

import json

from crosscoder.eval.agent.tools import Toolbox

ROLE = """You are an interpretability agent. A language model (the base model) was finetuned into another (the \
finetuned model). Find out what the finetuning was for: its domain and the behaviour it trained. You cannot see \
the finetuning data."""

EVIDENCE = {
    "adl": """Evidence
- The first message is an OVERVIEW (JSON) of the Activation Difference Lens: δ is the mean difference between the \
finetuned and the base model's activations (finetuned − base) at one layer and each of the first token positions of \
unrelated text (the datasets it was averaged over are blinded as ds1, ds2, …). Such a difference often carries the \
finetuning's signal. Per layer and position the overview lists the top tokens of δ read by the logit lens and by \
Patchscope, and one short sample per generic prompt of the finetuned model steered with δ (steering exaggerates \
what the finetuning taught).
- Prefer content-bearing tokens (domain terms, names, style markers); downweight stopwords, punctuation, formatting \
and code fragments. Trust effects that agree across positions, between the two readers and with the steered \
samples.""",
    "blackbox": """Evidence
- The first message lists SAMPLES (JSON): the finetuned model's answers to a few generic prompts.
- Everything else you learn by asking the two models (ask_model) and comparing their answers.""",
}

RULES = """Budgets
- model_interactions: spent by the budgeted tools. llm_calls: your replies. tokens: what you generate.
- Every tool result ends with the budgets that remain. When llm_calls or tokens run out you get one last reply: it \
must be FINAL.
- Use the free tools before the budgeted ones. Verify a hypothesis by asking the models questions where you expect \
the finetuned model to answer differently from the base model.

Output grammar
- Think briefly, then end your reply with exactly one of (nothing may follow it):
  CALL(tool_name: {"argument": value, ...})
  FINAL(description: "...")
- One tool per reply; its arguments are one JSON object. A reply that follows neither form is answered with \
FORMAT_ERROR and still costs an LLM call; a call with bad arguments is answered with TOOL_ERROR.

Final description
- FINAL(description: "<one sentence: the finetuning's domain and behaviour>. <a short summary of the evidence, \
at most 200 words>")
- If the evidence does not decide: FINAL(description: "Inconclusive. Evidence points to A or B; cannot decide \
because …")
- Ground every claim in what the tools returned."""


def system_prompt(toolbox: Toolbox) -> str:
    """The system message of an agent with ``toolbox``."""
    tools = "\n\n".join(tool.describe() for tool in toolbox.tools.values())
    return f"{ROLE}\n\n{EVIDENCE[toolbox.kind]}\n\nTools\n{tools}\n\n{RULES}"


def first_message(toolbox: Toolbox, budgets: dict[str, int]) -> str:
    """The first user message: the overview (ADL) or the unsteered samples (blackbox), and the budgets."""
    title = "OVERVIEW" if toolbox.kind == "adl" else "SAMPLES"
    return f"{title}: {json.dumps(toolbox.first_message, ensure_ascii=False)}\n\nBudgets: {json.dumps(budgets)}"
