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

Quantisation (B bits, per row over the quantised values x): lo = min x, scale = (max x - lo) / (2^B - 1),
code = round((x - lo) / scale) (nearest level), decoded value lo + code * scale. A row with max = min stores
scale 0 and decodes exactly. m = max(abs(lo), abs(max x)); the 8 eps32 m term (eps32 = 2^-23) covers float32 rounding.
The tail of `topk:K+qB` is the C-K classes outside the top-k in increasing class order; codes are packed
little-endian, 8/B per byte (the first value in the lowest bits), each row padded with zero bits to a whole byte.
`decode` trusts the class count it is given (the cache's metadata): it checks every array's shape against it, but
C and C+1 can share a packed row length. Top-k values are sorted descending. Logits must be finite, and within
float16 range (|x| <= 65504) for codecs that store float16.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from .errors import CacheError, ConfigError

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
    padded = np.zeros((b, nb * per), dtype=np.uint8)
    padded[:, :n] = codes
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(padded.reshape(b, nb, per) << shifts, axis=2).astype(np.uint8)


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
    codes = np.rint((x - lo[:, None]) / safe[:, None])
    return lo.astype(np.float32), scale, np.clip(codes, 0, levels).astype(np.uint8)


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


# --------------------------------------------------------------------------------------------- parsing
_TOPK = re.compile(r"topk:([1-9][0-9]*)(?:\+q([0-9]+))?")
SPECS = ("fp32", "fp16", "q8", "topk:K", "topk:K+qB (B in 2, 4, 8)")


def parse_codec(spec: str, num_classes: int) -> Codec:
    """A codec from its spec string ("fp32", "fp16", "q8", "topk:K", "topk:K+qB"), checked against num_classes."""
    if not isinstance(spec, str):
        raise ConfigError(f"codec spec must be a string, got {spec!r}")
    c = _check_classes(num_classes)
    s = spec.strip()
    codec: Codec
    if s in ("fp32", "fp16"):
        codec = FloatCodec(dtype=s)
    elif s == "q8":
        codec = Q8Codec()
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


_KINDS: dict[str, type[Codec]] = {"float": FloatCodec, "q8": Q8Codec, "topk": TopKCodec}


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
