"""The crosscoder variants (docs/methods.md §12): Matryoshka and dedicated-feature dictionaries save, load, refuse bad
structure, keep their structural zeros exactly through training and resume, and train on planted data to a recovery
no random dictionary reaches. (Their training step equals the dense brute force: tests/test_training_step.py.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import planted_runs
import pytest
import torch
from planted_runs import PLANTED

import crosscoder
from crosscoder import DedicatedCrossCoder, MatryoshkaCrossCoder, MatryoshkaSAE
from crosscoder.checkpoint import list_checkpoints, load_checkpoint
from crosscoder.errors import ConfigError
from crosscoder.eval.exclusivity import class_counts, latent_classes, relative_norm_difference
from crosscoder.eval.recovery import exclusive_recovery, planted_recovery
from crosscoder.sharding import shards_latents
from crosscoder.synthetic import PlantedActivations
from crosscoder.training.trainee import new_dictionary


def small_config(tmp_path: Path, **overrides) -> crosscoder.TrainConfig:
    """A dedicated-feature crosscoder on 30 steps, checkpoints every 10."""
    values = dict(
        architectures=("dedicated",), num_tokens=256 * 30, warmup_steps=5, threshold_start_step=5,
        threshold_beta=0.8, dead_tokens=2048, checkpoint_every=10, keep_checkpoints=3,
    )  # fmt: skip
    return planted_runs.small_config(tmp_path, **{**values, **overrides})


def variants() -> list[crosscoder.SparseDictionary]:
    torch.manual_seed(0)
    return [
        MatryoshkaCrossCoder(8, 32, 3, [4, 8, 32], source_names=["base", "chat"]),
        MatryoshkaSAE(8, 32, 3, [16, 32], input="base_minus_chat"),
        DedicatedCrossCoder(8, 32, 3, [3, 5], exclusive_encoder="both"),
    ]


@pytest.mark.parametrize("index", range(3), ids=["matryoshka", "matryoshka_sae", "dedicated"])
def test_variants_save_and_load_with_their_structure(index, tmp_path):
    dictionary = variants()[index]
    with torch.no_grad():
        dictionary.threshold.fill_(0.25)
    dictionary.save_pretrained(tmp_path / "saved")
    loaded = crosscoder.load_dictionary(tmp_path / "saved")
    assert type(loaded) is type(dictionary) and loaded.config() == dictionary.config()
    assert loaded.prefix_sizes == dictionary.prefix_sizes
    for name, tensor in dictionary.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randn(5, 2, 8)
    x = dictionary.input_from_pair(x)
    assert torch.equal(loaded(x), dictionary(x))


def test_a_dedicated_crosscoder_starts_with_its_structural_zeros():
    own = DedicatedCrossCoder(8, 32, 3, [3, 5])
    both = DedicatedCrossCoder(8, 32, 3, [3, 5], exclusive_encoder="both")
    assert own.partitions() == {"shared": slice(0, 24), "base-only": slice(24, 27), "chat-only": slice(27, 32)}
    for dictionary in (own, both):
        norms = dictionary.decoder_norms()
        assert (norms[24:27, 1] == 0).all() and (norms[27:, 0] == 0).all() and (norms[:24] > 0).all()
    assert (own.W_enc[24:27, 1] == 0).all() and (own.W_enc[27:, 0] == 0).all()
    assert (both.W_enc.norm(dim=-1) > 0).all()
    classes = latent_classes(relative_norm_difference(own))
    assert class_counts(own, classes)["by_partition"] == {
        "shared": {"shared": 24},
        "base-only": {"base-only": 3},
        "chat-only": {"chat-only": 5},
    }


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: MatryoshkaCrossCoder(8, 32, 3, [8, 4, 32]), r"prefix_sizes=\[8, 4, 32\] is invalid: give increasing"),
        (lambda: MatryoshkaCrossCoder(8, 32, 3, [8, 16]), "ending at dict_size=32"),
        (lambda: MatryoshkaSAE(8, 32, 3, [0, 32]), "latent counts > 0"),
        (lambda: DedicatedCrossCoder(8, 32, 3, [16, 16]), "leave some of dict_size=32 latents shared"),
        (lambda: DedicatedCrossCoder(8, 32, 3, [4]), r"two latent counts ≥ 0 \[base-only, chat-only\]"),
        (lambda: DedicatedCrossCoder(8, 32, 3, [4, 4], n_sources=3), "an even n_sources, got 3"),
        (lambda: DedicatedCrossCoder(8, 32, 3, [4, 4], exclusive_encoder="mine"), "'own'.*or 'both'"),
    ],
)
def test_bad_structure_is_refused_naming_the_value_and_the_fix(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_the_config_checks_the_variants_options_and_refuses_latent_sharding():
    with pytest.raises(ConfigError, match=r"--matryoshka-prefixes must be increasing .* got \[0.5, 0.25, 1.0\]"):
        crosscoder.TrainConfig(matryoshka_prefixes=(0.5, 0.25, 1.0))
    with pytest.raises(ConfigError, match=r"--matryoshka-prefixes .* ending at 1, got \[0.25, 0.5\]"):
        crosscoder.TrainConfig(matryoshka_prefixes=(0.25, 0.5))
    with pytest.raises(ConfigError, match=r"--exclusive-fractions .* summing to less than 1"):
        crosscoder.TrainConfig(exclusive_fractions=(0.5, 0.5))
    tiny = crosscoder.TrainConfig(architectures=("matryoshka",), dict_size=16, k=2, matryoshka_prefixes=(0.02, 1.0))
    with pytest.raises(ConfigError, match=r"round to the latent counts \[0, 16\] of dict_size=16"):
        new_dictionary("matryoshka", tiny, d_model=4, n_sources=2)
    for architecture in ("matryoshka", "matryoshka_diff_sae", "dedicated"):
        with pytest.raises(ConfigError, match=f"not {architecture} .*: use --parallelism data"):
            crosscoder.TrainConfig(parallelism="latents", architectures=(architecture,))
        config = crosscoder.TrainConfig(architectures=("batchtopk", architecture), batch_size=4096, k=64)
        assert not shards_latents(config, 2, 16384)  # auto trains them data-parallel


def test_dedicated_structural_zeros_stay_exactly_zero_through_training_and_resume(tmp_path):
    """The exclusive latents' other-model decoder (and encoder) rows are exactly zero in every checkpoint, with zero
    Adam moments, and after a resume from the middle checkpoint that ends bitwise where the straight run ended."""
    config = small_config(tmp_path)
    straight = crosscoder.train(config, PlantedActivations(PLANTED, config.batch_size, seed=1))["dedicated_crosscoder"]
    blocks = straight.structural_zeros()
    checkpoints = list_checkpoints(config.run_dir)
    assert [path.name for path in checkpoints] == ["step_000000010.pt", "step_000000020.pt", "step_000000030.pt"]
    for path in checkpoints:
        state = load_checkpoint(path)["dictionaries"]["dedicated_crosscoder"]
        moments = state["optimizer"]["state"]
        for index, name in ((0, "W_enc"), (2, "W_dec")):
            for latents, sources in blocks:
                assert not state["state_dict"][name][latents, sources].any(), (path.name, name)
                for moment in ("exp_avg", "exp_avg_sq"):
                    assert not moments[index][moment][latents, sources].any(), (path.name, name, moment)
    final = {name: tensor.clone() for name, tensor in straight.state_dict().items()}
    (config.run_dir / "checkpoints" / "step_000000030.pt").unlink()
    resumed = crosscoder.train(
        dataclasses.replace(config, resume=True), PlantedActivations(PLANTED, config.batch_size, seed=1)
    )["dedicated_crosscoder"]
    for name, tensor in final.items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    for latents, sources in blocks:
        assert not resumed.W_dec[latents, sources].any() and not resumed.W_enc[latents, sources].any()
    assert (resumed.decoder_norms()[: resumed.partitions()["shared"].stop] > 0).all()


def test_each_variant_trains_and_recovers_planted_latents_beyond_a_random_dictionary(tmp_path):
    """Numbers are computed, not targets: each trained variant's decoder matches the planted directions better (mean
    best cosine) than a freshly initialised dictionary of its structure; the exclusive-latent counts are consistent
    (recall and precision themselves are measured by bench/variants.py)."""
    architectures = ("matryoshka", "dedicated", "matryoshka_diff_sae")
    config = small_config(tmp_path, architectures=architectures, num_tokens=256 * 200, checkpoint_every=0)
    trained = crosscoder.train(config, PlantedActivations(PLANTED, config.batch_size, seed=1))
    x = PLANTED.sample(2048, torch.Generator().manual_seed(7))
    for name, dictionary in trained.items():
        untrained = untrained_like(dictionary)
        best, floor = (planted_recovery(d, PLANTED).best_cosines.mean() for d in (dictionary, untrained))
        assert best > floor, (name, float(best), float(floor))
        if dictionary.n_sources == 2:
            found = exclusive_recovery(dictionary, PLANTED, (dictionary.encode(x) > 0).any(dim=0))
            assert found.planted == 8 and 0 <= found.true_claims <= found.claims, name


def untrained_like(dictionary: crosscoder.SparseDictionary) -> crosscoder.SparseDictionary:
    """A freshly initialised dictionary of the same class and structure."""
    skip = ("format", "format_version", "dict_class")
    return type(dictionary)(**{key: value for key, value in dictionary.config().items() if key not in skip})
