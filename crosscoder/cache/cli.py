"""The cache's command line: ``python -m crosscoder.cache {build,info,verify} ...``.

User errors (``crosscoder.errors.CrosscoderError``) print as one ``error: …`` line with exit status 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import json
import sys
import textwrap
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from crosscoder.cache.format import DEFAULT_SHARD_TOKENS, check_shard_sizes, read_manifest, verify_checksums
from crosscoder.cache.reader import ActivationCache
from crosscoder.chunks import ChunkSource
from crosscoder.errors import ConfigError, CrosscoderError, show_warnings_as_lines


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


STREAM_FIELDS = (
    "model_organism", "base_model", "chat_model", "base_revision", "chat_revision", "trust_remote_code",
    "layers", "model_dtype", "base_dtype", "chat_dtype", "device", "base_device", "chat_device",
    "datasets", "dataset_weights", "dataset_split", "dataset_streaming", "text_column", "messages_column",
    "context_length", "block_sequences", "model_batch_size", "drop_first_tokens", "drop_token_ids",
    "outlier_norm_factor", "prefetch_blocks", "batch_size", "seed", "progress",
)  # fmt: skip
"""The training settings of the stream a cache is built from (``PairedActivationStream.from_config`` and the
organism's resolution read them): what it holds (models, layers, datasets, filters, order) and how it runs (devices,
prefetch, progress bars). ``build`` refuses the others, which a cache does not record."""

USAGE = """usage:
  python -m crosscoder.cache build --out DIR [--shard-tokens N] [--dtype {bfloat16,float16,float32}]
                                   [--preset NAME] --base-model M --chat-model M --datasets D ... --num-tokens N
      Stream paired activations as a training run with these flags would (models, layers, datasets, filters)
      and write --num-tokens tokens to DIR; run again to continue an interrupted build.
      `python -m crosscoder.cache build --help` lists the stream flags.
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

    if "-h" in argv or "--help" in argv:
        print(_build_help(TrainConfig))
        return 0
    # --num-tokens is the cache's size, read here so that no training rule (such as one batch at least) applies to it
    options, rest = tyro.cli(_BuildOptions, args=list(argv), return_unknown_args=True, add_help=False)
    _refuse_training_flags(rest, TrainConfig)
    base = preset(options.preset) if options.preset is not None else TrainConfig()
    config = tyro.cli(
        TrainConfig,
        args=rest,
        default=base,
        prog="python -m crosscoder.cache build",
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


def _build_help(config_class: type) -> str:
    """``build --help``: the cache's own options, then the stream flags with their defaults and the config's
    docstrings (the training flags are left out: a cache does not record them)."""
    lines = [
        "usage: python -m crosscoder.cache build --out DIR [OPTIONS]",
        "",
        "Stream paired activations as a training run with these flags would, and write --num-tokens tokens to DIR;",
        "run again to continue an interrupted build. Train on it with `python train.py --cache DIR`.",
        "",
        "cache options:",
    ]
    for options, names in ((_BuildOptions, None), (config_class, STREAM_FIELDS)):
        docs, kinds = _field_docstrings(options), typing.get_type_hints(options, include_extras=True)
        for field in dataclasses.fields(options):
            if names is None or field.name in names:
                lines += _flag_help(field, kinds[field.name], docs.get(field.name, ""))
        if names is None:
            lines += ["", "stream options (the training config's; --preset NAME starts from a preset):"]
    return "\n".join(lines)


def _flag_help(field: dataclasses.Field, kind: Any, doc: str) -> list[str]:
    """A flag's lines in ``build --help``: its name and value (or its ``--no-`` twin), then its docstring."""
    name = field.name.replace("_", "-")
    markers = getattr(kind, "__metadata__", ())  # Annotated[type, tyro.conf.arg(aliases=...)]
    aliases = [alias for marker in markers for alias in getattr(marker, "aliases", None) or ()]
    kind = typing.get_args(kind)[0] if markers else kind
    names = ", ".join([f"--{name}", *aliases])
    flag = f"--{name}, --no-{name}" if kind is bool else f"{names} {_metavar(kind)}"
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
    text = " ".join(doc.split()) + ("" if "default" in doc else f" (default: {default})")
    return [f"  {flag}", *textwrap.wrap(text, 110, initial_indent="      ", subsequent_indent="      ")]


def _metavar(kind: Any) -> str:
    """INT, {a,b}, STR [...] for a field's type (optional types as their value's)."""
    arguments = [argument for argument in typing.get_args(kind) if argument is not type(None)]
    origin = typing.get_origin(kind)
    if origin is Literal:
        return "{" + ",".join(map(str, arguments)) + "}"
    if origin is tuple:
        return f"{_metavar(arguments[0])} [...]"
    if arguments and origin is not None:  # X | None
        return _metavar(arguments[0])
    return getattr(kind, "__name__", str(kind)).upper()


def _field_docstrings(config_class: type) -> dict[str, str]:
    """Each field's docstring (the string literal after it in the class body) of a dataclass, read from its source."""
    body = ast.parse(textwrap.dedent(inspect.getsource(config_class))).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for statement, following in itertools.pairwise(body):
        is_doc = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) and is_doc:
            docs[statement.target.id] = str(following.value.value)  # type: ignore[attr-defined]
    return docs


def _refuse_training_flags(args: Sequence[str], config_class: type) -> None:
    """A training flag given to ``build`` (one of the config's fields not in ``STREAM_FIELDS``) is an error: the
    cache would not record it."""
    fields = {field.name for field in dataclasses.fields(config_class)}
    for arg in args:
        if not arg.startswith("--"):
            continue
        name = arg[2:].split("=", 1)[0].replace("-", "_")
        name = name[3:] if name.startswith("no_") and name[3:] in fields else name
        if name in fields and name not in STREAM_FIELDS:
            raise ConfigError(
                f"{arg.split('=', 1)[0]} is a training setting, not part of the stream a cache holds: pass it to "
                "`python train.py --cache DIR` when training on the cache (`python -m crosscoder.cache build --help` "
                "lists the stream flags)"
            )


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
    show_warnings_as_lines()
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
