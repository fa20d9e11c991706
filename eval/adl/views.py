"""Plain functions over a lens report for people and agents (docs/methods.md §10.8): an overview and the details
of one layer and position. Every function returns JSON-serialisable values and raises ``ConfigError`` naming
what exists when asked for a layer, position or vector the report does not hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crosscoder.errors import ConfigError, DataError, InputNotFoundError
from crosscoder.eval.adl.differences import VECTORS
from crosscoder.eval.adl.paths import LensPaths


def load_report(path: str | Path) -> dict[str, Any]:
    """A report from its folder or its ``report.json``."""
    path = Path(path)
    file = LensPaths(path).report if path.is_dir() else path
    if not file.exists():
        raise InputNotFoundError(f"no lens report at {file}: run `python -m crosscoder.eval.adl … --out DIR` first")
    report = json.loads(file.read_text(encoding="utf-8"))
    if report.get("format") != "activation-difference-lens":
        raise DataError(f"{file} is not an Activation Difference Lens report")
    return report


def entry(report: dict[str, Any], layer: int | str, position: int | str, data: str = "text") -> dict[str, Any]:
    """Everything the report holds for one layer and position of the general text (``data="text"``) or of the chat
    data (``"chat"``, positions from ``−k``)."""
    if data not in ("text", "chat"):
        raise ConfigError(f"unknown data {data!r}: use 'text' (general text) or 'chat' (--chat-data)")
    if data == "chat" and "chat_data" not in report:
        raise ConfigError("the report holds no chat-data results: run the lens with --chat-data")
    results = report["chat_data"]["results"] if data == "chat" else report["results"]
    if str(layer) not in results:
        raise ConfigError(f"layer {layer} is not in the report (layers: {sorted(int(k) for k in results)})")
    positions = results[str(layer)]["positions"]
    if str(position) not in positions:
        raise ConfigError(f"position {position} is not in the report (positions: {sorted(int(k) for k in positions)})")
    return positions[str(position)]


def _vector(vector: str) -> str:
    if vector not in VECTORS:
        raise ConfigError(f"unknown vector {vector!r}: use one of {VECTORS}")
    return vector


def overview(report: dict[str, Any], *, k: int = 10, example_chars: int = 200) -> dict[str, Any]:
    """What an investigator sees first: datasets blinded (``ds1``, ``ds2``, …), then per layer and position the top
    ``k`` logit-lens and Patchscope tokens of δ and one short steered example per prompt. Model names, the
    finetuning data and relevance are left out."""
    results: dict[str, Any] = {}
    for layer, result in report["results"].items():
        results[layer] = {}
        for position, item in result["positions"].items():
            lens, scope = item["logit_lens"]["delta"], item["patchscope"]["delta"]
            summary: dict[str, Any] = {
                "logit_lens": lens["tokens"][:k],
                "patchscope": {"scale": scope["scale"], "tokens": scope["tokens"][:k]},
            }
            steering = item.get("steering")
            if isinstance(steering, dict):
                summary["steering"] = {
                    "strength": steering["strength"],
                    "examples": [
                        {"prompt": s["prompt"], "steered": (s["steered"] or [""])[0][:example_chars]}
                        for s in steering["samples"]
                    ],
                }
            results[layer][position] = summary
    return {
        "datasets": [f"ds{i + 1}" for i in range(len(report["datasets"]))],
        "texts_averaged": report["counts"]["samples"],
        "n_positions": report["n_positions"],
        "layers": report["layers"],
        "positions": report["positions"],
        "results": results,
    }


def logit_lens_details(
    report: dict[str, Any],
    layer: int,
    position: int,
    vector: str = "delta",
    k: int | None = None,
    *,
    data: str = "text",
) -> dict[str, Any]:
    """The stored logit lens of one vector (``delta``, ``base_mean`` or ``chat_mean``): top tokens with
    probabilities and the inverse; ``data="chat"`` reads the chat-data variant."""
    lens = entry(report, layer, position, data)["logit_lens"][_vector(vector)]
    cut = slice(None, k)
    return {
        "layer": int(layer),
        "position": int(position),
        "vector": vector,
        "tokens": lens["tokens"][cut],
        "probs": lens["probs"][cut],
        "inverse": {"tokens": lens["inverse"]["tokens"][cut], "probs": lens["inverse"]["probs"][cut]},
    }


def patchscope_details(
    report: dict[str, Any],
    layer: int,
    position: int,
    vector: str = "delta",
    scale: float | None = None,
    *,
    data: str = "text",
) -> dict[str, Any]:
    """The Patchscope of one vector: the chosen scale's tokens (or ``scale``'s), the grader's reason, and every
    scale's tokens and agreement; ``data="chat"`` reads the chat-data variant."""
    scope = entry(report, layer, position, data)["patchscope"][_vector(vector)]
    chosen = scope if scale is None else next((s for s in scope["scales"] if abs(s["scale"] - scale) < 1e-9), None)
    if chosen is None:
        raise ConfigError(f"scale {scale} was not run (scales: {[s['scale'] for s in scope['scales']]})")
    return {
        "layer": int(layer),
        "position": int(position),
        "vector": vector,
        "scale": chosen["scale"],
        "tokens": chosen["tokens"],
        "probs": chosen["probs"],
        "chosen_scale": scope["scale"],
        "grader": scope["grader"],
        "reason": scope["reason"],
        "scales": [{"scale": s["scale"], "tokens": s["tokens"], "agreement": s["agreement"]} for s in scope["scales"]],
    }


def steering_details(report: dict[str, Any], layer: int, position: int) -> dict[str, Any]:
    """The stored steering of δ: strength, search trials, steered and unsteered samples per prompt."""
    steering = entry(report, layer, position)["steering"]
    if not isinstance(steering, dict):
        raise ConfigError(f"the report holds no steering for layer {layer}, position {position} ({steering})")
    return {"layer": int(layer), "position": int(position), **steering}


def causal_effect_details(report: dict[str, Any], layer: int, position: int) -> dict[str, Any]:
    """The stored causal effect of δ's direction."""
    causal = entry(report, layer, position)["causal_effect"]
    if not isinstance(causal, dict):
        raise ConfigError(f"the report holds no causal effect for layer {layer}, position {position} ({causal})")
    return {"layer": int(layer), "position": int(position), **causal}
