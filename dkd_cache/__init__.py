"""dkd-cache: run the teacher once, distil many students from its cached logits (DKD, Zhao et al. 2022).

The public Python API is what this package exports (dkd_cache.api, re-exported here: see `__all__`): open_cache,
DistillLoader, DKDLoss, LiveTeacher, dkd_from_entries, ce_from_entries and the typed errors. Anything not exported is internal and
may change. Names are imported on first use, so `import dkd_cache` (and the CLI's start) does not load torch.
"""

__version__ = "0.1.0"
FORMAT_VERSION = 1

# The same list as dkd_cache.api.__all__ (tests/test_api.py checks that they agree).
__all__ = [
    "open_cache", "TeacherCache", "Provenance", "Recipe",
    "DistillLoader", "DistillBatch",
    "DKDLoss", "LiveTeacher", "Storage", "dkd_from_entries", "dkd_loss", "ce_from_entries", "mixed_cross_entropy",
    "DKDCacheError", "ConfigError", "ShardError", "ShardNotFoundError", "BadSampleError", "RemoteReadError",
    "CacheError", "CacheMetadataError", "CacheMismatchError", "CacheLockedError", "CheckpointError",
    "CheckpointNotFoundError", "CheckpointWriteError", "ResumeMismatchError", "NonFiniteLossError", "PeerError",
    "LoanError", "SharedMemoryError",
]


def __getattr__(name: str):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'dkd_cache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
