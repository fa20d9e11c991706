"""BatchTopK selection: radix select (``crosscoder.kernels.batch_topk``) against sorting-based selection.

Times, on one ``[B, F]`` score matrix with ``n_keep = k · B``:
- ``torch.topk`` over the flattened matrix (what the peers do) and ``torch.kthvalue`` (quickselect);
- ``batch_topk_threshold`` and ``batch_topk`` with 2 digits of (15, 16) bits and 4 of (7, 8, 8, 8);
- the pieces of the radix path: one full histogram pass, the value check;
- on CPU, ``batch_topk`` and the histogram pass also on the ``reference`` backend (torch ops instead of the C passes
  of ``radix_select.c``).
Two score distributions: ``relu-gaussian`` (ReLU of N(0, 1): about half zeros) and ``trained-like`` (about 9%
positive, heavy-tailed per-latent scales, as in a trained dictionary). Reports the median of ``--repeats`` runs and
the peak memory growth, and checks that every method finds the same threshold.

    python bench/selection.py                       # CPU: B=4096, F=16384, k=100
    python bench/selection.py --device cuda         # the Triton path
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from crosscoder.kernels import batch_topk as bt
from crosscoder.kernels.backend import use_backend


def make_scores(distribution: str, batch: int, dict_size: int, device: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    pre = torch.randn(batch, dict_size, generator=generator)
    if distribution == "relu-gaussian":
        scores = pre.relu_()
    elif distribution == "trained-like":
        latent_scale = torch.randn(dict_size, generator=generator).mul_(0.5).exp_()
        latent_bias = torch.randn(dict_size, generator=generator).mul_(0.5).sub_(1.5)
        scores = pre.add_(latent_bias).relu_().mul_(latent_scale)
    else:
        raise ValueError(distribution)
    return scores.to(device)


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    result = fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], result


def on_reference(fn):
    with use_backend("reference"):
        return fn()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dict-size", type=int, default=16384)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--distributions", nargs="+", default=["relu-gaussian", "trained-like"])
    args = parser.parse_args()
    n_keep = args.k * args.batch
    rows = []
    for distribution in args.distributions:
        scores = make_scores(distribution, args.batch, args.dict_size, args.device).to(getattr(torch, args.dtype))
        flat = scores.view(-1)
        positive = int((flat > 0).sum())
        methods = {
            "torch.topk (flattened)": lambda flat=flat: flat.topk(n_keep, sorted=False).values.min(),
            "torch.kthvalue": lambda flat=flat: flat.kthvalue(flat.numel() - n_keep + 1).values,
            "radix threshold (15, 16)": lambda s=scores: bt.batch_topk_threshold(s, n_keep, digit_bits=(15, 16)).value,
            "radix threshold (7, 8, 8, 8)": lambda s=scores: (
                bt.batch_topk_threshold(s, n_keep, digit_bits=(7, 8, 8, 8)).value
            ),
            "batch_topk (15, 16): rows, latents": lambda s=scores: (
                bt.batch_topk(s, n_keep, digit_bits=(15, 16)).threshold
            ),
            "batch_topk (7, 8, 8, 8): rows, latents": lambda s=scores: (
                bt.batch_topk(s, n_keep, digit_bits=(7, 8, 8, 8)).threshold
            ),
            "batch_topk_mask (default)": lambda s=scores: s[bt.batch_topk_mask(s, n_keep)].min(),
            "piece: one full histogram pass (15 bits)": lambda s=scores: bt.radix_histogram(s, 0, 0, 15),
            "piece: one full histogram pass (7 bits)": lambda s=scores: bt.radix_histogram(s, 0, 0, 7),
            "piece: value check (aminmax)": lambda flat=flat: torch.aminmax(flat),
        }
        if torch.device(args.device).type == "cpu":  # the same on the torch-op reference, without the C passes
            methods["batch_topk (15, 16), reference backend"] = lambda s=scores: on_reference(
                lambda: bt.batch_topk(s, n_keep, digit_bits=(15, 16)).threshold
            )
            methods["piece: one full histogram pass (15 bits), reference backend"] = lambda s=scores: on_reference(
                lambda: bt.radix_histogram(s, 0, 0, 15)
            )
        thresholds = set()
        for name, fn in methods.items():
            seconds, result = timed(fn, args.device, args.repeats)
            if not name.startswith("piece"):
                thresholds.add(float(result))
            rows.append({"distribution": distribution, "method": name, "ms": round(seconds * 1e3, 1)})
            print(f"{distribution:14s} {name:44s} {seconds * 1e3:9.1f} ms", flush=True)
        if len(thresholds) != 1:
            raise AssertionError(f"methods disagree on the threshold: {sorted(thresholds)}")
        print(f"{distribution:14s} positive fraction {positive / flat.numel():.3f}, threshold {thresholds.pop():.6g}")
    print(json.dumps({"batch": args.batch, "dict_size": args.dict_size, "n_keep": n_keep, "results": rows}))


if __name__ == "__main__":
    main()
