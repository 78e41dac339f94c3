"""A done record vouches for chunks that are on disk: they are fsynced before the record is written."""

from __future__ import annotations

import os
from pathlib import Path

from dkd_cache import cache as cache_mod
from dkd_cache.dump import dump_teacher

from .conftest import dump_settings


def test_every_chunk_file_is_fsynced_before_its_done_record(shards, teacher_ckpt, tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("replace", str(dst)))
        return real_replace(src, dst, *a, **k)

    def link(src, dst, *a, **k):  # done records are created with a create-only link
        events.append(("replace", str(dst)))
        return real_link(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    out = tmp_path / "c.zarr"
    dump_teacher(dump_settings(shards, teacher_ckpt, out, views=1), progress=False)
    cache = cache_mod.open_cache(out)
    records = [i for i, (kind, p) in enumerate(events) if kind == "replace" and "/_dkd/done/" in p]
    assert len(records) == len(cache.meta.manifest.shards)
    for shard, entry in enumerate(cache.meta.manifest.shards):
        at = next(i for i in records if events[i][1].endswith(f"{shard:06d}.json"))
        synced = {p for kind, p in events[:at] if kind == "fsync"}
        for name in ("samples/status", "samples/height", "views/box", "logits/target", "logits/lse",
                     *(f"logits/{n}" for n in cache.codec_arrays)):
            files = cache_mod.chunk_keys(cache, name, entry.row_start, entry.row_stop)
            assert files and all(str((Path(cache.path) / f).resolve()) in synced for f in files), (shard, name)
