"""Cache.check: typed integrity findings, shown by inspect, used by verify and by train-student's pre-flight."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dkd_cache import cache as cache_mod
from dkd_cache.cli import app
from dkd_cache.train import TrainConfig, train_student

runner = CliRunner()


def _failed(cache: cache_mod.Cache, deep: bool = False) -> set[cache_mod.Check]:
    return {f.check for f in cache.check(deep=deep) if not f.ok and not f.warning}


def test_an_intact_cache_has_no_failed_finding(cache_path):
    findings = cache_mod.open_cache(cache_path).check(deep=True)
    assert {f.check for f in findings} == set(cache_mod.Check)
    assert all(f.ok for f in findings if not f.warning)


def test_each_kind_of_damage_is_its_own_finding(cache_path, tmp_path):
    lost_record = tmp_path / "record.zarr"
    shutil.copytree(cache_path, lost_record)
    (lost_record / "_dkd" / "done" / "000001.json").unlink()
    assert _failed(cache_mod.open_cache(lost_record)) == {cache_mod.Check.RECORDS}

    lost_chunk = tmp_path / "chunk.zarr"
    shutil.copytree(cache_path, lost_chunk)
    (lost_chunk / "logits" / "lse" / "c" / "0" / "1" / "0").unlink()
    assert _failed(cache_mod.open_cache(lost_chunk)) == {cache_mod.Check.CHUNKS_PRESENT}

    flipped = tmp_path / "flipped.zarr"
    shutil.copytree(cache_path, flipped)
    chunk = flipped / "logits" / "target" / "c" / "0" / "2"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert _failed(cache_mod.open_cache(flipped)) == set()  # the fast check reads no logit
    assert cache_mod.Check.CHUNKS_READABLE in _failed(cache_mod.open_cache(flipped), deep=True)


def test_inspect_prints_the_findings_and_fails_on_one(cache_path, tmp_path):
    r = runner.invoke(app, ["inspect", str(cache_path)])
    assert r.exit_code == 0 and "ok      every shard has its done record" in r.output
    bad = tmp_path / "bad.zarr"
    shutil.copytree(cache_path, bad)
    (bad / "_dkd" / "done" / "000001.json").unlink()
    r = runner.invoke(app, ["inspect", str(bad), "--json"])
    assert r.exit_code == 1
    failed = [f["check"] for f in json.loads(r.output)["findings"] if not f["ok"]]
    assert "every shard has its done record" in failed


def test_train_refuses_a_cache_with_a_missing_chunk_before_the_first_step(shards, cache_path, tmp_path):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(cache_path, bad)
    (bad / "logits" / "lse" / "c" / "0" / "3" / "0").unlink()
    run = tmp_path / "run"
    with pytest.raises(cache_mod.CacheError, match="integrity check.*chunk"):
        train_student(TrainConfig(shards=str(Path(shards["train"][0]).parent), cache=str(bad), out=str(run),
                                  epochs=1, batch_size=16, lr_batch=16, workers=0, log_every=1), progress=False)
    assert not (run / "metrics.jsonl").exists()
