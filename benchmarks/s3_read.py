"""Cache reads from an S3 server against training's consumption (issue 14's bench figure).

Starts moto's S3 server on 127.0.0.1 (a real HTTP server in this process; the code reaches it only through the
standard AWS environment), writes an ImageNet-shaped cache (1,000 classes, 4 tar shards of 1,000 samples, one
view, random logits) once to a local folder and once to the bucket through the cache module, and times the
training path's reads (benchmarks/throughput.py: cache_read_rate) from both. Training's consumption is the cached-DKD
training rate recorded in benchmarks/results/throughput-*.json (this project's CPU machine and one H200).

    python benchmarks/s3_read.py [--codec q8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training_rates() -> dict[str, float]:
    out = {}
    for name in ("throughput-cpu.json", "throughput-gpu-grouped.json"):
        p = ROOT / "benchmarks" / "results" / name
        if p.is_file():
            r = json.loads(p.read_text())
            out[f"{name} ({r.get('device_name', '?')})"] = r["train"]["cached"]["best_images_per_s"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codec", default="q8")
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        from throughput import cache_read_rate, imagenet_geometry_cache

        from dkd_cache.store import object_fs

        object_fs().mkdir("dkd-bench")
        res: dict = {"codec": a.codec, "machine": f"{os.cpu_count()} CPUs, shared", "reads": {}}
        with tempfile.TemporaryDirectory() as tmp:
            for where, path in (("local disk", str(Path(tmp) / "c.zarr")), ("S3 (moto, 127.0.0.1)",
                                                                           "s3://dkd-bench/caches/c.zarr")):
                t0 = time.perf_counter()
                imagenet_geometry_cache(path, a.codec)
                write_s = time.perf_counter() - t0
                r = cache_read_rate(path, a.min_seconds)
                r["write_seconds"] = write_s
                res["reads"][where] = r
        res["training_images_per_s"] = training_rates()
    finally:
        server.stop()

    lines = [f"cache reads through the training path ({a.codec}, 1,000 classes, 4 shards x 1,000 samples, one "
             "process; machine shared)"]
    for where, r in res["reads"].items():
        lines.append(f"  {where:24s} {r['training_path_views_per_s']:10,.0f} views/s  (bare read_rows "
                     f"{r['read_rows_views_per_s']:,.0f}; written in {r['write_seconds']:.1f} s)")
    s3 = res["reads"]["S3 (moto, 127.0.0.1)"]["training_path_views_per_s"]
    local = res["reads"]["local disk"]["training_path_views_per_s"]
    lines.append(f"  S3 / local disk: {s3 / local:.2f}")
    for name, rate in res["training_images_per_s"].items():
        lines.append(f"  training consumes {rate:,.1f} images/s ({name}): S3 reads are {s3 / rate:,.1f}x that")
    text = "\n".join(lines)
    print(text)
    res["text"] = text
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
