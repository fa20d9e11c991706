"""Multi-process scaling: training tokens/s with 2 processes against 1 (torchrun, gloo on CPU / NCCL on GPU), with
``--parallelism data`` (gradients all-reduced, and with ``--shard-optimizer yes``: Adam sharded, gradients
reduce-scattered, updates all-gathered, through shared memory on gloo) and ``--parallelism latents``.

Each process is held to the same number of threads (``--threads``, default 1), so the ratio measures the
parallel code, not the cores a lone process would borrow. Every run trains a BatchTopK crosscoder on the same
global batches of an activation file (random paired activations written once; each process reads its rows).
Throughput is read from each run's ``metrics.jsonl`` (one window per ``--log-every`` steps, the first window
dropped). The four settings run in turn ``--repeats`` times, so that a slow spell of a shared machine hits them
alike, and each figure is the median over all of its windows.
Ends with one line of JSON: ``scaling_2_procs`` = tokens/s with 2 processes / with 1 under the default
``--parallelism auto`` (``auto_parallelism`` says which mode it picks at these shapes), and the same ratio for
each setting (``scaling_2_procs_data_parallel``, ``scaling_2_procs_data_parallel_sharded_optimizer``,
``scaling_2_procs_latent_sharded``).

    python bench/scaling.py
    python bench/scaling.py --dict-size 65536 --batch-size 8192 --device cuda   # on 2 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from crosscoder.config import TrainConfig
from crosscoder.sharding import shards_latents

TRAIN = Path(__file__).resolve().parents[1] / "train.py"
SETTINGS = {  # processes, --parallelism, --shard-optimizer
    "1_proc": (1, "data", "no"),
    "2_procs_data_parallel": (2, "data", "no"),
    "2_procs_data_parallel_sharded_optimizer": (2, "data", "yes"),
    "2_procs_latent_sharded": (2, "latents", "no"),
}


def window_rates(
    processes: int, parallelism: str, shard_optimizer: str, args: argparse.Namespace, folder: Path
) -> list[float]:
    """Tokens/s of each logged window after the first, for one training run."""
    output = Path(tempfile.mkdtemp(dir=folder))
    flags = ["--parallelism", parallelism, "--shard-optimizer", shard_optimizer]
    flags += ["--activations", str(folder / "activations.safetensors"), "--run-name", "scaling"]
    flags += ["--architectures", "batchtopk", "--batch-size", str(args.batch_size), "--dict-size", str(args.dict_size)]
    flags += ["--k", str(args.k), "--num-tokens", str(args.batch_size * args.steps), "--warmup-steps", "5"]
    flags += ["--log-every", str(args.log_every), "--checkpoint-every", "0", "--no-progress"]
    flags += ["--device", args.device, "--output-dir", str(output)]
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    subprocess.run([*launcher, str(TRAIN), *flags], check=True, env=env, capture_output=True, text=True)
    logged = (output / "scaling" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["tokens_per_second"] for line in logged[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4096)  # bench/step.py's CPU shapes
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--dict-size", type=int, default=16384)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--log-every", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as folder:
        generator = torch.Generator().manual_seed(0)
        activations = torch.randn(args.batch_size * 8, 2, args.d_model, generator=generator)
        save_file({"activations": activations}, Path(folder) / "activations.safetensors")
        for _ in range(args.repeats):
            for name, (processes, parallelism, shard_optimizer) in SETTINGS.items():
                rates[name] += window_rates(processes, parallelism, shard_optimizer, args, Path(folder))
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(", ".join(f"{name}: {value:,.0f} tokens/s" for name, value in median.items()))
    figures = {f"tokens_per_second_{name}": round(value) for name, value in median.items()}
    for name in SETTINGS:
        if name != "1_proc":
            figures[f"scaling_{name}"] = round(median[name] / median["1_proc"], 3)
    config = TrainConfig(batch_size=args.batch_size, dict_size=args.dict_size, k=args.k)
    auto = "latents" if shards_latents(config, 2, args.dict_size) else "data"
    figures["auto_parallelism"] = auto
    data = "scaling_2_procs_data_parallel_sharded_optimizer"  # --shard-optimizer auto: on NCCL, and on one host
    figures["scaling_2_procs"] = figures["scaling_2_procs_latent_sharded" if auto == "latents" else data]
    settings = {"device": args.device, "threads_per_process": args.threads, "batch_size": args.batch_size}
    settings.update({"d_model": args.d_model, "dict_size": args.dict_size, "k": args.k, "repeats": args.repeats})
    print(json.dumps({**settings, **figures}))


if __name__ == "__main__":
    main()
