"""torchrun integration: read the rank from the environment torchrun sets; nothing home-made."""

from __future__ import annotations

import dataclasses
import datetime
import os
import pickle
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from .errors import DKDCacheError, NonFiniteLossError, PeerError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a plain process is rank 0 of 1.

    The timeout bounds every collective: when a peer dies the others fail within it instead of hanging.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
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
    info = DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))
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


def on_rank0(info: DistInfo, fn: Callable[[], T]) -> T:
    """Run fn on rank 0 only and give every rank its result, or raise its error on every rank.

    The other ranks never wait out the collective timeout for a rank 0 that failed: they receive the error
    (a DKDCacheError as it is; any other exception as a PeerError naming it) and raise it too."""
    if info.world <= 1:
        return fn()
    result: T | None = None
    failure: BaseException | None = None
    if info.is_main:
        try:
            result = fn()
        except Exception as e:  # handed to every rank, then raised here as it is
            failure = e
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
