"""A run's metrics: ``run_dir/metrics.jsonl`` and, when configured, Weights & Biases (main process only)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from crosscoder.config import TrainConfig

METRICS_FILE = "metrics.jsonl"


class RunLogger:
    """Metrics to ``run_dir/metrics.jsonl`` and, when configured, to Weights & Biases (main process only; the
    others keep the latest metrics without writing). Resuming from ``checkpoint`` continues its wandb run and its
    latest metrics, and drops the lines logged after its step, so that every step is logged once."""

    def __init__(self, config: TrainConfig, run_dir: Path, is_main: bool, checkpoint: dict[str, Any] | None) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / METRICS_FILE if is_main else None
        self.last: dict[str, dict[str, float]] = dict(checkpoint.get("metrics", {})) if checkpoint else {}
        if checkpoint is not None and self.path is not None and self.path.is_file():
            keep_lines_up_to(self.path, checkpoint["step"])
        self.run = None
        if config.wandb_project and is_main:
            import wandb

            self.run = wandb.init(
                project=config.wandb_project,
                name=config.run_name,
                id=checkpoint.get("wandb_run_id") if checkpoint else None,
                resume="allow",
                mode=config.wandb_mode,
                dir=str(run_dir),
                config=config.to_dict(),
            )
        self.wandb_run_id = self.run.id if self.run is not None else None

    def log(self, step: int, tokens: int, metrics: dict[str, dict[str, float]], **extra: float) -> None:
        self.last.update(metrics)
        flat = {f"{group}/{name}": value for group, values in metrics.items() for name, value in values.items()}
        flat.update(extra)
        flat["tokens"] = tokens
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **flat}) + "\n")
        if self.run is not None:
            self.run.log(flat, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def keep_lines_up_to(path: Path, step: int) -> None:
    """Rewrite a metrics file atomically without its lines logged after ``step`` (a line cut off by a crash
    included)."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            logged = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        if logged <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(kept), encoding="utf-8")
    os.replace(temporary, path)
