"""The cache's command line: ``python -m crosscoder.cache {build,info,verify} ...``.

User errors (``crosscoder.errors.CrosscoderError``) print as one ``error: …`` line with exit status 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from crosscoder.cache.format import DEFAULT_SHARD_TOKENS, check_shard_sizes, read_manifest, verify_checksums
from crosscoder.cache.reader import ActivationCache
from crosscoder.chunks import ChunkSource
from crosscoder.errors import ConfigError, CrosscoderError


@dataclass(frozen=True)
class _BuildOptions:
    out: Path | None = None
    """Cache folder (created; an interrupted build in it is continued)."""
    num_tokens: int | None = None
    """Tokens to cache (default: the preset's num_tokens)."""
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    """Tokens per shard file."""
    dtype: Literal["bfloat16", "float16", "float32"] | None = None
    """Stored dtype (default: the models' dtype)."""
    preset: str | None = None
    """Training preset to start the stream settings from."""


USAGE = """usage:
  python -m crosscoder.cache build --out DIR [--shard-tokens N] [--dtype {bfloat16,float16,float32}]
                                   [--preset NAME] --base-model M --chat-model M --datasets D ... --num-tokens N
      Stream paired activations as a training run with these flags would (models, layers, datasets, filters)
      and write --num-tokens tokens to DIR; run again to continue an interrupted build.
      `python -m crosscoder.cache build --help` lists every stream flag.
  python -m crosscoder.cache info DIR      what a cache holds
  python -m crosscoder.cache verify DIR    check every shard's sha256
"""


def _paired_stream(config: Any) -> ChunkSource:
    """The ChunkSource a training config names (imported lazily: models are only needed to build)."""
    from crosscoder.activations import PairedActivationStream

    return PairedActivationStream.from_config(config)


def _build_command(argv: Sequence[str]) -> int:
    import tyro

    from crosscoder.config import TrainConfig, output_folder_problem, preset
    from crosscoder.organism_source import resolve_model_organism

    # --num-tokens is the cache's size, read here so that no training rule (such as one batch at least) applies to it
    options, rest = tyro.cli(_BuildOptions, args=list(argv), return_unknown_args=True, add_help=False)
    base = preset(options.preset) if options.preset is not None else TrainConfig()
    config = tyro.cli(
        TrainConfig,
        args=rest,
        default=base,
        prog="python -m crosscoder.cache build",
        description=(
            "Build an activation cache: --out DIR (required), --shard-tokens N (default "
            f"{DEFAULT_SHARD_TOKENS}), --dtype bfloat16|float16|float32 (default: the models' dtype), --preset NAME; "
            "--num-tokens sets the cache size; the stream flags below choose models, layers, datasets and filters."
        ),
    )
    if options.out is None:
        raise ConfigError("name the cache folder with --out DIR")
    problem = output_folder_problem(options.out)
    if problem is not None:
        raise ConfigError(f"--out {options.out} cannot hold the cache: {problem}; pass a writable folder")
    num_tokens = options.num_tokens if options.num_tokens is not None else config.num_tokens
    config = resolve_model_organism(config)  # --model-organism: its models, data and layer
    ActivationCache.build(
        options.out, _paired_stream(config), num_tokens, options.shard_tokens, options.dtype, config.progress
    )
    _print_info(options.out)
    return 0


def _print_info(folder: Path) -> None:
    manifest = read_manifest(folder)
    statistics = manifest["statistics"]
    summary = {
        "folder": str(folder),
        "complete": manifest["complete"],
        "num_tokens": manifest["num_tokens"],
        "requested_tokens": manifest["requested_tokens"],
        "shards": len(manifest["shards"]),
        "shard_tokens": manifest["shard_tokens"],
        "n_sources": manifest["n_sources"],
        "d_model": manifest["d_model"],
        "dtype": manifest["dtype"],
        "dropped_nonfinite_tokens": manifest["dropped_nonfinite_tokens"],
        "mean_norm": statistics["mean_norm"],
        "input_scale": statistics["input_scale"],
        "description": manifest["description"],
    }
    print(json.dumps(summary, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m crosscoder.cache {build,info,verify} ...``; returns the exit status (2 for user errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "build":
            return _build_command(rest)
        if command in ("info", "verify"):
            if len(rest) != 1:
                raise ConfigError(f"`{command}` takes one cache folder, got {len(rest)} arguments")
            folder = Path(rest[0])
            if command == "verify":
                manifest = read_manifest(folder)
                check_shard_sizes(folder, manifest)
                verify_checksums(folder, manifest)
                print(f"{folder}: all {len(manifest['shards'])} shards match their checksums")
            else:
                _print_info(folder)
            return 0
        print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    except CrosscoderError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
