"""How a DataLoader worker's rendered group reaches the main process: shared-memory slots reused all epoch.

A fresh shared-memory tensor per group (what torch's DataLoader does for every batch) pays for its pages every time:
on this project's VM ~120 us per 224 px image to create, zero and fault them in, a third of a view's crop and resize.
A TransferRing holds, per worker, a few group buffers that the main process allocates once, before the workers
start. A worker stacks a group into a free slot of its own and sends only the slot's number; the main process
copies the rows into its batch and hands the slot back.

Stream shapes:
    main:   free[w]  <- slot numbers                                   (a queue per worker, filled at the start)
    worker: acquire  -> write the images into buffer(lent)  -> send the RingSlot (worker, slot, rows)
    main:   ring.lend(lent) -> Loan: the holder reads loan.tensor -> loan.release() -> free[w]
A worker that finds no free slot within `wait` seconds stacks that group into a fresh buffer instead: a consumer that
holds slots (groups waiting for their turn in the canonical order) slows a worker down, never deadlocks it.
The queue's put and get are the synchronisation: a slot is written only after its holder has released it.

Ownership is explicit: the main process turns every slot it receives into a Loan, and the slot goes back to its
worker when, and only when, the holder calls `release()` (training after its step has read the batch, the dump once
a sample's views are copied into teacher batches). Nothing is recycled behind a holder's back: a consumer that keeps
every batch (`list(...)`) keeps every slot, and the workers fall back to fresh buffers. A second release, or reading
a released loan, raises LoanError. A ring made with `poison=True` (the tests make every ring so) overwrites a slot
with POISON as it goes back, so a holder that kept a view of the tensor past release reads a constant image, not
plausible stale pixels.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import multiprocessing
import os
import queue
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import torch

from .errors import LoanError, SharedMemoryError

T = TypeVar("T")
POISON = 0xA5  # what a poisoning ring writes over a released slot (no photo is one flat 165)


@dataclasses.dataclass(frozen=True)
class RingSlot:
    """A lent slot: which worker's ring, which slot, how many rows of it hold the images. What a worker sends."""

    worker: int
    slot: int
    rows: int


def shared_empty(shape: Sequence[int], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An uninitialised tensor in shared memory from the start (as torch's default_collate makes one in a worker):
    handing it to another process passes the mapping, never a copy, and no page is touched before its first use."""
    n = math.prod(shape)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(n, device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).view(tuple(shape))


class Loan:
    """Memory lent to one holder until it calls release(): a ring slot's rows, or memory of its own (`ring` None:
    nothing goes back, but the same rules hold, so a consumer never needs to know which it got)."""

    __slots__ = ("_tensor", "_ring", "_lent", "released")

    def __init__(self, tensor: torch.Tensor | None, ring: "TransferRing | None" = None, lent: RingSlot | None = None):
        self._tensor, self._ring, self._lent, self.released = tensor, ring, lent, False

    @property
    def tensor(self) -> torch.Tensor | None:
        if self.released:
            raise LoanError("this memory was released (its transfer slot may already hold another group); read "
                            "a batch before releasing it, or copy what you keep")
        return self._tensor

    @property
    def from_ring(self) -> bool:
        return self._ring is not None

    def release(self) -> None:
        if self.released:
            raise LoanError("released twice: a transfer slot goes back to its worker exactly once")
        self.released = True
        if self._ring is not None:
            self._ring.release(self._lent)
        self._tensor = None


# ------------------------------------------------------------------------------------- shared memory, checked
# Linux keeps shared memory (torch's shared tensors, multiprocessing's semaphores) as files of a tmpfs at /dev/shm.
# Its pages are taken when first touched, not when a tensor is made: a ring larger than the tmpfs is made without
# complaint and its first touch beyond the limit kills the process with SIGBUS. Docker's default is 64 MB.
SHM_DIR = "/dev/shm"
# Beside the ring: the DataLoader's queues (each semaphore a page of /dev/shm) and each batch's labels and entries.
# Measured (tests/test_shared_memory.py's set-up, 2 workers, 32 px): a dump whose slots take 168 KiB runs in a
# 400 KiB /dev/shm and fails at 200 KiB creating the DataLoader's queues.
SHM_RESERVE = 512 << 10
SHM_RESERVE_PER_WORKER = 64 << 10


def shm_free_bytes(path: str | None = None) -> int | None:
    """Bytes free for shared memory (os.statvfs of the tmpfs at SHM_DIR); None where there is no such folder."""
    try:
        st = os.statvfs(path or SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def ranks_on_host() -> int:
    """The ranks sharing this host's /dev/shm (torchrun's LOCAL_WORLD_SIZE; 1 for a plain process)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShmNeed:
    """The shared memory one rank's transfer ring takes: every worker's slots, plus one fresh group buffer per worker
    (what a worker stacks into when no slot is free) and SHM_RESERVE."""

    workers: int
    slots: int
    slot_shape: tuple[int, ...]  # (rows, 3, S, S) uint8

    @property
    def slot_bytes(self) -> int:
        return math.prod(self.slot_shape)

    @property
    def ring_bytes(self) -> int:
        return self.workers * self.slots * self.slot_bytes

    @property
    def rank_bytes(self) -> int:
        return self.ring_bytes + self.workers * (self.slot_bytes + SHM_RESERVE_PER_WORKER) + SHM_RESERVE

    def describe(self) -> str:
        rows, *pixels = self.slot_shape
        return (f"{self.workers} worker(s) x {self.slots} slots x {rows} images of {'x'.join(map(str, pixels))} "
                f"bytes = {fmt_bytes(self.ring_bytes)} of transfer slots, {fmt_bytes(self.rank_bytes)} per rank "
                "with the fallback buffers and queues")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


SHM_FIX = ("use fewer --workers or a smaller --batch-size, or give the container more shared memory (docker run "
           "--shm-size=8g; Kubernetes: an emptyDir volume with medium: Memory mounted at /dev/shm)")


def check_shared_memory(need: ShmNeed, free: Callable[[], int | None] = lambda: shm_free_bytes()) -> None:
    """Refuse, before any page is touched, a ring that /dev/shm cannot hold (with every rank on this host holding
    one): a SharedMemoryError naming the bytes needed, the bytes free and the fix, instead of a SIGBUS mid-epoch."""
    avail = free()
    if avail is None:  # no /dev/shm to ask (not Linux): the allocation's own error is translated (ring_memory)
        return
    ranks = ranks_on_host()
    needed = need.rank_bytes * ranks
    if needed > avail:
        raise SharedMemoryError(
            f"{SHM_DIR} has {fmt_bytes(avail)} free, the DataLoader workers need {fmt_bytes(needed)} of shared "
            f"memory ({need.describe()}{f', x {ranks} ranks on this host' if ranks > 1 else ''}); {SHM_FIX}")


def shared_memory_error(need: ShmNeed | None, e: BaseException) -> SharedMemoryError:
    """torch's raw 'unable to allocate shared memory' RuntimeError, or multiprocessing's SemLock OSError, as a
    SharedMemoryError that says what was being made and how to fix it."""
    what = need.describe() if need is not None else "the DataLoader workers' queues"
    return SharedMemoryError(f"shared memory ({SHM_DIR}) could not be allocated for {what}: "
                             f"{type(e).__name__}: {e}; {SHM_FIX}")


def start_workers(loader: Iterable[T], need: ShmNeed | None) -> Iterator[T]:
    """iter(loader): a DataLoader starts its workers and creates their queues here, whose semaphores live in
    /dev/shm too; a full /dev/shm is a SharedMemoryError naming the fix, not a SemLock traceback."""
    try:
        return iter(loader)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.ENOMEM):
            raise shared_memory_error(need, e) from e
        raise
    except RuntimeError as e:
        if "shared memory" in str(e) or "shm" in str(e):
            raise shared_memory_error(need, e) from e
        raise


class TransferRing:
    def __init__(self, workers: int, slots: int, shape: Sequence[int], wait: float = 0.2, poison: bool | None = None,
                 shm_free: Callable[[], int | None] = lambda: shm_free_bytes()):
        self.shape = tuple(int(x) for x in shape)  # one slot: (rows, 3, S, S) uint8
        self.wait = wait
        self.poison = POISON_RELEASED_SLOTS if poison is None else poison
        self.need = ShmNeed(workers=workers, slots=slots, slot_shape=self.shape)
        check_shared_memory(self.need, shm_free)  # before the first page is made, let alone touched
        try:
            self.buffers = [shared_empty((slots, *self.shape)) for _ in range(workers)]  # pages: touched on first use
            ctx = multiprocessing.get_context()
            self.free = [ctx.Queue() for _ in range(workers)]  # each holds a SemLock: a file in /dev/shm too
        except (RuntimeError, OSError) as e:
            raise shared_memory_error(self.need, e) from e
        for q in self.free:
            q.cancel_join_thread()  # a process exiting never waits on slot numbers nobody will read
            for s in range(slots):
                q.put(s)

    def acquire(self, worker: int, rows: int, shape: Sequence[int], dtype: torch.dtype = torch.uint8
                ) -> RingSlot | None:
        """In worker `worker`: a free slot for `rows` images of `shape` (the caller writes them into `buffer`); None
        when they do not fit a slot or no slot is free within `wait` seconds."""
        if not 0 < rows <= self.shape[0] or tuple(shape) != self.shape[1:] or dtype != torch.uint8:
            return None
        try:
            return RingSlot(worker, self.free[worker].get(timeout=self.wait), rows)
        except queue.Empty:
            return None

    def buffer(self, lent: RingSlot) -> torch.Tensor:
        """The lent rows of a slot (a view of the shared buffer, in the worker or the main process)."""
        return self.buffers[lent.worker][lent.slot, :lent.rows]

    def lend(self, lent: RingSlot) -> Loan:
        """In the main process: the slot a worker sent, as a Loan its holder releases when done with it."""
        return Loan(self.buffer(lent), self, lent)

    def release(self, lent: RingSlot) -> None:
        """In the main process, once the holder is done with the slot's rows (Loan.release calls this): the worker
        may fill it again."""
        if self.poison:
            self.buffers[lent.worker][lent.slot].fill_(POISON)
        self.free[lent.worker].put(lent.slot)


# Tests set this (tests/conftest.py) so that every ring poisons the slots it takes back; off in use (a memset per
# batch for nothing). A ring's own `poison=` argument wins.
POISON_RELEASED_SLOTS = False
