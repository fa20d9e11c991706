#!/usr/bin/env bash
# The GPU campaign (docs/methods.md §4): on one H100/H200, in under 8 minutes,
#   1. the kernel tests with the Triton kernels compiled (TRITON_INTERPRET=0, CUDA tensors), while the model organism
#      is built (or found in $CROSSCODER_CACHE) in the background for step 5;
#   2. bench/step.py at the paper's shape: d = 2 × 2,304, F = 73,728, k = 100, B = 4,096;
#   3. bench/step.py at F = 131,072;
#   4. bench/selection.py (radix select vs torch.topk) on one [4,096, 73,728] score matrix;
#   5. bench/stream.py on the organism's tokenizer and text (two random 8-layer Llamas of width 2,048, bf16).
# Each step has a wall-clock cap (timeout; with the organism's build beside step 1 they add up to under 8 minutes); a step that fails or runs out of time is
# reported and the campaign goes on. The last line of stdout is one JSON object merging the benchmarks' JSON lines,
# each step's exit status and seconds, and the kernel tests' counts; the exit status is 0 only if every step passed.
# Without a CUDA GPU it stops at once with exit status 2.
#
#   bench/gpu.sh [LOG_DIR]        # logs of every step in LOG_DIR (default: a new temporary folder)
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
LOG_DIR="${1:-$(mktemp -d -t gpu-campaign.XXXXXX)}"
mkdir -p "$LOG_DIR"
CAMPAIGN_START=$SECONDS

# step NAME CAP_SECONDS COMMAND...: run COMMAND with stdout and stderr in LOG_DIR/NAME.log, killed after CAP_SECONDS;
# its exit status and seconds go to LOG_DIR/NAME.status.
step() {
    local name=$1 cap=$2 start=$SECONDS rc
    shift 2
    echo "== $name (at most ${cap} s): $*" >&2
    timeout --kill-after=10 "$cap" "$@" >"$LOG_DIR/$name.log" 2>&1
    rc=$?
    echo "$rc $((SECONDS - start))" >"$LOG_DIR/$name.status"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "   $name: timed out after ${cap} s (log: $LOG_DIR/$name.log)" >&2
    elif [ "$rc" -ne 0 ]; then
        echo "   $name: failed with exit status $rc (log: $LOG_DIR/$name.log)" >&2
    fi
    tail -n 3 "$LOG_DIR/$name.log" >&2
}

if ! timeout 20 "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>"$LOG_DIR/gpu_check.log"; then
    echo "bench/gpu.sh: no CUDA GPU (torch.cuda.is_available() is False or torch did not load; see $LOG_DIR/gpu_check.log): nothing was run" >&2
    exit 2
fi

step organism 150 "$PYTHON" -c "from crosscoder.organism import build_model_organism as build; build(progress=False)" &
organism_pid=$!

step kernel_tests 150 env TRITON_INTERPRET=0 "$PYTHON" -m pytest -q -p no:cacheprovider \
    --junitxml="$LOG_DIR/kernel_tests.xml" tests/test_kernels_compile.py tests/test_kernels_batch_topk.py \
    tests/test_kernels_sparse.py
wait "$organism_pid"
step step_paper 90 "$PYTHON" bench/step.py --device cuda --sources 2 --d-model 2304 --dict-size 73728 --k 100 \
    --batch 4096
step step_f131072 90 "$PYTHON" bench/step.py --device cuda --sources 2 --d-model 2304 --dict-size 131072 --k 100 \
    --batch 4096
step selection 45 "$PYTHON" bench/selection.py --device cuda --batch 4096 --dict-size 73728 --k 100
step stream 60 "$PYTHON" bench/stream.py --device cuda --hidden 2048 --layers 8 --context 1024 --blocks 4 \
    --dtype bfloat16

timeout 20 "$PYTHON" - "$LOG_DIR" "$((SECONDS - CAMPAIGN_START))" <<'EOF'
"""Merge the steps' statuses and last JSON lines into one JSON line; exit 1 if a step failed."""
import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

log_dir, total_seconds = Path(sys.argv[1]), int(sys.argv[2])
summary = {"campaign": "bench/gpu.sh", "log_dir": str(log_dir), "total_s": total_seconds}
failed = []
for status in sorted(log_dir.glob("*.status"), key=lambda path: path.stat().st_mtime):
    name = status.stem
    rc, seconds = map(int, status.read_text().split())
    entry = {"rc": rc, "seconds": seconds, "timed_out": rc in (124, 137)}
    lines = (log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()
    if lines and lines[-1].startswith("{"):
        try:
            entry["result"] = json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    if name == "kernel_tests" and (log_dir / "kernel_tests.xml").exists():
        suite = ElementTree.parse(log_dir / "kernel_tests.xml").getroot().find("testsuite")
        entry |= {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    summary[name] = entry
    if rc != 0:
        failed.append(name)
summary["failed_steps"] = failed
print(json.dumps(summary))
sys.exit(1 if failed else 0)
EOF
