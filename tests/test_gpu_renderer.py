"""The gpu renderer: workers ship compressed bytes, the main process decodes whole batches (gpu_decode) and renders
them with render_batch. On this CPU machine its CPU decoder (views.decode, real code) stands in for nvImageCodec,
which is how the whole bytes -> batch path runs in CI."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from dkd_cache import cache as cache_mod
from dkd_cache import gpu_decode, loader, renderers
from dkd_cache.data import expand_shards
from dkd_cache.dump import dump_teacher
from dkd_cache.errors import BadSampleError, CacheMismatchError, ConfigError
from dkd_cache.loader import StreamSpec, batches, canonical_runs, make_loader, plan_epoch
from dkd_cache.train import TrainConfig, train_student, with_views
from dkd_cache.verify import VerifySettings, verify
from dkd_cache.views import Recipe, draw_view, image_size_of

from .conftest import CLASSES, dump_settings
from .helpers import jpeg, sample_members, sample_views, write_tar


# ------------------------------------------------------------------------------------------ batched crop + resize
def _reference_render(imgs, boxes, flips, recipe, size):
    """The device renderer as it rendered before its canvas became one gather: each image copied into a zero
    canvas one by one, its last row and column repeated once (the reference the batched gather must equal)."""
    from torchvision.ops import roi_align

    n = len(imgs)
    hmax, wmax = max(int(i.shape[1]) for i in imgs) + 1, max(int(i.shape[2]) for i in imgs) + 1
    canvas = torch.zeros((n, 3, hmax, wmax), dtype=torch.float32)
    for k, img in enumerate(imgs):
        h, w = int(img.shape[1]), int(img.shape[2])
        canvas[k, :, :h, :w] = img
        canvas[k, :, h, :w] = canvas[k, :, h - 1, :w]
        canvas[k, :, :h + 1, w] = canvas[k, :, :h + 1, w - 1]
    b = torch.as_tensor(boxes, dtype=torch.float32)
    rois = torch.stack([torch.arange(n, dtype=torch.float32), b[:, 1], b[:, 0], b[:, 1] + b[:, 3], b[:, 0] + b[:, 2]], 1)
    out = roi_align(canvas, rois, output_size=(size, size), spatial_scale=1.0,
                    sampling_ratio=-1 if recipe.antialias else 1, aligned=True)
    out = torch.where(torch.as_tensor(flips)[:, None, None, None], out.flip(-1), out)
    return out.round_().clamp_(0, 255).to(torch.uint8)


@pytest.mark.parametrize("size, antialias", [(16, True), (32, True), (57, False)])
def test_render_batch_is_the_per_image_canvas_in_every_layout_and_chunking(monkeypatch, size, antialias):
    rng = np.random.default_rng(size)
    imgs = [torch.randint(0, 256, (3, int(rng.integers(4, 90)), int(rng.integers(4, 90))), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(k)) for k in range(30)]
    recipe = Recipe(image_size=size, antialias=antialias)
    boxes, flips = [], []
    for k, im in enumerate(imgs):
        h, w = int(im.shape[1]), int(im.shape[2])
        if k % 4 == 0:
            boxes.append((0, 0, h, w))  # the whole image
        elif k % 4 == 1:
            boxes.append((h - 3, w - 2, 3, 2))  # a corner: samples reach the repeated row and column
        else:
            boxes.append(draw_view(0, k, str(k), h, w, recipe)[:4])
        flips.append(k % 3 == 0)
    boxes, flips = np.array(boxes), np.array(flips)
    want = _reference_render(imgs, boxes, flips, recipe, size)
    assert torch.equal(renderers.render_batch(imgs, boxes, flips, recipe, "cpu"), want)
    assert torch.equal(renderers.render_batch(renderers.pack(imgs), boxes, flips, recipe, "cpu"), want)
    hwc = [i.permute(1, 2, 0).contiguous() for i in imgs]
    assert torch.equal(renderers.render_batch(hwc, boxes, flips, recipe, "cpu", layout="hwc"), want)
    assert torch.equal(renderers.render_batch(imgs[::2], boxes[::2], flips[::2], recipe, "cpu"), want[::2])
    # rows sharing an image (the views of one decode), by index
    idx = np.repeat(np.arange(3), 2)
    two = [imgs[0], imgs[5], imgs[9]]
    b2 = np.array([boxes[0], (0, 0, 4, 4), boxes[5], boxes[5], boxes[9], (1, 1, 3, 3)])
    f2 = np.array([True, False, False, True, False, False])
    by_index = renderers.render_batch(two, b2, f2, recipe, "cpu", index=idx)
    assert torch.equal(by_index, _reference_render([two[i] for i in idx], b2, f2, recipe, size))
    # a small canvas budget cuts the batch into several roi_align calls: not a pixel moves
    monkeypatch.setattr(renderers, "CANVAS_ELEMENTS", 4000)
    assert torch.equal(renderers.render_batch(imgs, boxes, flips, recipe, "cpu"), want)


def test_gpu_views_do_not_depend_on_neighbours_batch_size_or_reruns_and_equal_the_device_renderer(shards):
    data, boxes, flips, recipe = sample_views(shards)
    together = renderers.render_views("gpu", data, boxes, flips, recipe)
    assert together.shape == (len(data), 3, 32, 32) and together.dtype == torch.uint8
    assert torch.equal(renderers.render_views("gpu", data, boxes, flips, recipe), together)  # a rerun
    for i in range(len(data)):
        alone = renderers.render_views("gpu", data[i:i + 1], boxes[i:i + 1], flips[i:i + 1], recipe)
        assert torch.equal(alone[0], together[i]), i
    order = np.random.default_rng(1).permutation(len(data))[:7]
    some = renderers.render_views("gpu", [data[i] for i in order], boxes[order], flips[order], recipe)
    assert torch.equal(some, together[order])
    # same decoder (libjpeg-turbo on the CPU), same render_batch: the device renderer's pixels, bit for bit
    assert torch.equal(renderers.render_views("device", data, boxes, flips, recipe), together)
    with pytest.raises(ConfigError, match="bilinear"):
        renderers.render_views("gpu", data, boxes, flips, dataclasses.replace(recipe, interpolation="bicubic"))


# ------------------------------------------------------------------------------------------ decoder
def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_members_the_hardware_decoder_cannot_take_are_named():
    rgb = Image.fromarray((np.random.default_rng(0).random((24, 40, 3)) * 255).astype(np.uint8))
    assert gpu_decode.hardware_jpeg(_encoded(rgb, "JPEG", quality=90)) is None
    assert gpu_decode.hardware_jpeg(_encoded(rgb.convert("L"), "JPEG")) is None  # grayscale: 1 component
    assert gpu_decode.hardware_jpeg(_encoded(rgb, "JPEG", progressive=True)) == "progressive JPEG"
    assert gpu_decode.hardware_jpeg(_encoded(rgb.convert("CMYK"), "JPEG")) == "4 components (CMYK / YCCK)"
    assert gpu_decode.hardware_jpeg(_encoded(rgb, "PNG")) == "not a JPEG"
    assert gpu_decode.hardware_jpeg(_encoded(rgb, "WEBP")) == "not a JPEG"
    assert gpu_decode.hardware_jpeg(_encoded(rgb, "JPEG")[:20]) == "truncated JPEG"


def test_cpu_decoder_decodes_every_format_and_names_what_it_cannot(shards):
    rgb = Image.fromarray((np.random.default_rng(0).random((24, 40, 3)) * 255).astype(np.uint8))
    members = [_encoded(rgb, "JPEG"), _encoded(rgb, "JPEG", progressive=True), _encoded(rgb.convert("CMYK"), "JPEG"),
               _encoded(rgb, "PNG"), b"not an image"]
    dec = gpu_decode.CpuDecoder("cpu").decode(members)
    assert dec.layout == "chw" and [e is None for e in dec.errors] == [True, True, True, True, False]
    assert all(tuple(i.shape) == (3, 24, 40) for i in dec.images[:4]) and dec.images[4] is None
    assert torch.equal(dec.images[3], torch.from_numpy(np.asarray(rgb)).permute(2, 0, 1))  # PNG: lossless


def test_the_gpu_renderer_without_nvimagecodec_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # an import of it fails, installed or not
    gpu_decode.decoder_for.cache_clear()
    for call in (lambda: gpu_decode.decoder_for(torch.device("cuda")),
                 lambda: renderers.renderer_info("gpu", "cuda"),
                 lambda: renderers.check_decoder("gpu", None, "cuda", False)):
        with pytest.raises(ConfigError, match=r'pip install "dkd-cache\[gpu\]"'):
            call()
    gpu_decode.decoder_for.cache_clear()
    # on a CPU device the CPU decoder stands in, recorded as such; the other renderers record no decoder
    info = renderers.renderer_info("gpu", "cpu")
    assert info.decoder == gpu_decode.CPU_DECODER and "nvimgcodec" not in info.versions
    assert renderers.renderer_info("device", "cpu").decoder is None
    assert renderers.RendererInfo.from_dict(info.to_dict()) == info
    assert "decoder" not in renderers.renderer_info("cpu").to_dict()  # older records are written back unchanged


def test_pyproject_declares_the_gpu_extra():
    import tomllib

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    gpu = meta["project"]["optional-dependencies"]["gpu"]
    assert any(d.startswith("nvidia-nvimgcodec-cu13") for d in gpu) and any(d.startswith("nvidia-nvjpeg") for d in gpu)


# ------------------------------------------------------------------------------------------ the loader's bytes path
def _loader_pixels(spec: StreamSpec, sizes, workers: int):
    plan = plan_epoch(sizes, seed=0, epoch=0, world=1, rank=0, workers=max(1, workers))
    skips = [0] * len(plan.counts)
    out = []
    for batch in batches(canonical_runs(make_loader(spec, plan, skips, workers), plan, skips, spec.block), 8):
        assert isinstance(batch.images, renderers.Encoded) or spec.renderer != "gpu"
        px = renderers.to_device(batch.images, batch.entries, spec.recipe, "cpu", spec.size).clone()
        out.append((batch.labels.clone(), {k: v.clone() for k, v in batch.entries.items()}, px))
        batch.release()
    return out


def test_workers_ship_bytes_and_the_batches_equal_the_device_renderers(shards, cache_path, monkeypatch):
    cache = cache_mod.open_cache(cache_path)
    sizes = [s.samples for s in cache.meta.manifest.shards]
    urls = expand_shards(str(Path(shards["train"][0]).parent))
    spec = StreamSpec(urls=tuple(urls), recipe=cache.meta.recipe, seed=0, epoch=0, view=1, rank=0,
                      cache_path=str(cache_path), entry_arrays=("views/box", "views/flip"), num_classes=CLASSES,
                      shuffle_buffer=16, renderer="gpu", block=8)
    def no_decode(*_a, **_k):
        raise AssertionError("a gpu-renderer worker decoded an image")

    for workers in (0, 2):
        device = _loader_pixels(dataclasses.replace(spec, renderer="device"), sizes, workers)
        with monkeypatch.context() as m:  # the workers' decodes (cpu, device renderers) fail loudly
            m.setattr(loader, "decode", no_decode)
            m.setattr(renderers, "decode_for_device", no_decode)
            got = _loader_pixels(spec, sizes, workers)
        assert len(got) == len(device) and sum(len(x[0]) for x in got) == sum(sizes)
        for (la, ea, pa), (lb, eb, pb) in zip(got, device):
            assert torch.equal(la, lb) and torch.equal(ea["views/box"], eb["views/box"]) and torch.equal(pa, pb)


def test_views_per_decode_share_one_compressed_image(shards, cache_path):
    cache = cache_mod.open_cache(cache_path)
    urls = expand_shards(str(Path(shards["train"][0]).parent))
    spec = StreamSpec(urls=tuple(urls), recipe=cache.meta.recipe, seed=0, epoch=0, view=0, rank=0,
                      cache_path=str(cache_path), entry_arrays=("views/box", "views/flip"), num_classes=CLASSES,
                      shuffle_buffer=16, renderer="gpu", views_per_decode=2, block=8)
    plan = with_views(plan_epoch([s.samples for s in cache.meta.manifest.shards], seed=0, epoch=0, world=1, rank=0,
                                 workers=1), 2)
    group = next(iter(canonical_runs(make_loader(spec, plan, [0], 0), plan, [0], 8)))
    enc = group.images
    assert isinstance(enc, renderers.Encoded) and len(enc) == 8 and len(enc.lengths) == 4  # 8 views, 4 decodes
    assert enc.index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    part = enc.slice(3, 6)  # a batch boundary inside a sample: only the images its rows use
    assert part.index.tolist() == [0, 1, 1] and part.members() == enc.members()[1:3]
    joined = renderers.concat_encoded([enc.slice(0, 3), enc.slice(3, 8)])
    assert joined.members() == enc.members()[:2] + enc.members()[1:]  # the shared image travels with both halves
    px = renderers.to_device(joined, {"views/box": torch.from_numpy(group.entries["views/box"]),
                                      "views/flip": torch.from_numpy(group.entries["views/flip"])},
                             spec.recipe, "cpu")
    assert torch.equal(px, renderers.to_device(enc, {"views/box": torch.from_numpy(group.entries["views/box"]),
                                                     "views/flip": torch.from_numpy(group.entries["views/flip"])},
                                               spec.recipe, "cpu"))


# ------------------------------------------------------------------------------------------ dump, train, verify
def _cfg(shards, out, **kw) -> TrainConfig:
    base = dict(shards=str(Path(shards["train"][0]).parent), out=str(out), arch="resnet18", epochs=1, batch_size=16,
                lr=0.05, lr_batch=16, workers=0, lr_milestones=(1,), shuffle_buffer=16)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def gpu_cache(shards, teacher_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu") / "gpu.zarr"
    # fp32: an exact codec, so that verify passes with its default gates whatever they are for lossy codecs
    dump_teacher(dump_settings(shards, teacher_ckpt, out, renderer="gpu", workers=2, codec="fp32"), progress=False)
    return out


def test_dump_with_the_gpu_renderer_records_it_and_writes_the_device_renderers_logits(shards, teacher_ckpt,
                                                                                      gpu_cache, tmp_path):
    meta = cache_mod.open_cache(gpu_cache).meta
    assert meta.renderer.name == "gpu" and meta.renderer.decoder == gpu_decode.CPU_DECODER
    assert "roi_align" in meta.renderer.backend
    dev = tmp_path / "device.zarr"
    dump_teacher(dump_settings(shards, teacher_ckpt, dev, renderer="device", codec="fp32"), progress=False)
    a, b = zarr.open_group(str(gpu_cache), mode="r"), zarr.open_group(str(dev), mode="r")
    for name in ("views/box", "views/flip", "logits/target", "logits/lse", "logits/full", "samples/key",
                 "samples/height"):
        assert np.array_equal(a[name][...], b[name][...]), name  # same pixels, same teacher batches: same logits
    # a rerun with another renderer, or the same one decoding with another decoder, would mix pixels: refused
    with pytest.raises(CacheMismatchError, match="renderer"):
        dump_teacher(dump_settings(shards, teacher_ckpt, gpu_cache, renderer="device", codec="fp32"), progress=False)


def test_train_from_a_gpu_cache_uses_its_renderer_and_refuses_another_decoder(shards, gpu_cache, tmp_path):
    r = train_student(_cfg(shards, tmp_path / "run", cache=str(gpu_cache), max_steps=2, workers=2), progress=False)
    assert r["renderer"] == "gpu" and r["step"] == 2
    # the same cache as if dumped on a CUDA host (nvImageCodec's pixels): this CPU host decodes otherwise
    import shutil

    cuda = tmp_path / "cuda.zarr"
    shutil.copytree(gpu_cache, cuda)
    group = zarr.open_group(str(cuda), mode="r+")
    attrs = dict(group.attrs["dkd_cache"])
    attrs["renderer"] = {**attrs["renderer"], "decoder": gpu_decode.NVIMGCODEC_DECODER}
    group.attrs["dkd_cache"] = attrs
    with pytest.raises(CacheMismatchError, match="allow-other-renderer"):
        train_student(_cfg(shards, tmp_path / "refused", cache=str(cuda), max_steps=1), progress=False)
    r = train_student(_cfg(shards, tmp_path / "allowed", cache=str(cuda), max_steps=1, allow_other_renderer=True),
                      progress=False)
    assert r["renderer"] == "gpu" and r["step"] == 1


def test_verify_re_renders_with_the_gpu_renderer_recorded(shards, teacher_ckpt, gpu_cache):
    report = verify(VerifySettings(cache=str(gpu_cache), shards=str(Path(shards["train"][0]).parent),
                                   weights=str(teacher_ckpt), samples=16))
    assert report["passed"], report["failures"]
    assert report["cache"]["renderer"]["name"] == "gpu"
    assert report["cache"]["renderer"]["decoder"] == gpu_decode.CPU_DECODER
    text = json.dumps(report)
    assert "logit" in text


def test_a_sample_whose_body_cannot_be_decoded_is_skipped_or_named(tmp_path, teacher_ckpt):
    good = jpeg(1)
    sos = good.index(b"\xff\xda")
    broken = good[:sos + 40]  # the header reads (the workers' guard passes), the decode fails
    assert image_size_of(broken) == image_size_of(good)
    members = sample_members("a", 1) + sample_members("b", 2, image=broken) + sample_members("c", 3, seed=4)
    shard_dir = tmp_path / "shards"
    write_tar(shard_dir / "x.tar", members)
    settings = dump_settings({"train": [str(shard_dir / "x.tar")]}, teacher_ckpt, tmp_path / "c.zarr",
                             renderer="gpu")
    with pytest.raises(BadSampleError, match=r"x.tar: sample 'b': image cannot be decoded"):
        dump_teacher(settings, progress=False)
    report = dump_teacher(dataclasses.replace(settings, out=str(tmp_path / "s.zarr"), skip_bad=True), progress=False)
    assert report.complete and report.skipped == 1
    assert report.decoded == {"cpu": 2}  # the decoder's counts, this dump's only (a hardware one: "cpu fallback: ...")
    meta = cache_mod.open_cache(tmp_path / "s.zarr").meta
    assert [(s.key, s.shard) for s in meta.skipped] == [("b", "x.tar")]
    assert zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["samples/status"][:3].tolist() == [1, 2, 1]
    # the cpu renderer skips the same sample: the gpu renderer leaves out what the others leave out
    cpu = dump_teacher(dataclasses.replace(settings, out=str(tmp_path / "cpu.zarr"), skip_bad=True,
                                           renderer="cpu"), progress=False)
    assert cpu.skipped == 1


def test_the_cli_dumps_with_the_gpu_renderer_and_says_how_it_decoded(shards, teacher_ckpt, tmp_path):
    from typer.testing import CliRunner

    from dkd_cache.cli import app

    r = CliRunner().invoke(app, ["dump-teacher", "--shards", shards["train"][0], "--weights", str(teacher_ckpt),
                                 "--out", str(tmp_path / "c.zarr"), "--arch", "resnet18", "--views", "1",
                                 "--image-size", "32", "--codec", "fp16", "--workers", "0", "--renderer", "gpu",
                                 "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "decoded: 25 cpu" in r.output  # the first shard's 25 samples, each decoded once
    assert cache_mod.open_cache(tmp_path / "c.zarr").meta.renderer.name == "gpu"
