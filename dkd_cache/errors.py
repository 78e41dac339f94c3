"""Typed errors. Each subclasses the project base and the matching built-in, so callers may catch either."""

from pathlib import Path


class DKDCacheError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(DKDCacheError, ValueError):
    """A flag, recipe or config file value is invalid."""


class ShardError(DKDCacheError, ValueError):
    """A shard cannot be read or a sample in it is malformed (names shard and key)."""


class ShardNotFoundError(DKDCacheError, FileNotFoundError):
    """A shard pattern matched nothing or names a missing file."""


class BadSampleError(ShardError):
    """One sample is unusable: undecodable image, missing or bad label, duplicate key."""

    def __init__(self, shard: str, key: str, reason: str, advice: str | None = None):
        self.shard, self.key, self.reason, self.advice = shard, key, reason, advice
        super().__init__(f"{shard}: sample {key!r}: {reason}. " + (advice or (
            "Fix or remove the sample, or rerun with --skip-bad to skip it (every skipped sample is recorded in "
            "the cache).")))

    def __reduce__(self):  # pickles by its parts, so a DataLoader worker can hand it to the main process whole
        return (type(self), (self.shard, self.key, self.reason, self.advice))


class CheckpointError(DKDCacheError, ValueError):
    """Weights cannot be loaded: unsafe pickle, wrong keys or shapes, truncated file."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a read-only folder); whatever stood at its path before is
    untouched: the new file is written beside it and renamed over it only once whole."""

    def __init__(self, path, cause: BaseException, advice: str = ""):
        self.path, self.cause, self.advice = Path(path), cause, advice
        why = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        before = ("the previous checkpoint there is intact" if self.path.exists()
                  else "no earlier checkpoint was there")
        super().__init__(f"{self.path}: the checkpoint could not be written ({why}); {before}, the partial file "
                         f"was removed. Free disk space (or make the folder writable){advice}")

    def __reduce__(self):
        return (type(self), (self.path, self.cause, self.advice))


class ResumeMismatchError(ConfigError):
    """--resume was given other data (shards, cache or teacher) than the run's checkpoint was trained on."""


class CacheError(DKDCacheError, ValueError):
    """A cache store is damaged, incomplete or does not match what it is used with."""


class CacheMetadataError(CacheError):
    """A cache's stored metadata (the `dkd_cache` attribute of its zarr.json) is malformed: names the cache, the
    field and what is wrong with it."""

    def __init__(self, cache: str, field: str, problem: str):
        self.cache, self.field, self.problem = cache, field, problem
        super().__init__(f"{cache}: metadata field {field!r}: {problem}. The cache's zarr.json is damaged or was "
                         "written by another version of dkd-cache; re-dump the cache with this version")

    def __reduce__(self):
        return (type(self), (self.cache, self.field, self.problem))


class CacheMismatchError(CacheError):
    """An existing cache was made with other settings, shards or teacher."""


class CacheLockedError(CacheError):
    """Another process holds the writer lock of the cache."""


class CheckpointNotFoundError(DKDCacheError, FileNotFoundError):
    """A weights or checkpoint file does not exist."""


class NonFiniteLossError(DKDCacheError, FloatingPointError):
    """The training loss became NaN or infinite on some rank; no optimizer step was taken with it."""


class PeerError(DKDCacheError, RuntimeError):
    """Another rank failed (rank 0's error handed to every rank, or a collective whose peer went away)."""


class RemoteReadError(ShardError, ConnectionError):
    """Reading a shard from object storage kept failing after retries (names url, member and attempts)."""

    def __init__(self, url: str, *, offset: int, attempts: int, cause: str, member: str | None = None):
        self.url, self.offset, self.attempts, self.cause, self.member = url, offset, attempts, cause, member
        where = member or "its first member"
        super().__init__(f"{url}: reading {where} (byte {offset}) failed {attempts} times with backoff ({cause}); "
                         "the store is unreachable or failing: check AWS_ENDPOINT_URL, the credentials and the "
                         "network, then rerun (dump-teacher continues where it stopped)")

    def __reduce__(self):
        return (_remote_read_error, (self.url, self.offset, self.attempts, self.cause, self.member))


def _remote_read_error(url, offset, attempts, cause, member):
    return RemoteReadError(url, offset=offset, attempts=attempts, cause=cause, member=member)


class LoanError(DKDCacheError, RuntimeError):
    """Borrowed memory (a transfer slot lent as a batch) was used after its release, or released twice."""


class SharedMemoryError(DKDCacheError, OSError):
    """/dev/shm cannot hold the shared memory the DataLoader workers' transfer slots need (names the bytes needed,
    the bytes free and the fix: fewer --workers, a smaller batch, or Docker's --shm-size)."""
