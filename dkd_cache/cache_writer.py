"""The cache's writer: create (or compare) the store, write a tar shard's whole chunks and its done record,
finalize. The commit protocol (the same on a folder and on an object store): whole chunks, then one create-only
done record per tar shard after the chunks are durable, then zarr.json rewritten "complete" as the last write."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from . import augment, host_threads, zarr_chunks
from .cache import Cache, chunk_keys, decode_keys, open_cache
from .cache_meta import (STATUS_OK, STATUS_SKIPPED, CacheMeta, CacheState, ShardEntry, SkippedSample,
                         build_manifest, parse_skipped)
from .data import ShardIndex
from .dist import DistInfo, barrier, broadcast_object, on_rank0
from .errors import CacheError, CacheMismatchError, ConfigError, DKDCacheError
from .codec_fidelity import CodecFidelity
from .logit_codecs import Codec
from .store import DiskLocation, Lease, ObjectLocation, location


COMPRESSORS = (ZstdCodec(level=3), Crc32cCodec())


def sentinel(dtype) -> float | int:
    """Fill value of per-view arrays: a value real data never holds, so a chunk is never 'empty' (Zarr would
    not write it) and a missing inner chunk reads back as something detectable: NaN, -1, and for the codecs'
    unsigned code arrays 0, of which no codec writes a whole row (cache.unfilled_rows)."""
    kind = np.dtype(dtype).kind
    return float("nan") if kind == "f" else (-1 if kind == "i" else 0)


def _array_specs(meta: CacheMeta, key_len: int, codec_arrays: dict[str, tuple[tuple[int, ...], Any]]):
    """name -> (shape, dtype, chunks, shards, fill) for every array of the schema."""
    n, v, c = meta.manifest.rows, meta.views, meta.chunk_rows
    specs = {
        "samples/key": ((n, key_len), np.uint8, (c, key_len), None, 0),
        "samples/label": ((n,), np.int32, (c,), None, -1),
        "samples/shard": ((n,), np.int32, (c,), None, -1),
        "samples/status": ((n,), np.uint8, (c,), None, 0),
        "samples/height": ((n,), np.int32, (c,), None, 0),
        "samples/width": ((n,), np.int32, (c,), None, 0),
        "views/box": ((v, n, 4), np.uint16, (1, c, 4), (v, c, 4), 65535),
        "views/flip": ((v, n), np.uint8, (1, c), (v, c), 255),
        "logits/target": ((v, n), np.float32, (1, c), (v, c), float("nan")),
        "logits/lse": ((v, n, len(meta.temperatures)), np.float32, (1, c, len(meta.temperatures)),
                       (v, c, len(meta.temperatures)), float("nan")),
    }
    specs.update({name: ((v, n, *tail), dtype, (1, c, *tail), (v, c, *tail), fill)
                  for name, (tail, dtype, fill) in augment_arrays(meta).items()})
    for name, (tail, dtype) in codec_arrays.items():
        fill = sentinel(dtype)
        specs[f"logits/{name}"] = ((v, n, *tail), dtype, (1, c, *tail), (v, c, *tail), fill)
    return specs


def augment_arrays(meta: CacheMeta) -> dict[str, tuple[tuple[int, ...], Any, float | int]]:
    """The per-view arrays a recipe beyond crop and flip adds, name -> (tail shape, dtype, fill): views/aug (the
    packed augmentation record, augment.record_bytes; fill 255, which no record's flags byte holds) when the recipe
    augments or mixes, logits/target_b (the partner label's exact logit) when it mixes. None for crop + flip: such a
    cache holds exactly the arrays it held before augmentation existed."""
    out: dict[str, tuple[tuple[int, ...], Any, float | int]] = {}
    b = augment.record_bytes(meta.recipe)
    if b:
        out["views/aug"] = ((b,), np.uint8, 255)
    if augment.mixes(meta.recipe):
        out["logits/target_b"] = ((), np.float32, float("nan"))
    return out


@contextlib.contextmanager
def _store_writes(path: str | Path, what: str, fix: str = "free disk space or fix the folder's permissions, then "
                  "rerun the same dump-teacher command: it continues where it stopped") -> Iterator[None]:
    """A failed write (disk full, file size limit, permissions) is a CacheError naming the cache, not a traceback."""
    try:
        yield
    except OSError as e:
        raise CacheError(f"{path}: cannot write {what} ({type(e).__name__}: {e}); {fix}") from e


def create_cache(path: str | Path, meta: CacheMeta, indexes: Sequence[ShardIndex],
                 codec_arrays: dict[str, tuple[tuple[int, ...], Any]],
                 codec_state: dict[str, np.ndarray] | None = None) -> Cache:
    """Create the store, all arrays, and the per-sample arrays (keys, labels, shard, status). One process only.

    codec_state: the codec's own arrays (a learned codec's basis), written once as `codec/<name>` before the
    metadata, so a cache that exists always holds the basis its metadata records.

    Staged (store.py): on disk, built in a hidden sibling folder renamed into place when whole; on an object
    store, under a 'creating' marker deleted when whole. A crash during creation leaves nothing that opens as a
    cache; the next dump clears it (remove_stale of store.py's locations, under the writer lease).
    """
    with _store_writes(path, "the new cache"):
        final = location(path)
        with final.staged_creation() as staging:
            _create_cache(staging, meta, indexes, codec_arrays, codec_state or {})
        return open_cache(path, mode="r+")


def _create_cache(loc: DiskLocation | ObjectLocation, meta: CacheMeta, indexes: Sequence[ShardIndex],
                  codec_arrays: dict[str, tuple[tuple[int, ...], Any]], codec_state: dict[str, np.ndarray]) -> None:
    # the keys' UTF-8, NUL-padded to a multiple of 8 bytes: each index holds them as one fixed-width bytes array
    key_len = max(16, -(-max(ix.keys.dtype.itemsize for ix in indexes) // 8) * 8)
    # "a", not "w-": an object-store prefix already holds the lease and the creation marker (no zarr.json yet)
    group = zarr.open_group(loc.zarr_store(), mode="a", zarr_format=3)
    for name, (shape, dtype, chunks, shards, fill) in _array_specs(meta, key_len, codec_arrays).items():
        group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards, fill_value=fill,
                           compressors=COMPRESSORS, config={"write_empty_chunks": True})
    n = meta.manifest.rows
    key_arr = np.zeros((n, key_len), np.uint8)
    label = np.full(n, -1, np.int32)
    shard = np.full(n, -1, np.int32)
    status = np.zeros(n, np.uint8)
    for i, (entry, ix) in enumerate(zip(meta.manifest.shards, indexes)):
        rows = slice(entry.row_start, entry.row_start + entry.samples)
        width = ix.keys.dtype.itemsize
        key_arr[rows, :width] = np.ascontiguousarray(ix.keys).view(np.uint8).reshape(-1, width)
        label[rows] = ix.labels
        shard[rows] = i
        status[rows] = STATUS_OK
        for pos, _reason in ix.bad:
            status[entry.row_start + pos] = STATUS_SKIPPED
    group["samples/key"][:] = key_arr
    group["samples/label"][:] = label
    group["samples/shard"][:] = shard
    group["samples/status"][:] = status
    for name, values in codec_state.items():
        arr = group.create_array(f"codec/{name}", shape=values.shape, dtype=values.dtype, chunks=values.shape,
                                 compressors=COMPRESSORS)
        arr[...] = values
    if isinstance(loc, DiskLocation):
        (loc.path / "_dkd" / "done").mkdir(parents=True, exist_ok=True)
    group.attrs["dkd_cache"] = meta.to_dict()  # written after the arrays exist; state "writing"


def write_meta(cache: Cache, meta: CacheMeta) -> Cache:
    with _store_writes(cache.path, "the cache's metadata (zarr.json)"):
        cache.group.attrs["dkd_cache"] = meta.to_dict()
    return dataclasses.replace(cache, meta=meta)


def write_shard(cache: Cache, shard: int, block: dict[str, np.ndarray], record: dict[str, Any],
                lease=None, commit: Executor | None = None) -> Future | None:
    """Write one tar shard's rows for every array (whole chunks and Zarr shards only), then its completion
    record: one create-only object, written last, and only while `lease` (store.Lease) is still ours.

    With `commit` (an executor of one thread), the rows are written now and the rest (fsync of the chunks, lease
    check, record) runs there, overlapped with the caller's next work; the returned future raises what it
    raised. One thread keeps the records in the order the shards were written."""
    entry = cache.meta.manifest.shards[shard]
    what = f"shard {entry.name}'s rows"
    with _store_writes(cache.path, what):
        _write_rows(cache, entry, block)

    def finish() -> None:
        with _store_writes(cache.path, what):
            if lease is not None:
                lease.check()
            # Durable before vouched for: after a power loss the record must never stand for torn or missing chunks.
            cache.location.sync([k for name in block for k in chunk_keys(cache, name, entry.row_start,
                                                                           entry.row_stop)])
            if not cache.location.create(cache.done_key(shard), json.dumps(record).encode()):
                raise CacheError(f"{cache.path}: shard {entry.name} already has a done record although this dump "
                                 "wrote it; two dumps wrote this cache at once. Check it with dkd-cache verify")

    if commit is None:
        finish()
        return None
    return commit.submit(finish)


def _write_rows(cache: Cache, entry: ShardEntry, block: dict[str, np.ndarray]) -> None:
    rows = slice(entry.row_start, entry.row_stop)
    files: dict[str, bytes] = {}  # whole chunks encoded here (zarr_chunks), written as one batch of files
    for name, values in block.items():
        arr = cache.array(name)
        per_row = name.startswith("samples/")
        region = (rows,) if per_row else (slice(0, arr.shape[0]), rows)
        encoded = _whole_chunks(cache, name, arr, region, values)
        if encoded is None:
            arr[region] = values
        else:
            files.update({f"{name}/{k}": v for k, v in encoded.items()})
    cache.location.write_files(files)


def _whole_chunks(cache: Cache, name: str, arr: zarr.Array, region: tuple[slice, ...],
                  values: np.ndarray) -> dict[str, bytes] | None:
    """The chunk files of `values` written at `region` (leading axes; the rest whole), encoded in this thread
    (zarr_chunks), or None when zarr must write them (another codec chain, or not whole chunks)."""
    lay = cache.chunk_layout(name)
    shape = tuple(r.stop - r.start for r in region) + tuple(arr.shape[len(region):])
    if lay is None or np.shape(values) != shape:
        return None
    return zarr_chunks.encode(lay, tuple(r.start for r in region) + (0,) * (len(shape) - len(region)), values)


def finalize(cache: Cache, lease=None) -> Cache:
    """Mark the cache complete once every shard has its record: the last write of a dump (zarr.json, one
    whole object)."""
    if lease is not None:
        lease.check()
    records = cache.done_records()  # each read once: the pending ones and the skipped samples come from them
    pending = [i for i in range(len(cache.meta.manifest.shards)) if i not in records]
    if pending:
        raise CacheError(f"{cache.path}: {len(pending)} shard(s) not dumped yet, first "
                         f"{[cache.meta.manifest.shards[i].name for i in pending[:3]]}; rerun dump-teacher")
    skipped: list[SkippedSample] = []
    for i, entry in enumerate(cache.meta.manifest.shards):
        skipped.extend(parse_skipped(records[i].get("skipped", []),
                                     where=f"{cache.path}: done record of tar shard {entry.name}"))
    return write_meta(cache, dataclasses.replace(cache.meta, state=CacheState.COMPLETE, skipped=tuple(skipped)))


# --------------------------------------------------------------------------------------------- the writer
@dataclasses.dataclass(frozen=True, kw_only=True)
class NewCache:
    """What this run would write: its metadata (a learned codec not fitted yet) and the shard indexes its manifest
    was built from (the per-sample arrays are written from them)."""

    meta: CacheMeta
    indexes: tuple[ShardIndex, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibrated:
    """What the calibration hook gives: the codec to store (fitted, if learned; chosen, with --codec auto) and its
    held-out fidelity (None: not measured)."""

    codec: Codec
    fidelity: CodecFidelity | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class WriterSpec:
    """How to open a writer. `meta`: this run's metadata; its manifest is built here from `scan`, which every rank
    runs, under the writer lease (a refused second dump never pays for a scan): a collective whose ranks each scan a
    share (shard_scan.scan_shards). `calibrate` runs only when
    a cache is created: the caller passes it (calibration.calibrate), so the writer never builds a teacher; a
    learned codec needs it. `codec_chosen`: the codec is chosen by `calibrate` (--codec auto), so a cache that
    exists keeps the codec it was created with."""

    out: str
    meta: CacheMeta  # its manifest is replaced by the one built from the scan
    scan: Callable[[], Sequence[ShardIndex]]
    calibrate: Callable[[NewCache], Calibrated] | None = None
    codec_chosen: bool = False
    dist: DistInfo = DistInfo()
    lease_seconds: float = 120.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleRow:
    """A sample's per-sample and per-view entries (everything but its logits)."""

    shard: int  # index in the manifest
    pos: int  # position in its tar shard (row = the shard's row_start + pos)
    boxes: np.ndarray  # uint16 (V, 4)
    flips: np.ndarray  # uint8 (V,)
    height: int
    width: int
    skipped: str | None = None  # why the sample was left out (--skip-bad); it then has no logits
    aug: np.ndarray | None = None  # uint8 (V, B): each view's packed augmentation record (views/aug), B =
    #                                augment.record_bytes(recipe); None for a crop + flip recipe


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogitRows:
    """Some views of one tar shard's samples: the teacher's logits as stored (B rows)."""

    shard: int
    pos: np.ndarray  # (B,) position of each row's sample in the shard
    view: np.ndarray  # (B,)
    target: np.ndarray  # float32 (B,)
    lse: np.ndarray  # float32 (B, T)
    encoded: dict[str, np.ndarray]  # codec array name (as under logits/) -> (B, ...)
    target_b: np.ndarray | None = None  # float32 (B,) the partner label's exact logit (mixing recipes only)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WriteCounts:
    """What this rank's writer has handed to the commit thread so far."""

    shards: int = 0
    views: int = 0
    skipped: int = 0


class _ShardBuffer:
    """One tar shard's rows until every view of every sample has its logits."""

    def __init__(self, cache: Cache, shard: int, status: np.ndarray):
        meta = cache.meta
        self.entry = entry = meta.manifest.shards[shard]
        rows, v = entry.row_stop - entry.row_start, meta.views
        self.samples_in = 0  # samples added (skipped ones too)
        self.views_pending = 0  # views of added samples still without logits
        self.skipped: list[SkippedSample] = []
        self.block: dict[str, np.ndarray] = {
            "samples/status": status[entry.row_start : entry.row_stop].copy(),  # as created (scan-time skips)
            "samples/height": np.zeros(rows, np.int32),
            "samples/width": np.zeros(rows, np.int32),
            "views/box": np.zeros((v, rows, 4), np.uint16),
            "views/flip": np.zeros((v, rows), np.uint8),
            "logits/target": np.zeros((v, rows), np.float32),
            "logits/lse": np.zeros((v, rows, len(meta.temperatures)), np.float32),
        }
        for name, (tail, dtype) in meta.codec.arrays(meta.num_classes).items():
            self.block[f"logits/{name}"] = np.zeros((v, rows, *tail), dtype)
        for name, (tail, dtype, _fill) in augment_arrays(meta).items():
            self.block[name] = np.zeros((v, rows, *tail), dtype)

    @property
    def whole(self) -> bool:
        return self.samples_in == self.entry.samples and self.views_pending == 0


class CacheWriter:
    """This rank's writer of an open cache: buffers each tar shard's rows, hands a whole shard to the commit thread
    (whole chunks now; fsync, lease check and the create-only done record there, in shard order), and on close
    marks the cache complete (rank 0). Made by `open_writer`; samples must be added before their logits."""

    def __init__(self, cache: Cache, lease: Lease, dist: DistInfo, pending: Sequence[int], committer: Executor):
        self.cache, self.lease, self.dist = cache, lease, dist
        self.pending = tuple(pending)  # every rank's shards still to write, listed once by rank 0
        self.codec = cache.codec  # with its stored basis, checked against the recorded hash
        self.counts = WriteCounts()
        self._committer = committer
        self._commits: collections.deque[Future] = collections.deque()
        self._buffers: dict[int, _ShardBuffer] = {}
        self._status = cache.read_rows("samples/status", 0, cache.meta.manifest.rows)  # one read for every shard

    @property
    def meta(self) -> CacheMeta:
        return self.cache.meta

    def my_shards(self) -> tuple[int, ...]:
        """This rank's share of the pending shards (whole shards per rank: each rank writes only its own chunks)."""
        return self.pending[self.dist.rank :: self.dist.world]

    def add_sample(self, row: SampleRow) -> None:
        buf = self._buffers.get(row.shard)
        if buf is None:
            buf = self._buffers[row.shard] = _ShardBuffer(self.cache, row.shard, self._status)
        b = buf.block
        b["samples/height"][row.pos] = row.height
        b["samples/width"][row.pos] = row.width
        b["views/box"][:, row.pos] = row.boxes
        b["views/flip"][:, row.pos] = row.flips
        if "views/aug" in b:
            if row.aug is None or row.aug.shape != b["views/aug"].shape[::2]:
                raise CacheError(f"{self.cache.path}: shard {buf.entry.name} position {row.pos}: the cache's recipe "
                                 f"stores a (views, {b['views/aug'].shape[2]}) augmentation record per sample, got "
                                 f"{None if row.aug is None else row.aug.shape}")
            b["views/aug"][:, row.pos] = row.aug
        elif row.aug is not None and row.aug.size:
            raise CacheError(f"{self.cache.path}: shard {buf.entry.name} position {row.pos}: the cache's recipe stores "
                             "no augmentation record")
        if row.skipped is not None:
            b["samples/status"][row.pos] = STATUS_SKIPPED
            at = buf.entry.row_start + row.pos
            key = decode_keys(self.cache.read_rows("samples/key", at, at + 1))[0]
            buf.skipped.append(SkippedSample(shard=buf.entry.name, key=key, reason=row.skipped))
        else:
            buf.views_pending += self.meta.views
        buf.samples_in += 1
        self._commit_if_whole(row.shard)

    def add_logits(self, rows: LogitRows) -> None:
        buf = self._buffers[rows.shard]
        b = buf.block
        b["logits/target"][rows.view, rows.pos] = rows.target
        b["logits/lse"][rows.view, rows.pos] = rows.lse
        if "logits/target_b" in b:
            if rows.target_b is None:
                raise CacheError(f"{self.cache.path}: shard {buf.entry.name}: the cache's recipe mixes, so its rows "
                                 "need target_b")
            b["logits/target_b"][rows.view, rows.pos] = rows.target_b
        elif rows.target_b is not None:
            raise CacheError(f"{self.cache.path}: shard {buf.entry.name}: the cache's recipe does not mix, its rows "
                             "carry no target_b")
        for name, values in rows.encoded.items():
            b[f"logits/{name}"][rows.view, rows.pos] = values
        buf.views_pending -= len(rows.pos)
        self.counts = dataclasses.replace(self.counts, views=self.counts.views + len(rows.pos))
        self._commit_if_whole(rows.shard)

    def _commit_if_whole(self, shard: int) -> None:
        if self._buffers[shard].whole:
            buf = self._buffers.pop(shard)
            record = {"shard": buf.entry.name, "samples": buf.entry.samples,
                      "skipped": [x.to_dict() for x in buf.skipped], "views": self.meta.views}
            with host_threads.one_thread():  # zstd and crc32c of the chunks, in this thread
                self._commits.append(write_shard(self.cache, shard, buf.block, record, self.lease,
                                                 commit=self._committer))
            self.counts = dataclasses.replace(self.counts, shards=self.counts.shards + 1,
                                              skipped=self.counts.skipped + len(buf.skipped))
        while self._commits and self._commits[0].done():
            self._commits.popleft().result()  # a failed commit raises here

    def close(self) -> bool:
        """Wait for this rank's commits; once every rank has, rank 0 marks the cache complete. finalize refuses
        (CacheError on every rank) if a shard of the plan has no done record, so a dump never ends successfully
        with the cache still 'writing'. Returns whether the cache is complete."""
        while self._commits:
            self._commits.popleft().result()
        if self._buffers:
            names = [b.entry.name for b in self._buffers.values()]
            raise CacheError(f"{self.cache.path}: tar shard(s) {names} ended before all their samples arrived; "
                             "rerun the same dump-teacher command to complete them")
        barrier(self.dist)
        return on_rank0(self.dist, self._finalize)

    def _finalize(self) -> bool:
        return finalize(self.cache, self.lease).meta.state is CacheState.COMPLETE


@contextlib.contextmanager
def open_writer(spec: WriterSpec) -> Iterator[CacheWriter]:
    """Take the writer lease, create the cache (or check that the one there was made with the same settings), list
    the pending shards once for every rank, and yield this rank's writer; the lease is released on exit, after the
    commit thread has finished. Call `close()` on the writer to finalize.

    Rank 0 takes the lease; every rank then scans its share of the shards (spec.scan, a collective); rank 0 creates
    or compares while the other ranks wait (dist.on_rank0: as long as DistInfo.wait_s allows, not the collective
    timeout), then they open the cache. On disk every rank holds its own flock; on an object store rank 0 holds the
    lease object and the other ranks check, before each commit, that it is still rank 0's."""
    dist, out = spec.dist, location(spec.out)
    with contextlib.ExitStack() as held:
        error: DKDCacheError | None = None
        lease = None
        if dist.is_main or not out.is_remote:
            try:
                with _store_writes(spec.out, "the writer lock", fix=_READ_ONLY_FIX):
                    lease = held.enter_context(out.writer_lease(dist.rank, seconds=spec.lease_seconds))
            except DKDCacheError as e:
                error = e
        if dist.is_main and error is None:
            try:
                with _store_writes(spec.out, "the cache", fix=_READ_ONLY_FIX):
                    out.remove_stale()
            except DKDCacheError as e:
                error = e
        # every rank knows the lease is rank 0's before any rank scans: a refused second dump never scans
        message, owner = broadcast_object(dist, (None if error is None else f"{type(error).__name__}: {error}",
                                                 None if lease is None else lease.owner))
        if error is not None:
            raise error
        if message is not None:
            raise DKDCacheError(f"rank 0 failed: {message}")
        if lease is None:  # a rank > 0 on an object store: checks rank 0's lease
            lease = held.enter_context(out.writer_lease(dist.rank, seconds=spec.lease_seconds, owner=owner))
        indexes = tuple(spec.scan())  # every rank its share; the same result on every rank
        on_rank0(dist, functools.partial(_create_or_compare, spec, indexes),
                 what="rank 0 to create the cache (or compare the one there), fitting the codec if it must")
        del indexes  # O(samples) Python objects: gone before the dump runs (the manifest keeps counts and digests)
        cache = open_cache(spec.out, mode="r+")
        # One plan for every rank: rank 0 lists the done records once, before any rank can write, and every rank
        # splits that same list. (Each rank listing on its own raced with the fastest rank's first done record: a
        # late rank saw a shorter list, so its round-robin share shifted, a shard went to no rank, another to two.)
        pending = on_rank0(dist, cache.pending_shards)
        # The fsyncs and done record of a written shard wait on the disk on one thread, in shard order, while the
        # caller encodes the next shard; every commit has finished (or raised) when this block exits.
        with ThreadPoolExecutor(1, thread_name_prefix="dkd-commit") as committer:
            yield CacheWriter(cache, lease, dist, pending, committer)


_READ_ONLY_FIX = "choose a writable --out (or fix the folder's permissions), then rerun the same dump-teacher command"


def _create_or_compare(spec: WriterSpec, indexes: tuple[ShardIndex, ...]) -> None:
    """Rank 0, under the lease, with what a crash left cleared: create the cache from the shards' scan, or refuse
    the one there when it was made with other settings (the same codec keeps its stored basis: a resume never
    refits)."""
    out = location(spec.out)
    meta = dataclasses.replace(spec.meta, manifest=build_manifest(indexes, spec.meta.chunk_rows))
    new = NewCache(meta=meta, indexes=indexes)
    if out.exists("zarr.json"):
        existing = open_cache(spec.out, mode="r+")
        if existing.meta.codec.name == meta.codec.name or spec.codec_chosen:
            meta = dataclasses.replace(meta, codec=existing.meta.codec)
        diffs = existing.meta.differences(meta)
        if diffs:
            raise CacheMismatchError(f"{spec.out} holds a cache made with other settings; refusing to mix them. "
                                     "Differences: " + "; ".join(diffs) + ". Use another --out.")
        return
    if not out.is_empty() and not (out.is_remote and out.keys("_dkd") == ["lease.json"]):
        raise CacheError(f"{spec.out} exists and is not a dkd-cache store; choose another --out")
    codec = meta.codec
    if spec.calibrate is not None:
        calibrated = spec.calibrate(new)
        codec = calibrated.codec
        meta = dataclasses.replace(meta, codec=codec, fidelity=calibrated.fidelity)
    elif codec.learned or spec.codec_chosen:
        raise ConfigError(f"codec {codec.name!r} is learned (or chosen on calibration) and needs a fit on the "
                          "teacher's logits; the writer was given none")
    create_cache(spec.out, meta, new.indexes, codec.arrays(meta.num_classes), codec.state_arrays())
