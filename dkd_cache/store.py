"""Where a cache lives: a local folder or an object-store prefix (s3://bucket/path). One concern: the few
operations the cache's commit protocol needs, done right on each kind of store.

    location(url)               -> DiskLocation | ObjectLocation
    loc.zarr_store(read_only)   what zarr.open_group takes (a path, or zarr's own FsspecStore)
    loc.read(key)               bytes or None when absent
    loc.put(key, data)          one whole object, atomic (disk: temp file, fsync, rename; object store: one PUT)
    loc.create(key, data)       create-only: False when the key exists (disk: link(2); object store:
                                PUT with If-None-Match: *)
    loc.exists / keys / delete / nbytes / is_empty
    loc.chunk_exists(key)       exists, answered from one listing per folder on object stores
    loc.staged_creation()       build a new cache so that a crash leaves nothing that looks like one
    loc.remove_stale()          clear what a killed writer left (call while holding the writer lease)
    loc.writer_lease(...)       one dump at a time (disk: flock; object store: a lease object with expiry)

Object stores are reached through fsspec/s3fs; credentials and endpoint come only from the standard AWS
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE, ...), never from flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .errors import CacheLockedError, ConfigError

OBJECT_SCHEMES = ("s3://",)
CREATING = "_dkd/creating.json"  # object stores: present while a cache is being created, deleted when whole
LEASE = "_dkd/lease.json"  # object stores: the writer lease


def is_remote(url: str | os.PathLike) -> bool:
    return str(url).startswith(OBJECT_SCHEMES)


_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION",
            "AWS_REGION", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")
_FILESYSTEMS: dict[tuple, Any] = {}


def object_fs(asynchronous: bool = False):
    """An s3fs filesystem configured from the standard AWS environment only (one per process, environment and
    mode: making one costs about a second). Listings are never cached: the commit protocol reads what other
    processes wrote a moment ago. The asynchronous one is what zarr's FsspecStore runs on its own event loop."""
    try:
        import s3fs
    except ImportError as e:  # pragma: no cover - s3fs is a declared dependency
        raise ConfigError("s3:// paths need s3fs: pip install s3fs") from e
    key = (os.getpid(), asynchronous, tuple(os.environ.get(k) for k in _AWS_ENV))
    if key not in _FILESYSTEMS:
        _FILESYSTEMS[key] = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True,
                                              asynchronous=asynchronous)
    return _FILESYSTEMS[key]


def location(url: str | os.PathLike) -> "DiskLocation | ObjectLocation":
    if is_remote(url):
        return ObjectLocation(str(url).rstrip("/"))
    if str(url).startswith(("gs://", "http://", "https://", "pipe:")):
        raise ConfigError(f"{url}: a cache can live in a local folder or under s3://, not there")
    return DiskLocation(Path(url))


# --------------------------------------------------------------------------------------------- local disk
@dataclasses.dataclass(frozen=True)
class DiskLocation:
    path: Path
    is_remote = False

    @property
    def url(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def zarr_store(self, read_only: bool = False) -> str:
        return str(self.path)

    def read(self, key: str) -> bytes | None:
        try:
            return (self.path / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _staged(self, key: str, data: bytes) -> tuple[Path, Path]:
        """Write `data` durably to a private file beside `key`'s target; return (target, staged file)."""
        target = self.path / key
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return target, tmp

    def put(self, key: str, data: bytes) -> None:
        target, tmp = self._staged(key, data)
        os.replace(tmp, target)

    def create(self, key: str, data: bytes) -> bool:
        target, tmp = self._staged(key, data)
        try:
            os.link(tmp, target)  # atomic and create-only: fails when the target exists
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def write_files(self, files: dict[str, bytes]) -> None:
        """Write each file whole: a temporary file renamed over the target, as zarr's LocalStore does. Not
        fsynced here: `sync` makes them durable before anything vouches for them (a done record)."""
        for key, data in files.items():
            target = os.path.join(self.path, key)
            tmp = f"{target}.{os.getpid()}.partial"
            try:
                f = open(tmp, "wb")
            except FileNotFoundError:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                f = open(tmp, "wb")
            with f:
                f.write(data)
            os.replace(tmp, target)

    def exists(self, key: str) -> bool:
        return (self.path / key).exists()

    def chunk_exists(self, key: str) -> bool:
        return (self.path / key).exists()

    def sync(self, keys: Sequence[str]) -> None:
        """fsync these files and their folders: on disk before anything vouches for them (a done record).
        All at once from a few threads: ext4 commits concurrent fsyncs together (one after another, a tar
        shard's ~30 files and folders took ~80 ms here; together ~10 ms)."""
        paths = [self.path / key for key in keys]
        paths += sorted({p.parent for p in paths})
        if len(paths) <= 1:
            for p in paths:
                _fsync(p)
            return
        list(_fsync_pool().map(_fsync, paths))  # re-raises the first error

    def keys(self, prefix: str) -> list[str]:
        """Names of the files directly under `prefix` (a folder)."""
        d = self.path / prefix
        return sorted(p.name for p in d.iterdir() if p.is_file()) if d.is_dir() else []

    def glob(self, pattern: str) -> list[str]:
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.glob(pattern))

    def delete(self, key: str) -> None:
        (self.path / key).unlink(missing_ok=True)

    def nbytes(self, prefix: str = "") -> int:
        root = self.path / prefix
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

    def is_empty(self) -> bool:
        return not self.path.exists() or not any(self.path.iterdir())

    @contextlib.contextmanager
    def staged_creation(self) -> Iterator["DiskLocation"]:
        """Build in a hidden sibling folder, renamed into place when whole: a crash leaves only
        `.NAME.partial-*`, which remove_stale deletes."""
        staging = self.path.parent / f".{self.path.name}.partial-{uuid.uuid4().hex[:12]}"
        yield DiskLocation(staging)
        os.rename(staging, self.path)

    def remove_stale(self) -> None:
        """Creation folders and the temporary `*.partial` files of writes cut short inside the cache."""
        for stale in self.path.parent.glob(f".{self.path.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if (self.path / "zarr.json").is_file():
            for stale in self.path.rglob("*.partial"):
                if stale.is_file():
                    stale.unlink(missing_ok=True)

    @contextlib.contextmanager
    def writer_lease(self, rank: int = 0, *, seconds: float = 0.0, owner: str | None = None) -> Iterator["Lease"]:
        """One dump at a time per cache: an flock per rank, released by the kernel when the process dies, so a
        killed dump never leaves a stale lock. `seconds`/`owner` only matter on object stores."""
        # The lock file is removed (while still held) when the dump ends or fails, and its folder with it once
        # empty. A process that opened the file before it was removed finds it gone after locking and is refused,
        # so two processes never both hold a lock.
        lock_dir = self.path.parent / f".{self.path.name}.locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        lock_file = lock_dir / f"rank{rank}.lock"
        fd = os.open(lock_file, os.O_CREAT | os.O_RDWR, 0o644)
        locked = False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(fd).st_ino != os.stat(lock_file).st_ino:
                    raise FileNotFoundError  # removed by the holder that just finished: not ours to remove
                locked = True
            except (BlockingIOError, FileNotFoundError):
                raise CacheLockedError(f"{self.path} is being written by another dump-teacher process (lock held); "
                                       "wait for it to finish, or use another --out") from None
            yield Lease(owner="flock")
        finally:
            if locked:
                lock_file.unlink(missing_ok=True)
            os.close(fd)
            with contextlib.suppress(OSError):  # other ranks' locks may still be in it
                lock_dir.rmdir()


@functools.cache
def _fsync_pool() -> ThreadPoolExecutor:
    """Threads that only wait on fsync, kept for the process (a dump syncs every tar shard)."""
    return ThreadPoolExecutor(16, thread_name_prefix="dkd-fsync")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- object store
class ObjectLocation:
    """A prefix in an S3 bucket (or an S3-compatible store). Every write is one whole object."""

    is_remote = True

    def __init__(self, url: str):
        self.url = url
        self.root = url[len("s3://"):]
        self._fs = None
        self._listed: dict[str, set[str]] = {}

    def __str__(self) -> str:
        return self.url

    def __reduce__(self):  # DataLoader workers rebuild their own filesystem
        return (ObjectLocation, (self.url,))

    @property
    def fs(self):
        if self._fs is None:
            self._fs = object_fs()
        return self._fs

    def _p(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def zarr_store(self, read_only: bool = False):
        from zarr.storage import FsspecStore

        return FsspecStore(fs=object_fs(asynchronous=True), path=self.root, read_only=read_only)

    def read(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._p(key))
        except FileNotFoundError:
            return None

    def read_with_etag(self, key: str) -> tuple[bytes, str] | None:
        """The object and the ETag of the version read (HEAD then GET: a newer body than the ETag is possible,
        never an older one, which is what a conditional overwrite on that ETag needs)."""
        try:
            etag = self.fs.info(self._p(key))["ETag"]
            return self.fs.cat_file(self._p(key)), etag
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes, **conditions: Any) -> str:
        """One PUT (atomic: readers see the old object or the new one); returns the new ETag. `conditions`
        (IfMatch=etag) make it conditional: FileExistsError when the object changed."""
        out = self.fs.pipe_file(self._p(key), data, **conditions)
        self._listed.clear()
        return (out or {}).get("ETag", "")

    def write_files(self, files: dict[str, bytes]) -> None:
        """One PUT per object, sent concurrently."""
        if files:
            self.fs.pipe({self._p(k): v for k, v in files.items()})
            self._listed.clear()

    def create(self, key: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self._p(key), data, mode="create")  # PUT with If-None-Match: *
            self._listed.clear()
            return True
        except FileExistsError:
            return False

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._p(key))

    def sync(self, keys: Sequence[str]) -> None:
        """Nothing to do: an object store acknowledges a PUT once the object is durable."""

    def chunk_exists(self, key: str) -> bool:
        """For chunk lookups in a cache being read: one recursive listing per array (`NAME/c/...`), made once per
        location (a request per chunk would cost more than the read). Chunks are never deleted from a cache, so a
        listed chunk is there; one the listing lacks may have been written since (by another process, which no
        write through this location clears the listing for): it is looked up itself before being called missing,
        and the array is listed afresh next time."""
        array, sep, rest = key.partition("/c/")
        if not sep:
            return self.exists(key)
        if array not in self._listed:
            base = self._p(f"{array}/c")
            try:
                self._listed[array] = {p[len(base) + 1:] for p in self.fs.find(base)}
            except FileNotFoundError:
                self._listed[array] = set()
        if rest in self._listed[array]:
            return True
        if self.exists(key):  # written after the listing: the listing is stale
            self._listed.pop(array, None)
            return True
        return False

    def keys(self, prefix: str) -> list[str]:
        try:
            entries = self.fs.ls(self._p(prefix), detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rsplit("/", 1)[-1] for e in entries if e["type"] == "file")

    def glob(self, pattern: str) -> list[str]:
        n = len(self.root) + 1
        return sorted(p[n:] for p in self.fs.glob(self._p(pattern)))

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self._p(key))
        except FileNotFoundError:
            pass
        self._listed.clear()

    def nbytes(self, prefix: str = "") -> int:
        try:
            return int(self.fs.du(self._p(prefix), total=True))
        except FileNotFoundError:
            return 0

    def is_empty(self) -> bool:
        try:
            return not self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return True

    @contextlib.contextmanager
    def staged_creation(self) -> Iterator["ObjectLocation"]:
        """No rename on object stores: a marker object says 'being created' until the cache is whole; a cache
        found with the marker is wiped and created again by the next dump (under the lease)."""
        self.put(CREATING, json.dumps({"started": time.time()}).encode())
        yield self
        self.delete(CREATING)

    def remove_stale(self) -> None:
        if self.exists(CREATING):  # a creation cut short: nothing in it is trusted
            for p in self.fs.find(self.root):
                if not p.endswith("/" + LEASE):
                    self.fs.rm_file(p)
            self._listed.clear()

    @contextlib.contextmanager
    def writer_lease(self, rank: int = 0, *, seconds: float = 120.0, owner: str | None = None) -> Iterator["Lease"]:
        """Rank 0 takes the lease (`owner` None); other ranks pass rank 0's owner id and only check it."""
        if owner is not None:
            yield ObjectLease(self, owner=owner, seconds=seconds, etag="")
            return
        lease = acquire_lease(self, seconds)
        lease.start_renewing()
        try:
            yield lease
        finally:
            lease.release()


# --------------------------------------------------------------------------------------------- whole files
def put_file(url: str, key: str, local: str | os.PathLike) -> None:
    """Copy a finished local file to `url/key` in one put (a checkpoint: written and checked locally first)."""
    location(url).put(key, Path(local).read_bytes())


def fetch_file(url: str, key: str, local: str | os.PathLike) -> bool:
    """Copy `url/key` to a local file atomically (temp file, rename); False when the store has no such object."""
    data = location(url).read(key)
    if data is None:
        return False
    DiskLocation(Path(local).parent).put(Path(local).name, data)
    return True


# --------------------------------------------------------------------------------------------- leases
class Lease:
    """The disk lease: the flock itself; nothing to check while the process lives."""

    def __init__(self, owner: str):
        self.owner = owner

    def check(self) -> None:
        return None


class ObjectLease(Lease):
    """`_dkd/lease.json`: {owner, host, pid, expires}. Created with If-None-Match, renewed and taken over with
    If-Match on the ETag last seen, so two writers can never both believe they hold it."""

    def __init__(self, loc: ObjectLocation, *, owner: str, seconds: float, etag: str):
        super().__init__(owner)
        self.loc, self.seconds, self.etag = loc, seconds, etag
        self.lost: str | None = None
        self._stop, self._thread, self._expires_at = threading.Event(), None, time.time() + seconds

    def body(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires": time.time() + self.seconds}).encode()

    def check(self) -> None:
        """Before a commit (a done record, the completeness marker): the lease must still be ours."""
        if self.lost is None:
            raw = self.loc.read(LEASE)
            if raw is None or _lease_owner(raw) != self.owner:
                self.lost = "the lease object was taken over or removed"
        if self.lost is not None:
            raise CacheLockedError(f"{self.loc.url}: this dump lost its writer lease ({self.lost}); another dump "
                                   "took the cache over. Nothing more is committed by this process; rerun "
                                   "dump-teacher once the other dump ends")

    def renew(self) -> None:
        try:
            self.etag = self.loc.put(LEASE, self.body(), IfMatch=self.etag)
        except (FileExistsError, FileNotFoundError):  # 412: another owner's lease; 404: the lease was removed
            self.lost = "its renewal found another owner's lease, or none"
        except Exception as e:  # a transient failure: try again at the next tick, before expiry
            if time.time() > self._expires_at:
                self.lost = f"could not be renewed before expiry ({type(e).__name__}: {e})"
            return
        self._expires_at = time.time() + self.seconds

    def start_renewing(self) -> None:
        self._expires_at = time.time() + self.seconds

        def loop() -> None:
            while not self._stop.wait(self.seconds / 3):
                if self.lost is None:
                    self.renew()

        self._thread = threading.Thread(target=loop, name="dkd-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is None:
            raw = self.loc.read(LEASE)
            if raw is not None and _lease_owner(raw) == self.owner:
                self.loc.delete(LEASE)


def _lease_owner(raw: bytes) -> str | None:
    try:
        return json.loads(raw)["owner"]
    except (ValueError, KeyError, TypeError):
        return None


def acquire_lease(loc: ObjectLocation, seconds: float) -> ObjectLease:
    """Create the lease, or take over one whose holder let it expire (a killed dump); refuse a live one."""
    lease = ObjectLease(loc, owner=uuid.uuid4().hex, seconds=seconds, etag="")
    body = lease.body()
    if loc.create(LEASE, body):
        found = loc.read_with_etag(LEASE)
        if found is None or _lease_owner(found[0]) != lease.owner:
            # the store ignored If-None-Match and another writer's PUT landed after ours
            raise CacheLockedError(f"{loc.url}: another dump-teacher took the writer lease at the same moment; "
                                   "wait for it to finish, or use another --out")
        lease.etag = found[1]
        return lease
    found = loc.read_with_etag(LEASE)
    if found is None:  # released between our create and our read: try once more
        return acquire_lease(loc, seconds)
    raw, etag = found
    try:
        held = json.loads(raw)
        expires = float(held["expires"])
    except (ValueError, KeyError, TypeError):
        held, expires = {}, 0.0  # a damaged lease protects nothing: take it over
    now = time.time()
    if expires > now:
        raise CacheLockedError(f"{loc.url} is being written by another dump-teacher (lease held by "
                               f"{held.get('host')} pid {held.get('pid')}, expires in {expires - now:.0f} s unless "
                               "renewed); wait for it to finish, or use another --out")
    try:  # a stale lease: take it over only if nobody changed it since we read it
        lease.etag = loc.put(LEASE, body, IfMatch=etag)
    except FileExistsError:
        raise CacheLockedError(f"{loc.url}: another dump-teacher took over the expired writer lease first; wait for "
                               "it to finish, or use another --out") from None
    return lease


def supports_conditional_writes(loc: ObjectLocation) -> bool:
    """Whether the store refuses a second create-only PUT of one key (AWS S3 since 2024, MinIO, moto do)."""
    probe = f"_dkd/probe-{uuid.uuid4().hex}"
    try:
        loc.create(probe, b"1")
        return not loc.create(probe, b"2")
    finally:
        loc.delete(probe)
