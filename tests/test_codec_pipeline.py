"""Every codec: a cache made with it dumps, trains (exact full-logit DKD where it decodes full) and verifies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dkd_cache.cli import app
from dkd_cache.dump import dump_teacher
from dkd_cache.train import TrainConfig, train_student

from .conftest import dump_settings


@pytest.mark.parametrize("codec", ["topk:3+q2", "topk:3+q4", "q8", "fp16", "fp32", "lowrank:4+top:4+sparse:2"])
def test_codec_cache_dumps_trains_and_verifies(codec, shards, teacher_ckpt, tmp_path):
    cache = tmp_path / "c.zarr"
    report = dump_teacher(dump_settings(shards, teacher_ckpt, cache, codec=codec, views=1), progress=False)
    assert report.complete and report.views_written == shards["train_samples"]
    result = train_student(TrainConfig(shards=str(Path(shards["train"][0]).parent), cache=str(cache),
                                       out=str(tmp_path / "run"), epochs=1, batch_size=16, lr=0.05, lr_batch=16,
                                       workers=0, max_steps=2, temperature=4.0), progress=False)
    assert result["dkd"] > 0
    r = CliRunner().invoke(app, ["verify", "--cache", str(cache), "--shards", str(Path(shards["train"][0]).parent),
                                 "--weights", str(teacher_ckpt), "--samples", "16", "--json", str(tmp_path / "v.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "v.json").read_text())["passed"] is True
