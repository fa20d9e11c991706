"""``crosscoder.blocked_selection``: the CPU training forward's BatchTopK in latent blocks selects exactly what
``batch_topk`` selects on the whole score matrix — bound sampled, below, at (ties) and above the threshold, several
blocks — returns the dead latents' columns, forms the whole matrix only when the bound is too high, and refuses
scores that are not finite — with the C scan of the blocks and with its reference. (Two processes:
tests/test_distributed.py trains through it.)"""

from __future__ import annotations

import pytest
import torch

from crosscoder import blocked_selection
from crosscoder.blocked_selection import CANDIDATE_MARGIN, select_in_latent_blocks
from crosscoder.distributed import Distributed
from crosscoder.kernels import block_candidates
from crosscoder.kernels.backend import use_backend
from crosscoder.kernels.batch_topk import batch_topk
from crosscoder.kernels.sparse_encoder import pre_activations
from crosscoder.step_buffers import StepBuffers

BATCH, WIDTH, DICT_SIZE, N_KEEP = 22, 6, 30, 70


@pytest.fixture(autouse=True, params=["auto", "reference"], ids=["C scan", "reference scan"])
def scan_backend(request):
    """Every test with each implementation of the blocks' scan (``crosscoder.kernels.block_candidates``)."""
    if request.param == "auto":
        assert block_candidates._block_candidates_library() is not None  # compiled here (CI installs a C compiler)
    with use_backend(request.param):
        yield request.param


def integer_encoder() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer inputs, weights and biases: the scores are small integers, full of ties."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randint(-2, 3, (BATCH, WIDTH), generator=generator).float()
    weight = torch.randint(-1, 2, (DICT_SIZE, WIDTH), generator=generator).float()
    bias = torch.randint(0, 3, (DICT_SIZE,), generator=generator).float()
    return x, weight, bias


@pytest.mark.parametrize("scaled", [False, True], ids=["unit code norms", "code norms 1 to 3"])
@pytest.mark.parametrize("relative_bound", [None, 0.5, 1.0, 1.5])
def test_the_blocked_selection_is_the_whole_matrix_selection(relative_bound, scaled, monkeypatch) -> None:
    monkeypatch.setattr(blocked_selection, "BLOCK_ENTRIES", 4 * BATCH)  # eight blocks, the last one short
    monkeypatch.setattr(block_candidates, "COMPARE_CHUNK", 7)  # the reference compares a block in 13 parts
    x, weight, bias = integer_encoder()
    code_norms = torch.arange(DICT_SIZE).remainder(3).float() + 1 if scaled else None
    c = 1 if code_norms is None else code_norms
    scores = pre_activations(x, weight, bias).relu_() * c
    exact = batch_topk(scores, N_KEEP)
    buffers = StepBuffers()
    if relative_bound is not None:
        buffers.candidate_bound = relative_bound * exact.threshold.item()
    dead = torch.zeros(DICT_SIZE, dtype=torch.bool)
    dead[[1, 7, 8, 29]] = True
    found = select_in_latent_blocks(x, weight, bias, code_norms, N_KEEP, Distributed(), buffers, dead)
    selection = found.selection
    assert torch.equal(selection.rows, exact.rows) and torch.equal(selection.latents, exact.latents)
    assert selection.threshold.item() == exact.threshold.item() and selection.n_selected.item() == N_KEEP
    assert torch.equal(found.kept_scores, scores[exact.rows, exact.latents])
    latents, columns = found.dead_columns
    assert torch.equal(latents, torch.tensor([1, 7, 8, 29])) and torch.equal(columns, scores[:, latents])
    too_high = relative_bound == 1.5  # fewer candidates than the budget: the whole matrix decides
    assert (found.scores is not None) == too_high and "scores" not in buffers._tensors
    if too_high:
        assert torch.equal(found.scores, scores)
    assert buffers.candidate_bound == CANDIDATE_MARGIN * exact.threshold.item()


def test_a_first_step_samples_its_bound_from_every_few_rows_in_the_batch_s_blocks(monkeypatch) -> None:
    """A first step's bound: the threshold of evenly spaced rows (here 6 of 22, in blocks of the batch's 4 latents,
    not the sample's 14) rounded down to its radix bucket, times ``SAMPLED_MARGIN``; enough candidates then, and the
    exact selection."""
    monkeypatch.setattr(blocked_selection, "BLOCK_ENTRIES", 4 * BATCH)
    monkeypatch.setattr(blocked_selection, "SAMPLE_ROWS", 5)
    x, weight, bias = integer_encoder()
    scores = pre_activations(x, weight, bias).relu_()
    sampled, widths = [], []
    blocks_call = blocked_selection._ScoreBlocks.__call__

    def recorded(self, rows, with_bias, size=None):
        for latents, block in blocks_call(self, rows, with_bias, size):
            if len(rows) < BATCH:
                widths.append(block.shape[1])
            yield latents, block

    monkeypatch.setattr(blocked_selection._ScoreBlocks, "__call__", recorded)
    sample_threshold = blocked_selection._sampled_threshold
    monkeypatch.setattr(
        blocked_selection, "_sampled_threshold", lambda *args: sampled.append(sample_threshold(*args)) or sampled[-1]
    )
    found = select_in_latent_blocks(x, weight, bias, None, N_KEEP, Distributed(), StepBuffers())
    exact = batch_topk(scores, N_KEEP)
    assert torch.equal(found.selection.rows, exact.rows) and torch.equal(found.selection.latents, exact.latents)
    assert found.scores is None  # the sampled bound left enough candidates
    sample = scores[::4].contiguous()
    assert len(sample) == 6 and set(widths) == {4, 2}  # 7 blocks of 4 latents and one of 2
    budget = round(N_KEEP / BATCH * len(sample))
    assert sampled == [batch_topk(sample, budget).threshold.item()]  # integer scores: each a bucket's first value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seed", range(4))
def test_a_bound_at_a_score_of_uneven_code_norms_keeps_every_score_at_or_above_it(seed, dtype, monkeypatch) -> None:
    """Floats and code norms from 0.3 to 3 (and one 0): the bound set to the exact threshold (a score, tied at β) and
    to scores just below it — each latent's pre-activations compared with β / c_j, lowered, then the passing ones
    scaled — finds exactly the scores ≥ β, so the selection is the whole matrix's."""
    monkeypatch.setattr(blocked_selection, "BLOCK_ENTRIES", 8 * BATCH)
    generator = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(BATCH, WIDTH, generator=generator), torch.randn(DICT_SIZE, WIDTH, generator=generator)
    bias = torch.randn(DICT_SIZE, generator=generator)
    code_norms = torch.rand(DICT_SIZE, generator=generator) * 2.7 + 0.3
    code_norms[11] = 0
    x, weight, bias, code_norms = (tensor.to(dtype) for tensor in (x, weight, bias, code_norms))
    # the blocks' floats (the product, then the bias), block by block: a BLAS may round a product of 8 columns
    # otherwise than the same columns of a wider one (MKL on an AMD EPYC does; on a Xeon it did not)
    blocks = [slice(start, start + 8) for start in range(0, DICT_SIZE, 8)]
    pre = torch.cat([pre_activations(x, weight[block], bias[block]) for block in blocks], dim=1)
    scores = pre.relu_() * code_norms
    exact = batch_topk(scores, N_KEEP)
    ranked = scores.flatten().sort(descending=True).values
    for bound in (exact.threshold.item(), ranked[N_KEEP].item(), ranked[N_KEEP + 5].item()):
        buffers = StepBuffers()
        buffers.candidate_bound = bound
        found = select_in_latent_blocks(x, weight, bias, code_norms, N_KEEP, Distributed(), buffers)
        assert found.scores is None  # the candidates sufficed
        assert torch.equal(found.selection.rows, exact.rows) and torch.equal(found.selection.latents, exact.latents)
        assert torch.equal(found.kept_scores, scores[exact.rows, exact.latents])


def test_without_dead_latents_no_columns_are_kept() -> None:
    x, weight, bias = integer_encoder()
    found = select_in_latent_blocks(x, weight, bias, None, N_KEEP, Distributed(), StepBuffers())
    assert found.dead_columns is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_scores_that_are_not_finite_are_refused(bad) -> None:
    x, weight, bias = integer_encoder()
    bias[3] = bad
    for bound in (None, 0.5):
        buffers = StepBuffers()
        buffers.candidate_bound = bound
        with pytest.raises(ValueError, match=r"NaN|inf"):
            select_in_latent_blocks(x, weight, bias, None, N_KEEP, Distributed(), buffers)


def test_negative_infinity_and_a_sum_that_overflows_are_not_refused(monkeypatch) -> None:
    """Before the ReLU, −inf is a score of zero, and scores near the float32 maximum are valid though their sum
    overflows: the blocked selection takes both, as ``batch_topk`` does on the whole matrix."""
    monkeypatch.setattr(blocked_selection, "BLOCK_ENTRIES", 4 * BATCH)
    x, weight, bias = integer_encoder()
    bias[3], bias[5], bias[6] = float("-inf"), 3e38, 3e38
    scores = pre_activations(x, weight, bias).relu_()
    exact = batch_topk(scores, N_KEEP)
    for bound in (None, 0.5 * exact.threshold.item()):
        buffers = StepBuffers()
        buffers.candidate_bound = bound
        found = select_in_latent_blocks(x, weight, bias, None, N_KEEP, Distributed(), buffers)
        assert found.scores is None
        assert torch.equal(found.selection.rows, exact.rows) and torch.equal(found.selection.latents, exact.latents)


@pytest.mark.parametrize(
    "tensor, position, value, finite",
    [
        (None, None, None, True),
        ("x", (3, 2), float("nan"), False),
        ("weight", (4, 1), float("inf"), False),
        ("bias", 7, float("-inf"), False),
        ("code_norms", 2, float("nan"), False),
        ("weight", (4, 1), 1e36, True),  # |score| ≤ 6 + 6 · 2 · 3 · 1e36: far below the maximum
        ("weight", (4, 1), 1e37, False),  # every input finite, but the bound is 3.6e38 (> 3.4e38 / 2)
    ],
)
def test_scores_need_no_check_only_when_finite_inputs_bound_them(tensor, position, value, finite) -> None:
    x, weight, bias = integer_encoder()
    inputs = {"x": x, "weight": weight, "bias": bias, "code_norms": torch.full((DICT_SIZE,), 3.0)}
    if tensor is not None:
        inputs[tensor][position] = value
    blocks = blocked_selection._ScoreBlocks(inputs["weight"], inputs["bias"], inputs["code_norms"])
    assert blocks.provably_finite(inputs["x"]) == finite


@pytest.mark.parametrize(("dtype", "large", "fine"), [(torch.float16, 300, 10), (torch.float32, 1e20, 1e15)], ids=str)
def test_a_score_that_overflows_its_dtype_is_refused_though_its_pre_activation_is_finite(dtype, large, fine) -> None:
    """float16: a pre-activation of 300 times a code norm of 300 is 9·10⁴ (> 65,504); float32: 10²⁰ · 10²⁰ > 3.4·10³⁸.
    The score is inf although every input and pre-activation is finite, and the blocked selection refuses it as the
    whole matrix's does (float32: the C scan reports it)."""
    x = torch.zeros(8, 2, dtype=dtype)
    x[:, 0] = 1
    weight, code_norms, bias = torch.ones(16, 2, dtype=dtype), torch.ones(16, dtype=dtype), torch.zeros(16, dtype=dtype)
    weight[3], code_norms[3] = large, large
    assert not blocked_selection._ScoreBlocks(weight, bias, code_norms).provably_finite(x)
    for bound in (1e-4, None):
        buffers = StepBuffers()
        buffers.candidate_bound = bound
        with pytest.raises(ValueError, match="inf"):
            select_in_latent_blocks(x, weight, bias, code_norms, 4, Distributed(), buffers)
    code_norms[3] = fine  # every score ≤ 2 · 1 · large · fine: provably finite
    assert blocked_selection._ScoreBlocks(weight, bias, code_norms).provably_finite(x)


def test_a_block_holds_block_entries_products_of_at_least_one_latent_and_at_most_all() -> None:
    assert blocked_selection.latents_per_block(4096, 16384) == 512
    assert blocked_selection.latents_per_block(1024, 73728) == 2048
    assert blocked_selection.latents_per_block(22, 30) == 30  # the whole dictionary in one block
    assert blocked_selection.latents_per_block(2**22, 16384) == 1  # more rows than a block's products
