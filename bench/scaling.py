"""Multi-process scaling: training tokens/s with 2 processes against 1 (torchrun, gloo on CPU / NCCL on GPU), data
parallel and with ``--shard-latents``.

Each process is held to the same number of threads (``--threads``, default 1), so the ratio measures the
parallel code, not the cores a lone process would borrow. Both runs train a BatchTopK crosscoder on the same
global batches of an activation file (random paired activations written once; each process reads its rows);
throughput is read from each run's ``metrics.jsonl`` (windows after the first).
Ends with one line of JSON: ``scaling_2_procs_data_parallel`` and ``scaling_2_procs_latent_sharded`` = tokens/s with
2 processes (in that mode) / with 1.

    python bench/scaling.py
    python bench/scaling.py --dict-size 65536 --batch-size 8192 --device cuda   # on 2 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

TRAIN = Path(__file__).resolve().parents[1] / "train.py"


def tokens_per_second(processes: int, args: argparse.Namespace, folder: Path, shard_latents: bool = False) -> float:
    output = folder / f"{processes}{'-sharded' if shard_latents else ''}"
    flags = ["--shard-latents"] if shard_latents else []
    flags += ["--activations", str(folder / "activations.safetensors"), "--run-name", "scaling"]
    flags += ["--architectures", "batchtopk", "--batch-size", str(args.batch_size), "--dict-size", str(args.dict_size)]
    flags += ["--k", str(args.k), "--num-tokens", str(args.batch_size * args.steps), "--warmup-steps", "5"]
    flags += ["--log-every", str(max(1, args.steps // 6)), "--checkpoint-every", "0", "--no-progress"]
    flags += ["--device", args.device, "--output-dir", str(output)]
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    subprocess.run([*launcher, str(TRAIN), *flags], check=True, env=env, capture_output=True, text=True)
    logged = (output / "scaling" / "metrics.jsonl").read_text().splitlines()
    rates = [json.loads(line)["tokens_per_second"] for line in logged[1:]]
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4096)  # bench/step.py's CPU shapes
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--dict-size", type=int, default=16384)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        generator = torch.Generator().manual_seed(0)
        activations = torch.randn(args.batch_size * 8, 2, args.d_model, generator=generator)
        save_file({"activations": activations}, Path(folder) / "activations.safetensors")
        one = tokens_per_second(1, args, Path(folder))
        two = tokens_per_second(2, args, Path(folder))
        sharded = tokens_per_second(2, args, Path(folder), shard_latents=True)
    print(f"1 process: {one:,.0f} tokens/s; 2 processes: {two:,.0f} tokens/s data parallel, {sharded:,.0f} sharded")
    print(
        json.dumps(
            {
                "device": args.device,
                "threads_per_process": args.threads,
                "batch_size": args.batch_size,
                "d_model": args.d_model,
                "dict_size": args.dict_size,
                "k": args.k,
                "tokens_per_second_1_proc": round(one),
                "tokens_per_second_2_procs_data_parallel": round(two),
                "tokens_per_second_2_procs_latent_sharded": round(sharded),
                "scaling_2_procs_data_parallel": round(two / one, 3),
                "scaling_2_procs_latent_sharded": round(sharded / one, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
