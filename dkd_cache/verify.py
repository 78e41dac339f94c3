"""`dkd-cache verify`: the trust anchor. Is this cache what this teacher computes on these shards' recorded views?

verify() runs its phases in order, each a function returning its checks (verify_report.CheckResult: name, ok,
figure, tolerance, detail) and figures: integrity_phase and entries_phase (here), verify_fidelity.fidelity_phase,
verify_parity.parity_phase, then verify_report.build_report. What is checked, in order (every failed check is named
in the report with its figure and tolerance):

1. Integrity. The reader's own findings (Cache.check with deep: the cache is complete, every tar shard has its done
   record with the manifest's sample count, the per-sample arrays agree with the manifest, every chunk of a done
   shard is present, reads back whole - a damaged chunk fails its checksum: reported naming the array, never a
   crash - and holds finite, non-sentinel values on every status-OK row); then what the reader does not look at:
   top-k classes are distinct and in range, and p_t = exp(z_t/T - lse) <= 1 on every status-OK row; the shards
   given are the manifest's (data.match_shards: same names; data.index_differs: same keys by SHA-256 digest; same
   labels per sample); the teacher weights are the ones recorded at dump time (teacher.same_weights: the same tensors
   by their digest, teacher.tensors_digest, in whatever file format; for caches that record only the weights file's
   SHA-256, the same file). Library versions that differ from the dump's are warnings: what they change is measured
   below, as logit error.
2. Entries and fidelity. `samples` (view, sample) entries are drawn over the whole cache (systematic sampling over
   the status-OK rows in manifest order, so every shard gets its share; a random view per row; deterministic in
   `seed`). Each is re-rendered from its stored box and flip by the cache's renderer (renderers.render_views), and
   run through the live teacher in float32 (eval, inference_mode, TF32 off on CUDA, the dump's normalize). Compared,
   as median, p99 and max: the stored target logit, lse(z/T) per temperature and p_t against the live ones; the
   stored logits (top-k values, or every logit for codecs that decode full) against the live logits, within the
   codec's stated error bound (logit_codecs.Codec.error_bound) plus logit_tol; the stored top-k class set against
   the live one, tie-tolerant: a stored set passes if no class outside it has a live logit more than logit_tol above
   the smallest live logit inside it. The stored box is also re-drawn from (seed, view, key) with the recipe
   (views.draw_view); a different box is a failure under the dump's numpy version, a warning under another one.
   A recipe beyond crop and flip (RandAugment, colour jitter, random erasing, mixup, cutmix; verify_augment.py):
   each entry's stored augmentation record (views/aug) must unpack and equal, byte for byte, the one re-drawn from
   the seed (augment.draw_augment of (seed, view, key); augment.draw_mixes of the row's mix window, a pair whose
   partner was skipped stored unmixed) under the same numpy-version rule as boxes. The view is re-rendered through
   augment.render_view from the stored record, and a mixed view is mixed (augment.apply_mix) with its partner's
   same view, rendered from the partner's bytes (read from its shard) and stored box, flip and record: the live
   teacher sees the image the dump's teacher saw. The partner label's stored logit (logits/target_b) is compared
   like the target logit, and the losses below are the mixed ones (lam DKD(a) + (1 - lam) DKD(b), training's).
   A resize kernel on this host other than the one the cache records (renderers.resize_kernels: uint8 or float32
   bilinear) is a warning: what it changes is measured, as logit error.
   Loss fidelity. Student logits for the same inputs (the given student checkpoint, else a ResNet-18 initialised
   with torch.manual_seed(seed), in eval mode). At every cached temperature, DKD (alpha, beta) is computed three ways:
   from the stored entries exactly as training does (teacher_signal.dkd_from_entries; both residual rules for
   top-k codecs, the full-logit form for codecs that decode full); from an *ideal* cache, the live logits put
   through the same codec with the live target logit and lse; and exact DKD on the live logits. Stored against
   ideal is the check (relative batch-mean loss error <= loss_tol, median per-sample cosine of the gradients w.r.t.
   the student logits >= cosine_tol):
   it isolates what the cache got wrong from what the codec leaves out by design. Stored against live exact is the
   codec's approximation of DKD, and for lossy codecs (all but fp32) it is gated too, at the recipe's temperatures
   (`temperatures`; default every stored one) with the residual rule "uniform" for top-k codecs: median cosine >=
   live_cosine_tol, 5th percentile >= live_p5_tol, relative loss error <= live_loss_tol. A badly fitted basis, or a
   cache used at a temperature its codec does not serve, fails here even when every stored value is what the codec
   would store (the logit check of a learned codec is against its own round trip, so it cannot catch that).
3. Training parity (train_steps > 0). The same student (the checkpoint's weights, else the seeded ResNet-18) is
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
    live_cosine_tol 0.999, live_p5_tol 0.99, live_loss_tol 0.05: stored against live exact DKD. Looser than
                     --codec auto's bar (0.9995 / 0.995 on 1/4 of the calibration sample, codec_fidelity.py): verify
                     draws 64 entries by default, so its 5th percentile is the 4th worst entry. Measured on the
                     test fixtures (16 entries, random-init ResNet-18 student): q8 >= 0.99997 / 0.00055; topk:4 of
                     10 classes 0.998 / 0.992 / 0.031 at T=1 and 0.93 / 0.84 / 0.22 at T=4 (fails); a rank-1 basis
                     without corrections fails at both.
    parity_tol 1e-4  relative, float tolerance for the first training step from the cache against the reference
                     (measured: 0 to 1e-7 for correct caches).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import augment
from . import cache as cache_mod
from . import cache_meta
from . import renderers, shard_scan, verify_augment
from .api import open_cache
from .data import (IMAGE_EXTS, expand_shards, index_differs, iter_raw_samples, keys_digest, match_shards,
                   parse_sample)
from .errors import BadSampleError, CheckpointError, ConfigError, ShardError
from .logit_codecs import Codec
from .teacher import load_teacher, same_weights
from .verify_fidelity import fidelity_phase
from .verify_parity import parity_phase, skipped_parity
from .verify_report import Checks, PhaseResult, build_report, render_report  # noqa: F401  (render_report: the CLI's)
from .views import draw_view, image_size_of

PER_SAMPLE = ("status", "label", "shard", "key", "height", "width")


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
    # lossy codecs, stored against live exact DKD (the codec's own approximation), gated at these temperatures
    # (None: every stored one): median and 5th-percentile gradient cosine, relative loss error
    temperatures: tuple[float, ...] | None = None
    live_cosine_tol: float = 0.999
    live_p5_tol: float = 0.99
    live_loss_tol: float = 0.05
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
        for name in ("logit_tol", "loss_tol", "parity_tol", "alpha", "beta", "live_loss_tol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("cosine_tol", "live_cosine_tol", "live_p5_tol"):
            c = getattr(self, name)
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not -1 <= c <= 1:
                raise ConfigError(f"{name} must lie in [-1, 1], got {c!r}")
        if self.temperatures is not None and (not self.temperatures or any(
                isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t))
                for t in self.temperatures)):
            raise ConfigError(f"temperatures must be positive numbers, got {self.temperatures!r}")
        if isinstance(self.train_lr, bool) or not isinstance(self.train_lr, (int, float)) \
                or not (math.isfinite(self.train_lr) and self.train_lr > 0):
            raise ConfigError(f"train_lr must be > 0, got {self.train_lr!r}")
        if not isinstance(self.device, str) or not self.device.startswith(("cpu", "cuda")):
            raise ConfigError(f"device must be cpu or cuda, got {self.device!r}")
        for name in ("cache", "weights"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name} must be a path, got {getattr(self, name)!r}")


# --------------------------------------------------------------------------------------------- main
def verify(settings: VerifySettings) -> dict[str, Any]:
    """Run every phase; the report (JSON-serialisable) has "passed", "failures", "warnings", "checks" and figures."""
    t_start = time.perf_counter()
    s = settings
    device = _device(s.device)
    cache = open_cache(s.cache)  # the public API's open (api.open_cache), as a user's own loop opens it
    codec = cache.codec  # a learned codec comes with its basis, checked against the recorded hash

    # 1. integrity: the reader's findings, stored-value consistency, the shards given, the teacher's weights
    integrity = integrity_phase(cache, codec, s, device)
    # 2. entries: (view, sample) entries drawn over every shard, their stored values read, their views re-rendered
    entries = entries_phase(cache, codec, integrity, s)
    phases = [integrity.phase, entries.phase]
    comparable = bool(entries.names) and integrity.teacher is not None
    # 3. fidelity: the live teacher's logits and training's loss against the stored entries
    if comparable:
        fidelity = fidelity_phase(cache, codec, integrity.teacher, entries.images, entries.labels, entries.stored,
                                  entries.names, functools.partial(render_entries, entries, recipe=cache.meta.recipe),
                                  s, device, mix=entries.mix)
        phases.append(fidelity.phase)
    # 4. parity: a few training steps from the cache against the reference, from the same student
    if s.train_steps > 0:
        phases.append(parity_phase(codec, cache.meta, fidelity, entries.images, entries.labels, s, device)
                      if comparable else skipped_parity())
    # 5. report: every phase's checks, warnings and figures
    return build_report(phases, _head(cache, codec, s), integrity.versions_differ, time.perf_counter() - t_start)


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    return device


def _head(cache: cache_mod.Cache, codec: Codec, s: VerifySettings) -> dict[str, Any]:
    meta, m = cache.meta, cache.meta.manifest
    return {"cache": {"path": str(s.cache), "state": meta.state.value, "codec": codec.name, "classes": meta.num_classes,
                      "views": meta.views, "temperatures": list(meta.temperatures), "shards": len(m.shards),
                      "samples": m.samples, "teacher": meta.teacher.to_dict(), "recipe": meta.recipe.to_dict(),
                      "renderer": meta.renderer.to_dict(),
                      "resize_kernel": meta.renderer.kernel(meta.recipe.interpolation)},
            "settings": dataclasses.asdict(s)}


# --------------------------------------------------------------------------------------------- 1. integrity
@dataclasses.dataclass(frozen=True, kw_only=True)
class Integrity:
    phase: PhaseResult
    per: dict[str, np.ndarray]  # the per-sample arrays (PER_SAMPLE); empty when one cannot be read
    urls: dict[str, str]  # manifest shard name -> the url given for it
    teacher: torch.nn.Module | None  # the live teacher; None when it cannot stand in for the cache's
    drawable: np.ndarray  # (rows,) bool: status-OK rows of done shards that were given: where entries are drawn
    versions_differ: dict[str, dict[str, str | None]]


def integrity_phase(cache: cache_mod.Cache, codec: Codec, s: VerifySettings, device: torch.device) -> Integrity:
    t0 = time.perf_counter()
    meta, ck = cache.meta, Checks()
    # the reader's own findings: state, done records, layout, every chunk read back (checksums) and filled
    for finding in cache.check(deep=True):
        if not finding.warning:
            ck.check(finding.check.value, finding.ok, detail=finding.detail)
        elif not finding.ok:  # library versions: what they change is the logit error measured below
            ck.warn(f"{finding.check.value}: no, {finding.detail} (their effect is the logit error measured)")
    now = cache_meta.library_versions()
    versions_differ = {k: {"cache": meta.versions.get(k), "now": now.get(k)}
                       for k in sorted(set(meta.versions) | set(now)) if meta.versions.get(k) != now.get(k)}
    per = _read_per_sample(cache, ck)
    ok = _done_rows(cache) & (per["status"] == cache_meta.STATUS_OK) if per else np.zeros(meta.manifest.rows, bool)
    _stored_value_checks(cache, ok, ck)
    urls = _check_shards(cache, s, per.get("label"), ck)
    teacher = _check_teacher(cache, s, device, ck)
    given = np.zeros(meta.manifest.rows, bool)
    for e in meta.manifest.shards:
        given[e.row_start:e.row_stop] = e.name in urls
    return Integrity(phase=ck.done("integrity", seconds={"integrity": time.perf_counter() - t0}), per=per, urls=urls,
                     teacher=teacher, drawable=ok & given, versions_differ=versions_differ)


def _read_per_sample(cache: cache_mod.Cache, ck: Checks) -> dict[str, np.ndarray]:
    """The per-sample arrays whole; {} (no entry can be drawn) when one cannot be read, named as a failed check."""
    rows = cache.meta.manifest.rows
    try:
        return {name: cache.read_rows(f"samples/{name}", 0, rows) for name in PER_SAMPLE}
    except cache_mod.CacheError as e:
        ck.check("per-sample arrays readable", False, detail=str(e))
        return {}


def _done_rows(cache: cache_mod.Cache) -> np.ndarray:
    """(rows,) bool: rows of shards with a done record (the others' chunks may not exist yet)."""
    m = cache.meta.manifest
    done = np.ones(m.rows, bool)
    for i in cache.pending_shards():
        done[m.shards[i].row_start:m.shards[i].row_stop] = False
    return done


def _stored_value_checks(cache: cache_mod.Cache, ok: np.ndarray, ck: Checks) -> None:
    """What the reader's findings do not look at, on every status-OK row of a done shard: top-k classes in range
    and distinct, and p_t = exp(z_t / T - lse(z / T)) <= 1. A chunk that cannot be read is skipped here: the
    reader's findings name it."""
    meta = cache.meta
    n, c, v, classes = meta.manifest.rows, meta.chunk_rows, meta.views, meta.num_classes
    temps = np.asarray(meta.temperatures, np.float64)
    has_idx = "topk_idx" in cache.codec_arrays
    has_b = augment.mixes(meta.recipe)  # the partner label's logit, against the same lse
    out_of_range = repeated = above_one = above_one_b = 0
    for start in range(0, n, c):
        stop = min(n, start + c)
        ok_c = ok[start:stop]
        if not ok_c.any():
            continue
        try:
            tgt = cache.read_rows("logits/target", start, stop, view=slice(0, v))[:, ok_c].astype(np.float64)
            lse = cache.read_rows("logits/lse", start, stop, view=slice(0, v))[:, ok_c].astype(np.float64)
            idx = cache.read_rows("logits/topk_idx", start, stop, view=slice(0, v))[:, ok_c] if has_idx else None
            tgt_b = cache.read_rows("logits/target_b", start, stop, view=slice(0, v))[:, ok_c].astype(np.float64) \
                if has_b else None
        except cache_mod.CacheError:
            continue
        with np.errstate(invalid="ignore"):  # NaN rows are the reader's unfilled finding
            slack = 1e-4 + 1e-6 * np.abs(lse)  # float32 rounding of large logits
            above_one += int((tgt[..., None] / temps - lse > slack).any(axis=-1).sum())
            if tgt_b is not None:
                above_one_b += int((tgt_b[..., None] / temps - lse > slack).any(axis=-1).sum())
        if idx is not None:
            x = idx.astype(np.int64)
            out_of_range += int(((x < 0) | (x >= classes)).any(axis=-1).sum())
            srt = np.sort(x, axis=-1)
            repeated += int((srt[..., 1:] == srt[..., :-1]).any(axis=-1).sum())
    if has_idx:
        ck.check("top-k classes in range and distinct", not (out_of_range or repeated), out_of_range + repeated, 0,
                 detail=f"{out_of_range} out of range, {repeated} repeated")
    ck.check("stored p_t <= 1 (target logit vs lse)", above_one == 0, above_one, 0)
    if has_b:
        ck.check("stored partner p_t <= 1 (logits/target_b vs lse)", above_one_b == 0, above_one_b, 0)


def _check_shards(cache: cache_mod.Cache, s: VerifySettings, labels: np.ndarray | None, ck: Checks) -> dict[str, str]:
    """Shards given against the manifest (data.match_shards, data.index_differs): names, key digests, sample
    counts, labels. Returns name -> url of the shards given (their keys may still differ: entries are checked by
    key when their images are read)."""
    m = cache.meta.manifest
    names = [e.name for e in m.shards]
    match = match_shards(names, expand_shards(s.shards, allow_pipe=s.allow_pipe))
    ck.check("shards: every manifest shard given", not match.missing, len(match.missing), 0,
             detail=f"not given: {list(match.missing[:3])}" if match.missing else "")
    ck.check("shards: no shard outside the manifest", not match.extra, len(match.extra), 0,
             detail=f"not in the cache: {list(match.extra[:3])}" if match.extra else "")

    # one scan shared with dump and train: shards unchanged since their record beside the cache are not read again
    scanned = [(None, f"{type(r.error).__name__}: {r.error}") if r.error is not None
               else (shard_scan.apply_rules(r.index, cache.meta.num_classes, skip_bad=True), None)
               for r in shard_scan.scan_raw(list(match.found.values()), cache=cache.path)]
    unreadable, key_diff, label_diff, keys_in_order = [], [], [], []
    for i, (ix, err) in zip(match.found, scanned):
        entry = m.shards[i]
        if ix is None:
            unreadable.append(f"{entry.name} ({err})")
            continue
        keys_in_order.append(ix.keys)
        differs = index_differs(ix, entry.samples, entry.keys_sha256)
        if differs:
            key_diff.append(differs)
            continue
        if labels is not None:
            cached = labels[entry.row_start:entry.row_start + entry.samples]
            diff = np.flatnonzero(np.asarray(ix.labels) != cached)
            if diff.size:
                label_diff.append(f"{entry.name}: {diff.size} label(s) differ, first {ix.key(diff[0])!r} "
                                  f"shard {ix.labels[diff[0]]} cache {cached[diff[0]]}")
    ck.check("shards: readable", not unreadable, len(unreadable), 0, detail="; ".join(unreadable[:2]))
    ck.check("shards: keys match the manifest (SHA-256 per shard)", not key_diff,
             f"{len(key_diff)}/{len(match.found)}", 0, detail="; ".join(key_diff[:2]))
    if not match.missing and not unreadable and not key_diff:
        whole = np.concatenate(keys_in_order or [np.array([], "S1")])  # every key, as one array
        ck.check("shards: keys match the manifest (whole)", keys_digest(whole) == m.keys_sha256,
                 detail="the manifest's overall key digest differs")
    ck.check("shards: labels match the cache", not label_diff, len(label_diff), 0, detail="; ".join(label_diff[:2]))
    return {names[i]: url for i, url in match.found.items()}


def _check_teacher(cache: cache_mod.Cache, s: VerifySettings, device: torch.device,
                   ck: Checks) -> torch.nn.Module | None:
    """The weights given, loaded as the cache's arch: the ones the cache was dumped with (teacher.same_weights: the
    same tensors in any file format, or the same file for caches recording only its hash), of its classes."""
    recorded = cache.meta.teacher
    try:
        teacher, given = load_teacher(recorded.arch, s.weights, device=device)
    except (CheckpointError, ConfigError) as e:
        ck.check(f"teacher weights load as {recorded.arch}", False, detail=str(e))
        return None
    by_tensors = recorded.tensors_sha256 is not None
    ok = same_weights(given, recorded)
    ck.check("teacher weights SHA-256 = the cache's", ok,
             (given.tensors_sha256 if by_tensors else given.sha256)[:12],
             (recorded.tensors_sha256 if by_tensors else recorded.sha256)[:12],
             detail=("" if given.sha256 == recorded.sha256 else "the same tensors in another file") if ok else
             "these are not the weights the cache was dumped with (compared by the SHA-256 of their "
             f"{'tensors' if by_tensors else 'file: the cache records no tensor digest'})")
    if not ck.check("teacher classes = the cache's", given.num_classes == cache.meta.num_classes, given.num_classes,
                    cache.meta.num_classes):
        return None
    return teacher


# --------------------------------------------------------------------------------------------- 2. entries
@dataclasses.dataclass(frozen=True, kw_only=True)
class ViewSource:
    """What re-rendering one entry's view takes: the image's bytes and the stored box and flip; for a recipe beyond
    crop and flip also the stored augmentation and mix, and the mix partner's same view."""

    index: int  # the entry's position
    data: bytes
    box: tuple[int, int, int, int]  # top, left, height, width
    flip: bool
    aug: augment.ViewAugment | None = None
    mix: augment.ViewMix | None = None
    partner: verify_augment.ViewParams | None = None  # a mixed view's partner: its bytes, stored box, flip, aug


@dataclasses.dataclass(frozen=True, kw_only=True)
class Entries:
    phase: PhaseResult
    names: list[str]  # "shard/key view v" of each compared entry, for the report
    labels: torch.Tensor  # (n,) int64
    stored: dict[str, np.ndarray]  # array name -> (n, ...) the entries' stored values
    images: torch.Tensor  # (n, 3, S, S) uint8: the entries' views re-rendered by the cache's renderer
    sources: tuple[ViewSource, ...]  # the renderable entries' inputs (a box outside its image stays black)
    mix: dict[str, torch.Tensor]  # a mixing recipe's "mix/lam" and "mix/label" (n,) of the entries; else {}


def entries_phase(cache: cache_mod.Cache, codec: Codec, integrity: Integrity, s: VerifySettings) -> Entries:
    t0 = time.perf_counter()
    meta, m, per, ck = cache.meta, cache.meta.manifest, integrity.per, Checks()
    rows, views = draw_entries(np.flatnonzero(integrity.drawable), meta.views, s.samples, s.seed)
    stored, usable = _read_entries(cache, entry_arrays(cache, codec), rows, views, ck)
    # a recipe beyond crop and flip: each entry's record unpacked, and its mix partner's same view read (a record
    # that cannot be unpacked, or names no sample of its shard, leaves its entry out, named as a failed check)
    records: list[verify_augment.RowRecord | None] = []
    partners, partner_stored = rows, stored
    if "views/aug" in stored:
        records, problems = verify_augment.unpack_records(meta, rows, stored["views/aug"], per.get("status"))
        ck.check("stored augmentation records unpack (the recipe's sections, a partner in the shard)", not problems,
                 f"{len(problems)}/{rows.size}", 0, detail="; ".join(problems[:2]))
        usable &= np.array([r is not None for r in records], bool)
        partners = np.array([r.partner_row if r is not None else row for r, row in zip(records, rows.tolist())],
                            np.int64)
        if augment.mixes(meta.recipe):  # the partners' same views, as stored
            partner_stored, partner_usable = _read_entries(cache, ["views/box", "views/flip", "views/aug"],
                                                           partners, views, ck)
            usable &= partner_usable
    drawn = np.unique(np.concatenate([rows, partners]))  # only these rows' keys as str, never one per sample
    keys = dict(zip(drawn.tolist(), cache_mod.decode_keys(per["key"][drawn]))) if per else {}
    images_bytes = _load_images(cache, integrity.urls, np.concatenate([rows[usable], partners[usable]]), keys, per,
                                ck) if per else {}
    loaded = np.fromiter(images_bytes, np.int64, len(images_bytes))
    keep = usable & np.isin(rows, loaded) & np.isin(partners, loaded)
    rows, views, partners = rows[keep], views[keep], partners[keep]
    stored = {k: v[keep] for k, v in stored.items()}
    partner_stored = {k: v[keep] for k, v in partner_stored.items()}
    records = [r for r, k in zip(records, keep) if k] if records else []
    n = int(rows.size)
    names = [f"{m.shards[per['shard'][r]].name}/{keys[r]} view {v}" for r, v in zip(rows, views)]
    figures = {"entries": {"requested": s.samples, "drawn": int(keep.size), "compared": n,
                           "shards_covered": int(np.unique(per["shard"][rows]).size) if n else 0}}
    ck.check("entries compared", n > 0 and integrity.teacher is not None, n, ">= 1",
             detail="" if n else "no drawn entry could be read, matched and re-rendered")

    # the stored boxes: re-drawn from (seed, view, key) with the recipe, and inside their images
    box_mismatch, outside, sources = 0, [], []
    for i, (r, v) in enumerate(zip(rows, views)):
        box, flip = tuple(int(x) for x in stored["views/box"][i]), bool(stored["views/flip"][i])
        h, w = int(per["height"][r]), int(per["width"][r])
        box_mismatch += draw_view(meta.seed, int(v), keys[r], h, w, meta.recipe) != (*box, flip)
        top, left, bh, bw = box
        if bh <= 0 or bw <= 0 or top + bh > h or left + bw > w:
            outside.append(f"{keys[r]} view {v}: box {box} outside the {h}x{w} image")
            continue
        source = ViewSource(index=i, data=images_bytes[int(r)], box=box, flip=flip)
        if records:  # beyond crop and flip: the stored augmentation, and the partner's same view when mixed
            mix, p = records[i].mix, int(partners[i])
            partner = None if mix is None or mix.mode == 0 else verify_augment.partner_params(
                meta, p, images_bytes[p], partner_stored["views/box"][i], partner_stored["views/flip"][i],
                partner_stored["views/aug"][i])
            source = dataclasses.replace(source, aug=records[i].aug, mix=mix, partner=partner)
        sources.append(source)
    ck.check("stored boxes lie inside their images", not outside, len(outside), 0, detail="; ".join(outside[:2]))
    other_numpy = meta.versions.get("numpy") != cache_meta.library_versions().get("numpy")
    if box_mismatch and other_numpy:
        ck.warn(f"{box_mismatch} of {n} stored views differ from a re-draw with the recipe under another numpy "
                "version (training uses the stored boxes)")
    else:
        ck.check("stored views = re-drawn from (seed, view, key) and the recipe", box_mismatch == 0,
                 f"{box_mismatch}/{n}", 0, detail="the recipe metadata does not describe these views"
                 if box_mismatch else "")
    if "views/aug" in stored and n:  # each record re-drawn from the seed: draw_augment, draw_mixes of its window
        bad = verify_augment.record_mismatches(meta, per["status"], rows, views, keys, stored["views/aug"])
        if bad and other_numpy:
            ck.warn(f"{len(bad)} of {n} stored augmentation records differ from a re-draw with the recipe under "
                    "another numpy version (training uses the stored records)")
        else:
            ck.check("stored augmentations = re-drawn from (seed, view, key) and the recipe", not bad,
                     f"{len(bad)}/{n}", 0, detail=f"first: {names[bad[0]]}; the views/aug records are not the "
                     "ones the recipe draws" if bad else "")
    recorded = meta.renderer.resize.get(meta.recipe.interpolation)
    here = renderers.resize_kernels(meta.renderer.name).get(meta.recipe.interpolation)
    if recorded is not None and recorded != here:
        ck.warn(f"the cache's views were resized with {recorded} (CPU capability {meta.renderer.cpu_capability}); "
                f"this host resizes them with {here}: the re-rendered pixels may differ (their effect is the logit "
                "error measured)")
    images = _render(n, sources, meta.renderer.name, meta.recipe)
    labels = torch.as_tensor(per["label"][rows].astype(np.int64)) if per else torch.zeros(0, dtype=torch.int64)
    mix = verify_augment.mix_entries(records, per["label"], meta.recipe.image_size) \
        if augment.mixes(meta.recipe) and per else {}
    return Entries(phase=ck.done("entries", figures, {"entries": time.perf_counter() - t0}), names=names,
                   labels=labels, stored=stored, images=images, sources=tuple(sources), mix=mix)


def render_entries(entries: Entries, name: str, *, recipe) -> torch.Tensor:
    """The entries' views rendered by renderer `name` (another than the cache's: verify --renderer)."""
    return _render(entries.images.shape[0], entries.sources, name, recipe)


def _render(n: int, sources: Sequence[ViewSource], name: str, recipe) -> torch.Tensor:
    """uint8 (n, 3, S, S): each source rendered at its index by renderers.render_views (all at once), black
    elsewhere. A recipe beyond crop and flip renders on the CPU, view by view as the dump does
    (verify_augment.render_source: augment.render_view, and apply_mix with the partner's view)."""
    out = torch.zeros((n, 3, recipe.image_size, recipe.image_size), dtype=torch.uint8)
    if augment.record_bytes(recipe):
        renderers.check_recipe(name, recipe)  # the device and gpu renderers render crop and flip only
        for x in sources:
            own = verify_augment.ViewParams(data=x.data, box=x.box, flip=x.flip, aug=x.aug)
            out[x.index] = verify_augment.render_source(own, x.partner, x.mix, recipe)
        return out
    if sources:
        done = renderers.render_views(name, [x.data for x in sources], np.array([x.box for x in sources]),
                                      np.array([x.flip for x in sources]), recipe)
        out[[x.index for x in sources]] = done
    return out


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


def entry_arrays(cache: cache_mod.Cache, codec: Codec) -> list[str]:
    """The per-view arrays an entry is compared by: box, flip, target logit, lse, the codec's arrays, and for a
    recipe beyond crop and flip its augmentation record (views/aug) and partner target logit (logits/target_b)."""
    recipe = cache.meta.recipe
    return ["views/box", "views/flip", *(["views/aug"] if augment.record_bytes(recipe) else []),
            "logits/target", *(["logits/target_b"] if augment.mixes(recipe) else []), "logits/lse",
            *(f"logits/{a}" for a in codec.arrays(cache.meta.num_classes))]


def _read_entries(cache: cache_mod.Cache, names: Sequence[str], rows: np.ndarray, views: np.ndarray,
                  ck: Checks) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The stored values of arrays `names` at the entries (row, view): one read per chunk and array, of the views
    drawn there. Returns ({array name: (n, ...)}, usable (n,)): an entry in a chunk that cannot be read, or holding
    a fill value, is not usable (the reader's findings name the chunk)."""
    c, n = cache.meta.chunk_rows, rows.size
    usable, stored = np.ones(n, bool), {}
    chunk = rows - rows % c
    for name in names:
        try:
            arr = cache.array(name)
        except cache_mod.CacheError as e:
            ck.check(f"array {name}", False, detail=str(e))
            usable[:] = False
            stored[name] = np.zeros((n, 4) if name == "views/box" else (n,), np.int64)
            continue
        out = np.zeros((n, *arr.shape[2:]), arr.dtype)
        for start in np.unique(chunk):
            sel = np.flatnonzero(chunk == start)
            v0, v1 = int(views[sel].min()), int(views[sel].max()) + 1
            try:
                vals = cache.read_rows(name, int(start), min(int(start) + c, arr.shape[1]), view=slice(v0, v1))
            except cache_mod.CacheError:
                usable[sel] = False
                continue
            out[sel] = vals[views[sel] - v0, rows[sel] - start]
            usable[sel] &= ~cache_mod.unfilled_rows(name, out[sel])
        stored[name] = out
    return stored, usable


def _load_images(cache: cache_mod.Cache, urls: dict[str, str], rows: np.ndarray, keys: dict[int, str],
                 per: dict[str, np.ndarray], ck: Checks) -> dict[int, bytes]:
    """Image bytes of the drawn rows from their shards, checked against the cache's key, label and size."""
    m = cache.meta.manifest
    labels, heights, widths = per["label"], per["height"], per["width"]
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
    ck.check("drawn samples found in the shards (key, label, size)", not missing,
             f"{len(missing)}/{len(np.unique(rows))}", 0, detail="; ".join(problems[:3]))
    return images
