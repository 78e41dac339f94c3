"""Throughput benchmark: does the cache make distillation cost what CE-only training costs?

In one run, on the same synthetic shards (dkd_cache.synth, 100 classes) and the same ResNet-18 student /
ResNet-34 teacher (random init: speed does not depend on the weights), it measures:

  train     images/s of train-student in three modes on the same stored views: CE only (``loss="ce"`` with the
            cache), DKD from the cache, DKD with the live teacher. The figure is the epoch record's
            ``images_per_s`` (run_dir/metrics.jsonl) of the last of ``--epochs`` epochs (the first pays start-up);
            with ``--repeats N`` each mode runs N times, interleaved, and the best figure counts (least disturbed
            by other work on a shared machine).
  dump      views/s of dump-teacher, timed around its teacher loop (dkd_cache.dump.run_stages: excludes the shard scan,
            teacher load and store creation; includes render workers, encode and Zarr writes), against the
            teacher's bare inference images/s on normalised tensors already in memory (same batch, channels_last,
            inference_mode, same autocast). Two dumps run (--codec and topk:10); the faster loop is compared.
            DumpReport.views_per_s (whole call) is printed beside it.
  read      cache read rate, views/s, through the training path's reads (dkd_cache.loader._cache_rows: one
            view of every array training joins, a tar shard at a time, with the key decode and fill checks),
            and bare Cache.read_rows of the same arrays, against the rate training consumes them. Measured on
            this run's cache (small shards: a fixed cost per array read dominates) and on a cache of ImageNet's
            geometry written without a teacher (random logits, 1,000 classes, 1,000 samples per tar shard,
            chunk_rows 256 as the product's default; and 1024, one chunk per tar shard), which the target is
            judged on (at 256).
  decode    logit_codecs decode of one batch, and decode + cached DKD loss forward/backward, as % of a step.
  bytes     bytes per view on disk (dkd_cache.inspect.describe: logits/ and views/ arrays, metadata files
            included) for the default codec (topk:10+q4: DumpSettings, CLI, pipelines) and topk:10,
            plus the chunk data alone (zarr.json excluded: it is a constant per array).
  rss       peak RSS (VmHWM of the main process; ru_maxrss of its largest DataLoader worker) of dump-teacher
            (topk:10, one view) and of one epoch of cached DKD training, each in a fresh subprocess, at N and
            10 N samples, at --rss-image-size (default 64 px to keep the 10 N run short: a smaller image makes the
            fixed part of memory smaller, so growth with the dataset shows more, not less).

  input     (benchmarks/input_path.py, in the same run unless --no-input-path) the input path on ImageNet
            geometry at 224 px: the bare loader (webdataset + torchvision.io + v2 RandomResizedCrop + flip) against
            the project's loader, the main process's ingest with a null model step, dump-teacher's main process
            with a null teacher, views per decode 1 and 4, the student at 160 and 224 px, the cost of each stage
            of a step, and the bottleneck named from those rates.

The training shards have ImageNet's JPEG geometry by default (--geometry imagenet: ~400x350 px, q90, ~100 KB;
--geometry small: the 48-160 px images of dkd_cache.synth). Then a table of ratios against the targets. No test
asserts any of these timings.

Reproduce (2 CPU cores, a few minutes):
    .venv/bin/python benchmarks/throughput.py --json /tmp/throughput.json
On one GPU (what benchmarks/gpu_check.sh runs, about 2-3 minutes):
    python3 benchmarks/throughput.py --device cuda --amp bf16 --channels-last --image-size 224 --batch-size 128 \\
        --samples 9600 --shard-size 400 --workers 12 --gen-jobs 16 --renderers cpu,device --input-samples 2400 \\
        --rss-samples 800 --rss-image-size 224 \\
        --json throughput-gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import input_path  # noqa: E402  (benchmarks/input_path.py)

CLASSES = 100
TARGETS = {"cached_over_ce": 0.95, "dump_over_bare": 0.85, "read_over_consume": 50.0, "topk10_bytes": 64.0,
           "rss_growth": 0.20}


# ------------------------------------------------------------------------------------------------ inputs
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=32, help="train batch and dump teacher batch")
    p.add_argument("--samples", type=int, default=300, help="train samples (rounded up to a multiple of 100)")
    p.add_argument("--shard-size", type=int, default=100, help="samples per tar shard (also the cache's chunk_rows)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per training run; the last one is timed")
    p.add_argument("--repeats", type=int, default=1, help="training runs per mode (interleaved; best counts)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for dump and training")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", default="none", choices=("none", "bf16"))
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--codec", default="topk:10+q4",
                   help="codec of the cache training reads (topk:10+q4: cheap to dump; input_path.py measures "
                        "dump-teacher's own default codec)")
    p.add_argument("--renderers", default="cpu",
                   help="comma-separated renderers the three training modes run with (cpu, device); the cache is "
                        "written with cpu, so device trains with allow_other_renderer (a speed figure only)")
    p.add_argument("--rss-samples", type=int, default=200, help="N of the peak-RSS runs (also run at --rss-factor N)")
    p.add_argument("--rss-factor", type=int, default=10)
    p.add_argument("--rss-image-size", type=int, default=64, help="image size of the peak-RSS runs")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocess runs")
    p.add_argument("--gen-jobs", type=int, default=1,
                   help="processes making synthetic shards; 1 uses dkd_cache.synth.make_shards as is")
    p.add_argument("--geometry", default="imagenet", choices=("imagenet", "small"),
                   help="training shards: ImageNet's JPEG geometry (~400x350, ~100 KB) or small synthetic images")
    p.add_argument("--input-path", action=argparse.BooleanOptionalAction, default=True,
                   help="also run benchmarks/input_path.py (ImageNet geometry, 224 px) in this run")
    p.add_argument("--input-samples", type=int, default=800, help="samples of the input-path section")
    p.add_argument("--workdir", default=None, help="keep shards, caches and runs here (default: a temp dir, removed)")
    p.add_argument("--json", dest="json_out", default=None, help="write every figure to this JSON file")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)  # internal: one measured subprocess
    a = p.parse_args(argv)
    a.renderers = tuple(dict.fromkeys(r.strip() for r in a.renderers.split(",") if r.strip()))
    if not a.renderers or set(a.renderers) - {"cpu", "device"}:
        p.error(f"--renderers {','.join(a.renderers)!r}: choose from cpu, device")
    if "cpu" not in a.renderers:
        p.error("--renderers must include cpu (the targets are judged on it)")
    a.samples = -(-a.samples // CLASSES) * CLASSES
    a.rss_samples = -(-a.rss_samples // CLASSES) * CLASSES
    return a


def make_dataset(out: Path, samples: int, shard_size: int, jobs: int = 1, seed: int = 0) -> str:
    """Synthetic train shards (100 classes, samples/100 per class); returns the train.txt shard list."""
    from dkd_cache import synth

    per_class = samples // CLASSES
    if jobs <= 1:
        synth.make_shards(out, classes=CLASSES, train_per_class=per_class, val_per_class=1, shard_size=shard_size,
                          seed=seed)
        return str(out / "train.txt")
    # Same samples as make_shards' train split (same seeded order and sample encoder), shards written in parallel.
    specs = synth.class_specs(CLASSES, seed)
    order = [(c, j) for c in range(CLASSES) for j in range(per_class)]
    perm = np.random.default_rng(np.random.SeedSequence([seed, synth.SPLITS["train"], synth._ORDER_TAG])
                                 ).permutation(len(order))
    order = [order[i] for i in perm.tolist()]
    (out / "train").mkdir(parents=True, exist_ok=True)
    parts = [(out / "train" / f"train-{n:06d}.tar", order[s:s + shard_size], seed)
             for n, s in enumerate(range(0, len(order), shard_size))]
    with ProcessPoolExecutor(jobs) as pool:
        list(pool.map(_write_shard, [(str(p), o, sd, specs) for p, o, sd in parts]))
    (out / "train.txt").write_text("".join(f"{p}\n" for p, _, _ in parts))
    return str(out / "train.txt")


def _write_shard(job) -> None:
    from dkd_cache import synth

    path, order, seed, specs = job
    samples = [synth.encode_sample(specs[c], "train", c, j, seed=seed, min_side=48, max_side=160) for c, j in order]
    synth._write_shard_webdataset(Path(path), samples)


def make_teacher(path: Path, arch: str = "resnet34", seed: int = 0) -> str:
    from dkd_cache.checkpoint import save_checkpoint
    from dkd_cache.teacher import build_model

    torch.manual_seed(seed)
    save_checkpoint(path, model=build_model(arch, CLASSES).state_dict())
    return str(path)


def _recipe(a: argparse.Namespace):
    from dkd_cache.views import Recipe

    return Recipe(image_size=a.image_size)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, device: str, min_seconds: float, *, warmup: int, min_calls: int) -> tuple[int, float]:
    """Call fn `warmup` times, then until both min_seconds and min_calls are reached: (calls, seconds)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        _sync(device)
        dt = time.perf_counter() - t0
        if dt >= min_seconds and n >= min_calls:
            return n, dt


# ------------------------------------------------------------------------------------------------ dump
def dump_settings(a: argparse.Namespace, shards: str, weights: str, out: Path, codec: str, views: int):
    from dkd_cache.dump import DumpSettings

    return DumpSettings(shards=shards, weights=weights, out=str(out), arch="resnet34", views=views, codec=codec,
                        temperatures=(1.0,), recipe=_recipe(a), batch_size=a.batch_size, workers=a.workers,
                        device=a.device, chunk_rows=a.shard_size, amp=a.amp)


def timed_dump(settings) -> dict[str, Any]:
    """dump_teacher, with its teacher loop (dump.run_stages) timed on its own."""
    from dkd_cache import dump as dump_mod

    loop: dict[str, float] = {}
    original = dump_mod.run_stages

    def run(*args, **kwargs):
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        loop["seconds"] = time.perf_counter() - t0
        return out

    dump_mod.run_stages = run
    try:
        report = dump_mod.dump_teacher(settings, progress=False)
    finally:
        dump_mod.run_stages = original
    return {"codec": settings.codec, "views_written": report.views_written, "seconds": report.seconds,
            "views_per_s": report.views_per_s, "loop_seconds": loop["seconds"],
            "loop_views_per_s": report.views_written / loop["seconds"]}


def bare_inference(a: argparse.Namespace, weights: str, min_seconds: float = 3.0) -> dict[str, Any]:
    """Teacher forward on normalised tensors already in memory: the ceiling for dump-teacher."""
    from dkd_cache.teacher import load_teacher
    from dkd_cache.views import normalize

    device = torch.device(a.device)
    model, _ = load_teacher("resnet34", weights, device=device)  # eval, channels_last, like the dump
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (a.batch_size, 3, a.image_size, a.image_size), dtype=torch.uint8, generator=gen)
    x = normalize(images.to(device), _recipe(a))
    use_bf16 = a.amp == "bf16"

    def step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            return model(x).float()

    n, dt = time_calls(step, a.device, min_seconds, warmup=2, min_calls=5)
    return {"batches": n, "seconds": dt, "images_per_s": n * a.batch_size / dt}


# ------------------------------------------------------------------------------------------------ train
def train_run(a: argparse.Namespace, shards: str, cache: str, out: Path, mode: str, teacher: str | None,
              epochs: int | None = None, renderer: str = "cpu") -> dict[str, Any]:
    """One train_student run; returns its epoch records (from metrics.jsonl) and the last epoch's images/s."""
    from dkd_cache.train import TrainConfig, train_student

    cfg = TrainConfig(shards=shards, out=str(out), cache=cache, arch="resnet18",
                      loss="ce" if mode == "ce" else "dkd", live_teacher=teacher if mode == "live" else None,
                      teacher_arch="resnet34", epochs=epochs or a.epochs, batch_size=a.batch_size,
                      workers=a.workers, amp=a.amp, channels_last=a.channels_last, device=a.device,
                      renderer=renderer, allow_other_renderer=renderer != "cpu")
    c0 = sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
             for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    t0 = time.perf_counter()
    train_student(cfg, progress=False)
    wall = time.perf_counter() - t0
    cpu = sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
              for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) - c0  # workers counted once they exit
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs_rec = [r for r in records if r.get("event") == "epoch"]
    return {"mode": mode, "wall_seconds": wall, "epoch_images_per_s": [r["images_per_s"] for r in epochs_rec],
            "epoch_seconds": [r["seconds"] for r in epochs_rec], "images_per_s": epochs_rec[-1]["images_per_s"],
            "steps_per_epoch": epochs_rec[-1]["steps"], "cpu_seconds": cpu,
            "images_per_cpu_s": sum(r["steps"] for r in epochs_rec) * a.batch_size / max(cpu, 1e-9)}


# ------------------------------------------------------------------------------------------------ cache reads
def entry_arrays(cache) -> tuple[str, ...]:
    """What cached DKD training joins per sample (train_setup's list: views/aug, logits/target_b where present)."""
    from dkd_cache.train_setup import entry_arrays_of

    return entry_arrays_of(cache, teacher_entries=True)


def cache_read_rate(cache_path: str, min_seconds: float = 1.0) -> dict[str, Any]:
    from dkd_cache import cache as cache_mod
    from dkd_cache.loader import StreamSpec, _cache_rows

    cache = cache_mod.open_cache(cache_path)
    names = entry_arrays(cache)
    spec = StreamSpec(urls=(), recipe=cache.meta.recipe, seed=0, epoch=0, view=0, rank=0, cache_path=cache_path,
                      entry_arrays=names, num_classes=cache.meta.num_classes)
    shards = cache.meta.manifest.shards
    out: dict[str, Any] = {"arrays": list(names), "shards": len(shards)}
    for label, fn in (("training_path", lambda i: _cache_rows(cache, i, spec)),
                      ("read_rows", lambda i: [cache.read_rows(n, shards[i].row_start, shards[i].row_stop, view=0)
                                               for n in names])):
        views, passes, t0 = 0, 0, time.perf_counter()
        while True:
            for i in range(len(shards)):
                fn(i)
                views += shards[i].samples
            passes += 1
            dt = time.perf_counter() - t0
            if dt >= min_seconds:
                break
        out[f"{label}_views_per_s"] = views / dt
        out[f"{label}_passes"] = passes
    return out


def imagenet_geometry_cache(path: Path, codec_spec: str, *, shards: int = 4, per_shard: int = 1000,
                            classes: int = 1000, chunk_rows: int = 256, seed: int = 0) -> str:
    """A complete cache shaped like an ImageNet one (1,000 classes, ~1,000 samples per tar shard), one view,
    written through the cache module with random logits (no teacher, no images): for timing reads only."""
    from dkd_cache import FORMAT_VERSION
    from dkd_cache import cache_meta, cache_writer
    from dkd_cache.data import ShardIndex
    from dkd_cache.logit_codecs import parse_codec
    from dkd_cache.teacher import TeacherInfo
    from dkd_cache.views import Recipe

    rng = np.random.default_rng(seed)
    codec = parse_codec(codec_spec, classes)
    arrays = codec.arrays(classes)
    indexes = [ShardIndex(url=f"/nonexistent/train-{i:06d}.tar", name=f"train-{i:06d}.tar",
                          keys=tuple(f"n{i:04d}_{j:08d}" for j in range(per_shard)),
                          labels=tuple(int(x) for x in rng.integers(0, classes, per_shard))) for i in range(shards)]
    meta = cache_meta.CacheMeta(
        format_version=FORMAT_VERSION,
        teacher=TeacherInfo(arch="resnet34", sha256="0" * 64, num_classes=classes, source_format="torchvision"),
        recipe=Recipe(), seed=seed, views=1, codec=codec, temperatures=(1.0,), chunk_rows=chunk_rows,
        manifest=cache_meta.build_manifest(indexes, chunk_rows), versions=cache_meta.library_versions())
    if codec.learned:  # fitted on logits drawn like the rows below (timing only: the fit's quality is irrelevant)
        codec = codec.fit(torch.from_numpy(rng.normal(0, 2, (max(1024, 2 * classes), classes)).astype(np.float32)))
        meta = dataclasses.replace(meta, codec=codec)
    cache = cache_writer.create_cache(path, meta, indexes, arrays, codec.state_arrays())
    for i, e in enumerate(cache.meta.manifest.shards):
        rows = e.row_stop - e.row_start
        z = torch.from_numpy(rng.normal(0, 2, (rows, classes)).astype(np.float32))
        labels = np.zeros(rows, np.int64)
        labels[:e.samples] = indexes[i].labels
        block = {"samples/height": np.full(rows, 375, np.int32), "samples/width": np.full(rows, 500, np.int32),
                 "views/box": rng.integers(0, 300, (1, rows, 4)).astype(np.uint16),
                 "views/flip": rng.integers(0, 2, (1, rows)).astype(np.uint8),
                 "logits/target": z.gather(1, torch.from_numpy(labels)[:, None]).numpy().reshape(1, rows),
                 "logits/lse": torch.logsumexp(z, 1).numpy().reshape(1, rows, 1)}
        block.update({f"logits/{n}": v[None] for n, v in codec.encode(z).items()})
        cache_writer.write_shard(cache, i, block, {"shard": e.name, "samples": e.samples, "skipped": [], "views": 1})
    cache_writer.finalize(cache)
    return str(path)


# ------------------------------------------------------------------------------------------------ decode cost
def decode_cost(a: argparse.Namespace, cache_path: str, min_seconds: float = 1.0) -> dict[str, Any]:
    """Time codec.decode on one batch of cache entries, and decode + cached DKD loss forward/backward."""
    from dkd_cache import cache as cache_mod
    from dkd_cache.teacher_signal import Storage, dkd_from_entries

    cache = cache_mod.open_cache(cache_path)
    meta, b = cache.meta, a.batch_size
    codec = cache.codec
    device = torch.device(a.device)
    names = [n for n in entry_arrays(cache) if n.startswith("logits/")]
    rows_needed, shard_rows = b, []
    for e in meta.manifest.shards:  # enough rows for one batch, gathered over shards like the loader does
        shard_rows.append({n: cache.read_rows(n, e.row_start, e.row_start + e.samples, view=0) for n in names})
        rows_needed -= e.samples
        if rows_needed <= 0:
            break
    entries = {n: torch.from_numpy(np.concatenate([s[n] for s in shard_rows])[:b]) for n in names}
    labels_np = np.concatenate([cache.read_rows("samples/label", e.row_start, e.row_start + e.samples)
                                for e in meta.manifest.shards[:len(shard_rows)]])[:b]
    labels = torch.from_numpy(labels_np.astype(np.int64)).to(device)
    codec_arrays = {n.split("/", 1)[1]: t.to(device) for n, t in entries.items()
                    if n not in ("logits/target", "logits/lse")}
    storage = Storage.of_cache(cache)
    student = torch.randn(b, meta.num_classes, device=device, generator=None)

    def decode():
        return codec.decode(codec_arrays, meta.num_classes)

    def loss_fwd_bwd():
        s = student.clone().requires_grad_(True)
        dkd_from_entries(s, labels, entries, storage, alpha=1.0, beta=0.5, temperature=1.0).backward()

    out: dict[str, Any] = {"codec": codec.name, "batch": b}
    for label, fn in (("decode", decode), ("decode_loss_fwd_bwd", loss_fwd_bwd)):
        n, dt = time_calls(fn, a.device, min_seconds, warmup=3, min_calls=10)
        out[f"{label}_ms"] = 1000 * dt / n
    return out


# ------------------------------------------------------------------------------------------------ bytes
def bytes_per_view(cache_path: str) -> dict[str, Any]:
    from dkd_cache.inspect import describe

    info = describe(cache_path)
    total_views = info["samples"] * info["views"]
    data = sum(p.stat().st_size for sub in ("logits", "views") for p in (Path(cache_path) / sub).rglob("*")
               if p.is_file() and p.name != "zarr.json")
    return {"codec": info["codec"], "views": total_views, "bytes_per_view": info["bytes_per_view"],
            "data_bytes_per_view": data / max(total_views, 1), "bytes_on_disk": info["bytes_on_disk"]}


# ------------------------------------------------------------------------------------------------ peak RSS
def _rss_child(spec_json: str) -> None:
    """Run one dump or one training in this (fresh) process; print its peak RSS as the last line."""
    spec = json.loads(spec_json)
    a = argparse.Namespace(**spec["args"])
    if a.threads:
        torch.set_num_threads(a.threads)
    if spec["stage"] == "dump":
        r = timed_dump(dump_settings(a, spec["shards"], spec["weights"], Path(spec["out"]), spec["codec"], 1))
    else:
        r = train_run(a, spec["shards"], spec["cache"], Path(spec["out"]), "cached", None, epochs=1)
    status = Path("/proc/self/status").read_text()
    hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
    print("RSS " + json.dumps({
        "vmhwm_kib": hwm, "self_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "workers_maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "result": r}), flush=True)


def rss_run(stage: str, spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--rss-child", json.dumps({"stage": stage, **spec})]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-RSS {stage} subprocess failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RSS ")][-1]
    out = json.loads(line[4:])
    out["wall_seconds"] = time.perf_counter() - t0
    return out


def rss_study(a: argparse.Namespace, work: Path, weights: str) -> dict[str, Any]:
    child_args = {k: v for k, v in vars(a).items() if k not in ("rss_child",)}
    child_args["image_size"] = a.rss_image_size
    out: dict[str, Any] = {}
    for scale in (1, a.rss_factor):
        n = a.rss_samples * scale
        d = work / f"rss-{n}"
        shards = make_dataset(d / "shards", n, a.shard_size, a.gen_jobs, seed=1)
        cache = d / "teacher.zarr"
        dump = rss_run("dump", {"args": child_args, "shards": shards, "weights": weights, "out": str(cache),
                                "codec": "topk:10"})
        train = rss_run("train", {"args": child_args, "shards": shards, "cache": str(cache), "out": str(d / "run")})
        out[str(n)] = {"samples": n, "dump": dump, "train": train, "bytes": bytes_per_view(str(cache))}
    return out


# ------------------------------------------------------------------------------------------------ report
def _growth(rss: dict[str, Any], stage: str, key: str) -> float:
    lo, hi = (rss[k][stage][key] for k in sorted(rss, key=int))
    return (hi - lo) / lo


def summarise(res: dict[str, Any]) -> list[dict[str, Any]]:
    t = res["train"]
    ce, cached, live = (t[m]["best_images_per_s"] for m in ("ce", "cached", "live"))
    dumps = res["dump"]
    main_dump = max(dumps.values(), key=lambda d: d["loop_views_per_s"])
    bare = res["bare_inference"]["images_per_s"]
    read = res["cache_read"]["training_path_views_per_s"]
    read_in = res["cache_read_imagenet"]["256"]["training_path_views_per_s"]
    read_in_1024 = res["cache_read_imagenet"]["1024"]["training_path_views_per_s"]
    ce_c, cached_c, live_c = (t[m].get("best_images_per_cpu_s", float("nan")) for m in ("ce", "cached", "live"))
    rows = [
        {"metric": "train cached DKD / CE (images per CPU-second, whole runs: robust on a shared machine)",
         "value": cached_c / ce_c, "target": ">= 0.95", "pass": cached_c / ce_c >= TARGETS["cached_over_ce"],
         "detail": f"{cached_c:.1f} / {ce_c:.1f}"},
        {"metric": "train cached / live teacher (images per CPU-second, whole runs)", "value": cached_c / live_c,
         "target": f">= 0.95 * CE/live = {0.95 * ce_c / live_c:.3f}", "pass": cached_c / live_c >= 0.95 * ce_c / live_c,
         "detail": f"{cached_c:.1f} / {live_c:.1f}; CE/live = {ce_c / live_c:.3f}"},
        {"metric": "train cached DKD / CE (images/s)", "value": cached / ce, "target": ">= 0.95",
         "pass": cached / ce >= TARGETS["cached_over_ce"], "detail": f"{cached:.1f} / {ce:.1f}"},
        {"metric": "train cached / live teacher", "value": cached / live,
         "target": f">= 0.95 * CE/live = {0.95 * ce / live:.3f}", "pass": cached / live >= 0.95 * ce / live,
         "detail": f"{cached:.1f} / {live:.1f}; CE/live = {ce / live:.3f}"},
        {"metric": "dump loop / bare teacher inference", "value": main_dump["loop_views_per_s"] / bare,
         "target": ">= 0.85", "pass": main_dump["loop_views_per_s"] / bare >= TARGETS["dump_over_bare"],
         "detail": f"{main_dump['loop_views_per_s']:.1f} / {bare:.1f} views/s ({main_dump['codec']}); whole call "
                   f"{main_dump['views_per_s']:.1f}/s"},
        {"metric": "cache read / training consume (ImageNet geometry)", "value": read_in / cached, "target": ">= 50x",
         "pass": read_in / cached >= TARGETS["read_over_consume"],
         "detail": f"{read_in:,.0f} / {cached:.1f} views/s, 1,000 samples/shard, 1,000 classes, {a_codec(res)}, "
                   f"chunk_rows 256 (bare read_rows {res['cache_read_imagenet']['256']['read_rows_views_per_s']:,.0f}"
                   f"); chunk_rows 1024: {read_in_1024:,.0f} views/s = {read_in_1024 / cached:,.0f}x"},
        {"metric": "cache read / training consume (this run's cache)", "value": read / cached, "target": ">= 50x",
         "pass": read / cached >= TARGETS["read_over_consume"],
         "detail": f"{read:,.0f} / {cached:.1f} views/s, {res['config']['shard_size']} samples/shard "
                   f"(bare read_rows {res['cache_read']['read_rows_views_per_s']:,.0f})"},
    ]
    for r in sorted({k.partition("/")[2] for k in t} - {""}):  # the same targets with another renderer
        ce_r, cached_r, live_r = (t[f"{m}/{r}"]["best_images_per_s"] for m in ("ce", "cached", "live"))
        rows += [
            {"metric": f"train cached DKD / CE (images/s), renderer {r}", "value": cached_r / ce_r, "target": ">= 0.95",
             "pass": cached_r / ce_r >= TARGETS["cached_over_ce"], "detail": f"{cached_r:.1f} / {ce_r:.1f}"},
            {"metric": f"train cached / live teacher, renderer {r}", "value": cached_r / live_r,
             "target": f">= 0.95 * CE/live = {0.95 * ce_r / live_r:.3f}",
             "pass": cached_r / live_r >= 0.95 * ce_r / live_r,
             "detail": f"{cached_r:.1f} / {live_r:.1f}; CE/live = {ce_r / live_r:.3f}"},
            {"metric": f"train cached DKD, renderer {r} / cpu (images/s)", "value": cached_r / cached,
             "target": "(info)", "pass": None, "detail": f"{cached_r:.1f} / {cached:.1f}"}]
    for key, d in res["decode"].items():
        step_ms = 1000 * d["batch"] / cached
        rows.append({"metric": f"decode {d['codec']} per batch / train step", "value": d["decode_ms"] / step_ms,
                     "target": "(info)", "pass": None,
                     "detail": f"{d['decode_ms']:.2f} ms of {step_ms:.0f} ms; decode+loss fwd/bwd "
                               f"{d['decode_loss_fwd_bwd_ms']:.2f} ms = {100 * d['decode_loss_fwd_bwd_ms'] / step_ms:.2f}%"})
    b = res["bytes"]
    topk10 = [v for v in b.values() if v["codec"] == {"kind": "topk", "k": 10, "tail_bits": 0}]
    best = max(topk10, key=lambda v: v["views"])
    rows.append({"metric": "bytes per view at topk:10", "value": best["bytes_per_view"], "target": "<= 64",
                 "pass": best["bytes_per_view"] <= TARGETS["topk10_bytes"],
                 "detail": f"{best['views']} views; chunk data alone {best['data_bytes_per_view']:.1f}; "
                           + "; ".join(f"{k}: {v['bytes_per_view']:.1f} ({v['views']} views)" for k, v in b.items())})
    if res.get("rss"):
        rss = res["rss"]
        ns = sorted(rss, key=int)
        for stage in ("dump", "train"):
            g = _growth(rss, stage, "vmhwm_kib")
            gw = _growth(rss, stage, "workers_maxrss_kib")
            lo, hi = (rss[n][stage] for n in ns)
            rows.append({"metric": f"peak RSS growth {ns[0]} -> {ns[1]} samples, {stage}", "value": g,
                         "target": "<= 20%", "pass": g <= TARGETS["rss_growth"] and gw <= TARGETS["rss_growth"],
                         "detail": f"main {lo['vmhwm_kib'] / 1024:.0f} -> {hi['vmhwm_kib'] / 1024:.0f} MiB; "
                                   f"largest worker {lo['workers_maxrss_kib'] / 1024:.0f} -> "
                                   f"{hi['workers_maxrss_kib'] / 1024:.0f} MiB ({100 * gw:+.1f}%)"})
    if res.get("input_path"):
        ip = res["input_path"]["summary"]
        for name, key, target, cmp in (
                ("input: project loader / bare loader (224 px, ImageNet geometry)", "project_over_bare", 0.9, ">="),
                ("input: main-process ingest, null step (images/s)", "ingest_images_per_s", 10_000, ">="),
                ("input: main-process host work per image through workers (us)", "ingest_main_us_per_image", 100,
                 "<="),
                ("input: dump writer, null teacher, encode + write (views/s)", "dump_views_per_s", 20_000, ">="),
                ("input: views per CPU-s, views-per-decode 4 / 1", "vpd4_over_vpd1", 2.5, ">="),
                ("input: student 160 px / 224 px (images/s)", "s160_over_s224", 1.6, ">=")):
            ok = ip[key] >= target if cmp == ">=" else ip[key] <= target
            rows.append({"metric": name, "value": ip[key], "target": f"{cmp} {target:,}", "pass": ok,
                         "detail": "", "format": "{:,.2f}"})
        rows.append({"metric": "input: bottleneck", "value": 0.0, "target": "(info)", "pass": None,
                     "detail": f"{ip['bottleneck']} (" + ", ".join(f"{k} {v:,.0f}/s" for k, v in ip["rates"].items())
                               + ")"})
    return rows


def a_codec(res: dict[str, Any]) -> str:
    return res["config"]["codec"]


def render(res: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    cfg = res["config"]
    lines = [f"dkd-cache throughput: device {cfg['device']} ({res['device_name']}), image {cfg['image_size']}, "
             f"batch {cfg['batch_size']}, {cfg['samples']} samples, {cfg['epochs']} epochs, workers {cfg['workers']}, "
             f"amp {cfg['amp']}, channels_last {cfg['channels_last']}, torch threads {res['torch_threads']}",
             "", "| mode | images/s (last epoch, per run) | best |", "|---|---|---|"]
    for m, t in res["train"].items():
        lines.append(f"| train {m} | {', '.join(f'{r:.1f}' for r in t['runs'])} | {t['best_images_per_s']:.1f} |")
    for k, d in res["dump"].items():
        lines.append(f"| dump {k}: teacher loop (whole call) | {d['loop_views_per_s']:.1f} ({d['views_per_s']:.1f}) "
                     f"| |")
    lines.append(f"| bare teacher inference | {res['bare_inference']['images_per_s']:.1f} | |")
    lines += ["", "| ratio | value | target | verdict | detail |", "|---|---|---|---|---|"]
    for r in rows:
        v = r["value"]
        if "format" in r:
            vs = r["format"].format(v)
        elif "RSS" in r["metric"]:
            vs = f"{100 * v:+.1f}%"
        elif "decode" in r["metric"]:
            vs = f"{100 * v:.2f}%"
        elif "bytes" in r["metric"]:
            vs = f"{v:.1f}"
        else:
            vs = f"{v:.3f}" if v < 10 else f"{v:,.0f}x"
        verdict = "" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        lines.append(f"| {r['metric']} | {vs} | {r['target']} | {verdict} | {r['detail']} |")
    for name, err in res.get("failed_sections", {}).items():
        lines.append(f"\nSECTION FAILED: {name}: {err}")
    lines.append(f"\ntotal wall time {res['wall_seconds']:.0f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def _section(res: dict[str, Any], name: str, fn):
    """Run an optional section; a failure is recorded (and printed) instead of losing the figures already taken."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one failed optional section must not lose a device run's table
        import traceback

        traceback.print_exc()
        res.setdefault("failed_sections", {})[name] = f"{type(e).__name__}: {e}"
        return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    if a.rss_child:
        _rss_child(a.rss_child)
        return {}
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    tmp = None
    if a.workdir:
        work = Path(a.workdir)
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"--workdir {work} is not empty")
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="dkd-throughput-")
        work = Path(tmp)
    res: dict[str, Any] = {"config": {k: v for k, v in vars(a).items() if k != "rss_child"},
                           "device_name": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    try:
        say(f"making {a.samples} synthetic samples, teacher checkpoint")
        if a.geometry == "imagenet":
            shards = input_path.make_imagenet_shards(work / "shards", a.samples, a.shard_size, a.gen_jobs)[0]
        else:
            shards = make_dataset(work / "shards", a.samples, a.shard_size, a.gen_jobs)
        weights = make_teacher(work / "teacher.pt")

        # Dumps: the training cache (--codec) and topk:10 (the <= 64 bytes target), each timed around its teacher loop.
        res["dump"], caches = {}, {}
        for codec in dict.fromkeys((a.codec, "topk:10")):
            say(f"dump-teacher {codec}")
            caches[codec] = str(work / f"cache-{codec.replace(':', '').replace('+', '-')}.zarr")
            res["dump"][codec] = timed_dump(dump_settings(a, shards, weights, Path(caches[codec]), codec, a.epochs))
        say("bare teacher inference")
        res["bare_inference"] = bare_inference(a, weights)

        # Keys: "ce", "cached", "live" with the cpu renderer; "ce/device" ... with another one.
        modes = [m if r == "cpu" else f"{m}/{r}" for r in a.renderers for m in ("ce", "cached", "live")]
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for rep in range(a.repeats):
            for key in (modes if rep % 2 == 0 else modes[::-1]):
                m, _, r = key.partition("/")
                say(f"train {key} (run {rep + 1}/{a.repeats})")
                runs[key].append(train_run(a, shards, caches[a.codec], work / f"run-{m}-{r or 'cpu'}-{rep}", m,
                                           weights, renderer=r or "cpu"))
        res["train"] = {m: {"runs": [r["images_per_s"] for r in rs], "best_images_per_s": max(r["images_per_s"] for r in rs),
                            "median_images_per_s": statistics.median(r["images_per_s"] for r in rs),
                            "best_images_per_cpu_s": max(r["images_per_cpu_s"] for r in rs), "detail": rs}
                        for m, rs in runs.items()}

        say("cache reads, codec decode")
        res["cache_read"] = cache_read_rate(caches[a.codec])
        res["cache_read_imagenet"] = {  # the product's default chunk_rows, and one chunk per ImageNet shard
            str(cr): cache_read_rate(imagenet_geometry_cache(work / f"imagenet-geometry-{cr}.zarr", a.codec,
                                                             chunk_rows=cr)) for cr in (256, 1024)}
        res["decode"] = {c: decode_cost(a, p) for c, p in caches.items()}
        res["bytes"] = {c: bytes_per_view(p) for c, p in caches.items()}
        if a.input_path:
            say("input path on ImageNet geometry (benchmarks/input_path.py)")
            res["input_path"] = _section(res, "input_path", lambda: input_path.main([
                "--samples", str(a.input_samples), "--batch-size", str(a.batch_size), "--workers", str(a.workers),
                "--device", a.device, "--gen-jobs", str(max(1, a.gen_jobs)), "--workdir", str(work / "input-path")]))
        if not a.no_rss:
            say(f"peak RSS: dump and one training epoch at {a.rss_samples} and {a.rss_samples * a.rss_factor} samples, "
                f"{a.rss_image_size} px")
            res["rss"] = _section(res, "rss", lambda: rss_study(a, work, weights))
            for n, r in (res["rss"] or {}).items():
                res["bytes"][f"topk:10 @ {n} samples"] = r["bytes"]
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    res["wall_seconds"] = time.perf_counter() - t_start
    rows = summarise(res)
    res["ratios"] = rows
    print(render(res, rows), flush=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()
