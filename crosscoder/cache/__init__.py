"""On-disk activation cache: collect paired activations once, train many times (see docs/architecture.md).

- ``format``: the folder layout, manifest, stored dtypes, checksums and atomic writes;
- ``reader``: ``ActivationCache``, shuffled resumable batches (optionally split across data-parallel ranks);
- ``builder``: ``ActivationCache.build``'s resumable, byte-exact writer;
- ``cli``: ``python -m crosscoder.cache {build,info,verify} ...``.
"""

from crosscoder.cache.cli import USAGE, main
from crosscoder.cache.format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    DEFAULT_SHARD_TOKENS,
    MANIFEST_NAME,
    STORED_DTYPES,
    TOKEN_DTYPE,
    check_shard_sizes,
    read_manifest,
    shard_checksum_problems,
    verify_checksums,
)
from crosscoder.cache.reader import ActivationCache, Verify
from crosscoder.errors import CacheError, CacheIntegrityError

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "DEFAULT_SHARD_TOKENS",
    "MANIFEST_NAME",
    "STORED_DTYPES",
    "TOKEN_DTYPE",
    "USAGE",
    "ActivationCache",
    "CacheError",
    "CacheIntegrityError",
    "Verify",
    "check_shard_sizes",
    "main",
    "read_manifest",
    "shard_checksum_problems",
    "verify_checksums",
]
