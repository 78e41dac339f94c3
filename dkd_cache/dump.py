"""dump-teacher: run the teacher once per recorded view and write its logits into the cache.

`dump_teacher` resolves the plan (settings -> teacher, codec, shard urls, the cache writer), then runs generator
stages into the writer. Stream shapes:
    this rank's pending shards (CacheWriter.my_shards)
      --render (DataLoader workers): iter_raw_samples, parse_sample, draw_view and augment.draw_augment,
        augment.render_view; a mixing recipe a mix window at a time (draw_mixes, apply_mix) ------>  RenderedSample
      --decode_samples (gpu renderer only): a few samples' bytes decoded at once on the device
        (gpu_decode), an undecodable one skipped or raised as the worker would -------->  RenderedSample
      --sample_views: recorded in the writer (boxes, flips, records, size, skip reason) ->  SampleViews (V views)
      --teacher_batches: one shard's views in (sample, view) order, cut every batch_size ->  TeacherBatch (B views)
      --teacher_logits: pixels to the device, normalise, forward ----------------------->  BatchLogits (B, classes)
      --encode: target (and a mixing recipe's target_b), lse, the codec's arrays ------->  LogitRows (numpy)
      --CacheWriter.add_logits: shard buffers; a whole shard -> its chunks, then on the commit thread fsync and
        its done record; CacheWriter.close marks the cache complete
Decoding and cropping run in DataLoader workers, overlapped with teacher compute in the main process.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import functools
import math
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import FORMAT_VERSION
from . import calibration
from . import dist as dist_mod
from . import host_threads, shard_scan
from . import augment, gpu_decode, renderers
from .cache_meta import CacheMeta, build_manifest, library_versions
from .cache_writer import CacheWriter, LogitRows, SampleRow, WriterSpec, open_writer
from .data import check_out_path, expand_shards, iter_raw_samples, keep_as_is, match_shards, parse_sample
from .dist import DistInfo
from .errors import BadSampleError, ConfigError, DKDCacheError, ShardError
from .codec_fidelity import AUTO
from .logit_codecs import Codec, parse_codec
from .progress import Progress
from .teacher import TeacherInfo, load_teacher
from .teacher_signal import (LSE, TARGET, TARGET_B, ComputePolicy, Storage, encode_entries, resolve_policy,
                             teacher_forward)
from .transfer import Loan, RingSlot, TransferRing, start_workers
from .views import Recipe, decode, draw_view, image_size_of, normalize, parse_positive_int, pixel_major


@dataclasses.dataclass(frozen=True, kw_only=True)
class DumpSettings:
    shards: str | Sequence[str]
    weights: str
    out: str
    arch: str = "resnet34"
    views: int = 10
    # "auto": the smallest candidate whose held-out fidelity on the calibration sample meets the bar at every stored
    # temperature (codec_fidelity.choose_auto); any other spec is used as given and its fidelity recorded
    codec: str = AUTO
    temperatures: tuple[float, ...] = (1.0,)
    recipe: Recipe = dataclasses.field(default_factory=Recipe)
    batch_size: int = 128
    workers: int = 2
    seed: int = 0
    device: str = "cpu"
    skip_bad: bool = False
    chunk_rows: int = 256
    allow_pipe: bool = False
    amp: str | None = None  # None: fp32 on CPU, bf16 on CUDA; "none" forces fp32; "bf16" forces bf16
    calibration_views: int = 4096  # views drawn before any row is written: 3/4 fit a learned codec, 1/4 score it
    alpha: float = 1.0  # the recipe's DKD weights the recorded fidelity is measured with (train-student's defaults)
    beta: float = 0.5
    lease_seconds: float = 120.0  # object-store caches: the writer lease lapses this long after its last renewal
    renderer: str = "cpu"  # renderers.RENDERERS: recorded in the cache; training and verify use it by default
    log_every: int = 20  # teacher batches between progress lines when stdout is not a terminal (Slurm, nohup)
    # under torchrun: how long the other ranks wait for rank 0's long phases (scanning shards on object storage,
    # fitting the codec, creating the cache) before a PeerError; a collective keeps its own 600 s timeout
    wait_seconds: float = dist_mod.DEFAULT_WAIT_S

    def __post_init__(self) -> None:
        object.__setattr__(self, "wait_seconds", dist_mod.parse_wait_seconds(self.wait_seconds))
        for name in ("views", "batch_size", "chunk_rows", "calibration_views", "log_every"):
            parse_positive_int(name, getattr(self, name))
        for name in ("alpha", "beta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}")
        if isinstance(self.workers, bool) or self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if not self.temperatures or any(not (t > 0 and math.isfinite(t)) for t in self.temperatures):
            raise ConfigError(f"temperatures must be positive and finite, got {list(self.temperatures)}")
        if self.amp not in (None, "none", "bf16"):
            raise ConfigError(f"amp must be 'none' or 'bf16', got {self.amp!r}")
        if not (self.lease_seconds > 0 and math.isfinite(self.lease_seconds)):
            raise ConfigError(f"lease_seconds must be positive, got {self.lease_seconds}")
        if not self.device.startswith(("cpu", "cuda")):
            raise ConfigError(f"device must be cpu or cuda, got {self.device!r}")
        renderers.parse_renderer(self.renderer)
        renderers.check_recipe(self.renderer, self.recipe)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DumpReport:
    path: str
    shards_done: int
    samples: int
    views_written: int
    skipped: int
    seconds: float
    views_per_s: float  # views written per second of the whole call (scan and set-up included)
    complete: bool
    rank: int = 0  # the counts are this rank's share (its shards); only rank 0 prints the summary
    world: int = 1
    codec: str = ""  # the cache's codec
    fidelity: str = ""  # its recorded held-out fidelity, one line, and with --codec auto why it was chosen
    decoded: dict[str, int] = dataclasses.field(default_factory=dict)  # gpu renderer: images by decoder path
    #                                          ("hardware", "cpu", "cpu fallback: <why>"); empty for the others


# ------------------------------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True, kw_only=True)
class DumpPlan:
    """Settings resolved: the teacher loaded, the codec parsed, the shard urls expanded, this process's rank."""

    settings: DumpSettings
    dist: DistInfo
    device: torch.device
    urls: tuple[str, ...]
    model: torch.nn.Module
    teacher: TeacherInfo
    compute: ComputePolicy  # how the teacher runs (fp32 means fp32: TF32 would move logits by ~1e-3 relative)
    codec: Codec  # as parsed (fp32 standing in for auto); fitted or chosen when the cache is created (calibrate)


def resolve_plan(s: DumpSettings) -> DumpPlan:
    dinfo = dist_mod.init(s.device, wait_s=s.wait_seconds)
    device = torch.device(f"cuda:{dinfo.local_rank}" if s.device == "cuda" else s.device)
    urls = expand_shards(s.shards, allow_pipe=s.allow_pipe)
    check_out_path(s.out, urls, [s.shards] if isinstance(s.shards, str) else list(s.shards))  # not an input
    model, tinfo = load_teacher(s.arch, s.weights, device=device)
    return DumpPlan(settings=s, dist=dinfo, device=device, urls=tuple(urls), model=model, teacher=tinfo,
                    compute=resolve_policy(device, s.amp),
                    codec=parse_codec("fp32" if s.codec == AUTO else s.codec, tinfo.num_classes))


def writer_spec(plan: DumpPlan) -> WriterSpec:
    """What the cache writer needs: this run's metadata (its manifest comes from the writer's scan), the scan of the
    shards (keys, labels, bad samples) and the fit of a learned codec on the teacher's logits."""
    s = plan.settings
    meta = CacheMeta(format_version=FORMAT_VERSION, teacher=plan.teacher, recipe=s.recipe, seed=s.seed,
                     views=s.views, codec=plan.codec, temperatures=tuple(float(t) for t in s.temperatures),
                     chunk_rows=s.chunk_rows, manifest=build_manifest((), s.chunk_rows), versions=library_versions(),
                     compute=plan.compute, renderer=renderers.renderer_info(s.renderer, plan.device))
    scan = functools.partial(shard_scan.scan_shards, list(plan.urls), plan.teacher.num_classes, s.skip_bad,
                             dist=plan.dist, cache=s.out, threads=max(2, s.workers * 2))
    calibrate = functools.partial(calibration.calibrate, model=plan.model, device=plan.device, urls=plan.urls,
                                  calibration_views=s.calibration_views, batch_size=s.batch_size, skip_bad=s.skip_bad,
                                  alpha=float(s.alpha), beta=float(s.beta), auto=s.codec == AUTO)
    return WriterSpec(out=s.out, meta=meta, scan=scan, calibrate=calibrate, codec_chosen=s.codec == AUTO,
                      dist=plan.dist, lease_seconds=s.lease_seconds)


def dump_teacher(settings: DumpSettings, *, progress: bool = True) -> DumpReport:
    t0 = time.perf_counter()
    plan = resolve_plan(settings)
    decoder = gpu_decode.decoder_for(plan.device) if settings.renderer == "gpu" else None
    decoded_before = collections.Counter(decoder.counts) if decoder is not None else collections.Counter()
    with open_writer(writer_spec(plan)) as writer:
        shards = writer.my_shards()
        run_stages(plan, writer, shards, show=progress and plan.dist.is_main)
        complete = writer.close()
    seconds = time.perf_counter() - t0
    counts = writer.counts
    fid = writer.meta.fidelity
    return DumpReport(path=str(settings.out), shards_done=len(shards),
                      samples=sum(writer.meta.manifest.shards[i].samples for i in shards), views_written=counts.views,
                      skipped=counts.skipped, seconds=seconds, views_per_s=counts.views / max(seconds, 1e-9),
                      complete=complete, rank=plan.dist.rank, world=plan.dist.world, codec=writer.meta.codec.name,
                      fidelity="not measured" if fid is None else (
                          f"held out ({fid.scored_views} views, beta {fid.beta:g}): {fid.summary()}"
                          + (f"\n{fid.choice}" if fid.choice else "")),
                      decoded=dict(decoder.counts - decoded_before) if decoder is not None else {})


# ------------------------------------------------------------------------------------------- worker stage

@dataclasses.dataclass(frozen=True, kw_only=True)
class RenderJob:
    shard: int  # index in the manifest
    url: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class RenderedSample:
    shard: int
    pos: int  # position in the shard (row = shard's row_start + pos)
    images: torch.Tensor | RingSlot | renderers.Compressed | None  # uint8 (V, 3, S, S), or the ring slot holding
    #     them; device renderer: the decoded (3, H, W); gpu renderer: the compressed image in the workers, then its
    #     decoded image on the device (decode_samples, in gpu_decode's layout); None when skipped
    boxes: np.ndarray  # (V, 4)
    flips: np.ndarray  # (V,)
    height: int
    width: int
    label: int
    skipped: str | None = None
    aug: np.ndarray | None = None  # uint8 (V, B): each view's packed augmentation record (augment.pack); None when
    #                                the recipe has none (crop + flip)
    labels_b: np.ndarray | None = None  # (V,) each view's mix partner's label (its own when unmixed); None when the
    #                                     recipe does not mix


@dataclasses.dataclass(frozen=True)
class RenderFailed:
    """A worker's error, handed to the main process, which raises it as it is."""

    error: DKDCacheError


class _RenderStream(IterableDataset):
    """Yields RenderedSample for each sample of this worker's shards (worker w takes shards w, w+W, …)."""

    def __init__(self, jobs: Sequence[RenderJob], meta: CacheMeta, skip_bad: bool, ring: TransferRing | None = None):
        self.jobs, self.meta, self.skip_bad, self.ring = list(jobs), meta, skip_bad, ring

    def __iter__(self) -> Iterator[RenderedSample | RenderFailed]:
        info = get_worker_info()
        jobs = self.jobs if info is None else self.jobs[info.id :: info.num_workers]
        for job in jobs:
            try:
                yield from render_shard(job.shard, job.url, self.meta, self.skip_bad,
                                        *((self.ring, info.id) if info is not None else ()))
            except DKDCacheError as e:
                yield RenderFailed(e)
                return


def die_with_parent(_worker_id: int = 0) -> None:
    """A DataLoader worker's init: on Linux the kernel kills the worker when the dump's process dies (SIGTERM from
    a scheduler, SIGKILL), so the worker's inherited copy of the writer lock's descriptor goes at once and an
    immediate rerun is not refused as 'being written by another dump-teacher process'."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl: nobody would signal us
        os._exit(1)


def render_loader(jobs: Sequence[RenderJob], meta: CacheMeta, s: DumpSettings) -> tuple[DataLoader, TransferRing | None]:
    """RenderedSample from DataLoader workers (in the main process without workers), and the ring of transfer slots
    the workers send each sample's views in (cpu renderer; None: fresh shared buffers)."""
    workers, prefetch = min(s.workers, len(jobs)), 4
    ring = None
    if workers and meta.renderer.name == "cpu":  # a slot per sample: those of a teacher batch, the prefetched, two more
        ring = TransferRing(workers, -(-s.batch_size // meta.views) + prefetch + 2,
                            (meta.views, 3, meta.recipe.image_size, meta.recipe.image_size))
    loader = DataLoader(_RenderStream(jobs, meta, s.skip_bad, ring), batch_size=None, num_workers=workers,
                        prefetch_factor=prefetch if workers else None, persistent_workers=False,
                        collate_fn=keep_as_is, worker_init_fn=die_with_parent if workers else None)
    return loader, ring


def render_shard(shard: int, url: str, meta: CacheMeta, skip_bad: bool, ring: TransferRing | None = None,
                 worker: int = 0) -> Iterator[RenderedSample]:
    """A shard's RenderedSamples, in position order; the V views of a sample in a slot of `ring` (DataLoader worker
    `worker`) when one is free, else in a fresh transfer buffer. A mixing recipe's samples are rendered a mix window
    at a time (a pair's two members lie in the same window), each window's samples yielded in position order.
    Stream shapes:
        iter_raw_samples --read_samples: parse, decode (the header only: gpu renderer) --> ReadSample
          --draw_sample: boxes, flips, augmentation parameters -----------------------> DrawnSample
          --render_sample, or a whole window: render_window (mix) --------------------> RenderedSample"""
    entry = meta.manifest.shards[shard]
    drawn = (draw_sample(r, meta) for r in read_samples(url, entry.name, entry.samples, meta, skip_bad))
    if not augment.mixes(meta.recipe):
        for d in drawn:
            yield render_sample(shard, d, meta, ring, worker)
        return
    window: list[DrawnSample] = []
    for d in drawn:  # positions 0, 1, ...: a window is W consecutive positions from a multiple of W
        window.append(d)
        if len(window) == meta.recipe.mix_window:
            yield from render_window(shard, entry.name, window, meta, ring, worker)
            window = []
    if window:  # the shard's last window (read_samples has checked the shard's sample count by now)
        yield from render_window(shard, entry.name, window, meta, ring, worker)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReadSample:
    """One sample of a shard as a worker reads it: its image decoded (pixel-major, for the cpu renderer), or its
    header read (gpu renderer: decoded in the main process); or why it is skipped (--skip-bad)."""

    pos: int
    key: str
    label: int
    image: torch.Tensor | renderers.Compressed | None  # None when skipped
    height: int
    width: int
    skipped: str | None = None


def read_samples(url: str, shard_name: str, samples: int, meta: CacheMeta, skip_bad: bool) -> Iterator[ReadSample]:
    """The shard's samples in tar order; a bad one raised as a BadSampleError, or with skip_bad yielded as skipped.
    A shard holding another number of samples than the manifest says is a ShardError (the shard changed)."""
    on_device = meta.renderer.name in renderers.BATCHED
    compressed = meta.renderer.name == "gpu"  # the header read and the views drawn here; decoded in the main process
    pos = 0
    for raw in iter_raw_samples(url):
        if pos >= samples:
            raise ShardError(f"{url}: holds more samples than when the cache was started; the shard changed")
        try:
            read = _read_sample(raw, pos, shard_name, meta, on_device, compressed)
        except BadSampleError as e:
            if not skip_bad:
                raise
            read = ReadSample(pos=pos, key="", label=-1, image=None, height=0, width=0, skipped=e.reason)
        yield read
        pos += 1
    if pos != samples:
        raise ShardError(f"{url}: holds {pos} samples, the cache's manifest says {samples}; the shard changed")


def _read_sample(raw: dict, pos: int, shard_name: str, meta: CacheMeta, on_device: bool,
                 compressed: bool) -> ReadSample:
    sample = parse_sample(raw, meta.num_classes)
    try:
        if compressed:
            h, w = image_size_of(sample.image)  # the bomb guard; decode_samples decodes
            img = renderers.Compressed(sample.image, h, w, shard_name, sample.key)
        else:
            img = (renderers.decode_for_device if on_device else decode)(sample.image)
            h, w = int(img.shape[1]), int(img.shape[2])
    except Exception as e:
        raise BadSampleError(shard_name, sample.key, f"image cannot be decoded ({e})") from None
    if max(h, w) > 65535:
        raise BadSampleError(shard_name, sample.key, f"image side {max(h, w)} exceeds 65535 pixels")
    if not on_device:
        img = pixel_major(img)  # converted once for its V views
    return ReadSample(pos=pos, key=sample.key, label=sample.label, image=img, height=h, width=w)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DrawnSample:
    """A read sample and its views' parameters, drawn from (seed, view, key) alone."""

    read: ReadSample
    boxes: np.ndarray  # uint16 (V, 4)
    flips: np.ndarray  # uint8 (V,)
    augs: tuple[augment.ViewAugment, ...] | None  # one per view; None: the recipe has no augmentation record


def draw_sample(read: ReadSample, meta: CacheMeta) -> DrawnSample:
    v, recipe = meta.views, meta.recipe
    boxes, flips = np.zeros((v, 4), np.uint16), np.zeros(v, np.uint8)
    if read.skipped is not None:
        return DrawnSample(read=read, boxes=boxes, flips=flips, augs=None)
    for view in range(v):
        top, left, bh, bw, flip = draw_view(meta.seed, view, read.key, read.height, read.width, recipe)
        boxes[view] = (top, left, bh, bw)
        flips[view] = flip
    augs = tuple(augment.draw_augment(meta.seed, view, read.key, recipe) for view in range(v)) \
        if augment.record_bytes(recipe) else None
    return DrawnSample(read=read, boxes=boxes, flips=flips, augs=augs)


def _skipped(shard: int, d: DrawnSample, meta: CacheMeta) -> RenderedSample:
    b = augment.record_bytes(meta.recipe)
    return RenderedSample(shard=shard, pos=d.read.pos, images=None, boxes=d.boxes, flips=d.flips, height=0, width=0,
                          label=-1, skipped=d.read.skipped, aug=np.zeros((meta.views, b), np.uint8) if b else None,
                          labels_b=np.full(meta.views, -1, np.int64) if augment.mixes(meta.recipe) else None)


def _views_buffer(meta: CacheMeta, ring: TransferRing | None, worker: int) -> tuple[torch.Tensor, RingSlot | None]:
    """Where a sample's V rendered views go: a free slot of the worker's ring, else a fresh transfer buffer."""
    shape = (3, meta.recipe.image_size, meta.recipe.image_size)
    lent = ring.acquire(worker, meta.views, shape) if ring is not None else None
    return (ring.buffer(lent) if lent is not None else renderers.transfer_buffer((meta.views, *shape))), lent


def _render_views(d: DrawnSample, meta: CacheMeta, out: torch.Tensor) -> torch.Tensor:
    """The sample's V views through augment.render_view (the one per-sample rendering of dump, training and
    verify), written into `out` (V, 3, S, S)."""
    for view in range(meta.views):
        out[view] = augment.render_view(d.read.image, tuple(int(x) for x in d.boxes[view]), bool(d.flips[view]),
                                        None if d.augs is None else d.augs[view], meta.recipe, contiguous=False)
    return out


def render_sample(shard: int, d: DrawnSample, meta: CacheMeta, ring: TransferRing | None,
                  worker: int) -> RenderedSample:
    """A sample of a recipe that does not mix: its views rendered (the device and gpu renderers render them on the
    device, in whole batches in the main process: the decoded or compressed image travels instead)."""
    if d.read.skipped is not None:
        return _skipped(shard, d, meta)
    recipe = meta.recipe
    if meta.renderer.name in renderers.BATCHED:
        images = d.read.image
    else:
        buf, lent = _views_buffer(meta, ring, worker)
        _render_views(d, meta, buf)
        images = lent or buf
    aug = None if d.augs is None else np.stack([augment.pack(a, None, d.read.pos, recipe) for a in d.augs])
    return RenderedSample(shard=shard, pos=d.read.pos, images=images, boxes=d.boxes, flips=d.flips,
                          height=d.read.height, width=d.read.width, label=d.read.label, aug=aug)


def render_window(shard: int, shard_name: str, window: Sequence[DrawnSample], meta: CacheMeta,
                  ring: TransferRing | None, worker: int) -> Iterator[RenderedSample]:
    """A mix window's samples (consecutive positions from a multiple of recipe.mix_window), in position order:
    every member's views rendered unmixed (in this worker's own memory), then, view by view, each member mixed with
    its partner's unmixed view of the same index (augment.draw_mixes pairs the window's positions; a pair whose
    partner is skipped is stored unmixed: mode 0, partner its own position) into the member's transfer slot. Only
    one slot is held at a time: the ring is sized as for a recipe that does not mix."""
    recipe, v, size = meta.recipe, meta.views, meta.recipe.image_size
    first = window[0].read.pos
    mixes = [augment.draw_mixes(meta.seed, view, shard_name, augment.window_of(first, recipe), len(window), recipe)
             for view in range(v)]
    unmixed = [None if d.read.skipped is not None else _render_views(d, meta, torch.empty((v, 3, size, size),
                                                                                          dtype=torch.uint8))
               for d in window]
    for i, d in enumerate(window):
        if d.read.skipped is not None:
            yield _skipped(shard, d, meta)
            continue
        buf, lent = _views_buffer(meta, ring, worker)
        records, labels_b = np.zeros((v, augment.record_bytes(recipe)), np.uint8), np.zeros(v, np.int64)
        for view in range(v):
            mix = mixes[view][i]
            j = mix.partner - first
            if unmixed[j] is None:  # the partner is a skipped sample: this one stays as it is
                mix = augment.ViewMix(partner=d.read.pos, mode=0)
                j = i
            buf[view] = augment.apply_mix(unmixed[i][view], unmixed[j][view], mix)
            records[view] = augment.pack(d.augs[view], mix, d.read.pos, recipe)
            labels_b[view] = window[j].read.label
        yield RenderedSample(shard=shard, pos=d.read.pos, images=lent or buf, boxes=d.boxes, flips=d.flips,
                             height=d.read.height, width=d.read.width, label=d.read.label, aug=records,
                             labels_b=labels_b)


# ------------------------------------------------------------------------------------------- main stages
@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SampleViews:
    """A sample's views as the teacher stage takes them (views 0: a skipped sample, which only counts)."""

    shard: int
    pos: int
    label: int
    views: int
    pixels: torch.Tensor | None  # uint8 (V, 3, S, S); device renderer: the decoded image (3, H, W); gpu: decoded
    #                               image on the device in gpu_decode's layout (`layout`)
    boxes: np.ndarray  # (V, 4)
    flips: np.ndarray  # (V,)
    loan: Loan | None  # the worker's ring slot holding `pixels`: released once its last view is in a teacher batch
    layout: str = "chw"  # of a decoded image (device and gpu renderers)
    labels_b: np.ndarray | None = None  # (V,) mixing recipes: each view's partner label (the teacher's second target)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ViewSpan:
    """Views first..stop-1 of one sample: a piece of a teacher batch."""

    sample: SampleViews
    first: int
    stop: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class TeacherBatch:
    """Views of one tar shard, in (sample, view) order."""

    shard: int
    spans: tuple[ViewSpan, ...]

    @property
    def size(self) -> int:
        return sum(sp.stop - sp.first for sp in self.spans)

    def pos(self) -> np.ndarray:
        return np.concatenate([np.full(sp.stop - sp.first, sp.sample.pos) for sp in self.spans])

    def view(self) -> np.ndarray:
        return np.concatenate([np.arange(sp.first, sp.stop) for sp in self.spans])

    def labels(self) -> np.ndarray:
        return np.concatenate([np.full(sp.stop - sp.first, sp.sample.label) for sp in self.spans])

    def labels_b(self) -> np.ndarray | None:
        """Each view's mix partner's label (its own label when unmixed); None when the recipe does not mix."""
        if self.spans[0].sample.labels_b is None:
            return None
        return np.concatenate([sp.sample.labels_b[sp.first:sp.stop] for sp in self.spans])


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchLogits:
    batch: TeacherBatch
    logits: torch.Tensor  # (B, classes) on the device


def decode_samples(items: Iterator[RenderedSample | RenderFailed], device: torch.device, skip_bad: bool,
                   per_call: int) -> Iterator[tuple[RenderedSample | RenderFailed, str]]:
    """gpu renderer: runs of `per_call` samples' compressed images decoded in one call on the device (gpu_decode;
    a sample's pixels do not depend on which others share the call). A sample that cannot be decoded is skipped
    with --skip-bad (recorded like a worker's skip), else a BadSampleError naming it. Yields (sample, layout)."""
    decoder = gpu_decode.decoder_for(device)
    run: list[RenderedSample | RenderFailed] = []
    for item in items:
        run.append(item)
        if len(run) == per_call or isinstance(item, RenderFailed):
            yield from _decode_run(run, decoder, skip_bad)
            run = []
    yield from _decode_run(run, decoder, skip_bad)


def _decode_run(run: list, decoder, skip_bad: bool) -> Iterator[tuple[RenderedSample | RenderFailed, str]]:
    todo = [i for i, x in enumerate(run) if isinstance(x, RenderedSample) and x.images is not None]
    dec = decoder.decode([run[i].images.data for i in todo])
    for i, img, err in zip(todo, dec.images, dec.errors):
        x = run[i]
        got = None if img is None else tuple(img.shape[1:] if dec.layout == "chw" else img.shape[:2])
        if err is None and got != (x.height, x.width):
            err = f"decoded size {got} differs from the header's {(x.height, x.width)}"
        if err is None:
            run[i] = dataclasses.replace(x, images=img)
            continue
        bad = BadSampleError(x.images.shard, x.images.key, f"image cannot be decoded ({err})")
        if not skip_bad:
            raise bad
        run[i] = dataclasses.replace(x, images=None, skipped=bad.reason, label=-1, height=0, width=0,
                                     boxes=np.zeros_like(x.boxes), flips=np.zeros_like(x.flips))
    for x in run:
        yield x, dec.layout


def sample_views(items: Iterator[RenderedSample | RenderFailed | tuple[RenderedSample | RenderFailed, str]],
                 writer: CacheWriter, ring: TransferRing | None) -> Iterator[SampleViews]:
    """Each sample recorded in the writer (its boxes, flips, size, skip reason), its views out of the worker's slot."""
    v = writer.meta.views
    for item in items:
        item, layout = item if isinstance(item, tuple) else (item, "chw")  # decode_samples says its layout
        if isinstance(item, RenderFailed):
            raise item.error
        writer.add_sample(SampleRow(shard=item.shard, pos=item.pos, boxes=item.boxes, flips=item.flips,
                                    height=item.height, width=item.width, skipped=item.skipped, aug=item.aug))
        pixels, loan = item.images, None
        if isinstance(pixels, RingSlot):
            loan = ring.lend(pixels)
            pixels = loan.tensor
        yield SampleViews(shard=item.shard, pos=item.pos, label=item.label, views=0 if pixels is None else v,
                          pixels=pixels, boxes=item.boxes, flips=item.flips, loan=loan, layout=layout,
                          labels_b=item.labels_b)


@dataclasses.dataclass(kw_only=True)
class _ShardQueue:
    spans: list[ViewSpan] = dataclasses.field(default_factory=list)
    views: int = 0  # views queued
    samples: int = 0  # samples arrived (skipped ones too)


def teacher_batches(samples: Iterator[SampleViews], meta: CacheMeta, batch_size: int) -> Iterator[TeacherBatch]:
    """Teacher batches hold views of one shard only, in (sample, view) order, cut every batch_size views (the last
    one of a shard when all its samples are in): the batches are a function of the shard alone, so the logits
    (which can differ in the last bit with batch composition) are the same whatever the worker count, rank count or
    crash-and-resume history."""
    queues: dict[int, _ShardQueue] = {}
    for s in samples:
        q = queues.setdefault(s.shard, _ShardQueue())
        q.samples += 1
        if s.views:
            q.spans.append(ViewSpan(sample=s, first=0, stop=s.views))
            q.views += s.views
        last = q.samples == meta.manifest.shards[s.shard].samples
        while q.views >= batch_size or (q.views and last):
            yield TeacherBatch(shard=s.shard, spans=_take(q, batch_size))
        if last:
            del queues[s.shard]


def _take(q: _ShardQueue, n: int) -> tuple[ViewSpan, ...]:
    """The first n queued views (or all of them), splitting a sample's span where the batch ends."""
    out, left = [], n
    while q.spans and left:
        sp = q.spans[0]
        k = min(left, sp.stop - sp.first)
        out.append(ViewSpan(sample=sp.sample, first=sp.first, stop=sp.first + k))
        if sp.first + k == sp.stop:
            q.spans.pop(0)
        else:
            q.spans[0] = ViewSpan(sample=sp.sample, first=sp.first + k, stop=sp.stop)
        left -= k
    q.views -= n - left
    return tuple(out)


def teacher_logits(batches: Iterator[TeacherBatch], meta: CacheMeta, model: torch.nn.Module,
                   device: torch.device) -> Iterator[BatchLogits]:
    policy = meta.compute or ComputePolicy()  # None: a cache written before the policy was recorded (fp32)
    for batch in batches:
        if meta.renderer.name in renderers.BATCHED:  # each decoded image once, its views rendered on the device
            pixels = renderers.render_batch(
                [sp.sample.pixels for sp in batch.spans],
                np.concatenate([sp.sample.boxes[sp.first:sp.stop] for sp in batch.spans]),
                np.concatenate([sp.sample.flips[sp.first:sp.stop] for sp in batch.spans]), meta.recipe, device,
                index=np.repeat(np.arange(len(batch.spans)), [sp.stop - sp.first for sp in batch.spans]),
                layout=batch.spans[0].sample.layout)
        else:
            pixels = renderers.stack([sp.sample.pixels[v] for sp in batch.spans for v in range(sp.first, sp.stop)],
                                     device.type == "cuda").to(device, non_blocking=True)
            for sp in batch.spans:  # copied: a sample's slot goes back with its last view ((sample, view) order)
                if sp.sample.loan is not None and sp.stop == sp.sample.views:
                    sp.sample.loan.release()
        yield BatchLogits(batch=batch, logits=teacher_forward(model, normalize(pixels, meta.recipe), policy))


def encode(logits: Iterator[BatchLogits], storage: Storage) -> Iterator[LogitRows]:
    for b in logits:
        labels_b = b.batch.labels_b()  # mixing recipes: the mixed view's second target, from the same logits
        with host_threads.one_thread():  # small per-batch work: threads cost more than they give (host_threads)
            stored = encode_entries(b.logits, torch.from_numpy(b.batch.labels()), storage,
                                    labels_b=None if labels_b is None else torch.from_numpy(labels_b))
            target_b = stored.pop(TARGET_B, None)
            rows = LogitRows(shard=b.batch.shard, pos=b.batch.pos(), view=b.batch.view(),
                             target=stored.pop(TARGET).cpu().numpy(), lse=stored.pop(LSE).cpu().numpy(),
                             encoded={name.split("/", 1)[1]: v.cpu().numpy() for name, v in stored.items()},
                             target_b=None if target_b is None else target_b.cpu().numpy())
        yield rows


def run_stages(plan: DumpPlan, writer: CacheWriter, shards: Sequence[int], *, show: bool) -> None:
    """This rank's shards through the stages into the writer. On a terminal a bar; in a log file a line every
    log_every teacher batches (views done/total, views/s, ETA, the batch's shard and the shards written so far).
    With the teacher on a GPU, this process's host work is small per-batch operations: one host thread for all of
    it (host_threads); on the CPU the teacher's forward keeps every thread and only encode and write run on one."""
    if not shards:
        return
    s, meta = plan.settings, writer.meta
    urls = match_shards([e.name for e in meta.manifest.shards], plan.urls).found
    jobs = [RenderJob(shard=i, url=urls[i]) for i in shards]
    loader, ring = render_loader(jobs, meta, s)
    storage = Storage(codec=writer.codec, num_classes=meta.num_classes, temperatures=tuple(meta.temperatures))
    rendered = start_workers(loader, ring and ring.need)  # a full /dev/shm: a SharedMemoryError here, not a SemLock
    if meta.renderer.name == "gpu":  # RenderedSample's compressed image -> decoded on the device
        rendered = decode_samples(rendered, plan.device, s.skip_bad, per_call=-(-s.batch_size // meta.views))
    # RenderedSample -> SampleViews -> TeacherBatch -> BatchLogits -> LogitRows
    rows = encode(teacher_logits(teacher_batches(sample_views(rendered, writer, ring), meta, s.batch_size),
                                 meta, plan.model, plan.device), storage)
    total = sum(meta.manifest.shards[i].samples for i in shards) * meta.views
    with (host_threads.one_thread() if plan.device.type != "cpu" else contextlib.nullcontext()), \
            Progress(total=total, label="dump-teacher" if plan.dist.world == 1 else
                     f"dump-teacher rank 0/{plan.dist.world} (its shards)", unit="view", enabled=show,
                     line_every=s.log_every) as bar:
        for r in rows:
            writer.add_logits(r)
            bar.advance(len(r.pos), info=f"shard {meta.manifest.shards[r.shard].name}, "
                                         f"{writer.counts.shards}/{len(shards)} shards written")
