"""What a new user meets on a wrong path, a wrong checkpoint or an unquoted glob: a named error and a hint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dkd_cache import cache as cache_mod
from dkd_cache.cli import app
from dkd_cache.errors import CheckpointError
from dkd_cache.teacher import build_model, load_teacher

runner = CliRunner()


def test_inspect_and_verify_given_a_shard_or_a_plain_file_say_what_it_is(shards, teacher_ckpt, tmp_path):
    shard = shards["train"][0]
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for path in (shard, str(text)):
        with pytest.raises(cache_mod.CacheError, match="is a file, not a cache"):
            cache_mod.open_cache(path)
        r = runner.invoke(app, ["inspect", path])
        assert r.exit_code == 2 and "not a cache" in r.output and "Traceback" not in r.output
        r = runner.invoke(app, ["verify", "--cache", path, "--shards", str(Path(shard).parent),
                                "--weights", str(teacher_ckpt)])
        assert r.exit_code == 2 and "not a cache" in r.output, r.output
    r = runner.invoke(app, ["inspect", shard])
    assert "--shards" in r.output  # a shard: where it belongs


def test_weights_of_another_resnet_depth_are_named(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "r18.pth"
    torch.save(build_model("resnet18", 10).state_dict(), path)
    with pytest.raises(CheckpointError, match="look like resnet18"):
        load_teacher("resnet34", path)


def test_an_unquoted_glob_gets_the_hint_to_quote_it(shards, tmp_path):
    many = [str(p) for p in sorted(Path(shards["train"][0]).parent.glob("*.tar"))]
    r = runner.invoke(app, ["train-student", "--shards", *many, "--out", str(tmp_path / "run")])
    assert r.exit_code != 0 and "quote" in r.output and "'" in r.output, r.output
