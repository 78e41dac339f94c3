"""dump-teacher: run the teacher once per recorded view and write its logits into the cache.

Stream shapes:
    pending shard ids (this rank's share)
      --worker: iter_raw_samples + parse_sample + draw_view + render-->  RenderedSample (V views of one sample)
      --main: batch views ------------------------------------------>  uint8 (B, 3, S, S) + where each row goes
      --teacher, encode ------------------------------------------->  per-shard buffers (V, rows, …)
      --write_shard when a shard is whole ------------------------->  Zarr chunks; on the commit thread: fsync,
                                                                       then the shard's done record
Decoding and cropping run in DataLoader workers, overlapped with teacher compute in the main process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import FORMAT_VERSION
from . import cache as cache_mod
from . import cache_meta
from . import cache_writer
from . import host_threads
from . import dist as dist_mod
from . import store as store_mod
from .data import REMOTE_PREFIXES, keep_as_is, expand_shards, iter_raw_samples, parse_sample, scan_shards, shard_name
from .errors import BadSampleError, CacheMismatchError, ConfigError, DKDCacheError, ShardError
from .calibration import calibration_logits, calibration_plan, render_plan
from .logit_codecs import parse_codec
from .progress import Progress
from . import renderers
from .teacher import load_teacher
from .transfer import RingSlot, TransferRing
from .teacher_signal import LSE, TARGET, ComputePolicy, Storage, encode_entries, resolve_policy, teacher_forward
from .views import Recipe, decode, draw_view, normalize, parse_positive_int, pixel_major, render_decoded


@dataclasses.dataclass(frozen=True, kw_only=True)
class DumpSettings:
    shards: str | Sequence[str]
    weights: str
    out: str
    arch: str = "resnet34"
    views: int = 10
    # the smallest codec meeting cos median >= 0.999, p5 >= 0.99 at T = 1 on every source (benchmarks/fidelity.py);
    # learned: fitted on a calibration sample before any row. T = 4 recipes: use "q8" (README, Logit codecs)
    codec: str = "lowrank:64+top:128+sparse:32"
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
    calibration_views: int = 4096  # learned codecs (lowrank): views the basis is fitted on, before any row is written
    lease_seconds: float = 120.0  # object-store caches: the writer lease lapses this long after its last renewal
    renderer: str = "cpu"  # renderers.RENDERERS: recorded in the cache; training and verify use it by default
    log_every: int = 20  # teacher batches between progress lines when stdout is not a terminal (Slurm, nohup)

    def __post_init__(self) -> None:
        for name in ("views", "batch_size", "chunk_rows", "calibration_views", "log_every"):
            parse_positive_int(name, getattr(self, name))
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
    images_per_s: float
    complete: bool
    rank: int = 0  # the counts are this rank's share (its shards); only rank 0 prints the summary
    world: int = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class RenderedSample:
    shard: int
    pos: int  # position in the shard (row = shard's row_start + pos)
    images: torch.Tensor | RingSlot | None  # uint8 (V, 3, S, S), or the ring slot holding them; device renderer:
    #                                         the decoded (3, H, W); None when skipped
    boxes: np.ndarray  # (V, 4)
    flips: np.ndarray  # (V,)
    height: int
    width: int
    label: int
    skipped: str | None = None


def check_out_path(out: str, urls: Sequence[str], patterns: Sequence[str] = ()) -> None:
    """Refuse an output that is an input shard, holds input shards, or that an input pattern (glob or brace
    pattern) would match, so that a later run with the same --shards would read the cache as a shard. A cache
    beside its shards, or in a folder below them, is fine."""
    if store_mod.is_remote(out):
        prefix = out.rstrip("/")
        if any(u == prefix or u.startswith(prefix + "/") for u in urls):
            raise ConfigError(f"--out {out} is or holds input shards; choose another prefix")
        return
    out_p = Path(out).resolve()
    for u in urls:
        if u.startswith(REMOTE_PREFIXES):
            continue
        up = Path(u).resolve()
        if out_p == up or out_p in up.parents:
            raise ConfigError(f"--out {out} is or holds the input shard {u}; choose another path")
    for spec in patterns:
        if spec.startswith(REMOTE_PREFIXES) or not any(c in spec for c in "*?[{"):
            continue
        for one in braceexpand.braceexpand(spec):
            if fnmatch.fnmatchcase(str(out_p), str(Path(one).absolute().resolve())):
                raise ConfigError(f"--out {out} matches the input pattern {spec!r}: a later run with the same "
                                  "--shards would read the cache as a shard; choose a path the pattern misses")


# ------------------------------------------------------------------------------------------- worker stage
class _RenderStream(IterableDataset):
    """Yields RenderedSample for each sample of this worker's shards (worker w takes shards w, w+W, …)."""

    def __init__(self, jobs: list[tuple[int, str]], meta: cache_meta.CacheMeta, skip_bad: bool,
                 ring: TransferRing | None = None):
        self.jobs, self.meta, self.skip_bad, self.ring = jobs, meta, skip_bad, ring

    def __iter__(self) -> Iterator[RenderedSample | tuple[str, DKDCacheError]]:
        info = get_worker_info()
        jobs = self.jobs if info is None else self.jobs[info.id :: info.num_workers]
        for shard, url in jobs:
            try:
                yield from render_shard(shard, url, self.meta, self.skip_bad,
                                        *((self.ring, info.id) if info is not None else ()))
            except DKDCacheError as e:  # handed to the main process, which raises it as it is
                yield ("error", e)
                return


def render_shard(shard: int, url: str, meta: cache_meta.CacheMeta, skip_bad: bool, ring: TransferRing | None = None,
                 worker: int = 0) -> Iterator[RenderedSample]:
    """A shard's RenderedSamples; the V views of a sample in a slot of `ring` (DataLoader worker `worker`) when one
    is free, else in a fresh transfer buffer."""
    entry = meta.manifest.shards[shard]
    recipe, v = meta.recipe, meta.views
    on_device = meta.renderer.name == "device"
    pos = 0
    for raw in iter_raw_samples(url):
        if pos >= entry.samples:
            raise ShardError(f"{url}: holds more samples than when the cache was started; the shard changed")
        empty = RenderedSample(shard=shard, pos=pos, images=None, boxes=np.zeros((v, 4), np.uint16),
                               flips=np.zeros(v, np.uint8), height=0, width=0, label=-1)
        try:
            sample = parse_sample(raw, meta.num_classes)
            try:
                img = (renderers.decode_for_device if on_device else decode)(sample.image)
            except Exception as e:
                raise BadSampleError(entry.name, sample.key, f"image cannot be decoded ({e})") from None
            h, w = int(img.shape[1]), int(img.shape[2])
            if max(h, w) > 65535:
                raise BadSampleError(entry.name, sample.key, f"image side {max(h, w)} exceeds 65535 pixels")
            boxes = np.zeros((v, 4), np.uint16)
            flips = np.zeros(v, np.uint8)
            lent = None
            if not on_device:
                shape = (3, recipe.image_size, recipe.image_size)
                lent = ring.acquire(worker, v, shape) if ring is not None else None
                images = ring.buffer(lent) if lent is not None else renderers.transfer_buffer((v, *shape))
                img = pixel_major(img)  # converted once for its V views
            for view in range(v):
                top, left, bh, bw, flip = draw_view(meta.seed, view, sample.key, h, w, recipe)
                boxes[view] = (top, left, bh, bw)
                flips[view] = flip
                if not on_device:  # the device renderer renders whole batches in the main process
                    images[view] = render_decoded(img, (top, left, bh, bw), flip, recipe, contiguous=False)
            yield dataclasses.replace(empty, images=img if on_device else lent or images, boxes=boxes, flips=flips,
                                      height=h, width=w, label=sample.label)
        except BadSampleError as e:
            if not skip_bad:
                raise
            yield dataclasses.replace(empty, skipped=e.reason, label=-1)
        pos += 1
    if pos != entry.samples:
        raise ShardError(f"{url}: holds {pos} samples, the cache's manifest says {entry.samples}; the shard changed")


# ------------------------------------------------------------------------------------------- main stage
class _ShardBuffer:
    """Accumulates one tar shard's rows until every view of every sample has its logits."""

    def __init__(self, cache: cache_mod.Cache, shard: int, codec_arrays: dict[str, tuple[tuple[int, ...], Any]],
                 status: np.ndarray):
        meta = cache.meta
        entry = meta.manifest.shards[shard]
        rows, v = entry.row_stop - entry.row_start, meta.views
        self.shard, self.entry, self.expected, self.filled = shard, entry, entry.samples, 0
        self.block: dict[str, np.ndarray] = {
            "samples/status": status[entry.row_start : entry.row_stop].copy(),  # as created (scan-time skips)
            "samples/height": np.zeros(rows, np.int32),
            "samples/width": np.zeros(rows, np.int32),
            "views/box": np.zeros((v, rows, 4), np.uint16),
            "views/flip": np.zeros((v, rows), np.uint8),
            "logits/target": np.zeros((v, rows), np.float32),
            "logits/lse": np.zeros((v, rows, len(meta.temperatures)), np.float32),
        }
        for name, (tail, dtype) in codec_arrays.items():
            self.block[f"logits/{name}"] = np.zeros((v, rows, *tail), dtype)
        self.cache = cache
        self.skipped: list[cache_meta.SkippedSample] = []
        self.pending_views = 0

    def add_sample(self, s: RenderedSample) -> None:
        self.block["samples/height"][s.pos] = s.height
        self.block["samples/width"][s.pos] = s.width
        self.block["views/box"][:, s.pos] = s.boxes
        self.block["views/flip"][:, s.pos] = s.flips
        if s.skipped is not None:
            self.block["samples/status"][s.pos] = cache_meta.STATUS_SKIPPED
            key = cache_mod.decode_keys(self.cache.read_rows("samples/key", self.entry.row_start + s.pos,
                                                             self.entry.row_start + s.pos + 1))[0]
            self.skipped.append(cache_meta.SkippedSample(shard=self.entry.name, key=key, reason=s.skipped))
            self.filled += 1

    def add_logits(self, pos: np.ndarray, view: np.ndarray, encoded: dict[str, np.ndarray],
                   target: np.ndarray, lse: np.ndarray) -> None:
        self.block["logits/target"][view, pos] = target
        self.block["logits/lse"][view, pos] = lse
        for name, values in encoded.items():
            self.block[f"logits/{name}"][view, pos] = values


def dump_teacher(settings: DumpSettings, *, progress: bool = True) -> DumpReport:
    s = settings
    dinfo = dist_mod.init(s.device)
    device = torch.device(f"cuda:{dinfo.local_rank}" if s.device == "cuda" else s.device)
    t0 = time.perf_counter()
    urls = expand_shards(s.shards, allow_pipe=s.allow_pipe)
    check_out_path(s.out, urls, [s.shards] if isinstance(s.shards, str) else list(s.shards))
    model, tinfo = load_teacher(s.arch, s.weights, device=device)
    # fp32 means fp32 (TF32 would move logits by ~1e-3 relative); set around each forward, never left global
    compute = resolve_policy(device, s.amp)
    codec = parse_codec(s.codec, tinfo.num_classes)

    out = store_mod.location(s.out)
    with contextlib.ExitStack() as held:
        # Rank 0 takes the writer lease, indexes the shards and creates (or checks) the store; the others wait,
        # then open it. On disk every rank holds its own flock; on an object store rank 0 holds the lease object
        # and the other ranks check, before each commit, that it is still rank 0's.
        error: DKDCacheError | None = None
        lease = None
        if dinfo.is_main or not out.is_remote:
            try:
                lease = held.enter_context(out.writer_lease(dinfo.rank, seconds=s.lease_seconds))
            except DKDCacheError as e:
                error = e
        if dinfo.is_main and error is None:
            try:
                out.remove_stale()
                indexes = scan_shards(urls, tinfo.num_classes, s.skip_bad, threads=max(2, s.workers * 2))
                meta = cache_meta.CacheMeta(
                    format_version=FORMAT_VERSION, teacher=tinfo, recipe=s.recipe, seed=s.seed,
                    views=s.views, codec=codec, temperatures=tuple(float(t) for t in s.temperatures),
                    chunk_rows=s.chunk_rows, manifest=cache_meta.build_manifest(indexes, s.chunk_rows),
                    versions=cache_meta.library_versions(), compute=compute,
                    renderer=renderers.renderer_info(s.renderer))
                if out.exists("zarr.json"):
                    existing = cache_mod.open_cache(s.out, mode="r+")
                    if existing.meta.codec.name == codec.name:
                        # the same codec: a learned one keeps its stored basis (resume never refits)
                        meta = dataclasses.replace(meta, codec=existing.meta.codec)
                    diffs = existing.meta.differences(meta)
                    if diffs:
                        raise CacheMismatchError(f"{s.out} holds a cache made with other settings; refusing to mix "
                                                 "them. Differences: " + "; ".join(diffs) + ". Use another --out.")
                elif not out.is_empty() and not (out.is_remote and out.keys("_dkd") == ["lease.json"]):
                    raise cache_mod.CacheError(f"{s.out} exists and is not a dkd-cache store; choose another --out")
                else:
                    if codec.learned:
                        codec = fit_codec(codec, indexes, urls, meta, model, s)
                        meta = dataclasses.replace(meta, codec=codec)
                    cache_writer.create_cache(s.out, meta, indexes, codec.arrays(tinfo.num_classes), codec.state_arrays())
            except DKDCacheError as e:
                error = e
        shared = dist_mod.broadcast_object(dinfo, (None if error is None else f"{type(error).__name__}: {error}",
                                                   None if lease is None else lease.owner))
        message, owner = shared
        if error is not None:
            raise error
        if message is not None:
            raise DKDCacheError(f"rank 0 failed: {message}")
        if lease is None:  # a rank > 0 on an object store: checks rank 0's lease
            lease = held.enter_context(out.writer_lease(dinfo.rank, seconds=s.lease_seconds, owner=owner))
        cache = cache_mod.open_cache(s.out, mode="r+")
        codec = cache.codec  # with its basis, checked against the recorded hash (every rank reads the same one)
        codec_arrays = codec.arrays(tinfo.num_classes)

        # One plan for every rank: rank 0 lists the done records once, before any rank can write, and every rank
        # splits that same list. (Each rank listing on its own raced with the fastest rank's first done record: a
        # late rank saw a shorter list, so its round-robin share shifted, a shard went to no rank, another to two.)
        pending = dist_mod.on_rank0(dinfo, cache.pending_shards)
        mine = pending[dinfo.rank :: dinfo.world]  # whole shards per rank: each rank writes only its own chunks
        by_name = {shard_name(u): u for u in urls}
        jobs = [(i, by_name[cache.meta.manifest.shards[i].name]) for i in mine]
        n_samples = sum(cache.meta.manifest.shards[i].samples for i in mine)
        label = "dump-teacher" if dinfo.world == 1 else f"dump-teacher rank 0/{dinfo.world} (its shards)"
        views_written, skipped = _run(cache, model, codec, codec_arrays, jobs, s, device, n_samples,
                                      progress and dinfo.is_main, label, lease)

        # Once every rank has written (and committed) its shards, rank 0, which holds the lease, marks the cache
        # complete; finalize refuses (CacheError on every rank) if any shard of the plan has no done record, so
        # a dump never ends successfully with the cache still 'writing'.
        dist_mod.barrier(dinfo)

        def mark_complete() -> bool:
            return cache_writer.finalize(cache, lease).meta.state is cache_meta.CacheState.COMPLETE

        complete = dist_mod.on_rank0(dinfo, mark_complete)
    seconds = time.perf_counter() - t0
    return DumpReport(path=str(s.out), shards_done=len(jobs), samples=n_samples, views_written=views_written,
                      skipped=skipped, seconds=seconds, images_per_s=views_written / max(seconds, 1e-9),
                      complete=complete, rank=dinfo.rank, world=dinfo.world)


def fit_codec(codec, indexes, urls, meta: cache_meta.CacheMeta, model, s: DumpSettings):
    """A learned codec fitted on the teacher's logits of the calibration sample (calibration.py), before any row."""
    by_name = {shard_name(u): u for u in urls}
    names = [e.name for e in meta.manifest.shards]
    plan = calibration_plan(indexes, meta.views, s.calibration_views)
    device = next(model.parameters()).device
    renders = render_plan(plan, [by_name[n] for n in names], names, meta.seed, meta.recipe, meta.num_classes,
                          s.skip_bad)
    policy = meta.compute  # the teacher runs exactly as for the cache's rows
    logits = calibration_logits(renders, lambda x: teacher_forward(model, x, policy), meta.recipe, device,
                                s.batch_size)
    return codec.fit(logits)


class _LentViews:
    """A sample's V views in a worker's ring slot: the slot goes back once every view is copied into a batch."""

    def __init__(self, ring: TransferRing, lent: RingSlot, views: int):
        self.ring, self.lent, self.left = ring, lent, views

    def view_copied(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.ring.release(self.lent)


def _run(cache, model, codec, codec_arrays, jobs, s: DumpSettings, device, n_samples, show, label,
         lease) -> tuple[int, int]:
    meta = cache.meta
    if not jobs:
        return 0, 0
    workers, prefetch = min(s.workers, len(jobs)), 4
    ring = None
    if workers and meta.renderer.name == "cpu":  # a slot per sample: those of a teacher batch, the prefetched, two more
        ring = TransferRing(workers, -(-s.batch_size // meta.views) + prefetch + 2,
                            (meta.views, 3, meta.recipe.image_size, meta.recipe.image_size))
    loader = DataLoader(_RenderStream(jobs, meta, s.skip_bad, ring), batch_size=None, num_workers=workers,
                        prefetch_factor=prefetch if workers else None, persistent_workers=False, collate_fn=keep_as_is)
    policy = meta.compute or ComputePolicy()  # None: a cache written before the policy was recorded (fp32)
    storage = Storage(codec=codec, num_classes=meta.num_classes, temperatures=tuple(meta.temperatures))
    buffers: dict[int, _ShardBuffer] = {}
    status = cache.read_rows("samples/status", 0, meta.manifest.rows)  # one read, not one per tar shard
    views_written = skipped = shards_written = 0

    def flush_batch(items) -> None:
        nonlocal views_written
        if meta.renderer.name == "device":  # it[3] is the decoded image, it[5] the view's (box, flip)
            pixels = renderers.render_batch([it[3] for it in items], np.stack([it[5][0] for it in items]),
                                            np.array([it[5][1] for it in items]), meta.recipe, device)
        else:
            pixels = renderers.stack([it[3] for it in items], device.type == "cuda").to(device, non_blocking=True)
            for it in items:  # copied: a sample's ring slot goes back once all its views are
                if it[6] is not None:
                    it[6].view_copied()
        x = normalize(pixels, meta.recipe)
        labels = torch.tensor([it[4] for it in items], device=device)
        logits = teacher_forward(model, x, policy)
        with host_threads.one_thread():  # small per-batch work: threads cost more than they give (host_threads)
            stored = encode_entries(logits, labels, storage)
            target_np, lse_np = stored.pop(TARGET).cpu().numpy(), stored.pop(LSE).cpu().numpy()
            encoded = {name.split("/", 1)[1]: v.cpu().numpy() for name, v in stored.items()}
            shards = np.array([it[0] for it in items])
            pos = np.array([it[1] for it in items])
            view = np.array([it[2] for it in items])
            for sh in np.unique(shards):
                sel = shards == sh
                buffers[int(sh)].add_logits(pos[sel], view[sel], {k: v[sel] for k, v in encoded.items()},
                                            target_np[sel], lse_np[sel])
                buffers[int(sh)].pending_views -= int(sel.sum())
        views_written += len(items)

    commits: list = []  # futures of the shards whose fsyncs and done record run on the commit thread

    def write_finished() -> None:
        nonlocal skipped, shards_written
        for sh in [sh for sh, b in buffers.items() if b.filled == b.expected and b.pending_views == 0]:
            b = buffers.pop(sh)
            with host_threads.one_thread():  # zstd and crc32c of the chunks, in this thread
                commits.append(cache_writer.write_shard(cache, sh, b.block,
                                                     {"shard": b.entry.name, "samples": b.expected,
                                                      "skipped": [x.to_dict() for x in b.skipped],
                                                      "views": meta.views}, lease, commit=committer))
            skipped += len(b.skipped)
            shards_written += 1
        while commits and commits[0].done():
            commits.pop(0).result()  # raises a failed commit here

    # Teacher batches hold views of one shard only, in (sample, view) order, cut every batch_size views: the
    # batches are a function of the shard alone, so the logits (which can differ in the last bit with batch
    # composition) are the same whatever the worker count, rank count or crash-and-resume history.
    queues: dict[int, list] = {}  # shard -> [(shard, pos, view, image, label, (box, flip), lent slot or None)]
    # On a terminal a bar; in a log file a line every s.log_every teacher batches (views done/total, views/s,
    # ETA, the shard of the batch and the shards written so far). The fsyncs and done record of a written shard
    # wait on the disk on one commit thread, in shard order, while this loop encodes the next shard; every commit
    # has finished (or raised) when _run returns.
    # With the teacher on a GPU, this process's host work is small per-batch operations: one host thread for all of
    # it (host_threads); on the CPU the teacher's forward keeps every thread and only encode and write run on one.
    with ThreadPoolExecutor(1, thread_name_prefix="dkd-commit") as committer, \
            (host_threads.one_thread() if device.type != "cpu" else contextlib.nullcontext()), \
            Progress(total=n_samples * meta.views, label=label, unit="view", enabled=show,
                     line_every=s.log_every) as bar:
        for item in loader:
            if isinstance(item, tuple):
                raise item[1]
            buf = buffers.get(item.shard)
            if buf is None:
                buf = buffers[item.shard] = _ShardBuffer(cache, item.shard, codec_arrays, status)
            buf.add_sample(item)
            queue = queues.setdefault(item.shard, [])
            if item.images is not None:
                on_device = meta.renderer.name == "device"
                images, lent = item.images, None
                if isinstance(images, RingSlot):
                    images, lent = ring.buffer(images), _LentViews(ring, images, meta.views)
                for view in range(meta.views):
                    queue.append((item.shard, item.pos, view, images if on_device else images[view],
                                  item.label, (item.boxes[view], item.flips[view]), lent))
                buf.pending_views += meta.views
                buf.filled += 1
            while len(queue) >= s.batch_size or (queue and buf.filled == buf.expected):
                batch, queue[:] = queue[: s.batch_size], queue[s.batch_size :]
                flush_batch(batch)
                write_finished()
                bar.advance(len(batch), info=f"shard {buf.entry.name}, {shards_written}/{len(jobs)} shards written")
            write_finished()
        for done in commits:
            done.result()
    if buffers:
        raise ShardError(f"shards {sorted(buffers)} ended before all their samples arrived; rerun to complete them")
    return views_written, skipped
