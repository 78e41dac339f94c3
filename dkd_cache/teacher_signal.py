"""The one teacher-signal path shared by dump-teacher, train-student (cached and live) and verify.

Three steps, each in one place:

1. `teacher_forward`: the teacher's logits under a recorded `ComputePolicy` (device type, bf16 autocast or not,
   TF32 on or off). The TF32 switches are set for the forward and restored after it (`policy_scope`), never left
   set for the rest of the process.
2. `encode_entries`: logits -> what a cache stores per (view, sample) entry: the codec's arrays, the exact target
   logit and the log-partition lse(z / T) at every cached temperature. The names are the cache's array names
   ("logits/target", "logits/lse", "logits/<codec array>"), which are also the loader's batch entries.
3. `dkd_from_entries`: a batch of entries (+ student logits, labels) -> the DKD loss. Training uses it for every
   batch; verify computes its reference with it too. `ce_from_entries` is the batch's cross-entropy.

Mixed views (mixup, cutmix): a batch whose entries carry "mix/lam" (the own sample's share, 1.0 unmixed) and
"mix/label" (the partner's label) also carries "logits/target_b", the teacher's exact logit of the partner's label
(`encode_entries(..., labels_b=)`). Its losses are lam * loss(target a) + (1 - lam) * loss(target b) on the same
teacher logits and lse (loss.mix_losses). A batch without "mix/lam" is computed exactly as before mixing existed.

`Storage` says how entries are stored: a cache's codec (`Storage.of_cache`) or exact storage (`Storage.exact`:
every logit in float32, kept on the logits' device). Live training is `encode_entries` with exact storage followed
by `dkd_from_entries`, so live and cached training differ by the codec alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError
from .logit_codecs import Codec, FloatCodec
from .loss import REDUCTIONS, dkd_loss, dkd_loss_topk, mix_losses, mixed_cross_entropy

AMPS = ("none", "bf16")
DEVICE_TYPES = ("cpu", "cuda")


# --------------------------------------------------------------------------------------------- compute policy
@dataclasses.dataclass(frozen=True, kw_only=True)
class ComputePolicy:
    """How the teacher's logits are computed; recorded in the cache so that verify recomputes them the same way."""

    device: str = "cpu"  # device type: "cpu" | "cuda"
    amp: str = "none"  # "none" (float32) | "bf16" (bfloat16 autocast)
    tf32: bool = False  # TF32 convolutions and matmuls on CUDA; False: fp32 means fp32

    def __post_init__(self) -> None:
        if self.device not in DEVICE_TYPES:
            raise ConfigError(f"compute device must be one of {DEVICE_TYPES}, got {self.device!r}")
        if self.amp not in AMPS:
            raise ConfigError(f"compute amp must be one of {AMPS}, got {self.amp!r}")
        if not isinstance(self.tf32, bool):
            raise ConfigError(f"compute tf32 must be true or false, got {self.tf32!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "amp": self.amp, "tf32": self.tf32}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ComputePolicy":
        if not isinstance(d, Mapping):
            raise ConfigError(f"compute policy must be a table, got {d!r}")
        unknown = sorted(set(d) - {"device", "amp", "tf32"})
        if unknown:
            raise ConfigError(f"compute policy has unknown fields {unknown}")
        return cls(device=d.get("device", "cpu"), amp=d.get("amp", "none"), tf32=d.get("tf32", False))


def resolve_policy(device: torch.device | str, amp: str | None) -> ComputePolicy:
    """The policy for a teacher on `device`: amp None means bf16 on CUDA, float32 on CPU; TF32 always off."""
    dev = torch.device(device).type
    if dev not in DEVICE_TYPES:
        raise ConfigError(f"device must be cpu or cuda, got {device!r}")
    return ComputePolicy(device=dev, amp=amp or ("bf16" if dev == "cuda" else "none"), tf32=False)


@contextlib.contextmanager
def policy_scope(policy: ComputePolicy) -> Iterator[None]:
    """TF32 switches as the policy says for the duration, restored afterwards (also on error)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = policy.tf32
    torch.backends.cuda.matmul.allow_tf32 = policy.tf32
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def teacher_forward(model: torch.nn.Module, x: torch.Tensor, policy: ComputePolicy) -> torch.Tensor:
    """float32 (B, C) logits of a frozen model on a normalised batch, under the policy (inference mode).

    The policy's device is a record of where a cache was computed: the forward runs on x's device (verify may
    recompute a CUDA cache on the CPU, under the same amp). The result is a normal tensor (not an inference
    tensor), usable in a loss that is differentiated."""
    with policy_scope(policy), torch.inference_mode(), \
            torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=policy.amp == "bf16"):
        logits = model(x)
    return logits.float().clone()


# --------------------------------------------------------------------------------------------- storage
@dataclasses.dataclass(frozen=True, kw_only=True)
class Storage:
    """How teacher signal entries are stored: a codec, for a number of classes, with lse at these temperatures."""

    codec: Codec
    num_classes: int
    temperatures: tuple[float, ...]

    @classmethod
    def of_cache(cls, cache: Any) -> "Storage":
        """The storage of a cache: an open Cache (its `codec` property when it has one: a codec with fitted
        parameters stored in the cache) or its CacheMeta."""
        meta = getattr(cache, "meta", cache)
        codec = getattr(cache, "codec", None) if cache is not meta else None
        if not isinstance(codec, Codec):
            codec = meta.codec  # the spec; a learned codec without its arrays (an open Cache adds them)
        return cls(codec=codec, num_classes=meta.num_classes, temperatures=tuple(meta.temperatures))

    @classmethod
    def exact(cls, num_classes: int, temperatures: Sequence[float]) -> "Storage":
        """Every logit in float32: the reference of verify, and live training."""
        return cls(codec=EXACT, num_classes=num_classes, temperatures=tuple(float(t) for t in temperatures))

    @property
    def is_exact(self) -> bool:
        return self.codec == EXACT

    def temperature_index(self, temperature: float) -> int:
        try:
            return self.temperatures.index(float(temperature))
        except ValueError:
            raise ConfigError(f"temperature {temperature} is not stored (stored: {list(self.temperatures)})") from None


EXACT = FloatCodec(dtype="fp32")
TARGET, LSE = "logits/target", "logits/lse"
TARGET_B = "logits/target_b"  # the exact logit of the partner's label (mixed views)
MIX_LAM, MIX_LABEL = "mix/lam", "mix/label"  # the own sample's share of a mixed view, and the partner's label


def lse_at(logits: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """(B, T) float32 logsumexp(z / T) at each temperature."""
    t = torch.tensor([float(x) for x in temperatures], dtype=torch.float32, device=logits.device)
    return torch.logsumexp(logits.float()[:, None, :] / t[None, :, None], dim=2)


def encode_entries(logits: torch.Tensor, labels: torch.Tensor, storage: Storage,
                   labels_b: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What is stored for each row: {"logits/target": (B,), "logits/lse": (B, T), "logits/<array>": (B, ...)}, and
    with labels_b (the partner labels of mixed views; the own label on an unmixed row) "logits/target_b": (B,), the
    exact logit of each row's partner label.

    Target and lse stay on the logits' device; exact storage keeps the logits there too ("logits/full"), a codec's
    arrays come back on the CPU (the cache writes them)."""
    z = logits.float()
    if z.dim() != 2 or z.shape[1] != storage.num_classes:
        raise ConfigError(f"logits must be (batch, {storage.num_classes}), got {tuple(z.shape)}")
    labels = labels.to(z.device).long()
    out = {TARGET: z.gather(1, labels[:, None])[:, 0], LSE: lse_at(z, storage.temperatures)}
    if labels_b is not None:
        labels_b = labels_b.to(z.device).long()
        if labels_b.shape != labels.shape:
            raise ConfigError(f"labels_b {tuple(labels_b.shape)} must have the labels' shape {tuple(labels.shape)}")
        out[TARGET_B] = z.gather(1, labels_b[:, None])[:, 0]
    if storage.is_exact:
        out["logits/full"] = z
    else:
        for name, values in storage.codec.encode(z).items():
            out[f"logits/{name}"] = torch.from_numpy(np.ascontiguousarray(values))
    return out


def select_rows(entries: Mapping[str, torch.Tensor], rows: Any) -> dict[str, torch.Tensor]:
    """The entries of some rows (an index tensor, a slice or a mask)."""
    return {k: v[rows] for k, v in entries.items()}


# --------------------------------------------------------------------------------------------- the loss
def dkd_from_entries(student_logits: torch.Tensor, labels: torch.Tensor, entries: Mapping[str, Any],
                     storage: Storage, *, alpha: float, beta: float, temperature: float, rule: str = "uniform",
                     reduction: str = "mean") -> torch.Tensor:
    """DKD of the student logits against a batch of stored entries (see `encode_entries` for their names).

    Codecs that decode every logit give DKD on the decoded logits with TCKD exact: the stored target logit replaces
    the decoded one, and at a stored temperature the stored lse gives p_t = exp(z_t / T - lse) exactly (at another
    temperature the lse comes from the decoded non-target logits and the exact z_t); NCKD reads only the decoded
    non-target logits. Top-k codecs give the cached form (loss.dkd_loss_topk with `rule`), which needs lse at
    `temperature` among the stored temperatures.
    Mixed views (entries with "mix/lam", "mix/label" and "logits/target_b"): per row lam * DKD(target a) +
    (1 - lam) * DKD(target b) on the same teacher logits, with both exact target logits in place of the decoded
    ones (a full decode gets both; a top-k entry of either class takes its exact value) and the one stored lse.
    reduction "mean": float32 scalar, the batch mean; "none": (B,) per-sample losses."""
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    device = student_logits.device
    arrays = {name.split("/", 1)[1]: torch.as_tensor(v).to(device, non_blocking=True) for name, v in entries.items()
              if name.startswith("logits/") and name not in (TARGET, LSE, TARGET_B)}
    labels = labels.to(device)
    decoded = storage.codec.decode(arrays, storage.num_classes)
    hp = dict(alpha=alpha, beta=beta, temperature=temperature, rule=rule)
    target_logit = torch.as_tensor(entries[TARGET]).to(device)
    lse = torch.as_tensor(entries[LSE]).to(device)
    if MIX_LAM not in entries:  # not mixed: one target, exactly as before mixing existed
        if decoded.full is not None:
            full = decoded.full.scatter(1, labels.long().view(-1, 1), target_logit.float().view(-1, 1))
            return _dkd_one(student_logits, full, None, labels, target_logit, lse, storage, reduction, **hp)
        return _dkd_one(student_logits, None, (decoded.topk_idx, decoded.topk_val), labels, target_logit, lse,
                        storage, reduction, **hp)
    lam, labels_b, target_b = mix_entries(entries, device, labels.shape[0])
    targets = ((labels.long(), target_logit.float()), (labels_b, target_b))
    full, topk = decoded.full, None
    if full is not None:  # both exact target logits in place of the decoded ones
        for y, z_y in targets:
            full = full.scatter(1, y.view(-1, 1), z_y.view(-1, 1))
    else:
        idx, val = decoded.topk_idx, decoded.topk_val.float()
        for y, z_y in targets:
            val = torch.where(idx == y.view(-1, 1), z_y.view(-1, 1), val)
        topk = (idx, val)
    per_row = mix_losses(*(_dkd_one(student_logits, full, topk, y, z_y, lse, storage, "none", **hp)
                           for y, z_y in targets), lam)
    return per_row if reduction == "none" else per_row.mean()


def _dkd_one(student_logits: torch.Tensor, full: torch.Tensor | None, topk: tuple[torch.Tensor, torch.Tensor] | None,
             target: torch.Tensor, target_logit: torch.Tensor, lse: torch.Tensor, storage: Storage, reduction: str, *,
             alpha: float, beta: float, temperature: float, rule: str) -> torch.Tensor:
    """DKD against one target: on full teacher logits (TCKD from the exact target logit and the stored lse at a
    stored temperature), or the cached top-k form (topk = (classes, logits))."""
    if full is not None:
        if float(temperature) not in storage.temperatures:
            return dkd_loss(student_logits, full, target, alpha, beta, temperature, reduction=reduction)
        return dkd_loss(student_logits, full, target, alpha, beta, temperature, reduction=reduction,
                        target_logit=target_logit.float(), teacher_lse=lse[:, storage.temperature_index(temperature)])
    ti = storage.temperature_index(temperature)
    return dkd_loss_topk(student_logits, topk[0], topk[1], target_logit, lse[:, ti], target, alpha, beta,
                         temperature, rule=rule, reduction=reduction)


def mix_entries(entries: Mapping[str, Any], device: torch.device | str, batch: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lam float32, partner labels int64, partner target logits float32) of a mixed batch's entries, on `device`.
    A batch with "mix/lam" needs "mix/label" and "logits/target_b" too: ConfigError naming what is missing."""
    missing = [k for k in (MIX_LABEL, TARGET_B) if k not in entries]
    if missing:
        raise ConfigError(f"a mixed batch (its entries have {MIX_LAM!r}) needs {missing} as well: the partner's label "
                          f"and its exact teacher logit (a cache dumped with a mixing recipe stores {TARGET_B!r}; "
                          f"a LiveTeacher computes it when given labels_b)")
    out = tuple(torch.as_tensor(entries[k]).to(device) for k in (MIX_LAM, MIX_LABEL, TARGET_B))
    for name, x in zip((MIX_LAM, MIX_LABEL, TARGET_B), out):
        if x.shape != (batch,):
            raise ConfigError(f"entry {name!r} must have shape ({batch},) (one value per row), got {tuple(x.shape)}")
    return out[0].float(), out[1].long(), out[2].float()


def ce_from_entries(logits: torch.Tensor, labels: torch.Tensor, entries: Mapping[str, Any],
                    reduction: str = "mean") -> torch.Tensor:
    """The batch's cross-entropy: plain F.cross_entropy(logits, labels), or for a mixed batch (entries with
    "mix/lam" and "mix/label") lam * CE(labels) + (1 - lam) * CE(partner labels) (loss.mixed_cross_entropy).
    reduction "mean" (the batch mean) or "none" (per row)."""
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if MIX_LAM not in entries:
        return F.cross_entropy(logits, labels, reduction=reduction)
    if MIX_LABEL not in entries:
        raise ConfigError(f"a mixed batch (its entries have {MIX_LAM!r}) needs {MIX_LABEL!r} (the partner's label) "
                          "as well")
    return mixed_cross_entropy(logits, labels, torch.as_tensor(entries[MIX_LABEL]),
                               torch.as_tensor(entries[MIX_LAM]), reduction=reduction)
