"""Building the latent workspace (docs/methods.md §11): time and peak memory for 1,024 and 16,384 latents.

Synthetic weights (a BatchTopK crosscoder with θ set for L0 ≈ k on the synthetic activations) and a synthetic
stream of paired activations stand in for the models, so this measures the workspace itself: the activation store
pass, the table's columns and the static files. Each size runs in a fresh process so its peak resident memory is its
own (``ru_maxrss``).

    python bench/workspace.py                              # 1,024 and 16,384 latents, 32,768 tokens
    python bench/workspace.py --sizes 73728 --tokens 65536 # the paper's size
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from crosscoder.chunks import ActivationChunk
from crosscoder.dictionary import BatchTopKCrossCoder
from crosscoder.eval.workspace import ActivationStore, StoreSettings, WorkspaceContent, latent_columns, write_workspace


def synthetic_crosscoder(dict_size: int, d_model: int, k: int) -> BatchTopKCrossCoder:
    """Random weights, a fifth of the latents chat-only, θ set so that about ``k`` latents fire per token."""
    generator = torch.Generator().manual_seed(0)
    crosscoder = BatchTopKCrossCoder(d_model, dict_size, k)
    crosscoder.reset_parameters(generator)
    with torch.no_grad():
        crosscoder.W_dec[: dict_size // 5, 0] *= 0.05
        sample = torch.randn(2048, 2, d_model, generator=generator)
        scores = crosscoder.activations_normalized(crosscoder.normalize(sample)) * crosscoder.code_norms()
        crosscoder.threshold.fill_(float(scores.flatten().topk(k * 2048).values[-1]))
    return crosscoder


def measure(dict_size: int, tokens: int, d_model: int, k: int, chunk_tokens: int) -> dict[str, float]:
    """Build one workspace; the seconds of each part, peak memory and the files' size."""
    crosscoder = synthetic_crosscoder(dict_size, d_model, k)
    generator = torch.Generator().manual_seed(1)
    store = ActivationStore(StoreSettings(dict_size))
    start = time.perf_counter()
    with torch.no_grad():
        for index in range(tokens // chunk_tokens):
            x = torch.randn(chunk_tokens, 2, d_model, generator=generator)
            chunk = ActivationChunk(x, torch.randint(0, 32_000, (chunk_tokens,), generator=generator))
            sequences = torch.arange(chunk_tokens) // 128
            store.update(crosscoder.encode(chunk.activations), chunk.token_ids, sequences, index)
    store_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        store.save(Path(folder) / "store")
        columns = latent_columns(crosscoder, store)
        content = WorkspaceContent("bench", dict_size, columns, store=store, decode=lambda token: f"t{token}")
        write_workspace(Path(folder) / "ws", content)
        write_seconds = time.perf_counter() - start
        size = sum(path.stat().st_size for path in (Path(folder) / "ws").rglob("*") if path.is_file())
        store_size = sum(path.stat().st_size for path in (Path(folder) / "store").iterdir())
    return {
        "latents": dict_size,
        "tokens": tokens,
        "l0": float(store.counts.sum()) / store.tokens,
        "store_seconds": round(store_seconds, 2),
        "write_seconds": round(write_seconds, 2),
        "total_seconds": round(store_seconds + write_seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "workspace_mb": round(size / 2**20, 1),
        "store_mb": round(store_size / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 16384])
    parser.add_argument("--tokens", type=int, default=32_768)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--one", action="store_true", help="measure the first size in this process (internal)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.sizes[0], args.tokens, args.d_model, args.k, args.chunk_tokens)))
        return
    results = []
    for size in args.sizes:
        command = [sys.executable, __file__, "--one", "--sizes", str(size), "--tokens", str(args.tokens)]
        command += ["--d-model", str(args.d_model), "--k", str(args.k), "--chunk-tokens", str(args.chunk_tokens)]
        finished = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(finished.stdout.strip().splitlines()[-1]))
        print(f"{size} latents: {results[-1]}", file=sys.stderr)
    print(json.dumps({"bench": "workspace", "results": results}))


if __name__ == "__main__":
    main()
