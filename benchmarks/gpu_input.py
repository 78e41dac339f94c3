"""The gpu renderer's input path: decode + crop alone, the bytes path of the loader, and the three training modes.

On the device it reads: nvImageCodec's hardware decoder (pip install "dkd-cache[gpu]") decodes in the main process,
render_batch crops, resizes and flips whole batches on the GPU. On a CPU host the same code runs with the CPU
decoder standing in (smaller sizes): the figures then say what the main process costs there, not the GPU's rates.
Sections (the same shards, ImageNet's JPEG geometry, as benchmarks/input_path.py makes them):

  decode      a batch's compressed images -> decoded on the device (gpu_decode.decoder_for): images/s; the
              decoder's counts (hardware / CPU fallbacks by reason). Also decode + render (render_encoded, the
              whole main-process work per batch) and render alone on images already decoded. Checks, not timed:
              a view's pixels equal over two runs and whatever the batch (a batch and its reverse, half batches).
  worker      the gpu renderer's worker stage alone, one process: tar read, parse, header guard, view draw and the
              group's Encoded (no decode): us per image.
  loader      the training path up to the uint8 batch on the device with the gpu renderer (workers ship bytes,
              the main process decodes and renders): images/s with a null step; beside it the cpu renderer's.
  train       train-student images/s with the gpu renderer: CE, DKD from a cache dumped with the gpu renderer,
              DKD with a live ResNet-34 teacher (ResNet-18 student); and that dump's views/s.
  memory      the peak device memory of the decode + render section (CUDA only).

    python benchmarks/gpu_input.py --json benchmarks/results/gpu-input-cpu.json        # CPU, small
    python benchmarks/gpu_input.py --device cuda --samples 4096 --batch-size 256 --workers 12 --amp bf16 \\
        --json /tmp/gpu-input.json                                                     # one H200 / H100
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import input_path  # noqa: E402  (the ImageNet-geometry shards and the loader harness)
import throughput  # noqa: E402  (train_run, dump settings, the teacher file)

SECTIONS = ("decode", "worker", "loader", "train")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--shard-size", type=int, default=100)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--views", type=int, default=2, help="views in the training cache")
    p.add_argument("--epochs", type=int, default=2, help="epochs per training run; the last one is timed")
    p.add_argument("--repeats", type=int, default=1,
                   help="training runs per mode, interleaved; the best counts (least disturbed on a shared host)")
    p.add_argument("--train-samples", type=int, default=None, help="samples of the train section (default all)")
    p.add_argument("--train-image-size", type=int, default=None, help="train section size (default --image-size)")
    p.add_argument("--amp", default="none", choices=("none", "bf16"))
    p.add_argument("--codec", default="topk:10+q4")
    p.add_argument("--min-seconds", type=float, default=2.0, help="per timed decode/render figure")
    p.add_argument("--gen-jobs", type=int, default=2)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--sections", default=",".join(SECTIONS))
    a = p.parse_args(argv)
    a.sections = tuple(s for s in a.sections.split(",") if s)
    if set(a.sections) - set(SECTIONS):
        p.error(f"unknown sections {sorted(set(a.sections) - set(SECTIONS))}; choose from {SECTIONS}")
    a.channels_last = True
    return a


def rate(fn, items: int, device: torch.device, min_seconds: float) -> dict[str, float]:
    """fn() once to warm up, then until min_seconds (at least 2 calls): items/s (throughput.time_calls)."""
    n, dt = throughput.time_calls(fn, device.type, min_seconds, warmup=1, min_calls=2)
    return {"calls": n, "seconds": dt, "images_per_s": n * items / dt}


# ------------------------------------------------------------------------------------------------ decode
def batch_of_views(urls: list[str], a) -> tuple[Any, np.ndarray, np.ndarray]:
    """The first batch_size samples as a batch the gpu renderer's loader would hand over: Encoded + views."""
    from dkd_cache import renderers
    from dkd_cache.data import iter_raw_samples
    from dkd_cache.views import Recipe, draw_view, image_size_of

    recipe = Recipe(image_size=a.image_size)
    comp, boxes, flips = [], [], []
    for url in urls:
        for raw in iter_raw_samples(url):
            h, w = image_size_of(raw["jpg"])
            comp.append(renderers.Compressed(raw["jpg"], h, w, url, raw["__key__"]))
            *box, flip = draw_view(0, 0, raw["__key__"], h, w, recipe)
            boxes.append(box)
            flips.append(flip)
            if len(comp) == a.batch_size:
                return renderers.encode(comp), np.array(boxes, np.int64), np.array(flips, bool)
    return renderers.encode(comp), np.array(boxes, np.int64), np.array(flips, bool)


def decode_section(urls: list[str], a, device: torch.device) -> dict[str, Any]:
    from dkd_cache import gpu_decode, renderers
    from dkd_cache.views import Recipe

    recipe = Recipe(image_size=a.image_size)
    enc, boxes, flips = batch_of_views(urls, a)
    n = len(enc)
    decoder = gpu_decode.decoder_for(device)
    members = enc.members()
    dec = decoder.decode(members)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out: dict[str, Any] = {"decoder": decoder.name, "batch": n,
                           "mean_kb": float(np.mean(enc.lengths)) / 1e3}
    out["decode"] = rate(lambda: decoder.decode(members), n, device, a.min_seconds)
    out["decode_render"] = rate(lambda: renderers.render_encoded(enc, boxes, flips, recipe, device), n, device,
                                a.min_seconds)
    out["render"] = rate(lambda: renderers.render_batch(dec.images, boxes, flips, recipe, device, layout=dec.layout),
                         n, device, a.min_seconds)
    out["decoder_counts"] = dict(decoder.counts)
    if device.type == "cuda":
        out["peak_device_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    # determinism, not timed: two runs; the batch reversed; two half batches
    x = renderers.render_encoded(enc, boxes, flips, recipe, device)
    again = renderers.render_encoded(enc, boxes, flips, recipe, device)
    rev = renderers.render_batch(dec.images[::-1], boxes[::-1], flips[::-1], recipe, device, layout=dec.layout)
    half = n // 2
    halves = torch.cat([renderers.render_encoded(enc.slice(0, half), boxes[:half], flips[:half], recipe, device),
                        renderers.render_encoded(enc.slice(half, n), boxes[half:], flips[half:], recipe, device)])
    out["identical_over_reruns"] = bool(torch.equal(x, again))
    out["independent_of_batch"] = bool(torch.equal(rev.flip(0), x) and torch.equal(halves, x))
    if device.type == "cuda":  # the same views through the CPU decoder: how far nvImageCodec's pixels are
        cpu = renderers.render_batch(gpu_decode.CpuDecoder("cpu").decode(members).images, boxes, flips, recipe, "cpu")
        out["pixels_vs_cpu_decoder_mean_abs"] = float((x.cpu().int() - cpu.int()).abs().float().mean())
    return out


# ------------------------------------------------------------------------------------------------ worker
def worker_section(urls: list[str], a, cache_path: str, repeat: int = 20) -> dict[str, Any]:
    """The gpu renderer's worker stream, one process, no decode: us per image. Then the main process's share of the
    bytes path without the decode (the device's work): groups -> batches (loader.batches) -> each image's bytes
    (what the decoder takes), the groups already in memory, repeated: images/s with a null step."""
    from dkd_cache.loader import batches, group_items, plan_epoch, worker_items

    spec, sizes = input_path.project_spec(cache_path, urls, a, renderer="gpu")
    plan = plan_epoch(sizes, seed=0, epoch=0, world=1, rank=0, workers=1)
    t0 = time.perf_counter()
    groups = list(group_items(worker_items(spec, plan.workers[0], 0, 0), spec.block))
    dt = time.perf_counter() - t0
    n = sum(len(g) for g in groups)

    def ingest() -> int:
        m = 0
        for batch in batches(groups * repeat, a.batch_size):
            batch.images.members()  # the bytes the decoder reads
            m += len(batch)
            batch.release()
        return m

    return {"images": n, "us_per_image": 1e6 * dt / n, "images_per_s": n / dt,
            "main_without_decode": input_path.timed(ingest)}


# ------------------------------------------------------------------------------------------------ loader
def loader_section(urls: list[str], a, cache_path: str, device: torch.device) -> dict[str, Any]:
    out = {}
    for renderer in ("gpu", "cpu"):
        spec, sizes = input_path.project_spec(cache_path, urls, a, renderer=renderer)
        out[renderer] = input_path.timed(lambda: input_path.project_loader(spec, sizes, a, device,
                                                                          null_step=lambda *x: None))
    return out


# ------------------------------------------------------------------------------------------------ train
def train_section(shards: str, a, work: Path) -> dict[str, Any]:
    from dkd_cache import cache as cache_mod

    t = argparse.Namespace(**{**vars(a), "image_size": a.train_image_size or a.image_size})
    weights = throughput.make_teacher(work / "teacher.pt")
    cache = work / "gpu-cache.zarr"
    shutil.rmtree(cache, ignore_errors=True)
    settings = throughput.dump_settings(t, shards, weights, cache, a.codec, a.views)
    import dataclasses

    dump = throughput.timed_dump(dataclasses.replace(settings, renderer="gpu"))
    meta = cache_mod.open_cache(cache).meta
    out: dict[str, Any] = {"dump": dump, "cache_renderer": meta.renderer.to_dict()}
    for r in range(a.repeats):
        for mode in ("ce", "cached", "live"):
            run_dir = work / f"train-{mode}-{r}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run = throughput.train_run(t, shards, str(cache), run_dir, mode, weights, renderer="gpu")
            if mode not in out or run["images_per_s"] > out[mode]["images_per_s"]:
                out[mode] = run
    return out


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict[str, Any]:
    a = parse_args(argv)
    device = torch.device(a.device)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="gpu-input-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"args": {k: v for k, v in vars(a).items()},
                           "host": {"machine": platform.machine(), "torch": torch.__version__,
                                    "cpus": len(__import__("os").sched_getaffinity(0)),
                                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}}
    try:
        shard_list, mean_bytes = input_path.make_imagenet_shards(work / "shards", a.samples, a.shard_size, a.gen_jobs)
        urls = [u for u in Path(shard_list).read_text().split()]
        res["shards"] = {"samples": a.samples, "mean_kb": mean_bytes / 1e3}
        cache_path = None
        if {"worker", "loader"} & set(a.sections):
            cache_path = str(work / "null-cache.zarr")
            input_path.null_teacher_dump(argparse.Namespace(**{**vars(a), "dump_batch_size": a.batch_size,
                                                               "codec": a.codec}), shard_list, Path(cache_path))
        if "decode" in a.sections:
            res["decode"] = decode_section(urls, a, device)
        if "worker" in a.sections:
            res["worker"] = worker_section(urls, a, cache_path)
        if "loader" in a.sections:
            res["loader"] = loader_section(urls, a, cache_path, device)
        if "train" in a.sections:
            train_urls = urls if a.train_samples is None else urls[:max(1, -(-a.train_samples // a.shard_size))]
            train_list = work / "train-shards.txt"
            train_list.write_text("".join(u + "\n" for u in train_urls))
            res["train"] = train_section(str(train_list), a, work)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(render(res))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=1, default=str))
    return res


def render(res: dict[str, Any]) -> str:
    h = res["host"]
    lines = [f"gpu renderer input path on {h['device']} ({h['cpus']} CPUs, torch {h['torch']}), "
             f"{res['args']['samples']} ImageNet-geometry JPEGs ({res['shards']['mean_kb']:.0f} KB mean), "
             f"{res['args']['image_size']} px, batch {res['args']['batch_size']}"]
    d = res.get("decode")
    if d:
        lines += [f"  decoder: {d['decoder']}",
                  f"  decode alone            {d['decode']['images_per_s']:>10,.0f} images/s",
                  f"  decode + crop/resize    {d['decode_render']['images_per_s']:>10,.0f} images/s",
                  f"  crop/resize alone       {d['render']['images_per_s']:>10,.0f} images/s",
                  f"  decoder counts: {d['decoder_counts']}",
                  f"  identical over reruns: {d['identical_over_reruns']}; independent of the batch: "
                  f"{d['independent_of_batch']}"]
        if "peak_device_mib" in d:
            lines.append(f"  peak device memory {d['peak_device_mib']:,.0f} MiB; pixels vs the CPU decoder: mean abs "
                         f"{d['pixels_vs_cpu_decoder_mean_abs']:.5f}")
    w = res.get("worker")
    if w:
        lines.append(f"  worker stage (read, parse, header, draw, group; no decode): {w['us_per_image']:.0f} us/image "
                     f"({w['images_per_s']:,.0f} images/s per worker)")
        lines.append(f"  main process, bytes path without the decode (batches, bytes out), null step: "
                     f"{w['main_without_decode']['images_per_s']:,.0f} images/s")
    lo = res.get("loader")
    if lo:
        for r, v in lo.items():
            lines.append(f"  loader to the uint8 batch, null step, {r} renderer: "
                         f"{v['images'] / v['seconds']:>8,.0f} images/s")
    t = res.get("train")
    if t:
        lines.append(f"  dump-teacher, gpu renderer: {t['dump']['loop_views_per_s']:,.0f} views/s (teacher loop)")
        for mode in ("ce", "cached", "live"):
            lines.append(f"  train {mode:<7} gpu renderer: {t[mode]['images_per_s']:>8,.0f} images/s")
        lines.append(f"  cached / live {t['cached']['images_per_s'] / t['live']['images_per_s']:.2f}, "
                     f"cached / CE {t['cached']['images_per_s'] / t['ce']['images_per_s']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
