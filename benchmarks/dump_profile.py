"""Where dump-teacher's main process spends its time, and what the machine's threads and disk cost it.

A diagnosis for a many-core GPU machine, where the dump wrote ~1,650 views/s against 21,800 for the teacher's bare
inference (benchmarks/results/throughput-gpu-h100.txt) and its writer with a null teacher took ~12 ms of process
CPU per view, against 83 us on a 2-core CPU. In one run, on ImageNet-geometry shards (benchmarks/input_path.py):

  fsync     ms per fsync of a 64 KB file on the work directory's disk
  writer    the writer alone (null teacher, pre-rendered views, pixels not moved: input_path.null_teacher_dump
            with writer_only), each variant in a fresh process: default threads; torch/OpenMP/BLAS threads = 1
            (environment set before the imports); fsync skipped; on the CPU device. Views/s and process CPU us/view,
            for dump-teacher's default codec (all four) and topk:10 (the first two).
  profile   cProfile of the default-threads writer: the functions with the most own time
  dump      the real dump (random-init ResNet-34 teacher, topk:10) in a fresh process, default threads and
            threads = 1, with the main thread's time split by cProfile into waiting for rendered views and the rest

    python3 benchmarks/dump_profile.py --device cuda --workers 12 --samples 1600
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1600)
    p.add_argument("--shard-size", type=int, default=200)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--gen-jobs", type=int, default=16)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one measured variant
    return p.parse_args(argv)


def fsync_ms(folder: Path, n: int = 40) -> float:
    data = os.urandom(65536)
    t0 = time.perf_counter()
    for i in range(n):
        path = folder / f"fsync-{i}.bin"
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        path.unlink()
    return 1000 * (time.perf_counter() - t0) / n


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One variant, in this (fresh) process."""
    sys.path.insert(0, str(HERE))
    import torch

    import input_path

    if spec.get("no_fsync"):
        os.fsync = lambda fd: None
    a = argparse.Namespace(views=spec["views"], codec=spec["codec"], image_size=224, dump_batch_size=spec["batch"],
                           workers=spec["workers"], shard_size=spec["shard_size"], device=spec["device"])
    out = Path(spec["out"])
    if spec["kind"] == "writer":
        pre = torch.load(spec["prerendered"], weights_only=False)
        prof = cProfile.Profile() if spec.get("profile") else None
        if prof:
            prof.enable()
        r = input_path.null_teacher_dump(a, spec["shards"], out, prerendered=pre, writer_only=True)
        if prof:
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
            r["profile"] = s.getvalue()
        return r
    # the real dump, teacher and render workers included; the main thread's wait for rendered views by cProfile
    from dkd_cache.dump import DumpSettings, dump_teacher
    from dkd_cache.views import Recipe

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    r0 = os.times()
    prof.enable()
    report = dump_teacher(DumpSettings(shards=spec["shards"], weights=spec["weights"], out=str(out), arch="resnet34",
                                       views=spec["views"], codec=spec["codec"], recipe=Recipe(image_size=224),
                                       batch_size=spec["batch"], workers=spec["workers"],
                                       chunk_rows=spec["shard_size"], device=spec["device"], amp="bf16"
                                       if spec["device"] == "cuda" else "none"), progress=False)
    prof.disable()
    wall = time.perf_counter() - t0
    r1 = os.times()
    st = pstats.Stats(prof)
    waits = {k: v for k, v in st.stats.items() if k[2] in ("_next_data", "__next__") and "dataloader" in k[0]}
    wait = max((v[3] for v in waits.values()), default=0.0)  # cumulative time in the DataLoader's __next__
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(20)
    return {"views": report.views_written, "wall_seconds": wall, "views_per_s": report.views_written / wall,
            "main_cpu_us_per_view": 1e6 * (r1.user + r1.system - r0.user - r0.system) / report.views_written,
            "wait_for_views_seconds": wait, "profile": s.getvalue()}


def run_child(spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=600)
    if out.returncode:
        return {"error": out.stderr[-3000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict[str, Any]:
    a = parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child)), default=str))
        return {}
    sys.path.insert(0, str(HERE))
    import torch

    import input_path
    import throughput

    work = Path(a.workdir or tempfile.mkdtemp(prefix="dkd-dump-profile-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def say(msg):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    res: dict[str, Any] = {"config": vars(a), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "device_name": torch.cuda.get_device_name() if a.device == "cuda" else "cpu"}
    res["fsync_ms"] = fsync_ms(work)
    say(f"fsync of 64 KB: {res['fsync_ms']:.2f} ms")
    shards, _ = input_path.make_imagenet_shards(work / "shards", a.samples, a.shard_size, a.gen_jobs)
    default_codec = input_path.parse_args([]).codec
    na = argparse.Namespace(views=a.views, codec=default_codec, image_size=224, dump_batch_size=a.batch_size,
                            workers=a.workers, shard_size=a.shard_size, device=a.device)
    say("a cache to replay, and its pre-rendered views")
    input_path.null_teacher_dump(na, shards, work / "seed.zarr")
    pre = input_path.prerender(str(work / "seed.zarr"), shards)
    torch.save(pre, work / "pre.pt")
    base = {"kind": "writer", "views": a.views, "batch": a.batch_size, "workers": a.workers,
            "shard_size": a.shard_size, "shards": shards, "prerendered": str(work / "pre.pt")}
    variants = [("default threads", {}, {"device": a.device, "profile": True}),
                ("threads = 1", ONE_THREAD, {"device": a.device}),
                ("fsync skipped", {}, {"device": a.device, "no_fsync": True}),
                ("device cpu, threads = 1", ONE_THREAD, {"device": "cpu"})]
    res["writer"] = {}
    for codec in (default_codec, "topk:10"):
        for name, env, extra in (variants if codec == default_codec else variants[:2]):
            key = f"{codec} | {name}"
            say(f"writer: {key}")
            r = run_child({**base, **extra, "codec": codec, "out": str(work / f"w-{len(res['writer'])}.zarr")}, env)
            res["writer"][key] = r
            if "error" in r:
                print(r["error"], flush=True)
            else:
                print(f"    {r['views_per_s']:,.0f} views/s, {r['main_cpu_us_per_view']:,.0f} us CPU/view", flush=True)
    weights = throughput.make_teacher(work / "teacher.pt")
    res["dump"] = {}
    for name, env in (("default threads", {}), ("threads = 1", ONE_THREAD)):
        say(f"real dump topk:10, {name}")
        r = run_child({"kind": "dump", "views": a.views, "batch": a.batch_size, "workers": a.workers,
                       "shard_size": a.shard_size, "shards": shards, "weights": weights, "codec": "topk:10",
                       "device": a.device, "out": str(work / f"d-{len(res['dump'])}.zarr")}, env)
        res["dump"][name] = r
        if "error" in r:
            print(r["error"], flush=True)
        else:
            print(f"    {r['views_per_s']:,.0f} views/s, {r['main_cpu_us_per_view']:,.0f} us CPU/view, waiting for "
                  f"rendered views {r['wait_for_views_seconds']:.1f} of {r['wall_seconds']:.1f} s", flush=True)
    print("\nwriter profile (default threads, default codec):")
    print(next(iter(res["writer"].values())).get("profile", "")[:6000])
    print("real dump profile (default threads):")
    print(res["dump"]["default threads"].get("profile", "")[:5000])
    res["wall_seconds"] = time.perf_counter() - t_start
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()
