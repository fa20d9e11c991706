"""``python -m crosscoder.eval.agent --adl DIR --base-model … --chat-model … --endpoint URL --model NAME
[--blackbox] [--interactions N] [--runs N] [--description TEXT] --out DIR`` (docs/methods.md §10.9).

Runs the ADL agent (or the blackbox baseline) ``--runs`` times against an OpenAI-compatible endpoint. Each run
writes ``run-<i>/messages.json`` (the transcript, after every step), ``run-<i>/stats.json`` and, with the true
``--description``, ``run-<i>/grade.json``; ``summary.json`` gathers them. Running the same command again resumes
unfinished runs from their transcripts and skips finished ones.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tyro

from crosscoder.errors import ConfigError, CrosscoderError, EndpointError, show_warnings_as_lines
from crosscoder.eval.adl.endpoint import ChatClient
from crosscoder.eval.adl.views import load_report
from crosscoder.eval.agent.budget import Limits
from crosscoder.eval.agent.grader import RUBRIC, DescriptionGrader
from crosscoder.eval.agent.loop import TRANSCRIPT, run_agent
from crosscoder.eval.agent.tools import Models, Sampling, adl_toolbox, blackbox_toolbox

GRADE = "grade.json"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class AgentConfig:
    """Let an LLM find out what a finetune was for, with the Activation Difference Lens's tools or (--blackbox)
    only by asking the models. Needs an OpenAI-compatible endpoint: vLLM, llama.cpp, Ollama or a hosted API."""

    adl: Path
    """Lens folder written by `python -m crosscoder.eval.adl … --out DIR`."""
    base_model: str
    """Base model: Hub id or local folder (as given to the lens)."""
    chat_model: str
    """Finetuned (chat) model: Hub id or local folder."""
    endpoint: str
    """API base of the agent's LLM, e.g. http://localhost:8000/v1 (…/chat/completions is appended)."""
    model: str
    """Model name the endpoint serves."""
    out: Path = Path("agent")
    """Output folder: run-<i>/messages.json, stats.json, grade.json and summary.json."""
    blackbox: bool = False
    """Run the blackbox baseline: only ask_model and the finetuned model's unsteered samples."""
    interactions: int = 10
    """Model-interaction budget per run: one per prompt asked, one per steered sample."""
    llm_calls: int = 50
    """Replies of the agent's LLM per run (the last one must be the final description)."""
    tokens: int = 100_000
    """Tokens the agent's LLM may generate per run."""
    runs: int = 1
    """Independent runs (each into run-<i>)."""
    description: str | None = None
    """The true description of the finetuning: each run's final description is graded 1–5 against it (default: the
    description the lens report holds, if any; without one, runs are not graded)."""
    rubric: Path | None = None
    """Text file with the grader's rubric (default: the built-in 1–5 rubric)."""
    grader_endpoint: str | None = None
    """Endpoint of the grader's LLM (default: --endpoint)."""
    grader_model: str | None = None
    """Model of the grader (default: --model)."""
    key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (read at each request; never written or logged)."""
    no_key: tyro.conf.FlagCreatePairsOff[bool] = False
    """Send no API key (a local server that needs none)."""
    timeout: float = 120.0
    """Seconds to wait for one reply of the endpoint."""
    retries: int = 3
    """Retries of a request that timed out, failed to connect or got HTTP 408/429/5xx (exponential backoff)."""
    temperature: float | None = None
    """Sampling temperature of the agent's LLM (default: the server's)."""
    max_tokens: int | None = None
    """Tokens per reply of the agent's LLM (default: the server's)."""
    answer_tokens: int = 128
    """Tokens the base and finetuned models generate per answer or steered sample."""
    answer_temperature: float = 0.0
    """Temperature of ask_model's answers (0: greedy)."""
    overview_k: int = 20
    """Tokens per layer and position in the ADL overview."""
    model_dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    """dtype of the models (auto: bfloat16 on GPU, float32 on CPU)."""
    device: str = "auto"
    """Torch device of the models (auto = cuda when available)."""
    trust_remote_code: bool = False
    """Allow model code from the Hub."""
    seed: int = 0
    """Seed of the models' sampling (run i adds 1000·i)."""


def client(config: AgentConfig, endpoint: str, model: str) -> ChatClient:
    return ChatClient(
        endpoint,
        model,
        api_key_env=None if config.no_key else config.key_env,
        require_key=not config.no_key,
        timeout=config.timeout,
        retries=config.retries,
        temperature=config.temperature,
        max_tokens=config.max_tokens,
    )


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def run(config: AgentConfig) -> dict[str, Any]:
    """Every run of ``config`` (resuming unfinished ones) and their grades; returns the summary."""
    if config.runs < 1:
        raise ConfigError(f"--runs must be at least 1, got {config.runs}")
    limits = Limits(config.interactions, config.llm_calls, config.tokens).check(config.blackbox)
    agent_client = client(config, config.endpoint, config.model)
    report = load_report(config.adl)
    truth, grader = config.description or report.get("description"), None
    if config.description is not None and not config.description.strip():
        raise ConfigError("--description is empty: give the true description of the finetuning")
    if truth:
        rubric = config.rubric.read_text(encoding="utf-8") if config.rubric is not None else RUBRIC
        grader_client = client(config, config.grader_endpoint or config.endpoint, config.grader_model or config.model)
        grader = DescriptionGrader(grader_client, rubric)
    models = Models(
        config.base_model,
        config.chat_model,
        device=config.device,
        dtype=config.model_dtype,
        trust_remote_code=config.trust_remote_code,
    )
    sampling = Sampling(max_new_tokens=config.answer_tokens, temperature=config.answer_temperature)
    if config.blackbox:
        toolbox = blackbox_toolbox(report, models, sampling)
    else:
        toolbox = adl_toolbox(report, Path(config.adl), models, sampling, k=config.overview_k)
    runs = []
    for index in range(1, config.runs + 1):
        folder = Path(config.out) / f"run-{index}"
        try:
            stats = run_agent(agent_client, toolbox, limits, folder, seed=config.seed + 1000 * index)
        except EndpointError as error:
            if (folder / TRANSCRIPT).exists() and agent_client.usage.calls:
                raise type(error)(
                    f"{error}. Run {index}'s transcript is saved in {folder / TRANSCRIPT}: run the same command "
                    "again to resume it",
                    error.status,
                ) from None
            raise
        grade = read_json(folder / GRADE)
        if grader is not None and (grade is None or grade.get("score") is None):  # ungraded, or no score parsed
            grade = grader.grade(stats["description"], str(truth))
            (folder / GRADE).write_text(json.dumps(grade, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        runs.append({"run": index, "stopped": stats["stopped"], "score": grade and grade["score"], **stats["budgets"]})
    scores = [entry["score"] for entry in runs if entry["score"] is not None]
    summary = {
        "agent": toolbox.kind,
        "agent_llm": {"url": agent_client.url, "model": agent_client.model},
        "runs": runs,
        "mean_score": sum(scores) / len(scores) if scores else None,
        "graded": len(scores),
    }
    Path(config.out).mkdir(parents=True, exist_ok=True)
    (Path(config.out) / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    show_warnings_as_lines()
    config = tyro.cli(AgentConfig, args=sys.argv[1:] if argv is None else argv, prog="python -m crosscoder.eval.agent")
    try:
        summary = run(config)
    except CrosscoderError as error:  # the user's to fix: one message; anything else keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    for entry in summary["runs"]:
        score = "" if entry["score"] is None else f", score {entry['score']}/5"
        used = entry["used"]
        print(
            f"run {entry['run']}: {entry['stopped']}{score} ({used['llm_calls']} LLM calls, {used['tokens']} tokens, "
            f"{used['interactions']} model interactions)"
        )
    if summary["mean_score"] is not None:
        print(f"mean score {summary['mean_score']:.2f} over {summary['graded']} graded runs")
    print(f"transcripts and stats: {Path(config.out)}")
    return 0
