"""The training step that ``crosscoder.train`` runs (``crosscoder.training.training_step``, on the sparse kernels)
equals the textbook dense step: loss, every gradient after the dictionary's constraints and clipping, and the
parameters after the optimizer update."""

import dataclasses
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F

import crosscoder
from crosscoder.dictionary import TrainingOutput
from crosscoder.kernels.backend import use_backend
from crosscoder.kernels.sparse_codes import SparseCodes
from crosscoder.kernels.sparse_decode import latent_scatter_sum
from crosscoder.metrics import ReconstructionStats
from crosscoder.step_buffers import SharedGradient, StepBuffers
from crosscoder.training import Trainee, clipping, training_step
from crosscoder.training import step as step_module

CONFIG = crosscoder.TrainConfig(
    k=3, aux_k=4, aux_coefficient=0.25, l1_coefficient=0.1, grad_clip=1e9, dead_tokens=100, loss="mse"
)


def dense_loss(dictionary, x_normalized, config, dead):
    """The dense step: ReLU codes, torch.topk over the flattened scores, dense decode, dense AuxK (no b_dec); for a
    Matryoshka dictionary the mean of the losses of every prefix's own dense decode (brute force)."""
    encoder_input = x_normalized - dictionary.b_dec if dictionary.subtracts_decoder_bias else x_normalized
    activations = F.relu(encoder_input.flatten(1) @ dictionary.W_enc.flatten(1).T + dictionary.b_enc)
    code_norms = dictionary.code_norms()
    if dictionary.uses_batch_topk:
        scores = (activations * code_norms).detach()
        kept = torch.zeros(scores.numel(), dtype=torch.bool)
        kept[scores.flatten().topk(config.k * len(scores)).indices] = True
        codes = activations * kept.view_as(scores)
    else:
        codes = activations
    flat_decoder = dictionary.W_dec.flatten(1)
    prefix_losses = []
    for size in dictionary.prefix_sizes:  # one prefix, the whole dictionary, unless Matryoshka; the last is whole
        reconstruction = (codes[:, :size] @ flat_decoder[:size]).view_as(x_normalized) + dictionary.b_dec
        error = x_normalized - reconstruction
        prefix_losses.append(error.pow(2).sum(dim=(1, 2)).mean() if config.loss == "mse" else error.norm(dim=-1).mean())
    loss = sum(prefix_losses) / len(prefix_losses)
    if not dictionary.uses_batch_topk:
        return loss + config.l1_coefficient * (codes * code_norms).sum(-1).mean()
    if not dead.any():
        return loss
    dead_scores = torch.where(dead, (activations * code_norms).detach(), -1.0)
    top = dead_scores.topk(config.aux_k, dim=-1)
    picked = (top.values > 0).float()
    aux_codes = torch.zeros_like(activations).scatter(-1, top.indices, activations.gather(-1, top.indices) * picked)
    residual = (x_normalized - reconstruction).detach()
    aux = (residual - (aux_codes @ flat_decoder).view_as(x_normalized)).pow(2).sum(dim=(1, 2)).mean()
    aux = aux / (residual - residual.mean(0)).pow(2).sum(dim=(1, 2)).mean()
    return loss + config.aux_coefficient * aux


def make(kind):
    torch.manual_seed(0)
    if kind == "batchtopk":
        dictionary = crosscoder.BatchTopKCrossCoder(d_model=12, dict_size=40, k=3)
    elif kind == "centered":
        dictionary = crosscoder.BatchTopKCrossCoder(d_model=12, dict_size=40, k=3, centered_encoder=True)
        assert dictionary.subtracts_decoder_bias  # the dense step then encodes x̃ − b_dec
    elif kind == "sae":
        dictionary = crosscoder.BatchTopKSAE(d_model=12, dict_size=40, k=3)
    elif kind == "matryoshka":
        dictionary = crosscoder.MatryoshkaCrossCoder(d_model=12, dict_size=40, k=3, prefix_sizes=[3, 10, 25, 40])
    elif kind == "matryoshka_sae":
        dictionary = crosscoder.MatryoshkaSAE(d_model=12, dict_size=40, k=3, prefix_sizes=[7, 40])
    elif kind == "dedicated":
        dictionary = crosscoder.DedicatedCrossCoder(d_model=12, dict_size=40, k=3, exclusive_sizes=[5, 6])
    elif kind == "dedicated_both":  # no structural zeros in the encoder (the default's step zeroes their gradient)
        dictionary = crosscoder.DedicatedCrossCoder(
            d_model=12, dict_size=40, k=3, exclusive_sizes=[5, 6], exclusive_encoder="both"
        )
    else:
        dictionary = crosscoder.L1CrossCoder(d_model=12, dict_size=40, init_decoder_norm=0.3)
    with torch.no_grad():
        dictionary.b_dec.normal_(std=0.1)
        dictionary.b_enc.normal_(std=0.1)
    x = torch.randn(9, 2, 12)  # paired raw activations; the SAE reads chat − base from them
    return dictionary, x


def run_both(kind, backend, config, dead):
    """(loss, gradients, parameters after the update) of the library's step and of the dense step, from the same
    start, each followed by an SGD update."""
    results = {}
    for name in ("dense", "sparse"):
        dictionary, x = make(kind)
        x_normalized = dictionary.normalize(dictionary.input_from_pair(x))
        optimizer = torch.optim.SGD(dictionary.parameters(), lr=0.5)
        if name == "sparse":
            with use_backend(backend):
                loss = training_step(dictionary, optimizer, x_normalized, step=0, dead=dead, config=config).loss
        else:
            loss = dense_loss(dictionary, x_normalized, config, dead)
            loss.backward()
            dictionary.before_optimizer_step()
            torch.nn.utils.clip_grad_norm_(dictionary.parameters(), config.grad_clip)
            optimizer.step()
            dictionary.after_optimizer_step()
        gradients = {n: p.grad.clone() for n, p in dictionary.named_parameters() if p.grad is not None}
        results[name] = (loss.detach(), gradients, {n: p.detach().clone() for n, p in dictionary.named_parameters()})
    return results


def assert_same(results):
    (loss, gradients, parameters), (dense_loss_, dense_gradients, dense_parameters) = (
        results["sparse"],
        results["dense"],
    )
    torch.testing.assert_close(loss, dense_loss_, rtol=1e-5, atol=1e-6)
    assert gradients.keys() == dense_gradients.keys() == dense_parameters.keys()  # every parameter gets a gradient
    for name in dense_gradients:
        torch.testing.assert_close(gradients[name], dense_gradients[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(parameters[name], dense_parameters[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kind", ["batchtopk", "centered", "sae", "l1", "matryoshka", "matryoshka_sae", "dedicated"])
def test_training_step_equals_dense_step_with_dead_latents(kind, backend):
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    assert_same(run_both(kind, backend, CONFIG, dead))


@pytest.mark.parametrize("kind", ["batchtopk", "centered", "sae", "matryoshka"])
def test_training_step_without_dead_latents_has_no_aux_term(kind):
    assert_same(run_both(kind, "reference", CONFIG, torch.zeros(40, dtype=torch.bool)))


@pytest.mark.parametrize("kind", ["batchtopk", "l1", "matryoshka"])
def test_training_step_clips_and_uses_the_configured_loss(kind):
    config = dataclasses.replace(CONFIG, grad_clip=0.05, loss="l2")
    dead = torch.zeros(40, dtype=torch.bool)
    dead[1::4] = True
    assert_same(run_both(kind, "reference", config, dead))


@pytest.mark.parametrize("with_dead", [False, True], ids=["none_dead", "dead"])
@pytest.mark.parametrize("kind", ["batchtopk", "sae", "l1", "matryoshka", "dedicated"])
def test_a_step_with_buffers_writes_the_decoder_and_encoder_gradients_into_the_previous_ones(kind, with_dead):
    """With ``StepBuffers`` the backward writes ∂W_enc and every decoder's gradient into the storage of the previous
    step's (no fresh pages on CPU), AuxK's share added there: the same steps as without buffers. (The L1 penalty's
    share of ∂W_dec comes as a second tensor, which autograd sums with it.)"""
    assert make(kind)[0].keeps_gradients_between_steps == (kind != "matryoshka")
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = with_dead
    trained = []
    for buffers in (StepBuffers(), None):
        dictionary, x = make(kind)
        optimizer = torch.optim.SGD(dictionary.parameters(), lr=0.5)
        storage = []
        for step in range(3):
            x_normalized = dictionary.normalize(dictionary.input_from_pair(x[step:]))
            training_step(dictionary, optimizer, x_normalized, step=step, dead=dead, config=CONFIG, buffers=buffers)
            assert buffers is None or not buffers._gradients  # nothing held past the backward
            storage.append({n: p.grad.data_ptr() for n, p in dictionary.named_parameters() if n.startswith("W_")})
        if buffers is not None and dictionary.keeps_gradients_between_steps:  # not a Matryoshka dictionary's
            reused = [name for name in storage[0] if kind != "l1" or name == "W_enc"]
            assert len(storage[0]) == 2 + (kind == "dedicated") and reused
            assert all(storage[0][name] == storage[1][name] == storage[2][name] for name in reused)
        trained.append(dict(dictionary.named_parameters()))
    for name, parameter in trained[0].items():
        torch.testing.assert_close(parameter, trained[1][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("with_dead", [False, True], ids=["none_dead", "dead"])
@pytest.mark.parametrize("kind", ["batchtopk", "sae", "dedicated", "dedicated_both", "l1"])
def test_clipping_takes_the_norms_of_the_gradients_the_backward_summed_as_it_wrote_them(kind, with_dead, monkeypatch):
    """With buffers on CPU the sparse backward sums each weight gradient's rows' squares as it writes them, and
    clipping adds those instead of reading the weights' gradients again (not an L1 dictionary's decoder, which also
    gets the penalty's dense gradient, nor a gradient ``before_optimizer_step`` changed since): the same clipped steps
    as without buffers, and without dead latents (no AuxK rows added in another order) the same clipping factors."""
    config = dataclasses.replace(CONFIG, grad_clip=0.05)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = with_dead
    read, factors = [], []
    real_norm, real_factor = clipping.squared_norm, step_module.clip_factor
    monkeypatch.setattr(clipping, "squared_norm", lambda tensor: read.append(tensor.numel()) or real_norm(tensor))
    monkeypatch.setattr(step_module, "clip_factor", lambda *a: factors.append(real_factor(*a)) or factors[-1])
    trained, weights_read = [], []
    for buffers in (StepBuffers(), None):
        dictionary, x = make(kind)
        optimizer = torch.optim.SGD(dictionary.parameters(), lr=0.5)
        read.clear()
        for step in range(3):
            x_normalized = dictionary.normalize(dictionary.input_from_pair(x[step:]))
            training_step(dictionary, optimizer, x_normalized, step=step, dead=dead, config=config, buffers=buffers)
        weights_read.append(sum(size > 40 for size in read))  # the weights' gradients read (biases: 40, 24 values)
        trained.append(dict(dictionary.named_parameters()))
    assert all(factor is not None and 0 < float(factor) < 1 for factor in factors)  # every step was clipped
    n_weights = 3 if kind.startswith("dedicated") else 2
    read_with_buffers = {"l1": n_weights, "dedicated": 1}.get(kind, 0)  # L1: ∂W_enc, ∂W_dec; dedicated: ∂W_enc
    assert weights_read == [3 * read_with_buffers, 3 * n_weights]
    if not with_dead:
        assert [float(factor) for factor in factors[:3]] == [float(factor) for factor in factors[3:]]
    for name, parameter in trained[0].items():
        torch.testing.assert_close(parameter, trained[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_shared_gradient_sums_auxks_rows_into_the_primary_whichever_runs_first():
    """AuxK's backward (secondary) before the forward's (primary): its rows wait and are added into the primary's
    gradient; after it: it returns its own dense gradient (autograd adds the two). A secondary whose primary never
    runs is an error, not a lost gradient."""
    generator = torch.Generator().manual_seed(0)
    primary_codes = SparseCodes.from_mask(torch.rand(9, 11, generator=generator) < 0.4)
    aux_codes = SparseCodes.from_mask(torch.rand(9, 11, generator=generator) < 0.2)
    table = torch.randn(9, 5, generator=generator)
    primary_values, aux_values = torch.randn(primary_codes.nnz), torch.randn(aux_codes.nnz)
    expected = latent_scatter_sum(primary_values, primary_codes, table) + latent_scatter_sum(
        aux_values, aux_codes, table
    )
    kept = torch.full((11, 5), float("nan"))
    early = SharedGradient(lambda: kept)
    assert early.secondary(aux_values, aux_codes, table) is None
    total = early.primary(primary_values, primary_codes, table)
    assert total.data_ptr() == kept.data_ptr()
    torch.testing.assert_close(total, expected)
    early.check_complete()
    late = SharedGradient(lambda: None)
    alone = late.primary(primary_values, primary_codes, table)
    torch.testing.assert_close(alone + late.secondary(aux_values, aux_codes, table), expected)
    orphan = SharedGradient(lambda: None)
    orphan.secondary(aux_values, aux_codes, table)
    with pytest.raises(RuntimeError, match="backpropagate the whole training loss"):
        orphan.check_complete()


def test_trainee_step_is_the_training_step_plus_bookkeeping():
    """``Trainee.step`` (what the loop calls) gives the same update as ``training_step`` with Adam, counts tokens
    since each latent fired and starts θ at the smallest kept score once ``threshold_start_step`` is reached."""
    config = dataclasses.replace(CONFIG, threshold_start_step=0, lr=1e-2, warmup_steps=0)
    dictionary, x = make("batchtopk")
    trainee = Trainee.new("batchtopk", dictionary, config)
    twin, _ = make("batchtopk")
    optimizer = torch.optim.Adam(twin.parameters(), lr=config.lr, betas=(0.9, 0.999))
    loss = trainee.step(x, 0, config, crosscoder.training.trainee.Distributed())
    expected = training_step(
        twin, optimizer, twin.normalize(x), step=0, dead=torch.zeros(40, dtype=torch.bool), config=config
    )
    torch.testing.assert_close(loss, expected.loss)
    for name, parameter in twin.named_parameters():
        torch.testing.assert_close(dict(dictionary.named_parameters())[name], parameter)
    fired = expected.active > 0
    assert (trainee.tokens_since_fired[fired] == 0).all() and (trainee.tokens_since_fired[~fired] == 9).all()
    assert float(dictionary.threshold) == pytest.approx(float(expected.min_kept_score))


@pytest.mark.parametrize("with_dead", [False, True], ids=["none_dead", "dead"])
@pytest.mark.parametrize("kind", ["sae", "matryoshka_sae"])
def test_the_saes_decode_backward_projects_its_gradient_as_the_step_would(kind, with_dead, monkeypatch):
    """The SAE's training decode hands back the decoder's gradient projected off its rows (in the C sweep of its
    sums), and the step then skips ``before_optimizer_step``'s own projection: the same step as projecting there —
    bit for bit without dead latents (the same arithmetic), to rounding with AuxK's rows (projected before they are
    added)."""
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = with_dead
    trained = {}
    for projects in (True, False):
        dictionary, x = make(kind)
        if not projects:
            monkeypatch.setattr(type(dictionary), "training_decode_projects_gradient", False)
        optimizer = torch.optim.SGD(dictionary.parameters(), lr=0.5)
        buffers = StepBuffers()
        for step in range(2):
            x_normalized = dictionary.normalize(dictionary.input_from_pair(x[step:]))
            training_step(dictionary, optimizer, x_normalized, step=step, dead=dead, config=CONFIG, buffers=buffers)
        trained[projects] = {name: p.detach().clone() for name, p in dictionary.named_parameters()}
        monkeypatch.undo()
    for name, parameter in trained[True].items():
        if with_dead:
            torch.testing.assert_close(parameter, trained[False][name], rtol=1e-6, atol=1e-6, msg=name)
        else:
            assert torch.equal(parameter, trained[False][name]), name


@pytest.mark.parametrize("kind", ["batchtopk", "sae"])
def test_a_trainee_forms_each_steps_input_in_one_buffer_which_the_sae_overwrites_with_its_encoder_input(kind):
    """``Trainee.step`` normalises (the SAE: chat − base, normalised, − b_dec) into one buffer kept between steps:
    the same steps, bit for bit, as ``training_step`` on fresh inputs. A caller's input that is not that buffer is
    left as it was."""
    config = dataclasses.replace(CONFIG, lr=1e-2, warmup_steps=0)
    dictionary, x = make(kind)
    trainee = Trainee.new("diff_sae" if kind == "sae" else kind, dictionary, config)
    twin, _ = make(kind)
    optimizer = torch.optim.Adam(twin.parameters(), lr=config.lr, betas=(0.9, 0.999), fused=True)
    dead, storage = torch.zeros(40, dtype=torch.bool), set()
    for step in range(3):
        batch = x.roll(step, dims=0)
        b_dec = dictionary.b_dec.detach().clone()
        loss = trainee.step(batch, step, config, crosscoder.training.trainee.Distributed())
        buffer = trainee.buffers.input((9, dictionary.n_sources, dictionary.d_model), dictionary.W_enc)
        storage.add(buffer.data_ptr())
        x_normalized = twin.normalize(twin.input_from_pair(batch))
        caller_copy = x_normalized.clone()
        expected = training_step(
            twin, optimizer, x_normalized, step=step, dead=dead, config=config, buffers=StepBuffers()
        )
        assert torch.equal(x_normalized, caller_copy)  # not the step's own buffer: not overwritten
        assert torch.equal(loss, expected.loss)
        for name, parameter in twin.named_parameters():
            assert torch.equal(dict(dictionary.named_parameters())[name], parameter), (step, name)
        # what the encoder read is left in the buffer: x̃ − b_dec (this step's b_dec) for the SAE, x̃ otherwise
        assert torch.equal(buffer, caller_copy - b_dec if kind == "sae" else caller_copy)
    assert len(storage) == 1


@pytest.mark.skipif(sys.version_info < (3, 11), reason="an older CPython keeps a call's arguments on its stack")
@pytest.mark.parametrize("kind", ["batchtopk", "sae"])
def test_training_step_fills_the_window_and_frees_the_saes_input_before_its_forward(kind):
    """The window gets the forward's reconstruction statistics (those of ``training_forward`` on the same weights).
    The SAE's normalised input passed as a temporary is freed before the forward starts and so is not held through
    the backward (the SAE encodes a copy, x̃ − b_dec, and its errors come from that copy); a crosscoder encodes x̃
    itself, which its encoder gradient needs. The forward's decodes become the errors in place: no x̂ is formed."""
    dictionary, x = make(kind)
    twin, _ = make(kind)
    dead = torch.zeros(40, dtype=torch.bool)
    with torch.no_grad():
        out = twin.training_forward(twin.normalize(twin.input_from_pair(x)), CONFIG.k)
    expected = ReconstructionStats()
    expected.update(twin.normalize(twin.input_from_pair(x)), out.reconstruction, out.active_counts())
    alive_in_forward, alive_in_backward, references, decodes = [], [], [], []

    def normalized():
        x_normalized = dictionary.normalize(dictionary.input_from_pair(x))
        references.append(weakref.ref(x_normalized))
        return x_normalized

    def note_references(gradient):
        alive_in_backward.append([reference() is not None for reference in references])

    dictionary.W_dec.register_hook(note_references)
    original_forward, original_errors = dictionary.training_forward, TrainingOutput.reconstruction_errors

    def recording_forward(*args, **kwargs):
        alive_in_forward.append([reference() is not None for reference in references])
        result = original_forward(*args, **kwargs)
        decodes.append(result.prefix_decodes.data_ptr())
        return result

    def recording_errors(output):
        errors = original_errors(output)
        decodes.append(errors.data_ptr())
        return errors

    dictionary.training_forward = recording_forward
    window = ReconstructionStats()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TrainingOutput, "reconstruction_errors", recording_errors)
        result = training_step(
            dictionary, torch.optim.Adam(dictionary.parameters()), normalized(), step=0, dead=dead, config=CONFIG,
            window=window,
        )  # fmt: skip
    assert alive_in_forward == [[kind == "batchtopk"]] and alive_in_backward == [[kind == "batchtopk"]]  # x̃
    assert len(decodes) > 1 and len(set(decodes)) == 1
    assert window.summary() == pytest.approx(expected.summary(), rel=1e-5)  # x̃ − x̂ summed in another order
    assert torch.equal(result.active, out.active_counts())


def test_a_fresh_trainee_holds_adams_first_step_state_and_steps_bitwise_like_a_lazy_adam():
    """The moments are allocated with the trainee (step 0, zeros), not inside the first step: the same updates,
    bit for bit, as an Adam that creates them in its first step."""
    config = dataclasses.replace(CONFIG, lr=1e-2, warmup_steps=0)
    dictionary, x = make("batchtopk")
    twin, _ = make("batchtopk")
    eager = Trainee.new("batchtopk", dictionary, config).optimizer
    assert len(eager.state) == len(list(dictionary.parameters()))
    for state in eager.state.values():
        assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    lazy = torch.optim.Adam(twin.parameters(), lr=config.lr, betas=(0.9, 0.999), fused=True)
    dead = torch.zeros(40, dtype=torch.bool)
    for step in range(2):
        for model, optimizer in ((dictionary, eager), (twin, lazy)):
            training_step(model, optimizer, model.normalize(x), step=step, dead=dead, config=config)
    for (name, parameter), twin_parameter in zip(dictionary.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(parameter, twin_parameter), name
        for moment in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(eager.state[parameter][moment], lazy.state[twin_parameter][moment]), (name, moment)
