"""Renderers (cpu, device), views per decode and the student's own image size, through the real loader and trainer."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from dkd_cache import cache as cache_mod
from dkd_cache import renderers
from dkd_cache.data import expand_shards
from dkd_cache.dump import dump_teacher
from dkd_cache.errors import CacheMismatchError, ConfigError
from dkd_cache.loader import StreamSpec, batches, canonical_runs, make_loader, plan_epoch, skips_for
from dkd_cache.checkpoint import read_checkpoint
from dkd_cache.train import TrainConfig, train_student, with_views
from dkd_cache.verify import VerifySettings, verify

from .conftest import CLASSES, dump_settings
from .helpers import sample_views


def _cfg(shards, out, **kw) -> TrainConfig:
    base = dict(shards=str(Path(shards["train"][0]).parent), out=str(out), arch="resnet18", epochs=2, batch_size=16,
                lr=0.05, lr_batch=16, workers=0, lr_milestones=(1,), shuffle_buffer=16)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("name", renderers.RENDERERS)
def test_a_views_pixels_do_not_depend_on_its_batch(shards, name):
    data, boxes, flips, recipe = sample_views(shards)
    together = renderers.render_views(name, data, boxes, flips, recipe)
    assert together.shape == (len(data), 3, 32, 32) and together.dtype == torch.uint8
    for i in range(len(data)):  # alone, and beside other neighbours in reverse order
        alone = renderers.render_views(name, data[i:i + 1], boxes[i:i + 1], flips[i:i + 1], recipe)
        assert torch.equal(alone[0], together[i]), i
    rev = renderers.render_views(name, data[::-1], boxes[::-1], flips[::-1], recipe)
    assert torch.equal(rev.flip(0), together)
    # a flip is a mirror of the unflipped view
    mirrored = renderers.render_views(name, data[:3], boxes[:3], ~flips[:3], recipe)
    assert torch.equal(mirrored, together[:3].flip(-1))


def test_the_two_renderers_differ_only_slightly(shards):
    data, boxes, flips, recipe = sample_views(shards)
    a = renderers.render_views("cpu", data, boxes, flips, recipe).int()
    b = renderers.render_views("device", data, boxes, flips, recipe).int()
    diff = (a - b).abs().float()
    assert 0 < diff.mean() < 4  # other filters, same views
    with pytest.raises(ConfigError, match="bilinear"):
        renderers.render_views("device", data, boxes, flips, dataclasses.replace(recipe, interpolation="bicubic"))


def _loader_pixels(spec: StreamSpec, sizes, workers: int) -> dict[tuple[str, int], torch.Tensor]:
    """The training loader's batches, pixels on the device (cpu here), by (key index in the batch order)."""
    plan = plan_epoch(sizes, seed=0, epoch=0, world=1, rank=0, workers=max(1, workers))
    plan = with_views(plan, spec.views_per_decode)
    skips = [0] * len(plan.counts)
    out = []
    for batch in batches(canonical_runs(make_loader(spec, plan, skips, workers), plan, skips), 8):
        labels, entries = batch.labels, batch.entries
        px = renderers.to_device(batch.images, entries, spec.recipe, "cpu", spec.size).clone()
        batch.release()
        for i in range(px.shape[0]):
            key = (tuple(int(v) for v in entries["views/box"][i]), int(entries["views/flip"][i]), int(labels[i]))
            out.append((key, px[i]))
    return out


@pytest.mark.parametrize("name", renderers.RENDERERS)
def test_loader_pixels_equal_across_worker_counts_and_match_the_renderer(shards, cache_path, name):
    cache = cache_mod.open_cache(cache_path)
    sizes = [s.samples for s in cache.meta.manifest.shards]
    urls = expand_shards(str(Path(shards["train"][0]).parent))
    spec = StreamSpec(urls=tuple(urls), recipe=cache.meta.recipe, seed=0, epoch=0, view=1, rank=0,
                      cache_path=str(cache_path), entry_arrays=("views/box", "views/flip"), num_classes=CLASSES,
                      shuffle_buffer=16, renderer=name)
    zero = _loader_pixels(spec, sizes, 0)
    two = _loader_pixels(spec, sizes, 2)
    assert len(zero) == sum(sizes)
    assert dict((k, v) for k, v in zero).keys() == dict((k, v) for k, v in two).keys()
    by_key = dict(two)
    for k, v in zero:
        assert torch.equal(by_key[k], v)


def test_renderer_is_recorded_chosen_by_default_and_another_is_refused(shards, teacher_ckpt, cache_path, tmp_path):
    dev = tmp_path / "device.zarr"
    dump_teacher(dump_settings(shards, teacher_ckpt, dev, renderer="device"), progress=False)
    meta = cache_mod.open_cache(dev).meta
    assert meta.renderer.name == "device" and "roi_align" in meta.renderer.backend
    assert meta.renderer.versions["torch"] == torch.__version__
    assert cache_mod.open_cache(cache_path).meta.renderer.name == "cpu"
    # the dumped logits are the teacher's on the device renderer's pixels (not the cpu renderer's)
    plain = cache_mod.open_cache(cache_path)
    assert np.array_equal(plain.read_rows("views/box", 0, 8, view=0),
                          cache_mod.open_cache(dev).read_rows("views/box", 0, 8, view=0))  # the same views
    assert not np.allclose(plain.read_rows("logits/target", 0, 8, view=0),
                           cache_mod.open_cache(dev).read_rows("logits/target", 0, 8, view=0))
    # a rerun with the other renderer would mix pixels: refused
    with pytest.raises(CacheMismatchError, match="renderer"):
        dump_teacher(dump_settings(shards, teacher_ckpt, dev, renderer="cpu"), progress=False)
    # training: the cache's renderer by default, another only when asked for explicitly
    r = train_student(_cfg(shards, tmp_path / "run-dev", cache=str(dev), max_steps=2), progress=False)
    assert r["renderer"] == "device"
    with pytest.raises(CacheMismatchError, match="allow-other-renderer"):
        train_student(_cfg(shards, tmp_path / "run-cpu", cache=str(dev), renderer="cpu"), progress=False)
    r = train_student(_cfg(shards, tmp_path / "run-cpu2", cache=str(dev), renderer="cpu", allow_other_renderer=True,
                           max_steps=2), progress=False)
    assert r["renderer"] == "cpu"


def test_a_cache_written_before_renderers_opens_and_trains_as_cpu(cache_path, shards, tmp_path):
    import shutil

    old = tmp_path / "old.zarr"
    shutil.copytree(cache_path, old)
    group = zarr.open_group(str(old), mode="r+")
    attrs = dict(group.attrs["dkd_cache"])
    del attrs["renderer"]
    group.attrs["dkd_cache"] = attrs
    meta = cache_mod.open_cache(old).meta
    assert meta.renderer.name == "cpu" and "not recorded" in meta.renderer.backend
    r = train_student(_cfg(shards, tmp_path / "run", cache=str(old), max_steps=1), progress=False)
    assert r["renderer"] == "cpu" and r["step"] == 1


def test_verify_reports_the_drift_to_another_renderer(shards, teacher_ckpt, cache_path):
    report = verify(VerifySettings(cache=str(cache_path), shards=str(Path(shards["train"][0]).parent),
                                   weights=str(teacher_ckpt), samples=24, renderer="device",
                                   # the fixture's topk:4 approximation of exact DKD is gated in test_verify.py
                                   live_cosine_tol=-1.0, live_p5_tol=-1.0, live_loss_tol=100.0))
    assert report["passed"], report["failures"]  # the cache itself is still checked with its own renderer
    d = report["renderer_drift"]
    assert d["cache_renderer"] == "cpu" and d["other_renderer"] == "device"
    assert d["pixels"]["max_abs"] > 0 and d["teacher_logits"]["max_abs"] > 0
    for t in ("grad_T1", "grad_T4"):
        assert -1 <= d[t]["cos_p5"] <= d[t]["cos_median"] <= 1 and d[t]["cos_median"] < 1
    same = verify(VerifySettings(cache=str(cache_path), shards=str(Path(shards["train"][0]).parent),
                                 weights=str(teacher_ckpt), samples=8, renderer="cpu"))
    assert "renderer_drift" not in same


def test_views_per_decode_gives_each_sample_m_views_in_one_pass(shards, cache_path):
    cache = cache_mod.open_cache(cache_path)
    sizes = [s.samples for s in cache.meta.manifest.shards]
    urls = expand_shards(str(Path(shards["train"][0]).parent))
    spec = StreamSpec(urls=tuple(urls), recipe=cache.meta.recipe, seed=0, epoch=0, view=0, rank=0,
                      cache_path=str(cache_path), entry_arrays=("views/box", "views/flip"), num_classes=CLASSES,
                      shuffle_buffer=16, views_per_decode=2)
    got = _loader_pixels(spec, sizes, 2)
    assert len(got) == 2 * sum(sizes)
    stored = {(tuple(int(x) for x in cache.read_rows("views/box", 0, cache.meta.manifest.rows, view=v)[r]),
               int(cache.read_rows("views/flip", 0, cache.meta.manifest.rows, view=v)[r]))
              for v in (0, 1) for s in cache.meta.manifest.shards for r in range(s.row_start, s.row_start + s.samples)}
    seen = [k[:2] for k, _ in got]
    assert set(seen) == stored and len(set(seen)) == len(seen)  # every stored view of views 0 and 1, once


def test_views_per_decode_counts_m_epochs_and_resumes_inside_a_pass(shards, cache_path, tmp_path):
    full = tmp_path / "full"
    r = train_student(_cfg(shards, full, cache=str(cache_path), views_per_decode=2), progress=False)
    epochs = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    passes = [e for e in epochs if e["event"] == "epoch"]
    assert len(passes) == 1 and passes[0]["epochs"] == 2 and passes[0]["samples"] == 2 * shards["train_samples"]
    steps = [e for e in epochs if e["event"] == "step"]
    assert {e["epoch"] for e in steps} == {0, 1}  # the LR schedule (milestone at epoch 1) sees both epochs
    assert sorted({e["lr"] for e in steps if e["epoch"] == 1}) == [pytest.approx(0.005)]
    assert read_checkpoint(full / "checkpoint.pt")["epoch"] == 2 and r["rank_steps"] == [10]
    part = tmp_path / "part"
    train_student(_cfg(shards, part, cache=str(cache_path), views_per_decode=2, max_steps=3), progress=False)
    ck = read_checkpoint(part / "checkpoint.pt")
    assert (ck["epoch"], ck["consumed"]) == (0, 48)  # inside the pass, mid-sample for some workers' streams
    train_student(_cfg(shards, part, cache=str(cache_path), views_per_decode=2), resume=True, progress=False)
    a, b = read_checkpoint(full / "checkpoint.pt")["model"], read_checkpoint(part / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="multiple of views_per_decode"):
        _cfg(shards, tmp_path / "x", epochs=3, views_per_decode=2)


def test_resume_skips_inside_a_decoded_sample_give_the_rest_of_the_pass(shards, cache_path):
    cache = cache_mod.open_cache(cache_path)
    sizes = [s.samples for s in cache.meta.manifest.shards]
    urls = expand_shards(str(Path(shards["train"][0]).parent))
    spec = StreamSpec(urls=tuple(urls), recipe=cache.meta.recipe, seed=0, epoch=0, view=0, rank=0,
                      cache_path=str(cache_path), entry_arrays=("views/box", "views/flip"), num_classes=CLASSES,
                      shuffle_buffer=16, views_per_decode=2)
    plan = with_views(plan_epoch(sizes, seed=0, epoch=0, world=1, rank=0, workers=2), 2)
    whole = [(int(g.worker), int(g.seq0 + i)) for g in canonical_runs(make_loader(spec, plan, [0, 0], 0), plan,
                                                                          [0, 0]) for i in range(len(g))]
    for consumed in (17, 33):  # odd: the resumed stream starts at the second view of a decoded sample
        skips = skips_for(plan.counts, consumed)
        rest = [(int(g.worker), int(g.seq0 + i)) for g in canonical_runs(make_loader(spec, plan, skips, 0), plan,
                                                                             skips) for i in range(len(g))]
        assert whole[:consumed] + rest == whole


def test_the_student_trains_at_its_own_size_and_schedule(shards, cache_path, tmp_path):
    run = tmp_path / "small"
    sizes_seen = []
    real_forward = torch.nn.Conv2d.forward

    def spy(self, x):
        if self.in_channels == 3:
            sizes_seen.append(tuple(x.shape[-2:]))
        return real_forward(self, x)

    torch.nn.Conv2d.forward = spy
    try:
        r = train_student(_cfg(shards, run, cache=str(cache_path), image_size_schedule="0:24,1:32"), progress=False)
    finally:
        torch.nn.Conv2d.forward = real_forward
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["image_size"] for e in records if e["event"] == "epoch"] == [24, 32]
    assert set(sizes_seen) == {(24, 24), (32, 32)} and r["dkd"] > 0
    # the loader renders the stored boxes at the student's size
    cache = cache_mod.open_cache(cache_path)
    urls = expand_shards(str(Path(shards["train"][0]).parent))
    spec = StreamSpec(urls=tuple(urls), recipe=cache.meta.recipe, seed=0, epoch=0, view=0, rank=0,
                      cache_path=str(cache_path), entry_arrays=("views/box", "views/flip"), num_classes=CLASSES,
                      shuffle_buffer=16, image_size=24)
    sizes = [s.samples for s in cache.meta.manifest.shards]
    plan = plan_epoch(sizes, seed=0, epoch=0, world=1, rank=0, workers=1)
    group = next(iter(canonical_runs(make_loader(spec, plan, [0], 0), plan, [0])))
    assert group.images.shape[-2:] == (24, 24)
    with pytest.raises(ConfigError, match="schedule"):
        _cfg(shards, tmp_path / "y", image_size_schedule="5:160")


def test_a_live_teacher_at_another_student_size_is_refused(shards, teacher_ckpt, cache_path, tmp_path):
    # The live teacher would see the student-size batch, not the recorded view at the recipe's size.
    for kw in ({"image_size": 24}, {"image_size_schedule": "0:32,1:24"}):
        with pytest.raises(ConfigError, match="student's image size must be the recipe's"):
            train_student(_cfg(shards, tmp_path / "live", cache=str(cache_path), live_teacher=str(teacher_ckpt),
                               **kw), progress=False)
    assert not (tmp_path / "live" / "metrics.jsonl").exists()


def test_cli_names_the_renderer_and_refuses_another_without_the_flag(shards, cache_path, tmp_path):
    from typer.testing import CliRunner

    from dkd_cache.cli import app

    runner = CliRunner()
    info = runner.invoke(app, ["inspect", str(cache_path)])
    assert info.exit_code == 0 and "renderer      cpu" in info.output
    base = ["train-student", "--shards", str(Path(shards["train"][0]).parent), "--cache", str(cache_path),
            "--epochs", "2", "--batch-size", "16", "--workers", "0", "--no-progress"]
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "a"), "--renderer", "device"])
    assert r.exit_code == 2 and "--allow-other-renderer" in r.output
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--image-size-schedule", "5:160"])
    assert r.exit_code == 2 and "schedule" in r.output
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "c"), "--views-per-decode", "3"])
    assert r.exit_code == 2 and "multiple of views_per_decode" in r.output
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "d"), "--renderer", "device", "--allow-other-renderer",
                            "--views-per-decode", "2", "--image-size", "24", "--max-steps", "1"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.output.strip().splitlines()[-1])
    assert rec["renderer"] == "device" and rec["image_size"] == 24 and rec["epochs"] == 2


def test_the_resize_kernel_is_recorded_and_shown(cache_path, shards, teacher_ckpt, tmp_path):
    from dkd_cache.inspect import describe, render_text
    from dkd_cache.verify_report import render_report

    r = cache_mod.open_cache(cache_path).meta.renderer
    assert r.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert r.resize == renderers.resize_kernels("cpu") and r.resize["bilinear"] in (renderers.UINT8_KERNEL,
                                                                                   renderers.FLOAT_KERNEL)
    assert f"CPU capability {r.cpu_capability}" in r.kernel("bilinear")
    assert f"resize        {r.kernel('bilinear')}" in render_text(describe(cache_path))
    s = VerifySettings(cache=str(cache_path), shards=str(Path(shards["train"][0]).parent), weights=str(teacher_ckpt),
                       samples=2)
    report = verify(s)
    assert report["cache"]["resize_kernel"] == r.kernel("bilinear") and r.kernel("bilinear") in render_report(report)
    assert not any("resized with" in w for w in report["warnings"])  # dumped on this host: the same kernel
    # a cache whose views a host without AVX2 resized (float32 bilinear): verify says this host resizes otherwise
    other = tmp_path / "float.zarr"
    import shutil

    shutil.copytree(cache_path, other)
    group = zarr.open_group(str(other), mode="r+")
    attrs = dict(group.attrs["dkd_cache"])
    kernels = renderers.resize_kernels("cpu", "DEFAULT", "x86_64")
    attrs["renderer"] = {**attrs["renderer"], "cpu_capability": "DEFAULT", "resize": kernels}
    group.attrs["dkd_cache"] = attrs
    report = verify(dataclasses.replace(s, cache=str(other)))
    if kernels["bilinear"] != r.resize["bilinear"]:
        assert any("resized with float32" in w and "CPU capability DEFAULT" in w for w in report["warnings"])
    assert "CPU capability DEFAULT" in report["cache"]["resize_kernel"]


def test_resize_kernels_follow_the_path_torchvision_takes(shards, monkeypatch):
    """What the record says is what runs: with the CPU capability torch reports, torchvision's uint8 bilinear resize
    gives the native uint8 kernel's pixels or the float32 path's, as resize_kernels names."""
    import platform

    from torchvision.transforms.v2 import functional as F

    from dkd_cache.views import decode

    assert renderers.resize_kernels("cpu", "DEFAULT", "x86_64")["bilinear"] == renderers.FLOAT_KERNEL
    assert renderers.resize_kernels("cpu", "AVX2", "x86_64")["bilinear"] == renderers.UINT8_KERNEL
    assert renderers.resize_kernels("cpu", "AVX512", "x86_64")["bilinear"] == renderers.UINT8_KERNEL
    assert renderers.resize_kernels("cpu", "DEFAULT", "aarch64")["bilinear"] == renderers.UINT8_KERNEL
    assert "roi_align" in renderers.resize_kernels("device")["bilinear"]
    data, boxes, _, _ = sample_views(shards, n=4)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    differed = False
    for d, (top, left, h, w) in zip(data, boxes):
        crop = decode(d)[:, top:top + h, left:left + w].unsqueeze(0)
        native = torch.nn.functional.interpolate(crop, size=[32, 32], mode="bilinear", antialias=True)[0]
        via_float = torch.nn.functional.interpolate(crop.float(), size=[32, 32], mode="bilinear",
                                                    antialias=True).round_().to(torch.uint8)[0]
        differed |= not torch.equal(native, via_float)
        for cap in ("DEFAULT", "AVX2"):
            monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda cap=cap: cap)
            got = F.resized_crop(decode(d), int(top), int(left), int(h), int(w), [32, 32], antialias=True)
            kernel = renderers.resize_kernels("cpu", cap, "x86_64")["bilinear"]
            assert torch.equal(got, via_float if kernel == renderers.FLOAT_KERNEL else native), (cap, kernel)
    assert differed  # the two kernels give other pixels: why the record matters


def test_a_renderer_record_without_the_resize_kernel_opens(cache_path):
    old = {"name": "cpu", "backend": renderers.BACKENDS["cpu"], "versions": {"torch": "2.3.0"}}
    info = renderers.RendererInfo.from_dict(old)
    assert info.cpu_capability is None and info.resize == {} and "not recorded" in info.kernel("bilinear")
    assert info.to_dict() == old  # written back as it was
    assert "not recorded" in renderers.RendererInfo.from_dict(None).kernel("bilinear")
    with pytest.raises(ConfigError, match="resize"):
        renderers.RendererInfo.from_dict({**old, "cpu_capability": "AVX2", "resize": ["uint8"]})
