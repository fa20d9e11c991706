"""The training loop on planted data: recovery, threshold, constraints, logging, bad input."""

import dataclasses
import itertools
import json

import pytest
import torch
from planted_runs import PLANTED, small_config
from safetensors.torch import save_file

import crosscoder
from crosscoder.checkpoint import CheckpointError, checksum_path, list_checkpoints, load_checkpoint
from crosscoder.config import DICTIONARY_NAMES
from crosscoder.distributed import Distributed
from crosscoder.errors import ConfigError, NonFiniteError
from crosscoder.eval.exclusivity import BASE_ONLY, CHAT_ONLY, latent_classes, relative_norm_difference
from crosscoder.eval.recovery import planted_recovery
from crosscoder.synthetic import PlantedActivations
from crosscoder.training import Trainee, validate
from crosscoder.training.batches import default_batches, held_out_batches, planted_dictionary
from crosscoder.training.schedules import current_k, lr_factor

ARCHITECTURE_OF = {name: architecture for architecture, name in DICTIONARY_NAMES.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A BatchTopK crosscoder and a diff-SAE trained side by side on planted data."""
    config = small_config(
        tmp_path_factory.mktemp("planted"),
        architectures=("batchtopk", "diff_sae"),
        num_tokens=256 * 800,
        threshold_start_step=100,
        checkpoint_every=0,
        log_every=100,
    )
    return crosscoder.train(config, PlantedActivations(PLANTED, config.batch_size, seed=1)), config


def test_planted_latents_are_recovered_with_the_right_exclusivity(trained):
    dictionaries, _ = trained
    cc = dictionaries["batchtopk_crosscoder"]
    recovery = planted_recovery(cc, PLANTED)

    assert recovery.fraction >= 0.9
    classes = latent_classes(relative_norm_difference(cc)[recovery.best_latents])
    n_shared, n_base_only = PLANTED.n_shared, PLANTED.n_base_only
    assert classes[n_shared : n_shared + n_base_only] == [BASE_ONLY] * n_base_only
    assert classes[n_shared + n_base_only :] == [CHAT_ONLY] * PLANTED.n_chat_only
    assert BASE_ONLY not in classes[:n_shared] and CHAT_ONLY not in classes[:n_shared]


def test_inference_threshold_selects_like_training_batchtopk_on_the_training_distribution(trained):
    dictionaries, config = trained
    cc = dictionaries["batchtopk_crosscoder"]
    x = PLANTED.sample(4096, torch.Generator().manual_seed(123))
    with torch.no_grad():
        by_threshold = cc.encode(x, use_threshold=True) != 0
        by_topk = cc.encode(x, use_threshold=False) != 0
    l0 = by_threshold.sum(-1).float().mean().item()
    assert abs(l0 - config.k) / config.k < 0.15
    agreement = (by_threshold & by_topk).sum() / (by_threshold | by_topk).sum()
    assert agreement > 0.85


def test_sae_decoder_rows_stay_unit_norm(trained):
    dictionaries, _ = trained
    norms = dictionaries["diff_sae"].decoder_norms()
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)


def test_diff_sae_reconstructs_chat_minus_base(trained):
    dictionaries, _ = trained
    sae = dictionaries["diff_sae"]
    x = PLANTED.sample(2048, torch.Generator().manual_seed(7))
    difference = x[:, 1] - x[:, 0]
    with torch.no_grad():
        residual = (difference - sae(difference)).pow(2).sum()
    assert 1 - residual / (difference - difference.mean(0)).pow(2).sum() > 0.8


def test_final_dictionaries_are_saved_with_training_metadata(trained):
    dictionaries, config = trained
    for name, dictionary in dictionaries.items():
        loaded = crosscoder.load_dictionary(config.run_dir / name)
        assert loaded.metadata["training_steps"] == config.total_steps
        assert loaded.metadata["training_tokens"] == config.total_steps * config.batch_size
        assert loaded.metadata["metrics"]["fve"] > 0.8
        x = PLANTED.sample(64, torch.Generator().manual_seed(3))
        x = x if name != "diff_sae" else x[:, 1] - x[:, 0]
        assert torch.equal(loaded(x), dictionary(x))
    logged = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == config.total_steps
    for key in (
        "batchtopk_crosscoder/fve",
        "batchtopk_crosscoder/fve_source_1",
        "batchtopk_crosscoder/l0",
        "batchtopk_crosscoder/dead_fraction_train",
        "batchtopk_crosscoder/threshold",
        "batchtopk_crosscoder/lr",
        "diff_sae/aux_loss",
        "tokens_per_second",
    ):
        assert key in logged[-1]


def test_l1_crosscoder_trains_and_its_penalty_sparsifies(tmp_path):
    config = small_config(tmp_path, architectures=("l1",), num_tokens=256 * 150, l1_coefficient=1.0, lr=3e-3)
    l1 = crosscoder.train(config, PlantedActivations(PLANTED, config.batch_size))["l1_crosscoder"]
    metrics = l1.metadata["metrics"]
    assert metrics["fve"] > 0.8
    assert metrics["l0"] < 20  # of 64 latents; without the penalty ReLU codes are dense


def test_schedules_warm_up_decay_and_anneal_k(tmp_path):
    config = small_config(
        tmp_path, warmup_steps=10, decay_fraction=0.5, num_tokens=256 * 100, k=3, k_max=13, k_anneal_steps=10
    )
    assert lr_factor(config, 0) == pytest.approx(0.1)
    assert lr_factor(config, 9) == 1.0
    assert lr_factor(config, 50) == 1.0
    assert lr_factor(config, 75) == pytest.approx(0.5)
    assert [current_k(config, s) for s in (0, 5, 10, 50)] == [13, 8, 3, 3]


def test_training_from_an_activation_file(tmp_path):
    activations = PLANTED.sample(4096, torch.Generator().manual_seed(0))
    save_file({"activations": activations}, tmp_path / "acts.safetensors")
    config = small_config(tmp_path, activations=tmp_path / "acts.safetensors", num_tokens=256 * 40)
    cc = crosscoder.train(config)["batchtopk_crosscoder"]
    assert cc.d_model == 16 and cc.n_sources == 2


def test_wandb_logs_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = small_config(tmp_path, num_tokens=256 * 20, wandb_project="crosscoder-tests", wandb_mode="offline")
    crosscoder.train(config, PlantedActivations(PLANTED, config.batch_size))
    runs = list(config.run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


# ---------------------------------------------------------------------------- bad input
class PoisonedBatches(PlantedActivations):
    """Planted batches with NaN in batch number ``poison_at`` (0-based)."""

    def __init__(self, poison_at: int) -> None:
        super().__init__(PLANTED, 256)
        self.poison_at = poison_at

    def __iter__(self):
        for batch in super().__iter__():
            if self.batch_index - 1 == self.poison_at:
                batch[3, 1, 5] = float("nan")
            yield batch


def test_nan_batch_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = small_config(tmp_path, checkpoint_every=20, log_every=10)
    with pytest.raises(NonFiniteError, match=r"batch at step 33 contains NaN or Inf.*step_000000020\.pt is intact"):
        crosscoder.train(config, PoisonedBatches(poison_at=33))
    checkpoints = list_checkpoints(config.run_dir)
    assert [path.name for path in checkpoints] == ["step_000000020.pt"]
    state = load_checkpoint(checkpoints[0])
    assert state["step"] == 20
    weights = state["dictionaries"]["batchtopk_crosscoder"]["state_dict"]
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert not (config.run_dir / "batchtopk_crosscoder").exists()


def test_batch_of_another_shape_is_refused(tmp_path):
    config = small_config(tmp_path)

    def batches():
        source = iter(PlantedActivations(PLANTED, 256))
        for _ in range(10):
            yield next(source)
        yield torch.zeros(256, 2, 8)

    with pytest.raises(ValueError, match=r"batch at step 10 has shape \[256, 2, 8\].*\[batch, 2, 16\]"):
        crosscoder.train(config, batches())


def test_running_out_of_batches_ends_the_run_early_and_saves_it(tmp_path):
    config = small_config(tmp_path, normalization_tokens=256)
    with pytest.warns(UserWarning, match="ran out after 5 of 60 steps: the run ended early"):
        crosscoder.train(config, [PLANTED.sample(256, torch.Generator().manual_seed(i)) for i in range(5)])
    assert crosscoder.load_dictionary(config.run_dir / "batchtopk_crosscoder").metadata["training_steps"] == 5


def test_empty_batch_source_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        crosscoder.train(small_config(tmp_path), [])


def test_an_existing_run_is_not_overwritten_without_resume(tmp_path):
    config = small_config(tmp_path, num_tokens=256 * 20)
    crosscoder.train(config, PlantedActivations(PLANTED, 256))
    before = {path: path.read_bytes() for path in config.run_dir.rglob("*.pt")}
    with pytest.raises(FileExistsError, match="--resume"):
        crosscoder.train(config, PlantedActivations(PLANTED, 256))
    assert {path: path.read_bytes() for path in config.run_dir.rglob("*.pt")} == before


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        crosscoder.train(small_config(tmp_path, resume=True), PlantedActivations(PLANTED, 256))


def test_resume_with_a_different_config_is_refused(tmp_path):
    config = small_config(tmp_path, num_tokens=256 * 20)
    crosscoder.train(config, PlantedActivations(PLANTED, 256))
    changed = dataclasses.replace(config, resume=True, lr=1e-2, k=4)
    with pytest.raises(ValueError, match="k, lr differ"):
        crosscoder.train(changed, PlantedActivations(PLANTED, 256))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_checkpoint_is_named_on_resume(tmp_path, damage):
    config = small_config(tmp_path, num_tokens=256 * 40, checkpoint_every=20)
    crosscoder.train(config, PlantedActivations(PLANTED, 256))
    latest = list_checkpoints(config.run_dir)[-1]
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match=rf"{latest.name} does not match its sha256.*step_000000020\.pt"):
        crosscoder.train(dataclasses.replace(config, resume=True), PlantedActivations(PLANTED, 256))
    checksum_path(latest).unlink()  # as written before checkpoints had checksums: torch still notices the damage
    with pytest.raises(CheckpointError, match=rf"{latest.name} is corrupt or truncated.*step_000000020\.pt"):
        crosscoder.train(dataclasses.replace(config, resume=True), PlantedActivations(PLANTED, 256))


def test_k_out_of_range_is_refused_by_the_config():
    with pytest.raises(ValueError, match=r"--k \(64\) must be smaller than --dict-size \(64\)"):
        crosscoder.TrainConfig(k=64, dict_size=64)
    with pytest.raises(ValueError, match="--k must be > 0, got 0"):
        crosscoder.TrainConfig(k=0)


def test_checkpoint_from_a_newer_format_is_refused(tmp_path):
    config = small_config(tmp_path, num_tokens=256 * 20)
    crosscoder.train(config, PlantedActivations(PLANTED, 256))
    latest = list_checkpoints(config.run_dir)[-1]
    state = torch.load(latest, weights_only=True)
    torch.save({**state, "format_version": 99}, latest)
    checksum_path(latest).unlink()
    with pytest.raises(CheckpointError, match="checkpoint format 99, newer than this crosscoder reads"):
        crosscoder.train(dataclasses.replace(config, resume=True), PlantedActivations(PLANTED, 256))


def test_validation_tokens_make_the_saved_metrics_those_of_held_out_batches_with_the_threshold(tmp_path):
    config = small_config(tmp_path, synthetic=True, architectures=("batchtopk", "diff_sae"), validation_tokens=1000)
    dictionaries = crosscoder.train(config)
    held_out = held_out_batches(config)
    assert sum(len(batch) for batch in held_out) == 1024  # whole batches, at least validation_tokens
    assert not any(
        torch.equal(held_out[0], batch) for batch in itertools.islice(default_batches(config, Distributed()), 4)
    )  # another order: not the training batches, but new samples of the planted dictionary trained on
    assert torch.equal(held_out[0], next(iter(PlantedActivations(planted_dictionary(config), 256, config.seed + 1))))
    for name, dictionary in dictionaries.items():
        saved = crosscoder.load_dictionary(config.run_dir / name).metadata["metrics"]
        trainee = Trainee.new(ARCHITECTURE_OF[name], dictionary, config)
        assert saved == pytest.approx(validate(trainee, held_out, torch.device("cpu")))
        assert "dead_fraction" in saved and "dead_fraction_train" not in saved


def test_validation_tokens_with_batches_given_is_refused(tmp_path):
    config = small_config(tmp_path, validation_tokens=512)
    with pytest.raises(ConfigError, match="validation_tokens=512 re-reads the data source the config names"):
        crosscoder.train(config, PlantedActivations(PLANTED, 256))
