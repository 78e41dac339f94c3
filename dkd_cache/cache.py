"""The cache's reader: open a Zarr v3 store of teacher logits per (view, sample), read its rows, check it.
Format version 1. Its metadata is cache_meta.py; dump-teacher writes it through cache_writer.py.

Layout (N = rows, V = views, C = chunk_rows; every tar shard owns whole chunks: its rows start at a multiple
of C and are padded to one, so two writers never touch the same chunk or Zarr shard):

    zarr.json                attrs["dkd_cache"]: CacheMeta.to_dict(), written first with state "writing"
                             and rewritten with state "complete" last: the commit marker
    samples/key     uint8   (N, L)     UTF-8 key, NUL-padded
    samples/label   int32   (N,)       class, -1 on padding rows
    samples/shard   int32   (N,)       index into manifest.shards, -1 on padding rows
    samples/status  uint8   (N,)       0 padding, 1 ok, 2 skipped (reason in the shard's record)
    samples/height, samples/width  int32 (N,)   original image size (0 until dumped)
    views/box       uint16  (V, N, 4)  RandomResizedCrop box: top, left, height, width in source pixels
    views/flip      uint8   (V, N)     1 = horizontally flipped
    views/aug       uint8   (V, N, B)  the view's packed augmentation record (RandAugment ops, colour jitter, random
                                       erasing, mixup / cutmix partner, lam and box; layout: augment.py), B =
                                       augment.record_bytes(recipe) <= 32; fill 255 (no record's flags byte 0 is
                                       255). Only when the recipe augments or mixes
    logits/target   float32 (V, N)     exact teacher logit of the labelled class
    logits/target_b float32 (V, N)     exact teacher logit of the mix partner's class (the mixed view's second
                                       target; equal to logits/target on an unmixed row). Only when the recipe mixes
    logits/lse      float32 (V, N, T)  exact logsumexp(z / T) for each configured temperature
    logits/<codec>  ...     (V, N, …)  the codec's arrays (see logit_codecs.py)
    codec/<name>    ...                a learned codec's own arrays (lowrank: its basis), written once before the
                                       metadata; their SHA-256 is in the codec's metadata and checked by Cache.codec
    _dkd/done/SSSSSS.json              one record per finished tar shard (skipped samples, counts);
                                       written after the shard's chunks, as one create-only object
A crop + flip recipe's cache has neither views/aug nor logits/target_b: it is byte for byte what dkd-cache wrote
before augmentation existed, and such caches open and train unchanged.
The store is a local folder or an s3:// prefix (store.py); the commit protocol is the same on both: whole
chunks, then per-shard records, then the completeness marker, each one object.
Fill values are sentinels real data never holds (NaN, -1, 65535 for boxes, 255 for flips, and for the codecs'
unsigned code arrays 0, of which no codec writes a whole row: logit_codecs); padding rows hold 0.
Arrays of shape (V, N, …) are Zarr-sharded: one Zarr shard holds (V, C) rows, inner chunks are (1, C),
so training reads one view of C rows at a time. Codecs: zstd then crc32c, so a damaged chunk fails to decode.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from . import zarr_chunks
from .cache_meta import STATUS_OK, STATUS_PADDING, STATUS_SKIPPED, CacheMeta, CacheState, library_versions
from .errors import CacheError
from .logit_codecs import Codec
from .store import CREATING, DiskLocation, ObjectLocation, is_remote, location


@dataclasses.dataclass
class Cache:
    """An open cache: its metadata and arrays. Plain data plus small methods; no hidden state."""

    location: DiskLocation | ObjectLocation
    meta: CacheMeta
    group: zarr.Group

    @property
    def path(self) -> str:
        """The cache's folder or s3:// url, for messages."""
        return self.location.url

    _arrays: dict[str, zarr.Array] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    _layouts: dict[str, Any] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def chunk_layout(self, name: str) -> "zarr_chunks.Layout | None":
        """How the array's whole chunks are encoded without zarr's pipeline (None: write through zarr)."""
        if name not in self._layouts:
            self._layouts[name] = zarr_chunks.layout(self.array(name).metadata.to_dict())
        return self._layouts[name]

    def array(self, name: str) -> zarr.Array:
        """The opened array, kept: its metadata is read once, not on every block read (a request on S3)."""
        if name in self._arrays:
            return self._arrays[name]
        try:
            self._arrays[name] = arr = self.group[name]
            return arr
        except KeyError:
            raise CacheError(f"{self.path}: array {name!r} is missing; the cache is damaged, re-dump it") from None
        except Exception as e:  # unreadable array metadata
            raise CacheError(f"{self.path}: array {name!r} cannot be opened ({type(e).__name__}: {e}); its metadata "
                             f"({name}/zarr.json) is damaged, re-dump the cache") from e

    @property
    def codec(self) -> Codec:
        """The cache's codec, with its own arrays (`codec/*`: a learned basis) read back and checked against the
        SHA-256 its metadata records; a basis that does not match is refused (CacheMismatchError)."""
        codec = self.meta.codec
        state = {name: np.asarray(self.array(f"codec/{name}")[...]) for name in _group_members(self.group, "codec")}
        try:
            return codec.with_state(state)
        except CacheError as e:
            raise type(e)(f"{self.path}: {e}") from None

    @property
    def codec_arrays(self) -> list[str]:
        return sorted(k for k in _group_members(self.group, "logits") if k not in ("target", "lse", "target_b"))

    # -- completion records
    def done_key(self, shard: int) -> str:
        return f"_dkd/done/{shard:06d}.json"

    def shard_record(self, shard: int) -> dict | None:
        raw = self.location.read(self.done_key(shard))
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a torn record means the shard is not done; it will be redone

    def pending_shards(self) -> list[int]:
        """The shards without a readable done record: one listing finds the records, then each listed record is
        read (a torn one means its shard is not done); a shard without a record costs no read."""
        records = self.done_records()
        return [i for i in range(len(self.meta.manifest.shards)) if i not in records]

    def done_records(self) -> dict[int, dict]:
        """Every readable done record by shard: one listing, then each listed record read once (a torn one is
        left out: its shard is not done)."""
        listed = set(self.location.keys("_dkd/done"))
        records = {}
        for i in range(len(self.meta.manifest.shards)):
            if f"{i:06d}.json" in listed:
                rec = self.shard_record(i)
                if rec is not None:
                    records[i] = rec
        return records

    def check(self, *, deep: bool = False) -> list["Finding"]:
        """The cache's integrity as typed findings (see `Check`): state, done records, layout of the per-sample
        arrays, chunk files present for every done shard, library versions; with deep, every chunk is also read
        (checksums) and its status-OK rows checked for fill values. Cheap without deep: no logit is read."""
        return check_cache(self, deep=deep)

    # -- reads, a chunk-aligned block at a time
    def read_rows(self, name: str, start: int, stop: int, view: int | slice | None = None) -> np.ndarray:
        """Rows start..stop of an array; of one view (an int) or of consecutive views (a slice: one read of
        the Zarr shard for all of them) for the per-view arrays."""
        arr = self.array(name)
        check_chunks_present(self, name, start, stop, ndim=arr.ndim)
        try:
            return arr[start:stop] if view is None else arr[view, start:stop]
        except OSError as e:  # the store cannot be read (permissions, I/O error): not damage of the data
            raise CacheError(f"{self.path}: array {name!r} rows {start}..{stop - 1} cannot be read "
                             f"({type(e).__name__}: {e}); check the store's permissions and disk") from e
        except ValueError as e:  # a chunk fails its crc32c checksum or does not decompress: damaged data
            bad = self._unreadable_chunks(arr, start, stop, view) or [(start, stop - 1)]
            m = self.meta.manifest
            shards = sorted({s.name for s in m.shards for a, _ in bad if s.row_start <= a < s.row_stop})
            views = "" if view is None else f" view {view}" if isinstance(view, int) else \
                f" views {view.start}..{view.stop - 1}"
            raise CacheError(f"{self.path}: array {name!r} rows {', '.join(f'{a}..{b}' for a, b in bad[:5])}"
                             f"{views} (tar shard(s) {shards}) cannot be read "
                             f"({type(e).__name__}: {e}); the chunk is damaged: re-dump the affected shard (delete "
                             "its _dkd/done record and rerun dump-teacher)") from e

    def _unreadable_chunks(self, arr: zarr.Array, start: int, stop: int, view: int | None) -> list[tuple[int, int]]:
        """After a failed read: the rows (first, last) of each chunk in start..stop that fails on its own."""
        c, bad = self.meta.chunk_rows, []
        for a in range(start - start % c, stop, c):
            lo, hi = max(a, start), min(a + c, stop)
            try:
                arr[lo:hi] if view is None else arr[view, lo:hi]
            except ValueError:
                bad.append((lo, hi - 1))
        return bad


def unfilled_rows(name: str, values: np.ndarray) -> np.ndarray:
    """(rows,) mask of rows holding the array's fill sentinel or non-finite values (values: rows first)."""
    if name == "views/box":
        return (values == 65535).all(axis=-1)
    if name == "views/flip":
        return values == 255
    if name == "views/aug":  # a record's flags byte is never 255, the array's fill
        return values.reshape(values.shape[0], -1)[:, 0] == 255
    if values.dtype.kind == "f":
        return ~np.isfinite(values).reshape(values.shape[0], -1).all(axis=1)
    if values.dtype.kind == "i":
        return (values.reshape(values.shape[0], -1) == -1).any(axis=1)
    if values.dtype.kind == "u" and name.startswith("logits/"):  # codes: no codec writes an all-zero row
        return (values.reshape(values.shape[0], -1) == 0).all(axis=1)
    return np.zeros(values.shape[0], bool)


def check_filled(cache: "Cache", name: str, values: np.ndarray, ok: np.ndarray, row_start: int,
                 view: int | None = None) -> None:
    """Rows the dump wrote must not hold the array's fill sentinel (a lost inner chunk reads back as it)."""
    bad = unfilled_rows(name, values) & ok
    if bad.any():
        rows = (np.flatnonzero(bad)[:5] + row_start).tolist()
        raise CacheError(f"{cache.path}: array {name!r}{'' if view is None else f' view {view}'} holds no data for "
                         f"rows {rows} (missing chunk or non-finite teacher output); the cache is damaged: "
                         "re-dump the affected shard")


class Check(str, enum.Enum):
    """What Cache.check looks at; the value is the line a report prints."""

    STATE = "cache complete"
    RECORDS = "every shard has its done record"
    RECORDS_AGREE = "done records agree with the manifest"
    LAYOUT = "layout: per-sample arrays agree with the manifest"
    CHUNKS_PRESENT = "every chunk of a done shard is present"
    CHUNKS_READABLE = "every chunk reads back (checksums)"
    CHUNKS_FILLED = "values finite and filled on status-OK rows"
    VERSIONS = "library versions as at dump time"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Finding:
    check: Check
    ok: bool
    detail: str = ""
    warning: bool = False  # informs, never fails (library versions: their effect is what verify measures)

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check.value, "ok": self.ok, "detail": self.detail, "warning": self.warning}


PER_SAMPLE = ("status", "label", "shard", "height", "width")


def layout_problems(meta: "CacheMeta", per: dict[str, np.ndarray]) -> list[str]:
    """Per-sample arrays against the manifest: shard index, padding rows, labels and sizes of dumped rows."""
    m = meta.manifest
    status, shard, height, width, label = (per[k] for k in ("status", "shard", "height", "width", "label"))
    expect_shard = np.full(m.rows, -1, np.int64)
    for i, e in enumerate(m.shards):
        expect_shard[e.row_start:e.row_start + e.samples] = i
    bad = []
    if not np.array_equal(shard, expect_shard):
        bad.append(f"samples/shard differs from the manifest on {int((shard != expect_shard).sum())} rows")
    pad = expect_shard < 0
    if (status[pad] != STATUS_PADDING).any() or (status[~pad] == STATUS_PADDING).any():
        bad.append("samples/status marks padding rows wrongly")
    if not np.isin(status, (STATUS_PADDING, STATUS_OK, STATUS_SKIPPED)).all():
        bad.append("samples/status holds unknown values")
    ok = status == STATUS_OK
    out_of_range = (label[ok] < 0) | (label[ok] >= meta.num_classes)
    if out_of_range.any():
        bad.append(f"{int(out_of_range.sum())} OK rows have a label outside 0..{meta.num_classes - 1}")
    unsized = (height[ok] <= 0) | (width[ok] <= 0)
    if meta.state is CacheState.COMPLETE and unsized.any():
        bad.append(f"{int(unsized.sum())} OK rows have no image size (never dumped)")
    n_skipped = int((status == STATUS_SKIPPED).sum())
    if n_skipped != len(meta.skipped) and meta.state is CacheState.COMPLETE:
        bad.append(f"{n_skipped} rows are marked skipped, the metadata lists {len(meta.skipped)}")
    return bad


def check_cache(cache: "Cache", *, deep: bool = False) -> list[Finding]:
    m = cache.meta
    out = [Finding(check=Check.STATE, ok=m.state is CacheState.COMPLETE, detail=f"state {m.state.value!r}")]
    records = cache.done_records()  # each record read once, for both checks below
    pending = [i for i in range(len(m.manifest.shards)) if i not in records]
    out.append(Finding(check=Check.RECORDS, ok=not pending,
                       detail=f"{len(pending)}/{len(m.manifest.shards)} missing, first "
                              f"{[m.manifest.shards[i].name for i in pending[:3]]}; rerun dump-teacher" if pending
                       else ""))
    disagree = []
    for i, e in enumerate(m.manifest.shards):
        rec = records.get(i)
        if rec is not None and (rec.get("samples") != e.samples or rec.get("views") != m.views):
            disagree.append(f"{e.name}: record says {rec.get('samples')} samples / {rec.get('views')} views")
    out.append(Finding(check=Check.RECORDS_AGREE, ok=not disagree, detail="; ".join(disagree[:3])))
    try:
        per = {k: cache.read_rows(f"samples/{k}", 0, m.manifest.rows) for k in PER_SAMPLE}
        layout = layout_problems(m, per)
    except CacheError as e:
        per, layout = None, [str(e)]
    out.append(Finding(check=Check.LAYOUT, ok=not layout, detail="; ".join(layout)))
    done = sorted(records)
    names = [f"{g}/{k}" for g in ("views", "logits") for k in _group_members(cache.group, g)]
    missing = []
    for name in names:
        ndim = cache.array(name).ndim
        for i in done:
            e = m.manifest.shards[i]
            gone = [k for k in chunk_keys(cache, name, e.row_start, e.row_stop, ndim)
                    if not cache.location.chunk_exists(k)]
            if gone:
                missing.append(f"{name} rows {e.row_start}..{e.row_stop - 1} (tar shard {e.name})")
    out.append(Finding(check=Check.CHUNKS_PRESENT, ok=not missing,
                       detail=(f"{len(missing)} missing, first: {'; '.join(missing[:3])}; delete those shards' "
                               "_dkd/done records and rerun dump-teacher") if missing else ""))
    if deep and per is not None:
        damaged, unfilled = [], []
        ok_rows = per["status"] == STATUS_OK
        for name in names:
            for i in done:
                e = m.manifest.shards[i]
                for v in range(m.views):
                    try:
                        values = cache.read_rows(name, e.row_start, e.row_stop, view=v)
                    except CacheError as err:
                        damaged.append(str(err))
                        continue
                    bad = unfilled_rows(name, values) & ok_rows[e.row_start:e.row_stop]
                    if bad.any():
                        unfilled.append(f"{name} view {v}: {int(bad.sum())} rows of tar shard {e.name}")
        out.append(Finding(check=Check.CHUNKS_READABLE, ok=not damaged, detail="; ".join(damaged[:2])))
        out.append(Finding(check=Check.CHUNKS_FILLED, ok=not unfilled, detail="; ".join(unfilled[:3])))
    now = library_versions()
    differ = {k: (m.versions.get(k), now.get(k)) for k in sorted(set(m.versions) | set(now))
              if m.versions.get(k) != now.get(k)}
    out.append(Finding(check=Check.VERSIONS, ok=not differ, warning=True,
                       detail=", ".join(f"{k} {a} -> {b}" for k, (a, b) in differ.items())))
    return out


def require_sound(cache: "Cache") -> None:
    """The pre-flight of training: a cache whose check (without deep) finds an error is refused before any step."""
    failed = [f for f in cache.check() if not f.ok and not f.warning]
    if failed:
        if failed[0].check in (Check.STATE, Check.RECORDS):
            require_complete(cache)
        raise CacheError(f"{cache.path} fails its integrity check: " + "; ".join(
            f"{f.check.value}: {f.detail}" for f in failed) + ". Run dkd-cache inspect or verify on it")


def _group_members(group: zarr.Group, sub: str) -> list[str]:
    try:
        return [k for k, _ in group[sub].members()]
    except KeyError:
        return []


def chunk_keys(cache: Cache, name: str, start: int, stop: int, ndim: int | None = None) -> list[str]:
    """The store keys of the chunks (or Zarr shards) holding rows start..stop of an array (they may not exist yet).

    `ndim`: the array's rank when the caller already holds the array (each lookup re-reads its zarr.json)."""
    c = cache.meta.chunk_rows
    sharded = name.startswith(("views/", "logits/"))
    if ndim is None:
        ndim = len(cache.array(name).shape)
    tail = "/0" * (ndim - (2 if sharded else 1))
    return [f"{name}/" + ("c/0/%d%s" % (chunk, tail) if sharded else "c/%d%s" % (chunk, tail))
            for chunk in range(start // c, -(-stop // c))]


def check_chunks_present(cache: Cache, name: str, start: int, stop: int, ndim: int | None = None) -> None:
    """A missing chunk must never read back as its fill value: look for the chunk (or Zarr shard) files."""
    c = cache.meta.chunk_rows
    missing = [i + start // c for i, key in enumerate(chunk_keys(cache, name, start, stop, ndim))
               if not cache.location.chunk_exists(key)]
    if missing:
        rows = [(m * c, m * c + c - 1) for m in missing[:3]]
        raise CacheError(f"{cache.path}: array {name!r} is missing chunk(s) for rows {rows}; the cache is damaged or "
                         "incomplete: rerun dump-teacher to complete it")


def open_cache(path: str | Path, *, mode: str = "r") -> Cache:
    if not is_remote(path) and Path(path).is_file():
        name = Path(path).name
        hint = " It looks like a tar shard: shards go to --shards." if name.endswith((".tar", ".tar.gz", ".tgz")) else ""
        raise CacheError(f"{path} is a file, not a cache (a cache is the folder dump-teacher writes, e.g. "
                         f"teacher.zarr).{hint}")
    loc = location(path)
    path = loc.url
    if not loc.exists("zarr.json") or loc.exists(CREATING):
        if loc.exists(CREATING):
            raise CacheError(f"{path}: the cache's creation was cut short; rerun dump-teacher to create it again")
        if not loc.is_empty():
            raise CacheError(f"{path} exists but is not a dkd-cache store (no zarr.json); choose another path")
        raise CacheError(f"{path}: no cache there (no zarr.json); run dkd-cache dump-teacher first")
    try:
        group = zarr.open_group(loc.zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3)
        raw = group.attrs.get("dkd_cache")
    except Exception as e:
        raise CacheError(f"{path}: the cache's metadata (zarr.json) is damaged ({type(e).__name__}: {e}); "
                         "re-dump the cache") from e
    if not isinstance(raw, dict):
        raise CacheError(f"{path} is a Zarr store but not a dkd-cache (no 'dkd_cache' attribute)")
    for node in loc.glob("*/zarr.json") + loc.glob("*/*/zarr.json"):
        try:  # a torn or damaged array's metadata is named here, not met later as a bare JSON error
            json.loads(loc.read(node) or b"")
        except (ValueError, OSError) as e:
            name = node.rsplit("/", 1)[0]
            raise CacheError(f"{path}: the metadata of {name!r} ({name}/zarr.json) is damaged "
                             f"({type(e).__name__}: {e}); re-dump the cache") from e
    return Cache(location=loc, meta=CacheMeta.from_dict(raw, where=path), group=group)


def require_complete(cache: Cache) -> None:
    if cache.meta.state is not CacheState.COMPLETE:
        pending = cache.pending_shards()
        raise CacheError(f"{cache.path} is incomplete ({len(pending)} of {len(cache.meta.manifest.shards)} shards "
                         "not dumped); rerun the same dump-teacher command to finish it")


def decode_keys(raw: np.ndarray) -> list[str]:
    return [bytes(row).rstrip(b"\0").decode() for row in raw]


def disk_bytes(path: str | Path, prefix: str = "") -> int:
    return location(path).nbytes(prefix)
