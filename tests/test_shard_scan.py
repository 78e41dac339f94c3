"""One scan, shared: the same indexes as the serial scan, across ranks, recorded beside the cache so that an
unchanged shard is not read again and a changed one is; long rank-0 phases wait on the store, not a collective."""

from __future__ import annotations

import dataclasses
import datetime
import os
import pickle
import time
from pathlib import Path

import pytest
import torch.distributed as tdist
import torch.multiprocessing as tmp

from dkd_cache import data, shard_scan
from dkd_cache import dist as dist_mod
from dkd_cache.errors import BadSampleError, PeerError

from .helpers import sample_members, write_tar


def _urls(shards) -> list[str]:
    return data.expand_shards(str(Path(shards["train"][0]).parent))


@pytest.fixture
def bad_shards(tmp_path) -> list[str]:
    """Two shards: one clean, one with a sample without a label and one whose label is outside 3 classes."""
    a = write_tar(tmp_path / "s" / "a.tar", sample_members("a0", 0) + sample_members("a1", 2, seed=1))
    b = write_tar(tmp_path / "s" / "b.tar", sample_members("b0", 1) + sample_members("b1", None, seed=2)
                  + sample_members("b2", 7, seed=3) + sample_members("b3", 2, seed=4))
    return [str(a), str(b)]


def test_same_result_as_the_serial_scan(shards, bad_shards, tmp_path):
    for urls in (_urls(shards), bad_shards):
        for num_classes in (None, 3, 10):
            serial = data.scan_shards(urls, num_classes, skip_bad=True)
            shared = shard_scan.scan_shards(urls, num_classes, skip_bad=True, cache=str(tmp_path / "c.zarr"))
            assert shared == serial
            again = shard_scan.scan_shards(urls, num_classes, skip_bad=True, cache=str(tmp_path / "c.zarr"))
            assert again == serial  # from the records
    with pytest.raises(BadSampleError) as serial_error:
        data.scan_shards(bad_shards, 3)
    with pytest.raises(BadSampleError) as shared_error:
        shard_scan.scan_shards(bad_shards, 3, cache=str(tmp_path / "c.zarr"))
    assert str(shared_error.value) == str(serial_error.value) and "b1" in str(shared_error.value)


def test_an_unchanged_shard_is_not_read_again_and_a_changed_one_is(bad_shards, tmp_path, monkeypatch):
    cache = str(tmp_path / "c.zarr")
    read: list[str] = []
    real = shard_scan.scan_shard

    def counting(url, *a, **k):
        read.append(Path(url).name)
        return real(url, *a, **k)

    monkeypatch.setattr(shard_scan, "scan_shard", counting)
    first = shard_scan.scan_shards(bad_shards, skip_bad=True, cache=cache)
    assert sorted(read) == ["a.tar", "b.tar"]
    assert sorted(p.name for p in Path(shard_scan.records_at(cache)).iterdir()) == ["a.tar.json", "b.tar.json"]
    read.clear()
    assert shard_scan.scan_shards(bad_shards, skip_bad=True, cache=cache) == first and read == []
    # b.tar rewritten with other samples: its size and mtime change, so it is read again; a.tar is not
    write_tar(Path(bad_shards[1]), sample_members("c0", 1) + sample_members("c1", 2, seed=5))
    os.utime(bad_shards[1], ns=(time.time_ns() + 10**9,) * 2)
    third = shard_scan.scan_shards(bad_shards, skip_bad=True, cache=cache)
    assert read == ["b.tar"] and third[1].keys.tolist() == [b"c0", b"c1"] and third[0] == first[0]
    # a record that does not parse is a scan, not an error
    (Path(shard_scan.records_at(cache)) / "a.tar.json").write_text("{torn")
    read.clear()
    assert shard_scan.scan_shards(bad_shards, skip_bad=True, cache=cache) == third and read == ["a.tar"]


def test_without_a_cache_nothing_is_recorded(bad_shards, tmp_path):
    assert shard_scan.scan_shards(bad_shards, skip_bad=True) == data.scan_shards(bad_shards, skip_bad=True)
    assert not list(tmp_path.glob("*.scan"))


def test_the_wait_timeout_is_an_explicit_setting_carried_by_init(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("DKD_CACHE_WAIT_S", "5")  # the old variable is read no more
    assert dist_mod.init("cpu").wait_s == dist_mod.DEFAULT_WAIT_S == 14400
    assert dist_mod.init("cpu", wait_s=90).wait_s == 90.0
    assert not hasattr(dist_mod, "WAIT_ENV")
    for bad in ("soon", 0, -1.0, float("inf"), float("nan"), True, None):
        with pytest.raises(dist_mod.ConfigError, match="wait_s"):
            dist_mod.init("cpu", wait_s=bad)
        with pytest.raises(dist_mod.ConfigError, match="wait_s"):
            dist_mod.DistInfo(wait_s=bad)


# ------------------------------------------------------------------------------- two gloo processes
def _two_ranks(rank: int, init: str, urls: list[str], cache: str, out: str) -> None:
    # a process-group timeout of 3 s: any collective left waiting longer than that would fail the test
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                             timeout=datetime.timedelta(seconds=3))
    info = dist_mod.init("cpu", wait_s=60)  # joins the group above; the long waits get the setting given here
    assert (info.rank, info.world, info.wait_s) == (rank, 2, 60.0)
    read: list[str] = []
    real = shard_scan.scan_shard

    def counting(url, *a, **k):
        read.append(Path(url).name)
        return real(url, *a, **k)

    shard_scan.scan_shard = counting
    indexes = shard_scan.scan_shards(urls, skip_bad=True, dist=info, cache=cache)
    # rank 0 alone, for longer than the collective timeout: the other rank waits on the store, not a collective
    slow = dist_mod.on_rank0(info, lambda: time.sleep(5) or "done", what="a slow rank 0")
    info = dataclasses.replace(info, wait_s=1)
    late = "no error"
    try:  # rank 0 now takes 3 s, longer than the 1 s rank 1 may wait: rank 1 stops, naming the flag
        dist_mod.on_rank0(info, lambda: time.sleep(3), what="a slower rank 0")
    except PeerError as e:
        late = str(e)
    except RuntimeError:  # rank 0: its broadcast finds rank 1 gone (as a run that stops would)
        pass
    Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps((indexes, sorted(read), slow, late)))
    tdist.destroy_process_group()


def test_two_ranks_scan_their_shares_and_agree_with_the_serial_scan(shards, tmp_path):
    urls = _urls(shards)
    init = f"file://{tmp_path / 'pg'}"
    tmp.spawn(_two_ranks, args=(init, urls, str(tmp_path / "c.zarr"), str(tmp_path)), nprocs=2, join=True)
    results = [pickle.loads(Path(tmp_path, f"rank{r}.pkl").read_bytes()) for r in (0, 1)]
    serial = data.scan_shards(urls, skip_bad=True)
    names = [Path(u).name for u in urls]
    for rank, (indexes, read, slow, late) in enumerate(results):
        assert indexes == serial
        assert read == sorted(names[rank::2])  # each rank read its share only
        assert slow == "done"
    assert results[0][3] == "no error"
    assert "--wait-seconds 1;" in results[1][3] and "within 1 s" in results[1][3]
    assert sorted(p.name for p in Path(shard_scan.records_at(str(tmp_path / "c.zarr"))).iterdir()) == \
        sorted(f"{n}.json" for n in names)
