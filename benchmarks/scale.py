"""ImageNet's shape on a small machine: how each stage's costs grow with the number of samples.

Shards of tiny JPEGs (8-16 px) in ImageNet's layout: 1,000 classes, 1,252 samples a shard (1,281,167 samples would
be 1,024 shards). Per size (--samples, e.g. 12800 128000), each stage runs as its own `dkd-cache` process:

    make shards -> dump-teacher (1 view, resnet18 teacher, 16 px, 2 workers) -> inspect -> verify --samples 256
                -> train-student (one epoch from the cache, resnet18 student, 2 workers)
                -> train-student again (the same shards and cache: the scan records beside the cache are reused)

and is watched from outside every 0.1 s through /proc: wall time, the peak RSS (VmHWM) of the main process and of
its DataLoader workers (the shared transfer ring is in /dev/shm, counted apart: the peak /dev/shm used), and the
bytes read (rchar of every process of the stage). Results go to --json and a Markdown table (--table).

    python benchmarks/scale.py --samples 12800 128000 --json benchmarks/results/scale-cpu.json \
        --table benchmarks/results/scale-cpu.md

1.28M samples do not fit this machine's time here: the table shows the growth from the smaller sizes and the
README extrapolates it on paper, saying so.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 1000
SHARD_SIZE = 1252  # 1,281,167 / 1,024 shards, rounded up
PAGE = os.sysconf("SC_PAGE_SIZE")


def make_shards(out: Path, samples: int, seed: int = 0) -> Path:
    """Tar shards of 8-16 px JPEGs, labels i mod 1000, keys in order; deterministic."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s in range(-(-samples // SHARD_SIZE)):
        path = out / f"train-{s:06d}.tar"
        if path.exists():
            continue
        with tarfile.open(f"{path}.tmp", "w") as tar:
            for i in range(s * SHARD_SIZE, min(samples, (s + 1) * SHARD_SIZE)):
                h, w = (int(x) for x in rng.integers(8, 17, size=2))
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(i % CLASSES).encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        os.replace(f"{path}.tmp", path)
    return out


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rchar(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _shm_used() -> int:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def run_stage(name: str, args: list[str], env: dict, ok_codes: tuple[int, ...] = (0,)) -> dict:
    """One `dkd-cache` command, watched: wall, peak RSS of the main process and of each worker, /dev/shm, bytes."""
    shm0 = _shm_used()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dkd_cache", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    peak: dict[int, int] = {}
    rchar: dict[int, int] = {}
    shm = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for p in _tree(proc.pid):
                peak[p] = max(peak.get(p, 0), _status_kib(p, "VmHWM"))
                rchar[p] = max(rchar.get(p, 0), _rchar(p))
            shm[0] = max(shm[0], _shm_used() - shm0)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    output = proc.communicate()[0]
    wall = time.perf_counter() - t0
    done.set()
    watcher.join()
    if proc.returncode not in ok_codes:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{output[-3000:]}")
    main_peak = peak.pop(proc.pid, 0)
    return {"stage": name, "wall_s": round(wall, 2), "main_peak_rss_mib": round(main_peak / 1024, 1),
            "worker_peak_rss_mib": round(max(peak.values(), default=0) / 1024, 1), "workers_seen": len(peak),
            "dev_shm_peak_mib": round(shm[0] / 2**20, 1), "bytes_read_mib": round(sum(rchar.values()) / 2**20, 1),
            "exit": proc.returncode, "tail": output.strip().splitlines()[-1][:200] if output.strip() else ""}


def one_size(samples: int, work: Path, a: argparse.Namespace) -> list[dict]:
    import torch

    from dkd_cache.checkpoint import save_checkpoint
    from dkd_cache.teacher import build_model

    shards = make_shards(work / f"shards-{samples}", samples)
    teacher = work / "teacher.pt"
    if not teacher.exists():
        torch.manual_seed(0)
        save_checkpoint(teacher, model=build_model("resnet18", CLASSES).state_dict(), arch="resnet18")
    cache = work / f"cache-{samples}.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(ROOT)}
    common = ["--shards", str(shards)]
    stages = [
        ("dump-teacher", ["dump-teacher", *common, "--weights", str(teacher), "--out", str(cache), "--arch",
                          "resnet18", "--views", "1", "--codec", "topk:10", "--image-size", "16", "--workers",
                          str(a.workers), "--batch-size", "256", "--calibration-views", "256", "--no-progress"]),
        ("inspect", ["inspect", str(cache)]),
        ("verify --samples 256", ["verify", "--cache", str(cache), *common, "--weights", str(teacher),
                                  "--samples", "256"]),
        ("train-student, 1 epoch", ["train-student", *common, "--cache", str(cache), "--out",
                                    str(work / f"run-{samples}"), "--arch", "resnet18", "--epochs", "1",
                                    "--batch-size", "256", "--workers", str(a.workers), "--no-progress"]),
        ("train-student again (scan records reused)", ["train-student", *common, "--cache", str(cache), "--out",
                                                       str(work / f"run2-{samples}"), "--arch", "resnet18",
                                                       "--epochs", "1", "--batch-size", "256", "--workers",
                                                       str(a.workers), "--max-steps", "1", "--no-progress"]),
    ]
    rows = []
    for name, args in stages:
        # verify's gate may fail (exit 1): the teacher is random, its flat logits are not what topk:10 serves
        row = {"samples": samples, **run_stage(name, args, env, (0, 1) if name.startswith("verify") else (0,))}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    sizes = sorted({r["samples"] for r in rows})
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    by = {(r["samples"], r["stage"]): r for r in rows}
    cols = [("wall_s", "wall s"), ("main_peak_rss_mib", "main peak RSS MiB"),
            ("worker_peak_rss_mib", "worker peak RSS MiB"), ("dev_shm_peak_mib", "/dev/shm peak MiB"),
            ("bytes_read_mib", "read MiB")]
    head = "| stage | " + " | ".join(f"{label} at {n:,}" for _, label in cols for n in sizes) + " |"
    lines = [head, "|" + "---|" * (1 + len(cols) * len(sizes))]
    for st in stages:
        cells = [str(by[(n, st)][k]) if (n, st) in by else "" for k, _ in cols for n in sizes]
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, nargs="+", default=[12800])
    ap.add_argument("--work", type=Path, default=Path("/tmp/dkd-scale"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--table", type=Path)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    rows = [r for n in a.samples for r in one_size(n, a.work, a)]
    result = {"machine": {"cpus": os.cpu_count(), "torch_threads": a.threads, "workers": a.workers},
              "shard_size": SHARD_SIZE, "classes": CLASSES, "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    if a.table:
        a.table.write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
