"""`dkd-cache plan`: its arithmetic against a real small dump and a real ring, its sources named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zarr
from typer.testing import CliRunner

from dkd_cache import cache as cache_mod
from dkd_cache.cli import app
from dkd_cache.errors import ConfigError
from dkd_cache.plan import PlanInputs, make_plan, rows_of

runner = CliRunner()


def test_cache_size_equals_a_real_dumps_arrays(cache_path):
    cache = cache_mod.open_cache(cache_path)
    m = cache.meta
    group = zarr.open_group(str(cache_path), mode="r")
    raw = sum(group[f"{g}/{k}"].nbytes for g in ("samples", "views", "logits") for k, _ in group[g].members())
    sizes = [s.samples for s in m.manifest.shards]  # 25, 25, 25, 5: shards of 25
    plan = make_plan(PlanInputs(samples=m.manifest.samples, views=m.views, classes=m.num_classes,
                                codec=m.codec.name, temperatures=len(m.temperatures), device="cpu",
                                shard_size=max(sizes), chunk_rows=m.chunk_rows,
                                key_bytes=group["samples/key"].shape[1]))
    assert plan.rows == m.manifest.rows and plan.shards == len(sizes)
    assert plan.cache_bytes == raw  # exact: every array's raw bytes


def test_rows_are_padded_per_shard_like_the_manifest():
    assert rows_of(1_281_167, 1252, 256) == (1023 * 1280 + 256 * -(-(1_281_167 - 1023 * 1252) // 256), 1024)
    assert rows_of(80, 25, 8) == (3 * 32 + 8, 4)


def test_shared_memory_equals_the_training_rings(shards, cache_path):
    from dkd_cache.data import expand_shards
    from dkd_cache.loader import StreamSpec, make_loader, plan_epoch

    cache = cache_mod.open_cache(cache_path)
    urls = expand_shards(str(Path(shards["train"][0]).parent))
    spec = StreamSpec(urls=tuple(urls), recipe=cache.meta.recipe, seed=0, epoch=0, view=0, rank=0,
                      cache_path=str(cache_path), entry_arrays=("views/box", "views/flip"), num_classes=10,
                      shuffle_buffer=16, block=16)
    ep = plan_epoch([s.samples for s in cache.meta.manifest.shards], seed=0, epoch=0, world=1, rank=0, workers=2)
    ring = make_loader(spec, ep, [0, 0], 2).dataset.ring
    plan = make_plan(PlanInputs(samples=80, views=2, classes=10, codec="topk:4", device="cpu", workers=2, batch_size=16,
                                image_size=cache.meta.recipe.image_size))
    assert plan.train_shm_bytes == ring.need.rank_bytes


def test_figures_are_derived_from_the_measured_rates():
    p = PlanInputs(samples=1_281_167, views=100, classes=1000, device="h200")
    plan = make_plan(p)
    measured = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/throughput-gpu.json").read_text())
    views_per_s = measured["dump"]["topk:10+q4"]["images_per_s"]
    assert plan.dump_seconds == pytest.approx(1_281_167 * 100 / (views_per_s * 8))
    train = measured["train"]["cached"]["best_images_per_s"]
    assert plan.epoch_seconds == pytest.approx(1_281_167 / (train * 8))
    given = make_plan(PlanInputs(samples=1000, views=10, classes=10, codec="topk:4", device=None, rate=100.0,
                                 train_rate=50.0,
                                 ranks=2, jpeg_bytes=1000.0))
    assert given.dump_seconds == pytest.approx(1000 * 10 / 200) and given.epoch_seconds == pytest.approx(10.0)
    assert given.read_bytes_per_s == pytest.approx((1000.0 + given.bytes_per_view) * 50.0 * 2)


def test_cli_prints_each_figure_with_its_source_and_refuses_bad_input():
    r = runner.invoke(app, ["plan", "--samples", "1281167", "--views", "100", "--classes", "1000"])
    assert r.exit_code == 0, r.output
    for words in ("cache size", "dump time", "shared memory per rank", "storage read rate", "throughput-gpu.json",
                  "input-path-cpu.json", "transfer.ShmNeed"):
        assert words in r.output
    r = runner.invoke(app, ["plan", "--samples", "100", "--views", "1", "--classes", "100", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["rows"] == 256
    r = runner.invoke(app, ["plan", "--samples", "0", "--views", "1", "--classes", "100"])
    assert r.exit_code == 2 and "samples must be a positive integer" in r.output
    with pytest.raises(ConfigError, match="no measured rates"):
        make_plan(PlanInputs(samples=1, views=1, classes=2, device="tpu"))
