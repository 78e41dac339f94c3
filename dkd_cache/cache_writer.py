"""The cache's writer: create (or compare) the store, write a tar shard's whole chunks and its done record,
finalize. The commit protocol (the same on a folder and on an object store): whole chunks, then one create-only
done record per tar shard after the chunks are durable, then zarr.json rewritten "complete" as the last write."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from . import zarr_chunks
from .cache import Cache, chunk_keys, open_cache
from .cache_meta import STATUS_OK, STATUS_SKIPPED, CacheMeta, CacheState, ShardEntry, SkippedSample, parse_skipped
from .data import ShardIndex
from .errors import CacheError
from .store import DiskLocation, ObjectLocation, location


COMPRESSORS = (ZstdCodec(level=3), Crc32cCodec())


def sentinel(dtype) -> float | int:
    """Fill value of per-view arrays: a value real data never holds, so a chunk is never 'empty' (Zarr would
    not write it) and a missing inner chunk reads back as something detectable, never as zeros."""
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
    for name, (tail, dtype) in codec_arrays.items():
        fill = sentinel(dtype)
        specs[f"logits/{name}"] = ((v, n, *tail), dtype, (1, c, *tail), (v, c, *tail), fill)
    return specs


@contextlib.contextmanager
def _store_writes(path: str | Path, what: str) -> Iterator[None]:
    """A failed write (disk full, file size limit, permissions) is a CacheError naming the cache, not a traceback."""
    try:
        yield
    except OSError as e:
        raise CacheError(f"{path}: cannot write {what} ({type(e).__name__}: {e}); free disk space or fix the "
                         "folder's permissions, then rerun the same dump-teacher command: it continues where it "
                         "stopped") from e


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
    keys = [k for ix in indexes for k in ix.keys]
    key_len = max(16, -(-max(len(k.encode()) for k in keys) // 8) * 8)
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
        for j, k in enumerate(ix.keys):
            b = k.encode()
            key_arr[entry.row_start + j, : len(b)] = np.frombuffer(b, np.uint8)
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
    pending = cache.pending_shards()
    if pending:
        raise CacheError(f"{cache.path}: {len(pending)} shard(s) not dumped yet, first "
                         f"{[cache.meta.manifest.shards[i].name for i in pending[:3]]}; rerun dump-teacher")
    skipped: list[SkippedSample] = []
    for i, entry in enumerate(cache.meta.manifest.shards):
        skipped.extend(parse_skipped(cache.shard_record(i).get("skipped", []),
                                     where=f"{cache.path}: done record of tar shard {entry.name}"))
    return write_meta(cache, dataclasses.replace(cache.meta, state=CacheState.COMPLETE, skipped=tuple(skipped)))


@contextlib.contextmanager
def writer_lock(path: str | Path, rank: int = 0) -> Iterator[None]:
    """One dump at a time per local cache (store.DiskLocation.writer_lease: an flock per rank)."""
    with location(path).writer_lease(rank):
        yield
