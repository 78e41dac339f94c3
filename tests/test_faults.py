"""Faults injected for real: SIGKILL mid-write, failing writes, dead ranks, damaged caches, hostile input.

Crashes run the real CLI in a child process through tests/fault_harness.py, a small wrapper that patches one
low-level call (Zarr's file write, os.replace, torch.save, the optimizer step, the file size limit) to fail or
SIGKILL the process at a chosen moment; the product code is unchanged. To keep the file fast, most children are
forked from one pre-imported fork server (each is still a separate process that the fault kills for real); the
torchrun test launches fresh processes. Each test then resumes normally and compares with an uninterrupted run,
array by array or tensor by tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from dkd_cache import cache as cache_mod
from dkd_cache import cache_meta
from dkd_cache import loader as loader_mod
from dkd_cache.cli import app
from dkd_cache.data import expand_shards
from dkd_cache.dump import dump_teacher
from dkd_cache.errors import CacheError, CacheMismatchError, ShardError
from dkd_cache.loader import Item, StreamSpec, plan_epoch, skips_for
from dkd_cache.synth import make_shards
from dkd_cache.checkpoint import read_checkpoint, save_checkpoint
from dkd_cache.teacher import build_model
from dkd_cache.train import TrainConfig, epoch_batches, train_student

from .conftest import CLASSES, TINY_RECIPE, dump_settings
from .helpers import assert_caches_equal, sample_members, write_tar

runner = CliRunner()
HARNESS = Path(__file__).with_name("fault_harness.py")


def _env(fault: dict | None = None, **extra) -> dict:
    # the same thread count as this process, so that children compute bit for bit what in-process runs compute
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "DKD_FAULT": json.dumps(fault or {})}
    env.update(extra)
    return env


class ForkServer:
    """One `fault_harness.py --serve` process: it imports torch and dkd_cache once and forks a fresh child per CLI
    run (a real process that a fault kills for real) without paying the imports again each time."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(HARNESS), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=_env(), start_new_session=True)

    def run_many(self, runs: list[dict], timeout: float = 240) -> list[dict]:
        self.proc.stdin.write(json.dumps(runs) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            pytest.fail(f"fork server runs did not finish within {timeout} s: {runs}")
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def run(self, args: list[str], fault: dict | None = None, timeout: float = 240) -> dict:
        return self.run_many([{"args": args, "fault": fault or {}}], timeout)[0]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the server and any child it still has
                self.proc.wait()


@pytest.fixture(scope="module")
def server():
    srv = ForkServer()
    yield srv
    srv.close()


def _shard_dir(shards) -> str:
    return str(Path(shards["train"][0]).parent)


def _dump_args(shards, teacher, out, *extra) -> list[str]:
    return ["dump-teacher", "--shards", _shard_dir(shards), "--weights", str(teacher), "--out", str(out),
            "--arch", "resnet18", "--views", "2", "--codec", "topk:4", "--temperature", "1", "--temperature", "4",
            "--image-size", "32", "--batch-size", "16", "--workers", "0", "--chunk-rows", "8", "--no-progress",
            *extra]


def _partials(out: Path) -> list[Path]:
    """Every leftover of a cut-short write: creation folders beside the cache, `*.partial` files inside it."""
    found = list(out.parent.glob(f".{out.name}.partial-*"))
    if out.exists():
        found += list(out.rglob("*.partial"))
    return found


def _done(out: Path) -> int:
    return len(list((out / "_dkd" / "done").glob("*.json")))


# ============================================================================================== crashes
@pytest.mark.slow
def test_dump_killed_inside_store_writes_then_rerun_equals_uninterrupted(shards, teacher_ckpt, cache_path, tmp_path,
                                                                         server):
    """SIGKILL half way through a Zarr file write (during creation, during a shard's chunks, during the final
    metadata write) and between a shard record's write and its rename; each run resumes the last one's mess."""
    out = tmp_path / "c.zarr"
    args = _dump_args(shards, teacher_ckpt, out)

    # 1. during creation: the 50th file write, inside the hidden creation folder
    r = server.run(args, {"put": {"n": 50}})
    assert r["rc"] == -signal.SIGKILL, r["output"]
    assert not out.exists() and _partials(out), "a crash during creation leaves only a hidden partial folder"

    # 2. during the chunks of the second shard written (its logits/lse Zarr shard, torn half way)
    r = server.run(args, {"put": {"match": "/logits/lse/c/0/4/", "n": 1}})  # tar shard 1's first rows
    assert r["rc"] == -signal.SIGKILL, r["output"]
    assert _done(out) == 1 and any(p.name.endswith(".partial") for p in out.rglob("*"))
    assert cache_mod.open_cache(out).meta.state == "writing"
    with pytest.raises(CacheError, match="incomplete"):  # an unfinished cache is never trained on
        train_student(TrainConfig(shards=_shard_dir(shards), out=str(tmp_path / "run"), cache=str(out), epochs=1,
                                  batch_size=16, workers=0), progress=False)

    # 3. after a shard record is written to its temporary file, before the rename that publishes it
    r = server.run(args, {"record": 2})
    assert r["rc"] == -signal.SIGKILL, r["output"]
    assert _done(out) == 2 and list((out / "_dkd" / "done").glob("*.partial"))

    # 4. during the last write of all: zarr.json with state "complete"
    r = server.run(args, {"put": {"match": "zarr.json", "contains": '"complete"', "n": 1}})
    assert r["rc"] == -signal.SIGKILL, r["output"]
    assert _done(out) == 4 and cache_mod.open_cache(out).meta.state == "writing"

    report = dump_teacher(dump_settings(shards, teacher_ckpt, out), progress=False)
    assert report.complete and report.views_written == 0  # every shard was recorded: only the commit marker
    assert _partials(out) == []  # the torn files are gone, never read as data
    assert_caches_equal(cache_path, out)


@pytest.mark.slow
def test_failing_store_writes_are_clear_errors_then_rerun_completes(shards, teacher_ckpt, cache_path, tmp_path,
                                                                    server):
    out = tmp_path / "c.zarr"
    args = _dump_args(shards, teacher_ckpt, out)
    # a file size limit of 1000 bytes from the start: creation fails on the first larger metadata file
    r = server.run(args, {"fsize": 1000})
    assert r["rc"] == 2, r["output"]
    assert "Traceback" not in r["output"] and "error:" in r["output"]
    assert "cannot write the new cache" in r["output"] and "File too large" in r["output"]
    assert not out.exists()
    # a limit of 30 bytes from the second shard write on: the dump fails half way, one shard recorded
    r = server.run(args, {"fsize": 30, "fsize_at_shard": 2})
    assert r["rc"] == 2, r["output"]
    assert "Traceback" not in r["output"] and "cannot write shard train-" in r["output"] and "rerun" in r["output"]
    assert _done(out) == 1
    report = dump_teacher(dump_settings(shards, teacher_ckpt, out), progress=False)
    assert report.complete and _partials(out) == []
    assert_caches_equal(cache_path, out)


def test_dump_to_a_read_only_out_is_a_named_error_not_a_traceback(shards, teacher_ckpt, tmp_path):
    from .test_cache_writer import _read_only_dir

    out = _read_only_dir(tmp_path) / "c.zarr"
    res = runner.invoke(app, _dump_args(shards, teacher_ckpt, out))
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"{out}: cannot write" in res.output and "choose a writable --out" in res.output, res.output


@pytest.mark.slow
def test_sigterm_to_a_dump_with_workers_then_an_immediate_rerun_continues(shards, teacher_ckpt, cache_path,
                                                                          tmp_path):
    """A scheduler's SIGTERM stops dump-teacher; its DataLoader workers die with it, so their inherited copy of the
    writer lock goes too and the requeued dump, started at once, is not refused as 'being written by another
    dump-teacher process'."""
    out = tmp_path / "c.zarr"
    args = _dump_args(shards, teacher_ckpt, out, "--workers", "2")
    proc = subprocess.Popen([sys.executable, str(HARNESS), *args], env=_env({"slow_shard": 0.5}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while _done(out) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and _done(out) >= 1, "the dump ended or stalled before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGTERM
    res = runner.invoke(app, args)  # at once, as a requeue does
    assert res.exit_code == 0 and "cache complete" in res.output, res.output
    assert_caches_equal(cache_path, out)


def _train_args(shards, cache, out, *extra) -> list[str]:
    return ["train-student", "--shards", _shard_dir(shards), "--cache", str(cache), "--out", str(out),
            "--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--workers", "0", "--checkpoint-every", "2",
            "--no-progress", *extra]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = read_checkpoint(a / "checkpoint.pt")["model"], read_checkpoint(b / "checkpoint.pt")["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
def test_train_killed_mid_epoch_and_mid_checkpoint_then_resumed_equals_uninterrupted(shards, cache_path, tmp_path,
                                                                                     server):
    run = tmp_path / "run"
    # 80 samples, batch 16: 5 steps per epoch; checkpoints at steps 2, 4, (epoch end) 5, 6, 8, 10, (epoch end) 10
    r = server.run(_train_args(shards, cache_path, run), {"step": 3})  # killed mid-epoch 0
    assert r["rc"] == -signal.SIGKILL, r["output"]
    ck = read_checkpoint(run / "checkpoint.pt")
    assert (ck["epoch"], ck["consumed"], ck["step"]) == (0, 32, 2)
    # resumed, then killed half way through its second checkpoint write (the end of epoch 0)
    r = server.run(_train_args(shards, cache_path, run, "--resume"), {"save": 2})
    assert r["rc"] == -signal.SIGKILL, r["output"]
    assert list(run.glob(".checkpoint.pt.*.tmp")), "the torn checkpoint was being written beside the real one"
    ck = read_checkpoint(run / "checkpoint.pt")  # the previous checkpoint, whole
    assert (ck["epoch"], ck["consumed"], ck["step"]) == (0, 64, 4)
    res = runner.invoke(app, _train_args(shards, cache_path, run, "--resume"))
    assert res.exit_code == 0, res.output
    full = tmp_path / "full"
    train_student(TrainConfig(shards=_shard_dir(shards), out=str(full), cache=str(cache_path), epochs=2,
                              batch_size=16, lr=0.05, workers=0, checkpoint_every=2), progress=False)
    assert read_checkpoint(run / "checkpoint.pt")["step"] == read_checkpoint(full / "checkpoint.pt")["step"] == 10
    _assert_same_weights(full, run)


def test_a_full_disk_while_a_training_checkpoint_is_written_is_named_and_the_previous_one_stands(
        shards, cache_path, tmp_path, server):
    run = tmp_path / "run"
    res = runner.invoke(app, _train_args(shards, cache_path, run, "--max-steps", "2"))  # checkpoint at step 2
    assert res.exit_code == 0, res.output
    before = (run / "checkpoint.pt").read_bytes()
    # resumed where files may grow to 1 MB only, like a disk that fills up: the next checkpoint (~90 MB) fails
    r = server.run(_train_args(shards, cache_path, run, "--resume"), {"fsize": 1_000_000})
    assert r["rc"] == 2, r["output"]
    assert "Traceback" not in r["output"] and "could not be written" in r["output"], r["output"]
    assert "previous checkpoint there is intact" in r["output"] and "--resume" in r["output"], r["output"]
    assert (run / "checkpoint.pt").read_bytes() == before  # the step-2 checkpoint, whole
    assert not list(run.glob(".checkpoint.pt.*.tmp"))  # no partial file left behind
    res = runner.invoke(app, _train_args(shards, cache_path, run, "--resume"))  # space freed: the run continues
    assert res.exit_code == 0, res.output
    assert read_checkpoint(run / "checkpoint.pt")["step"] == 10


def _epoch_keys(monkeypatch, spec: StreamSpec, sizes, keys: list[str], *, world, rank, workers, consumed=0
                ) -> tuple[list[str], int]:
    """The keys one rank trains on in one epoch, in training order: training's own stream (train.epoch_batches:
    tar read, cache join, shuffle buffer, resume skip, canonical order, batches); only the image decode is
    replaced, by the sample's position in `keys` carried as its label."""
    position = {k: i for i, k in enumerate(keys)}
    monkeypatch.setattr(loader_mod, "render_items",
                        lambda spec, joined, worker, seq0, first=0: [
                            Item(worker, seq0 + j, None, position[joined.raw["__key__"]], {})
                            for j in range(first, len(joined.entries))])
    plan = plan_epoch(sizes, seed=spec.seed, epoch=spec.epoch, world=world, rank=rank, workers=workers)
    skips = skips_for(plan.counts, consumed, spec.block)
    stream = epoch_batches(spec, plan, skips, workers=0, block=spec.block, batch_size=spec.block)
    return [keys[i] for batch in stream for i in batch.labels.tolist()], plan.padding


def test_every_sample_once_per_epoch_across_ranks_workers_and_resume(monkeypatch, shards, cache_path):
    cache = cache_mod.open_cache(cache_path)
    m = cache.meta.manifest
    urls = expand_shards(_shard_dir(shards))
    sizes = [s.samples for s in m.shards]
    row_keys = cache_mod.decode_keys(cache.read_rows("samples/key", 0, m.rows))
    all_keys = sorted(row_keys[i] for s in m.shards for i in range(s.row_start, s.row_start + s.samples))
    for epoch in (0, 1):
        spec = StreamSpec(urls=tuple(urls), recipe=cache.meta.recipe, seed=0, epoch=epoch, view=epoch,
                          rank=0, cache_path=str(cache_path), num_classes=CLASSES, shuffle_buffer=16)
        for world, workers in ((1, 1), (1, 3), (2, 2), (3, 1)):
            seen, padding = [], 0
            for rank in range(world):
                spec_r = dataclasses.replace(spec, rank=rank)
                keys, pad = _epoch_keys(monkeypatch, spec_r, sizes, all_keys, world=world, rank=rank, workers=workers)
                seen += keys
                padding += pad
                # resume at a few positions: what was consumed plus what the resumed stream yields is the epoch
                for consumed in (5, len(keys) - 1):
                    rest, _ = _epoch_keys(monkeypatch, spec_r, sizes, all_keys, world=world, rank=rank,
                                          workers=workers, consumed=consumed)
                    assert keys[:consumed] + rest == keys, (epoch, world, workers, rank, consumed)
            assert sorted(set(seen)) == all_keys, "no sample missing"
            assert len(seen) == len(all_keys) + padding, "none twice beyond the reported padding"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_dead_rank_fails_the_other_fast_and_torchrun_restart_resumes(shards, cache_path, tmp_path, server):
    # Two ranks launched by hand (no torchrun agent to kill the survivor): rank 1 is SIGKILLed after step 3,
    # rank 0 must fail on its own, well before the process group timeout.
    run = tmp_path / "manual"
    port = _free_port()
    dist_env = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    t0 = time.monotonic()
    rank0, rank1 = server.run_many([
        {"args": _train_args(shards, cache_path, run), "fault": {"step": 3, "rank": 1},
         "env": {**dist_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}} for rank in (0, 1)], timeout=150)
    assert rank1["rc"] == -signal.SIGKILL, rank1["output"]
    assert rank0["rc"] != 0, rank0["output"]
    assert rank0["t"] - rank1["t"] < 60 and rank0["t"] - t0 < 120, \
        "the surviving rank must fail on its own, not wait for the process group timeout"

    # torchrun with one restart: rank 1 dies after its 3rd step on the first attempt only; the restart resumes
    # from the last checkpoint (step 2) and finishes.
    run = tmp_path / "elastic"
    marker = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts",
           "1", str(HARNESS), *_train_args(shards, cache_path, run, "--resume", "--epochs", "1")]
    r = subprocess.run(cmd, env=_env({"step": 3, "rank": 1, "attempt": 0, "marker": str(marker)}),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-5000:]
    assert marker.exists(), "the fault fired on the first attempt"
    ck = read_checkpoint(run / "checkpoint.pt")
    # 80 samples in shards of 25/25/25/5 over 2 ranks: 50 each after padding, local batch 8: 6 full steps per
    # epoch (the last 2 samples of each rank, a partial batch, are left out)
    assert (ck["epoch"], ck["consumed"], ck["step"]) == (1, 0, 6)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "step"]
    # the restart resumed from the step-2 checkpoint; what the first attempt logged after it was replaced
    assert steps == [1, 2, 3, 4, 5, 6]


# ===================================================================================== damaged cache
def _copy(cache_path: Path, tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(cache_path, dst)
    return dst


def _train_cfg(shards, cache, out) -> TrainConfig:
    return TrainConfig(shards=_shard_dir(shards), out=str(out), cache=str(cache), epochs=1, batch_size=16, workers=0,
                       lr=0.05, shuffle_buffer=16)


def _flip_inner_chunks(path: Path) -> None:
    """Flip one bit in the middle of every inner chunk of a Zarr shard file (index: (offset, nbytes) u64 pairs
    then a crc32c, at the end)."""
    data = bytearray(path.read_bytes())
    n_inner = (len(data) - 4) // 16
    while n_inner > 0:  # the index is the last 16 * n + 4 bytes; find n such that the offsets fit
        idx = np.frombuffer(bytes(data[-(16 * n_inner + 4):-4]), "<u8").reshape(-1, 2)
        if (idx[:, 0] + idx[:, 1] <= len(data) - 16 * n_inner - 4).all() and idx[:, 1].min() > 0:
            break
        n_inner -= 1
    for off, size in idx:
        data[int(off + size // 2)] ^= 0x04
    path.write_bytes(bytes(data))


def test_flipped_missing_and_torn_cache_files_are_named_errors(shards, cache_path, tmp_path):
    # a bit flipped in each inner chunk of logits/topk_val rows 8..15 (views 0 and 1)
    flipped = _copy(cache_path, tmp_path, "flipped.zarr")
    _flip_inner_chunks(flipped / "logits" / "topk_val" / "c" / "0" / "1" / "0")
    cache = cache_mod.open_cache(flipped)
    for view in (0, 1):
        with pytest.raises(CacheError, match=r"'logits/topk_val' rows 8\.\.15 view %d" % view):
            cache.read_rows("logits/topk_val", 8, 16, view=view)
    cache.read_rows("logits/topk_val", 16, 24, view=0)  # its neighbours are fine
    with pytest.raises(CacheError, match="logits/topk_val"):  # a CacheError through training too
        train_student(_train_cfg(shards, flipped, tmp_path / "run-flipped"), progress=False)
    # a bit flipped in a plain chunk: samples/label rows 8..15
    label_chunk = flipped / "samples" / "label" / "c" / "1"
    data = bytearray(label_chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    label_chunk.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"'samples/label' rows 8\.\.15 \(tar shard\(s\) \['train-000000.tar'\]\)"):
        cache.read_rows("samples/label", 0, 32)

    # a chunk file deleted: logits/target rows 16..23 (both views): never read back as NaN or zeros
    missing = _copy(cache_path, tmp_path, "missing.zarr")
    (missing / "logits" / "target" / "c" / "0" / "2").unlink()
    with pytest.raises(CacheError, match=r"'logits/target' is missing chunk\(s\) for rows \[\(16, 23\)\]"):
        cache_mod.open_cache(missing).read_rows("logits/target", 0, 32, view=0)
    with pytest.raises(CacheError, match="logits/target"):
        train_student(_train_cfg(shards, missing, tmp_path / "run-missing"), progress=False)
    # an inner chunk that holds only the fill value (what Zarr returns for a lost inner chunk)
    g = zarr.open_group(str(_copy(cache_path, tmp_path, "lost.zarr")), mode="r+")
    g["logits/lse"][0, 40:48] = np.nan
    with pytest.raises(CacheError, match=r"'logits/lse' view 0 holds no data for rows \[40, 41"):
        train_student(_train_cfg(shards, tmp_path / "lost.zarr", tmp_path / "run-lost"), progress=False)

    # the root zarr.json truncated
    torn = _copy(cache_path, tmp_path, "torn.zarr")
    meta = torn / "zarr.json"
    meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])
    with pytest.raises(CacheError, match="metadata"):
        cache_mod.open_cache(torn)
    with pytest.raises(CacheError, match="metadata"):
        train_student(_train_cfg(shards, torn, tmp_path / "run-torn"), progress=False)
    # an array's zarr.json truncated: named, not a bare JSON error
    torn2 = _copy(cache_path, tmp_path, "torn2.zarr")
    meta = torn2 / "logits" / "topk_val" / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:100])
    with pytest.raises(CacheError, match="logits/topk_val"):
        cache_mod.open_cache(torn2)
    res = runner.invoke(app, ["train-student", "--shards", _shard_dir(shards), "--cache", str(torn2), "--out",
                              str(tmp_path / "run-torn2"), "--workers", "0", "--no-progress"])
    assert res.exit_code == 2 and "logits/topk_val" in res.output, res.output
    assert not (tmp_path / "run-torn2").exists()


@pytest.mark.slow
def test_two_dump_processes_on_one_new_cache_one_wins(shards, teacher_ckpt, cache_path, tmp_path, server):
    out = tmp_path / "c.zarr"
    # both forked at the same moment; each shard write sleeps 0.5 s so that the first holds the lock a while
    runs = server.run_many([{"args": _dump_args(shards, teacher_ckpt, out), "fault": {"slow_shard": 0.5}}
                            for _ in range(2)])
    assert sorted(r["rc"] for r in runs) == [0, 2], runs
    loser = next(r["output"] for r in runs if r["rc"] == 2)
    assert "being written by another dump-teacher process" in loser and "Traceback" not in loser
    assert_caches_equal(cache_path, out)


def test_cache_from_other_shards_teacher_recipe_or_format_is_refused(shards, teacher_ckpt, cache_path, tmp_path):
    copy = _copy(cache_path, tmp_path, "c.zarr")
    other_shards = make_shards(tmp_path / "other", classes=CLASSES, train_per_class=6, val_per_class=1,
                               shard_size=25, seed=3, min_side=40, max_side=90)
    torch.manual_seed(1)
    other_teacher = tmp_path / "other-teacher.pt"
    save_checkpoint(other_teacher, model=build_model("resnet18", CLASSES).state_dict(), arch="resnet18")
    for settings, words in (
        (dump_settings(other_shards, teacher_ckpt, copy), "shards: cache has 4 shards / 80 samples"),
        (dump_settings(shards, other_teacher, copy), "teacher: cache has"),
        (dump_settings(shards, teacher_ckpt, copy, recipe=dataclasses.replace(TINY_RECIPE, image_size=48)),
         "recipe: cache has"),
        (dump_settings(shards, teacher_ckpt, copy, codec="topk:3"), "codec: cache has"),
    ):
        with pytest.raises(CacheMismatchError, match=words):
            dump_teacher(settings, progress=False)
    assert_caches_equal(cache_path, copy)  # refusals touch nothing
    with pytest.raises(CacheMismatchError, match="other shards|shard"):
        train_student(_train_cfg(other_shards, copy, tmp_path / "run-other"), progress=False)

    g = zarr.open_group(str(copy), mode="r+")
    g.attrs["dkd_cache"] = {**g.attrs["dkd_cache"], "format_version": 0}
    for call in (lambda: cache_mod.open_cache(copy),
                 lambda: dump_teacher(dump_settings(shards, teacher_ckpt, copy), progress=False),
                 lambda: train_student(_train_cfg(shards, copy, tmp_path / "run-v0"), progress=False)):
        with pytest.raises(CacheMismatchError, match="format version 0 is not the supported 1"):
            call()
    res = runner.invoke(app, _dump_args(shards, teacher_ckpt, copy))
    assert res.exit_code == 2 and "format version 0" in res.output


# ===================================================================================== hostile input
class _Payload:
    """Unpickling this runs open(marker, "w"): a file appears if the pickle is ever loaded unsafely."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_or_broken_weights_are_refused_through_the_cli(shards, teacher_ckpt, cache_path, tmp_path):
    # the payload is real: loading it without weights_only creates its marker
    probe, probe_marker = tmp_path / "probe.pt", tmp_path / "probe-ran"
    torch.save({"model": {"fc.weight": _Payload(probe_marker)}}, probe)
    torch.load(probe, weights_only=False)
    assert probe_marker.exists()

    evil, marker = tmp_path / "evil.pt", tmp_path / "payload-ran"
    sd = build_model("resnet18", CLASSES).state_dict()
    torch.save({"model": {**sd, "fc.weight": _Payload(marker)}}, evil)
    wrong = tmp_path / "wrong-shape.pt"
    torch.save({**sd, "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}, wrong)
    truncated = tmp_path / "truncated.pt"
    data = teacher_ckpt.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])

    out = tmp_path / "c.zarr"
    for weights, words in ((evil, ["refused", "could run code"]),
                           (wrong, ["wrong shape", "layer1.0.conv1.weight", "(64, 64, 1, 1)"]),
                           (truncated, ["truncated or corrupt"])):
        res = runner.invoke(app, _dump_args(shards, weights, out))
        assert res.exit_code == 2, res.output
        assert all(w in res.output for w in words), res.output
        assert str(weights) in res.output and "Traceback" not in res.output
    for weights, words in ((evil, ["refused", "could run code"]), (truncated, ["truncated or corrupt"])):
        run = tmp_path / f"run-{weights.stem}"
        res = runner.invoke(app, ["train-student", "--shards", _shard_dir(shards), "--cache", str(cache_path),
                                  "--out", str(run), "--live-teacher", str(weights), "--workers", "0", "--epochs", "2",
                                  "--no-progress"])
        assert res.exit_code == 2, res.output
        assert all(w in res.output for w in words), res.output
        assert not run.exists()
    assert not marker.exists(), "the pickled payload ran"
    assert not out.exists()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (8-bit RGB) with a few bytes of pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_image_bomb_is_refused_or_skipped_and_pipe_needs_allow_pipe(shards, teacher_ckpt, tmp_path):
    shard = write_tar(tmp_path / "bomb" / "x.tar", sample_members("a", 1, seed=1)
                      + [("b.png", _png_header(100_000, 100_000)), ("b.cls", b"2")] + sample_members("c", 3, seed=2))
    t0 = time.monotonic()
    with pytest.raises(ShardError) as e:  # a BadSampleError, passed on from the render worker as a ShardError
        dump_teacher(dump_settings({"train": [str(shard)]}, teacher_ckpt, tmp_path / "c.zarr"), progress=False)
    assert time.monotonic() - t0 < 60  # refused from the header, nothing of 30 GB allocated
    assert "x.tar: sample 'b'" in str(e.value) and "decompression bomb" in str(e.value), str(e.value)
    report = dump_teacher(dump_settings({"train": [str(shard)]}, teacher_ckpt, tmp_path / "c.zarr", skip_bad=True),
                          progress=False)
    assert report.complete and report.skipped == 1
    (skipped,) = cache_mod.open_cache(tmp_path / "c.zarr").meta.skipped
    assert (skipped.shard, skipped.key) == ("x.tar", "b") and "decompression bomb" in skipped.reason

    pipe = f"pipe:cat {shards['train'][3]}"
    res = runner.invoke(app, ["dump-teacher", "--shards", pipe, "--weights", str(teacher_ckpt), "--out",
                              str(tmp_path / "p.zarr"), "--arch", "resnet18", "--no-progress"])
    assert res.exit_code == 2 and "--allow-pipe" in res.output, res.output
    res = runner.invoke(app, ["train-student", "--shards", pipe, "--loss", "ce", "--num-classes", "10", "--out",
                              str(tmp_path / "run"), "--no-progress"])
    assert res.exit_code == 2 and "--allow-pipe" in res.output, res.output
    assert not (tmp_path / "p.zarr").exists() and not (tmp_path / "run").exists()
    args = _dump_args(shards, teacher_ckpt, tmp_path / "p.zarr", "--allow-pipe")
    args[args.index("--shards") + 1] = pipe
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    m = cache_mod.open_cache(tmp_path / "p.zarr").meta
    assert [s.name for s in m.manifest.shards] == ["train-000003.tar"] and m.state is cache_meta.CacheState.COMPLETE


@pytest.mark.parametrize("extra, words", [
    (["--chunk-rows", "0"], "chunk_rows"),
    (["--workers", "-1"], "workers"),
    (["--views", "-2"], "views"),
    (["--batch-size", "-16"], "batch_size"),
    (["--image-size", "0"], "image_size"),
    (["--temperature", "0"], "temperature"),
    (["--temperature", "nan"], "temperature"),
    (["--codec", "topk:12+q4"], "k must be < 10"),
    (["--codec", "topk:0"], "topk:0"),
    (["--topk", "11"], "11"),
])
def test_bad_dump_flags_are_refused_before_any_work(shards, teacher_ckpt, tmp_path, extra, words):
    out = tmp_path / "c.zarr"
    res = runner.invoke(app, ["dump-teacher", "--shards", _shard_dir(shards), "--weights", str(teacher_ckpt), "--out",
                              str(out), "--arch", "resnet18", "--no-progress", *extra])
    assert res.exit_code == 2, res.output
    assert words in res.output and "Traceback" not in res.output, res.output
    assert list(tmp_path.iterdir()) == []  # no cache, no lock folder, nothing


def test_dump_output_that_is_or_holds_an_input_shard_is_refused(shards, teacher_ckpt, tmp_path):
    # (a cache beside or below its shards is accepted: tests/test_out_paths.py)
    folder = Path(_shard_dir(shards))
    before = sorted(p.name for p in folder.iterdir())
    for out in (folder, Path(shards["train"][0])):
        res = runner.invoke(app, _dump_args(shards, teacher_ckpt, out))
        assert res.exit_code == 2 and "shard" in res.output, (out, res.output)
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.parametrize("extra, words", [
    (["--epochs", "0"], "epochs"),
    (["--batch-size", "-16"], "batch_size"),
    (["--temperature", "0"], "temperature"),
    (["--temperature", "-2"], "temperature"),
    (["--lr", "0"], "lr"),
    (["--workers", "-1"], "workers"),
    (["--checkpoint-every", "-1"], "checkpoint_every"),
    (["--max-steps", "-1"], "max_steps"),
    (["--warmup-epochs", "-1"], "warmup_epochs"),
])
def test_bad_train_flags_are_refused_before_any_work(shards, cache_path, tmp_path, extra, words):
    run = tmp_path / "run"
    res = runner.invoke(app, ["train-student", "--shards", _shard_dir(shards), "--cache", str(cache_path), "--out",
                              str(run), "--no-progress", *extra])
    assert res.exit_code == 2, res.output
    assert words in res.output and "Traceback" not in res.output, res.output
    assert not run.exists()
