"""``crosscoder.kernels.native``: a C kernel is compiled once into the user cache and reused; a cached file that does
not load is built again; a compiler that fails, or a missing function, leaves None after a warning (the callers then
run their references)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys

import pytest

from crosscoder.kernels import native, row_projection

NAME, SIGNATURES = "row_projection", row_projection.SIGNATURES


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A cache of the test's own, and no library loaded before it in this process."""
    monkeypatch.setenv("CROSSCODER_CACHE", str(tmp_path))
    native.native_library.cache_clear()
    yield tmp_path / "native"
    native.native_library.cache_clear()


def test_the_compiled_kernel_is_cached_and_reused(fresh_cache) -> None:
    assert native.native_library(NAME, SIGNATURES) is not None
    (built,) = fresh_cache.glob(f"{NAME}-*.so")
    stamp = built.stat().st_mtime_ns
    native.native_library.cache_clear()
    assert native.native_library(NAME, SIGNATURES) is not None
    assert built.stat().st_mtime_ns == stamp and list(fresh_cache.iterdir()) == [built]  # no partial file left


def test_a_changed_header_builds_the_kernel_anew(fresh_cache, tmp_path, monkeypatch) -> None:
    """The digest covers the headers beside the sources (``square_sum.h``, which ``row_projection.c`` includes)."""
    package = tmp_path / "package"
    package.mkdir()
    for file in (f"{NAME}.c", "square_sum.h"):
        shutil.copy(native.Path(native.__file__).with_name(file), package / file)
    monkeypatch.setattr(native, "__file__", str(package / "native.py"))
    assert native.native_library(NAME, SIGNATURES) is not None
    with open(package / "square_sum.h", "a") as header:
        header.write("/* changed */\n")
    native.native_library.cache_clear()
    assert native.native_library(NAME, SIGNATURES) is not None
    assert len(list(fresh_cache.glob(f"{NAME}-*.so"))) == 2


def test_a_cached_file_that_does_not_load_is_built_again(fresh_cache) -> None:
    assert native.native_library(NAME, SIGNATURES) is not None
    (built,) = fresh_cache.glob(f"{NAME}-*.so")
    broken = built.with_name("broken")
    broken.write_bytes(b"not a shared library")  # e.g. a copy cut short
    broken.replace(built)  # a new file: the library this process loaded keeps its own
    # another process (this one's loader would hand back the library it has under that name)
    loads = f"from crosscoder.kernels import native, row_projection as r; print(native.native_library({NAME!r}, "
    loads += "r.SIGNATURES))"
    finished = subprocess.run([sys.executable, "-c", loads], capture_output=True, text=True)
    assert finished.returncode == 0 and "CDLL" in finished.stdout, finished.stderr
    assert list(fresh_cache.iterdir()) == [built] and built.read_bytes()[:4] == b"\x7fELF"


def test_a_compiler_that_fails_leaves_the_reference_after_a_warning(fresh_cache, monkeypatch) -> None:
    monkeypatch.setenv("CC", shutil.which("false"))
    with pytest.warns(RuntimeWarning, match=r"C kernel row_projection is not available \(OSError: .*false failed"):
        assert native.native_library(NAME, SIGNATURES) is None
    assert not list(fresh_cache.glob("*"))  # no partial file left


def test_a_missing_function_leaves_the_reference_after_a_warning(fresh_cache) -> None:
    wrong = (("no_such_function", None, (ctypes.c_int64,)),)
    with pytest.warns(RuntimeWarning, match="AttributeError.*no_such_function"):
        assert native.native_library(NAME, wrong) is None
