"""The lens's plots (PNG, no display): ‖δ_p‖ per position, and token relevance per position for δ and the two
controls (docs/methods.md §10.8)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

from matplotlib import pyplot as plt

COLOURS = {"delta": "#cc3311", "base_mean": "#4477aa", "chat_mean": "#228833"}
LABELS = {"delta": "δ (chat − base)", "base_mean": "base mean", "chat_mean": "chat mean"}


def difference_norm_plot(report: dict[str, Any], path: Path) -> Path:
    """‖δ_p‖ against the position p, one line per layer, with each layer's chat mean activation norm dashed."""
    figure, axis = plt.subplots(figsize=(6.5, 3.5))
    for layer, result in report["results"].items():
        norms = result["difference_norms"]
        line = axis.plot(range(len(norms)), norms, marker=".", markersize=3, label=f"layer {layer}: ‖δ_p‖")[0]
        axis.axhline(report["norms"]["chat"][layer], color=line.get_color(), linestyle="--", linewidth=0.8)
    axis.set_xlabel("position p")
    axis.set_ylabel("norm")
    axis.set_yscale("log")
    axis.set_title("Mean activation difference per position (dashed: chat mean activation norm)")
    axis.title.set_fontsize(9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def relevance_plot(report: dict[str, Any], path: Path) -> Path:
    """Share of relevant tokens per position for δ and the controls: logit lens solid, Patchscope dashed; one panel
    per layer."""
    layers = list(report["results"])
    figure, axes = plt.subplots(1, len(layers), figsize=(5.5 * len(layers), 3.5), squeeze=False)
    for axis, layer in zip(axes[0], layers, strict=True):
        positions = report["results"][layer]["positions"]
        xs = [int(p) for p in positions]
        for reader, style in (("logit_lens", "-"), ("patchscope", "--")):
            for vector, colour in COLOURS.items():
                ys = [positions[p]["relevance"][reader][vector]["share"] for p in positions]
                axis.plot(xs, ys, style, marker="o", markersize=3, color=colour, label=f"{LABELS[vector]}, {reader}")
        axis.set_ylim(-0.05, 1.05)
        axis.set_xlabel("position p")
        axis.set_ylabel("share of relevant tokens")
        axis.set_title(f"Token relevance, layer {layer}")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
