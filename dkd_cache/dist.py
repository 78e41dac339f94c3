"""torchrun integration: read the rank from the environment torchrun sets; nothing home-made."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import math
import os
import pickle
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from .errors import ConfigError, DKDCacheError, NonFiniteLossError, PeerError

T = TypeVar("T")

# How long a rank waits for the others at a long phase (see wait_for): the --wait-seconds of dump-teacher and
# train-student, carried on the DistInfo; a collective keeps the process group's own, shorter timeout.
DEFAULT_WAIT_S = 4 * 3600.0


def parse_wait_seconds(value, name: str = "wait_seconds") -> float:
    """The seconds a rank waits for rank 0's long phases: a positive finite number, else a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name} must be a positive, finite number of seconds (how long ranks wait for rank 0's "
                          f"long phases, --wait-seconds; default {DEFAULT_WAIT_S:g}), got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    wait_s: float = DEFAULT_WAIT_S  # how long wait_for / on_rank0 wait for the other ranks (--wait-seconds)

    def __post_init__(self) -> None:
        object.__setattr__(self, "wait_s", parse_wait_seconds(self.wait_s, "wait_s"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str, timeout_s: float = 600.0, *, wait_s: float = DEFAULT_WAIT_S) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a plain process is rank 0 of 1.

    The timeout bounds every collective: when a peer dies the others fail within it instead of hanging. wait_s
    bounds the waits for rank 0's long phases (wait_for, on_rank0), and is carried on the DistInfo returned.
    """
    wait_s = parse_wait_seconds(wait_s, "wait_s")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(wait_s=wait_s)
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            # torchrun --max-restarts keeps one store for every attempt, and torch 2.14 no longer namespaces the
            # keys by attempt: a restarted rank could read the address a dead rank of the failed attempt
            # published and fail ("Gloo connectFullMesh failed ... Connection refused"). Keep attempts apart.
            store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
            dist.init_process_group(backend=backend, store=dist.PrefixStore(f"dkd-cache/attempt_{attempt}", store),
                                    rank=rank, world_size=world, timeout=timeout)
    info = DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                    wait_s=wait_s)
    if device.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
    return info


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def broadcast_object(info: DistInfo, obj):
    """Rank 0's object on every rank (used to share an error or a decision before any work starts)."""
    if info.world <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------- waits longer than a collective
# A collective (barrier, broadcast, all_gather) fails after the process group's timeout (600 s): right for a step,
# wrong for a long phase one rank runs while the others wait (rank 0 scanning shards on object storage, fitting a
# codec, writing a cache's per-sample arrays). Those waits go through the process group's store instead: each rank
# sets a key when it arrives, the waiting ranks wait for the keys for up to DistInfo.wait_s (--wait-seconds), and the
# collective that follows finds every rank there.
_waits = itertools.count()  # every rank passes the same waits in the same order: the n-th wait has one name


def wait_for(info: DistInfo, what: str, arriving: Sequence[int] | None = None) -> None:
    """A barrier through the store: this rank arrives (when it is one of `arriving`, default every rank) and waits
    until every arriving rank has, for up to info.wait_s. A timeout is a PeerError naming what was awaited, the
    timeout and --wait-seconds, which sets it."""
    if info.world <= 1:
        return
    ranks = list(range(info.world)) if arriving is None else list(arriving)
    timeout = info.wait_s
    name = f"dkd-cache/wait/{next(_waits)}"
    store = distributed_c10d._get_default_store()
    if info.rank in ranks:
        store.set(f"{name}/{info.rank}", b"1")
    try:
        store.wait([f"{name}/{r}" for r in ranks], datetime.timedelta(seconds=timeout))
    except (RuntimeError, OSError) as e:  # DistStoreError (a RuntimeError): timed out, or the store went away
        timed_out = "timeout" in str(e).lower() or "timed out" in str(e).lower()
        why = (f"did not arrive within {timeout:g} s (--wait-seconds {timeout:g}; pass a larger --wait-seconds, "
               "or wait_seconds in the config, to wait longer)") if timed_out \
            else f"is gone ({type(e).__name__}: {e})"
        raise PeerError(f"rank {info.rank} waited for {what}: rank(s) {ranks} {why}. See the other ranks' logs") \
            from e


def on_rank0(info: DistInfo, fn: Callable[[], T], what: str = "rank 0") -> T:
    """Run fn on rank 0 only and give every rank its result, or raise its error on every rank.

    The other ranks wait for rank 0 through the store (wait_for: as long as info.wait_s allows, not the collective
    timeout), so a long phase on rank 0 never times a collective out. They never wait out a rank 0 that failed: they
    receive the error (a DKDCacheError as it is; any other exception as a PeerError naming it) and raise it too."""
    if info.world <= 1:
        return fn()
    result: T | None = None
    failure: BaseException | None = None
    if info.is_main:
        try:
            result = fn()
        except Exception as e:  # handed to every rank, then raised here as it is
            failure = e
    wait_for(info, what, arriving=[0])
    if failure is not None:
        sent = failure if isinstance(failure, DKDCacheError) else PeerError(
            f"rank 0 failed: {type(failure).__name__}: {failure}")
        try:
            pickle.dumps(sent)
        except Exception:  # the error does not pickle: send its text
            sent = PeerError(f"rank 0 failed: {type(failure).__name__}: {failure}")
        broadcast_object(info, ("error", sent))
        raise failure
    kind, value = broadcast_object(info, ("ok", result))
    if kind == "error":
        raise value
    return value


def require_finite(info: DistInfo | None, loss: torch.Tensor, where: str = "") -> None:
    """Raise NonFiniteLossError on every rank when the loss is not finite on any rank (agreed by an all-reduce,
    so no rank steps its optimizer while another stops)."""
    bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
    if info is not None and info.world > 1:
        flags = bad.repeat(info.world) * 0
        flags[info.rank] = bad[0]
        dist.all_reduce(flags)
        ranks = [r for r, f in enumerate(flags.tolist()) if f]
    else:
        ranks = [0] if bool(bad[0]) else []
    if ranks:
        mine = float(loss.detach())
        raise NonFiniteLossError(
            f"the loss is not finite{' ' + where if where else ''} (on rank(s) {ranks}; here {mine}); no optimizer "
            "step was taken with it. Lower the learning rate, or check the cache with dkd-cache verify; --resume "
            "continues from the last checkpoint")


def all_gather_object(info: DistInfo, value: T) -> list[T]:
    """Every rank's value, in rank order, on every rank."""
    if info.world <= 1:
        return [value]
    out: list = [None] * info.world
    dist.all_gather_object(out, value)
    return out


def all_gather_int(info: DistInfo, value: int) -> list[int]:
    if info.world <= 1:
        return [int(value)]
    out = [None] * info.world
    dist.all_gather_object(out, int(value))
    return [int(v) for v in out]


# What gloo and NCCL report when the other end of a collective went away (a killed or crashed rank).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
             "remote process exited or there was a network error")


def is_peer_failure(e: BaseException) -> bool:
    """Whether an error is a collective failing because a peer went away (not our own code, not a usage error
    that merely names a backend): torch's distributed network errors, or a RuntimeError saying the peer is gone."""
    if not dist.is_available() or not dist.is_initialized():
        return False
    if isinstance(e, (dist.DistNetworkError, getattr(dist, "DistStoreError", dist.DistNetworkError))):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e) for w in PEER_GONE)


def shutdown(info: DistInfo) -> None:
    if info.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
