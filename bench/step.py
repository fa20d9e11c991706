"""One BatchTopK training step against a dense baseline and the floor (docs/methods.md §4.1).

- dense: the peers' step — dense encoder GEMM, ``torch.topk`` over the flattened [B, F] scores, dense decode
  ``codes @ W_dec``, autograd backward (dense ∂W_dec, ∂W_enc), Adam;
- ours: ``Trainee.step`` → ``crosscoder.training.training_step`` (sparse kernels: radix-select BatchTopK, sparse
  decode, sparse encoder gradient; AuxK, clipping, Adam) plus the step's bookkeeping — what ``crosscoder.train`` runs;
- floor: one encoder GEMM ``[B, S·d] × [S·d, F]`` into a reused output (as the step writes its scores), the only
  dense work a step needs.
Also the diff-SAE step (ours), the crosscoder variants' steps (docs/methods.md §12: Matryoshka with the default
prefixes F/16 … F, dedicated-feature with 10% base-only and 10% chat-only latents) and, when
``dictionary_learning`` is importable (an optional, separate environment: it pins a CUDA torch), its
``BatchTopKTrainer.update`` at the same diff-SAE shapes.
Each variant runs in its own process so that peak memory (CUDA: max allocated; CPU: peak RSS growth) is its
own. Ends with one line of JSON: ``speedup_vs_dense`` = dense / ours, ``ratio_to_floor`` = ours / floor and
``diff_sae_ratio_to_floor`` = the diff-SAE's step / its own floor GEMM ([B, d] × [d, F]), each the median of
``--repeats`` ratios timed in pairs in the step's process (``ratio_of_medians_to_floor``: the two processes' medians),
``matryoshka_vs_batchtopk``, ``dedicated_vs_batchtopk`` and ``dead_latents_vs_batchtopk`` (10% of the latents dead at
every step, so that AuxK runs, as late in a run; the other steps have none dead) = the variant's step / ours,
``state_mb`` (crosscoder) and ``diff_sae_state_mb``: the unavoidable state (``state_mb``), and
``<variant>_peak_over_state`` = its peak / that.

    python bench/step.py                                   # CPU: d=512, 2 sources, F=16384, k=64, B=4096
    python bench/step.py --d-model 2304 --dict-size 73728 --k 100 --batch 4096   # on a GPU
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import subprocess
import sys

# isort: off
import crosscoder  # before torch, as in training: MKL takes its GEMM buffers from malloc (host_memory)
import torch
from timing import timed

from crosscoder.host_memory import freed_blocks_kept

# isort: on


def dense_step(args, device):
    """The dense baseline on the same parameters and data."""
    S, d, F = args.sources, args.d_model, args.dict_size
    W_enc = torch.nn.Parameter(torch.randn(F, S * d, device=device) / d**0.5)
    W_dec = torch.nn.Parameter(W_enc.detach().clone())
    b_enc = torch.nn.Parameter(torch.zeros(F, device=device))
    b_dec = torch.nn.Parameter(torch.zeros(S * d, device=device))
    optimizer = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=1e-4, fused=True)
    x = torch.randn(args.batch, S * d, device=device)

    def step():
        f = torch.relu(x @ W_enc.T + b_enc)
        c = W_dec.detach().view(F, S, d).norm(dim=-1).sum(-1)
        kept = (f * c).flatten().topk(args.k * args.batch, sorted=False).indices
        codes = torch.zeros_like(f).flatten().scatter(0, kept, f.flatten()[kept]).view_as(f)
        loss = (x - (codes @ W_dec + b_dec)).pow(2).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def our_step(args, device, architecture="batchtopk", dead_fraction=0.0):
    """The library's training step exactly as ``crosscoder.train`` runs it: ``Trainee.step`` on raw paired
    activations (input, normalisation, ``training_step``, schedule, dead-latent counters, θ, metric window). With
    ``dead_fraction``, that share of the latents is dead at every step (AuxK decodes them: a step late in a run)."""
    from crosscoder.distributed import Distributed
    from crosscoder.training import Trainee
    from crosscoder.training.trainee import new_dictionary

    config = crosscoder.TrainConfig(
        architectures=(architecture,), k=args.k, dict_size=args.dict_size, batch_size=args.batch, device=device
    )
    dictionary = new_dictionary(architecture, config, args.d_model, args.sources).to(device)
    trainee = Trainee.new(architecture, dictionary, config)
    x = torch.randn(args.batch, args.sources, args.d_model, device=device)  # raw paired activations
    steps = iter(range(10**9))
    context = Distributed()
    n_dead = int(dead_fraction * args.dict_size)

    def step():
        trainee.tokens_since_fired[:n_dead] = config.dead_tokens  # dead again (a step resets the latents it fires)
        return trainee.step(x, next(steps), config, context)

    return step


def floor_step(args, device):
    W_enc = torch.randn(args.dict_size, args.sources * args.d_model, device=device)
    x = torch.randn(args.batch, args.sources * args.d_model, device=device)
    scores = torch.empty(args.batch, args.dict_size, device=device)  # written in place, as the training step does
    return lambda: torch.matmul(x, W_enc.T, out=scores)


def dictionary_learning_step(args, device):
    """``dictionary_learning``'s BatchTopKTrainer (PyPI 0.1.0) at the diff-SAE shapes, if importable."""
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer

    wanted = dict(
        steps=10_000,
        activation_dim=args.d_model,
        dict_size=args.dict_size,
        k=args.k,
        layer=0,
        lm_name="bench",
        dict_class=BatchTopKSAE,
        lr=1e-4,
        device=device,
        seed=0,
        warmup_steps=0,
    )
    accepted = inspect.signature(BatchTopKTrainer.__init__).parameters
    trainer = BatchTopKTrainer(**{key: value for key, value in wanted.items() if key in accepted})
    x = torch.randn(args.batch, args.d_model, device=device)
    counter = iter(range(10**9))
    return lambda: trainer.update(next(counter), x)


DEAD_FRACTION = 0.1
"""The share of dead latents in the ``ours_dead_latents`` variant."""


def state_mb(args, architecture: str) -> float:
    """The state no step can do without: fp32 weights, their gradients, Adam's two moments, and the batch of raw
    paired activations [B, S, d]. A crosscoder (any variant) encodes S·d inputs, a diff-SAE d."""
    width = args.d_model if architecture == "diff_sae" else args.sources * args.d_model
    parameters = 2 * args.dict_size * width + args.dict_size + width  # W_enc, W_dec, b_enc, b_dec
    return (4 * parameters + args.batch * args.sources * args.d_model) * 4 / 2**20


VARIANTS = {
    "dense": dense_step,
    "ours": our_step,
    "floor": floor_step,
    "ours_diff_sae": lambda args, device: our_step(args, device, "diff_sae"),
    "ours_matryoshka": lambda args, device: our_step(args, device, "matryoshka"),
    "ours_dedicated": lambda args, device: our_step(args, device, "dedicated"),
    "ours_dead_latents": lambda args, device: our_step(args, device, dead_fraction=DEAD_FRACTION),
    "dictionary_learning_diff_sae": dictionary_learning_step,
}


def run_variant(args) -> dict:
    """Time one variant in this process: median of ``--repeats`` steps after warm-up, and peak memory."""
    freed_blocks_kept(torch.device(args.device).type)  # as crosscoder.train runs (host_memory), for every variant
    return _timed_variant(args)


def _timed_variant(args) -> dict:
    device = args.device
    torch.manual_seed(0)
    # Two steps at a tiny shape first: the modules a first step imports lazily (the fused Adam's: ~75 MB of
    # torch._dynamo on CPU) are the process's memory, not the step's.
    tiny = argparse.Namespace(**{**vars(args), "batch": 8, "d_model": 4, "dict_size": 16, "k": 2})
    warm = VARIANTS[args.variant](tiny, device)
    warm(), warm()
    del warm
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    step = VARIANTS[args.variant](args, device)
    for _ in range(args.warmup):
        step()
    times = [timed(step, device) for _ in range(args.repeats)]
    peak_mb = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.startswith("cuda")
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) / 1024
    )
    result = {"variant": args.variant, "seconds": median(times), "peak_mb": round(peak_mb, 1)}
    if args.variant in PAIRED_FLOORS:  # after the peak is read: the floor's output is not the step's memory
        sources = PAIRED_FLOORS[args.variant] or args.sources
        floor = floor_step(argparse.Namespace(**{**vars(args), "sources": sources}), device)
        ratios = [timed(step, device) / timed(floor, device) for _ in range(args.repeats)]
        result["paired_ratio_to_floor"] = median(ratios)
    return result


PAIRED_FLOORS = {"ours": None, "ours_diff_sae": 1}
"""The steps timed against their own floor GEMM in pairs (a step, then its floor, ``--repeats`` times) in one
process: a machine whose speed drifts over minutes moves both alike. The value: the floor's ``sources`` (the diff-SAE
encodes d inputs; None: ``--sources``)."""


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--sources", type=int, default=2)
    parser.add_argument("--dict-size", type=int, default=16384)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(VARIANTS),
        default=list(VARIANTS),
        help="the variants to run (default: all); figures needing one left out are null",
    )
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    results = {variant: None for variant in VARIANTS}
    for variant in args.variants:
        command = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            reason = (finished.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"{variant:>30}: not run ({reason})")
            results[variant] = None
            continue
        results[variant] = json.loads(finished.stdout.strip().splitlines()[-1])
        print(
            f"{variant:>30}: {results[variant]['seconds'] * 1e3:9.1f} ms   peak {results[variant]['peak_mb']:9.1f} MB"
        )

    def seconds(name):
        return results[name]["seconds"] if results.get(name) else None

    def ratio(numerator, denominator):
        return round(numerator / denominator, 3) if numerator and denominator else None

    def paired(name):
        return round(results[name]["paired_ratio_to_floor"], 3) if results.get(name) else None

    summary = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "shape": {
            "batch": args.batch,
            "sources": args.sources,
            "d_model": args.d_model,
            "dict_size": args.dict_size,
            "k": args.k,
        },
        **{f"{name}_ms": round(value["seconds"] * 1e3, 2) for name, value in results.items() if value},
        **{f"{name}_peak_mb": value["peak_mb"] for name, value in results.items() if value},
        "state_mb": round(state_mb(args, "batchtopk"), 1),
        "diff_sae_state_mb": round(state_mb(args, "diff_sae"), 1),
        **{
            f"{name}_peak_over_state": round(
                results[name]["peak_mb"] / state_mb(args, "diff_sae" if name == "ours_diff_sae" else "batchtopk"), 3
            )
            for name in ("ours", "ours_diff_sae", "ours_matryoshka", "ours_dedicated", "ours_dead_latents")
            if results.get(name)
        },
        "speedup_vs_dense": ratio(seconds("dense"), seconds("ours")),
        "ratio_to_floor": paired("ours"),
        "diff_sae_ratio_to_floor": paired("ours_diff_sae"),
        "ratio_of_medians_to_floor": ratio(seconds("ours"), seconds("floor")),
        **{
            f"{name}_vs_batchtopk": ratio(seconds(f"ours_{name}"), seconds("ours"))
            for name in ("matryoshka", "dedicated", "dead_latents")
        },
        "dictionary_learning_vs_ours_diff_sae": ratio(
            seconds("dictionary_learning_diff_sae"), seconds("ours_diff_sae")
        ),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
