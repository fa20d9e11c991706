"""The crosscoder variants (docs/methods.md §12): Matryoshka and dedicated-feature dictionaries save, load, refuse bad
structure, keep their structural zeros exactly through training and resume, and train on planted data to a recovery
no random dictionary reaches; a dedicated crosscoder's per-partition budgets select, estimate θ, save and train as
docs/methods.md §12.2 says. (Their training step equals the dense brute force: tests/test_training_step.py.)"""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import planted_runs
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from planted_runs import PLANTED
from safetensors.torch import load_file, save_file

import crosscoder
from crosscoder import DedicatedCrossCoder, MatryoshkaCrossCoder, MatryoshkaSAE
from crosscoder.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from crosscoder.distributed import Distributed
from crosscoder.errors import ConfigError, DictionaryFormatError
from crosscoder.eval.exclusivity import class_counts, latent_classes, relative_norm_difference
from crosscoder.eval.recovery import exclusive_recovery, planted_recovery
from crosscoder.kernels.backend import use_backend
from crosscoder.sharding import shards_latents
from crosscoder.synthetic import PlantedActivations
from crosscoder.training.trainee import Trainee, new_dictionary


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


def test_dedicated_structural_zeros_are_not_stored_and_stay_zero_through_training_and_resume(tmp_path):
    """Every checkpoint stores each model's decoder rows only (no dense W_dec: ``W_dec_base`` and ``W_dec_chat`` and
    their Adam moments have the per-model shapes), the encoder's structural blocks and their moments are exactly zero,
    and a resume from the middle checkpoint ends bitwise where the straight run ended — also when that checkpoint is
    rewritten as format 2 wrote it (a dense W_dec with zeros, and its moments)."""
    config = small_config(tmp_path)
    straight = crosscoder.train(config, PlantedActivations(PLANTED, config.batch_size, seed=1))["dedicated_crosscoder"]
    blocks = straight.structural_zeros()
    n_shared = straight.partitions()["shared"].stop
    per_model = {
        "W_dec_base": n_shared + straight.exclusive_sizes[0],
        "W_dec_chat": n_shared + straight.exclusive_sizes[1],
    }
    checkpoints = list_checkpoints(config.run_dir)
    assert [path.name for path in checkpoints] == ["step_000000010.pt", "step_000000020.pt", "step_000000030.pt"]
    for path in checkpoints:
        state = load_checkpoint(path)["dictionaries"]["dedicated_crosscoder"]
        weights, moments = state["state_dict"], state["optimizer"]["state"]
        assert "W_dec" not in weights
        for index, (name, rows) in enumerate(per_model.items(), start=2):
            assert weights[name].shape == (rows, 1, straight.d_model), (path.name, name)
            assert moments[index]["exp_avg"].shape == weights[name].shape, (path.name, name)
        for latents, sources in blocks:
            assert not weights["W_enc"][latents, sources].any(), path.name
            for moment in ("exp_avg", "exp_avg_sq"):
                assert not moments[0][moment][latents, sources].any(), (path.name, moment)
    middle = checkpoints[1]
    current = load_checkpoint(middle)
    resumed = resumed_from_the_middle(config, straight)
    for latents, sources in blocks:
        assert not resumed.W_dec[latents, sources].any() and not resumed.W_enc[latents, sources].any()
    assert (resumed.decoder_norms()[:n_shared] > 0).all()

    save_checkpoint(as_format_2(current, resumed), config.run_dir, 20, keep=3)
    resumed_from_the_middle(config, straight)


def as_format_2(checkpoint: dict, like: DedicatedCrossCoder) -> dict:
    """A format-3 checkpoint of a dedicated crosscoder as format 2 wrote it: the decoder and its Adam moments dense
    [dict_size, n_sources, d_model] with the structural zeros, parameters W_enc, b_enc, W_dec, b_dec."""
    state = checkpoint["dictionaries"]["dedicated_crosscoder"]
    weights, optimizer = dict(state["state_dict"]), state["optimizer"]
    weights["W_dec"] = like.assemble_decoder(weights.pop("W_dec_base"), weights.pop("W_dec_chat"))
    moments = optimizer["state"]
    dense = {name: like.assemble_decoder(moments[2][name], moments[3][name]) for name in ("exp_avg", "exp_avg_sq")}
    old_moments = {0: moments[0], 1: moments[1], 2: {**moments[2], **dense}, 3: moments[4]}
    groups = [{**group, "params": [0, 1, 2, 3]} for group in optimizer["param_groups"]]
    dictionary_state = {
        **state,
        "config": {**state["config"], "format_version": 2},
        "state_dict": weights,
        "optimizer": {"state": old_moments, "param_groups": groups},
    }
    return {**checkpoint, "dictionaries": {"dedicated_crosscoder": dictionary_state}}


def test_a_format_2_dedicated_crosscoder_loads_into_per_model_decoders_and_a_wrong_one_is_refused(tmp_path):
    """A dedicated crosscoder saved by format 2 (a dense W_dec with structural zeros) loads equal to today's; one whose
    structural blocks are not zero is refused naming the block."""
    dictionary = variants()[2]
    dictionary.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    weights = load_file(tmp_path / "saved" / "model.safetensors")
    weights["W_dec"] = dictionary.assemble_decoder(weights.pop("W_dec_base"), weights.pop("W_dec_chat"))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps({**config, "format_version": 2}))
    save_file(weights, tmp_path / "old" / "model.safetensors")
    loaded = crosscoder.load_dictionary(tmp_path / "old")
    for name, tensor in dictionary.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    weights["W_dec"][30, 0, 2] = 0.5  # a chat-only latent's base-model decoder
    save_file(weights, tmp_path / "old" / "model.safetensors")
    with pytest.raises(DictionaryFormatError, match=r"latents 27:32 × sources 0:1 is not"):
        crosscoder.load_dictionary(tmp_path / "old")


@pytest.mark.parametrize("backend", ["reference", "auto"], ids=["reference", "C kernels"])
def test_each_model_decodes_only_its_own_latents_and_matches_the_dense_decode(backend):
    """The training decode reads each model's rows for its own latents only (an exclusive latent's entries never meet
    the other model's half), and equals the dense decode with the assembled W_dec — values bitwise on the reference
    path, gradients to fp32 rounding (the dense backward's BLAS sums in an order of its own, which differs between
    CPUs: 3 × 10⁻⁶ on an AMD EPYC), and values too with the CPU's C kernels (they add the entries in another order than
    the dense GEMM) — as does the inference decode (two dense GEMMs of other shapes, whose BLAS sums in its own
    order)."""
    exact = backend == "reference"
    torch.manual_seed(3)
    dictionary = DedicatedCrossCoder(6, 40, 5, [7, 9], exclusive_encoder="both")
    x = dictionary.normalize(torch.randn(48, 2, 6))
    with use_backend(backend):
        out = dictionary.training_forward(x)
    latents = out.codes.latents
    assert ((latents >= 24) & (latents < 31)).any() and (latents >= 31).any()  # both exclusive partitions decoded
    (base_taken, base_codes), (chat_taken, chat_codes) = dictionary._model_codes(out.codes)
    assert (
        not (latents[base_taken] >= 31).any() and not ((latents[chat_taken] >= 24) & (latents[chat_taken] < 31)).any()
    )
    assert base_codes.dict_size == 31 and chat_codes.dict_size == 33
    assert len(base_taken) + len(chat_taken) == out.codes.nnz + int((latents < 24).sum())
    target = torch.randn_like(out.reconstruction)
    with use_backend(backend):
        (out.reconstruction - target).pow(2).sum().backward()
    sparse_gradients = [p.grad.clone() for p in (dictionary.W_dec_base, dictionary.W_dec_chat)]
    dictionary.zero_grad()
    values = out.values.detach().requires_grad_()
    dense = dictionary.W_dec  # assembled, differentiable
    codes = out.codes.to_dense(values)
    reconstruction = (codes @ dense.flatten(1)).view_as(target) + dictionary.b_dec
    if exact:
        assert torch.equal(reconstruction, out.reconstruction)
    else:
        torch.testing.assert_close(reconstruction, out.reconstruction, rtol=1e-5, atol=1e-5)
    (reconstruction - target).pow(2).sum().backward()
    for parameter, gradient in zip((dictionary.W_dec_base, dictionary.W_dec_chat), sparse_gradients, strict=True):
        torch.testing.assert_close(parameter.grad, gradient, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        dictionary.decode_normalized(codes.detach()), reconstruction.detach(), rtol=1e-6, atol=1e-6
    )


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


# ------------------------------------------------------------------------------ dedicated: a budget per partition
def tied_dedicated() -> tuple[DedicatedCrossCoder, torch.Tensor]:
    """A dedicated crosscoder (k=4: 1 shared, 1 base-only, 2 chat-only per token) with integer weights and integer
    inputs, so that its scores f · c are small integers full of ties; x: [24, 2, 4] (normalised = raw)."""
    torch.manual_seed(14)
    dictionary = DedicatedCrossCoder(4, 20, 4, [3, 5], exclusive_k=[1, 2])
    with torch.no_grad():
        dictionary.W_enc.copy_(torch.randint(-1, 2, dictionary.W_enc.shape))
        dictionary.b_enc.fill_(2)
        for decoder in (dictionary.W_dec_base, dictionary.W_dec_chat):
            decoder.zero_()[:, :, 0] = 1  # unit decoder rows: c = 2 (shared) or 1 (exclusive) exactly
        for latents, sources in dictionary.structural_zeros():
            dictionary.W_enc[latents, sources] = 0
    return dictionary, torch.randint(-2, 3, (24, 2, 4)).float()


def brute_force_partition_topk(
    scores: torch.Tensor, partitions: list[slice], budgets: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per partition, the ``k_p · B`` largest positive scores of its [B, n_p] block, ties to the lowest flat index of
    the block (a stable descending sort): the [B, F] kept mask and each partition's smallest kept score ([3])."""
    kept = torch.zeros_like(scores, dtype=torch.bool)
    smallest = []
    for part, budget in zip(partitions, budgets, strict=True):
        block = scores[:, part].flatten()
        chosen = torch.sort(block, descending=True, stable=True).indices[: budget * len(scores)]
        chosen = chosen[block[chosen] > 0]
        mask = torch.zeros_like(block, dtype=torch.bool)
        mask[chosen] = True
        kept[:, part] = mask.view(len(scores), -1)
        smallest.append(block[chosen].min() if chosen.numel() else scores.new_zeros(()))
    return kept, torch.stack(smallest)


@pytest.mark.parametrize("k", [4, 6], ids=["k", "annealed_k"])
def test_per_partition_budgets_select_each_partitions_own_batch_top_k_with_ties(k):
    """The training selection equals a brute-force BatchTopK in each partition's columns (ties included); under
    k-annealing the exclusive budgets scale with k (k=6: round(1.5)=2, round(3)=3, the shared partition the rest)."""
    dictionary, x = tied_dedicated()
    budgets = dictionary.partition_budgets(k)
    assert budgets == {4: (1, 1, 2), 6: (1, 2, 3)}[k]
    out = dictionary.training_forward(x, k)
    assert out.codes.nnz == k * len(x)
    partitions = list(dictionary.partitions().values())
    kept, smallest = brute_force_partition_topk(out.scores, partitions, budgets)
    for part, cut in zip(partitions, smallest, strict=True):  # integer scores: every cut falls inside a tie
        at_cut = out.scores[:, part] == cut
        assert 0 < (at_cut & kept[:, part]).sum() < at_cut.sum()
    assert torch.equal(out.codes.to_dense(torch.ones(out.codes.nnz)) > 0, kept)
    assert torch.equal(out.min_kept_score, smallest)
    torch.testing.assert_close(out.values, (out.scores / dictionary.code_norms())[kept])
    encoded = dictionary.select_batch_topk(dictionary.activations_normalized(x), k)  # encode(use_threshold=False)
    assert torch.equal(encoded > 0, kept)


def _partition_selection_worker(rank: int, folder: str, port: int) -> None:
    """Rank ``rank`` of 2 (gloo): the training selection of its half of the rows of ``tied_dedicated``'s batch."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        dictionary, x = tied_dedicated()
        share = x.chunk(2)[rank]
        out = dictionary.training_forward(share, 6, Distributed(rank=rank, world_size=2))
        kept = out.codes.to_dense(torch.ones(out.codes.nnz)) > 0
        torch.save({"kept": kept, "min_kept_score": out.min_kept_score}, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_select_per_partition_what_one_process_selects(tmp_path):
    """Data parallel, each partition's BatchTopK is global over the processes: two processes holding half the rows
    each keep exactly the entries (ties included) and report the per-partition thresholds of one process."""
    with socket.socket() as probe:  # a free port: bind to 0 and read it back
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_partition_selection_worker, args=(str(tmp_path), port), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    dictionary, x = tied_dedicated()
    out = dictionary.training_forward(x, 6)
    assert torch.equal(torch.cat([rank["kept"] for rank in ranks]), out.codes.to_dense(torch.ones(out.codes.nnz)) > 0)
    for rank in ranks:
        assert torch.equal(rank["min_kept_score"], out.min_kept_score)


def test_per_partition_thresholds_are_estimated_from_each_partitions_smallest_kept_score_and_used_at_inference():
    dictionary, x = tied_dedicated()
    config = crosscoder.TrainConfig(architectures=("dedicated",), k=4, threshold_start_step=0, threshold_beta=0.5)
    trainee = Trainee.new("dedicated", dictionary, config)
    first = dictionary.training_forward(x).min_kept_score
    trainee.step(x, 0, config, Distributed())
    assert dictionary.threshold.shape == (3,) and torch.equal(dictionary.threshold, first)
    second = dictionary.training_forward(x).min_kept_score
    trainee.step(x, 1, config, Distributed())
    torch.testing.assert_close(dictionary.threshold, 0.5 * first + 0.5 * second)
    assert set(trainee.read_window(2, config, Distributed())) >= {
        "threshold_shared", "threshold_base_only", "threshold_chat_only"
    }  # fmt: skip
    with torch.no_grad():
        dictionary.threshold.copy_(torch.tensor([3.0, 0.5, 1.5]))
    activations = dictionary.activations_normalized(x)
    theta = torch.tensor([3.0] * 12 + [0.5] * 3 + [1.5] * 5)
    expected = activations * (activations * dictionary.code_norms() > theta)
    assert torch.equal(dictionary.select_with_threshold(activations), expected)
    assert torch.equal(dictionary.encode(x), expected)


def test_per_partition_budgets_and_thresholds_save_and_load(tmp_path):
    dictionary, x = tied_dedicated()
    with torch.no_grad():
        dictionary.threshold.copy_(torch.tensor([3.0, 0.5, 1.5]))
    dictionary.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["exclusive_k"] == [1, 2]
    assert load_file(tmp_path / "saved" / "model.safetensors")["threshold"].tolist() == [3.0, 0.5, 1.5]
    loaded = crosscoder.load_dictionary(tmp_path / "saved")
    assert loaded.exclusive_k == (1, 2) and torch.equal(loaded.threshold, dictionary.threshold)
    assert torch.equal(loaded.encode(x), dictionary.encode(x))
    assert "1 shared, 1 base-only and 2 chat-only latents per token" in (tmp_path / "saved" / "README.md").read_text()


def test_one_budget_keeps_the_files_of_before(tmp_path):
    """Without exclusive_k nothing about the saved dictionary changes: no config key, a 0-d θ."""
    dictionary = DedicatedCrossCoder(8, 32, 3, [3, 5])
    with torch.no_grad():
        dictionary.threshold.fill_(0.25)
    dictionary.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "exclusive_k" not in config and load_file(tmp_path / "saved" / "model.safetensors")["threshold"].shape == ()
    loaded = crosscoder.load_dictionary(tmp_path / "saved")
    assert loaded.exclusive_k is None and loaded.threshold.item() == 0.25


def test_an_empty_exclusive_partition_takes_a_budget_of_zero():
    dictionary = DedicatedCrossCoder(8, 32, 4, [0, 5], exclusive_k=[0, 1])
    out = dictionary.training_forward(torch.randn(16, 2, 8))
    assert dictionary.partition_budgets(4) == (3, 0, 1) and out.codes.nnz == 4 * 16
    assert out.min_kept_score[1] == 0 and (out.codes.latents >= 27).sum() == 16


def test_a_training_run_with_per_partition_budgets_keeps_them_and_the_structural_zeros(tmp_path):
    """Trained with budgets (1 base-only, 1 chat-only of k=3): every partition keeps exactly k_p · B entries of a
    batch, each θ is estimated, the structural zeros stay zero, and the run resumes bitwise (the middle checkpoint)."""
    config = small_config(tmp_path, exclusive_k=(1, 1))
    dictionary = crosscoder.train(config, PlantedActivations(PLANTED, config.batch_size, seed=1))[
        "dedicated_crosscoder"
    ]
    assert dictionary.exclusive_k == (1, 1) and (dictionary.threshold > 0).all()
    batch = PLANTED.sample(512, torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = dictionary.training_forward(dictionary.normalize(batch))
    counts = [
        int(((out.codes.latents >= p.start) & (out.codes.latents < p.stop)).sum())
        for p in dictionary.partitions().values()
    ]
    assert counts == [1 * 512, 1 * 512, 1 * 512]
    for latents, sources in dictionary.structural_zeros():
        assert not dictionary.W_dec[latents, sources].any() and not dictionary.W_enc[latents, sources].any()
    resumed_from_the_middle(config, dictionary)


def resumed_from_the_middle(config: crosscoder.TrainConfig, straight) -> crosscoder.DedicatedCrossCoder:
    """Resume the 30-step run of ``config`` from its step-20 checkpoint: bitwise the dictionary trained straight."""
    final = {name: tensor.clone() for name, tensor in straight.state_dict().items()}
    (config.run_dir / "checkpoints" / "step_000000030.pt").unlink()
    resumed = crosscoder.train(
        dataclasses.replace(config, resume=True), PlantedActivations(PLANTED, config.batch_size, seed=1)
    )["dedicated_crosscoder"]
    for name, tensor in final.items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    return resumed


def dedicated_config(**fields) -> crosscoder.TrainConfig:
    return crosscoder.TrainConfig(architectures=("dedicated",), **fields)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: crosscoder.TrainConfig(exclusive_k=(1, 1)), "--exclusive-k applies to the dedicated crosscoder, but"),
        (lambda: dedicated_config(k=4, exclusive_k=(2, 2)), r"summing to less than --k \(4\).* got \[2, 2\]"),
        (lambda: dedicated_config(exclusive_k=(-1, 2)), r"two per-token budgets ≥ 0 .* got \[-1, 2\]"),
        (lambda: DedicatedCrossCoder(8, 32, 8, [3, 5], exclusive_k=[4, 1]), r"\[4, 1\] is invalid: .* at most its"),
        (lambda: DedicatedCrossCoder(8, 32, 8, [3, 5], exclusive_k=[0, 1]), r"of \[3, 5\] latents, each at least 1"),
        (lambda: DedicatedCrossCoder(8, 32, 3, [3, 5], exclusive_k=[1, 2]), "summing to less than k=3"),
        (lambda: DedicatedCrossCoder(8, 32, 3, [3, 5], exclusive_k=[1]), r"exclusive_k=\[1\] is invalid"),
        (
            lambda: new_dictionary("dedicated", dedicated_config(dict_size=32, k=8, exclusive_k=(4, 1)), 4, 2),
            r"exclusive_k=\[4, 1\] is invalid: .* of \[3, 3\] latents",
        ),
    ],
)
def test_bad_partition_budgets_are_refused_naming_the_value_and_the_fix(build, message):
    with pytest.raises(ConfigError, match=message):
        build()
