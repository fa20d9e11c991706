"""Reconstruction metrics in raw space."""

import pytest
import torch

import crosscoder
from crosscoder.eval.reconstruction import reconstruction


def test_reconstruction_metrics_equal_direct_computations():
    torch.manual_seed(0)
    cc = crosscoder.BatchTopKCrossCoder(d_model=8, dict_size=32, k=3)
    with torch.no_grad():
        cc.threshold.fill_(0.8)
        cc.input_scale.copy_(torch.tensor([2.0, 0.5]))
    batches = [torch.randn(50, 2, 8) for _ in range(3)]
    result = reconstruction(cc, batches)

    x = torch.cat(batches)
    with torch.no_grad():
        codes = cc.encode(x)
        x_hat = cc.decode(codes)
    residual = (x - x_hat).pow(2).sum(dim=(0, 2))
    variance = (x - x.mean(0)).pow(2).sum(dim=(0, 2))
    assert result.fve == pytest.approx((1 - residual.sum() / variance.sum()).item(), rel=1e-5)
    assert result.fve_per_source == pytest.approx((1 - residual / variance).tolist(), rel=1e-5)
    frequencies = (codes != 0).float().mean(0)
    torch.testing.assert_close(result.frequencies, frequencies)
    assert result.l0 == pytest.approx(frequencies.sum().item())
    assert result.dead_fraction == pytest.approx((frequencies == 0).float().mean().item())
    assert result.tokens == 150


def test_sae_input_is_its_own_shape():
    sae = crosscoder.BatchTopKSAE(d_model=8, dict_size=16, k=2)
    result = reconstruction(sae, [torch.randn(20, 8)])
    assert len(result.fve_per_source) == 1


def test_no_data_is_an_error():
    with pytest.raises(ValueError, match="no activations"):
        reconstruction(crosscoder.BatchTopKSAE(8, 16, 2), [])
