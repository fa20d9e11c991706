"""Reading the difference vectors for the lens command (docs/methods.md §10.2–§10.5): the logit lens, Patchscope
and relevance of δ and both controls at one layer and position (``Reader``), and the chat-data variant around the
assistant turn (``chat_variant``, docs/methods.md §10.1)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crosscoder.eval.adl.differences import VECTORS, MeanDifferences, chat_mean_differences
from crosscoder.eval.adl.graders import Grader
from crosscoder.eval.adl.inputs import chat_conversations
from crosscoder.eval.adl.lens import logit_lens
from crosscoder.eval.adl.patchscope import patchscope
from crosscoder.eval.adl.relevance import llm_relevance, relevance
from crosscoder.progress import progress_bar

if TYPE_CHECKING:
    from crosscoder.eval.adl.report import LensConfig


@dataclass
class Reader:
    """Reads the three vectors of one layer and position (docs/methods.md §10.2–§10.5) for either variant."""

    base: Any
    chat: Any
    tokenizer: Any
    config: LensConfig
    grader: Grader
    frequent: dict[int, int] | None
    frequent_text: list[str]

    @property
    def labels_with_llm(self) -> bool:
        return self.grader.name != "offline" and bool(self.config.description) and self.frequent is not None

    def relevance(self, lens_entry: dict[str, Any]) -> dict[str, Any]:
        """Trivial relevance, and with an LLM grader and --description the LLM's under ``"llm"``."""
        config = self.config
        scores = relevance(lens_entry, self.frequent, config.relevance_k)
        if self.labels_with_llm:
            scores["llm"] = llm_relevance(
                lens_entry, self.frequent, config.relevance_k, self.grader, config.description, self.frequent_text
            )
        return scores

    def read(self, means: MeanDifferences, layer: int, position: int, norms: dict[str, float]) -> dict[str, Any]:
        """Logit lens, Patchscope and relevance of δ and both controls; ``norms``: the models' mean norms."""
        config = self.config
        entry: dict[str, Any] = {"logit_lens": {}, "patchscope": {}}
        for kind in VECTORS:
            vector = means.vector(kind, layer, position)
            entry["logit_lens"][kind] = logit_lens(vector, self.chat, self.tokenizer, k=config.lens_k)
            model, norm = (self.base, norms["base"]) if kind == "base_mean" else (self.chat, norms["chat"])
            entry["patchscope"][kind] = patchscope(
                vector,
                model,
                self.tokenizer,
                layer,
                config.patchscope_scales,
                norm=norm,
                top_k=config.patchscope_top_k,
                keep=config.patchscope_keep,
                grader=self.grader,
            )
        if self.frequent is None:
            entry["relevance"] = "skipped: no --domain-data"
        else:
            entry["relevance"] = {
                reader: {kind: self.relevance(entry[reader][kind]) for kind in VECTORS}
                for reader in ("logit_lens", "patchscope")
            }
        return entry


def chat_variant(
    config: LensConfig, reader: Reader, layers: list[int], norms: dict[str, dict[int, float]]
) -> dict[str, Any]:
    """The chat-data variant (``--chat-data``): means around the assistant turn, read at positions −k … −1 and the
    requested ones, scaled by the general text's mean ``norms``; saved as ``chat_means.*``. Returns the report's
    ``chat_data`` entry, each position labelled."""
    means = chat_mean_differences(
        reader.base,
        reader.chat,
        reader.tokenizer,
        chat_conversations(config),
        layers,
        config.n_positions,
        config.max_samples,
        k=config.chat_k,
        batch_size=config.batch_size,
        progress=config.progress,
    )
    means.metadata["chat_data"] = config.chat_data
    means.save(Path(config.out))
    positions = [*range(-config.chat_k, 0), *config.positions]
    results: dict[str, Any] = {}
    tasks = [(layer, position) for layer in layers for position in positions]
    for layer, position in progress_bar(tasks, desc="lens (chat data)", unit="position", enabled=config.progress):
        entry = reader.read(means, layer, position, {model: norms[model][layer] for model in norms})
        entry["label"] = f"{-position} before the assistant turn" if position < 0 else f"assistant token {position}"
        result = results.setdefault(str(layer), {"difference_norms": means.difference_norms(layer), "positions": {}})
        result["positions"][str(position)] = entry
    return {
        "file": config.chat_data,
        "k": config.chat_k,
        "counts": {"samples": means.n_samples, "dropped_short": means.n_dropped},
        "positions": positions,
        "first_position": means.first_position,
        "results": results,
    }
