"""The plots researchers expect: the Δnorm histogram and the ν^ε–ν^r scatter (PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")  # files only, no display

from matplotlib import pyplot as plt


def delta_norm_histogram(
    delta_norm: torch.Tensor | dict[str, torch.Tensor], path: Path, title: str = "Relative decoder norm difference"
) -> Path:
    """Histogram of Δnorm (0 = base-only, 1 = chat-only) with the class boundaries marked; a dict of label → Δnorm
    overlays several dictionaries (e.g. an L1 and a BatchTopK crosscoder)."""
    series = delta_norm if isinstance(delta_norm, dict) else {"": delta_norm}
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for (label, values), colour in zip(series.items(), ("#4477aa", "#cc3311", "#999933", "#777777"), strict=False):
        kept = values[~values.isnan()].numpy()
        axis.hist(kept, bins=50, range=(0, 1), color=colour, alpha=0.6 if len(series) > 1 else 1.0, label=label or None)
    for boundary in (0.1, 0.4, 0.6, 0.9):
        axis.axvline(boundary, color="#999", linestyle="--", linewidth=0.8)
    axis.set_xlabel("Δnorm (0 = base-only, 0.5 = shared, 1 = chat-only)")
    axis.set_ylabel("latents")
    axis.set_yscale("log")
    axis.set_title(title)
    if len(series) > 1:
        axis.legend(fontsize=8)
    if title:
        axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def nu_scatter(
    nu_error: torch.Tensor, nu_recon: torch.Tensor, labels: list[str], path: Path, title: str | None = None
) -> Path:
    """ν^ε against ν^r per latent, coloured by group (e.g. chat-only vs shared baseline), with the genuine
    region ν^ε < 0.2, ν^r < 0.5 shaded."""
    figure, axis = plt.subplots(figsize=(5, 4.5))
    finite = ~(nu_error.isnan() | nu_recon.isnan())
    low_x = min(-0.1, float(nu_error[finite].min()) - 0.1) if finite.any() else -0.1
    low_y = min(-0.1, float(nu_recon[finite].min()) - 0.1) if finite.any() else -0.1
    axis.fill_between([low_x, 0.2], low_y, 0.5, color="#cfe8cf", label="genuine (ν^ε < 0.2, ν^r < 0.5)")
    for group, colour in zip(sorted(set(labels)), ("#cc3311", "#4477aa", "#999933", "#777777"), strict=False):
        chosen = torch.tensor([label == group for label in labels])
        axis.scatter(nu_error[chosen].numpy(), nu_recon[chosen].numpy(), s=14, color=colour, label=group)
    axis.set_xlabel("ν^ε (error ratio: high ⇒ complete shrinkage)")
    axis.set_ylabel("ν^r (reconstruction ratio: high ⇒ latent decoupling)")
    axis.legend(fontsize=8)
    if title:
        axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
