"""Decoupled Knowledge Distillation (Zhao et al., CVPR 2022), exact and from a top-k logit cache.

Notation, per sample: z teacher logits, s student logits (C classes), t the target class, T the temperature,
p = softmax(z/T), q = softmax(s/T), lse = logsumexp.

Exact DKD (the semantics of the official mdistiller code)::

    TCKD = KL(b_p || b_q)          b_p = (p_t, 1 - p_t),  b_q = (q_t, 1 - q_t)
    NCKD = KL(p^ || q^)            p^_j = p_j / (1 - p_t),  q^_j = q_j / (1 - q_t)   over the classes j != t
    DKD  = T^2 (alpha TCKD + beta NCKD),  averaged over the batch

computed in float32 from log-softmax pieces, never from differences of probabilities:
log p_t = z_t/T - lse(z/T), log(1 - p_t) = lse_{j != t}(z_j/T) - lse(z/T), log p^ = log_softmax(z/T with z_t = -inf).
A term whose teacher probability is 0 contributes 0 (no 0 * -inf), so values and gradients stay finite for logits
of +-1e4 and for bf16 inputs. The teacher side is detached.

Cached form. Per sample the cache holds a set K of k classes (`topk_idx`) with their logits z_K, the exact z_t and
L = lse(z/T) over all C classes. Then p_t = exp(z_t/T - L) and p_j = exp(z_j/T - L) for j in K \\ {t} are exact,
and the rest of the non-target mass,

    R = (1 - p_t) - S,   S = sum_{j in K \\ {t}} p_j         (in log space; rounding below 0 is clamped to 0)

lies on the M = C - |K u {t}| tail classes U, whose logits are unknown. With N = S + R (the teacher's non-target
mass; N = S and R = 0 when M = 0), TCKD is exact, b_p = (p_t, N), and NCKD follows one of two rules:

    uniform  p^_j = p_j / N on K \\ {t},  p^_u = R / (M N) on each u in U (the maximum-entropy completion);
             the student keeps its full q^:   NCKD = sum_{j != t} p^_j log(p^_j / q^_j)
    bucket   U is one class on both sides, P_U = R / N and Q_U = sum_{u in U} q^_u:
             NCKD = sum_{j in K \\ {t}} p^_j log(p^_j / q^_j) + P_U log(P_U / Q_U)

The NCKD gradient on a tail logit s_u is (q^_u - p^_u)/T: under `uniform` the student's tail is pulled towards one
flat level R / (M N); under `bucket` p^_u is replaced by P_U q^_u / Q_U, i.e. the teacher's tail mass is spread in
the shape of the student's own tail, so only the total tail mass is taught. With k = C (M = 0) both rules equal
exact DKD.

Mixed views (mixup, cutmix). A view mixed from its own sample (label a) and a partner (label b) with weight lam
(the own image's share) has one teacher output z, and its loss is defined as the same mixture of the two targets'
losses:

    DKD(mixed) = lam DKD(z, target a) + (1 - lam) DKD(z, target b)      on the same teacher logits z, one lse
    CE(mixed)  = lam CE(s, a) + (1 - lam) CE(s, b)                       (= CE against the soft target lam a + ...)

`mix_losses` is that formula on per-row losses; `mixed_cross_entropy` the CE. lam = 1 (an unmixed row, b = a)
gives the row's plain loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import ConfigError

RULES = ("uniform", "bucket")
REDUCTIONS = ("mean", "none")
_LN2 = math.log(2.0)
_NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------- validation
def _check_hparams(alpha: float, beta: float, temperature: float) -> tuple[float, float, float]:
    out = []
    for name, v in (("alpha", alpha), ("beta", beta), ("temperature", temperature)):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"DKD {name} must be a number, got {v!r}") from None
        if not math.isfinite(f) or f < 0 or (name == "temperature" and f == 0):
            need = "> 0" if name == "temperature" else ">= 0"
            raise ConfigError(f"DKD {name} must be finite and {need}, got {v!r}")
        out.append(f)
    return out[0], out[1], out[2]


def _check_logits(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ConfigError(f"{name} must be a floating-point tensor of shape (batch, classes), "
                          f"got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
    if x.shape[1] < 2:
        raise ConfigError(f"{name} needs at least 2 classes, got {x.shape[1]}")


def _check_vector(name: str, x: torch.Tensor, batch: int, integer: bool) -> None:
    ok = isinstance(x, torch.Tensor) and x.shape == (batch,) and (
        (not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool) if integer
        else x.is_floating_point())
    if not ok:
        kind = "an integer" if integer else "a floating-point"
        raise ConfigError(f"{name} must be {kind} tensor of shape ({batch},), "
                          f"got {getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")


def _check_indices(target: torch.Tensor, classes: int, topk_idx: torch.Tensor | None = None) -> None:
    """One host sync for all range checks."""
    bad = [((target < 0) | (target >= classes)).any()]
    if topk_idx is not None and topk_idx.numel():
        bad.append(((topk_idx < 0) | (topk_idx >= classes)).any())
    flags = torch.stack(bad).tolist()
    if flags[0]:
        raise ConfigError(f"target holds a class outside [0, {classes})")
    if len(flags) > 1 and flags[1]:
        raise ConfigError(f"topk_idx holds a class outside [0, {classes})")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


# --------------------------------------------------------------------------------------------- pieces
def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0 (x is clamped to 0), accurate at both ends (Maechler 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -_LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _kl_rows(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """sum_j p_j (log p_j - log q_j) per row, p = exp(lp); entries with p == 0 contribute exactly 0.

    Both logs are zeroed where p == 0 before subtracting, so -inf - -inf never appears and no NaN reaches a gradient.
    """
    p = lp.exp()
    pos = p > 0
    lp0 = torch.where(pos, lp, torch.zeros_like(lp))
    lq0 = torch.where(pos, lq, torch.zeros_like(lq))
    return (p * (lp0 - lq0)).sum(dim=-1)


def _binary_kl(lp: torch.Tensor, l1mp: torch.Tensor, lq: torch.Tensor, l1mq: torch.Tensor) -> torch.Tensor:
    """KL((p, 1-p) || (q, 1-q)) from the four logs, shape (B,)."""
    return _kl_rows(torch.stack([lp, l1mp], dim=-1), torch.stack([lq, l1mq], dim=-1))


def _student_pieces(student_logits: torch.Tensor, target: torch.Tensor, temperature: float):
    """(log q_t, log(1 - q_t), log q^ with -inf at t, target one-hot mask) of the student, float32."""
    zs = student_logits.float() / temperature
    tmask = torch.zeros_like(zs, dtype=torch.bool).scatter_(1, target.view(-1, 1), True)
    lse = torch.logsumexp(zs, dim=1)
    zs_nt = zs.masked_fill(tmask, _NEG_INF)
    lse_nt = torch.logsumexp(zs_nt, dim=1)
    lq_t = zs.gather(1, target.view(-1, 1)).squeeze(1) - lse
    l1mq_t = lse_nt - lse
    lq_hat = torch.log_softmax(zs_nt, dim=1)
    return lq_t, l1mq_t, lq_hat, tmask


# --------------------------------------------------------------------------------------------- losses
def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
             alpha: float, beta: float, temperature: float, reduction: str = "mean", *,
             target_logit: torch.Tensor | None = None, teacher_lse: torch.Tensor | None = None) -> torch.Tensor:
    """Exact DKD from full teacher logits: T^2 (alpha TCKD + beta NCKD), float32.

    student_logits, teacher_logits: (B, C) float (any float dtype; cast to float32); target: (B,) integer classes.
    reduction "mean": the batch mean (a scalar); "none": per sample, shape (B,).
    target_logit (B,) and teacher_lse (B,) = lse(z / T), given together: the teacher's exact target logit and
    log-partition (what a cache stores beside any codec). TCKD then uses p_t = exp(z_t / T - lse) exactly and
    teacher_logits only feed NCKD (which never reads the target entry): decoded logits that are off by a little
    leave TCKD exact.
    """
    alpha, beta, temperature = _check_hparams(alpha, beta, temperature)
    _check_reduction(reduction)
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ConfigError(f"teacher_logits {tuple(teacher_logits.shape)} and student_logits "
                          f"{tuple(student_logits.shape)} differ in shape")
    batch, classes = student_logits.shape
    _check_vector("target", target, batch, integer=True)
    target = target.long()
    _check_indices(target, classes)

    lq_t, l1mq_t, lq_hat, _ = _student_pieces(student_logits, target, temperature)
    if (target_logit is None) != (teacher_lse is None):
        raise ConfigError("give target_logit and teacher_lse together (the exact TCKD needs both), or neither")
    with torch.no_grad():
        lp_t, l1mp_t, lp_hat, _ = _student_pieces(teacher_logits.detach(), target, temperature)
        if target_logit is not None:
            _check_vector("target_logit", target_logit, batch, integer=False)
            _check_vector("teacher_lse", teacher_lse, batch, integer=False)
            lp_t = (target_logit.detach().float() / temperature - teacher_lse.detach().float()).clamp(max=0.0)
            l1mp_t = _log1mexp(lp_t)
    tckd = _binary_kl(lp_t, l1mp_t, lq_t, l1mq_t)
    nckd = _kl_rows(lp_hat, lq_hat)
    return _reduce(tckd, nckd, alpha, beta, temperature, reduction)


def dkd_loss_topk(student_logits: torch.Tensor, topk_idx: torch.Tensor, topk_val: torch.Tensor,
                  target_logit: torch.Tensor, teacher_lse: torch.Tensor, target: torch.Tensor,
                  alpha: float, beta: float, temperature: float, rule: str = "uniform",
                  reduction: str = "mean") -> torch.Tensor:
    """DKD from a cached teacher: top-k classes and logits, exact target logit and lse(z/T). See the module doc.

    student_logits (B, C) float; topk_idx (B, k) integer classes (distinct per row; the target may be among them,
    its entry is then ignored in favour of target_logit); topk_val (B, k) teacher logits (not divided by T);
    target_logit (B,) exact teacher logit of the target class; teacher_lse (B,) logsumexp(z / T) over all classes
    at this temperature; target (B,) integer classes; rule "uniform" or "bucket". Returns a float32 scalar
    (reduction "mean") or the per-sample losses (B,) (reduction "none").
    """
    alpha, beta, temperature = _check_hparams(alpha, beta, temperature)
    _check_reduction(reduction)
    if rule not in RULES:
        raise ConfigError(f"rule must be one of {RULES}, got {rule!r}")
    _check_logits("student_logits", student_logits)
    batch, classes = student_logits.shape
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2 or topk_idx.shape[0] != batch \
            or topk_idx.is_floating_point() or topk_idx.dtype == torch.bool or not 1 <= topk_idx.shape[1] <= classes:
        raise ConfigError(f"topk_idx must be an integer tensor of shape ({batch}, k) with 1 <= k <= {classes}, "
                          f"got {getattr(topk_idx, 'dtype', type(topk_idx).__name__)} "
                          f"{tuple(getattr(topk_idx, 'shape', ()))}")
    if not isinstance(topk_val, torch.Tensor) or topk_val.shape != topk_idx.shape or not topk_val.is_floating_point():
        raise ConfigError(f"topk_val must be a floating-point tensor of shape {tuple(topk_idx.shape)}, "
                          f"got {getattr(topk_val, 'dtype', type(topk_val).__name__)} "
                          f"{tuple(getattr(topk_val, 'shape', ()))}")
    _check_vector("target_logit", target_logit, batch, integer=False)
    _check_vector("teacher_lse", teacher_lse, batch, integer=False)
    _check_vector("target", target, batch, integer=True)
    target = target.long()
    topk_idx = topk_idx.long()
    _check_indices(target, classes, topk_idx)

    lq_t, l1mq_t, lq_hat, tmask = _student_pieces(student_logits, target, temperature)

    with torch.no_grad():
        lse = teacher_lse.detach().float()
        lp_t = (target_logit.detach().float() / temperature - lse).clamp(max=0.0)
        is_t = topk_idx == target.view(-1, 1)
        lp_k = (topk_val.detach().float() / temperature - lse.view(-1, 1)).clamp(max=0.0)
        lp_k = lp_k.masked_fill(is_t, _NEG_INF)                       # log p_j on K \ {t}
        known = tmask.clone().scatter_(1, topk_idx, True)             # K u {t}
        tail = ~known
        m = tail.sum(dim=1)                                           # M per row
        has_tail = m > 0
        l_s = torch.logsumexp(lp_k, dim=1)                            # log S (-inf when K \ {t} is empty)
        l1mp_t = _log1mexp(lp_t)                                      # log(1 - p_t)
        # log R = log(exp(l1mp_t) - exp(l_s)) = l1mp_t + log(1 - exp(l_s - l1mp_t)); R = 0 if rounding made S >= 1-p_t
        l_r = torch.where(l_s < l1mp_t, l1mp_t + _log1mexp(l_s - l1mp_t), torch.full_like(l_s, _NEG_INF))
        l_r = torch.where(has_tail, l_r, torch.full_like(l_r, _NEG_INF))
        l_n = torch.logsumexp(torch.stack([l_s, l_r]), dim=0)         # log N = log(S + R)
        l_n_safe = torch.where(torch.isfinite(l_n), l_n, torch.zeros_like(l_n))
        lp_hat_k = lp_k - l_n_safe.view(-1, 1)                        # log p^_j on K \ {t}, -inf elsewhere
        # log(R / N); when S = 0 the whole non-target mass is on the tail whatever rounding says
        l_r_rel = torch.where(l_s == _NEG_INF, torch.zeros_like(l_r), l_r - l_n_safe)
        l_r_rel = torch.where(has_tail, l_r_rel, torch.full_like(l_r_rel, _NEG_INF))

    tckd = _binary_kl(lp_t, l_n, lq_t, l1mq_t)

    if rule == "uniform":
        with torch.no_grad():
            m_safe = m.clamp(min=1).float()
            tail_level = torch.where(has_tail, l_r_rel - torch.log(m_safe), torch.full_like(l_r_rel, _NEG_INF))
            lp_hat = tail_level.view(-1, 1).expand(batch, classes).clone()
            lp_hat.scatter_(1, topk_idx, lp_hat_k)
            lp_hat.masked_fill_(tmask, _NEG_INF)
        nckd = _kl_rows(lp_hat, lq_hat)
    else:
        lq_hat_k = lq_hat.gather(1, topk_idx)
        x = torch.where(tail, lq_hat, torch.full_like(lq_hat, _NEG_INF))
        x = torch.where(has_tail.view(-1, 1), x, torch.zeros_like(x))  # rows without a tail: finite dummy, weight 0
        lq_u = torch.logsumexp(x, dim=1)
        nckd = _kl_rows(torch.cat([lp_hat_k, l_r_rel.view(-1, 1)], dim=1),
                        torch.cat([lq_hat_k, lq_u.view(-1, 1)], dim=1))
    return _reduce(tckd, nckd, alpha, beta, temperature, reduction)


def _reduce(tckd: torch.Tensor, nckd: torch.Tensor, alpha: float, beta: float, temperature: float,
            reduction: str) -> torch.Tensor:
    t2 = temperature * temperature
    if reduction == "none":
        return t2 * (alpha * tckd + beta * nckd)
    return t2 * (alpha * tckd.mean() + beta * nckd.mean())


# --------------------------------------------------------------------------------------------- mixed views
def _check_lam(lam: torch.Tensor, batch: int) -> None:
    """lam must be a float (B,) tensor with every value in [0, 1] (NaN is refused). One host sync."""
    _check_vector("lam", lam, batch, integer=False)
    if not bool(((lam >= 0) & (lam <= 1)).all()):
        raise ConfigError("lam holds a value outside [0, 1] (or NaN): a mixed view's weight of its own sample is a "
                          "fraction; check the batch's \"mix/lam\" entry")


def mix_losses(loss_a: torch.Tensor, loss_b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Per-row loss of mixed views: lam * loss_a + (1 - lam) * loss_b, float32 (B,).

    loss_a, loss_b (B,): each row's loss against its own target (a) and its partner's (b), on the same teacher
    output; lam (B,) float in [0, 1], the own sample's share of the mixed image (1.0: not mixed). For DKD this is
    the definition DKD(mixed view) = lam DKD(target a) + (1 - lam) DKD(target b) on the same teacher logits."""
    for name, x in (("loss_a", loss_a), ("loss_b", loss_b)):
        if not isinstance(x, torch.Tensor) or x.dim() != 1 or not x.is_floating_point():
            raise ConfigError(f"{name} must be a floating-point tensor of per-row losses (batch,), got "
                              f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if loss_b.shape != loss_a.shape:
        raise ConfigError(f"loss_a {tuple(loss_a.shape)} and loss_b {tuple(loss_b.shape)} differ in shape")
    _check_lam(lam, loss_a.shape[0])
    lam = lam.to(loss_a.device).float()
    return lam * loss_a.float() + (1.0 - lam) * loss_b.float()


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, labels_b: torch.Tensor, lam: torch.Tensor,
                        reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of mixed views: lam * CE(logits, labels) + (1 - lam) * CE(logits, labels_b), float32.

    logits (B, C) float; labels, labels_b (B,) integer classes (own and partner's; equal on an unmixed row);
    lam (B,) float in [0, 1], the own sample's share. reduction "mean": the batch mean; "none": per row (B,).
    Equals timm's SoftTargetCrossEntropy on the mixed one-hot targets without label smoothing."""
    _check_reduction(reduction)
    _check_logits("logits", logits)
    batch, classes = logits.shape
    _check_vector("labels", labels, batch, integer=True)
    _check_vector("labels_b", labels_b, batch, integer=True)
    labels, labels_b = labels.to(logits.device).long(), labels_b.to(logits.device).long()
    _check_indices(torch.cat([labels, labels_b]), classes)
    z = logits.float()
    per = mix_losses(F.cross_entropy(z, labels, reduction="none"), F.cross_entropy(z, labels_b, reduction="none"),
                     lam)
    return per if reduction == "none" else per.mean()


def total_loss(ce: torch.Tensor | float, dkd: torch.Tensor | float, epoch: float, warmup_epochs: float,
               ce_weight: float) -> torch.Tensor | float:
    """ce_weight * ce + min(epoch / warmup_epochs, 1) * dkd, as in mdistiller (warmup_epochs = 0: factor 1).

    `epoch` may be fractional (epoch + step / steps_per_epoch) so the ramp is smooth.
    """
    try:
        epoch, warmup_epochs, ce_weight = float(epoch), float(warmup_epochs), float(ce_weight)
    except (TypeError, ValueError):
        raise ConfigError(f"epoch, warmup_epochs and ce_weight must be numbers, got "
                          f"{epoch!r}, {warmup_epochs!r}, {ce_weight!r}") from None
    for name, v in (("epoch", epoch), ("warmup_epochs", warmup_epochs), ("ce_weight", ce_weight)):
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"{name} must be finite and >= 0, got {v!r}")
    factor = 1.0 if warmup_epochs == 0 else min(epoch / warmup_epochs, 1.0)
    return ce_weight * ce + factor * dkd
