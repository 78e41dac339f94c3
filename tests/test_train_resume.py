"""--resume knows its data by content: the same data however it is spelled resumes, other data behind the same
spelling is refused naming what changed; a resumed run equals an uninterrupted one bit for bit, also with dropout
and with DataLoader workers, and its metrics count whole epochs."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from dkd_cache.checkpoint import read_checkpoint
from dkd_cache.dump import dump_teacher
from dkd_cache.errors import ResumeMismatchError
from dkd_cache.train import TrainConfig, train_student

from .conftest import dump_settings


def cfg(shards: str, out, cache, **kw) -> TrainConfig:
    base = dict(shards=shards, out=str(out), cache=str(cache), arch="resnet18", epochs=2, batch_size=16, lr=0.05,
                lr_batch=16, workers=0, lr_milestones=(1,), shuffle_buffer=16)
    base.update(kw)
    return TrainConfig(**base)


def weights(run: Path) -> dict:
    return read_checkpoint(run / "checkpoint.pt")["model"]


def epoch_records(run: Path) -> list[dict]:
    keep = ("epoch", "epochs", "steps", "rank_steps", "samples", "padding", "dropped", "image_size")
    return [{k: r[k] for k in keep} for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["event"] == "epoch"]


def test_the_same_data_spelled_otherwise_resumes(shards, cache_path, tmp_path, monkeypatch):
    folder = Path(shards["train"][0]).parent
    names = sorted(p.name for p in folder.glob("*.tar"))
    brace = f"{folder}/{{{','.join(names)}}}"
    run = tmp_path / "run"
    train_student(cfg(brace, run, cache_path, max_steps=3), progress=False)
    # a glob for the brace list, the cache as ./cache.zarr, --out relative to another working directory
    monkeypatch.chdir(cache_path.parent)
    relative_out = os.path.relpath(run, cache_path.parent)
    train_student(cfg(str(folder / "*.tar"), relative_out, "./" + cache_path.name, max_steps=7), resume=True,
                  progress=False)
    # the folder itself, the cache by a path with a trailing slash
    train_student(cfg(str(folder), run, str(cache_path) + "/"), resume=True, progress=False)
    assert read_checkpoint(run / "checkpoint.pt")["step"] == 10


def test_a_shard_added_behind_the_same_glob_is_refused_naming_it(shards, cache_path, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    train_shards = sorted(Path(shards["train"][0]).parent.glob("*.tar"))
    for p in train_shards[:3]:
        shutil.copy(p, folder)
    run = tmp_path / "run"
    pattern = str(folder / "*.tar")
    train_student(cfg(pattern, run, cache_path, max_steps=2), progress=False)
    shutil.copy(train_shards[3], folder)  # in the cache's manifest, so the cache check alone accepts it
    with pytest.raises(ResumeMismatchError, match=f"shards added: \\['{train_shards[3].name}'\\]"):
        train_student(cfg(pattern, run, cache_path), resume=True, progress=False)
    assert read_checkpoint(run / "checkpoint.pt")["step"] == 2  # nothing was trained on the other data


def test_a_cache_redumped_in_place_with_another_seed_is_refused_naming_the_seed(shards, teacher_ckpt, cache_path,
                                                                                tmp_path):
    cache = tmp_path / "c.zarr"
    shutil.copytree(cache_path, cache)
    train_shards = str(Path(shards["train"][0]).parent)
    run = tmp_path / "run"
    train_student(cfg(train_shards, run, cache, max_steps=2), progress=False)
    shutil.rmtree(cache)
    dump_teacher(dump_settings(shards, teacher_ckpt, cache, seed=1), progress=False)
    with pytest.raises(ResumeMismatchError, match="cache seed: 0 -> 1"):
        train_student(cfg(train_shards, run, cache), resume=True, progress=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_student_with_dropout_equals_the_uninterrupted_one_and_counts_whole_epochs(shards, cache_path,
                                                                                           tmp_path, workers):
    # mobilenet_v3_small has dropout before its last layer: a resume that did not restore the random state would
    # drop other units than the uninterrupted run did
    train_shards = str(Path(shards["train"][0]).parent)
    base = cfg(train_shards, tmp_path / "full", cache_path, arch="mobilenet_v3_small", workers=workers)
    assert any(isinstance(m, torch.nn.Dropout) for m in
               __import__("dkd_cache.teacher", fromlist=["build_model"]).build_model(base.arch, 10).modules())
    train_student(base, progress=False)
    part = tmp_path / "part"
    train_student(dataclasses.replace(base, out=str(part), max_steps=3), progress=False)  # stops in epoch 0
    train_student(dataclasses.replace(base, out=str(part), max_steps=7), resume=True, progress=False)  # in epoch 1
    train_student(dataclasses.replace(base, out=str(part)), resume=True, progress=False)
    a, b = weights(tmp_path / "full"), weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # each resumed epoch's record counts the whole epoch (5 steps, 80 samples), as the uninterrupted run's does
    assert epoch_records(part) == epoch_records(tmp_path / "full")
    assert [r["rank_steps"] for r in epoch_records(part)] == [[5], [5]]
