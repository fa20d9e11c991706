"""``crosscoder.training.host_memory``: with glibc's mmap threshold fixed, a freed [4,096, 1,024] temporary leaves the
process; with glibc's default (the threshold raised by the first large block freed) it stays resident. Each case in a
fresh interpreter, since the setting is the process's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys, torch
from crosscoder.training.host_memory import return_large_blocks_to_the_system

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


def kept_after_free(mode: str) -> dict:
    finished = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_temporary_leaves_the_process_once_the_threshold_is_fixed():
    fixed = kept_after_free("fixed")
    assert fixed["configured"] is True
    assert fixed["kept_mb"] < 2
    assert kept_after_free("default")["kept_mb"] > 14  # glibc's own policy keeps it: the setting is what frees it
