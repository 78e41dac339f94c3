"""Worker -> main transfer: reused shared-memory slots give the same batches, go back to their worker, never block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dkd_cache import cache as cache_mod
from dkd_cache.data import expand_shards
from dkd_cache.loader import StreamSpec, batches, canonical_items, canonical_runs, make_loader, plan_epoch
from dkd_cache.transfer import TransferRing

from .conftest import CLASSES


def _spec(shards, cache_path, block=8):
    cache = cache_mod.open_cache(cache_path)
    urls = expand_shards(str(Path(shards["train"][0]).parent))
    spec = StreamSpec(urls=tuple(urls), recipe=cache.meta.recipe, seed=0, epoch=0, view=0, rank=0,
                      cache_path=str(cache_path), entry_arrays=("views/box", "views/flip"), num_classes=CLASSES,
                      shuffle_buffer=16, block=block)
    return spec, [s.samples for s in cache.meta.manifest.shards]


def _run(spec, sizes, workers):
    """(labels, boxes, pixels) of every batch, each copied and then released, and whether each batch was lent."""
    plan = plan_epoch(sizes, seed=0, epoch=0, world=1, rank=0, workers=2)
    loader = make_loader(spec, plan, [0, 0], workers)
    out, lent = [], []
    for batch in batches(canonical_runs(loader, plan, [0, 0], spec.block), spec.block):
        lent.append(batch.lent)
        out.append((batch.labels.clone(), batch.entries["views/box"].clone(), batch.images.clone()))
        batch.release()
    return out, loader.dataset.ring, lent


def _free_slots(ring) -> list[int]:
    """How many slots each worker's queue holds now (taking them: the ring is done with)."""
    ring.wait = 0.5
    free = []
    for w in range(len(ring.buffers)):
        n = 0
        while ring.acquire(w, 1, ring.shape[1:]) is not None:
            n += 1
        free.append(n)
    return free


def test_batches_through_ring_slots_equal_the_in_process_batches_and_every_slot_comes_back(shards, cache_path,
                                                                                            monkeypatch):
    import dkd_cache.loader as loader_mod

    monkeypatch.setattr(loader_mod, "IMAGES_IN_FLIGHT", 8)  # 2 groups in flight, 4 slots per worker: reuse shows
    spec, sizes = _spec(shards, cache_path, block=4)
    alone, ring0, _ = _run(spec, sizes, 0)
    assert ring0 is None  # no workers: nothing crosses a process boundary
    two, ring, lent = _run(spec, sizes, 2)
    assert ring is not None and len(two) == len(alone)
    for (la, ba, ia), (lb, bb, ib) in zip(alone, two):
        assert torch.equal(la, lb) and torch.equal(ba, bb) and torch.equal(ia, ib)
    slots = sum(t.shape[0] for t in ring.buffers)
    assert sum(lent) >= len(two) // 2 and sum(lent) > slots  # most batches are lent slots, and slots are reused
    assert _free_slots(ring) == [t.shape[0] for t in ring.buffers]  # every slot went back, once


def test_kept_batches_stay_intact_and_a_released_batch_cannot_be_read(shards, cache_path, monkeypatch):
    import dkd_cache.loader as loader_mod
    from dkd_cache.errors import LoanError
    from dkd_cache.transfer import POISON

    monkeypatch.setattr(loader_mod, "IMAGES_IN_FLIGHT", 8)
    spec, sizes = _spec(shards, cache_path, block=4)
    alone, _, _ = _run(spec, sizes, 0)
    plan = plan_epoch(sizes, seed=0, epoch=0, world=1, rank=0, workers=2)
    loader = make_loader(spec, plan, [0, 0], 2)
    kept = list(batches(canonical_runs(loader, plan, [0, 0], spec.block), spec.block))  # none released
    assert len(kept) == len(alone) and any(b.lent for b in kept)
    for b, (labels, _, images) in zip(kept, alone):  # nothing was recycled behind the holder's back
        assert torch.equal(b.labels, labels) and torch.equal(b.images, images)
    batch = next(b for b in kept if b.lent)
    view = batch.images
    batch.release()
    assert bool((view == POISON).all())  # a view kept past release reads the poison the tests' rings write
    with pytest.raises(LoanError):
        batch.images
    with pytest.raises(LoanError):
        batch.release()
    for b in kept:
        with b:  # `with` releases what is still held (the released one is not released twice)
            pass
    ring = loader.dataset.ring
    assert _free_slots(ring) == [t.shape[0] for t in ring.buffers]


def test_items_from_ring_slots_are_copies_and_the_slots_go_back(shards, cache_path):
    spec, sizes = _spec(shards, cache_path)
    plan = plan_epoch(sizes, seed=0, epoch=0, world=1, rank=0, workers=2)
    loader = make_loader(spec, plan, [0, 0], 2)
    items = list(canonical_items(loader, plan, [0, 0], spec.block))
    assert len(items) == sum(sizes)
    slots = {t.untyped_storage().data_ptr() for t in loader.dataset.ring.buffers}
    assert all(it.image.untyped_storage().data_ptr() not in slots for it in items)
    ref = list(canonical_items(make_loader(spec, plan, [0, 0], 0), plan, [0, 0], spec.block))
    assert all(torch.equal(a.image, b.image) and a.seq == b.seq for a, b in zip(items, ref))
    ring = loader.dataset.ring
    assert _free_slots(ring) == [t.shape[0] for t in ring.buffers]


def test_a_worker_without_a_free_slot_falls_back_instead_of_waiting_forever():
    ring = TransferRing(1, 2, (4, 3, 2, 2), wait=0.01)
    got = [ring.acquire(0, 4, (3, 2, 2)) for _ in range(3)]
    assert sorted(g.slot for g in got[:2]) == [0, 1] and got[2] is None  # both lent: the caller uses a fresh buffer
    ring.release(got[1])
    assert ring.acquire(0, 1, (3, 5, 5)) is None  # does not fit a slot
    assert ring.acquire(0, 5, (3, 2, 2)) is None  # more rows than a slot holds
    again = ring.acquire(0, 3, (3, 2, 2))
    assert again.slot == got[1].slot  # still free: the refusals took nothing
    assert ring.buffer(again).shape == (3, 3, 2, 2)


def test_a_loan_goes_back_once_and_cannot_be_read_after_release():
    from dkd_cache.errors import LoanError
    from dkd_cache.transfer import POISON, Loan

    ring = TransferRing(1, 1, (2, 3, 2, 2), wait=0.01)
    loan = ring.lend(ring.acquire(0, 2, (3, 2, 2)))
    kept = loan.tensor  # a view a careless consumer keeps past release
    kept.fill_(7)
    assert ring.acquire(0, 2, (3, 2, 2)) is None  # lent: the worker's only slot is not free
    loan.release()
    assert bool((kept == POISON).all())  # the tests' rings poison what comes back: stale pixels never look real
    with pytest.raises(LoanError, match="released"):
        loan.tensor
    with pytest.raises(LoanError, match="twice"):
        loan.release()
    assert ring.acquire(0, 2, (3, 2, 2)) is not None  # back exactly once
    own = Loan(torch.zeros(1))  # memory of its own: the same rules, nothing goes back
    own.release()
    with pytest.raises(LoanError):
        own.tensor
