"""``crosscoder.host_memory``: importing crosscoder before torch has MKL free its GEMM buffers after each product and
leaves torch's CPU blocks unaligned (no huge pages), each time leaving a process's own choice alone; once training
sets glibc's thresholds (``freed_blocks_kept``) a freed [4,096, 1,024] temporary stays resident for reuse, while the
run trains and after it, whatever the dictionary's width. Each case in a fresh interpreter, since the settings are the
process's."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

THRESHOLD_PROBE = """
import json, sys, tempfile
import torch
from crosscoder.host_memory import freed_blocks_kept

def resident_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

def released_mb():
    \"\"\"What freeing a 16 MB temporary (a [4,096, 1,024] temporary of a training step) gives back.\"\"\"
    temporary = torch.ones(4096, 1024)
    during = resident_mb()
    del temporary
    return during - resident_mb()

released = {}
if sys.argv[1] == "default":  # glibc's own policy in a fresh process: a 16 MB block is mapped for its own
    released["default"] = released_mb()
elif sys.argv[1] == "kept":
    released["kept"] = freed_blocks_kept("cpu")
    released["inside"] = released_mb()
else:  # as the training loop sets it: measured while the loop reads its batches, and after the run
    import crosscoder
    from crosscoder.synthetic import PlantedActivations, PlantedDictionary

    class Measuring(PlantedActivations):
        def __iter__(self):
            for index, batch in enumerate(super().__iter__()):
                if index == 5:
                    released["inside"] = released_mb()
                yield batch

    config = crosscoder.TrainConfig(
        architectures=("batchtopk",), k=2, dict_size=int(sys.argv[2]), batch_size=64, num_tokens=64 * 10,
        warmup_steps=1, threshold_start_step=2, threshold_beta=0.5, normalization_tokens=64, validation_tokens=0,
        checkpoint_every=0, output_dir=tempfile.mkdtemp(), progress=False, device="cpu",
    )
    planted = PlantedDictionary.random(d_model=8, n_shared=8, n_base_only=2, n_chat_only=2, active_per_token=2.0)
    crosscoder.train(config, Measuring(planted, config.batch_size))
    released["after"] = released_mb()
print(json.dumps(released))
"""

HUGE_PAGES_PROBE = """
import json, os
import crosscoder
import torch

tensor = torch.ones(16 << 20)  # 64 MB, every page touched
start = tensor.data_ptr()
huge_kb, inside = 0, False
with open("/proc/self/smaps") as smaps:  # the mapping holding the tensor: its AnonHugePages
    for line in smaps:
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            low, high = (int(bound, 16) for bound in first.split("-"))
            inside = low <= start < high
        elif inside and first == "AnonHugePages:":
            huge_kb = int(line.split()[1])
print(json.dumps({"variable": os.environ.get("THP_MEM_ALLOC_ENABLE"), "huge_mb": huge_kb / 1024}))
"""


GEMM_BUFFERS_PROBE = """
import ctypes, json, os, sys
if sys.argv[1] == "torch first":
    import torch
import crosscoder
import torch


class MallocStatistics(ctypes.Structure):  # glibc's struct mallinfo2
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]


mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallocStatistics


def in_use() -> int:
    statistics = mallinfo2()
    return statistics.uordblks + statistics.hblkhd


x, weight, out = torch.randn(4096, 512), torch.randn(512, 512), torch.empty(4096, 512)
before = in_use()
torch.mm(x, weight, out=out)
print(json.dumps({"variable": os.environ.get("MKL_DISABLE_FAST_MM"), "kept_mb": (in_use() - before) / 2**20}))
"""


def probe(code: str, *arguments: str, **environment: str) -> dict:
    chosen = ("THP_MEM_ALLOC_ENABLE", "MKL_DISABLE_FAST_MM")
    env = {key: value for key, value in os.environ.items() if key not in chosen} | environment
    finished = subprocess.run(
        [sys.executable, "-c", code, *arguments], capture_output=True, text=True, timeout=120, env=env
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])


def transparent_huge_pages_mode() -> str | None:
    """The kernel's THP mode (``always``, ``madvise`` or ``never``), None where it has none."""
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not setting.exists():
        return None
    return setting.read_text().split("[")[1].split("]")[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_temporary_stays_resident_once_the_thresholds_are_set() -> None:
    """In a fresh process glibc maps a 16 MB block for its own and unmaps it when freed (its sliding threshold starts
    at 128 KiB); with ``KEPT_THRESHOLDS`` it comes from the heap, which keeps it for the next step to reuse."""
    assert probe(THRESHOLD_PROBE, "default")["default"] > 14
    assert probe(THRESHOLD_PROBE, "kept") == {"kept": True, "inside": pytest.approx(0, abs=2)}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("latents", ["16", "8192"], ids=["narrow", "wide"])
def test_training_keeps_freed_temporaries_resident_while_it_runs_and_after(latents) -> None:
    released = probe(THRESHOLD_PROBE, "training", latents)
    assert released["inside"] < 2 and released["after"] < 2


@pytest.mark.skipif(transparent_huge_pages_mode() != "madvise", reason="the kernel decides alone unless 'madvise'")
def test_importing_crosscoder_leaves_torchs_blocks_on_small_pages_unless_the_process_asks_for_huge_ones():
    """Aligned to 2 MiB, heap blocks split the heap's free memory (the peak grew over a run; host_memory): crosscoder
    no longer asks for it, and a process that does still gets it."""
    assert probe(HUGE_PAGES_PROBE) == {"variable": None, "huge_mb": 0}
    assert probe(HUGE_PAGES_PROBE, THP_MEM_ALLOC_ENABLE="1")["huge_mb"] >= 32


def glibc_with_mallinfo2() -> bool:
    try:
        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018 - glibc >= 2.33
    except (OSError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not glibc_with_mallinfo2(), reason="glibc's malloc statistics")
@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="MKL's memory manager")
def test_importing_crosscoder_before_torch_has_gemm_buffers_freed_after_each_product():
    """MKL keeps a [4,096, 512] × [512, 512] product's buffers (~10 MB on an Intel Xeon, ~2 MB on an AMD EPYC, this
    project's two kinds of machine; 0.01 MB freed) for the life of the process unless the variable is set before torch
    loads it; an empty value (a choice made before) keeps them, as does importing torch
    first."""
    freed = probe(GEMM_BUFFERS_PROBE, "crosscoder first")
    assert freed["variable"] == "1" and abs(freed["kept_mb"]) < 0.5
    cached = probe(GEMM_BUFFERS_PROBE, "crosscoder first", MKL_DISABLE_FAST_MM="")
    assert cached["variable"] == "" and cached["kept_mb"] > 1
    too_late = probe(GEMM_BUFFERS_PROBE, "torch first")
    assert too_late["variable"] is None and too_late["kept_mb"] > 1
