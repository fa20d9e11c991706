"""Exclusive latents on planted data: BatchTopK vs dedicated-feature vs Matryoshka crosscoders (docs/methods.md §12.3).

The three crosscoders train side by side (``crosscoder.train``, one batch stream) on paired activations generated
from a ``PlantedDictionary`` with known shared, base-only and chat-only latents. For each it reports the share of
planted latents recovered (§5) and the recall and precision of its exclusive latents (§12.3), the claims being the
latents classed base-only or chat-only that fire on held-out planted tokens. Measured, not tuned: the numbers are
what the defaults give. Ends with one line of JSON.

    python bench/variants.py            # d=32, 48 shared + 8 base-only + 8 chat-only planted, F=128, 2000 steps
    python bench/variants.py --quick    # a tiny run that checks the pipeline (what the test suite runs)
    python bench/variants.py --exclusive-k 1 1   # the dedicated crosscoder with a budget per partition (§12.2)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import crosscoder
from crosscoder.config import DICTIONARY_NAMES
from crosscoder.eval.recovery import exclusive_recovery, planted_recovery
from crosscoder.synthetic import PlantedActivations, PlantedDictionary

ARCHITECTURES = ("batchtopk", "dedicated", "matryoshka")


def compare(args: argparse.Namespace, out: Path) -> dict:
    """Train the three crosscoders on one planted stream and measure each."""
    planted = PlantedDictionary.random(
        d_model=args.d_model,
        n_shared=args.shared,
        n_base_only=args.exclusive,
        n_chat_only=args.exclusive,
        active_per_token=args.active,
        seed=args.seed,
    )
    config = crosscoder.TrainConfig(
        architectures=ARCHITECTURES,
        k=args.k,
        dict_size=args.dict_size,
        batch_size=args.batch,
        num_tokens=args.batch * args.steps,
        lr=1e-3,
        warmup_steps=min(50, args.steps // 10),
        threshold_start_step=args.steps // 10,
        threshold_beta=0.99,
        dead_tokens=args.batch * 200,
        exclusive_k=tuple(args.exclusive_k) if args.exclusive_k else None,
        normalization_tokens=args.batch * 8,
        checkpoint_every=0,
        log_every=max(1, args.steps // 10),
        output_dir=out,
        run_name="variants",
        seed=args.seed,
        progress=False,
        device="cpu",
    )
    start = time.perf_counter()
    trained = crosscoder.train(config, PlantedActivations(planted, args.batch, seed=args.seed + 1))
    seconds = time.perf_counter() - start
    held_out = planted.sample(args.held_out, torch.Generator().manual_seed(args.seed + 2))
    results = {}
    for architecture in ARCHITECTURES:
        dictionary = trained[DICTIONARY_NAMES[architecture]]
        with torch.no_grad():
            active = (dictionary.encode(held_out) > 0).any(dim=0)
        exclusive = exclusive_recovery(dictionary, planted, active)
        results[architecture] = {
            "recovered": round(planted_recovery(dictionary, planted).fraction, 4),
            "exclusive_recall": round(exclusive.recall, 4),
            "exclusive_precision": round(exclusive.precision, 4) if exclusive.claims else None,
            "exclusive_found": exclusive.found,
            "exclusive_planted": exclusive.planted,
            "exclusive_claims": exclusive.claims,
        }
    return {"train_seconds": round(seconds, 1), "dictionaries": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--shared", type=int, default=48, help="planted shared latents")
    parser.add_argument("--exclusive", type=int, default=8, help="planted base-only (and as many chat-only) latents")
    parser.add_argument("--active", type=float, default=4.0, help="planted latents firing per token")
    parser.add_argument("--dict-size", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--held-out", type=int, default=8192, help="planted tokens that decide which latents fire")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--exclusive-k", type=int, nargs=2, metavar=("BASE", "CHAT"), help="dedicated: budgets of its exclusive latents"
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the pipeline, not the science")
    args = parser.parse_args()
    if args.quick:
        args.d_model, args.shared, args.exclusive, args.dict_size, args.k = 16, 12, 3, 48, 3
        args.batch, args.steps, args.held_out = 128, 30, 1024
    with tempfile.TemporaryDirectory() as folder:
        summary = compare(args, Path(folder))
    print(f"{'crosscoder':>12} {'recovered':>10} {'excl. recall':>13} {'excl. precision':>16} {'claims':>7}")
    for architecture, row in summary["dictionaries"].items():
        precision = "—" if row["exclusive_precision"] is None else f"{row['exclusive_precision']:.2f}"
        print(
            f"{architecture:>12} {row['recovered']:>10.2f} {row['exclusive_recall']:>13.2f} {precision:>16} "
            f"{row['exclusive_claims']:>7}"
        )
    names = ("d_model", "shared", "exclusive", "dict_size", "k", "batch", "exclusive_k")
    shape = {name: getattr(args, name) for name in names}
    print(json.dumps({"shape": {**shape, "steps": args.steps, "seed": args.seed}, **summary}))


if __name__ == "__main__":
    main()
