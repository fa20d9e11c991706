"""Small training runs on planted data shared by the training, run-safety and variant tests."""

from pathlib import Path

import crosscoder
from crosscoder.synthetic import PlantedDictionary

PLANTED = PlantedDictionary.random(d_model=16, n_shared=24, n_base_only=4, n_chat_only=4, active_per_token=3.0)


def small_config(tmp_path: Path, **overrides) -> crosscoder.TrainConfig:
    """A BatchTopK crosscoder on 60 steps of 256 planted tokens, writing to ``tmp_path/run``; any field overridable."""
    values = dict(
        architectures=("batchtopk",),
        k=3,
        dict_size=64,
        batch_size=256,
        num_tokens=256 * 60,
        lr=2e-3,
        warmup_steps=10,
        threshold_start_step=20,
        dead_tokens=20_000,
        normalization_tokens=1024,
        checkpoint_every=20,
        log_every=10,
        output_dir=tmp_path,
        run_name="run",
        progress=False,
    )
    values.update(overrides)
    return crosscoder.TrainConfig(**values)
