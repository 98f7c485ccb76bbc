"""Golden numbers computed by hand for tiny inputs."""

import math

import pytest
import torch

from cmkg import losses


def test_regression_loss_is_the_per_sample_squared_norm_averaged():
    pred = torch.zeros(2, 21, 3)
    target = torch.zeros(2, 21, 3)
    target[0, 3] = torch.tensor([1.0, 2.0, 2.0])  # sample 0: squared norm 9
    target[1, 0, 0] = 3.0  # sample 1: squared norm 9 ... plus
    target[1, 20, 2] = -1.0  # 1 -> 10
    assert float(losses.regression_loss(pred, target)) == pytest.approx((9 + 10) / 2)


def test_attention_map_by_hand():
    # one sample, two channels on a 1x2 map: A = [1^2 + 3^2, 2^2 + 4^2] = [10, 20]
    q = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    a = losses.attention_map(q)
    assert a.shape == (1, 2)
    torch.testing.assert_close(a, torch.tensor([[10.0, 20.0]]) / math.sqrt(500.0))


def test_attention_and_activation_losses_by_hand():
    s = torch.tensor([[[[1.0, 0.0]]]])  # A_bar = [1, 0]
    t = torch.tensor([[[[0.0, 2.0]]]])  # A_bar = [0, 1]
    # mean over positions of the squared difference: ((1-0)^2 + (0-1)^2) / 2 = 1
    assert float(losses.attention_loss([s], [t])) == pytest.approx(1.0)
    assert float(losses.attention_loss([s, s], [t, s])) == pytest.approx(1.0)  # second pair 0
    # L_ACT: mean of squared differences over all elements: (1 + 4) / 2
    assert float(losses.activation_loss(s, t)) == pytest.approx(2.5)


def test_distillation_loss_weights_attention_by_lambda():
    s = torch.tensor([[[[1.0, 0.0]]]])
    t = torch.tensor([[[[0.0, 2.0]]]])
    parts = losses.distillation_loss(s, t, [s], [t], lambda_att=1e3)
    assert float(parts["act"]) == pytest.approx(2.5)
    assert float(parts["att"]) == pytest.approx(1.0)
    assert float(parts["dist"]) == pytest.approx(2.5 + 1e3)
    only_act = losses.distillation_loss(s, t, [s], [t], lambda_att=1e3, use_att=False)
    assert set(only_act) == {"act", "dist"} and float(only_act["dist"]) == pytest.approx(2.5)


def test_attention_loss_is_scale_invariant_and_differentiable():
    torch.manual_seed(0)
    s = torch.randn(3, 8, 4, 4, requires_grad=True)
    t = torch.randn(3, 8, 4, 4)
    base = losses.attention_loss([s], [t])
    scaled = losses.attention_loss([s.detach() * 7.0], [t * 0.1])
    assert float(scaled) == pytest.approx(float(base.detach()), rel=1e-5)
    base.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
