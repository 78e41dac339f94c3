"""One scan of the shards, shared: every rank scans its share, the results are gathered, and a cache keeps them.

dump-teacher, train-student and verify all need each shard's keys, labels and bad samples (data.ShardIndex). On
ImageNet over object storage that is a read of every byte of 1,024 tars; done by rank 0 alone while the others wait,
it can outlast any collective timeout. Here:

    urls --rank r takes urls[r::world]--> stamp each (size + mtime, or size + ETag)
         --a record beside the cache (<cache>.scan/<shard>.json) with the same stamp? reuse it
                                                                   : data.scan_shard(url, skip_bad=True)
         --gathered (dist.all_gather_object, after a wait_for barrier)--> [Scanned] in url order
         --rank 0 writes the records it lacked--> apply_rules(num_classes, skip_bad) --> [ShardIndex]

The records sit beside the cache, not in it: the first dump scans before its cache exists (a cache is created
whole, staged), and a trainer may read a cache it cannot write. They are a cache of reads only: a record whose stamp
differs, or that cannot be read, means a scan; one that cannot be written, a scan next time.

A record is the raw scan (labels as read, bad samples found, never raised), so dump (the teacher's classes, with or
without --skip-bad), train and verify share it: their rules are applied to it afterwards (apply_rules), with the
messages data.scan_shard would give.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import dist as dist_mod
from .data import REMOTE_PREFIXES, ShardIndex, keys_array, parse_label, scan_shard, shard_name
from .errors import BadSampleError, DKDCacheError, ShardError
from .store import location

SUFFIX = ".scan"  # beside a cache at PATH: PATH.scan/<shard name>.json, one record per shard
FORMAT = 1


def records_at(cache: str) -> str:
    """Where the scan records of the cache at `cache` (a folder or an s3:// prefix) live."""
    return location(cache).url.rstrip("/") + SUFFIX


def shard_stamp(url: str) -> str | None:
    """What says a shard is unchanged: its size and modification time (a file) or size and ETag (s3://); None for
    a stream (pipe:, http) that cannot be asked: such a shard is always scanned."""
    if url.startswith("s3://"):
        from .store import object_fs

        try:
            info = object_fs().info(url[len("s3://"):])
        except Exception:  # noqa: BLE001  (unreachable store: the scan itself will name the failure)
            return None
        etag = info.get("ETag") or info.get("etag")
        return None if not etag else f"size={info.get('size')} etag={str(etag).strip(chr(34))}"
    if url.startswith(REMOTE_PREFIXES):
        return None
    try:
        st = os.stat(url)
    except OSError:
        return None
    return f"size={st.st_size} mtime_ns={st.st_mtime_ns}"


def record_of(ix: ShardIndex, stamp: str) -> dict:
    return {"format": FORMAT, "name": ix.name, "stamp": stamp, "keys": [k.decode() for k in ix.keys.tolist()],
            "labels": ix.labels.tolist(), "bad": [[p, r] for p, r in ix.bad]}


def index_of(record: dict, url: str) -> ShardIndex:
    """A record's index (keys and labels as arrays, as data.scan_shard gives them); a record whose fields are not
    what record_of writes is a TypeError or ValueError."""
    labels = record["labels"]
    if not isinstance(labels, list) or not all(type(x) is int for x in labels):
        raise TypeError("a record's labels are a list of int")
    return ShardIndex(url=url, name=shard_name(url), keys=keys_array(record["keys"]),
                      labels=np.array(labels, np.int64).astype(np.int32),
                      bad=tuple((int(p), str(r)) for p, r in record["bad"]))


def load_record(cache: str | None, url: str, stamp: str | None) -> ShardIndex | None:
    """The recorded scan of a shard when the cache holds one with the same stamp; None otherwise (or unreadable)."""
    if cache is None or stamp is None:
        return None
    try:
        raw = location(records_at(cache)).read(f"{shard_name(url)}.json")
        record = json.loads(raw) if raw is not None else None
    except (OSError, ValueError, DKDCacheError):
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("stamp") != stamp:
        return None
    try:
        return index_of(record, url)
    except (KeyError, TypeError, ValueError):
        return None


def save_records(cache: str, fresh: Sequence[tuple[ShardIndex, str]]) -> bool:
    """Write the records of shards just scanned beside the cache (rank 0). Where they cannot be written (read-only)
    none are kept: the next command scans again. Returns whether they were written."""
    try:
        if not fresh:
            return False
        location(records_at(cache)).write_files({f"{ix.name}.json": json.dumps(record_of(ix, stamp)).encode()
                                                 for ix, stamp in fresh})
        return True
    except (OSError, DKDCacheError):
        return False


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scanned:
    """One shard's raw scan as a rank found it: its index (error None), or the error that stopped the scan."""

    position: int  # in the urls given
    index: ShardIndex | None
    error: DKDCacheError | None = None
    stamp: str | None = None
    fresh: bool = False  # scanned now (not read from a record)


def _scan_one(position: int, url: str, cache: str | None) -> Scanned:
    stamp = shard_stamp(url)
    recorded = load_record(cache, url, stamp)
    if recorded is not None:
        return Scanned(position=position, index=recorded, stamp=stamp)
    try:
        return Scanned(position=position, index=scan_shard(url, None, skip_bad=True), stamp=stamp, fresh=True)
    except DKDCacheError as e:
        return Scanned(position=position, index=None, error=e)
    except Exception as e:  # noqa: BLE001  (handed to every rank: a rank must not leave the others waiting)
        return Scanned(position=position, index=None,
                       error=ShardError(f"{url}: cannot be read ({type(e).__name__}: {e})"))


def scan_raw(urls: Sequence[str], *, dist: dist_mod.DistInfo = dist_mod.DistInfo(), cache: str | None = None,
             threads: int = 8) -> list[Scanned]:
    """Every shard's raw scan, in url order, on every rank: rank r scans urls[r::world] (in threads: it is I/O),
    reusing the records beside `cache` whose stamp matches; rank 0 records the shards scanned anew."""
    mine = list(range(dist.rank, len(urls), dist.world))
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        found = list(pool.map(lambda i: _scan_one(i, urls[i], cache), mine))
    dist_mod.wait_for(dist, f"the shard scan ({len(urls)} shards over {dist.world} ranks)")
    by_position: dict[int, Scanned] = {}
    for part in dist_mod.all_gather_object(dist, found):
        by_position.update((s.position, s) for s in part)
    out = [by_position[i] for i in range(len(urls))]
    if dist.is_main and cache is not None:
        save_records(cache, [(s.index, s.stamp) for s in out if s.fresh and s.stamp is not None])
    return out


def apply_rules(ix: ShardIndex, num_classes: int | None, skip_bad: bool) -> ShardIndex:
    """A raw scan under a command's rules, as data.scan_shard(url, num_classes, skip_bad) would give it: labels
    outside num_classes are bad samples; without skip_bad the first bad sample is raised as a BadSampleError."""
    bad = dict(ix.bad)
    labels = ix.labels.copy()
    if num_classes is not None:
        for pos in np.flatnonzero(labels >= num_classes).tolist():  # a loop over the few outside, not every sample
            if pos not in bad:
                try:
                    parse_label(ix.name, ix.key(pos), str(int(labels[pos])).encode(), num_classes)
                except BadSampleError as e:
                    bad[pos] = e.reason
                    labels[pos] = -1
    if bad and not skip_bad:
        first = min(bad)
        raise BadSampleError(ix.name, ix.key(first), bad[first])
    if len(bad) == len(ix.bad):
        return ix
    return dataclasses.replace(ix, labels=labels, bad=tuple(sorted(bad.items())))


def scan_shards(urls: Sequence[str], num_classes: int | None = None, skip_bad: bool = False, *,
                dist: dist_mod.DistInfo = dist_mod.DistInfo(), cache: str | None = None,
                threads: int = 8) -> list[ShardIndex]:
    """data.scan_shards's result (in url order, the first failing shard's error raised), scanned across the ranks
    and recorded beside `cache`: the same on every rank. A collective: every rank calls it."""
    out = []
    for s in scan_raw(urls, dist=dist, cache=cache, threads=threads):
        if s.error is not None:
            raise s.error
        out.append(apply_rules(s.index, num_classes, skip_bad))
    return out
