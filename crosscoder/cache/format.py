"""The on-disk format of an activation cache: names, dtypes, the manifest, checksums and atomic writes.

A cache is a folder::

    manifest.json                       what, how many, statistics, checksums, build position
    shard_000000.activations.bin        [tokens, n_sources, d_model] raw little-endian values in the stored
                                        dtype (float32, float16, or bfloat16 kept as its uint16 bit patterns)
    shard_000000.token_ids.bin          [tokens] int32, the token each row was computed on
    shard_000001.activations.bin ...

Shards hold exactly ``shard_tokens`` tokens (the last may hold fewer) and are memory-mapped when read.
Every file is written to a temporary name and renamed into place; the manifest is rewritten the same way
after each finished shard, so a folder always describes a consistent prefix of the stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crosscoder.errors import CacheError, CacheIntegrityError, ConfigError

CACHE_FORMAT = "crosscoder-activation-cache"
CACHE_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: Default tokens per shard: 65,536 tokens of two 2304-wide bf16 sources make a 604 MB shard.
DEFAULT_SHARD_TOKENS = 65_536

#: Stored dtypes: name → (torch dtype of the values, numpy dtype of the raw file).
STORED_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype("<f4")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<u2")),
}
TOKEN_DTYPE = np.dtype("<i4")
#: The two files of a shard: its activations and its token ids.
SHARD_FILE_KINDS = ("activations", "token_ids")
SHARD_FILE = re.compile(r"^shard_\d{6}\.(activations|token_ids)\.bin$")
TEMPORARY_FILE = re.compile(r"^\.(shard_\d{6}\.(activations|token_ids)\.bin|manifest\.json)\.tmp$")
_HASH_BLOCK = 1 << 23


def shard_file_name(index: int, kind: str) -> str:
    """The file name of shard ``index``'s ``kind`` file (``"activations"`` or ``"token_ids"``)."""
    return f"shard_{index:06d}.{kind}.bin"


# ---------------------------------------------------------------------------- manifest
def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a cache folder; errors say why the folder is not a readable cache."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise CacheError(f"activation cache folder {folder} does not exist")
    if not path.is_file():
        raise CacheError(
            f"{folder} has no {MANIFEST_NAME}, so it is not an activation cache: build one with "
            "`python -m crosscoder.cache build --out DIR ...` or ActivationCache.build"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CacheError(f"{path} is not valid JSON ({error}): the manifest is damaged") from error
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise CacheError(f"{path} is not the manifest of a crosscoder activation cache (format {CACHE_FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > CACHE_VERSION:
        raise CacheError(
            f"{path} is cache format version {version!r}, newer than this crosscoder reads ({CACHE_VERSION}): "
            "upgrade crosscoder"
        )
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically and make the renames before it durable."""
    write_atomic(folder / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    if os.name == "posix":  # make the renames durable
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_atomic(path: Path, data: bytes | memoryview) -> str:
    """Write ``data`` to ``path`` through a temporary file and a rename; returns its sha256."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------- integrity
def check_shard_sizes(folder: Path, manifest: dict[str, Any]) -> None:
    """Every shard file exists with the size its token count implies; raises naming each bad file."""
    item_size = STORED_DTYPES[manifest["dtype"]][1].itemsize
    row_bytes = manifest["n_sources"] * manifest["d_model"] * item_size
    problems = []
    for shard in manifest["shards"]:
        for key, expected in (
            ("activations", shard["tokens"] * row_bytes),
            ("token_ids", shard["tokens"] * TOKEN_DTYPE.itemsize),
        ):
            path = folder / shard[key]
            if not path.is_file():
                problems.append(f"{shard[key]} is missing")
            elif path.stat().st_size != expected:
                problems.append(
                    f"{shard[key]} has {path.stat().st_size:,} bytes, expected {expected:,} (truncated or overwritten)"
                )
    if problems:
        raise CacheIntegrityError(integrity_message(folder, problems))


def shard_checksum_problems(folder: Path, manifest: dict[str, Any], index: int) -> list[str]:
    """Files of shard ``index`` whose sha256 differs from the manifest's (one full read of the shard)."""
    shard, problems = manifest["shards"][index], []
    for key in SHARD_FILE_KINDS:
        digest = file_sha256(folder / shard[key])
        if digest != shard[f"{key}_sha256"]:
            problems.append(f"{shard[key]} fails its sha256 checksum (corrupted)")
    return problems


def verify_checksums(folder: Path, manifest: dict[str, Any]) -> None:
    """Every shard's sha256 matches the manifest (one full read of the cache); raises naming each bad file."""
    problems = [
        problem
        for index in range(len(manifest["shards"]))
        for problem in shard_checksum_problems(folder, manifest, index)
    ]
    if problems:
        raise CacheIntegrityError(integrity_message(folder, problems))


def integrity_message(folder: Path, problems: list[str]) -> str:
    """The message of a ``CacheIntegrityError`` listing ``problems`` with the damaged files."""
    return (
        f"activation cache {folder} is damaged: {'; '.join(problems)}. Restore the files from a copy, or "
        "delete the folder and build the cache again"
    )


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in blocks of bounded size."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- stored dtypes
def from_stored(array: np.ndarray, dtype_name: str) -> torch.Tensor:
    """A tensor viewing a raw stored array (bf16 from its uint16 bit patterns)."""
    if dtype_name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def to_stored(x: torch.Tensor) -> np.ndarray:
    """The raw array of a contiguous CPU tensor in a stored dtype (bf16 as uint16 bit patterns)."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16)
    return x.numpy()


def dtype_name(dtype: torch.dtype | str | None) -> str | None:
    """The stored-dtype name of a torch dtype or name (None stays None); refuses a dtype the format cannot
    store."""
    if dtype is None:
        return None
    names = {torch_dtype: name for name, (torch_dtype, _) in STORED_DTYPES.items()}
    name = names.get(dtype) if isinstance(dtype, torch.dtype) else dtype
    if name not in STORED_DTYPES:
        raise ConfigError(f"cannot store activations as {dtype}: choose one of {', '.join(STORED_DTYPES)}")
    return name
