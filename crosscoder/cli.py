"""Command line of ``train.py``: ``--help`` is generated from ``TrainConfig``'s field docs; ``--preset NAME``
starts from a named preset and any other flag overrides it. With no arguments, the offline demo runs.

Exit status: 0 when the run finished (or had finished before); 2 with one ``error: …`` line for a problem the user
can fix; on SIGINT (Ctrl-C) or SIGTERM (a cluster's preemption) the run writes a checkpoint at its next step
boundary, says how to continue (``--resume``) and exits with 130 or 143 (128 + the signal's number, as a shell
reports it); a second Ctrl-C stops at once, without a checkpoint."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import tyro

from crosscoder.config import PRESETS, TrainConfig, preset
from crosscoder.demo import explain, lens_summary, summary
from crosscoder.distributed import shutdown_distributed
from crosscoder.errors import CrosscoderError, show_warnings_as_lines
from crosscoder.eval.recovery import planted_recovery
from crosscoder.organism_source import resolve_model_organism
from crosscoder.training import train
from crosscoder.training.batches import planted_dictionary
from crosscoder.training.interruption import RunInterrupted


@dataclass(frozen=True)
class _PresetChoice:
    preset: str | None = None


def parse_config(argv: Sequence[str]) -> TrainConfig:
    """TrainConfig from command-line arguments (no arguments: the ``demo`` preset in a fresh run folder; ``--resume``
    alone: the demo in the latest of those, resumed, so that "the same command and --resume" continues it)."""
    if not argv:
        demo = preset("demo")
        fresh = dataclasses.replace(demo, run_name=_unused_run_name(demo))
        if fresh.run_name != demo.run_name:
            print(f"{demo.run_dir} holds an earlier run (kept): this one goes to {fresh.run_dir}", file=sys.stderr)
        return fresh
    if list(argv) == ["--resume"]:
        demo = preset("demo")
        return dataclasses.replace(demo, run_name=_latest_run_name(demo), resume=True)
    choice, rest = tyro.cli(_PresetChoice, args=list(argv), return_unknown_args=True, add_help=False)
    base = preset(choice.preset) if choice.preset is not None else TrainConfig()
    description = "Train sparse dictionaries on paired base/chat activations. Presets: " + "; ".join(
        f"{name}: {text}" for name, (text, _) in PRESETS.items()
    )
    return tyro.cli(TrainConfig, args=rest, default=base, description=description)


def _unused_run_name(config: TrainConfig) -> str:
    """The first of ``run_name``, ``run_name-1``, ``run_name-2`` … with no folder in ``output_dir``."""
    return _run_names(config)[1]


def _latest_run_name(config: TrainConfig) -> str:
    """The last of those with a folder (``run_name`` itself when there is none)."""
    return _run_names(config)[0] or config.run_name


def _run_names(config: TrainConfig) -> tuple[str | None, str]:
    """(the last with a folder or None, the first without) of ``run_name``, ``run_name-1``, ``run_name-2`` …"""
    latest, name, suffix = None, config.run_name, 1
    while (config.output_dir / name).exists():
        latest, name, suffix = name, f"{config.run_name}-{suffix}", suffix + 1
    return latest, name


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    show_warnings_as_lines()
    try:
        config = parse_config(argv)
        dictionaries = train(resolve_model_organism(config))
    except RunInterrupted as stop:  # SIGINT / SIGTERM: a checkpoint was written
        print(stop, file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print("interrupted: stopped at once, without writing a checkpoint", file=sys.stderr)
        return 128 + signal.SIGINT
    except CrosscoderError as error:  # the user's to fix: one message; anything else is a bug and keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    if os.environ.get("RANK", "0") != "0":  # under torchrun only the main process reports
        return 0
    print(f"\nRun folder: {config.run_dir}")
    for name in dictionaries:
        print(f"  {name}: {config.run_dir / name}")
    lines = summary(dictionaries)
    if config.model_organism:  # the lens leads: what changed, read without any dictionary
        lines = lens_summary(config) + lines + explain(dictionaries, config)
    if config.synthetic:  # the self-check: did each dictionary find the planted latents?
        planted = planted_dictionary(config)
        lines += [f"{name}: {planted_recovery(d, planted).describe()}" for name, d in dictionaries.items()]
    print("\n".join(lines))
    return 0
