"""Which implementation runs a sparse kernel, and the input checks every kernel shares.

Two implementations of each primitive exist side by side (docs/methods.md §4.4): a Triton kernel and a plain-PyTorch
reference. The reference is also the CPU production path, so it is built from fast sparse PyTorch ops.

- ``"auto"`` (default): Triton for CUDA tensors when Triton is installed, the reference otherwise.
- ``"triton"``: always Triton. CPU tensors work only in the Triton interpreter: ``TRITON_INTERPRET=1`` must be set
  before Triton is first imported (Triton decides once per process). Used by the tests.
- ``"reference"``: always the plain-PyTorch path.

A few CPU primitives also have a C kernel (``native``), which runs for CPU tensors under every backend but
``"reference"`` (``c_kernel_allowed``).

Choose with ``set_backend(name)`` / ``with use_backend(name):``, or the environment variable
``CROSSCODER_KERNELS`` (read at each call; ``set_backend`` takes precedence until reset with ``set_backend(None)``).

Dtypes: float16, bfloat16, float32 and float64. Every product is accumulated in float32 (float64 for float64
inputs) and the result is returned in the input dtype.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

try:
    import triton
except ImportError:  # Triton is a Linux-only dependency
    triton = None

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "CROSSCODER_KERNELS"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

HAS_TRITON = triton is not None
"""Whether Triton is importable."""


def _triton_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.zeros, InterpretedFunction)


TRITON_INTERPRETED = HAS_TRITON and _triton_interpreted()
"""Whether Triton runs kernels in its CPU interpreter: decided once per process, by ``TRITON_INTERPRET=1`` being
set when Triton is first imported."""

_forced: str | None = None


def _check_backend_name(name: str, origin: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{origin}={name!r} is not a kernel backend: use one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The selected backend: ``set_backend``'s choice, else ``$CROSSCODER_KERNELS``, else ``"auto"``."""
    if _forced is not None:
        return _forced
    return _check_backend_name(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


def set_backend(name: str | None) -> str | None:
    """Force ``"auto"``, ``"triton"`` or ``"reference"`` (None: back to ``$CROSSCODER_KERNELS``). Returns the
    previous forced choice, so ``set_backend(previous)`` restores it."""
    global _forced
    previous = _forced
    _forced = None if name is None else _check_backend_name(name, "backend")
    return previous


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with a forced backend, restoring the previous choice afterwards."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolve_backend(device: torch.device) -> Literal["triton", "reference"]:
    """The implementation that runs for tensors on ``device`` under the selected backend."""
    backend = get_backend()
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if HAS_TRITON and device.type == "cuda" else "reference"
    if not HAS_TRITON:
        raise RuntimeError("the kernel backend is 'triton' but Triton is not installed: pip install triton")
    if device.type != "cuda" and not TRITON_INTERPRETED:
        raise RuntimeError(
            f"the kernel backend is 'triton' but the tensors are on {device.type}: Triton kernels need CUDA "
            "tensors, or the Triton interpreter, which needs TRITON_INTERPRET=1 set before Triton is first "
            "imported (for pytest: at the top of tests/conftest.py); use set_backend('reference') for CPU tensors"
        )
    return "triton"


def c_kernel_allowed(device: torch.device) -> bool:
    """Whether a primitive with a C kernel may run it on tensors on ``device``: CPU tensors, under every backend but
    ``"reference"`` (the primitive then checks what its kernel reads: dtype, size, a compiler at hand)."""
    return device.type == "cpu" and get_backend() != "reference"


# ---------------------------------------------------------------------------------------------- input checks
def check_float_tensor(name: str, tensor: torch.Tensor, shape: tuple[int | None, ...], device: torch.device) -> None:
    """Raise a ValueError unless ``tensor`` is a contiguous floating tensor of ``shape`` (None: any size) on ``device``.

    Kernels never copy their inputs silently: a non-contiguous input is an error (call ``.contiguous()``;
    ``W.flatten(1)`` of a latent-major ``[F, S, d]`` parameter is already contiguous).
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != len(shape) or any(
        want not in (None, got) for want, got in zip(shape, tensor.shape, strict=True)
    ):
        expected = ", ".join("any" if size is None else str(size) for size in shape)
        raise ValueError(f"{name} has shape {list(tensor.shape)} but [{expected}] was expected")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {tensor.dtype}: use float16, bfloat16, float32 or float64")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the sparse codes are on {device}: move it with .to()")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} is not contiguous (strides {tensor.stride()}): pass {name}.contiguous()")


def check_same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    """Raise unless all tensors share one dtype (kernels do not mix precisions; cast first). Returns it."""
    dtypes = {name: tensor.dtype for name, tensor in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{name}: {dtype}" for name, dtype in dtypes.items())
        raise ValueError(f"dtypes differ ({listing}): cast them to one dtype first")
    return next(iter(dtypes.values()))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 accumulates in float64, every other float dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
