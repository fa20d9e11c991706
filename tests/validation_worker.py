"""Run by test_distributed, alone or under torchrun (second argument ``latents``: split the latents): trains on
planted data, each process reading its share of every global batch, validates on held-out batches that every
process passes, and prints (rank 0) the final validation metrics as JSON."""

import json
import os
import sys

import torch

from crosscoder import TrainConfig, train
from crosscoder.distributed import shutdown_distributed
from crosscoder.synthetic import PlantedDictionary

if __name__ == "__main__":
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    planted = PlantedDictionary.random(d_model=16, n_shared=24, n_base_only=4, n_chat_only=4)
    share = 128 // world_size
    batches = [
        planted.sample(128, torch.Generator().manual_seed(i))[rank * share : (rank + 1) * share] for i in range(60)
    ]
    held_out = [planted.sample(100, torch.Generator().manual_seed(1_000 + i)) for i in range(3)]
    config = TrainConfig(
        synthetic=False,
        architectures=("batchtopk", "diff_sae"),
        k=3,
        dict_size=64,
        batch_size=128,
        num_tokens=128 * 60,
        lr=3e-3,
        warmup_steps=2,
        threshold_start_step=5,
        normalization_tokens=128,
        checkpoint_every=0,
        log_every=5,
        validate_every=10,
        parallelism="latents" if "latents" in sys.argv[2:] else "data",
        output_dir=sys.argv[1],
        progress=False,
        device="cpu",
    )
    try:
        dictionaries = train(config, batches, held_out)
        if rank == 0:
            print(json.dumps({name: d.metadata["metrics"] for name, d in dictionaries.items()}), flush=True)
    finally:
        shutdown_distributed()
