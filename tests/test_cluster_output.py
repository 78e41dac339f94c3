"""What a user reads in a Slurm or nohup log (stdout not a terminal), and what a run leaves behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dkd_cache.cli import app
from dkd_cache.dump import dump_teacher

from .conftest import dump_settings

runner = CliRunner()


def test_train_prints_progress_lines_and_validation_when_stdout_is_a_file(shards, cache_path, tmp_path):
    r = runner.invoke(app, ["train-student", "--shards", str(Path(shards["train"][0]).parent), "--cache",
                            str(cache_path), "--out", str(tmp_path / "run"), "--epochs", "2", "--batch-size", "16",
                            "--lr", "0.1", "--lr-batch", "32", "--workers", "0", "--log-every", "2",
                            "--val-shards", str(Path(shards["val"][0]).parent)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    steps = [line for line in lines if re.match(r"epoch \d/2 +step \d+/5 ", line)]
    assert len(steps) >= 4, r.output  # every 2 steps, both epochs
    for line in steps:
        assert "img/s" in line and "loss " in line and "ETA " in line and "lr 0.05 " in line + " "
    assert lines[0].startswith("lr 0.05 (= --lr 0.1 x batch 16 / --lr-batch 32)")
    assert len([line for line in lines if "val top-1" in line]) == 2
    summary = json.loads(lines[-1])
    assert summary["lr"] == pytest.approx(0.05) and "rank" not in summary
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {x["lr"] for x in records if x["event"] == "step"} == {0.05}  # the lr shown is the one used


def test_dump_prints_progress_lines_and_one_summary_when_stdout_is_a_file(shards, teacher_ckpt, tmp_path):
    out = tmp_path / "c.zarr"
    r = runner.invoke(app, ["dump-teacher", "--shards", str(Path(shards["train"][0]).parent), "--weights",
                            str(teacher_ckpt), "--out", str(out), "--arch", "resnet18", "--views", "1", "--codec",
                            "topk:4", "--image-size", "32", "--batch-size", "16", "--workers", "0",
                            "--chunk-rows", "8", "--log-every", "2"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    pattern = (r"dump-teacher  (\d+)/80 views \((\d+)%\)  [\d.]+ views/s  ETA \d+:\d\d:\d\d  "
               r"shard (train-\d+\.tar), (\d)/4 shards written")
    summary = next(i for i, line in enumerate(lines) if line.startswith("dumped "))
    progress = [re.fullmatch(pattern, line) for line in lines[:summary]]
    assert all(progress), r.output  # nothing else is printed before the summary
    # 80 samples x 1 view in batches of 16 cut within a shard (25 -> 16 + 9, 5 -> 5): 7 batches, a line every 2
    # and one at the end
    assert [int(m[1]) for m in progress] == [25, 50, 75, 80], r.output
    assert [m[3] for m in progress] == [f"train-00000{i}.tar" for i in range(4)]
    assert [int(m[4]) for m in progress] == [1, 2, 3, 4]
    assert progress[-1][2] == "100"
    assert lines[summary].startswith("dumped 80 views of 80 samples in ") and "cache complete" in lines[summary]
    # then the codec and its held-out fidelity, and nothing else
    assert [line.split(";")[0] for line in lines[summary + 1:]] == ["codec topk:4"], r.output


def test_no_lock_folder_is_left_after_a_dump_ends_or_fails(shards, teacher_ckpt, tmp_path):
    out = tmp_path / "c.zarr"
    dump_teacher(dump_settings(shards, teacher_ckpt, out, views=1), progress=False)
    assert not (tmp_path / ".c.zarr.locks").exists()
    with pytest.raises(Exception):
        dump_teacher(dump_settings(shards, teacher_ckpt, out, views=2), progress=False)  # other settings: refused
    assert not (tmp_path / ".c.zarr.locks").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr", "c.zarr.scan"]  # the cache, its scan records
