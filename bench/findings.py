"""The papers' findings on the model organism, in one command: an L1 crosscoder, a BatchTopK crosscoder and a
diff-SAE trained side by side on the same stream (same dictionary size, same tokens), then compared.

Measured, not assumed: each comparison is reported as the organism shows it, including where it does not
reproduce a paper's finding (``findings.md`` says so). Writes into ``--out`` (default ``findings/``):
``findings.json``, ``findings.md``, ``delta_norm_histograms.png`` and ``nu_scatter_<architecture>.png``; ends with
one line of JSON.

    python bench/findings.py                 # the demo's settings (about 3.5 minutes on 2 CPU cores)
    python bench/findings.py --architectures l1 batchtopk diff_sae    # the papers' three only (about 2.5 minutes)
    python bench/findings.py --quick         # tiny settings, for the test suite (checks structure, not science)

What is compared (docs/methods.md §5–§8, §12):
- Δnorm classes of the crosscoders (the L1 penalty makes "chat-only" latents the BatchTopK one does not), and of the
  two variants built for diffing, a Matryoshka and a dedicated-feature BatchTopK crosscoder (``--architectures``
  chooses; the dedicated one's classes are also counted within each of its partitions);
- Latent Scaling of each crosscoder's chat-only latents (or, with fewer than ``--n-focus``, its most chat-leaning
  ones): the shares judged genuine, complete shrinkage and latent decoupling;
- the downstream KL gap closed on assistant tokens by each crosscoder's reconstruction and by its focus latents
  alone, by the diff-SAE's reconstruction and by as many of its most active latents;
- which latents point at the finetuning domain: the share of top-activating contexts containing a domain word,
  for the focus latents against ``--n-control`` latents that fired, picked at random (shared ones for a crosscoder,
  any but the focus for the diff-SAE; a control);
- FVE, L0 and the dead fraction of each on held-out tokens (inference threshold).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

import crosscoder
from crosscoder.activations import PairedActivationStream
from crosscoder.config import DICTIONARY_NAMES, preset
from crosscoder.eval.exclusivity import (
    BASE_ONLY,
    CHAT_ONLY,
    SHARED,
    class_counts,
    latent_classes,
    relative_norm_difference,
)
from crosscoder.eval.inspection import PAD, top_contexts
from crosscoder.eval.kl import (
    crosscoder_patch,
    diff_sae_patch,
    downstream_kl,
    latent_subset_patch,
    sae_latent_subset_patch,
)
from crosscoder.eval.latent_scaling import COMPLETE_SHRINKAGE, GENUINE, LATENT_DECOUPLING, compute_betas
from crosscoder.eval.plots import delta_norm_histogram, nu_scatter
from crosscoder.eval.reconstruction import reconstruction
from crosscoder.organism import DOMAIN_WORDS, build_model_organism
from crosscoder.organism_source import resolve_model_organism

#: What can be compared, in the order they are analysed (the diff-SAE's focus count follows the BatchTopK one's).
ARCHITECTURES = ("l1", "batchtopk", "matryoshka", "dedicated", "diff_sae")
#: The papers' comparison (``paper_checks``) needs these three.
PAPERS = ("l1", "batchtopk", "diff_sae")
SAES = ("diff_sae",)
#: The L1 crosscoder's λ: at the papers' 0.041 it is barely sparse on the organism (held-out L0 218 of 512 latents);
#: of the grid 0.041, 0.15, 0.5, 1.5, 5 (L0 218, 115, 53, 26, 12.4) this is the one whose L0 is nearest the BatchTopK
#: dictionaries' k = 8, chosen by sparsity alone before any chat-only latent was counted (README, Results).
L1_COEFFICIENT = 5.0


def train_side_by_side(args: argparse.Namespace) -> tuple[dict, crosscoder.TrainConfig]:
    """The dictionaries, trained on one stream at the demo's settings (``--quick``: tiny ones)."""
    config = dataclasses.replace(
        preset("demo"),
        architectures=args.architectures,
        run_name="findings",
        output_dir=args.out / "runs",
        progress=not args.quiet,
        checkpoint_every=0,
        seed=args.seed,
        l1_coefficient=args.l1_coefficient,
    )
    if args.quick:
        config = dataclasses.replace(
            config, num_tokens=256 * 24, batch_size=256, dict_size=128, k=4, normalization_tokens=1024,
            warmup_steps=5, threshold_start_step=8, threshold_beta=0.8, dead_tokens=2048, log_every=8,
            context_length=64, block_sequences=16, validation_tokens=1024,
        )  # fmt: skip
    config = resolve_model_organism(config)
    if config.run_dir.exists():  # a finished comparison is never overwritten: it is moved aside with its date
        config.run_dir.rename(config.run_dir.with_name(f"findings-{time.strftime('%Y%m%d-%H%M%S')}"))
    return crosscoder.train(config), config


def held_out_chunks(config: crosscoder.TrainConfig, n_tokens: int) -> tuple[list, PairedActivationStream]:
    """Paired activations of the same datasets in another order (seed + 1), as the evaluation reads them."""
    stream = PairedActivationStream.from_config(dataclasses.replace(config, seed=config.seed + 1, prefetch_blocks=0))
    chunks, seen = [], 0
    for chunk in stream.chunks():
        chunks.append(chunk)
        seen += len(chunk.token_ids)
        if seen >= n_tokens:
            break
    return chunks, stream


def domain_share(examples: dict[int, list], decode) -> tuple[float, int]:
    """Share of top-activating contexts (over all the given latents) whose window contains a domain word."""
    windows = [
        decode([token for token in example.token_ids if token != PAD]).lower()
        for latent_examples in examples.values()
        for example in latent_examples
    ]
    hits = sum(any(word in window for word in DOMAIN_WORDS) for window in windows)
    return (hits / len(windows) if windows else float("nan")), len(windows)


def verdict_shares(verdicts: list[str]) -> dict[str, float]:
    n = max(len(verdicts), 1)
    return {
        "genuine": sum(v == GENUINE for v in verdicts) / n,
        "complete_shrinkage": sum(COMPLETE_SHRINKAGE in v for v in verdicts) / n,
        "latent_decoupling": sum(LATENT_DECOUPLING in v for v in verdicts) / n,
        "never_fired": sum(v == "never fired" for v in verdicts) / n,
    }


def compare(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    dictionaries, config = train_side_by_side(args)
    chunks, stream = held_out_chunks(config, args.eval_tokens)
    decode = stream.tokenizer.decode
    generator = torch.Generator().manual_seed(args.seed)
    results: dict = {"dictionaries": {}, "kl_patches": {}}
    patches, deltas = {}, {}
    for architecture in args.architectures:
        dictionary = dictionaries[DICTIONARY_NAMES[architecture]]
        inputs = [dictionary.input_from_pair(chunk.activations.float()) for chunk in chunks]
        recon = reconstruction(dictionary, inputs)
        entry: dict = {
            "fve": recon.fve,
            "l0": recon.l0,
            "dead_fraction": recon.dead_fraction,
            "dict_size": dictionary.dict_size,
        }
        if architecture not in SAES:
            delta = relative_norm_difference(dictionary)
            deltas[architecture] = delta
            classes = latent_classes(delta)
            if "by_partition" in (counts := class_counts(dictionary, classes)):
                entry["by_partition"] = counts["by_partition"]
            chat_only = [j for j, label in enumerate(classes) if label == CHAT_ONLY]
            focus = (
                chat_only if len(chat_only) >= args.n_focus else delta.argsort(descending=True)[: args.n_focus].tolist()
            )
            shared = [j for j, label in enumerate(classes) if label == SHARED and recon.frequencies[j] > 0]
            control = [shared[i] for i in torch.randperm(len(shared), generator=generator)[: args.n_control].tolist()]
            scaling = compute_betas(dictionary, [chunk.activations.float() for chunk in chunks], focus)
            verdicts = scaling.verdicts()
            nu_scatter(
                scaling.nu_error,
                scaling.nu_recon,
                ["chat-only" if focus is chat_only else "chat-leaning"] * len(focus),
                args.out / f"nu_scatter_{architecture}.png",
                title=f"{architecture} crosscoder: Latent Scaling",
            )
            entry.update(
                classes={
                    "chat_only": classes.count(CHAT_ONLY),
                    "base_only": classes.count(BASE_ONLY),
                    "shared": classes.count(SHARED),
                },
                focus="chat-only"
                if focus is chat_only
                else f"{len(focus)} most chat-leaning (fewer than {args.n_focus} chat-only)",
                latent_scaling=verdict_shares(verdicts),
                nu_error_median=float(scaling.nu_error.nanmedian()),
                nu_recon_median=float(scaling.nu_recon.nanmedian()),
            )
            patches[f"{architecture}: reconstruction"] = crosscoder_patch(dictionary)
            patches[f"{architecture}: focus latents"] = latent_subset_patch(dictionary, focus)
        else:
            n_top = max(args.n_focus, len(results["dictionaries"].get("batchtopk", {}).get("focus_latents", [])))
            focus = recon.frequencies.argsort(descending=True)[:n_top].tolist()
            fired = sorted(set(recon.frequencies.nonzero().flatten().tolist()) - set(focus))
            control = [fired[i] for i in torch.randperm(len(fired), generator=generator)[: args.n_control].tolist()]
            entry["focus"] = f"{len(focus)} most active latents"
            patches["diff_sae: reconstruction"] = diff_sae_patch(dictionary)
            patches["diff_sae: focus latents"] = sae_latent_subset_patch(dictionary, focus)
        examples = top_contexts(dictionary, chunks, focus, n_top=args.n_top)
        control_examples = top_contexts(dictionary, chunks, control, n_top=args.n_top) if control else {}
        share, n_examples = domain_share(examples, decode)
        control_share, _ = domain_share(control_examples, decode)
        entry.update(focus_latents=focus, domain_share=share, domain_share_control=control_share, contexts=n_examples)
        results["dictionaries"][architecture] = entry

    delta_norm_histogram(
        {f"{architecture} crosscoder": delta for architecture, delta in deltas.items()},
        args.out / "delta_norm_histograms.png",
        title="Δnorm of each crosscoder (organism)",
    )
    organism = build_model_organism(seed=config.seed, progress=False)
    with open(organism.chat_data, encoding="utf-8") as lines:
        conversations = [json.loads(line)["messages"] for line in itertools.islice(lines, args.kl_conversations)]
    kl = downstream_kl(
        stream.base_model,
        stream.chat_model,
        stream.tokenizer,
        conversations,
        stream.settings.layers[0],
        patches,
        first_tokens=5,
    )
    results["kl_patches"] = {"gap_nats": kl.all_tokens["base"], "gap_closed": kl.gap_closed, "kl": kl.all_tokens}
    results["settings"] = {
        "quick": args.quick,
        "architectures": list(args.architectures),
        "training_tokens": config.num_tokens,
        "dict_size": config.dict_size,
        "k": config.k,
        "l1_coefficient": config.l1_coefficient,
        "eval_tokens": sum(len(chunk.token_ids) for chunk in chunks),
        "kl_conversations": len(conversations),
        "control_latents": args.n_control,
        "seed": config.seed,
    }
    results["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    results["date"] = date.today().isoformat()
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["checks"] = paper_checks(results)
    return results


def paper_checks(results: dict) -> dict[str, bool]:
    """The papers' directions, as the organism shows them (True = reproduced)."""
    dictionaries, closed = results["dictionaries"], results["kl_patches"]["gap_closed"]
    l1, batchtopk = dictionaries["l1"], dictionaries["batchtopk"]
    return {
        "l1_has_more_chat_only_latents_than_batchtopk": l1["classes"]["chat_only"] > batchtopk["classes"]["chat_only"],
        "batchtopk_focus_latents_more_often_genuine_than_l1": (
            batchtopk["latent_scaling"]["genuine"] > l1["latent_scaling"]["genuine"]
        ),
        "diff_sae_closes_at_least_as_much_kl_gap_as_crosscoder_focus_latents": (
            closed["diff_sae: reconstruction"] >= closed["batchtopk: focus latents"]
        ),
        "diff_sae_closes_more_kl_gap_than_crosscoder_reconstruction": (
            closed["diff_sae: reconstruction"] > closed["batchtopk: reconstruction"]
        ),
        "diff_sae_top_latents_point_at_the_domain_more_than_batchtopk_focus_latents": (
            dictionaries["diff_sae"]["domain_share"] > batchtopk["domain_share"]
        ),
        "diff_sae_top_latents_point_at_the_domain_more_than_its_random_latents": (
            dictionaries["diff_sae"]["domain_share"] > dictionaries["diff_sae"]["domain_share_control"]
        ),
    }


def write_markdown(results: dict, path: Path) -> None:
    dictionaries, kl = results["dictionaries"], results["kl_patches"]
    settings = results["settings"]
    command = "python bench/findings.py" + (" --quick" if settings["quick"] else "")
    if tuple(settings["architectures"]) != ARCHITECTURES:
        command += " --architectures " + " ".join(settings["architectures"])
    if settings["l1_coefficient"] != L1_COEFFICIENT:
        command += f" --l1-coefficient {settings['l1_coefficient']}"
    lines = [
        "# Findings on the model organism",
        "",
        f"{results['date']}, {results['machine']}; {settings['training_tokens']:,} training tokens, "
        f"{settings['dict_size']} latents each, k = {settings['k']}, λ (L1) = {settings['l1_coefficient']}; "
        f"{settings['eval_tokens']:,} held-out tokens, {settings['kl_conversations']} held-out baking chats for the "
        f"KL. Command: `{command}`.",
        "",
        "| dictionary | FVE | L0 | dead | chat-only | base-only | shared | focus | genuine | shrinkage | decoupling "
        "| never fired | domain share (focus / control) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for architecture, entry in dictionaries.items():
        classes = entry.get("classes", {})
        scaling = entry.get("latent_scaling", {})
        lines.append(
            f"| {architecture} | {entry['fve']:.3f} | {entry['l0']:.1f} | {entry['dead_fraction']:.3f} | "
            f"{classes.get('chat_only', '–')} | {classes.get('base_only', '–')} | {classes.get('shared', '–')} | "
            f"{entry['focus']} | {_share(scaling.get('genuine'))} | {_share(scaling.get('complete_shrinkage'))} | "
            f"{_share(scaling.get('latent_decoupling'))} | {_share(scaling.get('never_fired'))} | "
            f"{_share(entry['domain_share'])} / "
            f"{_share(entry['domain_share_control'])} |"
        )
    for architecture, entry in dictionaries.items():
        if "by_partition" in entry:
            lines += ["", f"Δnorm classes within each partition of the {architecture} crosscoder:", ""]
            lines += [
                f"- {partition}: " + ", ".join(f"{count} {label}" for label, count in counts.items())
                for partition, counts in entry["by_partition"].items()
            ]
    lines += [
        "",
        f"Downstream KL on assistant tokens (gap KL(P_chat ‖ P_base-patched) = {kl['gap_nats']:.4f} nats):",
        "",
    ]
    lines += ["| patch | KL (nats) | gap closed |", "|---|---|---|"]
    lines += [f"| {name} | {kl['kl'][name]:.4f} | {value:.3f} |" for name, value in kl["gap_closed"].items()]
    lines += ["", "The papers' directions, as the organism shows them:", ""]
    lines += [
        f"- {name.replace('_', ' ')}: **{'yes' if held else 'no — not reproduced here'}**"
        for name, held in results["checks"].items()
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _share(value: float | None) -> str:
    return "–" if value is None or value != value else f"{100 * value:.0f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("findings"))
    parser.add_argument("--quick", action="store_true", help="tiny settings (for the test suite)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens (default 100k; quick 4k)")
    parser.add_argument("--kl-conversations", type=int, default=None, help="chats for the KL (default 64; quick 4)")
    parser.add_argument("--n-focus", type=int, default=10, help="latents analysed when there are fewer chat-only")
    parser.add_argument("--n-top", type=int, default=10, help="top contexts per latent")
    parser.add_argument("--n-control", type=int, default=50, help="random latents of the domain-share control")
    parser.add_argument(
        "--architectures",
        nargs="+",
        choices=ARCHITECTURES,
        default=list(ARCHITECTURES),
        help=f"dictionaries to compare (at least {', '.join(PAPERS)}; default all)",
    )
    parser.add_argument(
        "--l1-coefficient", type=float, default=L1_COEFFICIENT, help="the L1 crosscoder's λ (matched sparsity)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    if missing := [name for name in PAPERS if name not in args.architectures]:
        parser.error(f"--architectures must include {', '.join(PAPERS)} (the papers' comparison); add {missing}")
    args.architectures = tuple(name for name in ARCHITECTURES if name in args.architectures)
    args.eval_tokens = args.eval_tokens or (4096 if args.quick else 100_000)
    args.kl_conversations = args.kl_conversations or (4 if args.quick else 64)
    args.out.mkdir(parents=True, exist_ok=True)
    results = compare(args)
    (args.out / "findings.json").write_text(json.dumps(results, indent=2, default=float) + "\n", encoding="utf-8")
    write_markdown(results, args.out / "findings.md")
    summary = {
        architecture: {key: entry.get(key) for key in ("fve", "l0", "dead_fraction", "domain_share")}
        | ({"chat_only": entry["classes"]["chat_only"]} if "classes" in entry else {})
        for architecture, entry in results["dictionaries"].items()
    }
    print(
        json.dumps(
            {"findings": summary, "gap_closed": results["kl_patches"]["gap_closed"], "checks": results["checks"]}
        )
    )


if __name__ == "__main__":
    main()
