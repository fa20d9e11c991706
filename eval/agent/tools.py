"""The tools an agent may call (docs/methods.md §10.9): JSON arguments in, JSON results out.

The ADL agent reads a lens folder through ``crosscoder.eval.adl.views`` (free: logit-lens and Patchscope details,
stored steering samples) and queries the models (budgeted: new steered generations, ``ask_model``). The blackbox
agent has ``ask_model`` only, and the unsteered samples in its first message. Every file of the lens folder is
found with ``LensPaths``; the models load on first use with ``crosscoder.models.load_causal_lm``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crosscoder.errors import ConfigError
from crosscoder.eval.adl.differences import VECTORS, MeanDifferences, check_pair
from crosscoder.eval.adl.steering import generate, steer
from crosscoder.eval.adl.views import logit_lens_details, overview, patchscope_details, steering_details
from crosscoder.models import load_causal_lm, resolve_device

REQUIRED = object()
"""Default of a parameter the agent must give."""

KINDS: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "ints": lambda v: isinstance(v, list) and bool(v) and all(KINDS["int"](x) for x in v),
    "strs": lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) and x.strip() for x in v),
}
KIND_NAMES = {"int": "int", "str": "str", "ints": "[int, ...]", "strs": "[str, ...]"}


@dataclass(frozen=True)
class Param:
    """One JSON argument: its kind (``int``, ``str``, ``ints``, ``strs``), what it means, its default."""

    name: str
    kind: str
    doc: str
    default: Any = REQUIRED

    def usage(self) -> str:
        kind = KIND_NAMES[self.kind] + ("" if self.default is REQUIRED else f" = {json.dumps(self.default)}")
        return f'"{self.name}": {kind}  ({self.doc})'


@dataclass(frozen=True)
class Tool:
    """A tool: what it does and returns, its arguments, what a call costs in model interactions, and the call."""

    name: str
    doc: str
    params: tuple[Param, ...]
    returns: str
    run: Callable[[dict[str, Any], int], Any]
    """``run(arguments, seed)``; raises ``ConfigError`` for arguments the lens or the models cannot serve."""
    cost: Callable[[dict[str, Any]], int] = lambda arguments: 0
    costs: str = "free"

    def bind(self, arguments: Any) -> dict[str, Any]:
        """The arguments with defaults filled in, or ``ConfigError`` saying what is wrong."""
        if not isinstance(arguments, dict):
            raise ConfigError(f"{self.name} takes a JSON object of arguments, got {type(arguments).__name__}")
        known = {param.name: param for param in self.params}
        unknown = sorted(set(arguments) - set(known))
        if unknown:
            raise ConfigError(f"{self.name} has no argument(s) {unknown}: its arguments are {sorted(known)}")
        bound = {}
        for param in self.params:
            if param.name not in arguments:
                if param.default is REQUIRED:
                    raise ConfigError(f"{self.name} needs the argument {param.name!r} ({KIND_NAMES[param.kind]})")
                bound[param.name] = param.default
                continue
            value = arguments[param.name]
            if not (value is None and param.default is None) and not KINDS[param.kind](value):
                raise ConfigError(f"{self.name}: {param.name!r} must be {KIND_NAMES[param.kind]}, got {value!r}")
            bound[param.name] = value
        return bound

    def describe(self) -> str:
        """The tool as the system prompt documents it."""
        lines = [f"- {self.name}  ({self.costs})", f"  {self.doc}", "  Args: {"]
        lines += [f"    {param.usage()}" for param in self.params]
        lines += ["  }", f"  Returns: {self.returns}"]
        return "\n".join(lines)


def _dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


class Models:
    """The base and finetuned models, loaded on first use (local folders or Hub ids), with the finetuned model's
    tokenizer for both (the lens checks the pair shares one)."""

    def __init__(
        self, base: str, chat: str, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False
    ) -> None:
        self.names = (base, chat)
        self.device = resolve_device(device)
        self.dtype, self.trust_remote_code = _dtype(dtype, self.device), trust_remote_code
        self._loaded: tuple[Any, Any, Any] | None = None

    def pair(self) -> tuple[Any, Any, Any]:
        """``(base, chat, tokenizer)``."""
        if self._loaded is None:
            options = {"revision": None, "dtype": self.dtype, "device": self.device}
            base, base_tokenizer = load_causal_lm(self.names[0], trust_remote_code=self.trust_remote_code, **options)
            chat, tokenizer = load_causal_lm(self.names[1], trust_remote_code=self.trust_remote_code, **options)
            check_pair(base, chat, tokenizer, base_tokenizer)
            self._loaded = (base, chat, tokenizer)
        return self._loaded


@dataclass(frozen=True)
class Sampling:
    """How the models answer: ``ask_model`` with ``temperature`` (0: greedy), steered samples as the lens sampled."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    max_samples: int = 10
    """Steered samples per prompt in one call at most."""


@dataclass
class Toolbox:
    """An agent's tools and the first message it reads (what ``kind`` of agent: ``adl`` or ``blackbox``)."""

    kind: str
    tools: dict[str, Tool]
    first_message: Any
    """The data of the first user message: the lens overview, or the unsteered samples."""


# ---------------------------------------------------------------------------- the tools
LAYER = Param("layer", "int", "a layer listed in the overview")
POSITION = Param("position", "int", "a token position listed in the overview")
PROMPTS = Param("prompts", "strs", "user messages, each sent as one chat turn")


def ask_model_tool(models: Models, sampling: Sampling) -> Tool:
    def run(arguments: dict[str, Any], seed: int) -> dict[str, list[str]]:
        base, chat, tokenizer = models.pair()
        answers: dict[str, list[str]] = {"base": [], "finetuned": []}
        for index, prompt in enumerate(arguments["prompts"]):
            for key, model in (("base", base), ("finetuned", chat)):
                generation = generate(
                    model,
                    tokenizer,
                    prompt,
                    max_new_tokens=sampling.max_new_tokens,
                    temperature=sampling.temperature,
                    seed=seed + index,
                )
                answers[key].append(generation[0].text)
        return answers

    return Tool(
        "ask_model",
        "Send prompts to the base and the finetuned model; each answers every prompt.",
        (PROMPTS,),
        '{"base": [str, ...], "finetuned": [str, ...]} (answers in the order of the prompts)',
        run,
        cost=lambda arguments: len(arguments["prompts"]),
        costs="budgeted: 1 model interaction per prompt",
    )


def lens_tools(report: dict[str, Any], lens_dir: Path, models: Models, sampling: Sampling) -> list[Tool]:
    """The free readers of the lens report and the budgeted steered generation."""
    vector = Param("vector", "str", f"one of {list(VECTORS)}: δ, or one model's own mean as a control", "delta")
    positions = Param("positions", "ints", "token positions listed in the overview")
    k = Param("k", "int", "tokens per position", 20)

    def logit_lens(arguments: dict[str, Any], _seed: int) -> dict[str, Any]:
        results = {}
        for position in arguments["positions"]:
            lens = logit_lens_details(report, arguments["layer"], position, arguments["vector"], k=arguments["k"])
            results[str(position)] = {key: lens[key] for key in ("tokens", "probs", "inverse")}
        return {"layer": arguments["layer"], "vector": arguments["vector"], "positions": results}

    def patchscope(arguments: dict[str, Any], _seed: int) -> dict[str, Any]:
        results = {}
        for position in arguments["positions"]:
            scope = patchscope_details(report, arguments["layer"], position, arguments["vector"])
            cut = slice(None, arguments["k"])
            results[str(position)] = {
                "scale": scope["scale"],
                "tokens": scope["tokens"][cut],
                "probs": scope["probs"][cut],
            }
        return {"layer": arguments["layer"], "vector": arguments["vector"], "positions": results}

    def stored(layer: int, position: int) -> dict[str, Any]:
        return steering_details(report, layer, position)

    def prompts_of(steering: dict[str, Any], wanted: list[str] | None) -> list[dict[str, Any]]:
        samples = steering["samples"]
        if wanted is None:
            return samples
        known = {sample["prompt"]: sample for sample in samples}
        missing = [prompt for prompt in wanted if prompt not in known]
        if missing:
            raise ConfigError(f"no stored samples for the prompt(s) {missing}: the stored prompts are {list(known)}")
        return [known[prompt] for prompt in wanted]

    def steering_samples(arguments: dict[str, Any], _seed: int) -> dict[str, Any]:
        steering = stored(arguments["layer"], arguments["position"])
        n = arguments["n"]
        check_n(n)
        return {
            "strength": steering["strength"],
            "samples": [
                {"prompt": s["prompt"], "steered": s["steered"][:n], "unsteered": s["unsteered"][:n]}
                for s in prompts_of(steering, arguments["prompts"])
            ],
        }

    def check_n(n: int) -> None:
        if not 1 <= n <= sampling.max_samples:
            raise ConfigError(f"n must be between 1 and {sampling.max_samples}, got {n}")

    def generate_steered(arguments: dict[str, Any], seed: int) -> dict[str, Any]:
        layer, position, n = arguments["layer"], arguments["position"], arguments["n"]
        steering = stored(layer, position)
        check_n(n)
        vector = MeanDifferences.load(lens_dir).vector("delta", layer, position)
        _, chat, tokenizer = models.pair()
        results = steer(
            chat,
            tokenizer,
            vector.float(),
            layer,
            steering["strength"],
            arguments["prompts"],
            norm=steering["norm"],
            n_samples=n,
            max_new_tokens=sampling.max_new_tokens,
            temperature=float(report["settings"].get("steer_temperature", 1.2)),
            seed=seed,
        )
        samples = [{"prompt": result["prompt"], "steered": result["samples"]} for result in results]
        return {"strength": steering["strength"], "samples": samples}

    def generate_cost(arguments: dict[str, Any]) -> int:
        check_n(arguments["n"])
        return len(arguments["prompts"]) * arguments["n"]

    return [
        Tool(
            "logit_lens_details",
            "The logit lens of the stored vector at a layer and positions: the finetuned model's next-token "
            "distribution read from it, top k tokens, and the top tokens of its negation (inverse).",
            (LAYER, positions, k, vector),
            '{"layer", "vector", "positions": {"<position>": {"tokens", "probs", "inverse": {"tokens", "probs"}}}}',
            logit_lens,
        ),
        Tool(
            "patchscope_details",
            "The Patchscope of the stored vector: the tokens the model reads from it when it is patched into an "
            "identity prompt, at the automatically chosen scale (at most 20 tokens).",
            (LAYER, positions, k, vector),
            '{"layer", "vector", "positions": {"<position>": {"scale", "tokens", "probs"}}}',
            patchscope,
        ),
        Tool(
            "steering_samples",
            "Stored samples of the finetuned model steered with δ of a layer and position, beside unsteered samples "
            "for the same prompts.",
            (
                LAYER,
                POSITION,
                Param("prompts", "strs", "a subset of the stored prompts; null: all", None),
                Param("n", "int", "samples per prompt", 3),
            ),
            '{"strength", "samples": [{"prompt", "steered": [str, ...], "unsteered": [str, ...]}, ...]}',
            steering_samples,
        ),
        Tool(
            "generate_steered",
            "New samples of the finetuned model steered with δ of a layer and position (at the stored strength) "
            "for your own prompts.",
            (LAYER, POSITION, PROMPTS, Param("n", "int", f"samples per prompt, 1–{sampling.max_samples}", 1)),
            '{"strength", "samples": [{"prompt", "steered": [str, ...]}, ...]}',
            generate_steered,
            cost=generate_cost,
            costs="budgeted: 1 model interaction per sample (prompts × n)",
        ),
    ]


def unsteered_samples(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The finetuned model's unsteered samples per generic prompt (the same at every layer and position), or []
    when the lens ran without steering."""
    for result in report["results"].values():
        for entry in result["positions"].values():
            if isinstance(entry.get("steering"), dict):
                return [{"prompt": s["prompt"], "finetuned": s["unsteered"]} for s in entry["steering"]["samples"]]
    return []


def adl_toolbox(
    report: dict[str, Any], lens_dir: Path, models: Models, sampling: Sampling = Sampling(), k: int = 20
) -> Toolbox:
    """The ADL agent: the lens overview first (datasets blinded), the lens readers, steering and ``ask_model``."""
    tools = [*lens_tools(report, lens_dir, models, sampling), ask_model_tool(models, sampling)]
    return Toolbox("adl", {tool.name: tool for tool in tools}, overview(report, k=k))


def blackbox_toolbox(report: dict[str, Any], models: Models, sampling: Sampling = Sampling()) -> Toolbox:
    """The blackbox baseline: unsteered samples of the finetuned model first, then ``ask_model`` only."""
    tool = ask_model_tool(models, sampling)
    return Toolbox("blackbox", {tool.name: tool}, unsteered_samples(report))
