"""verify's fidelity phase: the live teacher on the drawn entries' re-rendered views against the stored entries
(logit fidelity), the DKD loss training computes from them (loss fidelity), and the drift to another renderer.

It calls the code that trains, never a copy: teacher_signal.teacher_forward for the forward passes,
teacher_signal.dkd_from_entries / encode_entries for the loss, loss.dkd_loss for full-logit DKD.
The tolerances are explained in verify.py's docstring.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .checkpoint import read_checkpoint
from .codec_fidelity import loss_and_grad, row_cosines
from .errors import ConfigError
from .logit_codecs import Codec, FloatCodec
from .loss import dkd_loss
from .teacher import build_model, load_teacher
from .teacher_signal import ComputePolicy, Storage, dkd_from_entries, encode_entries, lse_at, select_rows, \
    teacher_forward
from .verify_report import Checks, PhaseResult, stats
from .views import normalize

WORST = 5  # entries listed per report for the largest errors
BF16_LOGIT_REL = 2.0 ** -6
FP32 = ComputePolicy(amp="none", tf32=False)  # the student's forward and the parity runs

# loss_fn(student_logits, temperature, rule, rows) -> DKD: training's loss on one set of teacher entries
LossFn = Callable[..., torch.Tensor]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Losses:
    """Training's DKD on three sets of entries for the same inputs: the stored ones, the live logits put through
    the cache's codec (an ideal cache), and the live logits in exact storage."""

    storage: Storage  # the cache's
    stored: LossFn
    ideal: LossFn
    live: LossFn


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fidelity:
    phase: PhaseResult
    z: torch.Tensor  # (n, C) float32 live teacher logits of the entries
    student: torch.nn.Module  # the student the loss was measured with (eval mode)
    losses: Losses
    mix: dict[str, torch.Tensor]  # a mixing recipe's "mix/lam", "mix/label" (n,) of the entries; else {}


def fidelity_phase(cache, codec: Codec, teacher: torch.nn.Module, images: torch.Tensor, y: torch.Tensor,
                   stored: dict[str, np.ndarray], names: list[str], render_other: Callable[[str], torch.Tensor],
                   settings, device: torch.device, mix: dict[str, torch.Tensor] | None = None) -> Fidelity:
    """Logit fidelity, the optional renderer drift, and loss fidelity of the n entries (images: their renders by
    the cache's renderer, y: labels, stored: array name -> (n, ...) stored values, names: for the report; mix: a
    mixing recipe's "mix/lam" and "mix/label" of the entries, whose losses are then the mixed ones and whose
    stored partner target logits are compared too)."""
    mix = mix or {}
    y_b = mix.get("mix/label")  # the partner labels (None: the recipe does not mix)
    s, meta, ck, figures, seconds = settings, cache.meta, Checks(), {}, {}
    t0 = time.perf_counter()
    # The live teacher runs as the dump did (the cache's compute policy): under bf16 autocast for a bf16 cache.
    policy = meta.compute or ComputePolicy(device=device.type)  # None: not recorded (an older cache)
    z = logits_of(teacher, images, meta.recipe, device, s.batch_size, policy)
    logit_tol = s.logit_tol
    if policy.amp == "bf16":  # bf16 keeps 8 significant bits; rounding differs across devices and kernels
        logit_tol = max(logit_tol, BF16_LOGIT_REL * float(z.abs().max()))
        figures["bf16_logit_tol"] = logit_tol
    figures["logits"] = logit_fidelity(codec, meta, z, y, stored, logit_tol, ck, names, y_b=y_b)
    seconds["logits"] = time.perf_counter() - t0

    if s.renderer is not None and s.renderer != meta.renderer.name:
        t0 = time.perf_counter()
        other_student, other_desc = load_student(s, meta.num_classes, device)
        figures["renderer_drift"] = {**renderer_drift(teacher, other_student, images, render_other(s.renderer), z, y,
                                                      meta, s, device, policy), "student": other_desc}
        seconds["renderer_drift"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    student, student_desc = load_student(s, meta.num_classes, device)
    s_logits = logits_of(student, images, meta.recipe, device, s.batch_size, FP32)
    storage = Storage.of_cache(cache)
    exact = Storage.exact(meta.num_classes, meta.temperatures)
    losses = Losses(storage=storage,
                    stored=loss_of({**{k: torch.from_numpy(v) for k, v in stored.items() if k.startswith("logits/")},
                                    **mix}, storage, y, s),
                    ideal=loss_of({**encode_entries(z, y, storage, labels_b=y_b), **mix}, storage, y, s),
                    live=loss_of({**encode_entries(z, y, exact, labels_b=y_b), **mix}, exact, y, s))
    figures["loss"] = {"student": student_desc, "alpha": s.alpha, "beta": s.beta,
                       **loss_fidelity(codec, meta, s_logits, losses, s, ck)}
    seconds["loss"] = time.perf_counter() - t0
    return Fidelity(phase=ck.done("fidelity", figures, seconds), z=z, student=student, losses=losses, mix=mix)


# --------------------------------------------------------------------------------------------- models
def logits_of(model: torch.nn.Module, images: torch.Tensor, recipe, device: torch.device, batch: int,
              policy: ComputePolicy) -> torch.Tensor:
    """float32 logits (on the CPU) of uint8 renders, through teacher_signal.teacher_forward in batches."""
    return torch.cat([teacher_forward(model, normalize(images[s:s + batch].to(device), recipe), policy).cpu()
                      for s in range(0, images.shape[0], batch)])


def load_student(settings, num_classes: int, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The given student checkpoint, else a ResNet-18 initialised with torch.manual_seed(seed); eval mode."""
    if settings.student:
        ckpt = read_checkpoint(settings.student)
        arch = ckpt.get("arch")
        if not isinstance(arch, str):
            raise ConfigError(f"{settings.student}: no 'arch' entry; give a checkpoint written by train-student")
        model, info = load_teacher(arch, settings.student, device=device)
        if info.num_classes != num_classes:
            raise ConfigError(f"student {settings.student} has {info.num_classes} classes, the cache {num_classes}")
        return model, f"{arch} from {settings.student}"
    torch.manual_seed(settings.seed)
    model = build_model("resnet18", num_classes).eval().requires_grad_(False).to(device)
    return model.to(memory_format=torch.channels_last), f"resnet18, random init (torch.manual_seed({settings.seed}))"


# --------------------------------------------------------------------------------------------- logit fidelity
def logit_fidelity(codec: Codec, meta, z: torch.Tensor, y: torch.Tensor, stored: dict[str, np.ndarray],
                   tol: float, ck: Checks, labels_of: list[str], y_b: torch.Tensor | None = None) -> dict[str, Any]:
    classes, temps = meta.num_classes, meta.temperatures
    z64 = z.double()
    out: dict[str, Any] = {}
    t_s = torch.from_numpy(stored["logits/target"]).double()
    t_l = z64.gather(1, y[:, None])[:, 0]
    err_t = (t_s - t_l).abs().numpy()
    out["target_logit"] = stats(err_t)
    ck.check("logits: target logit |stored - live| max", bool(err_t.max() <= tol), float(err_t.max()), tol)
    if y_b is not None:  # mixed views: the partner label's exact logit, of the same (mixed) teacher output
        err_b = (torch.from_numpy(stored["logits/target_b"]).double() - z64.gather(1, y_b[:, None])[:, 0]).abs()
        out["target_b_logit"] = stats(err_b.numpy())
        ck.check("logits: partner target logit |stored - live| max", bool(err_b.max() <= tol), float(err_b.max()),
                 tol)
    lse_s = torch.from_numpy(stored["logits/lse"]).double()
    lse_l = lse_at(z, temps).double()
    for ti, temp in enumerate(temps):
        scale = max(1.0, 1.0 / temp)
        e = (lse_s[:, ti] - lse_l[:, ti]).abs().numpy()
        out[f"lse T={temp:g}"] = stats(e)
        ck.check(f"logits: lse(z/T) T={temp:g} |stored - live| max", bool(e.max() <= tol * scale), float(e.max()),
                 tol * scale)
        p_s = torch.exp(t_s / temp - lse_s[:, ti])
        p_l = torch.exp(t_l / temp - lse_l[:, ti])
        e = (p_s - p_l).abs().numpy()
        out[f"p_t T={temp:g}"] = stats(e)
        ck.check(f"logits: teacher p_t T={temp:g} |stored - live| max", bool(e.max() <= 2 * tol * scale),
                 float(e.max()), 2 * tol * scale)

    arrays = {name.split("/", 1)[1]: torch.from_numpy(v) for name, v in stored.items()
              if name.startswith("logits/") and name not in ("logits/target", "logits/lse", "logits/target_b")}
    dec = codec.decode(arrays, classes)
    bound = codec.error_bound(z)  # (B, C) float64, inf where the codec stores nothing
    fp16 = FloatCodec(dtype="fp16").error_bound(z)
    idx = None
    if "topk_idx" in arrays:
        idx = arrays["topk_idx"].long()
        k = idx.shape[1]
        # the stored set may differ from the live top-k at a near-tie: bound its values as float16, the rest as tail
        live_top = torch.zeros_like(z, dtype=torch.bool).scatter_(1, z.topk(k, dim=1).indices, True)
        tail_level = bound.masked_fill(live_top, -math.inf).amax(dim=1, keepdim=True) if k < classes else None
        bound = (tail_level.expand_as(bound).clone() if tail_level is not None
                 else torch.full_like(bound, math.inf))
        bound.scatter_(1, idx, fp16.gather(1, idx))
    if dec.full is not None:
        err = (dec.full.double() - z64).abs()
        excess = err - bound
        out["stored_logits"] = {**stats(err.amax(dim=1).numpy()), "what": "every logit (row max)"}
    else:
        err = (dec.topk_val.double() - z64.gather(1, idx)).abs()
        excess = err - bound.gather(1, idx)
        out["stored_logits"] = {**stats(err.amax(dim=1).numpy()), "what": f"top-{idx.shape[1]} values (row max)"}
    row_excess = excess.amax(dim=1).numpy()
    out["stored_logits"]["max_excess_over_codec_bound"] = float(row_excess.max())
    ck.check(f"logits: stored {codec.name} values, max excess over the codec's bound",
             bool(row_excess.max() <= tol), float(row_excess.max()), tol)
    worst = np.argsort(-np.maximum(err_t, row_excess))[:WORST]
    out["worst"] = [{"entry": labels_of[i], "target_err": float(err_t[i]), "logit_excess": float(row_excess[i])}
                    for i in worst]

    if idx is not None and idx.shape[1] < classes:
        inside = torch.zeros_like(z, dtype=torch.bool).scatter_(1, idx, True)
        min_in = z64.masked_fill(~inside, math.inf).amin(dim=1)
        max_out = z64.masked_fill(inside, -math.inf).amax(dim=1)
        gap = (max_out - min_in).numpy()  # > 0: some class outside the stored set is larger than one inside
        live_sets = torch.zeros_like(z, dtype=torch.bool).scatter_(1, z.topk(idx.shape[1], dim=1).indices, True)
        exact = int((live_sets == inside).all(dim=1).sum())
        violations = int((gap > tol).sum())
        out["topk_set"] = {"k": int(idx.shape[1]), "exact": exact, "tie_tolerated": int(gap.size - exact - violations),
                           "violations": violations, "max_boundary_gap": float(gap.max())}
        ck.check("logits: stored top-k class sets = live top-k (tie-tolerant)", violations == 0,
                 f"{violations}/{gap.size}", 0,
                 detail=f"largest live logit outside the set exceeds one inside by {gap.max():.3g}"
                 if violations else "")
    return out


# --------------------------------------------------------------------------------------------- loss fidelity
def loss_of(entries: dict[str, torch.Tensor], storage: Storage, y: torch.Tensor, settings) -> LossFn:
    """loss_fn(student_logits, temperature, rule, rows): teacher_signal.dkd_from_entries, training's loss."""

    def fn(s: torch.Tensor, temp: float, rule: str, rows=slice(None)) -> torch.Tensor:
        return dkd_from_entries(s, y[rows], select_rows(entries, rows), storage, alpha=settings.alpha,
                                beta=settings.beta, temperature=temp, rule=rule)
    return fn


def compare(fn_a, fn_b, s: torch.Tensor) -> dict[str, float]:
    """Loss and per-sample gradient (w.r.t. the student logits s) of fn_a against the reference fn_b."""
    la, ga = loss_and_grad(fn_a, s)
    lb, gb = loss_and_grad(fn_b, s)
    cos = row_cosines(ga, gb)
    return {"loss": la, "reference_loss": lb, "rel_err": abs(la - lb) / max(abs(lb), 1e-12),
            "cos_median": float(np.median(cos)), "cos_p5": float(np.percentile(cos, 5)), "cos_min": float(cos.min())}


def _rules(codec: Codec) -> tuple[str, ...]:
    return ("exact",) if codec.decodes_full else ("uniform", "bucket")


def loss_fidelity(codec: Codec, meta, s: torch.Tensor, losses: Losses, settings, ck: Checks) -> dict:
    """At every cached temperature (and the recipe's) and residual rule: stored against ideal cache (judged), and
    against live exact DKD (the codec's approximation; judged for lossy codecs at the recipe's temperatures)."""
    out: dict[str, Any] = {}
    gated = tuple(settings.temperatures) if settings.temperatures is not None else tuple(meta.temperatures)
    lossy = not (isinstance(codec, FloatCodec) and codec.dtype == "fp32")
    for temp in dict.fromkeys((*meta.temperatures, *gated)):
        live = lambda x, temp=temp: losses.live(x, temp, "uniform")  # noqa: E731
        for rule in _rules(codec):
            r = rule if rule != "exact" else "uniform"
            st = lambda x, temp=temp, r=r: losses.stored(x, temp, r)  # noqa: E731
            ide = lambda x, temp=temp, r=r: losses.ideal(x, temp, r)  # noqa: E731
            vs_ideal = compare(st, ide, s)
            vs_live = compare(st, live, s)
            out[f"T={temp:g} {rule}"] = {"vs_ideal_cache": vs_ideal, "vs_live_exact": vs_live}
            ck.check(f"loss: DKD T={temp:g} {rule} relative error vs ideal cache", vs_ideal["rel_err"] <= settings.loss_tol,
                     vs_ideal["rel_err"], settings.loss_tol)
            ck.check(f"loss: DKD T={temp:g} {rule} median gradient cosine vs ideal cache",
                     vs_ideal["cos_median"] >= settings.cosine_tol, vs_ideal["cos_median"], settings.cosine_tol)
            if lossy and rule != "bucket" and temp in gated:
                live_checks(codec, temp, rule, vs_live, settings, ck)
    return out


def live_checks(codec: Codec, temp: float, rule: str, vs_live: dict[str, float], settings, ck: Checks) -> None:
    """The codec's approximation of exact DKD at a temperature the recipe trains at, gated (lossy codecs)."""
    fix = (f"the codec {codec.name} does not serve T={temp:g} (beta {settings.beta:g}): re-dump with --codec auto "
           f"--temperature {temp:g} (or a larger codec), or train at a temperature it serves")
    for what, figure, tol, ok in (
            ("median gradient cosine", vs_live["cos_median"], settings.live_cosine_tol,
             vs_live["cos_median"] >= settings.live_cosine_tol),
            ("5th-percentile gradient cosine", vs_live["cos_p5"], settings.live_p5_tol,
             vs_live["cos_p5"] >= settings.live_p5_tol),
            ("relative error", vs_live["rel_err"], settings.live_loss_tol, vs_live["rel_err"] <= settings.live_loss_tol)):
        ck.check(f"loss: DKD T={temp:g} {rule} {what} vs live exact", bool(ok), figure, tol,
                 detail="" if ok else fix)


# --------------------------------------------------------------------------------------------- renderer drift
def renderer_drift(teacher, student, images_a: torch.Tensor, images_b: torch.Tensor, z_a: torch.Tensor,
                   y: torch.Tensor, meta, s, device: torch.device, policy) -> dict[str, Any]:
    """What training with renderer B against this cache (rendered with A) costs: pixel and teacher-logit drift
    between the two renderings, and the per-sample cosine between the full-logit DKD gradient (w.r.t. the student
    logits) the student gets from the cache, DKD(s_B, z_A), and the one a cache rendered with B would give,
    DKD(s_B, z_B). Reported, not judged (no tolerance: a switch is the user's call)."""
    z_b = logits_of(teacher, images_b, meta.recipe, device, s.batch_size, policy)
    s_b = logits_of(student, images_b, meta.recipe, device, s.batch_size, FP32)
    pix = (images_a.int() - images_b.int()).abs().float()
    dz = (z_a - z_b).abs()
    out: dict[str, Any] = {"cache_renderer": meta.renderer.name, "other_renderer": s.renderer,
                           "pixels": {"max_abs": float(pix.max()), "mean_abs": float(pix.mean())},
                           "teacher_logits": {"max_abs": float(dz.max()), "median_abs": float(dz.median())}}
    for temp in meta.temperatures:
        res = compare(lambda x: dkd_loss(x, z_a, y, s.alpha, s.beta, temp),
                      lambda x: dkd_loss(x, z_b, y, s.alpha, s.beta, temp), s_b)
        out[f"grad_T{temp:g}"] = {k: res[k] for k in ("rel_err", "cos_median", "cos_p5", "cos_min")}
    return out
