"""DKD loss: exact form against a plain float64 reference, the cached top-k form, stability, warmup."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from dkd_cache.errors import ConfigError
from dkd_cache.loss import dkd_loss, dkd_loss_topk, mix_losses, mixed_cross_entropy, total_loss

from .helpers import real_logits

TEMPS = (1.0, 2.0, 4.0)


# --------------------------------------------------------------------------------------------- references
def ref_dkd(s, t, y, alpha, beta, temp):
    """DKD written out plainly in float64: softmax, binary KL, KL over the renormalised non-target classes."""
    s, t = s.double() / temp, t.double() / temp
    total = torch.zeros((), dtype=torch.float64)
    for i in range(s.shape[0]):
        ps, pt = torch.softmax(s[i], 0), torch.softmax(t[i], 0)
        nt = torch.ones(s.shape[1], dtype=torch.bool)
        nt[y[i]] = False
        bt = torch.stack([pt[y[i]], pt[nt].sum()])
        bs = torch.stack([ps[y[i]], ps[nt].sum()])
        tckd = (bt * (bt / bs).log()).sum()
        qt, qs = pt[nt] / pt[nt].sum(), ps[nt] / ps[nt].sum()
        nckd = (qt * (qt / qs).log()).sum()
        total = total + alpha * tckd + beta * nckd
    return temp * temp * total / s.shape[0]


def ref_dkd_topk(s, t, y, k, alpha, beta, temp, rule):
    """The cached rules written out from the full teacher: exact on top-k and target, the rest per the rule."""
    s, t = s.double() / temp, t.double() / temp
    total = torch.zeros((), dtype=torch.float64)
    for i in range(s.shape[0]):
        c = s.shape[1]
        ps, pt = torch.softmax(s[i], 0), torch.softmax(t[i], 0)
        known = torch.zeros(c, dtype=torch.bool)
        known[t[i].topk(k).indices] = True
        known[y[i]] = True
        nt = torch.ones(c, dtype=torch.bool)
        nt[y[i]] = False
        kn = known & nt                       # top-k classes other than the target
        tail = ~known
        r = 1 - pt[y[i]] - pt[kn].sum()
        bt = torch.stack([pt[y[i]], 1 - pt[y[i]]])
        bs = torch.stack([ps[y[i]], ps[nt].sum()])
        tckd = (bt * (bt / bs).log()).sum()
        n = pt[kn].sum() + r
        qs = ps / ps[nt].sum()
        if rule == "uniform":
            qt = torch.zeros(c, dtype=torch.float64)
            qt[kn] = pt[kn] / n
            qt[tail] = r / n / tail.sum()
            nckd = (qt[nt] * (qt[nt] / qs[nt]).log()).sum()
        else:
            pk = torch.cat([pt[kn] / n, (r / n).view(1)])
            qk = torch.cat([qs[kn], qs[tail].sum().view(1)])
            nckd = (pk * (pk / qk).log()).sum()
        total = total + alpha * tckd + beta * nckd
    return temp * temp * total / s.shape[0]


def cached(t, y, k, temp):
    """What the cache holds for teacher logits t: (topk_idx, topk_val, target_logit, lse)."""
    val, idx = t.topk(k, dim=1)
    return idx, val, t.gather(1, y.view(-1, 1)).squeeze(1), torch.logsumexp(t.float() / temp, dim=1)


def student_grad(fn, s):
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s)
    loss.backward()
    return loss.detach(), s.grad


def batch(seed=0, b=12, c=37, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, generator=g) * scale
    t = torch.randn(b, c, generator=g) * scale
    y = torch.randint(0, c, (b,), generator=g)
    return s, t, y


# --------------------------------------------------------------------------------------------- exact DKD
@pytest.mark.parametrize("temp", TEMPS)
def test_dkd_matches_float64_reference(temp):
    s, t, y = batch(seed=int(temp))
    for alpha, beta in ((1.0, 8.0), (0.5, 0.5), (1.0, 0.0), (0.0, 1.0)):
        got = dkd_loss(s, t, y, alpha, beta, temp)
        assert got.dtype == torch.float32 and got.shape == ()
        torch.testing.assert_close(got.double(), ref_dkd(s, t, y, alpha, beta, temp), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temp", TEMPS)
def test_dkd_gradient_matches_reference(temp):
    s, t, y = batch(seed=10 + int(temp))
    _, g = student_grad(lambda x: dkd_loss(x, t, y, 1.0, 8.0, temp), s)
    _, g_ref = student_grad(lambda x: ref_dkd(x, t, y, 1.0, 8.0, temp), s.double())
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-6)


def test_teacher_gets_no_gradient_and_zero_when_equal():
    s, t, y = batch(seed=3)
    t = t.clone().requires_grad_(True)
    loss = dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    assert not loss.requires_grad  # the student has no grad here and the teacher is detached
    assert abs(float(dkd_loss(s, s, y, 1.0, 8.0, 4.0))) < 1e-5


@pytest.mark.parametrize("rule", [None, "uniform", "bucket"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_for_huge_logits_and_bf16(rule, dtype):
    s, t, y = batch(seed=4, b=8, c=50, scale=1.0)
    cases = [(s * 1e4, t * 1e4)]
    # the teacher is sure of the target (p_t rounds to 1) while the student puts it last, and the reverse
    t_sure = torch.full_like(t, -1e4).scatter_(1, y.view(-1, 1), 1e4)
    cases += [(-t_sure, t_sure), (t_sure, -t_sure), (s.to(dtype), t.to(dtype))]
    for s_, t_ in cases:
        s_, t_ = s_.to(dtype), t_.to(dtype)
        for temp in (1.0, 4.0):
            if rule is None:
                fn = lambda x: dkd_loss(x, t_, y, 1.0, 8.0, temp)  # noqa: E731
            else:
                args = cached(t_.float(), y, 5, temp)
                fn = lambda x: dkd_loss_topk(x, *args, y, 1.0, 8.0, temp, rule=rule)  # noqa: E731
            x = s_.detach().clone().requires_grad_(True)
            loss = fn(x)
            loss.backward()
            assert loss.dtype == torch.float32
            assert torch.isfinite(loss), (rule, dtype, temp)
            assert torch.isfinite(x.grad.float()).all(), (rule, dtype, temp)


def test_bf16_logits_are_computed_in_float32():
    """bf16 logits (an autocast forward's) lose nothing more in the loss: the loss of the bf16 values matches the
    float64 reference of those same values to float32 accuracy (a loss computed in bf16 would be off by ~1e-2),
    and its gradient reaches the bf16 student logits."""
    s, t, y = batch(seed=5)
    sb, tb = s.bfloat16(), t.bfloat16()
    got = dkd_loss(sb, tb, y, 1.0, 8.0, 4.0)
    torch.testing.assert_close(got.double(), ref_dkd(sb.double(), tb.double(), y, 1.0, 8.0, 4.0),
                               rtol=1e-5, atol=1e-6)
    x = sb.clone().requires_grad_(True)
    dkd_loss(x, tb, y, 1.0, 8.0, 4.0).backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- cached form
@pytest.mark.parametrize("rule", ["uniform", "bucket"])
@pytest.mark.parametrize("temp", TEMPS)
def test_topk_with_all_classes_equals_exact(rule, temp):
    s, t, y = batch(seed=20 + int(temp))
    full, g_full = student_grad(lambda x: dkd_loss(x, t, y, 1.0, 8.0, temp), s)
    got, g = student_grad(lambda x: dkd_loss_topk(x, *cached(t, y, t.shape[1], temp), y, 1.0, 8.0, temp, rule), s)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_full, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rule", ["uniform", "bucket"])
@pytest.mark.parametrize("where", ["inside", "outside", "mixed"])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_topk_matches_reference_of_the_rule(rule, where, k):
    s, t, y = batch(seed=30 + k)
    order = t.argsort(dim=1, descending=True)
    if where == "inside":
        y = order[:, min(k, 3) - 1]              # the target is among the top-k
    elif where == "outside":
        y = order[:, -1]                         # the target is the teacher's least likely class
    for temp in (1.0, 4.0):
        got = dkd_loss_topk(s, *cached(t, y, k, temp), y, 1.0, 8.0, temp, rule=rule)
        torch.testing.assert_close(got.double(), ref_dkd_topk(s, t, y, k, 1.0, 8.0, temp, rule),
                                   rtol=2e-5, atol=1e-6)


def test_topk_target_entry_is_ignored_in_favour_of_target_logit():
    s, t, y = batch(seed=40)
    y = t.argmax(dim=1)
    idx, val, tl, lse = cached(t, y, 5, 2.0)
    a = dkd_loss_topk(s, idx, val, tl, lse, y, 1.0, 8.0, 2.0)
    val2 = torch.where(idx == y.view(-1, 1), val + 100.0, val)  # garbage in the target's top-k slot
    b = dkd_loss_topk(s, idx, val2, tl, lse, y, 1.0, 8.0, 2.0)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("rule", ["uniform", "bucket"])
def test_topk_gradient_close_when_k_large(rule):
    s, t, y = batch(seed=50, b=16, c=100, scale=2.0)
    temp = 2.0
    _, g_full = student_grad(lambda x: dkd_loss(x, t, y, 1.0, 8.0, temp), s)
    cos = {}
    for k in (50, 90, 99):
        _, g = student_grad(lambda x: dkd_loss_topk(x, *cached(t, y, k, temp), y, 1.0, 8.0, temp, rule), s)
        cos[k] = torch.nn.functional.cosine_similarity(g, g_full, dim=1)
    assert cos[90].min() > 0.99 and cos[99].min() > 0.999
    assert cos[50].median() <= cos[90].median() + 1e-6 <= cos[99].median() + 2e-6


def test_topk_accepts_narrow_dtypes():
    s, t, y = batch(seed=60)
    idx, val, tl, lse = cached(t, y, 7, 1.0)
    a = dkd_loss_topk(s, idx, val, tl, lse, y, 1.0, 8.0, 1.0)
    b = dkd_loss_topk(s.bfloat16(), idx.to(torch.int16), val.half(), tl, lse, y.to(torch.int32), 1.0, 8.0, 1.0)
    assert torch.isfinite(b)
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


# --------------------------------------------------------------------------------------------- mixed views
def ref_rows(ref, s, t, y, *args):
    """A batch-mean float64 reference applied to each row alone: the (B,) per-row references."""
    return torch.stack([ref(s[i:i + 1], t[i:i + 1], y[i:i + 1], *args) for i in range(s.shape[0])])


def ref_mixed(ref, s, t, y, y_b, lam, *args):
    """The mixed loss written out in float64: the batch mean of lam ref(target a) + (1 - lam) ref(target b)."""
    lam = lam.double()
    return (lam * ref_rows(ref, s, t, y, *args) + (1 - lam) * ref_rows(ref, s, t, y_b, *args)).mean()


def mixed_batch(seed=80, b=10, c=23):
    """Student and teacher logits, own labels, partner labels and lam: rows 0-1 unmixed (lam 1, b = a), row 2 lam 0
    (all partner), row 3 lam 1 with another partner label (all own), the rest mixed with various lam."""
    s, t, y = batch(seed=seed, b=b, c=c)
    g = torch.Generator().manual_seed(seed + 1)
    y_b = (y + 1 + torch.randint(0, c - 1, (b,), generator=g)) % c  # another class than the row's own
    y_b[:2] = y[:2]
    lam = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.3, 0.75, 0.5, 0.01, 0.99, 0.618])[:b]
    return s, t, y, y_b, lam


@pytest.mark.parametrize("temp", TEMPS)
def test_mixed_dkd_is_the_lam_mixture_of_both_targets_on_the_same_logits(temp):
    s, t, y, y_b, lam = mixed_batch(seed=81 + int(temp))
    a = dkd_loss(s, t, y, 1.0, 8.0, temp, reduction="none")
    b = dkd_loss(s, t, y_b, 1.0, 8.0, temp, reduction="none")
    got = mix_losses(a, b, lam)
    assert got.dtype == torch.float32 and got.shape == lam.shape
    torch.testing.assert_close(got.mean().double(), ref_mixed(ref_dkd, s, t, y, y_b, lam, 1.0, 8.0, temp),
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(got[[0, 1, 3]], a[[0, 1, 3]])  # lam 1: the row's own loss, whatever its partner
    assert torch.equal(got[2], b[2])  # lam 0: the partner's
    # the gradient too: the student is pulled towards both targets in proportion
    _, g = student_grad(lambda x: mix_losses(dkd_loss(x, t, y, 1.0, 8.0, temp, reduction="none"),
                                             dkd_loss(x, t, y_b, 1.0, 8.0, temp, reduction="none"), lam).mean(), s)
    _, g_ref = student_grad(lambda x: ref_mixed(ref_dkd, x, t, y, y_b, lam, 1.0, 8.0, temp), s.double())
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rule", ["uniform", "bucket"])
@pytest.mark.parametrize("k", [1, 5])
def test_mixed_dkd_in_the_cached_topk_form(rule, k):
    """Target b's exact logit with labels b and the one lse: the cached rule of each target, mixed by lam."""
    s, t, y, y_b, lam = mixed_batch(seed=90 + k)
    order = t.argsort(dim=1, descending=True)
    y_b[4] = order[4, 0]  # a partner label among the top-k, and one far outside it
    y_b[5] = order[5, -1]
    for temp in (1.0, 4.0):
        idx, val, tl, lse = cached(t, y, k, temp)
        tl_b = t.gather(1, y_b.view(-1, 1)).squeeze(1)
        a = dkd_loss_topk(s, idx, val, tl, lse, y, 1.0, 8.0, temp, rule=rule, reduction="none")
        b = dkd_loss_topk(s, idx, val, tl_b, lse, y_b, 1.0, 8.0, temp, rule=rule, reduction="none")
        got = mix_losses(a, b, lam).mean()
        torch.testing.assert_close(got.double(), ref_mixed(ref_dkd_topk, s, t, y, y_b, lam, k, 1.0, 8.0, temp, rule),
                                   rtol=2e-5, atol=1e-6)


def ref_ce_rows(s, y):
    return -torch.log_softmax(s.double(), dim=1).gather(1, y.view(-1, 1)).squeeze(1)


def test_mixed_cross_entropy_matches_float64_reference():
    s, _, y, y_b, lam = mixed_batch(seed=100)
    want = lam.double() * ref_ce_rows(s, y) + (1 - lam.double()) * ref_ce_rows(s, y_b)
    per = mixed_cross_entropy(s, y, y_b, lam, reduction="none")
    assert per.dtype == torch.float32 and per.shape == y.shape
    torch.testing.assert_close(per.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed_cross_entropy(s, y, y_b, lam).double(), want.mean(), rtol=1e-6, atol=1e-6)
    # = the cross-entropy against the soft target lam one_hot(a) + (1 - lam) one_hot(b) (timm's mixup targets)
    soft = lam[:, None] * F.one_hot(y, s.shape[1]) + (1 - lam[:, None]) * F.one_hot(y_b, s.shape[1])
    torch.testing.assert_close(mixed_cross_entropy(s, y, y_b, lam), F.cross_entropy(s, soft.float()))
    # lam 1 everywhere, with any partner: plain CE of the own labels
    ones = torch.ones_like(lam)
    assert torch.equal(mixed_cross_entropy(s, y, y_b, ones, reduction="none"), F.cross_entropy(s, y, reduction="none"))
    # the gradient reaches the student's logits, bf16 ones included
    x = s.bfloat16().requires_grad_(True)
    mixed_cross_entropy(x, y, y_b, lam).backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all() and x.grad.abs().sum() > 0


def test_mixed_losses_refuse_bad_lam_and_labels():
    s, t, y, y_b, lam = mixed_batch(seed=110)
    a = dkd_loss(s, t, y, 1.0, 8.0, 1.0, reduction="none")
    for bad in (lam * 2, lam - 0.5, torch.full_like(lam, float("nan"))):
        with pytest.raises(ConfigError, match="lam holds a value outside"):
            mix_losses(a, a, bad)
        with pytest.raises(ConfigError, match="lam holds a value outside"):
            mixed_cross_entropy(s, y, y_b, bad)
    with pytest.raises(ConfigError, match="lam must be a floating-point tensor"):
        mix_losses(a, a, lam[:3])
    with pytest.raises(ConfigError, match="lam must be a floating-point tensor"):
        mix_losses(a, a, (lam > 0.5).long())
    with pytest.raises(ConfigError, match="differ in shape"):
        mix_losses(a, a[:3], lam)
    with pytest.raises(ConfigError, match="loss_a"):
        mix_losses(a.mean(), a, lam)
    with pytest.raises(ConfigError, match="labels_b"):
        mixed_cross_entropy(s, y, y_b.float(), lam)
    with pytest.raises(ConfigError, match="outside"):
        mixed_cross_entropy(s, y, y_b + s.shape[1], lam)
    with pytest.raises(ConfigError, match="reduction"):
        mixed_cross_entropy(s, y, y_b, lam, reduction="sum")


# --------------------------------------------------------------------------------------------- validation
def test_invalid_arguments_raise_config_error():
    s, t, y = batch(seed=70)
    args = cached(t, y, 4, 1.0)
    with pytest.raises(ConfigError, match="temperature"):
        dkd_loss(s, t, y, 1.0, 8.0, 0.0)
    with pytest.raises(ConfigError, match="alpha"):
        dkd_loss(s, t, y, -1.0, 8.0, 1.0)
    with pytest.raises(ConfigError, match="beta"):
        dkd_loss(s, t, y, 1.0, float("nan"), 1.0)
    with pytest.raises(ConfigError, match="shape"):
        dkd_loss(s, t[:, :-1], y, 1.0, 8.0, 1.0)
    with pytest.raises(ConfigError, match="target"):
        dkd_loss(s, t, y.float(), 1.0, 8.0, 1.0)
    with pytest.raises(ConfigError, match="outside"):
        dkd_loss(s, t, y + s.shape[1], 1.0, 8.0, 1.0)
    with pytest.raises(ConfigError, match="rule"):
        dkd_loss_topk(s, *args, y, 1.0, 8.0, 1.0, rule="spread")
    with pytest.raises(ConfigError, match="topk_idx"):
        dkd_loss_topk(s, args[0] - 100, *args[1:], y, 1.0, 8.0, 1.0)
    with pytest.raises(ConfigError, match="topk_val"):
        dkd_loss_topk(s, args[0], args[1][:, :2], *args[2:], y, 1.0, 8.0, 1.0)
    with pytest.raises(ConfigError, match="teacher_lse"):
        dkd_loss_topk(s, *args[:3], args[3][:3], y, 1.0, 8.0, 1.0)


def test_total_loss_warmup():
    ce, dkd = torch.tensor(2.0), torch.tensor(10.0)
    assert float(total_loss(ce, dkd, epoch=0, warmup_epochs=5, ce_weight=1.0)) == 2.0
    assert float(total_loss(ce, dkd, epoch=2.5, warmup_epochs=5, ce_weight=1.0)) == 7.0
    assert float(total_loss(ce, dkd, epoch=5, warmup_epochs=5, ce_weight=0.5)) == 11.0
    assert float(total_loss(ce, dkd, epoch=50, warmup_epochs=5, ce_weight=1.0)) == 12.0
    assert float(total_loss(ce, dkd, epoch=0, warmup_epochs=0, ce_weight=1.0)) == 12.0
    s = torch.zeros(3, requires_grad=True)
    out = total_loss(s.sum(), (2 * s).sum(), epoch=0.5, warmup_epochs=1, ce_weight=1.0)
    out.backward()
    assert s.grad.tolist() == [2.0, 2.0, 2.0]
    for bad in (dict(epoch=-1, warmup_epochs=1, ce_weight=1), dict(epoch=0, warmup_epochs=-1, ce_weight=1),
                dict(epoch=0, warmup_epochs=1, ce_weight=float("inf")), dict(epoch="x", warmup_epochs=1, ce_weight=1)):
        with pytest.raises(ConfigError):
            total_loss(ce, dkd, **bad)


# --------------------------------------------------------------------------------------------- real logits
def test_real_logits_uniform_topk_gradient_fidelity():
    t, s, y = real_logits()
    temp, alpha, beta = 1.0, 0.5, 0.5  # the DKD ImageNet setting
    _, g_full = student_grad(lambda x: dkd_loss(x, t, y, alpha, beta, temp), s)
    med = {}
    for k in (10, 30, 100):
        _, g = student_grad(lambda x: dkd_loss_topk(x, *cached(t, y, k, temp), y, alpha, beta, temp, "uniform"), s)
        cos = torch.nn.functional.cosine_similarity(g, g_full, dim=1)
        assert torch.isfinite(cos).all()
        med[k] = float(cos.median())
    assert med[10] > 0.95, med
    assert med[10] <= med[30] <= med[100], med


def test_dkd_loss_exact_tckd_from_stored_target_logit_and_lse():
    g = torch.Generator().manual_seed(11)
    z = torch.randn(6, 9, generator=g) * 3
    s = torch.randn(6, 9, generator=g)
    y = torch.tensor([0, 3, 8, 2, 2, 5])
    for temp in (1.0, 4.0):
        exact = dkd_loss(s, z, y, 1.0, 8.0, temp)
        zt = z.gather(1, y[:, None])[:, 0]
        lse = torch.logsumexp(z / temp, dim=1)
        assert torch.allclose(dkd_loss(s, z, y, 1.0, 8.0, temp, target_logit=zt, teacher_lse=lse), exact, rtol=1e-5)
        # a decoded vector whose target entry is off (and whose lse is therefore off): TCKD stays exact
        off = z.clone().scatter_add_(1, y[:, None], torch.full((6, 1), 1.5))
        assert not torch.allclose(dkd_loss(s, off, y, 1.0, 8.0, temp), exact, rtol=1e-3)
        assert torch.allclose(dkd_loss(s, off, y, 1.0, 8.0, temp, target_logit=zt, teacher_lse=lse), exact, rtol=1e-5)
    with pytest.raises(ConfigError, match="together"):
        dkd_loss(s, z, y, 1.0, 8.0, 1.0, target_logit=z[:, 0])
