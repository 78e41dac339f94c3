"""Host threads of the main process during small per-batch work: one, not one per core.

dump-teacher's main process encodes each teacher batch (target logit, log-partition, the codec's encode: small
torch and numpy operations on a (batch, classes) array) and writes it. torch's OpenMP pool and numpy's BLAS pool
split such operations over every core, and on a many-core machine the split and the threads' spinning between
operations cost far more than the operations: on a 16-core GPU machine the writer took ~12 ms of process CPU per
view (benchmarks/dump_profile.py; 83 us on a 2-core CPU), against ~0.1-0.2 ms with one thread. The teacher's
forward on the CPU keeps every thread: only the work inside `one_thread()` runs on one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import lru_cache

import torch
from threadpoolctl import ThreadpoolController


@lru_cache(maxsize=1)
def _controller() -> ThreadpoolController:
    # One scan of the loaded libraries (BLAS, OpenMP) per process; numpy and torch are imported by then.
    return ThreadpoolController()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch's intra-op threads and the BLAS and OpenMP pools limited to one thread, restored on exit."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        with _controller().limit(limits=1):
            yield
    finally:
        torch.set_num_threads(n)
