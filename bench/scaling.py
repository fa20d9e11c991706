"""Multi-process scaling: training tokens/s with 2 processes against 1 (torchrun, gloo on CPU / NCCL on GPU), with
``--parallelism data`` (gradients all-reduced, and with ``--shard-optimizer yes``: Adam sharded, gradients
reduce-scattered, updates all-gathered, through shared memory on gloo) and ``--parallelism latents``.

A fifth setting, ``2_independent_processes``, is the ceiling of any 2-process training on this machine: two
one-process runs side by side, each on half the batch and with no communication at all (their tokens/s summed,
window by window). It costs what 2 processes cost whatever the parallel code does — each GEMM on half the rows,
two processes sharing the memory bandwidth and the last-level cache — so ``ceiling_2_procs`` (its ratio to one
process) bounds the other ratios, and ``share_of_ceiling_*`` says how much of it each setting reaches.

Each process is held to the same number of threads (``--threads``, default 1), so the ratio measures the
parallel code, not the cores a lone process would borrow. Every run trains a BatchTopK crosscoder on the same
global batches of an activation file (random paired activations written once; each process reads its rows).
Throughput is read from each run's ``metrics.jsonl`` (one window per ``--log-every`` steps, the first window
dropped). The five settings run in turn ``--repeats`` times, so that a slow spell of a shared machine hits them
alike, and each figure is the median over all of its windows.
Ends with one line of JSON: ``scaling_2_procs`` = tokens/s with 2 processes / with 1 under the default
``--parallelism auto`` (``auto_parallelism`` says which mode it picks at these shapes), and the same ratio for
each setting (``scaling_2_procs_data_parallel``, ``scaling_2_procs_data_parallel_sharded_optimizer``,
``scaling_2_procs_latent_sharded``), ``ceiling_2_procs`` and each setting's ``share_of_ceiling_*``.

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
INDEPENDENT = "2_independent_processes"  # the ceiling: two one-process runs side by side on half the batch each


def window_rates(
    processes: int, parallelism: str, shard_optimizer: str, args: argparse.Namespace, folder: Path
) -> list[float]:
    """Tokens/s of each logged window after the first, for one training run."""
    output = Path(tempfile.mkdtemp(dir=folder))
    flags = ["--parallelism", parallelism, "--shard-optimizer", shard_optimizer]
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
    subprocess.run(
        [*launcher, str(TRAIN), *flags, *run_flags(args.batch_size, args, folder, output)],
        check=True, env=thread_limited(args), capture_output=True, text=True,
    )  # fmt: skip
    return logged_rates(output)


def independent_rates(args: argparse.Namespace, folder: Path) -> list[float]:
    """Summed tokens/s, window by window, of two one-process runs side by side on half the batch each."""
    outputs = [Path(tempfile.mkdtemp(dir=folder)) for _ in range(2)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = (visible.split(",") if visible else ["0", "1"])[:2]  # on CUDA each on a GPU of its own, as under torchrun
    runs = []
    for gpu, output in zip(gpus, outputs, strict=True):
        command = [sys.executable, str(TRAIN), *run_flags(args.batch_size // 2, args, folder, output)]
        env = thread_limited(args) | ({"CUDA_VISIBLE_DEVICES": gpu} if args.device.startswith("cuda") else {})
        with open(output / "stderr.log", "wb") as errors:  # a file, not a pipe: neither run waits on the other's
            runs.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=errors))
    for status, output in zip([run.wait() for run in runs], outputs, strict=True):  # both ended before either is read
        if status:
            raise RuntimeError(f"an independent run failed ({status}):\n{(output / 'stderr.log').read_text()}")
    first, second = (logged_rates(output) for output in outputs)
    return [a + b for a, b in zip(first, second, strict=True)]


def run_flags(batch_size: int, args: argparse.Namespace, folder: Path, output: Path) -> list[str]:
    """``train.py``'s flags for one run of ``args.steps`` steps of ``batch_size`` tokens, logging into ``output``."""
    flags = ["--activations", str(folder / "activations.safetensors"), "--run-name", "scaling"]
    flags += ["--architectures", "batchtopk", "--batch-size", str(batch_size), "--dict-size", str(args.dict_size)]
    flags += ["--k", str(args.k), "--num-tokens", str(batch_size * args.steps), "--warmup-steps", "5"]
    flags += ["--log-every", str(args.log_every), "--checkpoint-every", "0", "--no-progress"]
    return [*flags, "--device", args.device, "--output-dir", str(output)]


def thread_limited(args: argparse.Namespace) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}


def logged_rates(output: Path) -> list[float]:
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
    if args.device.startswith("cuda") and torch.cuda.device_count() < 2:
        parser.error(f"2 processes on CUDA need 2 GPUs; {torch.cuda.device_count()} visible")
    rates: dict[str, list[float]] = {name: [] for name in [*SETTINGS, INDEPENDENT]}
    with tempfile.TemporaryDirectory() as folder:
        generator = torch.Generator().manual_seed(0)
        activations = torch.randn(args.batch_size * 8, 2, args.d_model, generator=generator)
        save_file({"activations": activations}, Path(folder) / "activations.safetensors")
        for _ in range(args.repeats):
            for name, (processes, parallelism, shard_optimizer) in SETTINGS.items():
                rates[name] += window_rates(processes, parallelism, shard_optimizer, args, Path(folder))
            rates[INDEPENDENT] += independent_rates(args, Path(folder))
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(", ".join(f"{name}: {value:,.0f} tokens/s" for name, value in median.items()))
    figures = {f"tokens_per_second_{name}": round(value) for name, value in median.items()}
    for name in SETTINGS:
        if name != "1_proc":
            figures[f"scaling_{name}"] = round(median[name] / median["1_proc"], 3)
            figures[f"share_of_ceiling_{name}"] = round(median[name] / median[INDEPENDENT], 3)
    figures["ceiling_2_procs"] = round(median[INDEPENDENT] / median["1_proc"], 3)
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
