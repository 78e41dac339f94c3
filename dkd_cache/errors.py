"""Typed errors. Each subclasses the project base and the matching built-in, so callers may catch either."""


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

    def __init__(self, shard: str, key: str, reason: str):
        self.shard, self.key, self.reason = shard, key, reason
        super().__init__(
            f"{shard}: sample {key!r}: {reason}. Fix or remove the sample, or rerun with --skip-bad "
            "to skip it (every skipped sample is recorded in the cache)."
        )

    def __reduce__(self):  # pickles by its parts, so a DataLoader worker can hand it to the main process whole
        return (type(self), (self.shard, self.key, self.reason))


class CheckpointError(DKDCacheError, ValueError):
    """Weights cannot be loaded: unsafe pickle, wrong keys or shapes, truncated file."""


class CacheError(DKDCacheError, ValueError):
    """A cache store is damaged, incomplete or does not match what it is used with."""


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
