"""Start-up costs that grow with the data set: each done record read once by the cache's checks and finalize; each
shard's keys and labels held as one array each (never a Python object per sample), behaving as before."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from dkd_cache import cache as cache_mod
from dkd_cache import cache_writer


def _count_record_reads(monkeypatch) -> collections.Counter:
    reads: collections.Counter = collections.Counter()
    real = cache_mod.Cache.shard_record

    def counting(self, shard):
        reads[shard] += 1
        return real(self, shard)

    monkeypatch.setattr(cache_mod.Cache, "shard_record", counting)
    return reads


def test_check_reads_each_done_record_once(cache_path, monkeypatch):
    cache = cache_mod.open_cache(cache_path)
    reads = _count_record_reads(monkeypatch)
    findings = cache.check()
    assert all(f.ok or f.warning for f in findings)
    shards = len(cache.meta.manifest.shards)
    assert dict(reads) == {i: 1 for i in range(shards)}
    reads.clear()
    cache_mod.require_sound(cache)  # the pre-flight of every training rank
    assert dict(reads) == {i: 1 for i in range(shards)}


def test_finalize_reads_each_done_record_once(cache_path, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "c.zarr"
    shutil.copytree(cache_path, copy)
    cache = cache_mod.open_cache(copy, mode="r+")
    reads = _count_record_reads(monkeypatch)
    done = cache_writer.finalize(cache)
    assert done.meta.state is cache_mod.CacheState.COMPLETE
    assert dict(reads) == {i: 1 for i in range(len(cache.meta.manifest.shards))}


# --------------------------------------------------------------------------- keys as one array, not a str each
def _key_tar(tmp_path, keys, labels):
    from .helpers import sample_members, write_tar

    members = [m for i, (k, label) in enumerate(zip(keys, labels)) for m in sample_members(k, label, seed=i)]
    return str(write_tar(tmp_path / "s" / "k.tar", members))


KEYS = ["a0", "dir/ü-längerer_schlüssel", "b"]  # unequal widths, a folder, non-ASCII


def _old_digest(keys) -> str:
    """keys_digest as it was when keys were a tuple of str (the digest caches record)."""
    return hashlib.sha256(b"".join(k.encode() + b"\n" for k in keys)).hexdigest()


def test_a_shard_index_holds_keys_and_labels_as_arrays(tmp_path):
    from dkd_cache import data

    ix = data.scan_shard(_key_tar(tmp_path, KEYS, [3, 0, 7]))
    assert isinstance(ix.keys, np.ndarray) and ix.keys.dtype.kind == "S" and ix.keys.shape == (3,)
    assert ix.keys.dtype.itemsize == max(len(k.encode()) for k in KEYS)
    assert isinstance(ix.labels, np.ndarray) and ix.labels.dtype == np.int32 and ix.labels.tolist() == [3, 0, 7]
    assert [ix.key(p) for p in range(3)] == KEYS
    assert ix.keys_sha256 == data.keys_digest(KEYS) == _old_digest(KEYS)
    # given as sequences (tests, benchmarks), they are stored as the same arrays; equal by value
    same = data.ShardIndex(url=ix.url, name=ix.name, keys=tuple(KEYS), labels=(3, 0, 7))
    assert same == ix and isinstance(same.keys, np.ndarray)
    assert same != data.ShardIndex(url=ix.url, name=ix.name, keys=tuple(KEYS), labels=(3, 0, 8))
    with pytest.raises(TypeError, match="str, not int"):
        data.ShardIndex(url="u", name="n", keys=(1, 2), labels=(0, 0))


def test_scan_records_read_back_as_arrays_and_a_malformed_one_is_a_rescan(tmp_path):
    from dkd_cache import data, shard_scan

    url, cache = _key_tar(tmp_path, KEYS, [3, 0, 7]), str(tmp_path / "c.zarr")
    first = shard_scan.scan_shards([url], cache=cache)
    stamp = shard_scan.shard_stamp(url)
    recorded = shard_scan.load_record(cache, url, stamp)
    assert recorded == first[0] == data.scan_shard(url)
    assert isinstance(recorded.keys, np.ndarray) and isinstance(recorded.labels, np.ndarray)
    record = Path(shard_scan.records_at(cache)) / "k.tar.json"
    assert json.loads(record.read_text())["keys"] == KEYS  # the record's format is unchanged: keys as str
    for bad in ({"keys": [1, 2, 3]}, {"labels": ["3", "0", "7"]}, {"labels": [3, 0]}):
        record.write_text(json.dumps({**json.loads(json.dumps(shard_scan.record_of(first[0], stamp))), **bad}))
        assert shard_scan.load_record(cache, url, stamp) is None


def test_the_manifest_digest_over_key_arrays_of_unequal_widths_is_the_digest_of_every_key():
    from dkd_cache import data
    from dkd_cache.cache_meta import build_manifest

    shards = [["a", "bb"], ["a-much-longer-key", "ü"], ["c"]]
    indexes = [data.ShardIndex(url=f"s{i}", name=f"s{i}", keys=tuple(k), labels=(0,) * len(k))
               for i, k in enumerate(shards)]
    m = build_manifest(indexes, 4)
    every = [k for ks in shards for k in ks]
    assert m.samples == 5 and m.keys_sha256 == _old_digest(every)
    assert [s.keys_sha256 for s in m.shards] == [_old_digest(ks) for ks in shards]


def test_a_cache_stores_array_keys_as_utf8_rows(tmp_path):
    from dkd_cache import data
    from dkd_cache.cache_meta import build_manifest

    from .test_cache_writer import synthetic_cache

    new = synthetic_cache()
    keys = [["ü-0", "x" * 40, "b"], *([f"s{i}-{j}" for j in range(ix.keys.size)] for i, ix in
                                      enumerate(new.indexes[1:], 1))]
    keys[0] += [f"p{j}" for j in range(new.indexes[0].keys.size - 3)]
    indexes = tuple(data.ShardIndex(url=ix.url, name=ix.name, keys=tuple(k), labels=ix.labels, bad=ix.bad)
                    for ix, k in zip(new.indexes, keys))
    meta = dataclasses.replace(new.meta, manifest=build_manifest(indexes, new.meta.chunk_rows))
    cache = cache_writer.create_cache(tmp_path / "c.zarr", meta, indexes, meta.codec.arrays(meta.num_classes))
    raw = cache.read_rows("samples/key", 0, meta.manifest.rows)
    assert raw.shape[1] == 40  # the longest key's UTF-8, rounded up to 8 bytes (at least 16)
    for entry, k in zip(meta.manifest.shards, keys):
        assert cache_mod.decode_keys(raw[entry.row_start:entry.row_start + entry.samples]) == k


def test_a_label_beyond_int32_is_a_bad_sample(tmp_path):
    from dkd_cache import data
    from dkd_cache.errors import BadSampleError

    url = _key_tar(tmp_path, ["a", "b"], [1, 2**31])
    with pytest.raises(BadSampleError, match="larger than any class count"):
        data.scan_shard(url)
    ix = data.scan_shard(url, skip_bad=True)
    assert ix.labels.tolist() == [1, -1] and [p for p, _ in ix.bad] == [1]


def test_a_resumed_run_does_not_keep_the_loaded_checkpoint(shards, cache_path, tmp_path, monkeypatch):
    """The checkpoint a resume loads (the weights and optimizer state again) is released before the loader's
    workers start: not held through the run, nor forked into every worker."""
    import gc
    import weakref

    from dkd_cache import run_checkpoint
    from dkd_cache import train as train_mod
    from dkd_cache.train import TrainConfig, train_student

    def cfg(**kw) -> TrainConfig:
        return TrainConfig(shards=str(Path(shards["train"][0]).parent), out=str(tmp_path / "run"),
                           cache=str(cache_path), arch="resnet18", epochs=1, batch_size=16, lr=0.05, lr_batch=16,
                           workers=0, shuffle_buffer=16, **kw)

    train_student(cfg(max_steps=2), progress=False)

    class Loaded(dict):  # the loaded checkpoint, as a dict that can be referenced weakly
        pass

    loaded: list[weakref.ref] = []
    real_open, real_loader = run_checkpoint.open_run, train_mod.pass_loader

    def open_run(*a, **k):
        ckpt = Loaded(real_open(*a, **k))
        loaded.append(weakref.ref(ckpt))
        return ckpt

    alive_when_loading: list[bool] = []

    def pass_loader(*a, **k):
        gc.collect()
        alive_when_loading.append(loaded[0]() is not None)
        return real_loader(*a, **k)

    monkeypatch.setattr(run_checkpoint, "open_run", open_run)
    monkeypatch.setattr(train_mod, "pass_loader", pass_loader)
    train_student(cfg(max_steps=4), resume=True, progress=False)
    assert loaded and alive_when_loading == [False]
