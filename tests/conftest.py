"""Session-wide fixtures."""

import os

# Triton decides once per process whether to interpret: the kernel tests run interpreted on CPU
# (a GPU job sets TRITON_INTERPRET=0 to run them compiled).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from crosscoder.organism import ModelOrganism, build_model_organism


@pytest.fixture(scope="session")
def organism_cache(tmp_path_factory):
    """A CROSSCODER_CACHE folder holding the default model organism, built once per test session (~80 s)."""
    cache = tmp_path_factory.mktemp("crosscoder-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CROSSCODER_CACHE", str(cache))
        build_model_organism(progress=False)
    return cache


@pytest.fixture(scope="session")
def default_organism(organism_cache) -> ModelOrganism:
    """The default organism (what ``python train.py`` uses), from the session's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CROSSCODER_CACHE", str(organism_cache))
        return build_model_organism(progress=False)


@pytest.fixture
def portable_build(tmp_path, monkeypatch):
    """(``name``, its ``signatures``) → one of ``crosscoder.kernels``' C kernels compiled without AVX-512 (the loops a
    CPU without it runs), into a cache of the test's own."""
    from crosscoder.kernels import native

    monkeypatch.setenv("CROSSCODER_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-mno-avx512f"))

    def build(name: str, signatures):
        native.native_library.cache_clear()  # this build, not the process's cached one
        try:
            library = native.native_library(name, signatures)
        finally:
            native.native_library.cache_clear()
        assert library is not None and len(list((tmp_path / "native").glob(f"{name}-*.so"))) == 1
        return library

    return build
