"""verify's training-parity phase: the same student trained for a few steps with train.train_step (training's own
step) from the cache's entries and from the reference (live logits for fp32, else the ideal cache), same start.

Training a network is chaotic at the bit level: a one-ulp change of the teacher's logits grows step by step
(measured here: ResNet-18, 32 px, batch 16, lr 0.01 - 1e-7 relative after one step, 3e-2 in the loss after 5).
So the gated figures are those of the first step, which hold no chaos yet: the first loss and the first weight
update, relative. The whole curves and final weights are reported, beside a noise floor: the reference run
again with its teacher logits moved one ulp, which shows how far float rounding alone carries the run.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
from typing import Any

import numpy as np
import torch

from .logit_codecs import Codec, FloatCodec
from .teacher import build_model
from .teacher_signal import Storage, encode_entries, policy_scope
from .train import train_step
from .verify_fidelity import FP32, Fidelity, loss_of
from .verify_report import Checks, PhaseResult
from .views import normalize


def parity_phase(codec: Codec, meta, fid: Fidelity, images: torch.Tensor, y: torch.Tensor, settings,
                 device: torch.device) -> PhaseResult:
    """train_steps SGD steps from the cache against the reference, from the student the loss was measured with
    (the checkpoint's weights, else a ResNet-18 seeded with settings.seed)."""
    t0 = time.perf_counter()
    ck = Checks()
    if settings.student:
        base = copy.deepcopy(fid.student)
    else:
        torch.manual_seed(settings.seed)
        base = build_model("resnet18", meta.num_classes).to(device).to(memory_format=torch.channels_last)
    with policy_scope(FP32):
        figures = {"train": _train_parity(codec, meta, fid, base, images, y, settings, device, ck)}
    return ck.done("parity", figures, {"train": time.perf_counter() - t0})


def skipped_parity() -> PhaseResult:
    """Training parity was asked for but no entry could be compared: a failed check, never a silent skip."""
    ck = Checks()
    ck.check("train: parity run", False, detail="skipped: no entry could be compared")
    return ck.done("parity")


def _params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().cpu().ravel() for p in model.parameters()])


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Run:
    losses: list[float]
    first: torch.Tensor  # parameters after the first step
    final: torch.Tensor  # parameters after the last step


def _train_run(student: torch.nn.Module, images: torch.Tensor, y: torch.Tensor, recipe, kd_fn,
               settings, device: torch.device, mix: dict[str, torch.Tensor]) -> _Run:
    """train_steps steps of train.train_step (SGD, momentum 0.9, CE + kd_fn, KD weight 1) on batches of the
    entries taken in order, cyclically; mixed views (mix: their "mix/lam", "mix/label") with the mixed CE."""
    model = copy.deepcopy(student).train().requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=settings.train_lr, momentum=0.9)
    n, b = images.shape[0], min(settings.train_batch, images.shape[0])
    losses, first = [], None
    for step in range(settings.train_steps):
        rows = torch.arange(step * b, step * b + b) % n
        loss, _, _ = train_step(model, opt, normalize(images[rows].to(device), recipe), y[rows].to(device),
                                functools.partial(kd_fn, rows=rows), kd_factor=1.0, ce_weight=1.0,
                                entries={k: v[rows].to(device) for k, v in mix.items()})
        losses.append(float(loss))
        if first is None:
            first = _params(model)
    return _Run(losses=losses, first=first, final=_params(model))


def _run_diff(a: _Run, b: _Run, theta0: torch.Tensor) -> dict[str, float]:
    """Run a against reference b: first step (no chaos yet) and whole run."""
    la, lb = np.asarray(a.losses), np.asarray(b.losses)
    first_update = float((b.first - theta0).norm())
    return {"first_loss_rel_diff": float(abs(la[0] - lb[0]) / max(abs(lb[0]), 1e-12)),
            "first_update_rel_diff": float((a.first - b.first).norm()) / max(first_update, 1e-300),
            "max_abs_loss_diff": float(np.abs(la - lb).max()),
            "max_rel_loss_diff": float((np.abs(la - lb) / np.maximum(np.abs(lb), 1e-12)).max()),
            "param_distance": float((a.final - b.final).norm()),
            "param_rel_to_norm": float((a.final - b.final).norm()) / max(float(b.final.norm()), 1e-300),
            "param_rel_to_moved": float((a.final - b.final).norm()) / max(float((b.final - theta0).norm()), 1e-300)}


def _one_ulp(z: torch.Tensor, seed: int) -> torch.Tensor:
    """z with every logit moved one float32 ulp up or down at random: the size of a re-computation's rounding."""
    g = torch.Generator().manual_seed(seed)
    up = torch.rand(z.shape, generator=g) < 0.5
    return torch.nextafter(z, torch.where(up, torch.full_like(z, math.inf), torch.full_like(z, -math.inf)))


def _train_parity(codec: Codec, meta, fid: Fidelity, student, images, y, settings, device: torch.device,
                  ck: Checks) -> dict[str, Any]:
    temp, rule = meta.temperatures[0], "uniform"
    lossless = isinstance(codec, FloatCodec) and codec.dtype == "fp32"

    def kd(fn):
        return lambda lg, rows: fn(lg, temp, rule, rows)

    theta0 = _params(student)
    # the reference: live logits in exact storage (train's live mode) for fp32, else through the codec (ideal cache)
    storage = Storage.exact(meta.num_classes, meta.temperatures) if lossless else fid.losses.storage
    noisy = encode_entries(_one_ulp(fid.z, settings.seed), y, storage, labels_b=fid.mix.get("mix/label"))
    noisy_fn = loss_of({**noisy, **fid.mix}, storage, y, settings)
    ref_fn = fid.losses.live if lossless else fid.losses.ideal
    run = lambda fn: _train_run(student, images, y, meta.recipe, kd(fn), settings, device, fid.mix)  # noqa: E731
    cache_run, ref_run, noisy_run = run(fid.losses.stored), run(ref_fn), run(noisy_fn)
    ref_name = "live" if lossless else "ideal cache"
    vs_ref = _run_diff(cache_run, ref_run, theta0)
    out = {"steps": settings.train_steps, "batch": min(settings.train_batch, images.shape[0]),
           "temperature": temp, "rule": None if codec.decodes_full else rule, "lr": settings.train_lr,
           "reference": ref_name, "losses_cache": cache_run.losses, "losses_reference": ref_run.losses,
           "vs_reference": vs_ref, "noise_floor": _run_diff(noisy_run, ref_run, theta0)}
    if lossless:
        out["losses_live"] = ref_run.losses
    else:
        live_run = run(fid.losses.live)
        out["losses_live"] = live_run.losses
        out["vs_live"] = _run_diff(cache_run, live_run, theta0)
    tol = settings.parity_tol
    ck.check(f"train: first-step loss, cache vs {ref_name} (relative)", vs_ref["first_loss_rel_diff"] <= tol,
             vs_ref["first_loss_rel_diff"], tol)
    ck.check(f"train: first weight update, cache vs {ref_name} (relative)", vs_ref["first_update_rel_diff"] <= tol,
             vs_ref["first_update_rel_diff"], tol)
    return out
