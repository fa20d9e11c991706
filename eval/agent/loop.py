"""The agent loop (docs/methods.md §10.9): each reply of the agent's LLM ends with one tool call or the final
description; tool results, with the budgets left, go back as the next user message.

The whole state of a run — the messages and what was spent — is written atomically to ``messages.json`` after every
step, so a run that was interrupted (an endpoint that stopped answering, Ctrl-C, a crash) resumes from its transcript
where it stopped. A finished run writes ``stats.json``; starting it again returns those stats and calls nothing.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from crosscoder.errors import ConfigError, DataError
from crosscoder.eval.adl.endpoint import ChatClient
from crosscoder.eval.agent.budget import Budget, Limits, Used
from crosscoder.eval.agent.prompts import first_message, system_prompt
from crosscoder.eval.agent.tools import Toolbox

TRANSCRIPT = "messages.json"
STATS = "stats.json"
FORMAT = "crosscoder-agent-transcript"
LAST_REPLY = 'LAST REPLY: your LLM budget is spent. Your next reply must end with FINAL(description: "...").'


@dataclass(frozen=True)
class Call:
    """A parsed ``CALL(name: {json})``."""

    name: str
    arguments: Any


@dataclass(frozen=True)
class Final:
    """A parsed ``FINAL(description: "...")``."""

    description: str


class FormatError(ValueError):
    """A reply that is neither a well-formed call nor a final description; its message goes back to the agent."""


def _final(rest: str) -> Final:
    if not rest.endswith(")"):
        raise FormatError("FINAL(...) must close with ')' and nothing may follow it")
    inner = rest[:-1].strip()
    key = next((key for key in ("description:", "description=") if inner.startswith(key)), None)
    if key is None:
        raise FormatError('write FINAL(description: "...")')
    value = inner[len(key) :].strip()
    if value.startswith('"'):
        try:
            value = json.loads(value)
        except ValueError:  # unescaped quotes inside: take what is between the outer ones
            value = value[1:-1] if value.endswith('"') and len(value) > 1 else value[1:]
    if not str(value).strip():
        raise FormatError("the final description is empty")
    return Final(str(value).strip())


def _call(rest: str) -> Call:
    if not rest.endswith(")"):
        raise FormatError("CALL(...) must close with ')' and nothing may follow it")
    name, colon, arguments = rest[:-1].partition(":")
    name = name.strip()
    if not colon or not name.isidentifier():
        raise FormatError("write CALL(tool_name: {json arguments}) with the tool's name before the ':'")
    try:
        parsed = json.loads(arguments.strip() or "{}")
    except ValueError as error:
        raise FormatError(f"the arguments of {name} are not valid JSON ({error})") from None
    if not isinstance(parsed, dict):
        raise FormatError(f"the arguments of {name} must be one JSON object, got {type(parsed).__name__}")
    return Call(name, parsed)


def parse_reply(text: str) -> Call | Final:
    """The call or final description that ends ``text`` (a trailing code fence is ignored); ``FormatError``
    otherwise."""
    body = text.strip()
    if body.endswith("```"):
        body = body[:-3].rstrip()
    attempts = sorted(((body.rfind(keyword), keyword) for keyword in ("FINAL(", "CALL(")), reverse=True)
    errors = []
    for at, keyword in attempts:
        if at < 0:
            continue
        try:
            return (_final if keyword == "FINAL(" else _call)(body[at + len(keyword) :].rstrip())
        except FormatError as error:
            errors.append(error)
    if errors:
        raise errors[0]
    raise FormatError('the reply must end with CALL(tool_name: {json arguments}) or FINAL(description: "...")')


@dataclass
class Run:
    """The state of one run, as ``messages.json`` holds it."""

    agent: str
    messages: list[dict[str, str]]
    used: Used = field(default_factory=Used)
    counts: dict[str, int] = field(default_factory=dict)
    """Calls per tool, ``format_errors``, ``tool_errors``, ``over_budget`` and ``prompt_tokens``."""
    last_reply: bool = False
    finished: bool = False
    stopped: str | None = None
    description: str | None = None
    seconds: float = 0.0

    def save(self, folder: Path) -> None:
        """Write ``messages.json`` atomically."""
        record = {"format": FORMAT, **asdict(self)}
        temporary = folder / f".{TRANSCRIPT}.tmp"
        temporary.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(temporary, folder / TRANSCRIPT)

    @classmethod
    def load(cls, folder: Path) -> Run:
        path = folder / TRANSCRIPT
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if record.pop("format") != FORMAT:
                raise ValueError("not an agent transcript")
            record["used"] = Used(**record["used"])
            return cls(**record)
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"{path} is not a readable agent transcript ({error}): remove it to start over") from None

    def count(self, key: str, amount: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + amount


def _respond(run: Run, budget: Budget, toolbox: Toolbox, seed: int) -> None:
    """Act on the agent's last reply: finish, or append the next user message (a tool result or an error, with the
    budgets left)."""
    try:
        parsed: Call | Final | FormatError = parse_reply(run.messages[-1]["content"])
    except FormatError as error:
        parsed = error
    if isinstance(parsed, Final):
        run.finished, run.stopped, run.description = True, "final", parsed.description
        return
    if run.last_reply or budget.remaining()["llm_calls"] == 0:
        run.finished, run.stopped = True, "budget: the last reply was not FINAL"
        return
    if isinstance(parsed, FormatError):
        run.count("format_errors")
        head = "FORMAT_ERROR:"
        body: dict[str, Any] = {"error": f"{parsed}; one tool per reply, and the CALL or FINAL must end it"}
    else:
        head, body = _execute(parsed, run, budget, toolbox, seed)
    body["budgets"] = budget.remaining()
    message = f"{head} {json.dumps(body, ensure_ascii=False)}"
    if budget.last_call():
        run.last_reply = True
        message += f"\n\n{LAST_REPLY}"
    run.messages.append({"role": "user", "content": message})


def _execute(call: Call, run: Run, budget: Budget, toolbox: Toolbox, seed: int) -> tuple[str, dict[str, Any]]:
    tool = toolbox.tools.get(call.name)
    if tool is None:
        run.count("tool_errors")
        return f"TOOL_ERROR({call.name}):", {"error": f"no tool {call.name!r}: the tools are {list(toolbox.tools)}"}
    try:
        arguments = tool.bind(call.arguments)
        cost = tool.cost(arguments)
        if not budget.afford(cost):
            run.count("over_budget")
            left = budget.remaining()["model_interactions"]
            error = f"this call costs {cost} model interactions and {left} are left: ask for less, or end with FINAL"
            return f"BUDGET_EXHAUSTED({call.name}):", {"error": error}
        data = tool.run(arguments, seed + budget.used.interactions)
    except ConfigError as error:
        run.count("tool_errors")
        return f"TOOL_ERROR({call.name}):", {"error": str(error)}
    budget.charge_interactions(cost)
    run.count(f"calls.{call.name}")
    return f"TOOL_RESULT({call.name}):", {"data": data}


def run_agent(client: ChatClient, toolbox: Toolbox, limits: Limits, folder: Path, *, seed: int = 0) -> dict[str, Any]:
    """Run one investigation in ``folder`` (or resume it from its ``messages.json``) until the agent's final
    description or the end of its LLM budget; returns the run's stats (also written to ``stats.json``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / TRANSCRIPT).exists():
        run = Run.load(folder)
        if run.agent != toolbox.kind:
            raise ConfigError(
                f"{folder} holds a run of the {run.agent} agent, not of the {toolbox.kind} agent: use another --out"
            )
    else:
        fresh = Budget(limits, Used())
        first = first_message(toolbox, fresh.remaining()) + (f"\n\n{LAST_REPLY}" if fresh.last_call() else "")
        messages = [{"role": "system", "content": system_prompt(toolbox)}, {"role": "user", "content": first}]
        run = Run(toolbox.kind, messages, last_reply=fresh.last_call())
        run.save(folder)
    budget = Budget(limits, run.used)
    while not run.finished:
        started = time.monotonic()
        if run.messages[-1]["role"] != "assistant":
            if budget.remaining()["llm_calls"] == 0:
                run.finished, run.stopped = True, "budget: no LLM calls left"
                break
            left = budget.remaining()["tokens"]  # one reply may not overrun the token budget
            cap = left if client.max_tokens is None else min(client.max_tokens, left)
            reply = client.complete(run.messages, max_tokens=max(1, cap))
            budget.charge_call(reply.completion_tokens)
            run.count("prompt_tokens", reply.prompt_tokens)
            run.messages.append({"role": "assistant", "content": reply.content})
            run.seconds += time.monotonic() - started
            run.save(folder)
            started = time.monotonic()
        _respond(run, budget, toolbox, seed)
        run.seconds += time.monotonic() - started
        run.save(folder)
    run.save(folder)
    stats = {
        "agent": run.agent,
        "stopped": run.stopped,
        "description": run.description,
        "budgets": budget.as_dict(),
        "replies": sum(message["role"] == "assistant" for message in run.messages),
        "counts": dict(run.counts),
        "seconds": round(run.seconds, 3),
    }
    (folder / STATS).write_text(json.dumps(stats, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return stats
