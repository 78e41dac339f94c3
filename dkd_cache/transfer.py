"""How a DataLoader worker's rendered group reaches the main process: shared-memory slots reused all epoch.

A fresh shared-memory tensor per group (what torch's DataLoader does for every batch) pays for its pages every time:
on this project's VM ~120 us per 224 px image to create, zero and fault them in, a third of a view's crop and resize.
A TransferRing holds, per worker, a few group buffers that the main process allocates once, before the workers
start. A worker stacks a group into a free slot of its own and sends only the slot's number; the main process
copies the rows into its batch and hands the slot back.

Stream shapes:
    main:   free[w]  <- slot numbers                                   (a queue per worker, filled at the start)
    worker: acquire  -> write the images into buffer(lent)  -> send the RingSlot (worker, slot, rows)
    main:   buffer(lent) -> the batch copies the rows -> release(lent) -> free[w]
A worker that finds no free slot within `wait` seconds stacks that group into a fresh buffer instead: a consumer that
holds slots (groups waiting for their turn in the canonical order) slows a worker down, never deadlocks it.
The queue's put and get are the synchronisation: a slot is written only after the main process has copied it out.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import queue
from collections.abc import Sequence

import torch


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


class TransferRing:
    def __init__(self, workers: int, slots: int, shape: Sequence[int], wait: float = 0.2):
        self.shape = tuple(int(x) for x in shape)  # one slot: (rows, 3, S, S) uint8
        self.wait = wait
        self.buffers = [shared_empty((slots, *self.shape)) for _ in range(workers)]  # pages: touched on first use
        ctx = multiprocessing.get_context()
        self.free = [ctx.Queue() for _ in range(workers)]
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

    def release(self, lent: RingSlot) -> None:
        """In the main process, once the slot's rows are copied out: the worker may fill it again."""
        self.free[lent.worker].put(lent.slot)
