"""Shard layouts: members packed by plain `tar` in directory order, duplicate keys, shard lists."""

from __future__ import annotations

import pytest

from dkd_cache import cache as cache_mod
from dkd_cache.data import expand_shards, iter_raw_samples, scan_shard
from dkd_cache.dump import dump_teacher
from dkd_cache.errors import BadSampleError, ShardError

from .conftest import dump_settings
from .helpers import jpeg, sample_members, write_tar


def test_members_out_of_key_order_are_named_with_the_repack_command(tmp_path, teacher_ckpt):
    """`tar cf x.tar -C dir .` stores members in directory order: a sample's members are not adjacent."""
    members = [("./0009_coins.cls", b"1"), ("./0003_cat.jpg", jpeg(1)), ("./0003_cat.cls", b"2"),
               ("./0009_coins.jpg", jpeg(2))]
    path = write_tar(tmp_path / "shards" / "x.tar", members)
    for skip_bad in (False, True):
        with pytest.raises(ShardError) as e:
            scan_shard(str(path), skip_bad=skip_bad)
        msg = str(e.value)
        assert not isinstance(e.value, BadSampleError)  # a layout problem, not one bad sample
        assert "x.tar" in msg and "0009_coins" in msg and "not adjacent" in msg and "--sort=name" in msg
        assert "no image member" not in msg and "--skip-bad" not in msg
    with pytest.raises(ShardError, match="not adjacent"):
        dump_teacher(dump_settings({"train": [str(path)]}, teacher_ckpt, tmp_path / "c.zarr", skip_bad=True),
                     progress=False)


def test_duplicate_keys_are_skippable_bad_samples(tmp_path, teacher_ckpt):
    members = sample_members("a", 1) + sample_members("b", 2, seed=2) + sample_members("a", 3, seed=3) \
        + sample_members("c", 4, seed=4)
    path = write_tar(tmp_path / "shards" / "x.tar", members)
    with pytest.raises(BadSampleError, match="duplicate key"):
        scan_shard(str(path))
    ix = scan_shard(str(path), skip_bad=True)
    assert [ix.key(p) for p in range(len(ix.keys))] == ["a", "b", "a", "c"] and [p for p, _ in ix.bad] == [2]
    report = dump_teacher(dump_settings({"train": [str(path)]}, teacher_ckpt, tmp_path / "c.zarr", skip_bad=True),
                          progress=False)
    assert report.complete and report.skipped == 1
    meta = cache_mod.open_cache(tmp_path / "c.zarr").meta
    assert [(s.key, "duplicate key" in s.reason) for s in meta.skipped] == [("a", True)]


def test_a_member_twice_in_one_sample_is_a_skippable_bad_sample(tmp_path):
    members = sample_members("a", 1) + [("b.jpg", jpeg(2)), ("b.jpg", jpeg(3)), ("b.cls", b"2")] \
        + sample_members("c", 4, seed=4)
    path = write_tar(tmp_path / "x.tar", members)
    assert [r["__key__"] for r in iter_raw_samples(str(path))] == ["a", "b", "c"]
    with pytest.raises(BadSampleError, match="appears twice"):
        scan_shard(str(path))
    assert [p for p, _ in scan_shard(str(path), skip_bad=True).bad] == [1]


@pytest.mark.parametrize("suffix", [".txt", ".lst", ".list"])
def test_a_shard_list_file_is_read_as_a_list(shards, tmp_path, suffix):
    lst = tmp_path / f"train{suffix}"
    lst.write_text("\n".join(shards["train"]) + "\n")
    assert expand_shards(str(lst)) == list(shards["train"])
