"""The one teacher-signal path shared by dump-teacher, train-student (cached and live) and verify.

Three steps, each in one place:

1. `teacher_forward`: the teacher's logits under a recorded `ComputePolicy` (device type, bf16 autocast or not,
   TF32 on or off). The TF32 switches are set for the forward and restored after it (`policy_scope`), never left
   set for the rest of the process.
2. `encode_entries`: logits -> what a cache stores per (view, sample) entry: the codec's arrays, the exact target
   logit and the log-partition lse(z / T) at every cached temperature. The names are the cache's array names
   ("logits/target", "logits/lse", "logits/<codec array>"), which are also the loader's batch entries.
3. `dkd_from_entries`: a batch of entries (+ student logits, labels) -> the DKD loss. Training uses it for every
   batch; verify computes its reference with it too.

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

from .errors import ConfigError
from .logit_codecs import Codec, FloatCodec
from .loss import REDUCTIONS, dkd_loss, dkd_loss_topk

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


def lse_at(logits: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """(B, T) float32 logsumexp(z / T) at each temperature."""
    t = torch.tensor([float(x) for x in temperatures], dtype=torch.float32, device=logits.device)
    return torch.logsumexp(logits.float()[:, None, :] / t[None, :, None], dim=2)


def encode_entries(logits: torch.Tensor, labels: torch.Tensor, storage: Storage) -> dict[str, torch.Tensor]:
    """What is stored for each row: {"logits/target": (B,), "logits/lse": (B, T), "logits/<array>": (B, ...)}.

    Target and lse stay on the logits' device; exact storage keeps the logits there too ("logits/full"), a codec's
    arrays come back on the CPU (the cache writes them)."""
    z = logits.float()
    if z.dim() != 2 or z.shape[1] != storage.num_classes:
        raise ConfigError(f"logits must be (batch, {storage.num_classes}), got {tuple(z.shape)}")
    labels = labels.to(z.device).long()
    out = {TARGET: z.gather(1, labels[:, None])[:, 0], LSE: lse_at(z, storage.temperatures)}
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
    reduction "mean": float32 scalar, the batch mean; "none": (B,) per-sample losses."""
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    device = student_logits.device
    arrays = {name.split("/", 1)[1]: torch.as_tensor(v).to(device, non_blocking=True) for name, v in entries.items()
              if name.startswith("logits/") and name not in (TARGET, LSE)}
    labels = labels.to(device)
    decoded = storage.codec.decode(arrays, storage.num_classes)
    if decoded.full is not None:
        target_logit = torch.as_tensor(entries[TARGET]).to(device).float()
        full = decoded.full.scatter(1, labels.long().view(-1, 1), target_logit.view(-1, 1))
        if float(temperature) not in storage.temperatures:
            return dkd_loss(student_logits, full, labels, alpha, beta, temperature, reduction=reduction)
        lse = torch.as_tensor(entries[LSE]).to(device)[:, storage.temperature_index(temperature)]
        return dkd_loss(student_logits, full, labels, alpha, beta, temperature, reduction=reduction,
                        target_logit=target_logit, teacher_lse=lse)
    ti = storage.temperature_index(temperature)
    lse = torch.as_tensor(entries[LSE]).to(device)[:, ti]
    target_logit = torch.as_tensor(entries[TARGET]).to(device)
    return dkd_loss_topk(student_logits, decoded.topk_idx, decoded.topk_val, target_logit, lse, labels,
                         alpha, beta, temperature, rule=rule, reduction=reduction)
