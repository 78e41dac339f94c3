"""A learned codec in a cache: fitted once before any row, stored with its hash, reused on resume, checked on use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dkd_cache import cache as cache_mod
from dkd_cache.calibration import calibration_plan
from dkd_cache.cli import app
from dkd_cache.data import ShardIndex
from dkd_cache.dump import dump_teacher
from dkd_cache.errors import CacheMismatchError, ConfigError
from dkd_cache.train import TrainConfig, train_student

from .conftest import dump_settings

SPEC = "lowrank:4+top:4+sparse:2"


def index(name, n, bad=()):
    return ShardIndex(url=name, name=name, keys=tuple(f"{name}-{i}" for i in range(n)), labels=(0,) * n, bad=bad)


def test_calibration_plan_spreads_over_shards_from_their_heads():
    ix = [index("a", 10), index("b", 10), index("c", 2), index("d", 10, bad=((0, "bad"),))]
    plan = calibration_plan(ix, views=5, n=8)
    assert plan == calibration_plan(ix, views=5, n=8)  # a pure function
    assert len(plan) == 8 and len(set(plan)) == 8
    by_shard = {s: sorted(p for sh, p, _ in plan if sh == s) for s in range(4)}
    assert by_shard == {0: [0, 1], 1: [0, 1], 2: [0, 1], 3: [1, 2]}   # heads of shards, never the bad sample
    assert [v for _, _, v in plan] == [j % 5 for j in range(8)]         # one view per sample, views rotate
    # more views wanted than samples: several views per sample, never more than exist
    small = calibration_plan([index("a", 3)], views=4, n=10)
    assert len(small) == 10 and len(set(small)) == 10
    assert len(calibration_plan([index("a", 3)], views=2, n=100)) == 6
    with pytest.raises(ConfigError):
        calibration_plan(ix, views=5, n=0)


def _cache(shards, teacher_ckpt, out, **kw):
    return dump_teacher(dump_settings(shards, teacher_ckpt, out, codec=SPEC, views=1, **kw), progress=False)


def test_basis_is_recorded_reused_on_resume_and_checked(shards, teacher_ckpt, tmp_path):
    out = tmp_path / "lr.zarr"
    _cache(shards, teacher_ckpt, out)
    cache = cache_mod.open_cache(out)
    rec = cache.meta.codec.record
    # fewer samples than asked for: all of them, every fourth held out to score the fit, never fitted on
    fid = cache.meta.fidelity
    assert fid.fit_views + fid.scored_views == shards["train_samples"] and fid.scored_views == shards["train_samples"] // 4
    assert rec["calibration_views"] == fid.fit_views and fid.codec == SPEC
    codec = cache.codec
    assert codec.basis.sha256 == rec["sha256"] and codec.name == SPEC
    before = {n: np.asarray(cache.group[f"codec/{n}"][...]) for n in ("mean", "basis", "mult")}
    coef_before = cache.read_rows("logits/coef", 0, cache.meta.manifest.rows, view=0)

    # an interrupted dump: two shards lose their records; the rerun (asking for another calibration size) must
    # complete them with the stored basis, never refit
    for shard in (0, 2):
        cache.location.delete(cache.done_key(shard))
    report = _cache(shards, teacher_ckpt, out, calibration_views=7)
    assert report.complete and report.shards_done == 2
    again = cache_mod.open_cache(out)
    assert again.meta.codec == cache.meta.codec
    for n, v in before.items():
        assert np.array_equal(np.asarray(again.group[f"codec/{n}"][...]), v)
    assert np.array_equal(again.read_rows("logits/coef", 0, again.meta.manifest.rows, view=0), coef_before)

    # a basis changed after the dump is refused by training and by verify
    arr = cache_mod.open_cache(out, mode="r+").group["codec/basis"]
    tampered = np.asarray(arr[...]).copy()
    tampered[0, 0] ^= 1
    arr[...] = tampered
    with pytest.raises(CacheMismatchError, match="SHA-256"):
        _ = cache_mod.open_cache(out).codec
    with pytest.raises(CacheMismatchError, match="SHA-256"):
        train_student(TrainConfig(shards=str(Path(shards["train"][0]).parent), cache=str(out),
                                  out=str(tmp_path / "run"), epochs=1, batch_size=16, workers=0, max_steps=1),
                      progress=False)
    r = CliRunner().invoke(app, ["verify", "--cache", str(out), "--shards", str(Path(shards["train"][0]).parent),
                                 "--weights", str(teacher_ckpt), "--samples", "8"])
    assert r.exit_code == 2 and "SHA-256" in r.output, r.output


def test_other_codec_on_rerun_is_refused(shards, teacher_ckpt, tmp_path):
    out = tmp_path / "lr.zarr"
    _cache(shards, teacher_ckpt, out)
    with pytest.raises(CacheMismatchError, match="codec"):
        dump_teacher(dump_settings(shards, teacher_ckpt, out, codec="lowrank:3+top:4+sparse:2", views=1),
                     progress=False)
    info = json.loads((out / "zarr.json").read_text())["attributes"]["dkd_cache"]["codec"]
    assert info["rank"] == 4
