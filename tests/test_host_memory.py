"""``crosscoder.host_memory``: importing crosscoder before torch backs torch's large CPU blocks with huge pages (and
leaves a process's own choice alone); with glibc's mmap threshold fixed, a freed [4,096, 1,024] temporary leaves the
process, where glibc's default keeps it resident. Each case in a fresh interpreter, since the settings are the
process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

THRESHOLD_PROBE = """
import json, sys, torch
from crosscoder.host_memory import return_large_blocks_to_the_system

def resident_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

configured = return_large_blocks_to_the_system() if sys.argv[1] == "fixed" else None
warm = torch.ones(6 << 20)  # 24 MB, mapped; freeing it raises glibc's default threshold to 24 MB
del warm
before = resident_mb()
temporary = torch.ones(4096, 1024)  # 16 MB, as a step's [batch, n_sources * d_model] temporaries
del temporary
print(json.dumps({"configured": configured, "kept_mb": resident_mb() - before}))
"""

HUGE_PAGES_PROBE = """
import json, os, sys
if sys.argv[1] == "torch first":
    import torch
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


def probe(code: str, argument: str, **environment: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"} | environment
    finished = subprocess.run(
        [sys.executable, "-c", code, argument], capture_output=True, text=True, timeout=120, env=env
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
def test_a_freed_temporary_leaves_the_process_once_the_threshold_is_fixed():
    fixed = probe(THRESHOLD_PROBE, "fixed")
    assert fixed["configured"] is True
    assert fixed["kept_mb"] < 2
    assert probe(THRESHOLD_PROBE, "default")["kept_mb"] > 14  # glibc's own policy keeps it: the setting frees it


def test_importing_crosscoder_before_torch_turns_on_huge_pages_and_respects_a_choice_made_before():
    assert probe(HUGE_PAGES_PROBE, "crosscoder first")["variable"] == "1"
    assert probe(HUGE_PAGES_PROBE, "crosscoder first", THP_MEM_ALLOC_ENABLE="0")["variable"] == "0"
    assert probe(HUGE_PAGES_PROBE, "torch first")["variable"] is None  # too late to take effect: left unset


@pytest.mark.skipif(transparent_huge_pages_mode() != "madvise", reason="the kernel decides alone unless 'madvise'")
def test_torchs_large_blocks_get_huge_pages_once_crosscoder_is_imported_first():
    assert probe(HUGE_PAGES_PROBE, "crosscoder first")["huge_mb"] >= 32
    assert probe(HUGE_PAGES_PROBE, "torch first")["huge_mb"] == 0
