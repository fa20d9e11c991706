"""Compiling and loading this package's C kernels for the CPU (docs/methods.md §4.4).

A kernel's C source ships next to this module. On first use in a process it is compiled with the system's C compiler
(``$CC``, else ``cc``; ``-O3 -march=native``, no fast-math, no contraction of products into FMAs) into
``<user cache>/native/<name>-<digest>.so`` — the digest covers the source, the compiler's version, the flags and the
CPU's feature flags, so a changed source or another machine compiles anew — and loaded with ``ctypes``. Only these
sources are compiled and only the files this module names are loaded. Without a compiler, or if compiling fails, a
warning says why and how to fix it, and the callers run their plain-PyTorch reference (same results, slower).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from crosscoder.user_cache import user_cache_root

FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", "-fopenmp")


@functools.cache
def native_library(name: str) -> ctypes.CDLL | None:
    """The compiled kernel ``<name>.c`` of this package, loaded; None (after a warning) if it cannot be compiled."""
    source = Path(__file__).with_name(f"{name}.c")
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        return _unavailable(name, f"no C compiler {compiler!r} on PATH: install one (apt-get install gcc) or set CC")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
        identity = [source.read_bytes(), version.encode(), " ".join(FLAGS).encode(), platform.machine().encode()]
        digest = hashlib.sha256(b"\0".join([*identity, _cpu_flags().encode()])).hexdigest()[:16]
        library = _compiled(source, compiler, f"{name}-{digest}.so")
        return ctypes.CDLL(str(library))
    except (OSError, subprocess.SubprocessError) as error:
        return _unavailable(name, f"{type(error).__name__}: {error}")


def _compiled(source: Path, compiler: str, file_name: str) -> Path:
    """The shared library built from ``source``: the cached one if present, else compiled into the cache (or, where
    the cache cannot be written, a temporary folder) through a temporary file renamed into place, so that processes
    compiling at once never load a partial file."""
    folder = user_cache_root() / "native"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError:
        folder = Path(tempfile.mkdtemp(prefix="crosscoder-native-"))
    target = folder / file_name
    if target.is_file():
        return target
    partial = folder / f".{file_name}.partial-{os.getpid()}"
    finished = subprocess.run(
        [compiler, *FLAGS, str(source), "-o", str(partial)], capture_output=True, text=True, timeout=300
    )
    if finished.returncode != 0:
        partial.unlink(missing_ok=True)
        raise OSError(f"{compiler} failed on {source.name}:\n{finished.stderr.strip()}")
    os.replace(partial, target)
    return target


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` compiles for them), or '' where /proc/cpuinfo is absent."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def _unavailable(name: str, reason: str) -> None:
    warnings.warn(
        f"the C kernel {name} is not available ({reason}); the CPU step runs its plain-PyTorch reference instead: "
        "the same results, slower",
        RuntimeWarning,
        stacklevel=3,
    )
    return None
