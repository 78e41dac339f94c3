"""A cache's metadata: the manifest of tar shards, the parsed `dkd_cache` attribute of zarr.json (CacheMeta),
its commit state, skipped samples, and the parse_* validators raising CacheMetadataError. No store access here:
cache.py reads a cache, cache_writer.py writes one."""

from __future__ import annotations

import dataclasses
import enum
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from . import FORMAT_VERSION, __version__
from .data import ShardIndex, keys_digest
from .errors import CacheMetadataError, CacheMismatchError, ConfigError
from .codec_fidelity import CodecFidelity, parse_fidelity
from .logit_codecs import Codec, codec_from_dict
from .renderers import RendererInfo
from .teacher import TeacherInfo, same_teacher
from .teacher_signal import ComputePolicy
from .views import Recipe


STATUS_PADDING, STATUS_OK, STATUS_SKIPPED = 0, 1, 2


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
    all_keys = np.concatenate([ix.keys for ix in indexes]) if indexes else np.array([], "S1")  # one array, no str each
    return Manifest(shards=tuple(shards), rows=row, samples=int(all_keys.size), keys_sha256=keys_digest(all_keys))


def library_versions() -> dict[str, str]:
    """The libraries a cache's rows depend on (informational; Cache.check warns when they changed). The JPEG
    decoder is torchvision's (views.decode decodes with torchvision.io), not Pillow's, whose libjpeg may differ."""
    import numcodecs
    import PIL
    import torch
    import torchvision

    return {"dkd_cache": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "pillow": PIL.__version__, "jpeg_decoder": _torchvision_jpeg(), "zarr": zarr.__version__,
            "numcodecs": numcodecs.__version__, "numpy": np.__version__, "python": platform.python_version()}


def _torchvision_jpeg() -> str:
    """The libjpeg torchvision.io.decode_jpeg was built with, e.g. 'libjpeg-turbo (jpeglib API 8.0)'."""
    import torch
    import torchvision.io  # noqa: F401  (loads torchvision's image operators)

    try:
        api = int(torch.ops.image._jpeg_version())
        turbo = bool(torch.ops.image._is_compiled_against_turbo())
    except (AttributeError, RuntimeError):  # a torchvision without these operators
        return "unknown"
    return f"{'libjpeg-turbo' if turbo else 'libjpeg'} (jpeglib API {api // 10}.{api % 10})"


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


def parse_codec_fidelity(value: Any, *, where: str = METADATA) -> CodecFidelity | None:
    """The held-out fidelity measured at dump time (codec_fidelity.CodecFidelity or its table), or None: not
    recorded (caches written before it was, or written without a calibration hook)."""
    try:
        return parse_fidelity(value)
    except ConfigError as e:
        raise CacheMetadataError(where, "fidelity", str(e)) from None


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
    written are optional: `compute` (None: not recorded), `renderer` (the cpu renderer), `state` / `skipped`, and
    `fidelity` (None: not measured; written only when measured, so older readers' JSON is unchanged)."""

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
    fidelity: CodecFidelity | None = None  # held-out fidelity of the codec (codec_fidelity); None: not recorded

    def __post_init__(self) -> None:
        parsed = {"teacher": parse_teacher(self.teacher), "codec": parse_codec_record(self.codec),
                  "compute": parse_compute(self.compute), "state": parse_state(self.state),
                  "skipped": parse_skipped(self.skipped), "seed": parse_int("seed", self.seed),
                  "views": parse_int("views", self.views, minimum=1),
                  "chunk_rows": parse_int("chunk_rows", self.chunk_rows, minimum=1),
                  "temperatures": parse_temperatures(self.temperatures), "versions": parse_versions(self.versions),
                  "fidelity": parse_codec_fidelity(self.fidelity)}
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
                "skipped": [s.to_dict() for s in self.skipped]} | (
                    {} if self.fidelity is None else {"fidelity": self.fidelity.to_dict()})

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
                       skipped=parse_skipped(d.get("skipped", []), where=where),
                       fidelity=parse_codec_fidelity(d.get("fidelity"), where=where))
        except CacheMetadataError as e:
            if e.cache == where:
                raise
            raise CacheMetadataError(where, e.field, e.problem) from None

    def differences(self, other: "CacheMeta") -> list[str]:
        """What would make `other`'s settings mix into this cache: each difference as 'field: ours != theirs'."""
        out = []
        a, b = self.to_dict(), other.to_dict()
        if not same_teacher(other.teacher, self.teacher):  # the same tensors in another file are the same teacher
            out.append(f"teacher: cache has {a['teacher']}, this run has {b['teacher']}")
        for field in ("recipe", "seed", "views", "codec", "temperatures", "chunk_rows"):
            if a[field] != b[field]:
                out.append(f"{field}: cache has {a[field]}, this run has {b[field]}")
        if self.renderer.name != other.renderer.name:
            out.append(f"renderer: cache rendered with {self.renderer.name!r}, this run with {other.renderer.name!r}")
        elif self.renderer.decoder != other.renderer.decoder:  # gpu renderer: nvImageCodec's pixels are not libjpeg's
            out.append(f"decoder: cache decoded with {self.renderer.decoder!r}, this run with "
                       f"{other.renderer.decoder!r}; finish the dump on the same kind of device")
        interp = self.recipe.interpolation
        mine, theirs = self.renderer.resize.get(interp), other.renderer.resize.get(interp)
        if mine is not None and theirs is not None and mine != theirs:  # another host's kernel: pixels differ by a level
            out.append(f"resize kernel: cache rendered {interp} views with {mine!r}, this host would use {theirs!r}; "
                       "finish the dump on a host of the same CPU capability")
        if a["compute"].get("amp") != b["compute"].get("amp"):
            out.append(f"amp: cache computed with {a['compute'].get('amp')}, this run with {b['compute'].get('amp')}")
        ma, mb = self.manifest, other.manifest
        if ma.keys_sha256 != mb.keys_sha256 or [s.name for s in ma.shards] != [s.name for s in mb.shards]:
            out.append(f"shards: cache has {len(ma.shards)} shards / {ma.samples} samples "
                       f"(keys {ma.keys_sha256[:12]}), this run has {len(mb.shards)} / {mb.samples} "
                       f"(keys {mb.keys_sha256[:12]})")
        return out
