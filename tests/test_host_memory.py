"""``crosscoder.host_memory``: importing crosscoder before torch backs torch's large CPU blocks with huge pages (and
leaves a process's own choice alone); while a run of a wide dictionary trains, glibc's mmap threshold is fixed and a
freed [4,096, 1,024] temporary leaves the process, where glibc's default (kept for a narrow dictionary) keeps it
resident, and after the run it stays resident again.
Each case in a fresh interpreter, since the settings are the process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

THRESHOLD_PROBE = """
import json, sys, tempfile
import torch
from crosscoder.host_memory import RETURNED_FROM_LATENTS, large_blocks_returned_to_the_system

def resident_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

def released_mb():
    \"\"\"What freeing a 16 MB temporary (a [4,096, 1,024] temporary of a training step) gives back.\"\"\"
    temporary = torch.ones(4096, 1024)
    during = resident_mb()
    del temporary
    return during - resident_mb()

latents = RETURNED_FROM_LATENTS - (sys.argv[2] == "narrow")
warm = torch.ones(6 << 20)  # 24 MB, mapped; freeing it raises glibc's own threshold to 24 MB
del warm
released = {}
if sys.argv[1] == "default":
    released["default"] = released_mb()
elif sys.argv[1] == "scope":
    with large_blocks_returned_to_the_system("cpu", latents) as fixed:
        released["inside"] = released_mb()
    released["fixed"] = fixed
else:  # the scope as the training loop opens it: measured while the loop reads its batches
    import crosscoder
    from crosscoder.synthetic import PlantedActivations, PlantedDictionary

    class Measuring(PlantedActivations):
        def __iter__(self):
            for index, batch in enumerate(super().__iter__()):
                if index == 5:
                    released["inside"] = released_mb()
                yield batch

    config = crosscoder.TrainConfig(
        architectures=("batchtopk",), k=2, dict_size=latents, batch_size=64, num_tokens=64 * 10, warmup_steps=1,
        threshold_start_step=2, threshold_beta=0.5, normalization_tokens=64, validation_tokens=0, checkpoint_every=0,
        output_dir=tempfile.mkdtemp(), progress=False, device="cpu",
    )
    planted = PlantedDictionary.random(d_model=8, n_shared=8, n_base_only=2, n_chat_only=2, active_per_token=2.0)
    crosscoder.train(config, Measuring(planted, config.batch_size))
if sys.argv[1] != "default":
    released["after"] = released_mb()
print(json.dumps(released))
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


def probe(code: str, *arguments: str, **environment: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"} | environment
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
@pytest.mark.parametrize("opened_by", ["scope", "training"])
def test_freed_temporaries_leave_the_process_while_a_wide_dictionary_trains_and_stay_for_what_runs_after(opened_by):
    assert probe(THRESHOLD_PROBE, "default", "wide")["default"] < 2  # glibc's policy keeps a freed temporary resident
    released = probe(THRESHOLD_PROBE, opened_by, "wide")
    assert released["inside"] > 14  # the fixed threshold gives it back
    assert released["after"] < 2  # and after the run the heap keeps it again, for reuse without page faults
    assert released.get("fixed", True) is True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("opened_by", ["scope", "training"])
def test_a_narrow_dictionary_trains_under_glibcs_own_policy(opened_by):
    """Below ``RETURNED_FROM_LATENTS`` the page-ins would cost more than the step (the demo's training took twice as
    long): freed temporaries stay resident while it trains."""
    released = probe(THRESHOLD_PROBE, opened_by, "narrow")
    assert released["inside"] < 2 and released["after"] < 2
    assert released.get("fixed", False) is False


def test_importing_crosscoder_before_torch_turns_on_huge_pages_and_respects_a_choice_made_before():
    assert probe(HUGE_PAGES_PROBE, "crosscoder first")["variable"] == "1"
    assert probe(HUGE_PAGES_PROBE, "crosscoder first", THP_MEM_ALLOC_ENABLE="0")["variable"] == "0"
    assert probe(HUGE_PAGES_PROBE, "torch first")["variable"] is None  # too late to take effect: left unset


@pytest.mark.skipif(transparent_huge_pages_mode() != "madvise", reason="the kernel decides alone unless 'madvise'")
def test_torchs_large_blocks_get_huge_pages_once_crosscoder_is_imported_first():
    assert probe(HUGE_PAGES_PROBE, "crosscoder first")["huge_mb"] >= 32
    assert probe(HUGE_PAGES_PROBE, "torch first")["huge_mb"] == 0
