"""Gradient clipping (crosscoder.training.clipping): the factor is ``clip_grad_norm_``'s (None where it is exactly
1 on CPU), and the step that applies it — a fused torch Adam dividing by ``1 / factor`` as it reads the gradients,
any other optimizer multiplying first — updates as ``clip_grad_norm_`` then ``step()`` does: bit for bit with the
multiply, to rounding with the division, never as the unclipped step. The norm is the float64 norm to float32
rounding, over millions of values too."""

from __future__ import annotations

import pytest
import torch

from crosscoder.kernels import use_backend
from crosscoder.training.clipping import clip_factor, global_norm, squared_norm, step_clipped


def parameters_with_gradients(nan: bool = False) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(50, 7, generator=generator)) for _ in range(2)]
    params.append(torch.nn.Parameter(torch.randn(13, generator=generator)))
    for parameter in params:
        parameter.grad = torch.randn(parameter.shape, generator=generator)
    if nan:
        params[2].grad[4] = float("nan")
    return params


OPTIMIZERS = {
    "fused_adam": lambda params: torch.optim.Adam(params, lr=0.1, fused=True),
    "adam": lambda params: torch.optim.Adam(params, lr=0.1),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
}


def two_steps(name: str, max_norm: float, clip: str, nan: bool = False) -> tuple[list, list]:
    """Parameters, and gradients with Adam's first moments (what the update read), after two steps of ``name``, the
    gradients scaled as ``clip`` says: torch's ``clip_grad_norm_``, ours, or none."""
    params = parameters_with_gradients(nan)
    optimizer = OPTIMIZERS[name](params)
    for _ in range(2):
        grads = [parameter.grad for parameter in params]
        if clip == "torch":
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
        elif clip == "ours":
            step_clipped(optimizer, clip_factor(torch.nn.utils.get_total_norm(grads), max_norm))
        else:
            optimizer.step()
        assert not hasattr(optimizer, "grad_scale")  # nothing left for the next step to apply again
    moments = [optimizer.state[parameter]["exp_avg"] for parameter in params if "exp_avg" in optimizer.state[parameter]]
    return [parameter.detach().clone() for parameter in params], [grad.clone() for grad in grads] + moments


@pytest.mark.parametrize("nan", [False, True], ids=["finite", "a NaN gradient"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clipped", "within the norm"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_clipped_step_updates_as_clip_grad_norm_then_step(name, max_norm, nan) -> None:
    got, got_grads = two_steps(name, max_norm, "ours", nan)
    expected, expected_grads = two_steps(name, max_norm, "torch", nan)
    # the division by 1 / factor is the multiply to rounding; within the norm nothing scales: bit for bit
    exact = name != "fused_adam" or max_norm > 1
    tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 3e-7, "atol": 1e-7}
    for values, reference in ((got, expected), (got_grads, expected_grads)):
        for a, b in zip(values, reference, strict=True):
            torch.testing.assert_close(a, b, equal_nan=True, **tolerance)
    if max_norm < 1 and not nan:  # the factor was applied: the gradients (and moments) the update read were scaled
        _, unclipped = two_steps(name, max_norm, "none")
        assert not any(torch.allclose(a, b, rtol=1e-3) for a, b in zip(got_grads, unclipped, strict=True))


def test_the_factor_is_clip_grad_norms_and_none_where_it_is_one() -> None:
    assert clip_factor(torch.tensor(0.5), 1.0) is None
    norm = torch.tensor(3.0)
    assert clip_factor(norm, 1.0) == (1.0 / (norm + 1e-6))
    assert clip_factor(torch.tensor(float("inf")), 1.0) == 0
    assert clip_factor(torch.tensor(float("nan")), 1.0).isnan()


@pytest.mark.parametrize("backend", ["auto", "reference"], ids=["C kernel", "reference"])
@pytest.mark.parametrize("shape", [(5000,), (4099, 2048), (3, 2_800_001)], ids=["1-d", "rows", "long rows"])
def test_the_norm_is_the_exact_norm_to_float32_rounding(shape, backend) -> None:
    """Over millions of values with a large mean (where one float32 sum drifts), in rows of any width."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(shape, generator=generator) + 3.0
    exact = values.double().norm()
    with use_backend(backend):
        assert squared_norm(values).dtype == torch.float64
        assert abs(float(squared_norm(values).sqrt()) / float(exact) - 1) < 2e-6
        assert abs(float(global_norm([], [values])) / float(exact) - 1) < 2e-6
        assert float(squared_norm(torch.tensor(2.0))) == 4.0 and float(squared_norm(torch.empty(0, 3))) == 0.0


def test_the_norm_of_a_gradient_split_along_its_rows_is_the_whole_ones() -> None:
    """Latent sharding and a sharded Adam hold rows of a gradient: summed over the parts (here in one process), the
    norm is the whole gradient's, to float32 rounding of a float64 sum — the same float here."""
    generator = torch.Generator().manual_seed(1)
    gradient, bias = torch.randn(6000, 2, 300, generator=generator), torch.randn(6000, generator=generator)
    whole = global_norm([], [gradient, bias])
    assert whole.dtype == torch.float32
    assert torch.equal(global_norm([*gradient.chunk(2), *bias.chunk(2)], []), whole)
    assert torch.equal(global_norm([gradient[:2500], bias[:2500]], [gradient[2500:], bias[2500:]]), whole)
    assert torch.equal(
        global_norm([], [gradient[:100]], known_squares=[squared_norm(gradient[100:]), squared_norm(bias)]), whole
    )
