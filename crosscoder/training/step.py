"""The one training step: loss, backward, gradient reduction, clipping and the optimizer update of one dictionary
on one batch (docs/methods.md §2–§3).

``training_step`` is what ``crosscoder.train`` runs (through ``Trainee.step``), what the equivalence tests compare
with a dense textbook step, and what ``bench/step.py`` times: there is no second copy of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crosscoder.config import TrainConfig
from crosscoder.dictionary import SparseDictionary, TrainingInput, TrainingOutput
from crosscoder.distributed import Distributed
from crosscoder.losses import auxk_loss, l1_penalty, reconstruction_losses
from crosscoder.metrics import ReconstructionStats
from crosscoder.sharding import SHARDED
from crosscoder.step_buffers import SharedGradient, StepBuffers
from crosscoder.training.clipping import clip_factor, global_norm, step_clipped
from crosscoder.training.schedules import current_k, l1_coefficient
from crosscoder.training.sharded_optimizer import ShardedAdam


@dataclass
class StepResult:
    """What a step leaves behind: the total loss and its terms (detached, 0-d), the [dict_size] counts of this
    process's tokens on which each latent was selected, and the smallest kept score (``TrainingOutput``'s)."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    active: torch.Tensor
    min_kept_score: torch.Tensor | None


def training_loss(
    dictionary: SparseDictionary,
    x_normalized: torch.Tensor | TrainingInput,
    *,
    step: int,
    dead: torch.Tensor,
    config: TrainConfig,
    context: Distributed,
    buffers: StepBuffers | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], TrainingOutput]:
    """The loss to minimise (with its graph), its named terms and the forward output (its reconstruction errors
    taken: ``TrainingOutput.reconstruction_errors``; with the ``mse`` loss a backward turns them into their gradient).

    x_normalized: [batch, n_sources, d_model] (this process's share under data parallelism; the global batch under
    latent sharding), or its ``TrainingInput``; dead: [dict_size] bool, the latents AuxK may revive. BatchTopK:
    reconstruction + ``aux_coefficient`` · AuxK; L1: reconstruction + λ(step) · Σ f·c. A Matryoshka dictionary fits
    the mean of its prefixes' reconstruction losses instead of the full reconstruction's (still logged as
    ``reconstruction_loss``).
    """
    out = dictionary.training_forward(x_normalized, current_k(config, step), context, buffers, dead)
    del x_normalized
    errors = out.reconstruction_errors()
    per_reconstruction = reconstruction_losses(errors, config.loss)
    reconstruction = fitted = per_reconstruction[-1]
    losses = {"reconstruction_loss": reconstruction}
    if len(errors) > 1:  # Matryoshka: the mean over the prefixes (docs/methods.md §12.1)
        fitted = losses["matryoshka_loss"] = per_reconstruction.mean()
    if dictionary.uses_batch_topk:
        dead_anywhere = dead.any()
        if context.latent_parallel:  # each process counts its own latents
            dead_anywhere = context.all_reduce(dead_anywhere.long()) > 0
        k_aux = config.aux_k if config.aux_k is not None else dictionary.d_model // 2
        dead_reconstruction = None
        if dead.device.type != "cpu" or bool(dead_anywhere):  # skipped where checking costs no device sync
            dead_reconstruction = dictionary.dead_latent_reconstruction(out, dead, k_aux, context)
        reduce = context.all_reduce if context.data_parallel else None
        losses["aux_loss"] = (
            auxk_loss(out.reconstruction_error(), dead_reconstruction, reduce) * dead_anywhere
            if dead_reconstruction is not None
            else reconstruction.new_zeros(())
        )
        loss = fitted + config.aux_coefficient * losses["aux_loss"]
    else:
        value_code_norms = dictionary.code_norms()[out.codes.latents]
        losses["l1_penalty"] = l1_penalty(out.values, value_code_norms, out.codes.batch_size)
        loss = fitted + l1_coefficient(config, step) * losses["l1_penalty"]
    return loss, losses, out


def training_step(
    dictionary: SparseDictionary,
    optimizer: torch.optim.Optimizer | ShardedAdam,
    x_normalized: torch.Tensor,
    *,
    step: int,
    dead: torch.Tensor,
    config: TrainConfig,
    context: Distributed | None = None,
    buffers: StepBuffers | None = None,
    window: ReconstructionStats | None = None,
) -> StepResult:
    """One optimisation step (see ``training_loss`` for the arguments; ``window``: a metric window to update with
    this batch's reconstruction, before the backward): backward; the dictionary's gradient
    constraint (the SAE's decoder-parallel projection); under data parallelism the gradients of loss / N summed over
    the N processes (their average: all-reduced, or reduce-scattered by a ``ShardedAdam`` into each process's slice);
    clipping to ``grad_clip``; the optimizer update, which applies the clipping's factor (``clipping.step_clipped``);
    the dictionary's parameter constraint (the SAE's unit-norm decoder rows).
    The learning-rate schedule is the caller's."""
    context = context or Distributed()
    if window is not None:
        window.add_inputs(x_normalized)
    prepared = dictionary.training_input(
        x_normalized, context, overwrite=buffers is not None and buffers.is_input(x_normalized)
    )
    # x̃ is not held here: an encoder reading x̃ − b_dec (the SAE) reads a copy (or x̃ overwritten, where x̃ is the
    # step's input buffer), and its reconstruction errors come from that, so a caller's temporary x̃ (CPython ≥ 3.11
    # hands the callee the only reference) is freed before the forward (docs/methods.md §4.2)
    del x_normalized
    loss, losses, out = training_loss(
        dictionary, prepared, step=step, dead=dead, config=config, context=context, buffers=buffers
    )
    del prepared
    active, min_kept_score, shared_gradients = out.active_counts(), out.min_kept_score, out.shared_gradients
    if window is not None:
        window.add_errors(out.reconstruction_error(), active)
    del out  # the backward holds what it needs (the loss saved the error)
    # the previous step's gradients are let go only now, after the forward (released before it, the backward took
    # 1.5-1.75x as long on the development machine); with ``buffers`` the backward writes the new ones into their
    # storage instead of fresh pages (docs/methods.md §4.2)
    if buffers is not None and dictionary.keeps_gradients_between_steps:
        buffers.keep_gradients(dictionary.parameters())
    optimizer.zero_grad(set_to_none=True)
    projected = dictionary.training_decode_projects_gradient  # the backward projects the decoder's gradient
    if context.data_parallel:  # the sum of the processes' gradients of loss / N is the average gradient
        (loss / context.world_size).backward()
        dictionary.before_optimizer_step(projected)  # linear in the gradient: the same on the local ones before the sum
        if isinstance(optimizer, ShardedAdam):
            optimizer.reduce_gradients()
            clip = optimizer.clip_factor(config.grad_clip)
        else:  # every process then takes the same step
            gradients = [parameter.grad for parameter in dictionary.parameters() if parameter.grad is not None]
            for handle in [context.all_reduce_async(gradient) for gradient in gradients]:
                handle.wait()
            clip = clip_gradients(dictionary, config.grad_clip, context)
    else:
        loss.backward()
        adjusted = dictionary.before_optimizer_step(projected)
        known = known_row_squares(dictionary, shared_gradients, adjusted)
        clip = clip_gradients(dictionary, config.grad_clip, context, known)
    for shared in (shared_gradients or {}).values():
        shared.check_complete()
    if buffers is not None:
        buffers.drop_gradients()  # any kept that no backward wrote into
    if isinstance(optimizer, ShardedAdam):  # processes sharing the parameters each constrain the latents they wrote
        written = optimizer.written_rows(dictionary.dict_size)
        optimizer.step(clip, lambda: dictionary.after_optimizer_step(written))
    else:
        step_clipped(optimizer, clip)  # the clipping's multiply, or a fused Adam's unscaling
        dictionary.after_optimizer_step()
    return StepResult(loss.detach(), {name: value.detach() for name, value in losses.items()}, active, min_kept_score)


def clip_gradients(
    dictionary: SparseDictionary,
    max_norm: float,
    context: Distributed,
    row_squares: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """The factor that clips the gradient norm to ``max_norm`` (``clipping.clip_factor``; None: nothing to scale),
    for the optimizer step to apply; with latent sharding the norm is over every process's latents (the replicated
    ``b_dec`` counted once), as one process holding them all computes it (``clipping.global_norm``). ``row_squares``:
    by parameter id, its gradient's rows' squared norms where the backward summed them (``known_row_squares``):
    their sum stands for a pass over that gradient (without latent sharding)."""
    grads = {name: p.grad for name, p in dictionary.named_parameters() if p.grad is not None}
    if not grads:
        return None
    if not context.latent_parallel:
        known = row_squares or {}
        parameters = [p for p in dictionary.parameters() if p.grad is not None]
        sums = [known[id(p)].sum() for p in parameters if id(p) in known]
        unknown = [p.grad for p in parameters if id(p) not in known]
        return clip_factor(global_norm([], unknown, known_squares=sums), max_norm)
    sharded = [grad for name, grad in grads.items() if name in SHARDED]
    whole = [grad for name, grad in grads.items() if name not in SHARDED]
    return clip_factor(global_norm(sharded, whole, context), max_norm)


def known_row_squares(
    dictionary: SparseDictionary,
    shared_gradients: dict[int, SharedGradient] | None,
    adjusted: list[torch.nn.Parameter],
) -> dict[int, torch.Tensor]:
    """By parameter id, the rows' squared norms of the gradients a step's sparse backward formed whole and summed as
    it wrote them (``SharedGradient.row_squares``, on CPU): only for a BatchTopK dictionary (an L1 penalty's code
    norms add a dense gradient of their own to the decoder's), only where the parameter's gradient is the one the
    backward formed, and not for the ``adjusted`` ones (``before_optimizer_step`` changed them since). At the paper's
    width (F = 73,728, d = 2 × 2,304) they save the two 21 ms passes over ``W_enc``'s and ``W_dec``'s gradients."""
    known: dict[int, torch.Tensor] = {}
    if not dictionary.uses_batch_topk:
        return known
    changed = {id(parameter) for parameter in adjusted}
    for parameter in dictionary.parameters():
        if id(parameter) in changed:
            continue
        shared = (shared_gradients or {}).get(id(parameter))
        if shared is None or shared.row_squares is None or parameter.grad is None:
            continue
        if parameter.grad.data_ptr() == shared.gradient_address:
            known[id(parameter)] = shared.row_squares
    return known
