"""Codecs that store one view's teacher logit vector compactly in the cache.

A codec is a frozen dataclass. `arrays(C)` names the arrays it stores and their per-entry shape and dtype (the cache
stores each as (views, rows) + shape); `encode` turns a batch of float32 logits (B, C) into those arrays (numpy,
leading dim B); `decode` turns them back (torch, vectorised, on the tensors' device) into a `Decoded`: either full
logits (B, C) float32, or top-k classes (B, k) long and their logits (B, k) float32. The exact target logit and the
exact lse(z/T) per temperature are stored by the cache beside the codec's arrays, not by the codec.

| spec          | arrays (per entry)                                                      | decodes to | error bound |
|---------------|-------------------------------------------------------------------------|------------|-------------|
| `fp32`        | full (C,) float32                                                       | full       | 0 (bit-exact) |
| `fp16`        | full (C,) float16                                                       | full       | max(abs(x) 2^-11, 2^-25) |
| `q8`          | lo, scale () float32; codes (C,) uint8                                  | full       | scale/2 + 8 eps32 m |
| `topk:K`      | topk_idx (K,) int16 (int32 if C > 32767); topk_val (K,) float16         | top-k      | fp16 bound on the K entries |
| `topk:K+qB`   | as topk:K, plus tail_lo, tail_scale () float32; tail_codes (ceil((C-K)B/8),) uint8 | full | fp16 on the top K, scale/2 + 8 eps32 m on the rest |
| `lowrank:R+top:M+sparse:K` | coef (R,) uint8; top_scale () float16, top_codes (ceil(M/2),) uint8; sparse_idx (K,) int16, sparse_scale () float16, sparse_codes (K,) uint8 | full | none a priori: the row's largest round-trip error |

Quantisation (B bits, per row over the quantised values x): lo = min x, scale = (max x - lo) / (2^B - 1),
code = round((x - lo) / scale) (nearest level), decoded value lo + code * scale. A row with max = min stores
scale 0 and code 1 everywhere, and decodes exactly. No codec writes a row of unsigned codes that is all zero (the
cache's fill value for unsigned arrays): quantised rows hold code 2^B - 1 at their maximum (or 1 when constant),
the learned codec's codes are offset (code + 128, code + 8) so that 0 never occurs. m = max(abs(lo), abs(max x)); the 8 eps32 m term (eps32 = 2^-23) covers float32 rounding.
The tail of `topk:K+qB` is the C-K classes outside the top-k in increasing class order; codes are packed
little-endian, 8/B per byte (the first value in the lowest bits), each row padded with zero bits to a whole byte.
`lowrank` is learned: `fit` on calibration logits gives it a basis (LowRankBasis, stored once per cache as
`state_arrays`, its SHA-256 in the codec's record); see LowRankCodec.
`decode` trusts the class count it is given (the cache's metadata): it checks every array's shape against it, but
C and C+1 can share a packed row length. Top-k values are sorted descending. Logits must be finite, and within
float16 range (|x| <= 65504) for codecs that store float16.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from .errors import CacheError, CacheMismatchError, ConfigError

_EPS32 = float(np.finfo(np.float32).eps)  # 2^-23
_FP16_MAX = 65504.0
_FP16_REL = 2.0 ** -11   # half an ulp, relative, for normal float16 numbers
_FP16_ABS = 2.0 ** -25   # half the smallest subnormal spacing
TAIL_BITS = (2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Decoded:
    """A decoded batch: `full` (B, C) float32 logits, or `topk_idx` (B, k) long and `topk_val` (B, k) float32."""

    full: torch.Tensor | None = None
    topk_idx: torch.Tensor | None = None
    topk_val: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.full is None) == (self.topk_idx is None) or (self.topk_idx is None) != (self.topk_val is None):
            raise ValueError("Decoded holds either full logits or top-k indices and values")

    @property
    def is_full(self) -> bool:
        return self.full is not None


# --------------------------------------------------------------------------------------------- bit packing
def packed_length(n: int, bits: int) -> int:
    """Bytes per row for n values of `bits` bits."""
    return (n * bits + 7) // 8


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack (B, n) integer codes < 2^bits into (B, ceil(n bits / 8)) uint8, little-endian within each byte."""
    if bits not in TAIL_BITS:
        raise ConfigError(f"bits must be one of {TAIL_BITS}, got {bits!r}")
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ConfigError(f"codes must have shape (B, n), got {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ConfigError(f"codes must lie in [0, {1 << bits}) for {bits} bits")
    codes = codes.astype(np.uint8, copy=False)
    if bits == 8:
        return np.ascontiguousarray(codes)
    per = 8 // bits
    b, n = codes.shape
    nb = packed_length(n, bits)
    padded = codes
    if n != nb * per:
        padded = np.zeros((b, nb * per), dtype=np.uint8)
        padded[:, :n] = codes
    out = padded[:, 0::per].copy()  # code j of a byte sits at bits j*bits .. j*bits + bits - 1
    for j in range(1, per):
        out |= padded[:, j::per] << np.uint8(j * bits)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits in torch: (B, nbytes) uint8 -> (B, n) uint8, on packed's device."""
    if bits not in TAIL_BITS:
        raise ConfigError(f"bits must be one of {TAIL_BITS}, got {bits!r}")
    packed = torch.as_tensor(packed)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != packed_length(n, bits):
        raise CacheError(f"packed codes must be uint8 of shape (B, {packed_length(n, bits)}), "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    # one vectorised op per position within a byte (at most 4), not per row
    vals = torch.stack([(packed >> shift) & mask for shift in range(0, 8, bits)], dim=-1)
    return vals.reshape(packed.shape[0], packed.shape[1] * (8 // bits))[:, :n]


# --------------------------------------------------------------------------------------------- helpers
def _as_logits(logits: Any) -> torch.Tensor:
    x = torch.as_tensor(logits)
    if x.dim() != 2 or not x.is_floating_point():
        raise ConfigError(f"logits must be a floating-point array of shape (batch, classes), "
                          f"got {x.dtype} {tuple(x.shape)}")
    x = x.detach().float()
    if x.numel() and not bool(torch.isfinite(x.abs().amax())):  # amax propagates NaN; one cheap reduction
        raise ConfigError("logits hold NaN or infinite values; the teacher output is unusable")
    return x


def _check_fp16_range(x: torch.Tensor, what: str) -> None:
    if x.numel() and float(x.abs().max()) > _FP16_MAX:
        raise ConfigError(f"{what}: a logit exceeds the float16 range (|x| <= 65504); use the fp32 codec")


def _quantise(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, n) float32 -> lo (B,) float32, scale (B,) float32, codes (B, n) uint8 (nearest level)."""
    levels = (1 << bits) - 1
    lo = x.min(axis=1)
    hi = x.max(axis=1)
    scale = ((hi - lo) / np.float32(levels)).astype(np.float32)
    if not np.isfinite(scale).all():
        raise ConfigError("logit range overflows float32; use the fp32 codec")
    safe = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    codes = np.clip(np.rint((x - lo[:, None]) / safe[:, None]), 0, levels).astype(np.uint8)
    # A constant row (scale 0) decodes to lo whatever its codes: it stores code 1, so that no row of codes is all
    # zero, the cache's fill value for unsigned arrays (a lost inner chunk reads back as detectable, cache.py).
    codes[scale == 0] = 1
    return lo.astype(np.float32), scale, codes


def _dequantise(codes: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # float() makes a fresh tensor, so the affine map can run in place (two passes instead of three allocations)
    return codes.float().mul_(scale.float().unsqueeze(1)).add_(lo.float().unsqueeze(1))


def _quant_bound(lo: np.ndarray, scale: np.ndarray, hi: np.ndarray) -> np.ndarray:
    m = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64)
    return scale.astype(np.float64) / 2 + 8 * _EPS32 * m


def _fp16_bound(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x.abs().double() * _FP16_REL, min=_FP16_ABS)


def _tensor(arrays: Mapping[str, Any], name: str, device: torch.device | None = None) -> torch.Tensor:
    if name not in arrays:
        raise CacheError(f"codec array {name!r} is missing (have {sorted(arrays)})")
    t = torch.as_tensor(arrays[name])
    return t if device is None else t.to(device)


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise CacheError(f"codec array {name!r} has shape {tuple(t.shape)}, expected {shape}")


def _check_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return int(num_classes)


def _check_fields(d: Any, kind: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise ConfigError(f"codec config must be a mapping, got {type(d).__name__}")
    if d.get("kind") != kind:
        raise ConfigError(f"codec field 'kind' must be {kind!r}, got {d.get('kind')!r}")
    for key in d:
        if key != "kind" and key not in allowed:
            raise ConfigError(f"codec field {key!r} is unknown for codec kind {kind!r} (allowed: {list(allowed)})")
    return d


def _int_field(d: Mapping[str, Any], key: str) -> int:
    if key not in d:
        raise ConfigError(f"codec field {key!r} is missing")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ConfigError(f"codec field {key!r} must be an integer, got {v!r}")
    return int(v)


# --------------------------------------------------------------------------------------------- codecs
class Codec:
    """Base of the codecs. Subclasses are frozen keyword-only dataclasses."""

    kind: ClassVar[str] = ""
    decodes_full: ClassVar[bool] = True
    learned: ClassVar[bool] = False  # True: needs `fit` on calibration logits before it can encode

    @property
    def name(self) -> str:  # the spec string, e.g. "topk:10+q4"
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Codec":
        raise NotImplementedError

    def arrays(self, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        raise NotImplementedError

    def encode(self, logits: torch.Tensor) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode(self, arrays: Mapping[str, Any], num_classes: int) -> Decoded:
        raise NotImplementedError

    def error_bound(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C) float64: the stated bound on |decoded - logits| per entry; inf where the codec stores nothing."""
        raise NotImplementedError

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Arrays the codec itself holds (a fitted basis), stored once per cache under `codec/<name>`."""
        return {}

    def with_state(self, arrays: Mapping[str, Any]) -> "Codec":
        """The codec with its state arrays loaded (as read back from a cache); codecs without state return self."""
        if arrays:
            raise CacheError(f"codec {self.name} holds no state arrays, got {sorted(arrays)}")
        return self

    def bytes_per_entry(self, num_classes: int) -> int:
        """Raw bytes of one (view, sample) entry, before compression."""
        return sum(math.prod(shape) * np.dtype(dt).itemsize for shape, dt in self.arrays(num_classes).values())

    def _check_batch(self, arrays: Mapping[str, Any], num_classes: int) -> tuple[dict[str, torch.Tensor], int]:
        """Every array present with shape (B,) + per-entry shape; all moved to the first array's device."""
        spec = self.arrays(num_classes)
        out: dict[str, torch.Tensor] = {}
        device = None
        for name, (shape, dtype) in spec.items():
            t = _tensor(arrays, name, device)
            device = t.device
            if t.dim() < 1:
                raise CacheError(f"codec array {name!r} has no batch dimension")
            _check_shape(name, t, (t.shape[0], *shape))
            if t.dtype != torch.from_numpy(np.zeros(0, dtype)).dtype:
                raise CacheError(f"codec array {name!r} has dtype {t.dtype}, expected {np.dtype(dtype)}")
            out[name] = t
        batch = {t.shape[0] for t in out.values()}
        if len(batch) != 1:
            raise CacheError(f"codec arrays disagree on the batch size: {sorted(batch)}")
        return out, batch.pop()


@dataclasses.dataclass(frozen=True, kw_only=True)
class FloatCodec(Codec):
    """`fp32` or `fp16`: every logit."""

    dtype: str = "fp16"
    kind: ClassVar[str] = "float"
    _NP: ClassVar[dict[str, Any]] = {"fp16": np.float16, "fp32": np.float32}

    def __post_init__(self) -> None:
        if self.dtype not in self._NP:
            raise ConfigError(f"codec field 'dtype' must be one of {sorted(self._NP)}, got {self.dtype!r}")

    @property
    def name(self) -> str:
        return self.dtype

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FloatCodec":
        d = _check_fields(d, cls.kind, ("dtype",))
        if "dtype" not in d:
            raise ConfigError("codec field 'dtype' is missing")
        if not isinstance(d["dtype"], str):
            raise ConfigError(f"codec field 'dtype' must be a string, got {d['dtype']!r}")
        return cls(dtype=d["dtype"])

    def arrays(self, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {"full": ((_check_classes(num_classes),), np.dtype(self._NP[self.dtype]))}

    def encode(self, logits: torch.Tensor) -> dict[str, np.ndarray]:
        x = _as_logits(logits)
        if self.dtype == "fp16":
            _check_fp16_range(x, "fp16 codec")
        return {"full": x.cpu().numpy().astype(self._NP[self.dtype])}

    def decode(self, arrays: Mapping[str, Any], num_classes: int) -> Decoded:
        t, _ = self._check_batch(arrays, num_classes)
        return Decoded(full=t["full"].float())

    def error_bound(self, logits: torch.Tensor) -> torch.Tensor:
        x = _as_logits(logits)
        return torch.zeros_like(x, dtype=torch.float64) if self.dtype == "fp32" else _fp16_bound(x)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Q8Codec(Codec):
    """`q8`: every logit in 8 bits with a per-row lo and scale."""

    kind: ClassVar[str] = "q8"
    bits: ClassVar[int] = 8

    @property
    def name(self) -> str:
        return "q8"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Q8Codec":
        _check_fields(d, cls.kind, ())
        return cls()

    def arrays(self, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        c = _check_classes(num_classes)
        return {"lo": ((), np.dtype(np.float32)), "scale": ((), np.dtype(np.float32)),
                "codes": ((c,), np.dtype(np.uint8))}

    def encode(self, logits: torch.Tensor) -> dict[str, np.ndarray]:
        x = _as_logits(logits).cpu().numpy()
        _check_classes(x.shape[1])
        lo, scale, codes = _quantise(x, self.bits)
        return {"lo": lo, "scale": scale, "codes": codes}

    def decode(self, arrays: Mapping[str, Any], num_classes: int) -> Decoded:
        t, _ = self._check_batch(arrays, num_classes)
        return Decoded(full=_dequantise(t["codes"], t["lo"], t["scale"]))

    def error_bound(self, logits: torch.Tensor) -> torch.Tensor:
        x = _as_logits(logits)
        enc = self.encode(x)
        bound = _quant_bound(enc["lo"], enc["scale"], x.max(dim=1).values.cpu().numpy())
        return torch.from_numpy(bound).view(-1, 1).expand(x.shape).clone()


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopKCodec(Codec):
    """`topk:K` (tail_bits 0): the K largest logits and their classes. `topk:K+qB`: plus the others in B bits."""

    k: int
    tail_bits: int = 0
    kind: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"codec field 'k' must be an integer >= 1, got {self.k!r}")
        if isinstance(self.tail_bits, bool) or self.tail_bits not in (0, *TAIL_BITS):
            raise ConfigError(f"codec field 'tail_bits' must be 0 (no tail) or one of {TAIL_BITS}, "
                              f"got {self.tail_bits!r}")

    @property
    def decodes_full(self) -> bool:  # type: ignore[override]
        return self.tail_bits > 0

    @property
    def name(self) -> str:
        return f"topk:{self.k}" + (f"+q{self.tail_bits}" if self.tail_bits else "")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "k": self.k, "tail_bits": self.tail_bits}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TopKCodec":
        d = _check_fields(d, cls.kind, ("k", "tail_bits"))
        return cls(k=_int_field(d, "k"), tail_bits=_int_field(d, "tail_bits") if "tail_bits" in d else 0)

    def _check_k(self, num_classes: int) -> int:
        c = _check_classes(num_classes)
        if self.k > c or (self.tail_bits and self.k >= c):
            need = f"< {c} (a tail needs at least one class)" if self.tail_bits else f"<= {c}"
            raise ConfigError(f"codec {self.name}: k must be {need} classes, got {self.k}")
        return c

    @staticmethod
    def index_dtype(num_classes: int) -> np.dtype:
        return np.dtype(np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32)

    def arrays(self, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        c = self._check_k(num_classes)
        out = {"topk_idx": ((self.k,), self.index_dtype(c)), "topk_val": ((self.k,), np.dtype(np.float16))}
        if self.tail_bits:
            out.update({"tail_lo": ((), np.dtype(np.float32)), "tail_scale": ((), np.dtype(np.float32)),
                        "tail_codes": ((packed_length(c - self.k, self.tail_bits),), np.dtype(np.uint8))})
        return out

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(values (B,k) descending, indices (B,k), tail (B, C-k) in class order or None)."""
        self._check_k(x.shape[1])
        val, idx = torch.topk(x, self.k, dim=1, largest=True, sorted=True)
        if not self.tail_bits:
            return val, idx, None
        keep = torch.ones_like(x, dtype=torch.bool).scatter_(1, idx, False)
        return val, idx, x.masked_select(keep).view(x.shape[0], x.shape[1] - self.k)  # row-major: class order

    def encode(self, logits: torch.Tensor) -> dict[str, np.ndarray]:
        x = _as_logits(logits)
        val, idx, tail = self._split(x)
        _check_fp16_range(val, f"codec {self.name}")
        out = {"topk_idx": idx.cpu().numpy().astype(self.index_dtype(x.shape[1])),
               "topk_val": val.cpu().numpy().astype(np.float16)}
        if tail is not None:
            lo, scale, codes = _quantise(tail.cpu().numpy(), self.tail_bits)
            out.update({"tail_lo": lo, "tail_scale": scale, "tail_codes": pack_bits(codes, self.tail_bits)})
        return out

    def decode(self, arrays: Mapping[str, Any], num_classes: int) -> Decoded:
        t, batch = self._check_batch(arrays, num_classes)
        idx = t["topk_idx"].long()
        val = t["topk_val"].float()
        if not self.tail_bits:
            return Decoded(topk_idx=idx, topk_val=val)
        c = num_classes
        codes = unpack_bits(t["tail_codes"], self.tail_bits, c - self.k)
        tail = _dequantise(codes, t["tail_lo"], t["tail_scale"])
        full = torch.empty((batch, c), dtype=torch.float32, device=idx.device)
        keep = torch.ones((batch, c), dtype=torch.bool, device=idx.device).scatter_(1, idx, False)
        full.masked_scatter_(keep, tail)  # fills the kept entries in row-major order: class order per row
        full.scatter_(1, idx, val)
        return Decoded(full=full)

    def error_bound(self, logits: torch.Tensor) -> torch.Tensor:
        x = _as_logits(logits)
        val, idx, tail = self._split(x)
        fill = float("inf")
        if tail is not None:
            lo, scale, _ = _quantise(tail.cpu().numpy(), self.tail_bits)
            fill = 0.0
        bound = torch.full(x.shape, fill, dtype=torch.float64)
        if tail is not None:
            qb = torch.from_numpy(_quant_bound(lo, scale, tail.max(dim=1).values.cpu().numpy()))
            bound = qb.view(-1, 1).expand(x.shape).clone()
        return bound.scatter_(1, idx.cpu(), _fp16_bound(val.cpu()))


# --------------------------------------------------------------------------------------------- learned low rank
_LR_COEF = 127    # coefficient codes in [-127, 127] (int8)
_LR_TOP = 7       # top-M residual codes in [-7, 7] (4 bits, stored + 8)
_LR_SPARSE = 127  # sparse residual codes in [-127, 127] (int8)
_LR_HEADROOM = 1.5  # coefficient range = 1.5 x the largest seen in calibration (unseen views clip less)
_LR_GRID_DIV = 8  # the integer grid is at most 1/8 of the finest coefficient step


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class LowRankBasis:
    """A fitted basis as integers on one grid g, so that decoding is exact integer arithmetic on any device.

    mean (C,) int32, basis (R, C) int8, mult (R,) int32 >= 1, grid g > 0 (a power of two). A view stores R
    codes c_r in [-127, 127]; its approximation is z~_j = g (mean_j + sum_r mult_r c_r basis_rj): every term is an
    integer below 2^53, so float64 arithmetic gives the same integer on every device and in every summation
    order, and the order of the classes by z~ (ties: lower class first) is reproducible bit for bit."""

    mean: np.ndarray
    basis: np.ndarray
    mult: np.ndarray
    grid: float

    def __post_init__(self) -> None:
        m, b, k = self.mean, self.basis, self.mult
        ok = (isinstance(m, np.ndarray) and m.dtype == np.int32 and m.ndim == 1 and isinstance(b, np.ndarray)
              and b.dtype == np.int8 and b.ndim == 2 and b.shape[1] == m.shape[0] and b.shape[0] >= 1
              and isinstance(k, np.ndarray) and k.dtype == np.int32 and k.shape == (b.shape[0],))
        if not ok:
            raise CacheError("a low-rank basis needs mean (C,) int32, basis (R, C) int8 and mult (R,) int32; got "
                             + ", ".join(f"{n} {getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}"
                                         for n, a in (("mean", m), ("basis", b), ("mult", k))))
        if not (k >= 1).all() or not (isinstance(self.grid, float) and math.isfinite(self.grid) and self.grid > 0):
            raise CacheError(f"a low-rank basis needs mult >= 1 and a positive grid, got grid {self.grid!r}")
        bound = (np.abs(m.astype(np.float64)).max() + (k.astype(np.float64) * _LR_COEF * 128).sum())
        if bound * (m.shape[0] + 1) >= 2.0 ** 53:
            raise CacheError("a low-rank basis too large for exact float64 decoding")

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.basis.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "basis": self.basis, "mult": self.mult}

    @property
    def sha256(self) -> str:
        """SHA-256 of the grid and the three arrays (dtype, shape, little-endian bytes): the fit's identity."""
        import hashlib

        h = hashlib.sha256(f"dkd-cache lowrank basis v1 grid={self.grid!r}".encode())
        for name, a in self.arrays().items():
            a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
            h.update(f";{name}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    @functools.cached_property
    def _float64(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """mean, basis, mult as float64 (exact), and the least-squares projection onto the basis rows (C, R)."""
        b = self.basis.astype(np.float64)
        return self.mean.astype(np.float64), b, self.mult.astype(np.float64), np.linalg.solve(b @ b.T, b).T

    @functools.cached_property
    def _float32_blocks(self) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]] | None:
        """mult and basis as float32, and the runs of basis rows whose products with codes sum exactly in float32:
        every term is an integer of at most 127 * mult_r * 128, so a run whose bound stays below 2^24 sums
        exactly in any order. None when a single row is too large for that (float64 throughout then)."""
        limit = 2 ** 24 // (_LR_COEF * 128)
        runs, start, total = [], 0, 0
        for r, m in enumerate(self.mult.tolist()):
            if m > limit:
                return None
            if total + m > limit:
                runs.append((start, r))
                start, total = r, 0
            total += m
        runs.append((start, self.rank))
        return self.mult.astype(np.float32), self.basis.astype(np.float32), runs

    def approx_np(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, R) codes -> (integer scores (B, C) as float64, float32 approximation g * score). The scores are
        exact integers (float32 products summed in runs that stay exact, the runs and the mean in float64), the same
        whatever the arithmetic's order."""
        mean, basis, mult, _ = self._float64
        blocks = self._float32_blocks
        if blocks is None:
            score = mean + (codes.astype(np.float64) * mult) @ basis
        else:
            mult32, basis32, runs = blocks
            weighted = codes.astype(np.float32) * mult32  # |code * mult| < 2^24: exact
            score = np.add(mean, weighted[:, runs[0][0]:runs[0][1]] @ basis32[runs[0][0]:runs[0][1]], dtype=np.float64)
            for a, b in runs[1:]:
                score += weighted[:, a:b] @ basis32[a:b]
        return score, (score * self.grid).astype(np.float32)

    @functools.cached_property
    def _projection32(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mean, _, mult, proj = self._float64
        return (mean * self.grid).astype(np.float32), proj.astype(np.float32), mult * self.grid

    def encode_np(self, x: np.ndarray) -> np.ndarray:
        """(B, C) float32 logits -> (B, R) int8 coefficient codes (least squares in float32, rounded, clipped).
        Any codes decode exactly (approx_np); the projection only picks good ones, so float32 suffices."""
        shift, proj, step = self._projection32
        a = (np.asarray(x, dtype=np.float32) - shift) @ proj
        return np.clip(np.rint(a / step), -_LR_COEF, _LR_COEF).astype(np.int8)


def fit_lowrank_basis(logits: Any, rank: int) -> tuple[LowRankBasis, dict[str, Any]]:
    """Fit a rank-R basis to calibration logits (N, C) by PCA (float64 SVD), as integers on one grid.

    Deterministic for the same logits. Returns the basis and its fit statistics (calibration size, explained
    variance fraction, coefficient ranges, in-sample rms error of the rank-R approximation)."""
    x = _as_logits(logits).cpu().numpy().astype(np.float64)
    n, c = x.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(n, c):
        raise ConfigError(f"a rank-{rank} basis needs at least {rank} calibration views and classes (got {n} views, "
                          f"{c} classes): dump more calibration views (--calibration-views) or choose a smaller rank")
    mu = x.mean(axis=0)
    _, sv, vt = np.linalg.svd(x - mu, full_matrices=False)
    vt = vt[:rank]
    vt *= np.where(vt[np.arange(rank), np.abs(vt).argmax(axis=1)] < 0, -1.0, 1.0)[:, None]  # sign: largest entry > 0
    basis = np.rint(vt / (np.abs(vt).max(axis=1, keepdims=True) / _LR_COEF)).astype(np.int8)
    bf = basis.astype(np.float64)
    coef = (x - mu) @ np.linalg.solve(bf @ bf.T, bf).T  # least squares onto the integer rows
    step = np.maximum(np.abs(coef).max(axis=0) * _LR_HEADROOM / _LR_COEF, 1e-12)
    grid = float(2.0 ** math.floor(math.log2(step.min() / _LR_GRID_DIV)))
    mult = np.maximum(np.rint(step / grid), 1).astype(np.int32)
    fitted = LowRankBasis(mean=np.rint(mu / grid).astype(np.int32), basis=basis, mult=mult, grid=grid)
    _, approx = fitted.approx_np(fitted.encode_np(x.astype(np.float32)))
    var = sv ** 2
    stats = {"calibration_views": int(n), "explained_variance": float(var[:rank].sum() / max(var.sum(), 1e-300)),
             "coef_std": [float(v) for v in coef.std(axis=0)],
             "rms_error": float(np.sqrt(np.mean((approx.astype(np.float64) - x) ** 2)))}
    return fitted, stats


def _rank_keys(score: Any, c: int) -> Any:
    """Distinct integer keys (exact in float64) ordering classes by score, ties towards the lower class."""
    return score * c + (c - 1 - (np.arange(c) if isinstance(score, np.ndarray)
                                 else torch.arange(c, device=score.device, dtype=score.dtype)))


def _order(score: np.ndarray, m: int) -> np.ndarray:
    """The m classes of largest integer score per row, in descending order (ties: lower class first)."""
    c = score.shape[1]
    if score.size and (np.abs(score).max() + 1) * c < 2 ** 31:  # the same integer keys in int32: a faster select
        key = score.astype(np.int32) * np.int32(c) + (c - 1 - np.arange(c, dtype=np.int32))
    else:
        key = _rank_keys(score, c)
    # A key holds its class (key mod c = c - 1 - class), so the m largest keys are found and sorted as values:
    # a value partition and a sort of m per row, no index bookkeeping (an argpartition cost ~4x more).
    np.negative(key, out=key)  # ascending order of -key = descending key
    top = np.sort(np.partition(key, m - 1, axis=1)[:, :m] if m < c else key, axis=1)
    return (c - 1 - np.mod(-top, c)).astype(np.intp)


def _largest(w: np.ndarray, k: int) -> np.ndarray:
    """Per row, the k columns of largest w in increasing column order; ties at the k-th value go to the lower
    columns (the first k of a stable descending sort, sorted): no full sort of the row."""
    n = w.shape[1]
    if k >= n:
        return np.tile(np.arange(n), (len(w), 1))
    if w.dtype == np.float32 and w.size and not (w < 0).any():
        # The bits of a non-negative float32 order like the float; with the column folded in (ties: lower column
        # ranks higher) the keys are distinct, and the k largest are a value partition away, no index bookkeeping.
        key = w.view(np.int32).astype(np.int64) * n + (n - 1 - np.arange(n))
        top = np.partition(key, n - k, axis=1)[:, n - k:]
        return np.sort(n - 1 - np.mod(top, n), axis=1)
    kth = np.partition(w, n - k, axis=1)[:, n - k : n - k + 1]  # the k-th largest value of each row
    keep = w >= kth
    if int(keep.sum()) != k * len(w):  # some row ties at its k-th value: the lowest tied columns first
        above = w > kth
        tied = keep & ~above
        room = k - above.sum(axis=1, keepdims=True)
        keep = above | (tied & (np.cumsum(tied, axis=1) <= room))
    return np.nonzero(keep)[1].reshape(len(w), k)  # row-major: increasing column order per row


def _sym_quantise(r: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, n) float32 residuals -> (scale (B,) float16, codes (B, n) int8 in [-levels, levels])."""
    scale = (np.abs(r).max(axis=1) / np.float32(levels)).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(scale[:, None] > 0, np.rint(r / scale.astype(np.float32)[:, None]), 0)
    return scale, np.clip(codes, -levels, levels).astype(np.int8)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRankCodec(Codec):
    """`lowrank:R+top:M+sparse:K`: a basis fitted once per cache, R coefficients per view, two residual corrections.

    Per view: R coefficient codes in [-127, 127] stored as uint8 code + 128 (the approximation z~ above); the
    residual z - z~ of the M classes ranked highest by z~ (no indices: the decoder ranks z~ exactly as the encoder
    did) in 4 bits (code + 8, packed) with a float16 scale; then the K classes where the remaining residual weighs
    most in the loss (|residual| x softmax(z), chosen by the encoder) as int16 class + residual code + 128 (uint8)
    with a float16 scale. Decodes to the full vector (float32). Stored codes are unsigned so that no real entry
    equals the cache's fill sentinel.
    The basis (`basis`) comes from `fit` on calibration logits, or from a cache (`with_state`); `record` holds
    its SHA-256 and fit statistics and travels in the cache's metadata, so a basis that does not match is refused.
    """

    rank: int
    top: int = 0
    sparse: int = 0
    record: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False)
    basis: LowRankBasis | None = dataclasses.field(default=None, compare=False, repr=False)
    _on_device: dict = dataclasses.field(default_factory=dict, compare=False, repr=False, init=False)
    kind: ClassVar[str] = "lowrank"
    learned: ClassVar[bool] = True

    def __post_init__(self) -> None:
        for field, low in (("rank", 1), ("top", 0), ("sparse", 0)):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"codec field {field!r} must be an integer >= {low}, got {v!r}")
        if self.basis is not None and self.basis.rank > min(self.rank, self.basis.num_classes):
            raise ConfigError(f"codec {self.name}: the basis has rank {self.basis.rank}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LowRankCodec):
            return NotImplemented
        return (self.rank, self.top, self.sparse, self.sha256) == (other.rank, other.top, other.sparse, other.sha256)

    def __hash__(self) -> int:
        return hash((self.rank, self.top, self.sparse, self.sha256))

    @property
    def sha256(self) -> str | None:
        if self.basis is not None:
            return self.basis.sha256
        return None if self.record is None else self.record.get("sha256")

    @property
    def name(self) -> str:
        return f"lowrank:{self.rank}" + (f"+top:{self.top}" if self.top else "") + \
            (f"+sparse:{self.sparse}" if self.sparse else "")

    def spec_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank, "top": self.top, "sparse": self.sparse}

    def to_dict(self) -> dict[str, Any]:
        d = self.spec_dict()
        if self.record is not None:
            d["fit"] = dict(self.record)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LowRankCodec":
        d = _check_fields(d, cls.kind, ("rank", "top", "sparse", "fit"))
        fit = d.get("fit")
        if fit is not None and not (isinstance(fit, Mapping) and isinstance(fit.get("sha256"), str)
                                    and isinstance(fit.get("grid"), float) and isinstance(fit.get("rank"), int)):
            raise ConfigError(f"codec field 'fit' must be a table with 'sha256', 'grid' and 'rank', got {fit!r}")
        return cls(rank=_int_field(d, "rank"), top=_int_field(d, "top") if "top" in d else 0,
                   sparse=_int_field(d, "sparse") if "sparse" in d else 0, record=None if fit is None else dict(fit))

    def fit(self, calibration_logits: Any) -> "LowRankCodec":
        """This codec with a basis fitted to calibration logits (N, C); the record holds its hash and statistics.
        The rank is the spec's (at most the class count), never silently lowered: fewer views than the rank is a
        ConfigError (fit_lowrank_basis)."""
        x = _as_logits(calibration_logits)
        self._check(x.shape[1])
        basis, stats = fit_lowrank_basis(x, self.sizes(x.shape[1])[0])
        return dataclasses.replace(self, basis=basis, record={"sha256": basis.sha256, "grid": basis.grid,
                                                              "rank": basis.rank, **stats})

    def state_arrays(self) -> dict[str, np.ndarray]:
        return self._basis().arrays()

    def with_state(self, arrays: Mapping[str, Any]) -> "LowRankCodec":
        """The codec with the basis read back from a cache; refused unless it matches the recorded SHA-256."""
        if self.record is None:
            raise CacheError(f"codec {self.name} has no fit record; the cache's metadata is incomplete: re-dump it")
        missing = sorted({"mean", "basis", "mult"} - set(arrays))
        if missing:
            raise CacheError(f"codec {self.name}: the basis arrays {missing} are missing from the cache; re-dump it")
        basis = LowRankBasis(**{k: np.asarray(arrays[k]) for k in ("mean", "basis", "mult")},
                             grid=float(self.record["grid"]))
        if basis.sha256 != self.record["sha256"]:
            raise CacheMismatchError(f"codec {self.name}: the stored basis has SHA-256 {basis.sha256[:16]}..., the "
                                     f"cache records {str(self.record['sha256'])[:16]}...; the basis was changed "
                                     "after the dump: re-dump the cache")
        if basis.rank != self.record.get("rank", self.sizes(basis.num_classes)[0]):
            raise CacheError(f"codec {self.name}: the stored basis has rank {basis.rank}")
        return dataclasses.replace(self, basis=basis)

    def _basis(self) -> LowRankBasis:
        if self.basis is None:
            raise ConfigError(f"codec {self.name} has no fitted basis: fit it on calibration logits (dump-teacher "
                              "does) or load it from its cache (Cache.codec)")
        return self.basis

    def sizes(self, num_classes: int) -> tuple[int, int, int]:
        """(rank, top, sparse) for this class count: each at most the class count (a larger one keeps every class),
        so one spec applies to any teacher; the rank is also at most the calibration views it was fitted on (the
        fitted rank, recorded in `record["rank"]`)."""
        c = _check_classes(num_classes)
        rank = self.basis.rank if self.basis is not None else (self.record or {}).get("rank", self.rank)
        return min(rank, c), min(self.top, c), min(self.sparse, c)

    def _check(self, num_classes: int) -> int:
        c = _check_classes(num_classes)
        if self.basis is not None and self.basis.num_classes != c:
            raise ConfigError(f"codec {self.name}: the basis has {self.basis.num_classes} classes, not {c}")
        return c

    def arrays(self, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        c = self._check(num_classes)
        r, m, k = self.sizes(c)
        out = {"coef": ((r,), np.dtype(np.uint8))}
        if m:
            out.update({"top_scale": ((), np.dtype(np.float16)),
                        "top_codes": ((packed_length(m, 4),), np.dtype(np.uint8))})
        if k:
            out.update({"sparse_idx": ((k,), TopKCodec.index_dtype(c)),
                        "sparse_scale": ((), np.dtype(np.float16)),
                        "sparse_codes": ((k,), np.dtype(np.uint8))})
        return out

    def encode(self, logits: torch.Tensor) -> dict[str, np.ndarray]:
        x = _as_logits(logits).cpu().numpy()
        c = self._check(x.shape[1])
        basis = self._basis()
        codes = basis.encode_np(x)
        score, approx = basis.approx_np(codes)
        out = {"coef": (codes.astype(np.int16) + 128).astype(np.uint8)}
        _, m, k = self.sizes(c)
        if m:
            order = _order(score, m)
            resid = np.take_along_axis(x, order, 1) - np.take_along_axis(approx, order, 1)
            scale, q = _sym_quantise(resid, _LR_TOP)
            rows = np.arange(len(x))[:, None]
            approx[rows, order] += q.astype(np.float32) * scale.astype(np.float32)[:, None]  # distinct per row
            out.update({"top_scale": scale, "top_codes": pack_bits((q + 8).astype(np.uint8), 4)})
        if k:
            resid = x - approx
            e = np.exp(x - x.max(axis=1, keepdims=True))
            weight = e / e.sum(axis=1, keepdims=True)
            idx = _largest(np.abs(resid) * weight, k)
            scale, q = _sym_quantise(np.take_along_axis(resid, idx, 1), _LR_SPARSE)
            out.update({"sparse_idx": idx.astype(TopKCodec.index_dtype(c)), "sparse_scale": scale,
                        "sparse_codes": (q.astype(np.int16) + 128).astype(np.uint8)})
        return out

    def _device_basis(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mean, basis, mult as float64 tensors on `device`, moved there once per codec and device."""
        held = self._on_device.get(device)
        if held is None:
            mean, basis, mult, _ = self._basis()._float64
            held = self._on_device[device] = tuple(torch.from_numpy(a).to(device) for a in (mean, basis, mult))
        return held

    def decode(self, arrays: Mapping[str, Any], num_classes: int) -> Decoded:
        t, batch = self._check_batch(arrays, num_classes)
        self._check(num_classes)
        coef = t["coef"]
        mean, basis, mult = self._device_basis(coef.device)
        # exact integers in float64 (see LowRankBasis), on the entries' device
        score = torch.addmm(mean.unsqueeze(0).expand(batch, -1), (coef.double() - 128) * mult, basis)
        full = (score * self._basis().grid).float()
        _, m, k = self.sizes(num_classes)
        if m:
            order = torch.topk(_rank_keys(score, num_classes), m, dim=1, sorted=True).indices  # distinct keys
            q = unpack_bits(t["top_codes"], 4, m).float().sub_(8)
            full.scatter_add_(1, order, q.mul_(t["top_scale"].float().unsqueeze(1)))
        if k:
            q = t["sparse_codes"].float().sub_(128).mul_(t["sparse_scale"].float().unsqueeze(1))
            full.scatter_add_(1, t["sparse_idx"].long(), q)
        return Decoded(full=full)

    def error_bound(self, logits: torch.Tensor) -> torch.Tensor:
        """No a-priori bound: each row's largest round-trip error on these logits, for every class of the row."""
        x = _as_logits(logits).cpu()
        err = (roundtrip(self, x).full.double() - x.double()).abs().amax(dim=1, keepdim=True)
        return err.expand(x.shape).clone()


# --------------------------------------------------------------------------------------------- parsing
_TOPK = re.compile(r"topk:([1-9][0-9]*)(?:\+q([0-9]+))?")
_LOWRANK = re.compile(r"lowrank:([1-9][0-9]*)(?:\+top:([1-9][0-9]*))?(?:\+sparse:([1-9][0-9]*))?")
SPECS = ("fp32", "fp16", "q8", "topk:K", "topk:K+qB (B in 2, 4, 8)", "lowrank:R[+top:M][+sparse:K]")


def parse_codec(spec: str, num_classes: int) -> Codec:
    """A codec from its spec string (see SPECS), checked against num_classes. A lowrank codec comes back without
    its basis (LowRankCodec.fit adds one)."""
    if not isinstance(spec, str):
        raise ConfigError(f"codec spec must be a string, got {spec!r}")
    c = _check_classes(num_classes)
    s = spec.strip()
    codec: Codec
    if s in ("fp32", "fp16"):
        codec = FloatCodec(dtype=s)
    elif s == "q8":
        codec = Q8Codec()
    elif s.startswith("lowrank:"):
        m = _LOWRANK.fullmatch(s)
        if not m:
            raise ConfigError(f"codec spec {spec!r} is not lowrank:R, lowrank:R+top:M, lowrank:R+sparse:K or "
                              "lowrank:R+top:M+sparse:K (R, M, K positive integers)")
        codec = LowRankCodec(rank=int(m.group(1)), top=int(m.group(2) or 0), sparse=int(m.group(3) or 0))
    else:
        m = _TOPK.fullmatch(s)
        if not m:
            raise ConfigError(f"codec spec {spec!r} is not one of {', '.join(SPECS)}")
        bits = int(m.group(2)) if m.group(2) is not None else 0
        if m.group(2) is not None and bits not in TAIL_BITS:
            raise ConfigError(f"codec spec {spec!r}: tail bits must be one of {TAIL_BITS}, got {m.group(2)}")
        codec = TopKCodec(k=int(m.group(1)), tail_bits=bits)
    codec.arrays(c)  # validates k against the class count
    return codec


_KINDS: dict[str, type[Codec]] = {"float": FloatCodec, "q8": Q8Codec, "topk": TopKCodec, "lowrank": LowRankCodec}


def codec_from_dict(d: Mapping[str, Any]) -> Codec:
    """Inverse of Codec.to_dict (dispatches on d['kind'])."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"codec config must be a mapping, got {type(d).__name__}")
    kind = d.get("kind")
    if kind not in _KINDS:
        raise ConfigError(f"codec field 'kind' must be one of {sorted(_KINDS)}, got {kind!r}")
    return _KINDS[kind].from_dict(d)


# --------------------------------------------------------------------------------------------- fidelity
def roundtrip(codec: Codec, logits: torch.Tensor) -> Decoded:
    """decode(encode(logits)) on the CPU."""
    x = _as_logits(logits)
    return codec.decode({k: torch.from_numpy(v) for k, v in codec.encode(x).items()}, x.shape[1])


def max_abs_error(codec: Codec, logits: torch.Tensor) -> float:
    """Measured max |decoded - logits| over the entries the codec stores (the top-k only, for topk:K)."""
    x = _as_logits(logits).cpu()
    dec = roundtrip(codec, x)
    if dec.full is not None:
        return float((dec.full - x).abs().max()) if x.numel() else 0.0
    return float((dec.topk_val - x.gather(1, dec.topk_idx)).abs().max()) if x.numel() else 0.0
