"""Held-out codec fidelity recorded at dump time, coverage-aware calibration, --codec auto."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dkd_cache import cache as cache_mod
from dkd_cache import codec_fidelity as cf
from dkd_cache.calibration import calibration_plan
from dkd_cache.cache_meta import CacheMeta
from dkd_cache.cli import app
from dkd_cache.data import ShardIndex
from dkd_cache.dump import dump_teacher
from dkd_cache.errors import CacheMetadataError, ConfigError
from dkd_cache.inspect import describe, fidelity_lines, render_text
from dkd_cache.logit_codecs import parse_codec

from .conftest import CLASSES, dump_settings
from .helpers import sample_members, write_tar

runner = CliRunner()


def sorted_shards(tmp_path, shards: int = 5, per_class: int = 4) -> str:
    """Shards written from class folders (`tar --sort=name`): shard i holds classes 2i and 2i + 1 only."""
    folder = tmp_path / "sorted"
    for i in range(shards):
        members = []
        for c in (2 * i, 2 * i + 1):
            for j in range(per_class):
                members += sample_members(f"c{c:02d}-{j}", c, seed=100 * c + j)
        write_tar(folder / f"train-{i:03d}.tar", members)
    return str(folder)


def test_calibration_plan_covers_every_class_of_class_sorted_shards():
    labels = [tuple(sorted([2 * i] * 4 + [2 * i + 1] * 4)) for i in range(5)]
    ix = [ShardIndex(url=f"s{i}", name=f"s{i}", keys=tuple(f"s{i}-{j}" for j in range(8)), labels=labels[i], bad=())
          for i in range(5)]
    plan = calibration_plan(ix, views=1, n=10)
    assert {ix[s].labels[p] for s, p, _ in plan} == set(range(10))  # the head of each shard would give 5 classes
    assert all(p < 8 for _, p, _ in plan) and plan == calibration_plan(ix, views=1, n=10)


def structured(n: int, c: int = 40, rank: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, rank, generator=g) @ torch.randn(rank, c, generator=g)) * 2
    return z, z.argmax(dim=1)


def sample_of(z, y, temperatures=(1.0,), beta=0.5) -> cf.Sample:
    return cf.Sample(fit=z[:300], scored=z[300:], scored_labels=y[300:], classes_seen=40, temperatures=temperatures,
                     alpha=1.0, beta=beta)


def test_held_out_scores_separate_good_and_poor_codecs_and_round_trip():
    z, y = structured(400)
    good = cf.fit_and_score(parse_codec("lowrank:8+top:4+sparse:2", 40), sample_of(z, y, (1.0, 4.0)))[1]
    poor = cf.fit_and_score(parse_codec("topk:2", 40), sample_of(z, y, (1.0, 4.0)))[1]
    assert good.fit_views == 300 and good.scored_views == 100 and good.meets()
    assert not poor.meets() and poor.rule == "uniform" and poor.fit_views == 0
    assert {(s.temperature, s.student) for s in good.scores} == {(t, s) for t in (1.0, 4.0) for s in cf.STUDENTS}
    assert good.covers(4.0, 0.5) and not good.covers(4.0, 8.0) and not good.covers(2.0, 0.5)
    assert cf.parse_fidelity(json.loads(json.dumps(good.to_dict()))) == good
    with pytest.raises(ConfigError, match="scores"):
        cf.parse_fidelity({**good.to_dict(), "scores": [{"temperature": 1.0}]})


def test_auto_takes_the_smallest_codec_meeting_the_bar_and_says_why():
    z, y = structured(400)
    codec, fid = cf.choose_auto(sample_of(z, y, (1.0, 4.0)), ("topk:2", "lowrank:8+top:4+sparse:2", "q8"))
    assert codec.name == "lowrank:8+top:4+sparse:2" and fid.meets() and codec.basis is not None
    assert fid.choice.startswith("auto: lowrank:8+top:4+sparse:2") and "topk:2 (median" in fid.choice
    # nothing meets the bar: the exact fallback, with every failure named
    codec, fid = cf.choose_auto(sample_of(z, y), ("topk:1",))
    assert codec.name == "fp32" and "no candidate meets" in fid.choice and "topk:1" in fid.choice
    # a rank above the fit views is skipped and said so, never fitted at a lower rank
    small = cf.Sample(fit=z[:4], scored=z[300:], scored_labels=y[300:], classes_seen=4, temperatures=(1.0,),
                      alpha=1.0, beta=0.5)
    codec, fid = cf.choose_auto(small, ("lowrank:8+top:4", "q8"))
    assert codec.name == "q8" and "rank 8 needs as many fit views, has 4" in fid.choice


def test_dump_records_held_out_fidelity_on_class_sorted_shards(tmp_path, teacher_ckpt):
    shards = {"train": [sorted_shards(tmp_path) + "/x"]}
    out = tmp_path / "c.zarr"
    with warnings.catch_warnings(record=True) as seen:  # 20 calibration samples of 40: every class seen, no warning
        warnings.simplefilter("always")
        report = dump_teacher(dump_settings(shards, teacher_ckpt, out, codec="lowrank:4+top:4+sparse:2", views=1,
                                            calibration_views=20), progress=False)
    assert not [w for w in seen if "classes" in str(w.message)]
    fid = cache_mod.open_cache(out).meta.fidelity
    assert fid.classes_seen == CLASSES and fid.fit_views == 15 and fid.scored_views == 5
    assert fid.temperatures() == (1.0, 4.0) and (fid.alpha, fid.beta) == (1.0, 0.5)
    assert "T=4" in report.fidelity and report.codec == "lowrank:4+top:4+sparse:2"
    text = render_text(describe(out))
    assert "classes seen 10/10" in text and "T=4" in text and "gradient cosine median" in text

    # too few views for the rank: a named error, never a silently lower rank
    res = runner.invoke(app, ["dump-teacher", "--shards", shards["train"][0][:-2], "--weights", str(teacher_ckpt),
                              "--out", str(tmp_path / "low.zarr"), "--arch", "resnet18", "--views", "1",
                              "--image-size", "32", "--workers", "0", "--codec", "lowrank:4+top:4",
                              "--calibration-views", "4", "--no-progress"])
    assert res.exit_code == 2 and "rank-4 basis needs at least 4 fit views" in res.output, res.output
    # a calibration sample that misses classes warns and records how many it saw
    with pytest.warns(UserWarning, match=r"fit views hold \d of the teacher's 10 classes"):
        dump_teacher(dump_settings(shards, teacher_ckpt, tmp_path / "few.zarr", codec="q8", views=1,
                                   calibration_views=6), progress=False)
    assert cache_mod.open_cache(tmp_path / "few.zarr").meta.fidelity.classes_seen < CLASSES


def test_a_cache_without_recorded_fidelity_still_opens(cache_path):
    meta = cache_mod.open_cache(cache_path).meta
    old = meta.to_dict()
    old.pop("fidelity", None)
    back = CacheMeta.from_dict(old, where="old")
    assert back.fidelity is None and "fidelity" not in back.to_dict()
    assert "not recorded" in "\n".join(fidelity_lines(None))
    with pytest.raises(CacheMetadataError, match="fidelity"):
        CacheMeta.from_dict({**old, "fidelity": {"codec": "q8"}}, where="bad")


def test_recipe_problem_names_what_the_recorded_fidelity_does_not_vouch_for():
    z, y = structured(400)
    codec, good = cf.fit_and_score(parse_codec("lowrank:8+top:4+sparse:2", 40), sample_of(z, y, (1.0, 4.0)))
    assert cf.recipe_problem(good, codec, 4.0, 0.5) is None
    assert "not at T=4, beta 8" in cf.recipe_problem(good, codec, 4.0, 8.0)
    assert "not at T=2, beta 0.5" in cf.recipe_problem(good, codec, 2.0, 0.5)
    assert "no recorded fidelity" in cf.recipe_problem(None, codec, 1.0, 0.5)
    assert cf.recipe_problem(None, parse_codec("fp32", 40), 3.0, 8.0) is None  # exact: nothing to vouch for
    topk, poor = cf.fit_and_score(parse_codec("topk:2", 40), sample_of(z, y))
    assert "below the bar" in cf.recipe_problem(poor, topk, 1.0, 0.5)


def test_train_student_warns_and_with_strict_refuses_an_unvouched_recipe(cache_path, shards, tmp_path):
    from dkd_cache import train_setup
    from dkd_cache.dist import DistInfo
    from dkd_cache.train_config import TrainConfig

    def config(**kw):
        return TrainConfig(out=str(tmp_path / "run"), cache=str(cache_path), epochs=1, batch_size=16, workers=0, **kw)

    shard_dir = str(Path(shards["train"][0]).parent)
    fid = cache_mod.open_cache(cache_path).meta.fidelity
    assert fid.covers(4.0, 0.5) and not fid.covers(4.0, 8.0)  # the fixture dump measured T = 1, 4 at beta 0.5
    cfg = dict(shards=shard_dir, temperature=4.0, beta=8.0)
    with pytest.warns(UserWarning, match=r"not at T=4, beta 8.*--strict refuses"):
        train_setup.resolve_data(config(**cfg), DistInfo())
    with pytest.raises(ConfigError, match=r"--strict: .*not at T=4, beta 8"):
        train_setup.resolve_data(config(**cfg, strict=True), DistInfo())


def test_dump_defaults_to_auto_says_what_it_chose_and_a_rerun_keeps_it(tmp_path, teacher_ckpt):
    folder = sorted_shards(tmp_path, shards=2)
    out = tmp_path / "auto.zarr"
    args = ["dump-teacher", "--shards", folder, "--weights", str(teacher_ckpt), "--out", str(out), "--arch",
            "resnet18", "--views", "1", "--image-size", "32", "--workers", "0", "--temperature", "1",
            "--temperature", "4", "--no-progress"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    meta = cache_mod.open_cache(out).meta
    assert meta.fidelity.choice.startswith(f"auto: {meta.codec.name}") and meta.fidelity.codec == meta.codec.name
    assert f"codec {meta.codec.name}; fidelity held out" in res.output and "auto: " in res.output
    assert meta.fidelity.meets() or meta.codec.name == "fp32"  # the bar at T = 1 and 4, or the exact fallback
    assert meta.fidelity.temperatures() == (1.0, 4.0)
    again = runner.invoke(app, args)  # a complete cache: the rerun adopts its codec, never re-chooses
    assert again.exit_code == 0, again.output
    assert cache_mod.open_cache(out).meta.codec == meta.codec
