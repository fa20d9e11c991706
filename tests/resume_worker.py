"""A training process for the exact-resume test: ``python resume_worker.py OUTPUT_DIR RUN_NAME [--resume]
[--hang-after N]``. With ``--hang-after N`` the batch source blocks forever after yielding N batches, so the
test can kill the process at a known point after a checkpoint was written."""

import argparse
import threading

from crosscoder import TrainConfig, train
from crosscoder.synthetic import PlantedActivations, PlantedDictionary


class HangingBatches(PlantedActivations):
    def __init__(self, hang_after: int | None) -> None:
        super().__init__(PlantedDictionary.random(d_model=16, n_shared=24, n_base_only=4, n_chat_only=4), 128, seed=5)
        self.hang_after = hang_after

    def __iter__(self):
        for batch in super().__iter__():
            if self.hang_after is not None and self.batch_index > self.hang_after:
                threading.Event().wait()
            yield batch


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("run_name")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--hang-after", type=int)
    args = parser.parse_args()
    config = TrainConfig(
        architectures=("batchtopk", "diff_sae"),
        k=3,
        dict_size=96,
        batch_size=128,
        num_tokens=128 * 40,
        lr=3e-3,
        warmup_steps=5,
        decay_fraction=0.3,
        k_max=8,
        k_anneal_steps=10,
        threshold_start_step=5,
        dead_tokens=384,
        normalization_tokens=512,
        checkpoint_every=20,
        log_every=5,
        output_dir=args.output_dir,
        run_name=args.run_name,
        resume=args.resume,
        progress=False,
        device="cpu",
    )
    train(config, HangingBatches(args.hang_after))
