"""train.train_step: the one optimisation step, shared by train-student and verify's parity runs."""

from __future__ import annotations

import pytest
import torch

from dkd_cache.errors import DKDCacheError, NonFiniteLossError
from dkd_cache.train import train_step


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_a_non_finite_loss_never_reaches_the_weights():
    model, opt = _model_and_opt()
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 3])
    train_step(model, opt, x, y, lambda s: s.square().mean(), kd_factor=0.5, ce_weight=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match="not finite at step 2") as info:
        train_step(model, opt, x, y, lambda s: s.sum() * float("nan"), kd_factor=1.0, ce_weight=1.0,
                   where="at step 2")
    assert isinstance(info.value, DKDCacheError) and isinstance(info.value, FloatingPointError)
    for p, b, m in zip(model.parameters(), before, momentum):
        assert torch.equal(p, b) and torch.equal(opt.state[p]["momentum_buffer"], m)


def test_the_loss_is_ce_weight_ce_plus_kd_factor_kd():
    model, opt = _model_and_opt()
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        logits = model(x)
    ce_ref = torch.nn.functional.cross_entropy(logits, y)
    loss, ce, kd = train_step(model, opt, x, y, lambda s: s.square().mean(), kd_factor=0.25, ce_weight=2.0)
    assert torch.allclose(ce, ce_ref) and torch.allclose(kd, logits.square().mean())
    assert torch.allclose(loss, 2.0 * ce_ref + 0.25 * kd)
    loss, ce, kd = train_step(model, opt, x, y, None, kd_factor=0.25, ce_weight=2.0)  # CE only
    assert torch.equal(loss, ce) and float(kd) == 0.0
