"""Progress bars in a log file: whole lines, a few of them, no carriage-return refreshes."""

import subprocess
import sys

SCRIPT = """
import time
from crosscoder.progress import progress_bar
for _ in progress_bar(range(2000), desc="steps", enabled={enabled}):
    time.sleep(0.0005)
"""


def run(enabled: bool) -> str:
    finished = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(enabled=enabled)], capture_output=True, text=True, check=True
    )
    return finished.stderr  # not a terminal, as in a CI log or a cluster job's log file


def test_a_bar_in_a_log_writes_whole_lines_only_at_its_start_and_end():
    log = run(True)
    assert "\r" not in log
    lines = log.splitlines()
    assert len(lines) == 2  # the interval (30 s) is longer than the loop: the first line and the final one
    assert lines[0].startswith("steps:   0%") and lines[-1].startswith("steps: 100%") and "2000/2000" in lines[-1]


def test_a_disabled_bar_writes_nothing():
    assert run(False) == ""
