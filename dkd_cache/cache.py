"""The cache: a Zarr v3 store of teacher logits per (view, sample). Format version 1.

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
    logits/target   float32 (V, N)     exact teacher logit of the labelled class
    logits/lse      float32 (V, N, T)  exact logsumexp(z / T) for each configured temperature
    logits/<codec>  ...     (V, N, …)  the codec's arrays (see logit_codecs.py)
    codec/<name>    ...                a learned codec's own arrays (lowrank: its basis), written once before the
                                       metadata; their SHA-256 is in the codec's metadata and checked by Cache.codec
    _dkd/done/SSSSSS.json              one record per finished tar shard (skipped samples, counts);
                                       written after the shard's chunks, as one create-only object
The store is a local folder or an s3:// prefix (store.py); the commit protocol is the same on both: whole
chunks, then per-shard records, then the completeness marker, each one object.
Fill values are sentinels real data never holds (NaN, -1, 65535 for boxes, 255 for flips); padding rows hold 0.
Arrays of shape (V, N, …) are Zarr-sharded: one Zarr shard holds (V, C) rows, inner chunks are (1, C),
so training reads one view of C rows at a time. Codecs: zstd then crc32c, so a damaged chunk fails to decode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import platform
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from . import FORMAT_VERSION, __version__, zarr_chunks
from .data import ShardIndex, keys_digest
from .errors import CacheError, CacheMetadataError, CacheMismatchError, ConfigError
from .logit_codecs import Codec, codec_from_dict
from .store import CREATING, DiskLocation, ObjectLocation, is_remote, location
from .renderers import RendererInfo
from .teacher import TeacherInfo
from .teacher_signal import ComputePolicy
from .views import Recipe

STATUS_PADDING, STATUS_OK, STATUS_SKIPPED = 0, 1, 2
COMPRESSORS = (ZstdCodec(level=3), Crc32cCodec())


# --------------------------------------------------------------------------------------------- metadata
@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardEntry:
    name: str
    samples: int
    row_start: int
    row_stop: int  # padded to a multiple of chunk_rows
    keys_sha256: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Manifest:
    shards: tuple[ShardEntry, ...]
    rows: int
    samples: int
    keys_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"shards": [dataclasses.asdict(s) for s in self.shards], "rows": self.rows,
                "samples": self.samples, "keys_sha256": self.keys_sha256}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        known = {"shards", "rows", "samples", "keys_sha256"}
        if set(d) != known:
            raise ConfigError(f"manifest must have exactly {sorted(known)}, got {sorted(d)}")
        return cls(shards=tuple(ShardEntry(**s) for s in d["shards"]), rows=int(d["rows"]),
                   samples=int(d["samples"]), keys_sha256=d["keys_sha256"])

    def shard_index(self, name: str) -> int:
        for i, s in enumerate(self.shards):
            if s.name == name:
                return i
        raise CacheMismatchError(f"shard {name!r} is not in the cache's manifest; the cache was dumped from other shards")


def build_manifest(indexes: Sequence[ShardIndex], chunk_rows: int) -> Manifest:
    shards, row = [], 0
    for ix in indexes:
        n = len(ix.keys)
        stop = row + -(-n // chunk_rows) * chunk_rows
        shards.append(ShardEntry(name=ix.name, samples=n, row_start=row, row_stop=stop, keys_sha256=ix.keys_sha256))
        row = stop
    all_keys = [k for ix in indexes for k in ix.keys]
    return Manifest(shards=tuple(shards), rows=row, samples=len(all_keys), keys_sha256=keys_digest(all_keys))


def library_versions() -> dict[str, str]:
    import numcodecs
    import PIL
    import torch
    import torchvision
    from PIL import features

    return {"dkd_cache": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "pillow": PIL.__version__, "libjpeg": str(features.version("jpg")), "zarr": zarr.__version__,
            "numcodecs": numcodecs.__version__, "numpy": np.__version__, "python": platform.python_version()}


METADATA = "cache metadata"  # what a metadata error names when no cache path is known (a CacheMeta built in code)


class CacheState(str, enum.Enum):
    """A cache's commit state; the value is what zarr.json stores. A dump creates the cache WRITING and rewrites its
    metadata COMPLETE as its very last write, once every tar shard has its done record."""

    WRITING = "writing"
    COMPLETE = "complete"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True, kw_only=True)
class SkippedSample:
    """A sample dump-teacher left out (--skip-bad): its tar shard, its key and why. Listed in its shard's done record
    and, once the cache is complete, in the metadata's `skipped`; its row's status is STATUS_SKIPPED."""

    shard: str
    key: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"shard": self.shard, "key": self.key, "reason": self.reason}

    @classmethod
    def from_dict(cls, d: Any, *, where: str = METADATA) -> "SkippedSample":
        return parse_skipped([d], where=where)[0]


def _table(value: Any, field: str, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise CacheMetadataError(where, field, f"must be a table, got {value!r}")
    return value


def parse_state(value: Any, *, where: str = METADATA) -> CacheState:
    """'writing' or 'complete' (or a CacheState)."""
    if isinstance(value, str):
        for state in CacheState:
            if value == state.value:
                return state
    raise CacheMetadataError(where, "state", f"must be one of {[s.value for s in CacheState]}, got {value!r}")


def parse_teacher(value: Any, *, where: str = METADATA) -> TeacherInfo:
    """A TeacherInfo or its table: exactly arch, sha256, num_classes, source_format (an unknown key is refused:
    the teacher's identity is compared on reuse and on training, field by field)."""
    if isinstance(value, TeacherInfo):
        return value
    try:
        return TeacherInfo.from_dict(_table(value, "teacher", where))
    except ConfigError as e:
        raise CacheMetadataError(where, "teacher", str(e)) from None


def parse_codec_record(value: Any, *, where: str = METADATA) -> Codec:
    """A Codec or its table (Codec.to_dict): every field of the codec's kind and no other (an unknown key is
    refused: decoding depends on every field). A learned codec's fit record keeps whatever statistics it holds
    beside its sha256, grid and rank (informational; forward compatible)."""
    if isinstance(value, Codec):
        return value
    try:
        return codec_from_dict(_table(value, "codec", where))
    except ConfigError as e:
        raise CacheMetadataError(where, "codec", str(e)) from None


def parse_compute(value: Any, *, where: str = METADATA) -> ComputePolicy | None:
    """A ComputePolicy, its table (device, amp, tf32; an unknown key is refused: verify recomputes the logits under
    this policy and must not ignore part of it), or None / {} for a cache written before the policy was recorded."""
    if value is None or isinstance(value, ComputePolicy):
        return value
    if isinstance(value, Mapping) and not value:
        return None
    try:
        return ComputePolicy.from_dict(_table(value, "compute", where))
    except ConfigError as e:
        raise CacheMetadataError(where, "compute", str(e)) from None


def parse_skipped(value: Any, *, where: str = METADATA) -> tuple[SkippedSample, ...]:
    """A list of skipped samples, each a SkippedSample or a table of exactly shard, key, reason (strings; an
    unknown key is refused: each entry stands for one row marked skipped, and nothing else is recorded there)."""
    if not isinstance(value, (list, tuple)):
        raise CacheMetadataError(where, "skipped", f"must be a list of skipped samples, got {value!r}")
    out = []
    for i, entry in enumerate(value):
        if isinstance(entry, SkippedSample):
            out.append(entry)
            continue
        names = ("shard", "key", "reason")
        d = _table(entry, f"skipped[{i}]", where)
        if set(d) != set(names) or not all(isinstance(d[k], str) for k in names):
            raise CacheMetadataError(where, f"skipped[{i}]", f"must have exactly {list(names)}, all strings, "
                                                             f"got {dict(d)!r}")
        out.append(SkippedSample(shard=d["shard"], key=d["key"], reason=d["reason"]))
    return tuple(out)


def parse_int(field: str, value: Any, *, minimum: int | None = None, where: str = METADATA) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (minimum is not None and value < minimum):
        need = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise CacheMetadataError(where, field, f"must be {need}, got {value!r}")
    return int(value)


def parse_temperatures(value: Any, *, where: str = METADATA) -> tuple[float, ...]:
    """A non-empty list of positive finite numbers (the temperatures whose log-partition is stored)."""
    if not isinstance(value, (list, tuple)) or not value or not all(
            not isinstance(t, bool) and isinstance(t, (int, float)) and 0 < t < float("inf") for t in value):
        raise CacheMetadataError(where, "temperatures", f"must be a non-empty list of positive numbers, got {value!r}")
    return tuple(float(t) for t in value)


def parse_versions(value: Any, *, where: str = METADATA) -> dict[str, str]:
    """Library -> version string. Any library name is kept (informational: the list grows with the libraries a
    dump records; Cache.check compares them as a warning)."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise CacheMetadataError(where, "versions", f"must be a table of library -> version strings, got {value!r}")
    return dict(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheMeta:
    """A cache's metadata: zarr.json's `dkd_cache` attribute (format version 1). Every field is parsed on
    construction (parse_*), so a CacheMeta in hand is well-formed.

    Unknown keys, field by field: at the top level, in `teacher`, `codec`, `compute`, `manifest`, `recipe`,
    `renderer` and in each `skipped` entry an unknown key is refused (CacheMetadataError naming the cache and the key): it may change
    what the rows mean, and a dump rewrites zarr.json when it completes, which would silently drop it; a change of
    meaning bumps the format version. Kept as written: the libraries in `versions` and in the renderer's `versions`,
    and the statistics of a learned codec's fit record (informational). Fields added after format version 1 was first
    written are optional: `compute` (None: not recorded), `renderer` (the cpu renderer), and `state` / `skipped`."""

    format_version: int
    teacher: TeacherInfo
    recipe: Recipe
    seed: int
    views: int
    codec: Codec  # its spec and fit record; a learned codec's arrays live in codec/* (Cache.codec adds them)
    temperatures: tuple[float, ...]
    chunk_rows: int
    manifest: Manifest
    versions: dict[str, str]
    compute: ComputePolicy | None = None  # how the teacher ran; None: not recorded (caches written before it was)
    # how views became pixels (renderers.py); caches written before it was recorded used the cpu renderer
    renderer: RendererInfo = dataclasses.field(default_factory=lambda: RendererInfo.from_dict(None))
    state: CacheState = CacheState.WRITING
    skipped: tuple[SkippedSample, ...] = ()

    def __post_init__(self) -> None:
        parsed = {"teacher": parse_teacher(self.teacher), "codec": parse_codec_record(self.codec),
                  "compute": parse_compute(self.compute), "state": parse_state(self.state),
                  "skipped": parse_skipped(self.skipped), "seed": parse_int("seed", self.seed),
                  "views": parse_int("views", self.views, minimum=1),
                  "chunk_rows": parse_int("chunk_rows", self.chunk_rows, minimum=1),
                  "temperatures": parse_temperatures(self.temperatures), "versions": parse_versions(self.versions)}
        for name, kind in (("recipe", Recipe), ("manifest", Manifest), ("renderer", RendererInfo)):
            if not isinstance(getattr(self, name), kind):
                raise CacheMetadataError(METADATA, name, f"must be a {kind.__name__}, got {getattr(self, name)!r}")
        for name, value in parsed.items():
            object.__setattr__(self, name, value)

    @property
    def num_classes(self) -> int:
        return self.teacher.num_classes

    def to_dict(self) -> dict[str, Any]:
        """The stored form; the same JSON, key for key and in the same order, as caches written before the fields
        were typed (tests/test_cache_meta.py)."""
        return {"format_version": self.format_version, "teacher": self.teacher.to_dict(),
                "recipe": self.recipe.to_dict(), "seed": self.seed, "views": self.views,
                "codec": self.codec.to_dict(), "temperatures": list(self.temperatures), "chunk_rows": self.chunk_rows,
                "manifest": self.manifest.to_dict(), "versions": self.versions,
                "compute": {} if self.compute is None else self.compute.to_dict(),
                "renderer": self.renderer.to_dict(), "state": self.state.value,
                "skipped": [s.to_dict() for s in self.skipped]}

    @classmethod
    def from_dict(cls, d: Any, *, where: str = METADATA) -> "CacheMeta":
        """Parse the stored form; `where` (the cache's path or url) is named in every error (CacheMetadataError,
        or CacheMismatchError for another format version)."""
        if not isinstance(d, Mapping):
            raise CacheMetadataError(where, "dkd_cache", f"must be a table, got {type(d).__name__}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheMismatchError(f"{where}: cache format version {version} is not the supported "
                                     f"{FORMAT_VERSION}; re-dump the cache with this version of dkd-cache")
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in fields:
                raise CacheMetadataError(where, key, f"is not a field of format version {FORMAT_VERSION} "
                                                     f"(known: {fields}); written by a newer dkd-cache?")
        for key in ("teacher", "recipe", "seed", "views", "codec", "temperatures", "chunk_rows", "manifest",
                    "versions"):
            if key not in d:
                raise CacheMetadataError(where, key, "is missing")

        def nested(name: str, parse):  # a field whose own from_dict raises ConfigError or a built-in error
            try:
                return parse(d.get(name))
            except (KeyError, TypeError, ValueError) as e:  # ConfigError is a ValueError
                if isinstance(e, CacheMetadataError):
                    raise
                raise CacheMetadataError(where, name, f"{type(e).__name__}: {e}") from None

        renderer = d.get("renderer")
        if renderer is not None and not isinstance(renderer, Mapping):
            raise CacheMetadataError(where, "renderer", f"must be a table, got {renderer!r}")
        try:
            return cls(format_version=version, teacher=parse_teacher(d["teacher"], where=where),
                       recipe=nested("recipe", lambda v: Recipe.from_dict(_table(v, "recipe", where))),
                       seed=parse_int("seed", d["seed"], where=where),
                       views=parse_int("views", d["views"], minimum=1, where=where),
                       codec=parse_codec_record(d["codec"], where=where),
                       temperatures=parse_temperatures(d["temperatures"], where=where),
                       chunk_rows=parse_int("chunk_rows", d["chunk_rows"], minimum=1, where=where),
                       manifest=nested("manifest", Manifest.from_dict),
                       versions=parse_versions(d["versions"], where=where),
                       compute=parse_compute(d.get("compute"), where=where),
                       renderer=nested("renderer", lambda v: RendererInfo.from_dict(v)),
                       state=parse_state(d.get("state", CacheState.WRITING.value), where=where),
                       skipped=parse_skipped(d.get("skipped", []), where=where))
        except CacheMetadataError as e:
            if e.cache == where:
                raise
            raise CacheMetadataError(where, e.field, e.problem) from None

    def differences(self, other: "CacheMeta") -> list[str]:
        """What would make `other`'s settings mix into this cache: each difference as 'field: ours != theirs'."""
        out = []
        a, b = self.to_dict(), other.to_dict()
        for field in ("teacher", "recipe", "seed", "views", "codec", "temperatures", "chunk_rows"):
            if a[field] != b[field]:
                out.append(f"{field}: cache has {a[field]}, this run has {b[field]}")
        if self.renderer.name != other.renderer.name:
            out.append(f"renderer: cache rendered with {self.renderer.name!r}, this run with {other.renderer.name!r}")
        if a["compute"].get("amp") != b["compute"].get("amp"):
            out.append(f"amp: cache computed with {a['compute'].get('amp')}, this run with {b['compute'].get('amp')}")
        ma, mb = self.manifest, other.manifest
        if ma.keys_sha256 != mb.keys_sha256 or [s.name for s in ma.shards] != [s.name for s in mb.shards]:
            out.append(f"shards: cache has {len(ma.shards)} shards / {ma.samples} samples "
                       f"(keys {ma.keys_sha256[:12]}), this run has {len(mb.shards)} / {mb.samples} "
                       f"(keys {mb.keys_sha256[:12]})")
        return out


# --------------------------------------------------------------------------------------------- store
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
        return sorted(k for k in _group_members(self.group, "logits") if k not in ("target", "lse"))

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
        done = set(self.location.keys("_dkd/done"))  # one listing, not a read per shard
        return [i for i in range(len(self.meta.manifest.shards))
                if f"{i:06d}.json" not in done or self.shard_record(i) is None]

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
    if values.dtype.kind == "f":
        return ~np.isfinite(values).reshape(values.shape[0], -1).all(axis=1)
    if values.dtype.kind == "i":
        return (values.reshape(values.shape[0], -1) == -1).any(axis=1)
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


# --------------------------------------------------------------------------------------------- integrity
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
    pending = cache.pending_shards()
    out.append(Finding(check=Check.RECORDS, ok=not pending,
                       detail=f"{len(pending)}/{len(m.manifest.shards)} missing, first "
                              f"{[m.manifest.shards[i].name for i in pending[:3]]}; rerun dump-teacher" if pending
                       else ""))
    disagree = []
    for i, e in enumerate(m.manifest.shards):
        rec = cache.shard_record(i)
        if rec is not None and (rec.get("samples") != e.samples or rec.get("views") != m.views):
            disagree.append(f"{e.name}: record says {rec.get('samples')} samples / {rec.get('views')} views")
    out.append(Finding(check=Check.RECORDS_AGREE, ok=not disagree, detail="; ".join(disagree[:3])))
    try:
        per = {k: cache.read_rows(f"samples/{k}", 0, m.manifest.rows) for k in PER_SAMPLE}
        layout = layout_problems(m, per)
    except CacheError as e:
        per, layout = None, [str(e)]
    out.append(Finding(check=Check.LAYOUT, ok=not layout, detail="; ".join(layout)))
    done = [i for i in range(len(m.manifest.shards)) if i not in set(pending)]
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
    cache; the next dump clears it (remove_stale_partials).
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


def remove_stale_partials(path: str | Path) -> None:
    """Remove what a crash leaves (call while holding the writer lease): on disk, creation folders and the
    temporary `*.partial` files of writes cut short; on an object store, a creation cut short."""
    location(path).remove_stale()


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


def require_complete(cache: Cache) -> None:
    if cache.meta.state is not CacheState.COMPLETE:
        pending = cache.pending_shards()
        raise CacheError(f"{cache.path} is incomplete ({len(pending)} of {len(cache.meta.manifest.shards)} shards "
                         "not dumped); rerun the same dump-teacher command to finish it")


def decode_keys(raw: np.ndarray) -> list[str]:
    return [bytes(row).rstrip(b"\0").decode() for row in raw]


def disk_bytes(path: str | Path, prefix: str = "") -> int:
    return location(path).nbytes(prefix)


@contextlib.contextmanager
def writer_lock(path: str | Path, rank: int = 0) -> Iterator[None]:
    """One dump at a time per local cache (store.DiskLocation.writer_lease: an flock per rank)."""
    with location(path).writer_lease(rank):
        yield


def parse_chunk_rows(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"chunk_rows must be a positive integer, got {value!r}")
    return value
