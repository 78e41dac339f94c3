"""The demo end to end on a tiny config, the curves it draws, `dkd-cache plot`, and parity.py's statistics."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dkd_cache.cli import app
from dkd_cache.demo import run_demo
from dkd_cache.errors import ConfigError, DKDCacheError
from dkd_cache.plot import MODE_CACHE, MODE_CE, MODE_LIVE, draw_runs, plot_runs, read_run

REPO = Path(__file__).resolve().parent.parent
TINY = """
[demo]
classes = 4
train_per_class = 6
extra_per_class = 4
val_per_class = 3
shard_size = 20
min_side = 32
max_side = 40
teacher_arch = "resnet18"
teacher_epochs = 2
teacher_lr = 0.05
teacher_batch_size = 16

[recipe]
image_size = 32

[dump]
views = 2
temperatures = [4.0]
batch_size = 16
workers = 0

[train]
arch = "resnet18"
epochs = 2
batch_size = 8
lr = 0.02
lr_batch = 8
lr_milestones = [1]
temperature = 4.0
beta = 8.0
workers = 0
"""


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo")
    config = root / "tiny.toml"
    config.write_text(TINY)
    lines: list[str] = []
    summary = run_demo(root / "work", config, echo=lines.append, progress=False)
    return root / "work", {"summary": summary, "printed": "\n".join(lines), "config": config}


def test_demo_runs_every_stage_and_explains_its_table(demo_run):
    work, r = demo_run
    summary, printed = r["summary"], r["printed"]
    stages = [s["stage"] for s in summary["stages"]]
    assert stages == ["make-shards", "teacher resnet18 (CE)", "dump-teacher", "student CE only",
                      "student DKD from cache", "student DKD live teacher", "verify"]
    # the teacher saw train + extra (40 images), the students the train split (24) only
    assert summary["stages"][1]["images"] == 40
    assert json.loads((work / "runs" / "teacher" / "config.json").read_text())["shards"][1].endswith("extra.txt")
    for name in ("student-ce", "student-dkd-cache", "student-dkd-live"):
        cfg = json.loads((work / "runs" / "seed-0" / name / "config.json").read_text())
        assert cfg["shards"].endswith("train.txt") and cfg["cache"].endswith("teacher.zarr")
    assert summary["verify"] == "passed"
    for needle in ("what the numbers mean", "teacher resnet18", "distillation gain (cache - CE)", "cache - live",
                   "benchmarks/parity.py"):
        assert needle in printed
    assert (work / "demo.txt").read_text().strip() == printed.split("\n== verify\n")[-1].strip()
    png = Image.open(work / "curves.png")
    assert png.format == "PNG" and png.size[0] > 600


def test_demo_rerun_keeps_finished_stages_and_reports_the_same_numbers(demo_run):
    work, r = demo_run
    again = run_demo(work, r["config"], echo=lambda s: None, progress=False)
    stages = {s["stage"]: s for s in again["stages"]}
    assert "make-shards" not in stages and "dump-teacher" not in stages
    first = {s["stage"]: s.get("val_top1") for s in r["summary"]["stages"] if s.get("mode")}
    assert {k: v["val_top1"] for k, v in stages.items() if v.get("mode")} == first
    assert all(v["seconds"] is None for v in stages.values() if v.get("mode"))  # kept, not retrained


def test_demo_refuses_unknown_keys_and_a_dump_arch_other_than_the_teacher(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.replace("classes = 4", "classes = 4\nteacher_epoch = 3"))
    with pytest.raises(ConfigError, match="teacher_epoch"):
        run_demo(tmp_path / "w", bad, echo=lambda s: None)
    bad.write_text(TINY.replace("views = 2", "views = 2\narch = \"resnet34\""))
    with pytest.raises(ConfigError, match="teacher_arch"):
        run_demo(tmp_path / "w", bad, echo=lambda s: None)


def test_read_run_gives_per_epoch_top1_and_mean_step_losses(demo_run):
    work, _ = demo_run
    run = work / "runs" / "seed-0" / "student-dkd-cache"
    curves = read_run(run)
    assert curves.label == f"resnet18 {MODE_CACHE}" and curves.seed == 0 and curves.epochs == (1, 2)
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    ep1 = [r["loss"] for r in records if r["event"] == "step" and r["epoch"] == 1]
    assert math.isclose(curves.train_loss[1], sum(ep1) / len(ep1))
    assert curves.val_top1[1] == [r for r in records if r["event"] == "epoch"][-1]["val_top1"]
    labels = {read_run(work / "runs" / "seed-0" / n).label.split(" ", 1)[1]
              for n in ("student-ce", "student-dkd-cache", "student-dkd-live")}
    assert labels == {MODE_CE, MODE_CACHE, MODE_LIVE}


def test_every_mode_is_drawn_so_that_it_shows_where_the_curves_lie_on_each_other(demo_run):
    import matplotlib.pyplot as plt

    work, _ = demo_run
    runs = [read_run(work / "runs" / "seed-0" / n) for n in ("student-ce", "student-dkd-cache", "student-dkd-live")]
    fig = draw_runs(runs)
    for ax in fig.axes:
        means = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
        assert len(means) == 3
        looks = {(str(line.get_linestyle()), line.get_marker(), str(line.get_markerfacecolor()),
                  line.get_markersize()) for line in means.values()}
        assert len(looks) == 3  # no mode's curve hides another of the same look: the cached one under the live one
        live = next(line for label, line in means.items() if MODE_LIVE in label)
        cached = next(line for label, line in means.items() if MODE_CACHE in label)
        # the live curve, drawn over the cached one, lets it through: dashed, with hollow markers around its dots
        assert live.get_zorder() > cached.get_zorder() and live.get_linestyle() != "-"
        assert live.get_markerfacecolor() == "none" and live.get_markersize() > cached.get_markersize()
    plt.close(fig)


def test_a_resumed_run_counts_each_step_once(demo_run, tmp_path):
    work, _ = demo_run
    run = tmp_path / "resumed"
    src = work / "runs" / "seed-0" / "student-ce"
    (run).mkdir()
    (run / "config.json").write_text((src / "config.json").read_text())
    lines = (src / "metrics.jsonl").read_text().splitlines()
    replayed = [l for l in lines if '"event": "step"' in l and json.loads(l)["epoch"] == 1][:2]
    # killed after two steps of epoch 1, resumed from the epoch-0 checkpoint: those two steps are logged twice
    cut = lines.index(replayed[-1]) + 1
    (run / "metrics.jsonl").write_text("\n".join(lines[:cut] + lines[lines.index(replayed[0]):]) + "\n")
    assert read_run(run).train_loss == read_run(src).train_loss


def test_plot_command_writes_a_png_and_refuses_what_is_not_a_run(demo_run, tmp_path):
    work, _ = demo_run
    runs = [str(work / "runs" / "seed-0" / n) for n in ("student-ce", "student-dkd-cache", "student-dkd-live")]
    out = tmp_path / "p.png"
    r = CliRunner().invoke(app, ["plot", *runs, "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert Image.open(out).format == "PNG"
    r = CliRunner().invoke(app, ["plot", str(tmp_path), "-o", str(tmp_path / "q.png")])
    assert r.exit_code == 2 and "config.json is missing" in r.output and not (tmp_path / "q.png").exists()
    with pytest.raises(ConfigError, match="PNG"):
        plot_runs(runs, tmp_path / "p.svg")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "metrics.jsonl").write_text('{"event": "step", "epoch": 0, "step": 1, "loss": 1.0, "ce": 1.0}\n{"event": ')
    with pytest.raises(DKDCacheError, match="line 2"):
        read_run(broken)


def _parity():
    spec = importlib.util.spec_from_file_location("parity", REPO / "benchmarks" / "parity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parity_interval_is_the_t_interval_and_the_verdict_follows_it():
    parity = _parity()
    s = parity.summary([0.01, -0.01, 0.02, 0.0, -0.02])
    assert math.isclose(s["mean"], 0.0, abs_tol=1e-12)
    std = math.sqrt((0.01**2 * 2 + 0.02**2 * 2) / 4)
    assert math.isclose(s["std"], std)
    assert math.isclose(s["half_width"], 2.776 * std / math.sqrt(5))
    gain = parity.summary([0.05, 0.06, 0.04, 0.05, 0.07])
    v = parity.verdict(s, gain, {"CE only": 0.01})
    assert v[0].startswith("cache = live") and v[1].startswith("distillation pays")
    shifted = parity.summary([0.03, 0.04, 0.035, 0.05, 0.03])
    v = parity.verdict(shifted, parity.summary([0.0, 0.01, -0.01, 0.0, 0.02]), {"CE only": 0.01})
    assert v[0].startswith("the cache differs") and v[1].startswith("distillation is not shown")


def test_parity_table_shows_every_seed_the_intervals_and_the_determinism_check():
    parity = _parity()
    modes = ["CE only", "DKD from cache", "DKD live teacher"]
    top1 = {str(s): {"CE only": 0.20 + 0.01 * s, "DKD from cache": 0.30 + 0.01 * s, "DKD live teacher": 0.31}
            for s in range(3)}
    per_mode = {m: parity.summary([top1[str(s)][m] for s in range(3)]) for m in modes}
    paired = {"cache_minus_live": parity.summary([top1[str(s)]["DKD from cache"] - 0.31 for s in range(3)]),
              "cache_minus_ce": parity.summary([0.10, 0.10, 0.10])}
    report = {"seeds": [0, 1, 2], "top1": top1, "per_mode": per_mode, "paired": paired,
              "teacher": {"arch": "resnet18", "val_top1": 0.55}, "student_arch": "resnet18", "val_images": 600,
              "classes": 20, "verdict": ["v1", "v2"], "machine": "m",
              "repeat": {"same": {"threads": 1, "identical_curve": True, "max_abs_weight_diff": 0.0,
                                  "final_top1_diff": 0.0},
                         "threads": {"threads": 2, "identical_curve": False, "max_abs_weight_diff": 0.01,
                                     "final_top1_diff": -0.005}},
              "timing": {"total_seconds": 600, "prepare_seconds": 0, "prepare_reused": True, "students_seconds": 600,
                         "jobs": 2, "runs_kept": 9}}
    text = parity.render(report)
    rows = text.splitlines()
    assert rows[1].startswith("0 ") and rows[3].startswith("2 ")
    assert "30.00%" in rows[1] and "-1.00" in rows[1] and "+10.00" in rows[1]
    assert rows[5].startswith("mean") and rows[6].startswith("std") and rows[7].startswith("95% CI")
    assert "identical per-epoch top-1: True" in text and "2 threads instead" in text and "-0.50 pts" in text


def test_a_rerun_with_another_recipe_is_refused_naming_what_changed(demo_run, tmp_path):
    work, r = demo_run
    other = tmp_path / "other.toml"
    other.write_text(TINY.replace("beta = 8.0", "beta = 2.0"))
    with pytest.raises(ConfigError, match=r"\[train\] beta: 8.0 -> 2.0"):
        run_demo(work, other, echo=lambda s: None, progress=False)
    other.write_text(TINY.replace("classes = 4", "classes = 4\nseed = 3"))  # another student seed is not a new recipe
    from dkd_cache.demo import check_workdir, load_setup

    check_workdir(load_setup(work, other))


def test_parity_compares_final_weights_bit_for_bit_and_times_runs_from_their_own_records(demo_run, tmp_path):
    work, _ = demo_run
    parity = _parity()
    runs = work / "runs" / "seed-0"
    ckpt = torch.load(runs / "student-ce" / "checkpoint.pt", map_location="cpu", weights_only=True)

    def saved_as(name: str, model: dict) -> Path:  # another run directory holding a checkpoint of these weights
        (tmp_path / name).mkdir()
        torch.save({**ckpt, "model": model}, tmp_path / name / "checkpoint.pt")
        return tmp_path / name

    # the same values in new tensors, in another file: identical
    same = saved_as("same", {k: v.clone() for k, v in ckpt["model"].items()})
    assert parity.identical_weights(runs / "student-ce", same)
    # one weight one ulp away: not identical
    first = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    nudged = {k: v.clone() for k, v in ckpt["model"].items()}
    corner = (0,) * nudged[first].dim()
    nudged[first][corner] = torch.nextafter(nudged[first][corner], torch.tensor(float("inf")))
    assert not parity.identical_weights(runs / "student-ce", saved_as("nudged", nudged))
    assert not parity.identical_weights(runs / "student-ce", runs / "student-dkd-cache")
    # a run's span: its first to its last record's time stamp, whatever order they were written in
    timed = tmp_path / "timed"
    timed.mkdir()
    (timed / "metrics.jsonl").write_text('{"event": "step", "step": 1, "time": 100.25}\n'
                                         '{"event": "step", "step": 2, "time": 130.75}\n'
                                         '{"event": "epoch", "epoch": 0, "time": 90.5}\n')
    assert parity.run_span(timed) == 130.75 - 90.5
    assert parity.run_span(runs / "student-ce") > 0
