"""The interpretability agent (docs/methods.md §10.9): an LLM that finds out what a finetune was for, either with the
Activation Difference Lens's tools (the ADL agent) or only by asking the two models (the blackbox baseline), over
any OpenAI-compatible chat endpoint; a grader scores its final description 1–5 against the true one.

>>> from pathlib import Path
>>> from crosscoder.eval.adl import load_report
>>> from crosscoder.eval.agent import ChatClient, Limits, Models, adl_toolbox, run_agent
>>> client = ChatClient("http://localhost:8000/v1", "Qwen/Qwen3-8B", api_key_env=None)
>>> toolbox = adl_toolbox(load_report("adl"), Path("adl"), Models("base", "chat"))
>>> stats = run_agent(client, toolbox, Limits(interactions=10), Path("agent/run-1"))

``python -m crosscoder.eval.agent --adl DIR --base-model … --chat-model … --endpoint URL --model NAME --out DIR``
runs it from the command line.
"""

from crosscoder.eval.adl.endpoint import ChatClient, Reply, Usage
from crosscoder.eval.agent.budget import Budget, Limits, Used
from crosscoder.eval.agent.cli import AgentConfig, run
from crosscoder.eval.agent.grader import RUBRIC, DescriptionGrader, parse_score
from crosscoder.eval.agent.loop import Call, Final, FormatError, parse_reply, run_agent
from crosscoder.eval.agent.prompts import first_message, system_prompt
from crosscoder.eval.agent.tools import Models, Param, Sampling, Tool, Toolbox, adl_toolbox, blackbox_toolbox

__all__ = [
    "RUBRIC",
    "AgentConfig",
    "Budget",
    "Call",
    "ChatClient",
    "DescriptionGrader",
    "Final",
    "FormatError",
    "Limits",
    "Models",
    "Param",
    "Reply",
    "Sampling",
    "Tool",
    "Toolbox",
    "Usage",
    "Used",
    "adl_toolbox",
    "blackbox_toolbox",
    "first_message",
    "parse_reply",
    "parse_score",
    "run",
    "run_agent",
    "system_prompt",
]
