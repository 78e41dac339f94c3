"""dump-teacher: the cache round-trips, views replay bit for bit, workers/ranks/crashes change nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from dkd_cache import cache as cache_mod
from dkd_cache import cache_meta
from dkd_cache import store as store_mod
from dkd_cache.data import expand_shards, iter_raw_samples, parse_sample
from dkd_cache.dump import dump_teacher, render_shard
from dkd_cache.errors import (BadSampleError, CacheLockedError, CacheMismatchError, ConfigError, ShardError,
                              ShardNotFoundError)
from dkd_cache.teacher import load_teacher
from dkd_cache.views import normalize, render

from .conftest import dump_settings
from .helpers import assert_caches_equal, jpeg, sample_members, write_tar

REPO = Path(__file__).resolve().parents[1]


def test_cache_round_trips_keys_labels_and_metadata(cache_path, shards):
    cache = cache_mod.open_cache(cache_path)
    m = cache.meta
    assert m.state is cache_meta.CacheState.COMPLETE and m.views == 2 and m.temperatures == (1.0, 4.0)
    assert cache_meta.CacheMeta.from_dict(m.to_dict()) == m
    urls = expand_shards(str(Path(shards["train"][0]).parent))
    for i, url in enumerate(urls):
        entry = m.manifest.shards[i]
        assert entry.row_start % m.chunk_rows == 0 and entry.row_stop % m.chunk_rows == 0
        keys = cache_mod.decode_keys(cache.read_rows("samples/key", entry.row_start, entry.row_start + entry.samples))
        labels = cache.read_rows("samples/label", entry.row_start, entry.row_stop)
        shard_samples = [parse_sample(r) for r in iter_raw_samples(url)]
        assert keys == [s.key for s in shard_samples]
        assert labels[: entry.samples].tolist() == [s.label for s in shard_samples]
        assert (labels[entry.samples:] == -1).all()
    status = cache.read_rows("samples/status", 0, m.manifest.rows)
    assert int((status == cache_meta.STATUS_OK).sum()) == m.manifest.samples == shards["train_samples"]
    # any Zarr v3 reader: plain zarr, no dkd-cache code
    g = zarr.open_group(str(cache_path), mode="r")
    assert g["logits/topk_idx"].shape == (2, m.manifest.rows, 4)
    assert g["logits/lse"].dtype == np.float32


def test_stored_views_re_render_to_the_dumped_tensors_and_logits(cache_path, shards, teacher_ckpt):
    cache = cache_mod.open_cache(cache_path)
    m = cache.meta
    url = expand_shards(shards["train"])[1]
    entry = m.manifest.shards[1]
    boxes = cache.read_rows("views/box", entry.row_start, entry.row_stop, view=1)
    flips = cache.read_rows("views/flip", entry.row_start, entry.row_stop, view=1)
    target = cache.read_rows("logits/target", entry.row_start, entry.row_stop, view=1)
    lse = cache.read_rows("logits/lse", entry.row_start, entry.row_stop, view=1)
    dumped = list(render_shard(1, url, m, skip_bad=False))  # exactly what the dump's workers produced
    model, _ = load_teacher("resnet18", teacher_ckpt)
    images = []
    for pos, (raw, rs) in enumerate(zip(iter_raw_samples(url), dumped)):
        s = parse_sample(raw)
        again = render(s.image, tuple(int(v) for v in boxes[pos]), bool(flips[pos]), m.recipe)
        assert torch.equal(again, rs.images[1])  # bit for bit
        images.append(again)
    with torch.inference_mode():
        logits = model(normalize(torch.stack(images), m.recipe)).float()
    labels = cache.read_rows("samples/label", entry.row_start, entry.row_stop)[: len(images)]
    live_target = logits[torch.arange(len(images)), torch.from_numpy(labels).long()].numpy()
    np.testing.assert_allclose(target[: len(images)], live_target, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse[: len(images), 1], torch.logsumexp(logits / 4.0, 1).numpy(), rtol=1e-5, atol=1e-5)
    codec = m.codec
    idx = cache.read_rows("logits/topk_idx", entry.row_start, entry.row_stop, view=1)[: len(images)]
    assert (np.sort(idx, 1) == np.sort(logits.topk(codec.k, 1).indices.numpy(), 1)).all()


def test_views_identical_across_worker_counts(shards, teacher_ckpt, cache_path, tmp_path):
    other = tmp_path / "w2.zarr"
    dump_teacher(dump_settings(shards, teacher_ckpt, other, workers=2), progress=False)
    assert_caches_equal(cache_path, other)


def test_rerun_with_other_settings_is_refused(shards, teacher_ckpt, cache_path):
    with pytest.raises(CacheMismatchError, match="views"):
        dump_teacher(dump_settings(shards, teacher_ckpt, cache_path, views=3), progress=False)
    with pytest.raises(CacheMismatchError, match="seed"):
        dump_teacher(dump_settings(shards, teacher_ckpt, cache_path, seed=1), progress=False)


def test_rerun_of_a_complete_cache_does_nothing(shards, teacher_ckpt, cache_path):
    report = dump_teacher(dump_settings(shards, teacher_ckpt, cache_path), progress=False)
    assert report.views_written == 0 and report.complete


def test_second_writer_is_refused(shards, teacher_ckpt, tmp_path):
    out = tmp_path / "locked.zarr"
    with store_mod.location(out).writer_lease():
        with pytest.raises(CacheLockedError):
            dump_teacher(dump_settings(shards, teacher_ckpt, out), progress=False)


def _cli(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "dkd_cache", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _dump_args(shards, teacher, out, *extra):
    return ["dump-teacher", "--shards", str(Path(shards["train"][0]).parent), "--weights", str(teacher),
            "--out", str(out), "--arch", "resnet18", "--views", "2", "--codec", "topk:4", "--temperature", "1",
            "--temperature", "4", "--image-size", "32", "--batch-size", "16", "--workers", "0", "--chunk-rows", "8",
            "--no-progress", *extra]


@pytest.mark.slow
def test_kill_9_mid_dump_then_rerun_equals_uninterrupted(shards, teacher_ckpt, cache_path, tmp_path):
    out = tmp_path / "killed.zarr"
    for attempt in range(3):  # kill at several moments: before, between and after shard records
        proc = _cli(*_dump_args(shards, teacher_ckpt, out))
        deadline = time.time() + 60
        done_dir = out / "_dkd" / "done"
        while time.time() < deadline and proc.poll() is None:
            n = len(list(done_dir.glob("*.json"))) if done_dir.exists() else -1
            if n >= attempt:
                break
            time.sleep(0.02)
        time.sleep(0.05 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = _cli(*_dump_args(shards, teacher_ckpt, out))
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert_caches_equal(cache_path, out)


@pytest.mark.slow
def test_torchrun_two_ranks_equals_single_process(shards, teacher_ckpt, cache_path, tmp_path):
    out = tmp_path / "ddp.zarr"
    args = [a for a in _dump_args(shards, teacher_ckpt, out, "--log-every", "1") if a != "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dkd_cache",
           *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_caches_equal(cache_path, out)
    # stdout is a pipe: rank 0 prints progress lines for its share (shards 0 and 2: 50 samples x 2 views) and the
    # only summary; rank 1 (shards 1 and 3: 60 views) prints nothing
    lines = r.stdout.splitlines()
    progress = [line for line in lines if line.startswith("dump-teacher")]
    assert progress and all(line.startswith("dump-teacher rank 0/2 (its shards)  ") and "/100 views" in line
                            for line in progress), r.stdout
    assert " 100/100 views (100%) " in progress[-1]
    summaries = [line for line in lines if "dumped" in line]
    assert len(summaries) == 1 and summaries[0].startswith("rank 0 of 2 (its shards): dumped 100 views"), r.stdout


# ------------------------------------------------------------------------------------------ bad input
def _dump_dir(tmp_path, teacher, shard_dir, **kw):
    return dump_teacher(dump_settings({"train": [str(shard_dir / "x.tar")]}, teacher, tmp_path / "c.zarr", **kw),
                        progress=False)


@pytest.mark.parametrize("case, members, message", [
    ("missing_cls", sample_members("a", 1) + sample_members("b", None), "no .cls"),
    ("non_int_cls", sample_members("a", 1) + sample_members("b", "cat"), "not an integer"),
    ("empty_cls", sample_members("a", 1) + [("b.jpg", jpeg(1)), ("b.cls", b"")], "not an integer"),
    ("label_range", sample_members("a", 1) + sample_members("b", 10), "outside the teacher's classes"),
    ("duplicate_key", sample_members("a", 1) + sample_members("b", 2) + sample_members("a", 3), "duplicate key"),
    ("not_an_image", sample_members("a", 1) + sample_members("b", 2, image=b"this is not a jpeg"), "cannot be decoded"),
    ("pickle_member", sample_members("a", 1) + sample_members("b", 2) + [("b.pyd", b"\x80\x04cos\nsystem\n.")],
     "pickled"),
])
def test_bad_samples_are_named_errors(tmp_path, teacher_ckpt, case, members, message):
    shard_dir = tmp_path / "shards"
    write_tar(shard_dir / "x.tar", members)
    with pytest.raises((BadSampleError, ShardError)) as e:
        _dump_dir(tmp_path, teacher_ckpt, shard_dir)
    assert message in str(e.value)
    assert "x.tar" in str(e.value) and ("'b'" in str(e.value) or "'a'" in str(e.value))


def test_skip_bad_records_each_skipped_sample(tmp_path, teacher_ckpt):
    shard_dir = tmp_path / "shards"
    members = (sample_members("a", 1) + sample_members("b", 2, image=b"garbage") + sample_members("c", "x")
               + sample_members("d", 3, seed=4))
    write_tar(shard_dir / "x.tar", members)
    report = _dump_dir(tmp_path, teacher_ckpt, shard_dir, skip_bad=True)
    assert report.complete and report.skipped == 2
    meta = cache_mod.open_cache(tmp_path / "c.zarr").meta
    assert sorted((s.key, s.shard) for s in meta.skipped) == [("b", "x.tar"), ("c", "x.tar")]
    assert all(s.reason for s in meta.skipped)
    status = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")["samples/status"][:4]
    assert status.tolist() == [1, 2, 2, 1]


def test_truncated_tar_names_the_shard(tmp_path, teacher_ckpt):
    shard_dir = tmp_path / "shards"
    path = write_tar(shard_dir / "x.tar", sum((sample_members(k, 1, seed=i) for i, k in enumerate("abcd")), []))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="x.tar.*(truncated|corrupt)"):
        _dump_dir(tmp_path, teacher_ckpt, shard_dir)


def test_empty_shard_list_and_bad_paths(tmp_path, teacher_ckpt, shards):
    with pytest.raises(ShardNotFoundError):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(ShardNotFoundError):
        expand_shards(str(tmp_path / "train-{000..003}.tar"))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "file.txt").write_text("not a cache")
    with pytest.raises(cache_mod.CacheError, match="not a dkd-cache"):
        dump_teacher(dump_settings(shards, teacher_ckpt, junk), progress=False)
    inside = Path(shards["train"][0]).parent
    with pytest.raises(ConfigError, match="input shard"):
        dump_teacher(dump_settings(shards, teacher_ckpt, inside), progress=False)
    with pytest.raises(ConfigError):
        dump_settings(shards, teacher_ckpt, tmp_path / "c.zarr", views=0)
    with pytest.raises(ConfigError):
        dump_settings(shards, teacher_ckpt, tmp_path / "c.zarr", temperatures=(0.0,))
    with pytest.raises(ConfigError):
        dump_teacher(dump_settings(shards, teacher_ckpt, tmp_path / "c.zarr", codec="topk:11"), progress=False)


def test_shard_specs_brace_glob_dir_and_list(shards, tmp_path):
    d = Path(shards["train"][0]).parent
    by_dir = expand_shards(str(d))
    assert expand_shards(str(d / "train-{000000..000003}.tar")) == by_dir
    assert expand_shards(str(d / "train-*.tar")) == by_dir
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(by_dir) + "\n")
    assert expand_shards(str(lst)) == by_dir
    with pytest.raises(ConfigError, match="allow-pipe"):
        expand_shards("pipe:cat x.tar")


def test_plain_tar_shards_work_like_shardwriter_shards(tmp_path, teacher_ckpt):
    from dkd_cache.synth import make_shards

    a = make_shards(tmp_path / "wds", classes=10, train_per_class=3, val_per_class=1, shard_size=20, seed=5,
                    min_side=40, max_side=60, writer="webdataset")
    b = make_shards(tmp_path / "tar", classes=10, train_per_class=3, val_per_class=1, shard_size=20, seed=5,
                    min_side=40, max_side=60, writer="tar")
    ca, cb = tmp_path / "a.zarr", tmp_path / "b.zarr"
    dump_teacher(dump_settings(a, teacher_ckpt, ca), progress=False)
    dump_teacher(dump_settings(b, teacher_ckpt, cb), progress=False)
    assert_caches_equal(ca, cb)


def test_wait_seconds_config_is_validated_before_any_work(shards, teacher_ckpt, tmp_path):
    assert dump_settings(shards, teacher_ckpt, tmp_path / "c.zarr").wait_seconds == 14400.0
    assert dump_settings(shards, teacher_ckpt, tmp_path / "c.zarr", wait_seconds=30).wait_seconds == 30.0
    for bad in (0, -1, float("inf"), float("nan"), "soon", None):
        with pytest.raises(ConfigError, match="wait_seconds"):
            dump_settings(shards, teacher_ckpt, tmp_path / "c.zarr", wait_seconds=bad)
    assert not (tmp_path / "c.zarr").exists()
