"""The Typer app: commands parse options, call the library, and turn typed errors into exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from dkd_cache.cli import app

runner = CliRunner()


def test_make_shards_then_inspect(tmp_path, cache_path):
    r = runner.invoke(app, ["make-shards", str(tmp_path / "d"), "--classes", "3", "--train-per-class", "2",
                            "--val-per-class", "1", "--shard-size", "4", "--writer", "tar"])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "d" / "train").glob("*.tar"))) == 2
    r = runner.invoke(app, ["inspect", str(cache_path), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["state"] == "complete" and info["views"] == 2 and info["bytes_per_view"] > 0
    assert "bytes per view" in runner.invoke(app, ["inspect", str(cache_path)]).output


def test_dump_cli_refuses_bad_flags_before_work(tmp_path, shards, teacher_ckpt):
    base = ["dump-teacher", "--shards", str(Path(shards["train"][0]).parent), "--weights", str(teacher_ckpt),
            "--out", str(tmp_path / "c.zarr"), "--arch", "resnet18", "--no-progress"]
    for extra, words in ((["--views", "0"], "views"), (["--temperature", "-1"], "temperature"),
                         (["--batch-size", "0"], "batch_size"), (["--topk", "11"], "11"),
                         (["--image-size", "-3"], "image_size")):
        r = runner.invoke(app, base + extra)
        assert r.exit_code == 2, (extra, r.output)
        assert words in r.output, (extra, r.output)
    assert not (tmp_path / "c.zarr").exists()


def test_dump_cli_config_with_unknown_key_is_refused(tmp_path, shards, teacher_ckpt):
    cfg = tmp_path / "x.toml"
    cfg.write_text("[dump]\nviewz = 3\n")
    r = runner.invoke(app, ["dump-teacher", "--shards", shards["train"][0], "--weights", str(teacher_ckpt),
                            "--out", str(tmp_path / "c.zarr"), "--config", str(cfg)])
    assert r.exit_code == 2 and "viewz" in r.output


def test_train_cli_errors_are_clear(tmp_path, shards, cache_path):
    r = runner.invoke(app, ["train-student", "--shards", shards["train"][0], "--out", str(tmp_path / "run"),
                            "--no-progress"])
    assert r.exit_code == 2 and "--cache" in r.output  # dkd needs a cache or a live teacher
    r = runner.invoke(app, ["train-student", "--shards", str(tmp_path / "missing-*.tar"), "--cache", str(cache_path),
                            "--out", str(tmp_path / "run"), "--no-progress"])
    assert r.exit_code == 2 and "matched no files" in r.output
