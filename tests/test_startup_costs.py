"""Start-up costs that grow with the data set: each done record read once by the cache's checks and finalize."""

from __future__ import annotations

import collections

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
