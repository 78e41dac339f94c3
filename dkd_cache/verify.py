"""`dkd-cache verify`: the trust anchor. Is this cache what this teacher computes on these shards' recorded views?

What is checked, in order (every failed check is named in the report with its figure and tolerance):

1. Integrity. The cache is complete and every tar shard has its done record (with the manifest's sample count);
   the shards given are the manifest's (same names, same keys by SHA-256 digest, same labels per sample); the
   teacher weights' SHA-256 is the one recorded at dump time; the per-sample arrays agree with the manifest (shard
   index, padding, sizes); every array is read whole, chunk by chunk, and holds finite, non-sentinel values on every
   status-OK row (a damaged chunk fails its checksum: reported naming the array, never a crash); top-k classes are
   distinct and in range, and p_t = exp(z_t/T - lse) <= 1. Library versions that differ from the dump's are
   warnings: what they change is measured below, as logit error.
2. Logit fidelity. `samples` (view, sample) entries are drawn over the whole cache (systematic sampling over the
   status-OK rows in manifest order, so every shard gets its share; a random view per row; deterministic in `seed`).
   Each is re-rendered with views.render from its stored box and flip and the cache's recipe, and run through the
   live teacher in float32 (eval, inference_mode, TF32 off on CUDA, the dump's normalize). Compared, as median, p99
   and max: the stored target logit, lse(z/T) per temperature and p_t against the live ones; the stored logits
   (top-k values, or every logit for codecs that decode full) against the live logits, within the codec's stated
   error bound (logit_codecs.Codec.error_bound) plus logit_tol; the stored top-k class set against the live one,
   tie-tolerant: a stored set passes if no class outside it has a live logit more than logit_tol above the smallest
   live logit inside it. The stored box is also re-drawn from (seed, view, key) with the recipe (views.draw_view);
   a different box is a failure under the dump's numpy version, a warning under another one.
3. Loss fidelity. Student logits for the same inputs (the given student checkpoint, else a ResNet-18 initialised
   with torch.manual_seed(seed), in eval mode). At every cached temperature, DKD (alpha, beta) is computed three ways:
   from the stored entries exactly as train.cached_dkd does (both residual rules for top-k codecs, the full-logit
   form for codecs that decode full); from an *ideal* cache, the live logits put through the same codec with the
   live target logit and lse; and exact DKD on the live logits. Stored against ideal is the check (relative batch-
   mean loss error <= loss_tol, median per-sample cosine of the gradients w.r.t. the student logits >= cosine_tol):
   it isolates what the cache got wrong from what the codec leaves out by design. Stored against live exact is
   reported as the codec's approximation of DKD (for fp32 the two comparisons are the same).
4. Training parity (train_steps > 0). The same student (the checkpoint's weights, else the seeded ResNet-18) is
   trained for train_steps SGD steps (lr train_lr, momentum 0.9, train mode; CE + DKD at the first cached
   temperature, rule "uniform" for top-k codecs) on batches of the drawn entries' renders: once from the cache's
   entries, once from the reference (for fp32 the live teacher's logits, i.e. train.py's live mode; for lossy codecs
   the ideal cache, with the live-logit run reported too). Training is chaotic at the bit level (a one-ulp change
   of the teacher's logits grows step by step), so the gated figures are the first step's (relative loss
   difference and relative difference of the first weight update, both <= parity_tol); the loss curves, their max
   difference and the final parameter distance (relative to the weights' norm and to the distance moved) are
   reported beside a noise floor: the reference run again with its teacher logits moved one ulp.

Default tolerances, and why:
    logit_tol  1e-3  absolute, on top of the codec's stated bound (0 for fp32; |z| 2^-11 for float16 values; half
                     a quantisation step for q8 / tails). A re-computation of the same fp32 teacher on the same
                     inputs differs from the dump's by float rounding only (batch composition changes the kernels'
                     summation order). Measured on CPU: max 1.4e-6 for a ResNet-18 with logits up to 8, 1.2e-4 for
                     a ResNet-34 with logits up to 760; a wrong teacher, view rendering or chunk moved them by 1..14.
                     lse@T scales it by max(1, 1/T), p_t by 2 max(1, 1/T) (first-order propagation).
                     A cache dumped under bf16 autocast (dump-teacher's default on CUDA; recorded in the cache's
                     `compute`) is checked against the live teacher under bf16 autocast, with logit_tol raised to
                     BF16_LOGIT_REL (2^-6) of the largest live logit: bf16 rounding differs between devices and
                     kernels. dump-teacher turns TF32 off for fp32 dumps on CUDA.
    loss_tol   1e-2  relative DKD error, stored against ideal cache. A correct cache of any codec lands near
                     rounding (measured: <= 5e-6 for topk:4 and topk:10 of 10 classes, topk:10 and topk:10+q4 of
                     100, q8, fp16, fp32); a top-k class swap at a near-tie would move one sample's loss by a few
                     percent, the batch mean far less. A wrong teacher gave 20..70, re-rendering with another
                     interpolation 0.04..0.16.
    cosine_tol 0.99  minimum median per-sample gradient cosine, stored against ideal (correct: 1 to 6 digits).
                     The median ignores the odd near-tie sample.
    parity_tol 1e-4  relative, float tolerance for the first training step from the cache against the reference
                     (measured: 0 to 1e-7 for correct caches).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from . import cache as cache_mod
from . import cache_meta
from .data import IMAGE_EXTS, expand_shards, iter_raw_samples, keys_digest, parse_sample, scan_shard, shard_name
from .errors import BadSampleError, CheckpointError, ConfigError, DKDCacheError, ShardError
from .checkpoint import read_checkpoint
from .logit_codecs import Codec, FloatCodec
from .teacher import build_model, load_teacher
from .teacher_signal import (ComputePolicy, Storage, dkd_from_entries, encode_entries, lse_at, policy_scope,
                             select_rows, teacher_forward)
from .train import train_step
from . import renderers
from .loss import dkd_loss
from .views import draw_view, image_size_of, normalize

BLOCK_BYTES = 64 << 20  # at most this much of one array is held at a time during the scan
WORST = 5  # entries listed per report for the largest errors


@dataclasses.dataclass(frozen=True, kw_only=True)
class VerifySettings:
    """What to verify and how strictly. Tolerance defaults are explained in the module docstring."""

    cache: str
    shards: str | Sequence[str]
    weights: str
    samples: int = 64
    seed: int = 0
    student: str | None = None
    train_steps: int = 0
    device: str = "cpu"
    logit_tol: float = 1e-3
    loss_tol: float = 1e-2
    cosine_tol: float = 0.99
    parity_tol: float = 1e-4
    alpha: float = 1.0
    beta: float = 0.5
    batch_size: int = 32  # teacher / student forward batch
    train_batch: int = 16
    train_lr: float = 0.01
    allow_pipe: bool = False
    renderer: str | None = None  # also render with this renderer and report the drift against the cache's

    def __post_init__(self) -> None:
        if self.renderer is not None:
            renderers.parse_renderer(self.renderer)
        for name in ("samples", "batch_size", "train_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in ("seed", "train_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {v!r}")
        for name in ("logit_tol", "loss_tol", "parity_tol", "alpha", "beta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}")
        c = self.cosine_tol
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not -1 <= c <= 1:
            raise ConfigError(f"cosine_tol must lie in [-1, 1], got {c!r}")
        if isinstance(self.train_lr, bool) or not isinstance(self.train_lr, (int, float)) \
                or not (math.isfinite(self.train_lr) and self.train_lr > 0):
            raise ConfigError(f"train_lr must be > 0, got {self.train_lr!r}")
        if not isinstance(self.device, str) or not self.device.startswith(("cpu", "cuda")):
            raise ConfigError(f"device must be cpu or cuda, got {self.device!r}")
        for name in ("cache", "weights"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name} must be a path, got {getattr(self, name)!r}")


# --------------------------------------------------------------------------------------------- report helpers
class _Report:
    """Collects checks, warnings and figures; `checks` rows are (name, ok, figure, tolerance, detail)."""

    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self.data: dict[str, Any] = {}

    def check(self, name: str, ok: bool, figure: Any = None, tolerance: Any = None, detail: str = "") -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "figure": _jsonable(figure),
                            "tolerance": _jsonable(tolerance), "detail": detail})
        return bool(ok)

    def failures(self) -> list[str]:
        out = []
        for c in self.checks:
            if c["ok"]:
                continue
            msg = c["name"]
            if c["figure"] is not None:
                msg += f": {_fmt(c['figure'])}"
                if c["tolerance"] is not None:
                    msg += f" (tolerance {_fmt(c['tolerance'])})"
            if c["detail"]:
                msg += f" - {c['detail']}"
            out.append(msg)
        return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if (x == 0 or 1e-3 <= abs(x) < 1e4) else f"{x:.2e}"
    return str(x)


def _stats(x: np.ndarray | Sequence[float]) -> dict[str, float | int | None]:
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        return {"n": 0, "median": None, "p99": None, "max": None}
    return {"n": int(a.size), "median": float(np.median(a)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}


# --------------------------------------------------------------------------------------------- integrity
def _read_per_sample(cache: cache_mod.Cache, name: str, rep: _Report) -> tuple[np.ndarray | None, np.ndarray]:
    """A whole per-sample array, read chunk-block by chunk-block; (values or None, damaged-row mask)."""
    m = cache.meta
    n, c = m.manifest.rows, m.chunk_rows
    try:
        arr = cache.array(name)
    except cache_mod.CacheError as e:
        rep.check(f"array {name}", False, detail=str(e))
        return None, np.ones(n, bool)
    out = np.zeros(arr.shape, arr.dtype)
    damaged = np.zeros(n, bool)
    errors: list[str] = []
    step = c * max(1, BLOCK_BYTES // max(1, c * int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize))
    for start in range(0, n, step):
        stop = min(n, start + step)
        try:
            out[start:stop] = cache.read_rows(name, start, stop)
        except cache_mod.CacheError:
            for s in range(start, stop, c):  # find the damaged chunks one by one
                try:
                    out[s:s + c] = cache.read_rows(name, s, min(stop, s + c))
                except cache_mod.CacheError as e:
                    damaged[s:s + c] = True
                    errors.append(str(e))
    if errors:
        rep.check(f"array {name} readable", False, f"{len(errors)} damaged", 0, detail=errors[0])
    return out, damaged


def _check_shards(cache: cache_mod.Cache, settings: VerifySettings, labels: np.ndarray | None,
                  rep: _Report) -> dict[str, str]:
    """Shards given against the manifest: names, key digests, sample counts, labels. Returns name -> url of the
    shards that may be used to re-render entries (present; keys may still differ: entries are checked by key)."""
    m = cache.meta.manifest
    urls = expand_shards(settings.shards, allow_pipe=settings.allow_pipe)
    by_name = {shard_name(u): u for u in urls}
    names = [s.name for s in m.shards]
    missing = [n for n in names if n not in by_name]
    extra = [n for n in by_name if n not in set(names)]
    rep.check("shards: every manifest shard given", not missing, len(missing), 0,
              detail=f"not given: {missing[:3]}" if missing else "")
    rep.check("shards: no shard outside the manifest", not extra, len(extra), 0,
              detail=f"not in the cache: {extra[:3]}" if extra else "")

    def scan(entry):
        try:
            return scan_shard(by_name[entry.name], cache.meta.num_classes, skip_bad=True), None
        except DKDCacheError as e:
            return None, f"{type(e).__name__}: {e}"

    present = [e for e in m.shards if e.name in by_name]
    with ThreadPoolExecutor(max_workers=8) as pool:
        scanned = list(pool.map(scan, present))
    unreadable, key_diff, label_diff = [], [], []
    keys_in_order: list[str] = []
    for entry, (ix, err) in zip(present, scanned):
        if ix is None:
            unreadable.append(f"{entry.name} ({err})")
            continue
        keys_in_order.extend(ix.keys)
        if ix.keys_sha256 != entry.keys_sha256 or len(ix.keys) != entry.samples:
            key_diff.append(f"{entry.name}: {len(ix.keys)} samples, keys {ix.keys_sha256[:12]} "
                            f"(cache: {entry.samples}, keys {entry.keys_sha256[:12]})")
            continue
        if labels is not None:
            cached = labels[entry.row_start:entry.row_start + entry.samples]
            diff = np.flatnonzero(np.asarray(ix.labels) != cached)
            if diff.size:
                label_diff.append(f"{entry.name}: {diff.size} label(s) differ, first {ix.keys[diff[0]]!r} "
                                  f"shard {ix.labels[diff[0]]} cache {cached[diff[0]]}")
    rep.check("shards: readable", not unreadable, len(unreadable), 0,
              detail="; ".join(unreadable[:2]))
    rep.check("shards: keys match the manifest (SHA-256 per shard)", not key_diff,
              f"{len(key_diff)}/{len(present)}", 0, detail="; ".join(key_diff[:2]))
    if not missing and not unreadable and not key_diff:
        rep.check("shards: keys match the manifest (whole)", keys_digest(keys_in_order) == m.keys_sha256,
                  detail="the manifest's overall key digest differs")
    rep.check("shards: labels match the cache", not label_diff, len(label_diff), 0,
              detail="; ".join(label_diff[:2]))
    return {n: by_name[n] for n in names if n in by_name}


def _view_arrays(cache: cache_mod.Cache, codec: Codec) -> list[str]:
    return ["views/box", "views/flip", "logits/target", "logits/lse",
            *(f"logits/{n}" for n in codec.arrays(cache.meta.num_classes))]


def _scan_views(cache: cache_mod.Cache, codec: Codec, ok: np.ndarray, done: np.ndarray,
                entries: dict[str, np.ndarray], rep: _Report) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read every per-view array whole, chunk by chunk (all views of a chunk at once where they fit in
    BLOCK_BYTES), check it on the status-OK rows, and pick out the drawn entries' stored values.

    ok: status-OK rows (checked for values); done: rows of shards with a done record (read; the others' chunks
    may not exist yet). entries: {"row": (n,), "view": (n,)}. Returns ({array name: values (n, ...)}, usable mask (n,))."""
    m = cache.meta
    n_rows, c, v, classes = m.manifest.rows, m.chunk_rows, m.views, m.num_classes
    temps = np.asarray(m.temperatures, np.float64)
    names = _view_arrays(cache, codec)
    arrays = {}
    for name in names:
        try:
            arrays[name] = cache.array(name)
        except cache_mod.CacheError as e:
            rep.check(f"array {name}", False, detail=str(e))
    e_row, e_view = entries["row"], entries["view"]
    n = e_row.size
    out = {name: np.zeros((n, *a.shape[2:]), a.dtype) for name, a in arrays.items()}
    usable = np.ones(n, bool)
    if len(arrays) < len(names):
        usable[:] = False
    damaged: dict[str, list[str]] = {}
    invalid: dict[str, int] = {}
    consistency = {"idx_range": 0, "idx_distinct": 0, "p_t": 0}
    order = np.argsort(e_row, kind="stable")
    for start in range(0, n_rows, c):
        stop = min(n_rows, start + c)
        ok_c = ok[start:stop]
        if not done[start]:
            continue
        lo, hi = np.searchsorted(e_row[order], [start, stop])
        in_chunk = order[lo:hi]
        kept: dict[str, np.ndarray | None] = {}  # target and lse of this chunk, for the p_t check
        for name, arr in arrays.items():
            per_view = (stop - start) * int(np.prod(arr.shape[2:], dtype=np.int64)) * arr.dtype.itemsize
            g = int(max(1, min(v, BLOCK_BYTES // max(1, per_view))))
            if name in ("logits/target", "logits/lse"):
                g = v
            for v0 in range(0, v, g):
                v1 = min(v, v0 + g)
                sel = in_chunk[(e_view[in_chunk] >= v0) & (e_view[in_chunk] < v1)]
                try:
                    vals = cache.read_rows(name, start, stop, view=slice(v0, v1))
                except cache_mod.CacheError as e:
                    cause = e.__cause__
                    why = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
                    damaged.setdefault(name, []).append(f"rows {start}..{stop - 1}, views {v0}..{v1 - 1}: {why}")
                    usable[sel] = False
                    kept[name] = None
                    continue
                for j in range(v1 - v0):
                    try:
                        cache_mod.check_filled(cache, name, vals[j], ok_c, start, view=v0 + j)
                    except cache_mod.CacheError:
                        bad_rows = cache_mod.unfilled_rows(name, vals[j]) & ok_c
                        invalid[name] = invalid.get(name, 0) + int(bad_rows.sum())
                        hit = in_chunk[(e_view[in_chunk] == v0 + j) & bad_rows[e_row[in_chunk] - start]]
                        usable[hit] = False
                if sel.size:
                    out[name][sel] = vals[e_view[sel] - v0, e_row[sel] - start]
                if name == "logits/topk_idx":
                    x = vals[:, ok_c].astype(np.int64)
                    consistency["idx_range"] += int(((x < 0) | (x >= classes)).any(axis=-1).sum())
                    srt = np.sort(x, axis=-1)
                    consistency["idx_distinct"] += int((srt[..., 1:] == srt[..., :-1]).any(axis=-1).sum())
                if name in ("logits/target", "logits/lse"):
                    kept[name] = vals
        # p_t = exp(z_t / T - lse(z / T)) <= 1 on OK rows (NaN rows are counted above as unfilled)
        tgt, lse = kept.get("logits/target"), kept.get("logits/lse")
        if tgt is not None and lse is not None:
            with np.errstate(invalid="ignore"):
                lpt = tgt[:, ok_c, None].astype(np.float64) / temps - lse[:, ok_c].astype(np.float64)
                slack = 1e-4 + 1e-6 * np.abs(lse[:, ok_c].astype(np.float64))  # float32 rounding of large logits
            consistency["p_t"] += int((lpt > slack).any(axis=-1).sum())
    for name, errs in damaged.items():
        rep.check(f"array {name} readable", False, f"{len(errs)} damaged", 0,
                  detail=f"first: {errs[0]}; the chunk is damaged: re-dump its shard (delete its _dkd/done record "
                         "and rerun dump-teacher)")
    for name in arrays:
        if name not in damaged:
            rep.check(f"array {name} readable", True, 0, 0)
    rep.check("values finite and filled on status-OK rows", not invalid,
              sum(invalid.values()), 0, detail=", ".join(f"{k}: {n} entries" for k, n in invalid.items()))
    if "logits/topk_idx" in arrays:
        rep.check("top-k classes in range and distinct", not (consistency["idx_range"] or consistency["idx_distinct"]),
                  consistency["idx_range"] + consistency["idx_distinct"], 0,
                  detail=f"{consistency['idx_range']} out of range, {consistency['idx_distinct']} repeated")
    rep.check("stored p_t <= 1 (target logit vs lse)", consistency["p_t"] == 0, consistency["p_t"], 0)
    return out, usable


# --------------------------------------------------------------------------------------------- entries
def draw_entries(ok_rows: np.ndarray, views: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n distinct (row, view) entries over the given rows (manifest order): systematic sampling, so every shard
    gets its proportional share; each row's views are rotated by a random offset. Deterministic in seed."""
    rng = np.random.default_rng(seed)
    total = ok_rows.size * views
    n = min(n, total)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pos = np.floor((np.arange(n) + rng.random()) * (total / n)).astype(np.int64)
    pos = np.minimum(pos, total - 1)
    r, j = pos // views, pos % views
    offsets = rng.integers(0, views, size=ok_rows.size)
    return ok_rows[r].astype(np.int64), ((j + offsets[r]) % views).astype(np.int64)


def _load_images(cache: cache_mod.Cache, urls: dict[str, str], rows: np.ndarray, keys: list[str],
                 labels: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                 rep: _Report) -> dict[int, bytes]:
    """Image bytes of the drawn rows from their shards, checked against the cache's key, label and size."""
    m = cache.meta.manifest
    starts = np.array([e.row_start for e in m.shards])
    want: dict[int, set[int]] = {}
    for row in np.unique(rows):
        i = int(np.searchsorted(starts, row, side="right")) - 1
        want.setdefault(i, set()).add(int(row) - m.shards[i].row_start)
    images: dict[int, bytes] = {}
    problems: list[str] = []
    keep = (*IMAGE_EXTS, "cls")
    for i, positions in sorted(want.items()):
        e = m.shards[i]
        url = urls.get(e.name)
        if url is None:
            continue  # reported as a missing shard
        last = max(positions)
        try:
            for pos, raw in enumerate(iter_raw_samples(url, want=lambda ext: ext in keep)):
                if pos > last:
                    break
                if pos not in positions:
                    continue
                row = e.row_start + pos
                if raw["__key__"] != keys[row]:
                    problems.append(f"{e.name} position {pos}: key {raw['__key__']!r}, cache {keys[row]!r}")
                    continue
                try:
                    sample = parse_sample(raw, cache.meta.num_classes)
                    h, w = image_size_of(sample.image)
                except (BadSampleError, ValueError, OSError) as err:
                    problems.append(f"{e.name} {keys[row]!r}: {err}")
                    continue
                if sample.label != labels[row]:
                    problems.append(f"{e.name} {keys[row]!r}: label {sample.label}, cache {labels[row]}")
                    continue
                if (h, w) != (heights[row], widths[row]):
                    problems.append(f"{e.name} {keys[row]!r}: image {h}x{w}, cache {heights[row]}x{widths[row]}")
                    continue
                images[row] = sample.image
        except ShardError as err:
            problems.append(str(err))
    missing = [int(r) for r in np.unique(rows) if int(r) not in images]
    rep.check("drawn samples found in the shards (key, label, size)", not missing,
              f"{len(missing)}/{len(np.unique(rows))}", 0, detail="; ".join(problems[:3]))
    return images


BF16_LOGIT_REL = 2.0 ** -6


# --------------------------------------------------------------------------------------------- renderer drift
def _renderer_drift(teacher, student, images_a: torch.Tensor, images_b: torch.Tensor, z_a: torch.Tensor,
                    y: torch.Tensor, meta, s: VerifySettings, device: torch.device, policy) -> dict[str, Any]:
    """What training with renderer B against this cache (rendered with A) costs: pixel and teacher-logit drift
    between the two renderings, and the per-sample cosine between the full-logit DKD gradient (w.r.t. the student
    logits) the student gets from the cache, DKD(s_B, z_A), and the one a cache rendered with B would give,
    DKD(s_B, z_B). Reported, not judged (no tolerance: a switch is the user's call)."""
    z_b = _logits(teacher, images_b, meta.recipe, device, s.batch_size, policy)
    s_b = _logits(student, images_b, meta.recipe, device, s.batch_size, FP32)
    pix = (images_a.int() - images_b.int()).abs().float()
    dz = (z_a - z_b).abs()
    out: dict[str, Any] = {"cache_renderer": meta.renderer.name, "other_renderer": s.renderer,
                           "pixels": {"max_abs": float(pix.max()), "mean_abs": float(pix.mean())},
                           "teacher_logits": {"max_abs": float(dz.max()), "median_abs": float(dz.median())}}
    for temp in meta.temperatures:
        res = _compare(lambda x: dkd_loss(x, z_a, y, s.alpha, s.beta, temp),
                       lambda x: dkd_loss(x, z_b, y, s.alpha, s.beta, temp), s_b)
        out[f"grad_T{temp:g}"] = {k: res[k] for k in ("rel_err", "cos_median", "cos_p5", "cos_min")}
    return out


# --------------------------------------------------------------------------------------------- models
FP32 = ComputePolicy(amp="none", tf32=False)  # the student's forward and the parity runs


def _logits(model: torch.nn.Module, images: torch.Tensor, recipe, device: torch.device, batch: int,
            policy: ComputePolicy) -> torch.Tensor:
    """float32 logits (on the CPU) of uint8 renders, through teacher_signal.teacher_forward in batches."""
    return torch.cat([teacher_forward(model, normalize(images[s:s + batch].to(device), recipe), policy).cpu()
                      for s in range(0, images.shape[0], batch)])


def _load_student(settings: VerifySettings, num_classes: int, device: torch.device) -> tuple[torch.nn.Module, str]:
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


# --------------------------------------------------------------------------------------------- fidelity
def _logit_fidelity(codec: Codec, meta, z: torch.Tensor, y: torch.Tensor, stored: dict[str, np.ndarray],
                    tol: float, rep: _Report, labels_of: list[str]) -> dict[str, Any]:
    classes, temps = meta.num_classes, meta.temperatures
    z64 = z.double()
    out: dict[str, Any] = {}
    t_s = torch.from_numpy(stored["logits/target"]).double()
    t_l = z64.gather(1, y[:, None])[:, 0]
    err_t = (t_s - t_l).abs().numpy()
    out["target_logit"] = _stats(err_t)
    rep.check("logits: target logit |stored - live| max", bool(err_t.max() <= tol), float(err_t.max()), tol)
    lse_s = torch.from_numpy(stored["logits/lse"]).double()
    lse_l = lse_at(z, temps).double()
    for ti, temp in enumerate(temps):
        scale = max(1.0, 1.0 / temp)
        e = (lse_s[:, ti] - lse_l[:, ti]).abs().numpy()
        out[f"lse T={temp:g}"] = _stats(e)
        rep.check(f"logits: lse(z/T) T={temp:g} |stored - live| max", bool(e.max() <= tol * scale), float(e.max()),
                  tol * scale)
        p_s = torch.exp(t_s / temp - lse_s[:, ti])
        p_l = torch.exp(t_l / temp - lse_l[:, ti])
        e = (p_s - p_l).abs().numpy()
        out[f"p_t T={temp:g}"] = _stats(e)
        rep.check(f"logits: teacher p_t T={temp:g} |stored - live| max", bool(e.max() <= 2 * tol * scale),
                  float(e.max()), 2 * tol * scale)

    arrays = {name.split("/", 1)[1]: torch.from_numpy(v) for name, v in stored.items()
              if name.startswith("logits/") and name not in ("logits/target", "logits/lse")}
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
        out["stored_logits"] = {**_stats(err.amax(dim=1).numpy()), "what": "every logit (row max)"}
    else:
        err = (dec.topk_val.double() - z64.gather(1, idx)).abs()
        excess = err - bound.gather(1, idx)
        out["stored_logits"] = {**_stats(err.amax(dim=1).numpy()), "what": f"top-{idx.shape[1]} values (row max)"}
    row_excess = excess.amax(dim=1).numpy()
    out["stored_logits"]["max_excess_over_codec_bound"] = float(row_excess.max())
    rep.check(f"logits: stored {codec.name} values, max excess over the codec's bound",
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
        rep.check("logits: stored top-k class sets = live top-k (tie-tolerant)", violations == 0,
                  f"{violations}/{gap.size}", 0,
                  detail=f"largest live logit outside the set exceeds one inside by {gap.max():.3g}"
                  if violations else "")
    return out


def _loss_of(entries: dict[str, torch.Tensor], storage: Storage, y: torch.Tensor, settings: VerifySettings):
    """loss_fn(student_logits, temperature, rule, rows): teacher_signal.dkd_from_entries, training's loss."""

    def fn(s: torch.Tensor, temp: float, rule: str, rows=slice(None)) -> torch.Tensor:
        return dkd_from_entries(s, y[rows], select_rows(entries, rows), storage, alpha=settings.alpha,
                                beta=settings.beta, temperature=temp, rule=rule)
    return fn


def _loss_and_grad(fn, s: torch.Tensor) -> tuple[float, torch.Tensor]:
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s)
    (g,) = torch.autograd.grad(loss, s)
    return float(loss.detach()), g.double()


def _cosines(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a * b).sum(dim=1) / (na * nb).clamp(min=1e-300)
    cos = torch.where((na == 0) & (nb == 0), torch.ones_like(cos), cos)
    return cos.numpy()


def _compare(fn_a, fn_b, s: torch.Tensor) -> dict[str, float]:
    la, ga = _loss_and_grad(fn_a, s)
    lb, gb = _loss_and_grad(fn_b, s)
    cos = _cosines(ga, gb)
    return {"loss": la, "reference_loss": lb, "rel_err": abs(la - lb) / max(abs(lb), 1e-12),
            "cos_median": float(np.median(cos)), "cos_p5": float(np.percentile(cos, 5)), "cos_min": float(cos.min())}


def _rules(codec: Codec) -> tuple[str, ...]:
    return ("exact",) if codec.decodes_full else ("uniform", "bucket")


def _loss_fidelity(codec, meta, s, stored_fn, ideal_fn, live_fn, settings: VerifySettings, rep: _Report) -> dict:
    out: dict[str, Any] = {}
    for temp in meta.temperatures:
        live = lambda x, temp=temp: live_fn(x, temp, "uniform")  # noqa: E731
        for rule in _rules(codec):
            r = rule if rule != "exact" else "uniform"
            st = lambda x, temp=temp, r=r: stored_fn(x, temp, r)  # noqa: E731
            ide = lambda x, temp=temp, r=r: ideal_fn(x, temp, r)  # noqa: E731
            vs_ideal = _compare(st, ide, s)
            vs_live = _compare(st, live, s)
            out[f"T={temp:g} {rule}"] = {"vs_ideal_cache": vs_ideal, "vs_live_exact": vs_live}
            rep.check(f"loss: DKD T={temp:g} {rule} relative error vs ideal cache", vs_ideal["rel_err"] <= settings.loss_tol,
                      vs_ideal["rel_err"], settings.loss_tol)
            rep.check(f"loss: DKD T={temp:g} {rule} median gradient cosine vs ideal cache",
                      vs_ideal["cos_median"] >= settings.cosine_tol, vs_ideal["cos_median"], settings.cosine_tol)
    return out


def _params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().cpu().ravel() for p in model.parameters()])


@dataclasses.dataclass
class _Run:
    losses: list[float]
    first: torch.Tensor  # parameters after the first step
    final: torch.Tensor  # parameters after the last step


def _train_run(student: torch.nn.Module, images: torch.Tensor, y: torch.Tensor, recipe, kd_fn,
               settings: VerifySettings, device: torch.device) -> _Run:
    """train_steps steps of train.train_step (SGD, momentum 0.9, CE + kd_fn, KD weight 1) on batches of the
    entries taken in order, cyclically."""
    model = copy.deepcopy(student).train().requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=settings.train_lr, momentum=0.9)
    n, b = images.shape[0], min(settings.train_batch, images.shape[0])
    losses, first = [], None
    for step in range(settings.train_steps):
        rows = torch.arange(step * b, step * b + b) % n
        loss, _, _ = train_step(model, opt, normalize(images[rows].to(device), recipe), y[rows].to(device),
                                functools.partial(kd_fn, rows=rows), kd_factor=1.0, ce_weight=1.0)
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


def _train_parity(codec, meta, cache_storage, student, images, y, z, stored_fn, ideal_fn, live_fn,
                  settings: VerifySettings, device: torch.device, rep: _Report) -> dict[str, Any]:
    """Training from the cache against the reference (live logits for fp32, else the ideal cache), same start.

    Training a network is chaotic at the bit level: a one-ulp change of the teacher's logits grows step by step
    (measured here: ResNet-18, 32 px, batch 16, lr 0.01 - 1e-7 relative after one step, 3e-2 in the loss after 5).
    So the gated figures are those of the first step, which hold no chaos yet: the first loss and the first weight
    update, relative. The whole curves and final weights are reported, beside a noise floor: the reference run
    again with its teacher logits moved one ulp, which shows how far float rounding alone carries the run."""
    temp, rule = meta.temperatures[0], "uniform"
    lossless = isinstance(codec, FloatCodec) and codec.dtype == "fp32"

    def kd(fn):
        return lambda lg, rows: fn(lg, temp, rule, rows)

    theta0 = _params(student)
    z_noisy = _one_ulp(z, settings.seed)
    # the reference: live logits in exact storage (train's live mode) for fp32, else through the codec (ideal cache)
    storage = Storage.exact(meta.num_classes, meta.temperatures) if lossless else cache_storage
    noisy_fn = _loss_of(encode_entries(z_noisy, y, storage), storage, y, settings)
    ref_fn = live_fn if lossless else ideal_fn
    run = lambda fn: _train_run(student, images, y, meta.recipe, kd(fn), settings, device)  # noqa: E731
    cache_run, ref_run, noisy_run = run(stored_fn), run(ref_fn), run(noisy_fn)
    ref_name = "live" if lossless else "ideal cache"
    vs_ref = _run_diff(cache_run, ref_run, theta0)
    out = {"steps": settings.train_steps, "batch": min(settings.train_batch, images.shape[0]),
           "temperature": temp, "rule": None if codec.decodes_full else rule, "lr": settings.train_lr,
           "reference": ref_name, "losses_cache": cache_run.losses, "losses_reference": ref_run.losses,
           "vs_reference": vs_ref, "noise_floor": _run_diff(noisy_run, ref_run, theta0)}
    if lossless:
        out["losses_live"] = ref_run.losses
    else:
        live_run = run(live_fn)
        out["losses_live"] = live_run.losses
        out["vs_live"] = _run_diff(cache_run, live_run, theta0)
    tol = settings.parity_tol
    rep.check(f"train: first-step loss, cache vs {ref_name} (relative)", vs_ref["first_loss_rel_diff"] <= tol,
              vs_ref["first_loss_rel_diff"], tol)
    rep.check(f"train: first weight update, cache vs {ref_name} (relative)", vs_ref["first_update_rel_diff"] <= tol,
              vs_ref["first_update_rel_diff"], tol)
    return out


# --------------------------------------------------------------------------------------------- main
def verify(settings: VerifySettings) -> dict[str, Any]:
    """Run every check; the report (JSON-serialisable) has "passed", "failures", "warnings", "checks" and figures."""
    t_start = time.perf_counter()
    s = settings
    rep = _Report()
    timings: dict[str, float] = {}
    cache = cache_mod.open_cache(s.cache)
    meta = cache.meta
    codec = cache.codec  # a learned codec comes with its basis, checked against the recorded hash
    m = meta.manifest
    device = torch.device(s.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    rep.data["cache"] = {"path": str(s.cache), "state": meta.state.value, "codec": codec.name, "classes": meta.num_classes,
                         "views": meta.views, "temperatures": list(meta.temperatures), "shards": len(m.shards),
                         "samples": m.samples, "teacher": meta.teacher.to_dict(), "recipe": meta.recipe.to_dict()}
    rep.data["settings"] = dataclasses.asdict(s)

    # ---- 1. integrity
    t0 = time.perf_counter()
    # the store's own findings (state, done records, layout, chunk files, versions); chunks are read below
    for finding in cache.check():
        if finding.warning:
            if not finding.ok:
                rep.warnings.append(f"{finding.check.value}: no, {finding.detail} (their effect is the logit error "
                                    "measured)")
        else:
            rep.check(finding.check.value, finding.ok, detail=finding.detail)
    pending = cache.pending_shards()
    versions = cache_meta.library_versions()
    vdiff = {k: {"cache": meta.versions.get(k), "now": versions.get(k)} for k in sorted(set(meta.versions) | set(versions))
             if meta.versions.get(k) != versions.get(k)}
    rep.data["versions_differ"] = vdiff

    per: dict[str, np.ndarray | None] = {}
    damaged_rows = np.zeros(m.rows, bool)
    for name in ("status", "label", "shard", "key", "height", "width"):
        per[name], dmg = _read_per_sample(cache, f"samples/{name}", rep)
        damaged_rows |= dmg
    urls = _check_shards(cache, s, per["label"], rep)

    teacher = None
    try:
        teacher, tinfo = load_teacher(meta.teacher.arch, s.weights, device=device)
    except (CheckpointError, ConfigError) as e:
        rep.check(f"teacher weights load as {meta.teacher.arch}", False, detail=str(e))
    if teacher is not None:
        rep.check("teacher weights SHA-256 = the cache's", tinfo.sha256 == meta.teacher.sha256,
                  tinfo.sha256[:12], meta.teacher.sha256[:12],
                  detail="these are not the weights the cache was dumped with")
        if not rep.check("teacher classes = the cache's", tinfo.num_classes == meta.num_classes,
                         tinfo.num_classes, meta.num_classes):
            teacher = None

    status = per["status"] if per["status"] is not None else np.zeros(m.rows, np.uint8)
    ok = (status == cache_meta.STATUS_OK) & ~damaged_rows
    done = np.zeros(m.rows, bool)
    for i, e in enumerate(m.shards):
        if i not in set(pending):
            done[e.row_start:e.row_stop] = True
    scan_ok = ok & done
    usable_rows = scan_ok.copy()
    for e in m.shards:
        if e.name not in urls:
            usable_rows[e.row_start:e.row_stop] = False
    rows, views = draw_entries(np.flatnonzero(usable_rows), meta.views, s.samples, s.seed)
    stored, usable = _scan_views(cache, codec, scan_ok, done, {"row": rows, "view": views}, rep)
    timings["integrity"] = time.perf_counter() - t0

    # ---- 2. logit fidelity
    t0 = time.perf_counter()
    keys = cache_mod.decode_keys(per["key"]) if per["key"] is not None else [""] * m.rows
    shard_of_row = per["shard"] if per["shard"] is not None else np.full(m.rows, -1)
    images_bytes = _load_images(cache, urls, rows[usable], keys, per["label"], per["height"], per["width"], rep) \
        if per["label"] is not None and per["height"] is not None and per["width"] is not None else {}
    keep = np.array([usable[i] and int(rows[i]) in images_bytes for i in range(rows.size)], bool)
    rows_k, views_k = rows[keep], views[keep]
    stored_k = {k: v[keep] for k, v in stored.items()}
    entry_names = [f"{m.shards[shard_of_row[r]].name}/{keys[r]} view {v}" for r, v in zip(rows_k, views_k)]
    n = int(rows_k.size)
    rep.data["entries"] = {"requested": s.samples, "drawn": int(rows.size), "compared": n,
                           "shards_covered": int(np.unique(shard_of_row[rows_k]).size) if n else 0}
    rep.check("entries compared", n > 0 and teacher is not None, n, ">= 1",
              detail="" if n else "no drawn entry could be read, matched and re-rendered")

    box_mismatch, renders, render_errors, todo = 0, [], [], []
    for r, v, st_box, st_flip in zip(rows_k, views_k, stored_k.get("views/box", np.zeros((n, 4))),
                                     stored_k.get("views/flip", np.zeros(n))):
        box = tuple(int(x) for x in st_box)
        h, w = int(per["height"][r]), int(per["width"][r])
        drawn = draw_view(meta.seed, int(v), keys[r], h, w, meta.recipe)
        if drawn != (*box, bool(st_flip)):
            box_mismatch += 1
        top, left, bh, bw = box
        if bh <= 0 or bw <= 0 or top + bh > h or left + bw > w:
            render_errors.append(f"{keys[r]} view {v}: box {box} outside the {h}x{w} image")
            renders.append(torch.zeros((3, meta.recipe.image_size, meta.recipe.image_size), dtype=torch.uint8))
            continue
        todo.append((len(renders), images_bytes[int(r)], box, bool(st_flip)))
        renders.append(None)  # rendered below, all at once, by the cache's renderer

    def render_with(name: str) -> list[torch.Tensor]:
        out = list(renders)
        if todo:
            done = renderers.render_views(name, [t[1] for t in todo], np.array([t[2] for t in todo]),
                                          np.array([t[3] for t in todo]), meta.recipe)
            for (i, *_), img in zip(todo, done):
                out[i] = img
        return out

    renders = render_with(meta.renderer.name)
    rep.check("stored boxes lie inside their images", not render_errors, len(render_errors), 0,
              detail="; ".join(render_errors[:2]))
    same_numpy = meta.versions.get("numpy") == versions.get("numpy")
    if box_mismatch and not same_numpy:
        rep.warnings.append(f"{box_mismatch} of {n} stored views differ from a re-draw with the recipe under another "
                            "numpy version (training uses the stored boxes)")
    else:
        rep.check("stored views = re-drawn from (seed, view, key) and the recipe", box_mismatch == 0,
                  f"{box_mismatch}/{n}", 0, detail="the recipe metadata does not describe these views"
                  if box_mismatch else "")

    fidelity_ok = n > 0 and teacher is not None
    if fidelity_ok:
        images = torch.stack(renders)
        y = torch.as_tensor(per["label"][rows_k].astype(np.int64))
        # The live teacher runs as the dump did (the cache's compute policy): under bf16 autocast for a bf16 cache.
        policy = meta.compute or ComputePolicy(device=device.type)  # None: not recorded (an older cache)
        bf16 = policy.amp == "bf16"
        z = _logits(teacher, images, meta.recipe, device, s.batch_size, policy)
        logit_tol = s.logit_tol
        if bf16:  # bf16 keeps 8 significant bits; rounding differs across devices and kernels
            logit_tol = max(logit_tol, BF16_LOGIT_REL * float(z.abs().max()))
            rep.data["bf16_logit_tol"] = logit_tol
        rep.data["logits"] = _logit_fidelity(codec, meta, z, y, stored_k, logit_tol, rep, entry_names)
        timings["logits"] = time.perf_counter() - t0
        if s.renderer is not None and s.renderer != meta.renderer.name:
            t0 = time.perf_counter()
            student_d, student_desc_d = _load_student(s, meta.num_classes, device)
            rep.data["renderer_drift"] = _renderer_drift(teacher, student_d, images, torch.stack(render_with(s.renderer)),
                                                          z, y, meta, s, device, policy)
            rep.data["renderer_drift"]["student"] = student_desc_d
            timings["renderer_drift"] = time.perf_counter() - t0

        # ---- 3. loss fidelity
        t0 = time.perf_counter()
        student, student_desc = _load_student(s, meta.num_classes, device)
        s_logits = _logits(student, images, meta.recipe, device, s.batch_size, FP32)
        # the same loss training uses, on three sets of entries: the stored ones, the live logits through the
        # cache's codec (an ideal cache) and the live logits in exact storage
        storage = Storage.of_cache(cache)
        exact = Storage.exact(meta.num_classes, meta.temperatures)
        stored_fn = _loss_of({k: torch.from_numpy(v) for k, v in stored_k.items() if k.startswith("logits/")},
                             storage, y, s)
        ideal_fn = _loss_of(encode_entries(z, y, storage), storage, y, s)
        live_fn = _loss_of(encode_entries(z, y, exact), exact, y, s)
        rep.data["loss"] = {"student": student_desc, "alpha": s.alpha, "beta": s.beta,
                            **_loss_fidelity(codec, meta, s_logits, stored_fn, ideal_fn, live_fn, s, rep)}
        timings["loss"] = time.perf_counter() - t0

        # ---- 4. training parity
        if s.train_steps > 0:
            t0 = time.perf_counter()
            if s.student:
                base = copy.deepcopy(student)
            else:
                torch.manual_seed(s.seed)
                base = build_model("resnet18", meta.num_classes).to(device).to(memory_format=torch.channels_last)
            with policy_scope(FP32):
                rep.data["train"] = _train_parity(codec, meta, storage, base, images, y, z, stored_fn, ideal_fn,
                                                  live_fn, s, device, rep)
            timings["train"] = time.perf_counter() - t0
    elif s.train_steps > 0:
        rep.check("train: parity run", False, detail="skipped: no entry could be compared")

    rep.data["seconds"] = {**timings, "total": time.perf_counter() - t_start}
    failures = rep.failures()
    if failures and vdiff and any(c["name"].startswith("logits:") and not c["ok"] for c in rep.checks):
        failures.append("note: library versions differ from the dump's (" + ", ".join(vdiff) + "); decoders and "
                        "kernels of other versions can move logits")
    return _jsonable({"passed": not failures, "failures": failures, "warnings": rep.warnings,
                      "checks": rep.checks, **rep.data})


# --------------------------------------------------------------------------------------------- text
def render_report(report: dict[str, Any]) -> str:
    """The report as a readable table."""
    c = report.get("cache", {})
    lines = [f"dkd-cache verify  {c.get('path')}",
             f"  codec {c.get('codec')}, {c.get('classes')} classes, {c.get('views')} views, T {c.get('temperatures')}, "
             f"{c.get('samples')} samples in {c.get('shards')} shards; teacher {c.get('teacher', {}).get('arch')}"]
    ent = report.get("entries")
    if ent:
        lines.append(f"  entries: {ent['compared']} compared of {ent['drawn']} drawn ({ent['requested']} requested), "
                     f"{ent['shards_covered']} shards covered")
    lines += ["", f"{'check':<70} {'figure':>12} {'tolerance':>12}  result", "-" * 104]
    for ch in report.get("checks", []):
        fig = "" if ch["figure"] is None else _fmt(ch["figure"])
        tol = "" if ch["tolerance"] is None else _fmt(ch["tolerance"])
        lines.append(f"{ch['name'][:70]:<70} {fig[:12]:>12} {tol[:12]:>12}  {'ok' if ch['ok'] else 'FAIL'}")
    lg = report.get("logits")
    if lg:
        lines += ["", f"{'|stored - live|':<40} {'median':>11} {'p99':>11} {'max':>11}", "-" * 76]
        for k, v in lg.items():
            if isinstance(v, dict) and "median" in v and v.get("n"):
                lines.append(f"{k:<40} {v['median']:>11.3g} {v['p99']:>11.3g} {v['max']:>11.3g}")
        if "topk_set" in lg:
            t = lg["topk_set"]
            lines.append(f"top-{t['k']} sets: {t['exact']} exact, {t['tie_tolerated']} tie-tolerated, "
                         f"{t['violations']} violations")
    ls = report.get("loss")
    if ls:
        lines += ["", f"DKD loss (alpha {ls['alpha']}, beta {ls['beta']}), student {ls['student']}",
                  f"{'':<20} {'vs ideal cache: rel err':>24} {'cos med':>9} {'cos p5':>9}"
                  f" {'| vs live exact: rel err':>25} {'cos med':>9} {'cos p5':>9}", "-" * 110]
        for k, v in ls.items():
            if isinstance(v, dict) and "vs_ideal_cache" in v:
                a, b = v["vs_ideal_cache"], v["vs_live_exact"]
                lines.append(f"{k:<20} {a['rel_err']:>24.3g} {a['cos_median']:>9.6f} {a['cos_p5']:>9.6f}"
                             f" {b['rel_err']:>25.3g} {b['cos_median']:>9.6f} {b['cos_p5']:>9.6f}")
    rd = report.get("renderer_drift")
    if rd:
        lines += ["", f"renderer drift: {rd['other_renderer']} against the cache's {rd['cache_renderer']} "
                      f"(student {rd['student']}; reported, not judged)",
                  f"  pixels |a - b|: max {rd['pixels']['max_abs']:.0f}, mean {rd['pixels']['mean_abs']:.3f} levels; "
                  f"teacher logits |z_a - z_b|: max {rd['teacher_logits']['max_abs']:.4g}, "
                  f"median {rd['teacher_logits']['median_abs']:.4g}"]
        for k, v in rd.items():
            if k.startswith("grad_T"):
                lines.append(f"  DKD gradient, cache vs a cache of the other renderer, T={k[6:]}: cos median "
                             f"{v['cos_median']:.6f}, p5 {v['cos_p5']:.6f}, loss rel err {v['rel_err']:.3g}")
    tr = report.get("train")
    if tr:
        r, nf = tr["vs_reference"], tr["noise_floor"]

        def curve(xs):
            return " ".join(f"{x:.5f}" for x in xs[:8]) + (" ..." if len(xs) > 8 else "")

        lines += ["", f"training parity: {tr['steps']} SGD steps, batch {tr['batch']}, lr {tr['lr']}, T {tr['temperature']}"
                      f"{'' if tr['rule'] is None else ', rule ' + tr['rule']}; cache vs {tr['reference']}",
                  f"  {'loss (cache)':<19}{curve(tr['losses_cache'])}",
                  f"  {'loss (' + tr['reference'] + ')':<19}{curve(tr['losses_reference'])}",
                  f"  first step: loss {r['first_loss_rel_diff']:.3g}, weight update {r['first_update_rel_diff']:.3g} "
                  "(relative)",
                  f"  whole run:  max |loss diff| {r['max_abs_loss_diff']:.3g} (relative {r['max_rel_loss_diff']:.3g}); "
                  f"final weights {r['param_rel_to_norm']:.3g} of their norm, {r['param_rel_to_moved']:.3g} of the "
                  "distance moved",
                  f"  noise floor (reference with its teacher logits moved 1 ulp): max relative loss diff "
                  f"{nf['max_rel_loss_diff']:.3g}, final weights {nf['param_rel_to_norm']:.3g} of their norm"]
        if "vs_live" in tr:
            v = tr["vs_live"]
            lines.append(f"  cache vs live exact DKD (the codec's approximation): max relative loss diff "
                         f"{v['max_rel_loss_diff']:.3g}, final weights {v['param_rel_to_norm']:.3g} of their norm")
    for w in report.get("warnings", []):
        lines.append(f"warning: {w}")
    secs = report.get("seconds", {})
    lines += ["", f"{'PASSED' if report.get('passed') else 'FAILED'}"
                  f"  ({', '.join(f'{k} {v:.1f} s' for k, v in secs.items())})"]
    return "\n".join(lines)
