"""The seed papers' ablation on the model organism: mixing general text into the narrow finetune weakens what the
Activation Difference Lens reads (docs/methods.md §10).

For each ``general_mix`` (the fraction of the finetuning sequences replaced by general text; 1.0 = no baking data
at all) an organism is built (cached) and the lens runs on it: the relevance of δ's top logit-lens and Patchscope
tokens to the baking domain, maximised over positions, against the same for the controls (the base and chat
means), and — unless ``--no-steering`` — how much steering with δ raises the samples' similarity to the baking data.
Relevance is always judged against the baking chats, the domain the unmixed organism was finetuned on. Measured, not
tuned: the curve is reported as it comes out. Ends with one line of JSON.

    python bench/adl_mixing.py            # mixes 0, 0.25, 0.5, 1.0 (builds 3 organisms on the cached base, ~25 s each)
    python bench/adl_mixing.py --quick    # tiny organisms and lens settings, for the test suite
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from crosscoder.eval.adl import LensConfig, run_lens
from crosscoder.eval.adl.differences import VECTORS
from crosscoder.organism import DEFAULT_SETTINGS, build_model_organism

QUICK_SETTINGS = dataclasses.replace(
    DEFAULT_SETTINGS, vocab_size=1024, d_model=64, n_layers=2, n_heads=2, d_mlp=128, context_length=128,
    pretrain_steps=60, finetune_steps=40, n_train_conversations=200, n_heldout_conversations=100, n_eval_texts=50,
)  # fmt: skip


def lens_on(general_mix: float, args: argparse.Namespace) -> dict:
    """Build (or load) the organism with this mix, run the lens on it, and reduce the report to the curve's points."""
    settings = QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS
    organism = build_model_organism(seed=args.seed, general_mix=general_mix, settings=settings, progress=not args.quiet)
    config = LensConfig(
        base_model=str(organism.base_path),
        chat_model=str(organism.chat_path),
        datasets=(str(organism.general_data),),
        domain_data=str(organism.chat_data),
        out=args.out / f"mix{general_mix:g}",
        n_positions=16 if args.quick else 32,
        max_samples=40 if args.quick else 300,
        steering=not args.no_steering,
        steer_samples=2 if args.quick else 6,
        steer_tokens=8 if args.quick else 24,
        search_steps=3 if args.quick else 10,
        causal=False,
        patchscope_scales=(1.0, 4.0, 20.0) if args.quick else LensConfig.patchscope_scales,
        seed=args.seed,
        overwrite=True,
        progress=not args.quiet,
    )
    report = run_lens(config)
    point: dict = {"general_mix": general_mix, "chat_domain_loss": organism.losses["chat_domain"]}
    for reader in ("logit_lens", "patchscope"):
        shares: dict[str, list[float]] = {kind: [] for kind in VECTORS}
        for result in report["results"].values():
            for item in result["positions"].values():
                for kind in VECTORS:
                    shares[kind].append(item["relevance"][reader][kind]["share"])
        point[reader] = {
            "delta": max(shares["delta"]),
            "controls": max(max(shares["base_mean"]), max(shares["chat_mean"])),
        }
    if not args.no_steering:
        gains = [
            item["steering"]["similarity"]["steered"] - item["steering"]["similarity"]["unsteered"]
            for result in report["results"].values()
            for item in result["positions"].values()
        ]
        point["steering_similarity_gain"] = max(gains)
    return point


def write_markdown(points: list[dict], path: Path, command: str) -> None:
    lines = [
        "# Activation Difference Lens against mixing general data into the finetune",
        "",
        f"{time.strftime('%Y-%m-%d')}. Command: `{command}`. Relevance: share of δ's top-20 tokens among the baking "
        "data's frequent tokens, maximised over positions (controls: the larger of the base and chat means').",
        "",
        "| general_mix | chat loss on baking | logit lens δ / controls | Patchscope δ / controls "
        "| steering similarity gain |",
        "|---|---|---|---|---|",
    ]
    for point in points:
        gain = point.get("steering_similarity_gain")
        lines.append(
            f"| {point['general_mix']:g} | {point['chat_domain_loss']:.2f} | {point['logit_lens']['delta']:.2f} / "
            f"{point['logit_lens']['controls']:.2f} | {point['patchscope']['delta']:.2f} / "
            f"{point['patchscope']['controls']:.2f} | {'–' if gain is None else f'{gain:+.3f}'} |"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixes", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    parser.add_argument("--out", type=Path, default=Path("adl_mixing"))
    parser.add_argument("--quick", action="store_true", help="tiny organisms and lens settings (for the test suite)")
    parser.add_argument("--no-steering", action="store_true", help="relevance only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    points = [lens_on(mix, args) for mix in args.mixes]
    command = (
        "python bench/adl_mixing.py"
        + (" --quick" if args.quick else "")
        + (" --no-steering" if args.no_steering else "")
    )
    (args.out / "adl_mixing.json").write_text(json.dumps(points, indent=2) + "\n", encoding="utf-8")
    write_markdown(points, args.out / "adl_mixing.md", command)
    print(json.dumps({"points": points, "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
