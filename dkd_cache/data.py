"""Shard streaming: expand shard specs, read tar members strictly, validate samples, index shards.

Stream shapes, stage by stage:
    shard url  --iter_raw_samples-->  {"__key__", "__shard__", ext: bytes | None}
               --parse_sample------>  Sample(key, label, image bytes)
Members are read as raw bytes and never unpickled; only image, .cls and .json members are kept.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import hashlib
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import braceexpand
import numpy as np

from . import remote_shards
from .store import is_remote
from .errors import BadSampleError, ConfigError, RemoteReadError, ShardError, ShardNotFoundError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
KEPT_EXTS = (*IMAGE_EXTS, "cls", "json")
# Members that would be unpickled by careless readers: a sample holding one is refused, never loaded.
PICKLE_EXTS = ("pyd", "pth", "pt", "pickle", "pkl", "npy", "npz")
LIST_SUFFIXES = (".txt", ".lst", ".list")  # a file of shard specs, one a line
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")
MAX_LABEL = 2**31 - 1  # labels are held and stored as int32
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sample:
    key: str
    label: int
    image: bytes
    shard: str


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class ShardIndex:
    """What a pass over one shard's headers and labels finds: keys and labels in tar order, and bad samples.

    Keys and labels are one numpy array each, not a Python object per sample: at ImageNet's 1.28M samples every
    rank holds every shard's index during start-up (a str and an int per sample would be ~100 MB of objects).
    Given as sequences of str and ints, they are stored as arrays (keys_array); ix.key(pos) is one key as str."""

    url: str
    name: str
    keys: np.ndarray  # (n,) fixed-width bytes: the keys' UTF-8, NUL-padded (numpy strips the padding on access)
    labels: np.ndarray  # (n,) int32, -1 for a bad sample's
    bad: tuple[tuple[int, str], ...] = ()  # (position in keys, reason)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", keys_array(self.keys))
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int32).reshape(-1))
        if self.labels.shape != self.keys.shape:
            raise ValueError(f"{self.name}: {self.keys.size} keys but {self.labels.size} labels")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardIndex):
            return NotImplemented
        return (self.url, self.name, self.bad) == (other.url, other.name, other.bad) \
            and np.array_equal(self.keys, other.keys) and np.array_equal(self.labels, other.labels)

    __hash__ = None  # type: ignore[assignment]  (holds arrays: not hashable, as the dataclass was not)

    def key(self, pos: int) -> str:
        return bytes(self.keys[pos]).decode()

    @property
    def keys_sha256(self) -> str:
        return keys_digest(self.keys)


def keys_array(keys: Sequence[str] | np.ndarray) -> np.ndarray:
    """Keys (str, or bytes of UTF-8) -> one (n,) fixed-width bytes array, as wide as the longest key's UTF-8; an
    array of bytes is returned as it is. A key that is neither str nor bytes is a TypeError."""
    if isinstance(keys, np.ndarray) and keys.dtype.kind == "S":
        return keys.reshape(-1)
    encoded = []
    for k in keys:
        if isinstance(k, str):
            encoded.append(k.encode())
        elif isinstance(k, (bytes, np.bytes_)):
            encoded.append(bytes(k))
        else:
            raise TypeError(f"a key is str, not {type(k).__name__} ({k!r:.40})")
    return np.array(encoded, dtype=f"S{max((len(b) for b in encoded), default=0) or 1}")


def keys_digest(keys: Sequence[str] | np.ndarray) -> str:
    """SHA-256 of the keys' UTF-8, each followed by a newline (as recorded in a cache's manifest), in blocks: an
    array of a million keys is never turned into a million Python objects at once."""
    h = hashlib.sha256()
    if isinstance(keys, np.ndarray):
        for i in range(0, keys.size, 65536):
            block = keys[i:i + 65536].tolist()
            if block:
                h.update(b"\n".join(block) + b"\n")
        return h.hexdigest()
    for k in keys:
        h.update(k.encode())
        h.update(b"\n")
    return h.hexdigest()


def shard_name(url: str) -> str:
    """A shard's identity in the cache: its file name, so moving the shards to another folder is fine."""
    return url.rstrip("/").rsplit("/", 1)[-1].split(" ")[-1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardMatch:
    """Shard urls matched against the shard names a cache's manifest lists (by file name: shard_name)."""

    found: dict[int, str]  # manifest position -> url, in manifest order
    missing: tuple[str, ...]  # manifest shards no url names
    extra: tuple[str, ...]  # urls whose shard the manifest does not list (their names)

    def urls(self) -> list[str]:
        return list(self.found.values())


def match_shards(manifest_names: Sequence[str], urls: Sequence[str]) -> ShardMatch:
    """The one shard matching of dump, train and verify: which manifest shard each url is, which are absent, and
    which urls the manifest does not know. The caller decides what is an error (train refuses extra shards, verify
    reports both, dump needs every manifest shard)."""
    by_name = {shard_name(u): u for u in urls}
    known = set(manifest_names)
    return ShardMatch(found={i: by_name[n] for i, n in enumerate(manifest_names) if n in by_name},
                      missing=tuple(n for n in manifest_names if n not in by_name),
                      extra=tuple(n for n in by_name if n not in known))


def index_differs(ix: "ShardIndex", samples: int, keys_sha256: str) -> str | None:
    """How a shard as scanned now differs from what a cache recorded of it (sample count and key digest), or None."""
    if len(ix.keys) == samples and ix.keys_sha256 == keys_sha256:
        return None
    return (f"shard {ix.name} holds {len(ix.keys)} samples (keys {ix.keys_sha256[:12]}), the cache {samples} "
            f"(keys {keys_sha256[:12]}); the shard changed since the dump")


def expand_shards(spec: str | Sequence[str], *, allow_pipe: bool = False) -> list[str]:
    """Brace patterns, globs, a directory, a .txt/.lst/.list list of shards, or a sequence of any of those -> shard urls."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for s in specs:
        urls.extend(_expand_one(str(s), allow_pipe))
    if not urls:
        raise ShardNotFoundError(f"shard spec {spec!r} matched no shards; give a brace pattern, glob, folder or .txt list")
    names = [shard_name(u) for u in urls]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"shard names must be unique (they key the cache), repeated: {dupes[:5]}")
    return urls


def check_out_path(out: str, urls: Sequence[str], patterns: Sequence[str] = ()) -> None:
    """Refuse an output that is an input shard, holds input shards, or that an input pattern (glob or brace
    pattern) would match, so that a later run with the same --shards would read the cache as a shard. A cache
    beside its shards, or in a folder below them, is fine."""
    if is_remote(out):
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


def _expand_one(spec: str, allow_pipe: bool) -> list[str]:
    if spec.startswith("s3://"):
        return remote_shards.expand(spec, lambda line: _expand_one(line, allow_pipe))
    if spec.startswith(REMOTE_PREFIXES):
        if spec.startswith("pipe:") and not allow_pipe:
            raise ConfigError(f"{spec!r}: 'pipe:' shard urls run a shell command; pass --allow-pipe to permit them")
        return list(braceexpand.braceexpand(spec))
    path = Path(spec)
    if path.is_dir():
        found = sorted(str(p) for p in path.iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz")))
        if not found:
            raise ShardNotFoundError(f"folder {spec} holds no .tar shards")
        return found
    if path.suffix in LIST_SUFFIXES and path.is_file():
        out = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.extend(_expand_one(line if os.path.isabs(line) or line.startswith(REMOTE_PREFIXES)
                                       else str(path.parent / line), allow_pipe))
        return out
    if "{" in spec:
        urls = list(braceexpand.braceexpand(spec))
    elif any(c in spec for c in "*?["):
        urls = sorted(glob.glob(spec))
        if not urls:
            raise ShardNotFoundError(f"glob {spec!r} matched no files")
    else:
        urls = [spec]
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise ShardNotFoundError(f"{len(missing)} shard(s) not found, first: {missing[:3]}")
    return urls


def _open_tar(url: str) -> tarfile.TarFile:
    if url.startswith("s3://"):  # streamed, transient failures retried (remote_shards.RetryingReader)
        stream = remote_shards.open_shard(url)
        try:
            return tarfile.open(fileobj=stream, mode="r|*")
        except (tarfile.TarError, EOFError) as e:
            raise ShardError(f"{url}: not a readable tar file ({e}); re-create or re-upload the shard") from e
    if url.startswith(REMOTE_PREFIXES):
        from webdataset.gopen import gopen  # handles pipe: and http(s) streams

        return tarfile.open(fileobj=gopen(url, "rb"), mode="r|*")
    try:
        return tarfile.open(url, mode="r:*")  # seekable: skipping a member's data is a seek, not a read
    except FileNotFoundError as e:
        raise ShardNotFoundError(f"shard {url} not found") from e
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"{url}: not a readable tar file ({e}); re-create or re-download the shard") from e


def _member_key(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, extension) of a sample member; None for folders, hidden files and names without an extension."""
    if not member.isfile():
        return None
    name = member.name[2:] if member.name.startswith("./") else member.name
    m = _MEMBER.match(name)
    if m is None or Path(name).name.startswith("."):
        return None
    return m.group(1), m.group(2).lower()


def _not_adjacent(url: str, key: str) -> ShardError:
    return ShardError(
        f"{url}: the members of sample {key!r} are not adjacent in the tar (other samples' members lie between "
        "them), as when a folder is packed with plain `tar cf shard.tar -C dir .` in directory order. Shards must "
        "hold each sample's members one after another: repack with `tar --sort=name -cf shard.tar -C dir .` "
        "(or write shards with webdataset's TarWriter / ShardWriter)")


def _require_adjacent(tar: tarfile.TarFile, url: str) -> None:
    """On a seekable tar, read the member index first (headers only) so that a sample split over the tar is
    named as a layout problem before any of its pieces is taken for an incomplete sample."""
    exts: dict[str, set[str]] = {}
    prev = None
    for member in tar.getmembers():
        mk = _member_key(member)
        if mk is None:
            continue
        key, ext = mk
        if key != prev and key in exts and ext not in exts[key]:
            raise _not_adjacent(url, key)
        exts.setdefault(key, set()).add(ext)
        prev = key


def iter_raw_samples(url: str, *, want: Callable[[str], bool] = lambda ext: True) -> Iterator[dict]:
    """Group a shard's members by key. Yields {"__key__", "__shard__", ext: bytes or None (not wanted)}.

    A sample's members must be adjacent (webdataset's layout; `tar --sort=name`): a key whose members are split
    by other samples' members is a ShardError saying how to repack. A key that comes back whole (its first
    member's extension was seen for it already: a duplicate key), or an extension twice in one sample, is yielded
    with "__error__" set: parse_sample and scan_shard raise it as a BadSampleError, which --skip-bad skips.
    A truncated or corrupt tar is a ShardError naming the last good key.
    """
    tar = _open_tar(url)
    exts_of: dict[str, set[str]] = {}
    current: dict | None = None
    last_key = None
    member_name = None  # the member being read, for errors
    try:
        try:
            if not url.startswith(REMOTE_PREFIXES):
                _require_adjacent(tar, url)
            for member in tar:
                member_name = f"member {member.name!r}"
                mk = _member_key(member)
                if mk is None:
                    continue
                key, ext = mk
                if current is None or key != current["__key__"]:
                    if current is not None:
                        last_key = current["__key__"]
                        yield current
                    current = {"__key__": key, "__shard__": url}
                    if key in exts_of:
                        if ext not in exts_of[key]:
                            raise _not_adjacent(url, key)
                        current["__error__"] = "duplicate key: its members appear twice in the shard"
                    exts_of.setdefault(key, set())
                exts_of[key].add(ext)
                if ext in current:
                    current["__error__"] = f"member .{ext} appears twice"
                    continue
                if ext in PICKLE_EXTS:
                    current[ext] = None  # never read, never unpickled; parse_sample refuses the sample
                elif want(ext):
                    f = tar.extractfile(member)
                    current[ext] = f.read() if f is not None else b""
                else:
                    current[ext] = None
                member_name = f"the member after {member.name!r}"
        except RemoteReadError as e:
            raise RemoteReadError(e.url, offset=e.offset, attempts=e.attempts, cause=e.cause,
                                  member=member_name) from e
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            if isinstance(e, (ShardError, ShardNotFoundError)):
                raise
            where = f"after sample {last_key!r}" if last_key else "at its start"
            raise ShardError(f"{url}: tar is truncated or corrupt {where} ({type(e).__name__}: {e}); "
                             "re-create or re-download the shard") from e
        if current is not None:
            yield current
    finally:
        tar.close()


def parse_label(shard: str, key: str, raw: bytes | None, num_classes: int | None) -> int:
    if raw is None:
        raise BadSampleError(shard, key, "no .cls member (the integer class label)")
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        label = int(text)
    except ValueError:
        raise BadSampleError(shard, key, f".cls holds {text[:20]!r}, not an integer class") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise BadSampleError(shard, key, f"label {label} is outside the teacher's classes 0..{(num_classes or 1) - 1}")
    if label > MAX_LABEL:
        raise BadSampleError(shard, key, f"label {label} is larger than any class count (labels are int32)")
    return label


def parse_sample(raw: dict, num_classes: int | None = None) -> Sample:
    """Raw member dict -> Sample; BadSampleError names shard, key and the problem."""
    shard, key = shard_name(raw["__shard__"]), raw["__key__"]
    if "__error__" in raw:
        raise BadSampleError(shard, key, raw["__error__"])
    pickled = [e for e in raw if e in PICKLE_EXTS]
    if pickled:
        raise BadSampleError(shard, key, f"holds pickled member(s) {pickled}, which are never unpickled")
    images = [e for e in IMAGE_EXTS if e in raw]
    if not images:
        raise BadSampleError(shard, key, f"no image member (.{'/.'.join(IMAGE_EXTS)})")
    if len(images) > 1:
        raise BadSampleError(shard, key, f"several image members {images}")
    label = parse_label(shard, key, raw.get("cls"), num_classes)
    data = raw[images[0]]
    if not data:
        raise BadSampleError(shard, key, f".{images[0]} member is empty")
    return Sample(key=key, label=label, image=data, shard=shard)


def scan_shard(url: str, num_classes: int | None = None, skip_bad: bool = False) -> ShardIndex:
    """Read one shard's keys and labels (image bytes are skipped, not read)."""
    keys, labels, bad = [], [], []
    for raw in iter_raw_samples(url, want=lambda ext: ext == "cls"):
        key = raw["__key__"]
        try:
            if "__error__" in raw:
                raise BadSampleError(shard_name(url), key, raw["__error__"])
            pickled = [e for e in raw if e in PICKLE_EXTS]
            if pickled:
                raise BadSampleError(shard_name(url), key, f"holds pickled member(s) {pickled}, never unpickled")
            if not any(e in raw for e in IMAGE_EXTS):
                raise BadSampleError(shard_name(url), key, "no image member")
            label = parse_label(shard_name(url), key, raw.get("cls"), num_classes)
        except BadSampleError as e:
            if not skip_bad:
                raise
            bad.append((len(keys), e.reason))
            label = -1
        keys.append(key)
        labels.append(label)
    if not keys:
        raise ShardError(f"{url}: shard holds no samples; remove it from the shard list")
    return ShardIndex(url=url, name=shard_name(url), keys=keys_array(keys), labels=np.array(labels, np.int32),
                      bad=tuple(bad))


def scan_shards(urls: Sequence[str], num_classes: int | None = None, skip_bad: bool = False,
                threads: int = 8) -> list[ShardIndex]:
    """Index all shards (in parallel threads: it is I/O); order follows `urls`."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return list(pool.map(lambda u: scan_shard(u, num_classes, skip_bad), urls))


def keep_as_is(item):
    """DataLoader collate for items that are already whole (torch would turn our dataclasses into lists)."""
    return item
