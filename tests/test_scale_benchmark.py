"""benchmarks/scale.py's own arithmetic: the start-up to the first step and the RSS through a run (warm-up apart
from a steady-state slope), read from a run's per-step metrics and the sampled RSS; the table's growth column."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("scale_benchmark", REPO / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, start: float, steps: int, rss_mib, slope_per_step: float = 0.0):
    """A metrics.jsonl of `steps` steps, one a second from start + 5 s (an older run's step before start), and the
    RSS sampled every 0.1 s: rss_mib(t) plus slope_per_step MiB a step."""
    lines = [{"event": "step", "step": 99, "time": start - 50}]  # an earlier process's step: not this one's
    lines += [{"event": "step", "epoch": 0, "step": i, "loss": 1.0, "time": start + 5 + i - 1}
              for i in range(1, steps + 1)]
    lines.append({"event": "epoch", "epoch": 0, "steps": steps, "time": start + 5 + steps})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines))
    series = []
    for k in range(int((5 + steps) * 10)):
        t = start + k / 10
        step = max(0.0, t - start - 4)
        mib = rss_mib(step) + slope_per_step * step
        series.append((t, int(mib * 1024), int((mib - 100) * 1024), 2048))
    return metrics, series


def test_warm_up_is_told_from_a_steady_slope(scale, tmp_path):
    start = 1_000.0
    warm = lambda step: 900 + min(step, 20) * 2  # noqa: E731  (40 MiB over the first 20 steps, then flat)
    metrics, series = _run(tmp_path, start, 200, warm)
    flat = scale.step_profile(metrics, series, start)
    assert flat["first_step_s"] == 5.0 and flat["steps_run"] == 200 and flat["last_step"] == 200
    assert flat["rss_over_steps_mib"]["0%"] == pytest.approx(902, abs=1)
    assert flat["rss_warmup_mib"] == pytest.approx(38, abs=1)
    slope, error = flat["rss_slope_mib_per_1k_steps"]
    assert abs(slope) < 1 and error < 1
    metrics, series = _run(tmp_path, start, 200, warm, slope_per_step=0.05)  # a leak of 50 MiB per 1,000 steps
    leak = scale.step_profile(metrics, series, start)
    assert leak["rss_slope_mib_per_1k_steps"][0] == pytest.approx(50, abs=2)
    assert leak["anon_slope_mib_per_1k_steps"][0] == pytest.approx(50, abs=2)


def test_the_table_shows_each_size_and_the_growth(scale):
    rows = [{"samples": n, "stage": "inspect", "wall_s": 1.0, "main_peak_rss_mib": peak, "worker_peak_rss_mib": 0.0,
             "dev_shm_peak_mib": 0.0, "bytes_read_mib": 60.0} for n, peak in ((12800, 800.0), (128000, 1040.0))]
    text = scale.table(rows, ["a note"])
    assert "main peak RSS MiB at 12,800" in text and "main peak RSS MiB at 128,000" in text
    assert "| 800.0 | 1040.0 | 1.30x |" in text and text.endswith("- a note")


def test_shards_have_imagenet_s_layout(scale, tmp_path):
    from dkd_cache import data

    out = scale.make_shards(tmp_path / "s", 1300)
    urls = data.expand_shards(str(out))
    assert [Path(u).name for u in urls] == ["train-000000.tar", "train-000001.tar"]
    ix = [data.scan_shard(u, 1000) for u in urls]
    assert [len(i.keys) for i in ix] == [1252, 48]
    assert ix[1].key(0) == "00001252" and int(ix[1].labels[0]) == 252
