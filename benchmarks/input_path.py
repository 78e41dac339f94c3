"""The input path on ImageNet geometry: where a training step's host time goes, and what limits it.

Synthetic shards with ImageNet's JPEG geometry (width 300-500, height 260-440: mean about 400x350 px, quality 90,
extra sensor-like noise so the files weigh about 100 KB like ImageNet's, 100 classes), a cache of them written by
dump-teacher with a null teacher (1,000-class logits ready at once, the default codec), then, in one run, on the
same shards, workers and batch:

  bare        the bare loader: webdataset + torchvision.io.decode_image + transforms v2 RandomResizedCrop + flip,
              DataLoader batches, no model. The baseline.
  project     the project's loader from the cache (cache join, key and label check, stored box and flip, canonical
              order, batches), cpu renderer; and the device renderer (decode in workers, one roi_align per batch
              in the main process: here on the CPU, so it competes with the workers for the same cores).
  ingest      the main process alone: workers hand over groups already rendered (no decode), the main process
              re-orders, batches, moves to the device and normalises, then a null model step. images/s and
              main-process CPU per image.
  stages      single-process cost per image of each worker stage (tar read, sample parse, header check, decode,
              view draw, crop+resize+flip, grouping) and per step of the model (ResNet-18 train step), the cached
              DKD loss and the step logging.
  dump        dump-teacher's main process with the null teacher: RenderedSamples already in memory, then batching,
              normalise, teacher (null), encode with the default codec, shard buffers and Zarr writes: views/s;
              and the writer alone (the batch of pixels neither copied nor normalised): views/s and main-process
              CPU (all its threads) per view, whose inverse is the writer's views per core.
  vpd         the loader's views per CPU-second (workers + main) at --views-per-decode 1 and 4.
  size        train-student images/s of a ResNet-18 student at 160 px and at 224 px from the same 224 px cache.

CPU time is read with getrusage (RUSAGE_SELF for the main process, RUSAGE_CHILDREN for the DataLoader workers after
they exit), so the per-core figures hold on a machine other jobs share; images/s are wall-clock and are compared
as ratios measured in the same run. The bottleneck is named from the measured rates: the smallest of the loader's,
the main process's and the model's images/s.

    python benchmarks/input_path.py --json input-path.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

CLASSES = 100
TEACHER_CLASSES = 1000
SECTIONS = ("dump", "loaders", "ingest", "vpd", "stages", "size")
TARGETS = {"project_over_bare": 0.9, "ingest_images_per_s": 10_000, "dump_views_per_s": 20_000, "vpd4_over_vpd1": 2.5,
           "s160_over_s224": 1.6}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=800)
    p.add_argument("--shard-size", type=int, default=200)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--views", type=int, default=4, help="views in the cache (>= 4 for --views-per-decode 4)")
    p.add_argument("--codec", default="lowrank:64+top:128+sparse:32", help="the dump's codec (its default)")
    p.add_argument("--dump-batch-size", type=int, default=128, help="dump-teacher's teacher batch (its default)")
    p.add_argument("--dump-views", type=int, default=10,
                   help="views per sample of the dump sections' caches (dump-teacher's default)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--train-steps", type=int, default=6,
                   help="timed steps per student-size run, after 2 warm-up steps")
    p.add_argument("--gen-jobs", type=int, default=2)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (the shards and the cache are always made)")
    a = p.parse_args(argv)
    unknown = set(a.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return a


# ------------------------------------------------------------------------------------------------ inputs
def imagenet_like_sample(cls: int, j: int, specs, seed: int = 7) -> dict:
    """One sample of ImageNet's JPEG geometry: a synth scene resized to (w, h), plus noise, JPEG q90."""
    from PIL import Image

    from dkd_cache import synth

    rng = np.random.default_rng([seed, cls, j])
    w, h = int(rng.integers(300, 501)), int(rng.integers(260, 441))
    img = synth.render_image(specs[cls], rng, min_side=260, max_side=500).resize((w, h))
    arr = np.asarray(img, dtype=np.float32) + rng.standard_normal((h, w, 3), dtype=np.float32) * 32
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return {"__key__": synth.sample_key("train", cls, j), "jpg": buf.getvalue(), "cls": str(cls).encode()}


def _write(job) -> float:
    from dkd_cache import synth

    path, order = job
    specs = synth.class_specs(CLASSES, 0)
    samples = [imagenet_like_sample(c, j, specs) for c, j in order]
    synth._write_shard_webdataset(Path(path), samples)
    return float(np.mean([len(s["jpg"]) for s in samples]))


def make_imagenet_shards(out: Path, samples: int, shard_size: int, jobs: int) -> tuple[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    order = [(c, j) for j in range(-(-samples // CLASSES)) for c in range(CLASSES)][:samples]
    parts = [(str(out / f"train-{k:06d}.tar"), order[s:s + shard_size]) for k, s in enumerate(range(0, samples, shard_size))]
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        sizes = list(pool.map(_write, parts))
    (out / "train.txt").write_text("".join(p + "\n" for p, _ in parts))
    return str(out / "train.txt"), float(np.mean(sizes))


class NullTeacher(torch.nn.Module):
    """Logits ready at once: consecutive rows of a fixed pool of (N, C) logits with a teacher-like low-rank
    structure (so a learned codec fits as on real logits), whatever the input."""

    def __init__(self, classes: int, pool: int = 4096, rank: int = 96):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        z = torch.randn(pool, rank, generator=g) @ torch.randn(rank, classes, generator=g) * 0.4
        z += torch.randn(pool, classes, generator=g) * 0.3
        self.z = torch.nn.Parameter(z, requires_grad=False)  # a parameter: dump-teacher reads the teacher's device
        self.next = 0

    def forward(self, x):
        b = x.shape[0]
        if self.next + b > self.z.shape[0]:
            self.next = 0
        self.next += b
        return self.z[self.next - b: self.next]


def null_teacher_dump(a, shards: str, out: Path, *, prerendered=None, writer_only: bool = False,
                      views: int | None = None) -> dict[str, Any]:
    """dump_teacher with the null teacher; with `prerendered` (a list of RenderedSample) the worker stage is
    replaced by that list, so the timed loop is the main process alone; with `writer_only` the pixels are not
    moved either (the batch of views is one preallocated tensor, not normalised: on a GPU dump the staging copy
    and the normalisation are the input path's and the device's work), leaving what the writer does per view:
    target and lse, the codec's encode, the shard buffers and the Zarr writes."""
    from dkd_cache import dump as dump_mod
    from dkd_cache import host_threads
    from dkd_cache.teacher import TeacherInfo
    from dkd_cache.views import Recipe

    info = TeacherInfo(arch="null", sha256="0" * 64, num_classes=TEACHER_CLASSES, source_format="dkd-cache")
    saved = dump_mod.load_teacher, dump_mod.DataLoader, dump_mod.run_stages, dump_mod.TransferRing
    loop: dict[str, float] = {}

    def run(*args, **kwargs):
        t0 = time.perf_counter()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        out_ = saved[2](*args, **kwargs)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        loop.update(seconds=time.perf_counter() - t0, main_cpu=r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
        return out_

    if prerendered is not None:
        shutil.rmtree(out, ignore_errors=True)  # timed runs write a fresh cache (a reused --workdir holds one)
    dump_mod.load_teacher = lambda arch, weights, device="cpu", **k: (NullTeacher(TEACHER_CLASSES), info)
    dump_mod.run_stages = run
    saved_norm, saved_stack = dump_mod.normalize, dump_mod.renderers.stack
    if writer_only:
        still = torch.zeros((a.dump_batch_size, 3, a.image_size, a.image_size), dtype=torch.uint8)
        dump_mod.normalize = lambda x, recipe, *k: x
        dump_mod.renderers.stack = lambda images, pin=False: still[: len(images)]
    if prerendered is not None:
        dump_mod.DataLoader = lambda *args, **kw: prerendered
        dump_mod.TransferRing = lambda *args, **kw: None  # no workers, so no transfer slots to allocate
    try:
        weights = out.parent / "null-weights.bin"
        weights.write_bytes(b"null")
        settings = dump_mod.DumpSettings(shards=shards, weights=str(weights), out=str(out), arch="null",
                                         views=views or a.views, codec=a.codec, recipe=Recipe(image_size=a.image_size),
                                         batch_size=a.dump_batch_size, workers=a.workers, chunk_rows=a.shard_size,
                                         device=a.device)
        # the writer alone runs as in a GPU dump, where dump-teacher keeps its host work on one thread (host_threads):
        # on the CPU device it lets the (here null) teacher use every thread, whose idle threads then spin
        with host_threads.one_thread() if writer_only else contextlib.nullcontext():
            report = dump_mod.dump_teacher(settings, progress=False)
    finally:
        dump_mod.load_teacher, dump_mod.DataLoader, dump_mod.run_stages, dump_mod.TransferRing = saved
        dump_mod.normalize, dump_mod.renderers.stack = saved_norm, saved_stack
    return {"views": report.views_written, "loop_seconds": loop["seconds"], "main_cpu_seconds": loop["main_cpu"],
            "views_per_s": report.views_written / loop["seconds"],
            "main_cpu_us_per_view": 1e6 * loop["main_cpu"] / max(report.views_written, 1)}


def prerender(cache_path: str, shards: str, views: int) -> list:
    """The RenderedSamples the dump's workers would hand over, `views` per sample, the cache's recipe and seed."""
    from dkd_cache import cache as cache_mod
    from dkd_cache.data import expand_shards
    from dkd_cache.dump import render_shard

    meta = dataclasses.replace(cache_mod.open_cache(cache_path).meta, views=views)
    urls = expand_shards(shards)
    return [s for i, u in enumerate(urls) for s in render_shard(i, u, meta, False)]


# ------------------------------------------------------------------------------------------------ timing
def _cpu(who) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def timed(fn) -> dict[str, float]:
    """Run fn() -> number of images; wall seconds, main and worker CPU seconds (workers counted after they exit)."""
    s0, c0, t0 = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    n = fn()
    dt = time.perf_counter() - t0
    s1, c1 = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    return {"images": n, "seconds": dt, "images_per_s": n / dt, "main_cpu_us_per_image": 1e6 * (s1 - s0) / n,
            "worker_cpu_us_per_image": 1e6 * (c1 - c0) / n, "images_per_cpu_s": n / max(s1 - s0 + c1 - c0, 1e-9)}


def bare_loader(urls: list[str], a) -> int:
    import webdataset as wds
    from torch.utils.data import DataLoader
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import v2

    tf = v2.Compose([v2.RandomResizedCrop(a.image_size, antialias=True), v2.RandomHorizontalFlip()])

    def sample(s):
        img = decode_image(torch.frombuffer(bytearray(s[0]), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return tf(img), int(s[1])

    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker,
                        empty_check=False).to_tuple("jpg", "cls").map(sample)
    n = 0
    for x, _ in DataLoader(ds, batch_size=a.batch_size, num_workers=a.workers, prefetch_factor=8):
        n += x.shape[0]
    return n


def project_spec(cache_path: str, urls, a, *, renderer="cpu", m=1):
    from dkd_cache import cache as cache_mod
    from dkd_cache.loader import StreamSpec

    cache = cache_mod.open_cache(cache_path)
    names = ("views/box", "views/flip", "logits/target", "logits/lse", *(f"logits/{n}" for n in cache.codec_arrays))
    sizes = [s.samples for s in cache.meta.manifest.shards]
    return StreamSpec(urls=tuple(urls), recipe=cache.meta.recipe, seed=0, epoch=0, view=0, rank=0,
                      cache_path=cache_path, entry_arrays=names, num_classes=CLASSES, renderer=renderer,
                      views_per_decode=m, block=a.batch_size), sizes  # block: the batch, as train-student sets it


def project_loader(spec, sizes, a, device, *, null_step=None) -> int:
    """The training path up to the normalised batch on the device (no model unless null_step)."""
    from dkd_cache import renderers
    from dkd_cache.loader import batches, canonical_runs, make_loader, plan_epoch
    from dkd_cache.train import with_views

    plan = with_views(plan_epoch(sizes, seed=0, epoch=0, world=1, rank=0, workers=max(1, a.workers)),
                      spec.views_per_decode)
    skips = [0] * len(plan.counts)
    n = 0
    loader = make_loader(spec, plan, skips, a.workers)
    for batch in batches(canonical_runs(loader, plan, skips, spec.block), a.batch_size,
                         pin_memory=device.type == "cuda"):  # as training does
        entries = batch.entries
        x = renderers.to_device(batch.images, entries, spec.recipe, device, spec.size)  # uint8 on the device
        labels = batch.labels.to(device, non_blocking=True)
        if null_step is not None:
            null_step(x, labels, entries)  # reads the batch's memory: released after it, as training does
        batch.release()
        n += int(labels.shape[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n


class _Prerendered(torch.utils.data.IterableDataset):
    """Workers that hand over ItemGroups already rendered (taken from memory): the main process's ingest alone.
    With a TransferRing (as make_loader's workers), each group's images travel in a slot of it, as in training."""

    def __init__(self, groups_by_worker, ring=None):
        self.groups_by_worker, self.ring = groups_by_worker, ring

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for w in (range(len(self.groups_by_worker)) if info is None else [info.id]):
            for g in self.groups_by_worker[w]:
                lent = None if self.ring is None or info is None else \
                    self.ring.acquire(w, len(g), g.images.shape[1:])
                if lent is not None:
                    self.ring.buffer(lent).copy_(g.images)
                    g = dataclasses.replace(g, images=lent)
                yield g


def ingest(spec, sizes, a, device, repeat: int = 8) -> dict[str, Any]:
    """Main-process ingest with a null model step: workers yield pre-rendered groups (repeated `repeat` times)."""
    from torch.utils.data import DataLoader

    from dkd_cache import renderers
    from dkd_cache.data import keep_as_is
    from dkd_cache.transfer import TransferRing
    from dkd_cache.loader import (IMAGES_IN_FLIGHT, RankPlan, batches, canonical_runs, group_items, plan_epoch,
                                  worker_items)

    plan = plan_epoch(sizes, seed=0, epoch=0, world=1, rank=0, workers=max(1, a.workers))
    block = spec.block
    groups = [list(group_items(worker_items(spec, plan.workers[w], w, 0), block)) for w in range(len(plan.workers))]
    # the same rendered (whole) groups, `repeat` times, with consecutive seqs, as a longer epoch would bring them
    full = [[g for g in gs if len(g) == block] for gs in groups]
    counts = [len(gs) * block * repeat for gs in full]
    by_worker = [[dataclasses.replace(g, seq0=(r * len(gs) + i) * block) for r in range(repeat)
                  for i, g in enumerate(gs)] for gs in full]
    big = RankPlan(workers=plan.workers, counts=tuple(counts), padding=0)
    assert all(len(g) for gs in by_worker for g in gs)

    def run(read: bool = False) -> int:
        prefetch = max(2, IMAGES_IN_FLIGHT // block)
        ring = TransferRing(a.workers, prefetch + 2, (block, 3, spec.size, spec.size)) if a.workers else None
        loader = DataLoader(_Prerendered(by_worker, ring), batch_size=None, num_workers=a.workers,
                            prefetch_factor=prefetch if a.workers else None, collate_fn=keep_as_is)
        n = 0
        skips = [0] * len(counts)
        for batch in batches(canonical_runs(loader, big, skips, block), a.batch_size,
                             pin_memory=device.type == "cuda"):
            x = renderers.to_device(batch.images, batch.entries, spec.recipe, device, spec.size)  # the null step
            batch.labels.to(device, non_blocking=True)                                            # takes it there
            if read and x.device.type == "cpu":  # a step's first read of the batch: the worker's shared memory
                x.numpy().max()  # (on a GPU the pinned copy above has read it already)
            n += len(batch)
            batch.release()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n

    def in_process() -> int:  # no workers: the groups are already in this process; only batching and the copy
        n = 0
        flat = [g for gs in by_worker for g in gs]
        skips = [0] * len(counts)
        for batch in batches(canonical_runs(iter(flat), big, skips, block), a.batch_size,
                             pin_memory=device.type == "cuda"):
            renderers.to_device(batch.images, batch.entries, spec.recipe, device, spec.size)
            n += len(batch)
            batch.release()
        return n

    return {"through_workers": timed(run), "in_process": timed(in_process),
            "through_workers_reading_each_pixel_once": timed(lambda: run(read=True))}


def stage_costs(urls: list[str], a, cache_path: str) -> dict[str, float]:
    """Per-image milliseconds of each worker stage, one process, one thread, over the first shard."""
    from dkd_cache.data import iter_raw_samples, parse_sample
    from dkd_cache.loader import Item, _group
    from dkd_cache.transfer import TransferRing, shared_empty
    from dkd_cache.views import Recipe, draw_view, image_size_of, render_decoded
    from torchvision.io import ImageReadMode, decode_image

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    recipe = Recipe(image_size=a.image_size)
    t: dict[str, float] = {}

    def add(k, t0):
        t[k] = t.get(k, 0.0) + time.perf_counter() - t0

    t0 = time.perf_counter()
    raws = list(iter_raw_samples(urls[0]))
    add("tar read", t0)
    items = []
    for i, raw in enumerate(raws):
        t0 = time.perf_counter()
        s = parse_sample(raw, CLASSES)
        add("sample parse", t0)
        t0 = time.perf_counter()
        image_size_of(s.image)
        add("header check (bomb guard)", t0)
        t0 = time.perf_counter()
        img = decode_image(torch.frombuffer(bytearray(s.image), dtype=torch.uint8), mode=ImageReadMode.RGB)
        add("JPEG decode", t0)
        t0 = time.perf_counter()
        v = draw_view(0, 0, s.key, img.shape[1], img.shape[2], recipe)
        add("view draw", t0)
        t0 = time.perf_counter()
        out = render_decoded(img, v[:4], v[4], recipe)
        add("crop + resize + flip", t0)
        items.append(Item(0, i, out, s.label, {"views/box": np.array(v[:4], np.uint16)}))
    b = a.batch_size
    t0 = time.perf_counter()
    for k in range(0, len(items), b):
        _group(items[k:k + b])
    add("group for transfer (in process)", t0)
    # A worker's group into fresh shared memory (what torch's DataLoader does per batch) or into a reused slot
    # (TransferRing): the page allocation and first touch are the difference.
    full = [items[k:k + b] for k in range(0, len(items) - b + 1, b)]
    ring = TransferRing(1, 1, (b, 3, a.image_size, a.image_size))
    slot = ring.acquire(0, b, (3, a.image_size, a.image_size))
    torch.stack([i.image for i in full[0]], out=ring.buffer(slot))  # the slot's pages, touched once
    for key, out in (("group into fresh shared memory", lambda: shared_empty((b, 3, a.image_size, a.image_size))),
                     ("group into a reused shared slot", lambda: ring.buffer(slot))):
        t0 = time.perf_counter()
        for group in full:
            torch.stack([i.image for i in group], out=out())
        t[key] = (time.perf_counter() - t0) * len(raws) / (len(full) * b)  # per image, like the others
    torch.set_num_threads(threads)
    return {k: 1e3 * v / len(raws) for k, v in t.items()}


def encode_cost(a) -> float:
    """Per-view ms of the dump's codec encode (a.codec, fitted on the null teacher's logits), one thread."""
    from dkd_cache import host_threads
    from dkd_cache.logit_codecs import parse_codec

    z = NullTeacher(TEACHER_CLASSES).z.detach()
    codec = parse_codec(a.codec, TEACHER_CLASSES)
    codec = codec.fit(z) if codec.learned else codec
    batch = z[: a.dump_batch_size]
    with host_threads.one_thread():
        codec.encode(batch)
        t0 = time.perf_counter()
        for _ in range(20):
            codec.encode(batch)
        return 1e3 * (time.perf_counter() - t0) / (20 * len(batch))


def model_costs(a, cache_path: str, device) -> dict[str, float]:
    """Per-image ms of the ResNet-18 train step, the cached DKD loss (decode + forward + backward), step logging."""
    from dkd_cache import cache as cache_mod
    from dkd_cache.teacher import build_model
    from dkd_cache.teacher_signal import Storage, dkd_from_entries

    cache = cache_mod.open_cache(cache_path)
    b = a.batch_size
    model = build_model("resnet18", TEACHER_CLASSES).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(b, 3, a.image_size, a.image_size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (b,), device=device)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def time_it(fn, n):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - t0) / n / b

    out = {"model train step": time_it(step, 3 if device.type == "cpu" else 20)}
    e = cache.meta.manifest.shards[0]
    names = ["logits/target", "logits/lse", *(f"logits/{n}" for n in cache.codec_arrays)]
    entries = {n: torch.from_numpy(cache.read_rows(n, e.row_start, e.row_start + b, view=0)).to(device) for n in names}
    storage = Storage.of_cache(cache)
    s = torch.randn(b, TEACHER_CLASSES, device=device)

    def loss():
        ss = s.clone().requires_grad_(True)
        dkd_from_entries(ss, labels=y, entries=entries, storage=storage, alpha=1.0, beta=0.5, temperature=1.0
                         ).backward()

    out["cached DKD loss (decode, fwd, bwd)"] = time_it(loss, 20)
    window = [torch.stack([s.sum(), s.mean(), s.max()]) for _ in range(20)]

    def log():
        torch.stack(window).tolist()

    out["step logging (one read per 20 steps)"] = time_it(log, 20) / 20
    return out


def train_size(a, shards: str, cache_path: str, out: Path, size: int, warmup: int = 2) -> dict[str, Any]:
    """train-student at one student size: `warmup` steps, then a.train_steps timed ones (the steady rate: from
    the end of the last warm-up step to the end of the last step; start-up, first batches and the allocator's
    first passes excluded). CPU seconds of the whole run (this process and its DataLoader workers) beside it."""
    from dkd_cache.train import TrainConfig, train_student

    cfg = TrainConfig(shards=shards, out=str(out), cache=cache_path, arch="resnet18", epochs=a.views,
                      batch_size=a.batch_size, workers=a.workers, device=a.device, image_size=size,
                      max_steps=warmup + a.train_steps, log_every=1000)
    c0, t0 = _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    r = train_student(cfg, progress=False)
    cpu = _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN) - c0
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    t = [x["t"] for x in steps if x["event"] == "step"][warmup - 1:]
    return {"size": size, "wall_seconds": time.perf_counter() - t0, "cpu_seconds": cpu,
            "epoch_images_per_s": r["images_per_s"], "images_per_s": (len(t) - 1) * a.batch_size / (t[-1] - t[0]),
            "timed_steps": len(t) - 1}


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict[str, Any]:
    a = parse_args(argv)
    device = torch.device(a.device)
    t_start = time.perf_counter()
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="dkd-input-path-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"config": vars(a), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "device_name": torch.cuda.get_device_name() if a.device == "cuda" else "cpu"}

    def say(msg):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    try:
        from dkd_cache.data import expand_shards

        say(f"making {a.samples} ImageNet-geometry samples")
        shards, mean_bytes = make_imagenet_shards(work / "shards", a.samples, a.shard_size, a.gen_jobs)
        urls = expand_shards(shards)
        res["mean_jpeg_bytes"] = mean_bytes
        say("dump-teacher, null teacher (workers render)")
        cache_path = str(work / "cache.zarr")
        res["dump_with_workers"] = null_teacher_dump(a, shards, Path(cache_path))
        want = set(a.sections.split(","))
        if "dump" in want:
            say("dump-teacher main process alone, null teacher")
            pre = prerender(cache_path, shards, a.dump_views)
            res["dump_main"] = null_teacher_dump(a, shards, work / "cache-main.zarr", prerendered=pre,
                                                 views=a.dump_views)
            res["dump_host"] = max((null_teacher_dump(a, shards, work / f"cache-host-{k}.zarr", prerendered=pre,
                                                      writer_only=True, views=a.dump_views) for k in range(2)),
                                   key=lambda r: r["views_per_s"])  # the better of two: the first warms caches
            del pre
        spec_cpu, sizes = project_spec(cache_path, urls, a)
        if "loaders" in want:
            say("loaders: bare, project cpu, project device (x2, interleaved)")
            res["loaders"] = {"bare": [], "project_cpu": [], "project_device": []}
            spec_dev, _ = project_spec(cache_path, urls, a, renderer="device")
            for _ in range(2):
                res["loaders"]["bare"].append(timed(lambda: bare_loader(urls, a)))
                res["loaders"]["project_cpu"].append(timed(lambda: project_loader(spec_cpu, sizes, a, device)))
                res["loaders"]["project_device"].append(timed(lambda: project_loader(spec_dev, sizes, a, device)))
        if "ingest" in want:
            say("main-process ingest, null step")
            res["ingest"] = ingest(spec_cpu, sizes, a, device)
        if "vpd" in want:
            say("views per decode 1 and 4")
            res["vpd"] = {}
            for m in (1, 4):
                spec_m, _ = project_spec(cache_path, urls, a, m=m)
                res["vpd"][str(m)] = timed(lambda: project_loader(spec_m, sizes, a, device))
        if "stages" in want:
            say("stage costs")
            res["stages_ms_per_image"] = {**stage_costs(urls, a, cache_path),
                                          f"dump codec encode, per view ({a.codec})": encode_cost(a)}
            res["model_ms_per_image"] = model_costs(a, cache_path, device)
        if "size" in want:
            say("student at 160 and 224 px")
            runs = [train_size(a, shards, cache_path, work / f"run-{k}-{s}", s) for k in range(2) for s in (224, 160)]
            res["size"] = {str(s): max((r for r in runs if r["size"] == s), key=lambda r: r["images_per_s"])
                           for s in (224, 160)}
            res["size_runs"] = runs
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    res["wall_seconds"] = time.perf_counter() - t_start
    res["summary"] = summarise(res)
    print(render(res), flush=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=2, default=str))
    return res


def _best(runs, key="images_per_s"):
    return max(r[key] for r in runs)


def summarise(res) -> dict[str, Any]:
    """Targets and rates of the sections that ran; the bottleneck is named from the rates measured."""
    out: dict[str, Any] = {}
    rates: dict[str, float] = {}
    if "loaders" in res:
        L = res["loaders"]
        bare, proj, dev = _best(L["bare"]), _best(L["project_cpu"]), _best(L["project_device"])
        out.update(project_over_bare=proj / bare, bare=bare, project=proj, device_renderer=dev)
        rates["loader (workers decode and render)"] = proj
    if "ingest" in res:
        ing = res["ingest"]["through_workers"]
        out.update(ingest_images_per_s=ing["images_per_s"], ingest_main_us_per_image=ing["main_cpu_us_per_image"],
                   ingest_in_process_images_per_s=res["ingest"]["in_process"]["images_per_s"],
                   ingest_in_process_us_per_image=res["ingest"]["in_process"]["main_cpu_us_per_image"])
        rates["main process ingest"] = ing["images_per_s"]
    if "dump_host" in res:
        out.update(dump_views_per_s=res["dump_host"]["views_per_s"],
                   dump_host_us_per_view=res["dump_host"]["main_cpu_us_per_view"],
                   dump_writer_views_per_cpu_s=1e6 / res["dump_host"]["main_cpu_us_per_view"],
                   dump_with_normalize_views_per_s=res["dump_main"]["views_per_s"])
    if "vpd" in res:
        vpd1, vpd4 = res["vpd"]["1"]["images_per_cpu_s"], res["vpd"]["4"]["images_per_cpu_s"]
        out.update(vpd4_over_vpd1=vpd4 / vpd1, vpd1_views_per_cpu_s=vpd1, vpd4_views_per_cpu_s=vpd4)
    if "size" in res:
        sz = res["size"]
        out["s160_over_s224"] = sz["160"]["images_per_s"] / sz["224"]["images_per_s"]
        # the same steps at both sizes: whole runs' CPU seconds (start-up included, so a lower bound on the gain)
        cpu = {k: min(r["cpu_seconds"] for r in res["size_runs"] if r["size"] == int(k)) for k in ("160", "224")}
        out["s160_over_s224_cpu"] = cpu["224"] / cpu["160"]
    if "model_ms_per_image" in res:
        rates["model train step"] = 1e3 / res["model_ms_per_image"]["model train step"]
    out["rates"] = rates
    out["bottleneck"] = min(rates, key=rates.get) if rates else None
    return out


def render(res) -> str:
    s, c = res["summary"], res["config"]
    lines = [f"input path on ImageNet geometry: {c['samples']} JPEGs (mean {res['mean_jpeg_bytes'] / 1e3:.0f} KB, "
             f"~400x350, q90), {c['image_size']} px, batch {c['batch_size']}, {c['workers']} workers, device "
             f"{res['device_name']}, {res['cpu_count']} CPUs (shared: compare ratios)", ""]
    if "stages_ms_per_image" in res:
        lines += ["| where a step's time goes (one process, one thread) | ms per image |", "|---|---|"]
        for k, v in {**res["stages_ms_per_image"], **res["model_ms_per_image"]}.items():
            lines.append(f"| {k} | {v:.3f} |")
        lines.append("")
    lines += ["| rate | images/s | main CPU us/img | worker CPU us/img |", "|---|---|---|---|"]
    for k, runs in res.get("loaders", {}).items():
        r = max(runs, key=lambda x: x["images_per_s"])
        lines.append(f"| loader {k} | {r['images_per_s']:.0f} | {r['main_cpu_us_per_image']:.0f} | "
                     f"{r['worker_cpu_us_per_image']:.0f} |")
    for k, r in res.get("ingest", {}).items():
        lines.append(f"| main-process ingest, null step, {k.replace('_', ' ')} | {r['images_per_s']:.0f} | "
                     f"{r['main_cpu_us_per_image']:.0f} | {r['worker_cpu_us_per_image']:.0f} |")
    for m, r in res.get("vpd", {}).items():
        lines.append(f"| loader --views-per-decode {m} (views/CPU-s {r['images_per_cpu_s']:.0f}) | "
                     f"{r['images_per_s']:.0f} | {r['main_cpu_us_per_image']:.0f} | {r['worker_cpu_us_per_image']:.0f} |")
    dumps = (("dump_main", f"dump-teacher main process, null teacher, {c['codec']}, batch {c['dump_batch_size']}, "
                           f"{c['dump_views']} views per sample (views/s)"),
             ("dump_host", f"dump-teacher writer: null teacher, pixels neither copied nor normalised, "
                           f"{c['dump_views']} views per sample (views/s)"),
             ("dump_with_workers", f"dump-teacher with render workers, null teacher, {c['views']} views per sample "
                                   "(views/s)"))
    for key, label in dumps:
        if key in res and res[key]["views"]:  # a reused --workdir holds the workers' cache already: nothing dumped
            d = res[key]
            lines.append(f"| {label} | {d['views_per_s']:.0f} | {d['main_cpu_us_per_view']:.0f} | - |")
    for k, r in res.get("size", {}).items():
        lines.append(f"| train-student ResNet-18 at {k} px from the {c['image_size']} px cache | "
                     f"{r['images_per_s']:.1f} | | |")
    rows = [("project loader / bare loader", "project_over_bare", ">= 0.9"),
            ("main-process ingest, null step (images/s)", "ingest_images_per_s", ">= 10,000"),
            ("main-process ingest, host work per image through workers (us, main CPU)", "ingest_main_us_per_image",
             "<= 100"),
            ("dump writer, null teacher, encode + write (views/s)", "dump_views_per_s", ">= 20,000"),
            ("dump writer, views per CPU-second (1e6 / main CPU us per view)", "dump_writer_views_per_cpu_s",
             ">= 20,000"),
            ("views per CPU-s, --views-per-decode 4 / 1", "vpd4_over_vpd1", ">= 2.5"),
            ("student 160 px / 224 px images/s (steady steps, wall)", "s160_over_s224", ">= 1.6"),
            ("student 160 px / 224 px images per CPU-second (whole runs)", "s160_over_s224_cpu", ">= 1.6")]
    lines += ["", "| target | measured | target |", "|---|---|---|"]
    for name, key, t in rows:
        if key in s:
            lines.append(f"| {name} | {s[key]:,.2f} | {t} |")
    lines += ["", "rates (images/s): " + ", ".join(f"{k} {v:,.0f}" for k, v in s["rates"].items()),
              f"BOTTLENECK: {s['bottleneck']}", f"total wall time {res['wall_seconds']:.0f} s"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
