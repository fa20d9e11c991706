"""A run's metrics: ``run_dir/metrics.jsonl`` and, when configured, Weights & Biases (main process only)."""

from __future__ import annotations

import json
from pathlib import Path

from crosscoder.config import TrainConfig


class RunLogger:
    """Metrics to ``run_dir/metrics.jsonl`` and, when configured, to Weights & Biases (main process only; the
    others keep the latest metrics without writing)."""

    def __init__(self, config: TrainConfig, run_dir: Path, wandb_run_id: str | None, is_main: bool = True) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl" if is_main else None
        self.last: dict[str, dict[str, float]] = {}
        self.run = None
        if config.wandb_project and is_main:
            import wandb

            self.run = wandb.init(
                project=config.wandb_project,
                name=config.run_name,
                id=wandb_run_id,
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
