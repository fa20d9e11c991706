"""Every file the Activation Difference Lens writes, named in one place (docs/methods.md §10.8).

Whatever reads a lens folder later (the report page, an agent's tools, a test) takes its file names from
``LensPaths``; nothing else spells a file name, so a reader can never look for a file the lens does not write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LensPaths:
    """The files of one lens output folder ``out``."""

    out: Path

    @property
    def report(self) -> Path:
        """``report.json``: every result (docs/methods.md §10.8)."""
        return Path(self.out) / "report.json"

    @property
    def means(self) -> Path:
        """``means.safetensors``: δ, the base mean and the chat mean per layer, ``[n_positions, d_model]`` each."""
        return Path(self.out) / "means.safetensors"

    @property
    def means_meta(self) -> Path:
        """``means.json``: layers, counts and mean activation norms of ``means.safetensors``."""
        return Path(self.out) / "means.json"

    @property
    def chat_means(self) -> Path:
        """``chat_means.safetensors``: the chat-data variant of ``means`` (``--chat-data``), rows from ``−k``."""
        return Path(self.out) / "chat_means.safetensors"

    @property
    def chat_means_meta(self) -> Path:
        """``chat_means.json``: layers, counts, first position and norms of ``chat_means.safetensors``."""
        return Path(self.out) / "chat_means.json"

    def means_files(self, variant: str = "text") -> tuple[Path, Path]:
        """The tensors and record of the ``"text"`` or ``"chat"`` means."""
        return (self.chat_means, self.chat_means_meta) if variant == "chat" else (self.means, self.means_meta)

    @property
    def html(self) -> Path:
        """``report.html``: the self-contained report page."""
        return Path(self.out) / "report.html"

    @property
    def difference_norms_plot(self) -> Path:
        """``difference_norms.png``: ‖δ_p‖ per position, one line per layer."""
        return Path(self.out) / "difference_norms.png"

    @property
    def relevance_plot(self) -> Path:
        """``relevance.png``: token relevance per position for δ and the two controls."""
        return Path(self.out) / "relevance.png"

    def all(self) -> dict[str, Path]:
        """Every file, by role."""
        return {
            "report": self.report,
            "means": self.means,
            "means_meta": self.means_meta,
            "html": self.html,
            "difference_norms_plot": self.difference_norms_plot,
            "relevance_plot": self.relevance_plot,
            "chat_means": self.chat_means,
            "chat_means_meta": self.chat_means_meta,
        }
