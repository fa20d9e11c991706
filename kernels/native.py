"""Compiling and loading this package's C kernels for the CPU (docs/methods.md §4.4).

A kernel's C source ships next to this module. On first use in a process it is compiled with the system's C compiler
(``$CC``, else ``cc``; ``-O3 -march=native``, no fast-math, no contraction of products into FMAs, OpenMP) into
``<user cache>/native/<name>-<digest>.so`` — the digest covers the source, the headers beside it (``*.h``, which
a source may include), the compiler's version, the flags and the CPU's feature flags, so a changed source or another
machine compiles anew — and loaded with ``ctypes``, its functions declared with the caller's signatures. Only these
sources are compiled and only the files this module names are loaded. OpenMP: torch's CPU wheels load GNU OpenMP
(``libgomp.so.1``), which a kernel built by gcc then shares (its threads are torch's); another runtime (clang's
``libomp``) would run threads of its own beside torch's — slower, not wrong. Without a compiler, or if compiling or
loading fails, a warning says why and how to fix it, and the callers run their plain-PyTorch references (the same
results, or — where a kernel sums in another order — the same to rounding).
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
import threading
import warnings
from pathlib import Path

from crosscoder.user_cache import user_cache_root

FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", "-fopenmp")

Signatures = tuple[tuple[str, type | None, tuple[type, ...]], ...]
"""The functions a caller uses: (name, return type, argument types) each, as ``ctypes`` types."""

_building = threading.Lock()


@functools.cache
def native_library(name: str, signatures: Signatures) -> ctypes.CDLL | None:
    """The compiled kernel ``<name>.c`` of this package, loaded, with ``signatures`` declared; None (after a warning)
    if it cannot be compiled, loaded or declared."""
    source = Path(__file__).with_name(f"{name}.c")
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        return _unavailable(name, f"no C compiler {compiler!r} on PATH: install one (apt-get install gcc) or set CC")
    try:
        finished = subprocess.run([compiler, "--version"], capture_output=True, timeout=60)
        headers = [header.read_bytes() for header in sorted(source.parent.glob("*.h"))]  # what a source may include
        build = [finished.stdout, " ".join(FLAGS).encode(), platform.machine().encode()]
        identity = [source.read_bytes(), *headers, *build]
        digest = hashlib.sha256(b"\0".join([*identity, _cpu_flags().encode()])).hexdigest()[:16]
        with _building:
            library = _loaded(source, compiler, f"{name}-{digest}.so")
        for function, result, arguments in signatures:
            getattr(library, function).restype = result
            getattr(library, function).argtypes = list(arguments)
        return library
    except Exception as error:  # any failure leaves the reference running, after the warning
        return _unavailable(name, f"{type(error).__name__}: {error}")


def _loaded(source: Path, compiler: str, file_name: str) -> ctypes.CDLL:
    """The library built from ``source``, from the cache when it holds one that loads (one that does not — a file
    left broken — is built again), else compiled into it, or where the cache cannot be written, into a temporary
    folder: through a uniquely named temporary file renamed into place, so that no process loads a partial file."""
    folder = user_cache_root() / "native"
    target = folder / file_name
    if target.is_file():
        try:
            return ctypes.CDLL(str(target))
        except OSError:
            pass  # built again below, then renamed over it
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=folder, prefix=f".{file_name}.", suffix=".partial")
    except OSError:
        folder = Path(tempfile.mkdtemp(prefix="crosscoder-native-"))
        target = folder / file_name
        handle, partial = tempfile.mkstemp(dir=folder, prefix=f".{file_name}.", suffix=".partial")
    os.close(handle)
    try:
        finished = subprocess.run([compiler, *FLAGS, str(source), "-o", partial], capture_output=True, timeout=300)
        if finished.returncode != 0:
            message = finished.stderr.decode(errors="replace").strip()
            raise OSError(f"{compiler} failed on {source.name}:\n{message}")
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return ctypes.CDLL(str(target))


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` compiles for them), or '' where /proc/cpuinfo is absent."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def _unavailable(name: str, reason: str) -> None:
    warnings.warn(
        f"the C kernel {name} is not available ({reason}); the CPU step runs its plain-PyTorch reference instead: "
        "the same results (to rounding where the kernel sums in another order), slower",
        RuntimeWarning,
        stacklevel=3,
    )
    return None
