"""Every Triton kernel in ``crosscoder.kernels`` compiles for an H100/H200 (sm_90) without a GPU (docs/methods.md §4.2,
§4.4).

The other kernel tests run the kernels in Triton's CPU interpreter (``TRITON_INTERPRET=1``), which accepts code the
compiler may reject. Here each kernel is compiled all the way to an sm_90 cubin: Triton's frontend, its NVIDIA
backend (TTIR → TTGIR → LLVM IR → PTX) and the ``ptxas`` that ships inside Triton's wheel; no driver or device.

- **Which kernels**: every ``@triton.jit`` function in every module of ``crosscoder.kernels``, found by walking the
  package, so a new kernel cannot be forgotten: one that no launch below reaches fails the test.
- **Which variants**: what the launchers launch. Each launcher runs on ``meta`` tensors (shapes and dtypes, no data)
  with its kernels swapped for a recorder; every recorded launch is compiled with the types, constexprs and
  specialisations Triton gives a real launch (pointers of fresh allocations and integers divisible by 16, integers
  equal to 1 as constants, integers of 2³¹ or more as int64).

The compiler runs in a subprocess (this file as a script): Triton decides once per process whether it interprets.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

TRITON_TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int32: "i32",
    torch.int64: "i64",
}
SM_90 = ("cuda", 90, 32)
"""``GPUTarget`` of an H100/H200: backend, compute capability, warp size."""


def find_kernels() -> dict[str, object]:
    """Every ``@triton.jit`` function defined in a ``crosscoder.kernels`` module, by qualified name."""
    import triton

    import crosscoder.kernels

    kernels = {}
    for module_info in pkgutil.iter_modules(crosscoder.kernels.__path__):
        module = importlib.import_module(f"crosscoder.kernels.{module_info.name}")
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.JITFunction) and value.fn.__module__ == module.__name__:
                kernels[f"{module.__name__}.{name}"] = value
    return kernels


def launch_every_variant() -> None:
    """Call each Triton launcher once per variant that training can launch (dtypes, digit widths, block widths)."""
    from crosscoder.kernels import backend
    from crosscoder.kernels import batch_topk as bt
    from crosscoder.kernels import sparse_decode as sd
    from crosscoder.kernels.sparse_codes import SparseCodes

    def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device="meta")

    for dtype in bt.SCORE_DTYPES:
        prefix_bits = 0
        for digit_bits in bt.TRITON_DIGIT_BITS:
            bt.radix_histogram_triton(meta(5000, dtype=dtype), 0, prefix_bits, digit_bits)
            prefix_bits += digit_bits
    for digit_bits in (bt.TRITON_MIN_DIGIT_BITS, bt.TRITON_MAX_DIGIT_BITS):
        bt.radix_histogram_triton(meta(5000), 0, 0, digit_bits)
    bt.radix_histogram_triton(meta(2**31 + 1, dtype=torch.bfloat16), 0, 0, 7)  # an int64 entry count

    batch, dict_size, nnz = 40, 37, 300
    index = meta(nnz, dtype=torch.int64)
    for dtype in backend.FLOAT_DTYPES:
        for d_model in (150, 3):  # the widest column block and the narrowest
            for order in (None, index):
                offsets, values = meta(batch + 1, dtype=torch.int64), meta(nnz, dtype=dtype)
                sd._segment_gather_sum_triton(offsets, index, order, values, meta(dict_size, d_model, dtype=dtype))
            codes = SparseCodes(index, index, meta(batch + 1, dtype=torch.int64), batch, dict_size)
            sd._entry_dot_triton(codes, meta(batch, d_model, dtype=dtype), meta(dict_size, d_model, dtype=dtype))


def record_launches(kernels: dict[str, object], launch: Callable[[], None]) -> list[tuple[str, tuple, dict]]:
    """Run ``launch`` with every kernel swapped for a recorder: the (kernel name, args, kwargs) of each launch."""
    launches = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid: object) -> Callable[..., None]:
            return lambda *args, **kwargs: launches.append((self.name, args, kwargs))

    modules = {name: importlib.import_module(name.rpartition(".")[0]) for name in kernels}
    try:
        for name, module in modules.items():
            setattr(module, name.rpartition(".")[2], Recorder(name))
        launch()
    finally:
        for name, module in modules.items():
            setattr(module, name.rpartition(".")[2], kernels[name])
    return launches


def specialize(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """The signature, constexprs and attributes Triton compiles a launch with (``triton.compiler.ASTSource``)."""
    bound = dict(zip(kernel.arg_names, args, strict=False)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    for position, param in enumerate(kernel.params):
        value = bound[param.name]
        if param.is_constexpr or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        if isinstance(value, torch.Tensor):
            signature[param.name] = f"*{TRITON_TYPES[value.dtype]}"
            divisible = True  # a fresh CUDA allocation is 256-byte aligned
        elif isinstance(value, bool):
            signature[param.name], divisible = "i1", False
        else:
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            divisible = value % 16 == 0
        if divisible:
            attrs[(position,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def compile_every_launch() -> dict:
    """Compile every recorded launch of every kernel to an sm_90 cubin; report kernels, counts and failures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = find_kernels()
    compiled = dict.fromkeys(kernels, 0)
    failures, seen = [], set()
    for name, args, kwargs in record_launches(kernels, launch_every_variant):
        signature, constexprs, attrs = specialize(kernels[name], args, kwargs)
        variant = f"{signature} {constexprs} divisible at {sorted(attrs)}"
        if (name, variant) in seen:
            continue
        seen.add((name, variant))
        try:
            binary = triton.compile(ASTSource(kernels[name], signature, constexprs, attrs), target=GPUTarget(*SM_90))
            assert binary.asm["cubin"], "no cubin"
            compiled[name] += 1
        except Exception as error:  # report every failing variant, not only the first
            failures.append({"kernel": name, "variant": variant, "error": str(error)[-1500:]})
    return {"compiled": compiled, "failures": failures}


def test_every_triton_kernel_compiles_for_sm_90_without_a_gpu(tmp_path: Path) -> None:
    """Each kernel is reached by at least one launch, and every launched variant compiles to a cubin."""
    triton = pytest.importorskip("triton")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("needs Triton with its NVIDIA backend")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "crosscoder.kernels.batch_topk._radix_histogram_kernel" in report["compiled"]  # the walk finds kernels
    assert not report["failures"], json.dumps(report["failures"], indent=1)[-6000:]
    not_launched = [name for name, count in report["compiled"].items() if count == 0]
    assert not not_launched, f"no launch reaches {not_launched}: add one to launch_every_variant"


if __name__ == "__main__":
    print(json.dumps(compile_every_launch()))
