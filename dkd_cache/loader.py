"""The training data path: a pure epoch plan, the worker stream joined to the cache, and a canonical order.

Stream shapes:
    plan_epoch(...)            -> per rank, per worker: [Task(shard, limit)]   (pure function of seed, epoch, sizes)
    worker: iter_raw_samples   -> raw sample dicts, tar order
            joined_units       -> Unit: Joined samples (raw, shard position, cache label, cache entry per view),
                                  key and label checked against the cache row; one sample per unit, or (the
                                  recipe mixes) the usable samples of one mix window, so a pair travels together
            shuffle_buffer     -> same, shuffled by rng(seed, epoch, rank, worker)
            skip(n)            -> resume: drop the first n items (not units) without decoding
            render_unit        -> Item(worker, seq, image uint8 (3,S,S), label, entry)  (gpu renderer: image is
                                  the sample's Compressed bytes, header read and views drawn, nothing decoded;
                                  a mix window: each view rendered, then mixed with its partner's same view)
            group_items        -> ItemGroup: a worker's Items in one block of `spec.block` seqs (one tensor per
                                  transfer; training's block is the rank's batch)
    main:   canonical_runs     -> groups in round-robin order of (block, worker): independent of scheduling
            batches            -> Batch(images (B,3,S,S), labels (B,), entries {name: (B,…)}): a batch that is one
                                  whole group is that group's memory (a worker's ring slot, lent); others are
                                  copied. The holder calls batch.release() when it has read it (transfer.Loan)
Every rank gets the same number of samples per epoch (padding repeats a rank's first samples; reported),
so every rank runs the same number of steps and no collective ever waits for a rank that ran out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import augment
from . import cache as cache_mod
from . import cache_meta
from .data import keep_as_is, iter_raw_samples, parse_sample, shard_name
from .errors import BadSampleError, CacheError, CacheMismatchError, ConfigError, DKDCacheError, ShardError
from . import renderers
from .renderers import Compressed, Encoded, Packed
from .transfer import Loan, RingSlot, TransferRing, start_workers
from .views import Recipe, center_crop, decode, draw_view, image_size_of, pixel_major


@dataclasses.dataclass(frozen=True)
class Task:
    shard: int  # index into the shard list
    limit: int | None = None  # padding task: only the first `limit` usable samples


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankPlan:
    workers: tuple[tuple[Task, ...], ...]
    counts: tuple[int, ...]  # samples per worker
    padding: int  # samples repeated to even out the ranks


def seeded_rng(*parts) -> np.random.Generator:
    digest = hashlib.sha256("/".join(str(p) for p in ("dkd-cache", *parts)).encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def plan_epoch(sizes: Sequence[int], *, seed: int, epoch: int, world: int, rank: int, workers: int,
               shuffle: bool = True) -> RankPlan:
    """Shard order by rng(seed, epoch); shards to ranks greedily by load; pad ranks to the largest; tasks to workers.

    `sizes` are usable samples per shard. Pure: every rank computes every rank's share and takes its own.
    """
    order = list(range(len(sizes)))
    if shuffle:
        order = [int(i) for i in seeded_rng("shards", seed, epoch).permutation(len(sizes))]
    heap = [(0, r) for r in range(world)]
    per_rank: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for i in order:
        if sizes[i] == 0:
            continue
        _, r = heapq.heappop(heap)
        per_rank[r].append(i)
        load[r] += sizes[i]
        heapq.heappush(heap, (load[r], r))
    target = max(load)
    tasks = [Task(i) for i in per_rank[rank]]
    need = target - load[rank]
    padding = need
    # Padding: the first samples of this rank's own shards (or, for a rank with none, of the largest shards).
    sources = per_rank[rank] or sorted(range(len(sizes)), key=lambda i: -sizes[i])
    k = 0
    while need > 0:
        i = sources[k % len(sources)]
        take = min(need, sizes[i])
        tasks.append(Task(i, take))
        need -= take
        k += 1
    # Tasks to workers, heaviest first, each to the least loaded worker.
    workers = max(1, workers)
    wl = [[] for _ in range(workers)]
    wload = [0] * workers
    for t in sorted(tasks, key=lambda t: -(t.limit if t.limit is not None else sizes[t.shard])):
        w = min(range(workers), key=lambda j: (wload[j], j))
        wl[w].append(t)
        wload[w] += t.limit if t.limit is not None else sizes[t.shard]
    return RankPlan(workers=tuple(tuple(x) for x in wl), counts=tuple(wload), padding=padding)


def canonical_position(counts: Sequence[int], block: int | None = None) -> Iterator[tuple[int, int]]:
    """The canonical order of (worker, seq): round robin over the workers that still have samples, taking
    `block` (StreamSpec.block) consecutive samples of a worker at a time, so that whole transfer groups
    land in a batch as slices, never re-ordered image by image."""
    for w, start, stop in canonical_blocks(counts, [0] * len(counts), block):
        for seq in range(start, stop):
            yield w, seq


def canonical_blocks(counts: Sequence[int], skips: Sequence[int], block: int | None = None
                     ) -> Iterator[tuple[int, int, int]]:
    """(worker, first seq, stop seq) runs of the canonical order, after each worker's first `skips[w]` samples."""
    block = block or ITEMS_PER_TRANSFER
    b = 0
    while True:
        live = [w for w, n in enumerate(counts) if n > b * block]
        if not live:
            return
        for w in live:
            start, stop = max(b * block, skips[w]), min(counts[w], (b + 1) * block)
            if start < stop:
                yield w, start, stop
        b += 1


def skips_for(counts: Sequence[int], consumed: int, block: int | None = None) -> list[int]:
    """How many of each worker's samples the first `consumed` canonical items include (resume)."""
    skips = [0] * len(counts)
    left = consumed
    for w, start, stop in canonical_blocks(counts, skips, block):
        take = min(left, stop - start)
        skips[w] += take
        left -= take
        if left == 0:
            break
    return skips


# Items cross the worker -> main process boundary in groups: one shared-memory tensor per group instead of one
# per image (per-tensor IPC, not decoding, bounded the loader at 224 px on a 16-core GPU host). A group holds the
# consecutive samples of one worker inside one block of the canonical order (seq // block). Training makes the
# block the rank's batch, so a step's batch is one group, taken as it arrived: the main process neither copies nor
# touches its pixels (copying 150 KB per image out of freshly mapped shared memory was most of its work).
# ITEMS_PER_TRANSFER is the block of a spec that sets none, and of checkpoints written before blocks were recorded.
ITEMS_PER_TRANSFER = 16
IMAGES_IN_FLIGHT = 128  # per worker: the DataLoader prefetches max(2, this // block) groups


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamSpec:
    """Everything a worker needs; plain data so it pickles to spawned workers."""

    urls: tuple[str, ...]  # by shard index
    recipe: Recipe
    seed: int
    epoch: int
    view: int
    rank: int
    cache_path: str | None  # None: no cache (CE mode); views drawn from (seed, epoch, key)
    entry_arrays: tuple[str, ...] = ()  # cache arrays joined per sample, e.g. logits/target
    num_classes: int | None = None
    shuffle_buffer: int = 256
    evaluation: bool = False  # centre crop, no shuffling, no cache
    renderer: str = "cpu"  # renderers.RENDERERS; "device": workers decode only, the main process renders batches
    image_size: int | None = None  # the size views are rendered at (the student's); None: the recipe's
    views_per_decode: int = 1  # M: each decoded sample gives views view .. view + M - 1 (mod the cache's views)
    block: int = ITEMS_PER_TRANSFER  # samples per transfer group and canonical block; in training the rank's batch

    @property
    def size(self) -> int:
        return self.image_size or self.recipe.image_size


@dataclasses.dataclass(frozen=True)
class Item:
    worker: int
    seq: int
    image: torch.Tensor | Compressed | None  # uint8 (3, S, S); gpu renderer: the compressed image; None: no pixels
    label: int
    entry: dict[str, np.ndarray]




@dataclasses.dataclass(frozen=True)
class ItemGroup:
    worker: int
    seq0: int  # the group holds seqs seq0, seq0 + 1, ...
    images: torch.Tensor | Packed | Encoded | RingSlot | None  # uint8 (m, 3, S, S); Packed decoded images (device
    #                                                        renderer); Encoded compressed ones (gpu renderer);
    labels: np.ndarray  # int64 (m,)                 # a worker's TransferRing slot (main: resolved to its rows); None
    entries: dict[str, np.ndarray]  # name -> (m, …)
    loan: Loan | None = None  # images in a ring slot: lent to whoever takes the group's rows, who releases it

    def __len__(self) -> int:
        return len(self.labels)

    def item(self, i: int) -> Item:
        image = self.images.slice(i, i + 1).unpack()[0] if isinstance(self.images, Packed) else \
            self.images.slice(i, i + 1) if isinstance(self.images, Encoded) else \
            None if self.images is None else self.images[i]
        return Item(self.worker, self.seq0 + i, image, int(self.labels[i]), {k: v[i] for k, v in self.entries.items()})


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive runs of `size` items (the last one may be shorter)."""
    buf: list = []
    for item in items:
        buf.append(item)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def group_items(items: Iterable[Item], size: int = ITEMS_PER_TRANSFER, *, packed: bool = False,
                ring: TransferRing | None = None) -> Iterator[ItemGroup]:
    """Consecutive Items of one worker and one canonical block (seq // size) -> ItemGroup (images stacked into a
    slot of `ring` or a fresh transfer buffer, or `packed` when they are decoded images of several sizes)."""
    buf: list[Item] = []
    for item in items:
        if buf and (item.worker != buf[0].worker or item.seq // size != buf[0].seq // size
                    or item.seq != buf[-1].seq + 1):
            yield _group(buf, packed, ring)
            buf = []
        buf.append(item)
    if buf:
        yield _group(buf, packed, ring)


def _group(buf: list[Item], packed: bool = False, ring: TransferRing | None = None) -> ItemGroup:
    images: torch.Tensor | Packed | Encoded | RingSlot | None = None
    if isinstance(buf[0].image, Compressed):
        images = renderers.encode([i.image for i in buf])
    elif buf[0].image is not None:
        pixels = [i.image for i in buf]
        lent = None if packed or ring is None else ring.acquire(buf[0].worker, len(pixels), pixels[0].shape,
                                                                 pixels[0].dtype)
        if packed:
            images = renderers.pack(pixels)
        elif lent is not None:
            torch.stack(pixels, out=ring.buffer(lent))
            images = lent
        else:
            images = torch.stack(pixels, out=renderers.transfer_buffer((len(buf), *pixels[0].shape)))
    entries = {k: np.stack([i.entry[k] for i in buf]) for k in buf[0].entry}
    return ItemGroup(buf[0].worker, buf[0].seq, images, np.array([i.label for i in buf], np.int64), entries)


class _WorkerStream(IterableDataset):
    def __init__(self, spec: StreamSpec, plan: RankPlan, skips: Sequence[int], ring: TransferRing | None = None):
        self.spec, self.plan, self.skips, self.ring = spec, plan, list(skips), ring

    def __iter__(self) -> Iterator[ItemGroup | tuple[str, DKDCacheError]]:
        info = get_worker_info()
        wid = 0 if info is None else info.id
        worker_ids = range(len(self.plan.workers)) if info is None else [wid]
        try:
            for w in worker_ids:  # without DataLoader workers, the main process runs every worker's stream in turn
                yield from group_items(worker_items(self.spec, self.plan.workers[w], w, self.skips[w]),
                                       self.spec.block, packed=self.spec.renderer == "device" and not self.spec.evaluation,
                                       ring=self.ring if info is not None else None)
        except DKDCacheError as e:  # re-raised by the main process with the same class and message
            yield ("error", e)  # pickled to the main process whole, raised there as its own class


def stream_views(spec: StreamSpec, cache_views: int | None) -> list[int]:
    """The views one decode gives: view, view + 1, ... (M of them), modulo the cache's view count."""
    return [(spec.view + j) % cache_views if cache_views else spec.view + j for j in range(spec.views_per_decode)]


SIZE_ENTRIES = ("samples/height", "samples/width")


def _cache_rows(cache: cache_mod.Cache, shard: int, spec: StreamSpec):
    """The shard's cache rows for this pass's views: a chunk-aligned block read per array and view.
    Returns keys, labels, status and, per view, {array name: rows}."""
    e = cache.meta.manifest.shards[shard]
    keys = cache_mod.decode_keys(cache.read_rows("samples/key", e.row_start, e.row_start + e.samples))
    labels = cache.read_rows("samples/label", e.row_start, e.row_stop)
    status = cache.read_rows("samples/status", e.row_start, e.row_stop)
    ok = status == cache_meta.STATUS_OK
    sizes = {}
    if "views/box" in spec.entry_arrays:  # stored boxes are in the dumped image's pixels: render_items checks it
        sizes = {name: cache.read_rows(name, e.row_start, e.row_stop) for name in SIZE_ENTRIES}
    views = stream_views(spec, cache.meta.views)
    runs = []  # the views as runs of consecutive ones (they wrap around at most once): one read per run and array
    for v in views:
        if runs and runs[-1][1] == v:
            runs[-1][1] = v + 1
        else:
            runs.append([v, v + 1])
    read = {name: np.concatenate([cache.read_rows(name, e.row_start, e.row_stop, view=slice(a, b)) for a, b in runs])
            for name in spec.entry_arrays}
    per_view = []
    for j, view in enumerate(views):
        arrays = {name: values[j] for name, values in read.items()}
        for name, values in arrays.items():
            cache_mod.check_filled(cache, name, values, ok, e.row_start, view)
        per_view.append({**arrays, **sizes})
    return keys, labels, status, per_view


@dataclasses.dataclass(frozen=True, kw_only=True)
class Joined:
    """One usable sample of a shard, joined to its cache rows."""

    raw: dict  # iter_raw_samples' member dict
    pos: int  # its position in the shard (cache row = the shard's row_start + pos; a mix partner's name)
    label: int | None  # the cache's label (None: no cache)
    entries: tuple[dict[str, np.ndarray], ...]  # per view of the pass: the cache arrays' values ({} without cache)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Unit:
    """What the shuffle buffer moves and a worker renders at once: one sample, or, when the recipe mixes, the usable
    samples of one mix window (a pair is never split across units, so never across workers or ranks)."""

    shard: str  # the shard's name (draw_mixes' stream)
    window: int  # the mix window: shard positions window * W .. (W = 1 when the recipe does not mix)
    count: int  # shard positions in the window: W, fewer in the shard's last window
    samples: tuple[Joined, ...]  # its usable samples, in position order
    emit: int  # the first `emit` samples are items; the others only partners (a padding task's last window)


def mixing(spec: StreamSpec) -> bool:
    """Whether the stream's units are mix windows (evaluation's centre crops are never augmented)."""
    return not spec.evaluation and augment.mixes(spec.recipe)


def joined_units(spec: StreamSpec, task: Task, cache: cache_mod.Cache | None) -> Iterator[Unit]:
    """raw samples of one task joined to their cache rows, in units of one mix window of W shard positions (W = 1:
    one sample a unit, when the recipe does not mix). Skipped rows (the dump's) are left out; a window with no
    usable sample gives no unit. A padding task (`limit` usable samples) reads on to the end of the window of its
    last sample: their partners, rendered and not items. Without a cache the entries are empty dicts."""
    url = spec.urls[task.shard]
    name = shard_name(url)
    width = spec.recipe.mix_window if mixing(spec) else 1
    if cache is not None:
        cshard = cache.meta.manifest.shard_index(name)
        keys, labels, status, per_view = _cache_rows(cache, cshard, spec)
    taken = 0
    window, count, members, emit = 0, 0, [], 0  # the window being read: positions seen, its usable samples, items
    for pos, raw in enumerate(iter_raw_samples(url)):
        if pos // width != window:
            if members:
                yield Unit(shard=name, window=window, count=count, samples=tuple(members), emit=emit)
            window, count, members, emit = pos // width, 0, [], 0
            if task.limit is not None and taken >= task.limit:
                return
        count += 1
        key = raw["__key__"]
        if cache is None:
            sample = Joined(raw=raw, pos=pos, label=None, entries=tuple({} for _ in range(spec.views_per_decode)))
        else:
            if pos >= len(keys) or keys[pos] != key:
                expected = keys[pos] if pos < len(keys) else "<end of shard>"
                raise CacheMismatchError(f"{name}: sample {pos} is {key!r} but the cache has {expected!r} there; "
                                         "the shards changed since the dump or belong to another cache")
            if status[pos] == cache_meta.STATUS_SKIPPED:
                continue  # recorded as skipped in the cache at dump time
            sample = Joined(raw=raw, pos=pos, label=int(labels[pos]),
                            entries=tuple({n: a[pos] for n, a in arrays.items()} for arrays in per_view))
        members.append(sample)
        if task.limit is None or taken < task.limit:
            emit += 1
            taken += 1
    if members:
        yield Unit(shard=name, window=window, count=count, samples=tuple(members), emit=emit)


def worker_items(spec: StreamSpec, tasks: Sequence[Task], worker: int, skip: int) -> Iterator[Item]:
    """A worker's Items: its i-th sample gives seqs i M .. i M + M - 1 (M = views_per_decode), counted over the
    samples that are items (a unit's `emit`); the first `skip` seqs are dropped, whole units without decoding."""
    renderers.check_recipe(spec.renderer, spec.recipe)  # the batched renderers render crops and flips alone
    cache = cache_mod.open_cache(spec.cache_path) if spec.cache_path else None
    m = spec.views_per_decode

    def joined() -> Iterator[Unit]:  # shape: Unit (a sample, or a mix window's samples)
        for task in tasks:
            yield from joined_units(spec, task, cache)

    stream = joined()
    if not spec.evaluation:  # the buffer holds about spec.shuffle_buffer samples, whatever the unit
        units = -(-spec.shuffle_buffer // (spec.recipe.mix_window if mixing(spec) else 1))
        stream = shuffle_buffer(stream, units, seeded_rng("samples", spec.seed, spec.epoch, spec.rank, worker))
    done = 0  # samples (items / M) of the units before this one
    for unit in stream:
        if (done + unit.emit) * m > skip:
            yield from render_unit(spec, unit, worker, done * m, max(0, skip - done * m))
        done += unit.emit


def render_unit(spec: StreamSpec, unit: Unit, worker: int, seq0: int, first: int = 0) -> list[Item]:
    """A unit's Items from seq0 + first on: a sample's views (render_items), or a mix window's views each mixed
    with its partner's same view (render_window)."""
    if mixing(spec):
        return render_window(spec, unit, worker, seq0, first)
    return render_items(spec, unit.samples[0], worker, seq0, first)


def render_window(spec: StreamSpec, unit: Unit, worker: int, seq0: int, first: int = 0) -> list[Item]:
    """A mix window's Items: every usable sample's views rendered unmixed (its partners are among them), then each
    item's view mixed with its partner's same view (augment.apply_mix). Entries gain "mix/lam" (the own label's
    weight at the rendered size) and "mix/label" (the partner's label; the own one when unmixed)."""
    m = spec.views_per_decode
    rendered = [render_items(spec, sample, worker, 0) for sample in unit.samples]  # unmixed, every view
    at = {sample.pos: k for k, sample in enumerate(unit.samples)}
    mixes_of = window_mixes(spec, unit)
    items = []
    for k in range(unit.emit):
        sample, mixes = unit.samples[k], mixes_of[k]
        for j in range(max(0, first - k * m), m):
            own, mix = rendered[k][j], mixes[j]
            partner = own
            if mix.mode != 0:
                if mix.partner not in at:
                    raise CacheError(
                        f"{spec.cache_path or 'the stream'}: {unit.shard}: sample {sample.raw['__key__']!r} "
                        f"(position {sample.pos}) is mixed with position {mix.partner} in view {j}, which is not "
                        "a usable sample of its mix window: the cache's records contradict its skipped samples; "
                        "re-dump the shard")
                partner = rendered[at[mix.partner]][j]
            entry = {**own.entry, "mix/lam": np.float32(mix.lam(spec.size)), "mix/label": np.int64(partner.label)}
            items.append(Item(worker, seq0 + k * m + j, augment.apply_mix(own.image, partner.image, mix),
                              own.label, entry))
    return items


def window_mixes(spec: StreamSpec, unit: Unit) -> list[list[augment.ViewMix]]:
    """Each of the window's samples' pairing in each view of the pass: the cache's records (views/aug), or drawn
    as the dump draws them (augment.draw_mixes over the window's positions, once per view)."""
    first = unit.samples[0].entries[0]
    if "views/aug" in first:
        return [[unpack_record(spec, unit.shard, s, entry)[1] for entry in s.entries] for s in unit.samples]
    if "views/box" in first:
        raise ConfigError(CACHED_WITHOUT_RECORDS)
    drawn = [augment.draw_mixes(spec.seed, view, unit.shard, unit.window, unit.count, spec.recipe)
             for view in stream_views(spec, None)]
    start = unit.window * spec.recipe.mix_window
    return [[mixes[s.pos - start] for mixes in drawn] for s in unit.samples]


# A cached stream reads each view's box and its augmentation record together; drawing the record anew from the
# stream's seed would put other augmentations on the cache's boxes.
CACHED_WITHOUT_RECORDS = ("a cached stream of a recipe that augments or mixes reads views/aug with views/box "
                          "(StreamSpec.entry_arrays: train_setup.entry_arrays_of)")


def unpack_record(spec: StreamSpec, shard: str, sample: Joined, entry: dict
                  ) -> tuple[augment.ViewAugment, augment.ViewMix | None]:
    """A cached view's augmentation record, unpacked; an unreadable one names the cache, shard and sample."""
    try:
        return augment.unpack(entry["views/aug"], sample.pos, spec.recipe)
    except CacheError as e:
        raise CacheError(f"{spec.cache_path}: {shard}: sample {sample.raw['__key__']!r}: {e}; the cache is damaged: "
                         "re-dump the shard") from None


def render_items(spec: StreamSpec, joined: Joined, worker: int, seq0: int, first: int = 0) -> list[Item]:
    """Decode one sample once and render its views first .. M - 1 (cpu renderer: crop, flip and the recipe's
    per-sample augmentations, augment.render_view), or hand the decoded image with each view's box and flip to the
    main process (device renderer)."""
    raw, cache_label, entries = joined.raw, joined.label, joined.entries
    sample = parse_sample(raw, spec.num_classes)
    if cache_label is not None and sample.label != cache_label:
        raise CacheMismatchError(f"{sample.shard}: sample {sample.key!r} has label {sample.label} in the shard but "
                                 f"{cache_label} in the cache; the shards changed since the dump")
    if spec.evaluation:
        try:
            image = center_crop(sample.image, dataclasses.replace(spec.recipe, image_size=spec.size))
        except Exception as e:
            raise BadSampleError(sample.shard, sample.key, f"image cannot be decoded ({e})") from None
        return [Item(worker, seq0, image, sample.label, entries[0])]
    on_device = spec.renderer in renderers.BATCHED
    compressed = spec.renderer == "gpu"  # no decode here: the header's size, the views, the bytes
    try:
        if compressed:
            h, w = image_size_of(sample.image)  # the bomb guard; the main process decodes
            img = Compressed(sample.image, h, w, sample.shard, sample.key)
        else:
            img = (renderers.decode_for_device if on_device else decode)(sample.image)
            h, w = int(img.shape[1]), int(img.shape[2])
    except Exception as e:
        raise BadSampleError(sample.shard, sample.key, f"image cannot be decoded ({e})") from None
    if SIZE_ENTRIES[0] in entries[0]:
        dumped = tuple(int(entries[0][name]) for name in SIZE_ENTRIES)
        entries = [{k: v for k, v in en.items() if k not in SIZE_ENTRIES} for en in entries]
        now = (h, w)  # decode checked it against the header (the gpu renderer's decode checks it again)
        if dumped != now:
            raise CacheMismatchError(
                f"{sample.shard}: sample {sample.key!r} is a {now[0]}x{now[1]} image, but it was "
                f"{dumped[0]}x{dumped[1]} when the cache was dumped: the stored crop boxes would fall on other "
                "pixels. The shard was re-encoded since the dump: train with the shards the cache was dumped from, "
                "or re-dump the cache")
    recipe = dataclasses.replace(spec.recipe, image_size=spec.size)
    augmented = augment.augments(recipe)
    views = stream_views(spec, None)
    if not on_device and len(entries) - first > 1:
        img = pixel_major(img)  # once per decode: each view's resize then reads it without a conversion copy
    items = []
    for j in range(first, len(entries)):
        entry = entries[j]
        if "views/box" in entry:
            box, flip = tuple(int(v) for v in entry["views/box"]), bool(entry["views/flip"])
        else:  # no cache: the view is drawn from (seed, view, key)
            top, left, bh, bw, flip = draw_view(spec.seed, views[j], sample.key, h, w, recipe)
            box = (top, left, bh, bw)
            if on_device:
                entry = {**entry, "views/box": np.array(box, np.uint16), "views/flip": np.uint8(flip)}
        aug = None
        if augmented:  # the cache's record (read: its partner is for render_window), or drawn as the dump draws it
            if "views/aug" in entry:
                aug = unpack_record(spec, sample.shard, joined, entry)[0]
            elif "views/box" in entry:
                raise ConfigError(CACHED_WITHOUT_RECORDS)
            else:
                aug = augment.draw_augment(spec.seed, views[j], sample.key, recipe)
        entry = {k: v for k, v in entry.items() if k != "views/aug"}  # rendered: the record is spent
        image = img if on_device else augment.render_view(img, box, flip, aug, recipe, contiguous=False)
        items.append(Item(worker, seq0 + j, image, sample.label, entry))  # (_group copies the image)
    return items


def shuffle_buffer(stream: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    buf: list = []
    for item in stream:
        buf.append(item)
        if len(buf) >= size:
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    while buf:
        j = int(rng.integers(len(buf)))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


def make_loader(spec: StreamSpec, plan: RankPlan, skips: Sequence[int], workers: int) -> DataLoader:
    """The DataLoader of one rank's pass. With workers, rendered views (cpu renderer) travel in TransferRing slots
    sized for one group: the prefetched groups, one being filled and one waiting in the canonical order."""
    prefetch = max(2, IMAGES_IN_FLIGHT // spec.block) if workers > 0 else None
    ring = None
    if workers > 0 and len(plan.workers) == workers and (spec.evaluation or spec.renderer == "cpu"):
        ring = TransferRing(workers, prefetch + 2, (spec.block, 3, spec.size, spec.size))
    return DataLoader(_WorkerStream(spec, plan, skips, ring), batch_size=None, num_workers=workers if workers > 0 else 0,
                      prefetch_factor=prefetch, persistent_workers=False, collate_fn=keep_as_is)


def canonical_runs(loader: Iterable, plan: RankPlan, skips: Sequence[int], block: int | None = None
                   ) -> Iterator[ItemGroup]:
    """Groups from the loader (or loose Items, grouped here), re-ordered into the canonical order of blocks of
    `block` (the spec's) samples."""
    pending: dict[tuple[int, int], ItemGroup] = {}
    ring = getattr(getattr(loader, "dataset", None), "ring", None)  # make_loader's DataLoader: its TransferRing
    it = iter(_as_groups(loader, block or ITEMS_PER_TRANSFER, ring))
    for w, start, stop in canonical_blocks(plan.counts, skips, block):
        while (w, start) not in pending:
            try:
                group = next(it)
            except StopIteration:
                raise ShardError(f"worker {w} ended before its sample {start}; a shard holds fewer samples than "
                                 "the plan counted (did the shards change?)") from None
            pending[(group.worker, group.seq0)] = group
        group = pending.pop((w, start))
        if len(group) != stop - start:
            raise ShardError(f"worker {w} sent {len(group)} samples from {start}, the plan expects {stop - start}; "
                             "a shard holds fewer samples than the plan counted (did the shards change?)")
        yield group


def _as_groups(stream: Iterable, block: int, ring: TransferRing | None = None) -> Iterator[ItemGroup]:
    """Pass ItemGroups through (images in a ring slot: a view of it, with the slot's release), group runs of loose
    Items, raise a worker's error where it arrives."""
    loose: list[Item] = []
    for x in start_workers(stream, None if ring is None else ring.need):
        if isinstance(x, tuple):
            yield from group_items(loose, block)
            raise x[1]
        if isinstance(x, ItemGroup):
            yield from group_items(loose, block)
            loose = []
            if isinstance(x.images, RingSlot):
                loan = ring.lend(x.images)
                x = dataclasses.replace(x, images=loan.tensor, loan=loan)
            yield x
        else:
            loose.append(x)
            if len(loose) > 1 and (x.worker != loose[-2].worker or x.seq // block != loose[-2].seq // block):
                yield from group_items(loose[:-1], block)
                loose = loose[-1:]
    yield from group_items(loose, block)


def canonical_items(loader: Iterable, plan: RankPlan, skips: Sequence[int], block: int | None = None
                    ) -> Iterator[Item]:
    """Items in the canonical order (one at a time; training takes canonical_runs whole). Images from a ring slot
    are copied out, and the slot released once the group is done."""
    for group in canonical_runs(loader, plan, skips, block):
        for i in range(len(group)):
            item = group.item(i)
            if group.loan is not None and item.image is not None:
                item = dataclasses.replace(item, image=item.image.clone())
            yield item
        if group.loan is not None:
            group.loan.release()


class Batch:
    """One batch: images uint8 (B, 3, S, S) (Packed decoded images for the device renderer, None when the stream
    renders none), labels int64 (B,), entries {name: (B, …)}.

    Its images may be a worker's transfer slot, lent: the holder calls release() once it has read them (training:
    after normalising them into new memory), and the slot goes back to its worker then, never earlier. Reading a
    released batch raises LoanError; a batch that is never released keeps its slot (the worker falls back to fresh
    memory), so keeping batches (`list(batches(...))`) is safe, only slower. `with batch:` releases on exit."""

    __slots__ = ("_loan", "_labels", "_entries")

    def __init__(self, images: Loan, labels: torch.Tensor, entries: dict[str, torch.Tensor]):
        self._loan, self._labels, self._entries = images, labels, entries

    @property
    def images(self) -> torch.Tensor | Packed | None:
        return self._loan.tensor  # raises LoanError once released

    @property
    def labels(self) -> torch.Tensor:
        self._loan.tensor  # noqa: B018  (the same guard: a released batch is gone as a whole)
        return self._labels

    @property
    def entries(self) -> dict[str, torch.Tensor]:
        self._loan.tensor  # noqa: B018
        return self._entries

    @property
    def lent(self) -> bool:
        """Its images are a worker's transfer slot (not memory of its own)."""
        return self._loan.from_ring

    def __len__(self) -> int:
        return self._labels.shape[0]

    def release(self) -> None:
        self._loan.release()

    def __enter__(self) -> "Batch":
        return self

    def __exit__(self, *exc) -> None:
        if not self._loan.released:
            self.release()


def batches(groups: Iterable[ItemGroup], batch_size: int, *, pin_memory: bool = False) -> Iterator[Batch]:
    """Groups in canonical order -> Batch.

    A batch that is one whole group (training's, whose block is the batch) is that group's memory, a worker's
    TransferRing slot included, lent until the holder releases it. Any other batch, and every batch to be pinned
    (for a non-blocking copy to a GPU), is copied once, slice by slice, into fresh memory, and each slot it came from
    goes back as soon as its last rows are copied; the copy is numpy's single-threaded memcpy: a torch copy here
    would wake the intra-op thread pool, which stalls for milliseconds while DataLoader workers hold the cores."""
    for run in _runs(groups, batch_size):
        yield collate(run, pin_memory)


def _runs(groups: Iterable[ItemGroup], batch_size: int) -> Iterator[list[tuple[ItemGroup, int, int]]]:
    """Groups -> each batch's (group, first row, stop row) slices; the last batch may be short."""
    run: list[tuple[ItemGroup, int, int]] = []
    have = 0
    for group in groups:
        start = 0
        while start < len(group):
            take = min(len(group) - start, batch_size - have)
            run.append((group, start, start + take))
            have += take
            start += take
            if have == batch_size:
                yield run
                run, have = [], 0
    if run:
        yield run


def collate(run: Sequence[tuple[ItemGroup, int, int]], pin_memory: bool = False) -> Batch:
    """One batch from group slices: the group itself when the batch is one whole group, else a copy."""
    g, a, b = run[0]
    if len(run) == 1 and not pin_memory and (g.loan is None or (a == 0 and b == len(g))):
        # views, nothing copied or touched: a slice of memory the group owns, or a whole lent slot, lent on
        images = g.images.slice(a, b) if isinstance(g.images, (Packed, Encoded)) else None if g.images is None \
            else g.images[a:b]
        entries = {k: torch.from_numpy(v[a:b]) for k, v in g.entries.items()}
        return Batch(g.loan or Loan(images), torch.from_numpy(g.labels[a:b]), entries)
    n = sum(stop - start for _, start, stop in run)
    first = run[0][0]
    images = None
    if isinstance(first.images, Packed):
        images = renderers.concat([g.images.slice(a, b) for g, a, b in run], pin_memory)
    elif isinstance(first.images, Encoded):  # compressed bytes: decoded on the device, nothing to pin
        images = renderers.concat_encoded([g.images.slice(a, b) for g, a, b in run])
    elif first.images is not None:
        images = torch.empty((n, *first.images.shape[1:]), dtype=torch.uint8, pin_memory=pin_memory)
        dst, at = images.numpy(), 0
        for g, start, stop in run:
            np.copyto(dst[at:at + stop - start], g.images.numpy()[start:stop])
            at += stop - start
    labels = torch.from_numpy(np.concatenate([g.labels[a:b] for g, a, b in run]))
    entries = {k: torch.from_numpy(np.concatenate([g.entries[k][a:b] for g, a, b in run])) for k in first.entries}
    for g, _, stop in run:
        if stop == len(g) and g.loan is not None:  # the group's last rows are copied out: its slot is free
            g.loan.release()
    return Batch(Loan(images), labels, entries)
