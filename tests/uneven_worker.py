"""Run under torchrun by test_distributed: rank 1 has fewer batches than rank 0; both must stop together, saving
what was trained, instead of rank 0 waiting forever for rank 1. Each rank prints the warning it got."""

import sys
import warnings

from crosscoder import TrainConfig, train
from crosscoder.distributed import shutdown_distributed
from crosscoder.synthetic import PlantedDictionary

if __name__ == "__main__":
    import os

    rank = int(os.environ["RANK"])
    planted = PlantedDictionary.random(d_model=16, n_shared=24, n_base_only=4, n_chat_only=4)
    batches = [planted.sample(64, __import__("torch").Generator().manual_seed(i)) for i in range(20 if rank else 40)]
    config = TrainConfig(
        synthetic=False,
        k=3,
        dict_size=64,
        batch_size=128,
        num_tokens=128 * 30,
        warmup_steps=2,
        normalization_tokens=128,
        checkpoint_every=0,
        log_every=5,
        output_dir=sys.argv[1],
        progress=False,
        device="cpu",
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(config, batches)
        for warning in caught:
            print(f"rank {rank}: {warning.message}", flush=True)
    finally:
        shutdown_distributed()
