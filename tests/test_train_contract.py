"""What train-student promises a user: skipped samples stay out, partial batches never crash, resume is exact or
refused, inputs are validated before the first step, metrics.jsonl matches the checkpoint."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dkd_cache.cli import app
from dkd_cache.dump import dump_teacher
from dkd_cache.errors import CacheMismatchError, ConfigError, ShardNotFoundError
from dkd_cache.checkpoint import read_checkpoint
from dkd_cache.train import TrainConfig, train_student

from .conftest import dump_settings
from .helpers import sample_members, write_tar


def _cfg(shards, out, **kw) -> TrainConfig:
    base = dict(shards=str(Path(shards["train"][0]).parent), out=str(out), arch="resnet18", epochs=2, batch_size=16,
                lr=0.05, lr_batch=16, workers=0, lr_milestones=(1,), shuffle_buffer=16)
    base.update(kw)
    return TrainConfig(**base)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _small_dataset(tmp_path, teacher_ckpt, n_good: int, bad: int = 0, **dump_kw):
    members = []
    for i in range(n_good + bad):
        if i < bad:  # one the shard scan finds (a label that is no number), one only decoding finds
            members += sample_members(f"s{i:03d}", "cat", seed=i) if i % 2 == 0 else \
                sample_members(f"s{i:03d}", i % 10, image=b"not an image")
        else:
            members += sample_members(f"s{i:03d}", i % 10, seed=i)
    shard = write_tar(tmp_path / "shards" / "train-000000.tar", members)
    cache = tmp_path / "c.zarr"
    dump_teacher(dump_settings({"train": [str(shard)]}, teacher_ckpt, cache, **dump_kw), progress=False)
    return shard, cache


def test_a_cache_dumped_with_skip_bad_trains_without_the_skipped_samples(tmp_path, teacher_ckpt):
    shard, cache = _small_dataset(tmp_path, teacher_ckpt, n_good=12, bad=2, skip_bad=True)
    r = train_student(TrainConfig(shards=str(shard), out=str(tmp_path / "run"), cache=str(cache), epochs=1,
                                  batch_size=4, lr_batch=4, workers=0, shuffle_buffer=4), progress=False)
    assert r["samples"] == 12 and r["rank_steps"] == [3]


def test_a_ce_run_without_a_cache_names_a_label_outside_num_classes_and_how_to_leave_such_samples_out(tmp_path):
    members = [m for i in range(8) for m in sample_members(f"s{i:03d}", i % 4, seed=i)]
    shard = write_tar(tmp_path / "shards" / "train-000000.tar", members + sample_members("s999", 12, seed=9))
    r = CliRunner().invoke(app, ["train-student", "--shards", str(shard), "--out", str(tmp_path / "run"), "--loss",
                                 "ce", "--num-classes", "10", "--epochs", "1", "--batch-size", "4", "--workers", "0",
                                 "--no-progress"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "train-000000.tar: sample 's999': label 12 is outside the 10 classes of --num-classes" in r.output
    # no teacher in a CE run, and no --skip-bad in train-student: the way to leave samples out is the dump's
    assert "teacher's classes" not in r.output and "rerun with --skip-bad" not in r.output, r.output
    assert "--num-classes" in r.output and "dump-teacher --skip-bad" in r.output, r.output
    assert not (tmp_path / "run").exists()  # refused before any work


def test_a_last_batch_of_one_sample_is_dropped_and_reported_not_a_crash(tmp_path, teacher_ckpt):
    shard, cache = _small_dataset(tmp_path, teacher_ckpt, n_good=9)
    r = train_student(TrainConfig(shards=str(shard), out=str(tmp_path / "run"), cache=str(cache), epochs=2,
                                  batch_size=8, lr_batch=8, workers=0, shuffle_buffer=4), progress=False)
    epochs = [x for x in _records(tmp_path / "run") if x["event"] == "epoch"]
    assert [e["steps"] for e in epochs] == [1, 1] and [e["dropped"] for e in epochs] == [1, 1]
    assert [e["samples"] for e in epochs] == [8, 8]
    assert r["epoch"] == 1  # both epochs finished; a resume starts at epoch 2
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 2


def test_an_image_whose_size_differs_from_the_dump_is_named(tmp_path, teacher_ckpt):
    shard, cache = _small_dataset(tmp_path, teacher_ckpt, n_good=8)
    # the same keys and labels, one image re-encoded at another size
    members = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            if m.name == "s005.jpg":
                buf = io.BytesIO()
                Image.open(io.BytesIO(data)).resize((60, 30)).save(buf, format="JPEG")
                data = buf.getvalue()
            members.append((m.name, data))
    write_tar(shard, members)
    with pytest.raises(CacheMismatchError, match=r"s005.*30x60.*40x50|s005.*size"):
        train_student(TrainConfig(shards=str(shard), out=str(tmp_path / "run"), cache=str(cache), epochs=1,
                                  batch_size=4, lr_batch=4, workers=0, shuffle_buffer=4), progress=False)


def test_resume_mid_epoch_with_other_workers_is_refused_with_how_to_continue(shards, cache_path, tmp_path):
    run = tmp_path / "run"
    train_student(_cfg(shards, run, cache=str(cache_path), workers=2, max_steps=3), progress=False)
    with pytest.raises(ConfigError, match=r"--workers 2") as e:
        train_student(_cfg(shards, run, cache=str(cache_path), workers=1), resume=True, progress=False)
    assert "mid-epoch" in str(e.value) or "middle of epoch" in str(e.value)
    # with the recorded number it continues, and finishing the epoch frees the choice for the next one
    train_student(_cfg(shards, run, cache=str(cache_path), workers=2, epochs=1), resume=True, progress=False)
    r = train_student(_cfg(shards, run, cache=str(cache_path), workers=1, epochs=2), resume=True, progress=False)
    assert r["epoch"] == 1


def test_val_shards_are_checked_before_the_first_step_and_may_change_on_resume(shards, cache_path, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ShardNotFoundError):
        train_student(_cfg(shards, run, cache=str(cache_path), val_shards=str(tmp_path / "nope-*.tar")),
                      progress=False)
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoint.pt").exists()
    train_student(_cfg(shards, run, cache=str(cache_path), max_steps=2), progress=False)
    val = str(Path(shards["val"][0]).parent)
    r = train_student(_cfg(shards, run, cache=str(cache_path), epochs=1, val_shards=val), resume=True,
                      progress=False)
    assert r["val_samples"] == shards["val_samples"]


def test_metrics_after_resume_match_the_checkpoint_and_carry_a_timestamp(shards, cache_path, tmp_path):
    run = tmp_path / "run"
    train_student(_cfg(shards, run, cache=str(cache_path), max_steps=3, log_every=1), progress=False)
    train_student(_cfg(shards, run, cache=str(cache_path), max_steps=4, log_every=1), resume=True, progress=False)
    train_student(_cfg(shards, run, cache=str(cache_path), log_every=1), resume=True, progress=False)
    recs = _records(run)
    steps = [x["step"] for x in recs if x["event"] == "step"]
    assert steps == list(range(1, len(steps) + 1))  # each step once, in order
    epochs = [x["epoch"] for x in recs if x["event"] == "epoch"]
    assert epochs == [0, 1]  # the partial epoch records of the stopped runs were replaced
    times = [x["time"] for x in recs]
    assert all(isinstance(t, float) for t in times) and times == sorted(times)


def test_eval_every_validates_every_nth_epoch_and_always_the_last(shards, cache_path, tmp_path):
    val = str(Path(shards["val"][0]).parent)
    run = tmp_path / "run"
    r = train_student(_cfg(shards, run, cache=str(cache_path), epochs=3, eval_every=2, val_shards=val, max_steps=0),
                      progress=False)
    validated = [e["epoch"] for e in _records(run) if e["event"] == "epoch" and "val_top1" in e]
    assert validated == [1, 2] and r["val_samples"] == shards["val_samples"]
    with pytest.raises(ConfigError, match="eval_every"):
        _cfg(shards, run, eval_every=0)


def test_tensorboard_scalars_mirror_the_metrics_and_a_resume_purges_what_it_replays(shards, cache_path, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    val = str(Path(shards["val"][0]).parent)
    run = tmp_path / "run"
    train_student(_cfg(shards, run, cache=str(cache_path), epochs=2, val_shards=val, log_every=1, max_steps=3,
                       tensorboard=True), progress=False)
    train_student(_cfg(shards, run, cache=str(cache_path), epochs=2, val_shards=val, log_every=1, tensorboard=True),
                  resume=True, progress=False)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    steps = {r["step"]: r for r in _records(run) if r["event"] == "step"}
    events = acc.Scalars("train/loss")
    assert sorted(e.step for e in events) == sorted(steps)  # every step once, though steps after the checkpoint ran twice
    logged = {e.step: e.value for e in events}
    assert all(abs(logged[s] - steps[s]["loss"]) < 1e-6 * max(1.0, abs(steps[s]["loss"])) for s in steps)
    final = [r for r in _records(run) if r["event"] == "epoch"][-1]
    assert abs(acc.Scalars("val/top1")[-1].value - final["val_top1"]) < 1e-6


def test_wait_seconds_config_is_validated_and_a_resume_may_change_it_or_lack_it(shards, cache_path, tmp_path):
    for bad in (0, -1.0, float("inf"), float("nan"), "soon", True):
        with pytest.raises(ConfigError, match="wait_seconds"):
            _cfg(shards, tmp_path / "x", cache=str(cache_path), wait_seconds=bad)
    assert _cfg(shards, tmp_path / "x", cache=str(cache_path)).wait_seconds == 14400.0
    run = tmp_path / "run"
    train_student(_cfg(shards, run, cache=str(cache_path), max_steps=2, wait_seconds=60), progress=False)
    assert json.loads((run / "config.json").read_text())["wait_seconds"] == 60.0
    # a checkpoint saved before the setting existed has no such key: it resumes, with any value
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    del ckpt["config"]["wait_seconds"]
    torch.save(ckpt, run / "checkpoint.pt")
    train_student(_cfg(shards, run, cache=str(cache_path), max_steps=3, wait_seconds=30), resume=True,
                  progress=False)
    assert json.loads((run / "config.json").read_text())["wait_seconds"] == 30.0
