"""What a training run learns from, by content rather than by the spelling of its paths.

Every checkpoint records a DataFingerprint: the shards in the order the run reads them (name, sample count, key
digest), the cache's identity (its manifest's key digest, seed, views, recipe, codec, skipped samples) and the
teacher's identity. `--resume` compares it with the data it is given now and refuses a difference, naming it; the
same data given by another path, glob or list resumes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from .data import ShardIndex
from .errors import CheckpointError


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardPrint:
    name: str  # the file name (the cache keys shards by it too)
    samples: int
    keys_sha256: str

    def describe(self) -> str:
        return f"{self.samples} samples (keys {self.keys_sha256[:12]})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataFingerprint:
    shards: tuple[ShardPrint, ...]  # in the run's order: each epoch's sample order follows it
    cache: dict[str, Any] | None = None  # the cache's identity; None: trained from the shards alone
    teacher: dict[str, Any] | None = None  # the teacher the KD signal comes from (the cache's or the live one)

    def to_dict(self) -> dict[str, Any]:
        return {"shards": [dataclasses.asdict(s) for s in self.shards], "cache": self.cache, "teacher": self.teacher}

    @classmethod
    def from_dict(cls, d: Any, *, where: str) -> "DataFingerprint":
        try:
            return cls(shards=tuple(ShardPrint(name=str(s["name"]), samples=int(s["samples"]),
                                               keys_sha256=str(s["keys_sha256"])) for s in d["shards"]),
                       cache=None if d.get("cache") is None else dict(d["cache"]),
                       teacher=None if d.get("teacher") is None else dict(d["teacher"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{where}: the checkpoint's data fingerprint is malformed ({type(e).__name__}: "
                                  f"{e}); the checkpoint is damaged: delete it to restart the run") from None

    def differences(self, now: "DataFingerprint") -> list[str]:
        """What differs between the data this fingerprint was taken of (the run's) and `now`, one line each."""
        out = _shard_differences(self.shards, now.shards)
        out += _table_differences("cache", self.cache, now.cache)
        out += _table_differences("teacher", self.teacher, now.teacher)
        return out


def of_shards(indexes: Sequence[ShardIndex]) -> tuple[ShardPrint, ...]:
    """Shards as scanned (bad samples included: they are part of what the shard holds)."""
    return tuple(ShardPrint(name=ix.name, samples=len(ix.keys), keys_sha256=ix.keys_sha256) for ix in indexes)


def cache_identity(meta) -> dict[str, Any]:
    """What decides a cache's rows: its manifest, the views drawn (seed, views, recipe), the codec and what it
    skipped. Not its path: a copy elsewhere is the same cache."""
    return {"keys_sha256": meta.manifest.keys_sha256, "samples": meta.manifest.samples, "seed": meta.seed,
            "views": meta.views, "recipe": meta.recipe.to_dict(), "codec": meta.codec.to_dict(),
            "temperatures": list(meta.temperatures), "skipped": len(meta.skipped)}


def teacher_identity(info) -> dict[str, Any]:
    """A teacher by the digest of its weights (of its tensors where recorded, so that the same tensors saved in
    another file format are the same teacher) and its classes, not by the path of its file."""
    return {"arch": info.arch, "num_classes": info.num_classes,
            "weights_sha256": getattr(info, "tensors_sha256", None) or info.sha256}


def _shard_differences(was: Sequence[ShardPrint], now: Sequence[ShardPrint]) -> list[str]:
    before, after = {s.name: s for s in was}, {s.name: s for s in now}
    out = []
    added = [n for n in after if n not in before]
    removed = [n for n in before if n not in after]
    if added:
        out.append(f"shards added: {added[:5]}{' ...' if len(added) > 5 else ''} (the run had {len(was)} shards, "
                   f"now {len(now)})")
    if removed:
        out.append(f"shards missing: {removed[:5]}{' ...' if len(removed) > 5 else ''} (the run had {len(was)} "
                   f"shards, now {len(now)})")
    for name in (n for n in before if n in after and before[n] != after[n]):
        out.append(f"shard {name} changed: it held {before[name].describe()}, now {after[name].describe()}")
    if not out and [s.name for s in was] != [s.name for s in now]:
        out.append("the same shards in another order (the order decides each epoch's sample order): give them in "
                   f"the run's order, which begins {[s.name for s in was][:3]}")
    return out


def _table_differences(what: str, was: Mapping[str, Any] | None, now: Mapping[str, Any] | None) -> list[str]:
    if was == now:
        return []
    if was is None or now is None:
        return [f"{what}: the run had {'none' if was is None else 'one'}, now {'none' if now is None else 'one'}"]
    return [f"{what} {key}: {_short(was.get(key))} -> {_short(now.get(key))}"
            for key in dict.fromkeys([*was, *now]) if was.get(key) != now.get(key)]


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] if isinstance(value, str) and len(text) == 64 else text  # a SHA-256 by its first 12 digits
