"""ImageNet's shape on a small machine: how each stage's costs grow with the number of samples.

Shards of tiny JPEGs (8-16 px) in ImageNet's layout: 1,000 classes, 1,252 samples a shard (1,281,167 samples would
be 1,024 shards). Per size (--samples, e.g. 12800 128000), each stage runs as its own `dkd-cache` process:

    make shards -> dump-teacher (1 view, resnet18 teacher, 16 px, 2 workers) -> dump-teacher again (complete)
                -> inspect -> verify --samples 256
                -> train-student (one epoch from the cache, resnet18 student, batch 256, 2 workers)
                -> train-student stopped mid-epoch (--max-steps half the epoch; its checkpoint is mid-epoch)
                -> train-student --resume (the rest of that epoch, from the mid-epoch checkpoint)
                -> train-student again (the same shards and cache: the scan records beside the cache are reused)

and is watched from outside every 0.1 s through /proc: wall time, the peak RSS (VmHWM) of the main process and of
its DataLoader workers (the shared transfer ring is in /dev/shm, counted apart: the peak /dev/shm used), and the
bytes read (rchar of every process of the stage). Training stages log every step (--log-every 1), so each step's
wall time is known: the start-up to the first step (process start to the end of step 1), and the main process's RSS
at several points of the epoch (first step, 10/25/50/75/100 %) with its steady-state slope (least squares over the
epoch's second half: warm-up, such as the ring's pages touched the first time, is over by then; a leak is not),
in MiB per 1,000 steps, for the whole RSS and for its private part (RssAnon: the ring's shared pages excluded).
Results go to --json (rows of the sizes run now replace those of the same sizes; others are kept) and a Markdown
table (--table). Wall times depend on what else runs on the machine.

    nice -n 19 python benchmarks/scale.py --samples 12800 128000 --json benchmarks/results/scale-cpu.json \
        --table benchmarks/results/scale-cpu.md

1.28M samples do not fit this machine's time here: the table shows the growth from the smaller sizes and the
README extrapolates it on paper, saying so. --train-steps N caps the training stages at N steps (the mid-epoch stop
at N/2) where a whole epoch would not fit; the table says so.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
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
BATCH = 256
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


def _status_fields(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    out = dict.fromkeys(fields, 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name = line.split(":", 1)[0]
                if name in out:
                    out[name] = int(line.split()[1])
    except OSError:
        pass
    return out


SAMPLED = ("VmHWM", "VmRSS", "RssAnon", "RssShmem")


def run_stage(name: str, args: list[str], env: dict, ok_codes: tuple[int, ...] = (0,),
              metrics: Path | None = None) -> dict:
    """One `dkd-cache` command, watched: wall, peak RSS of the main process and of each worker, /dev/shm, bytes;
    with `metrics` (a training run's metrics.jsonl, logged every step), the start-up to the first step and the main
    process's RSS through the epoch (rss_over_steps)."""
    shm0 = _shm_used()
    start_wall = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dkd_cache", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    peak: dict[int, int] = {}
    rchar: dict[int, int] = {}
    shm = [0]
    series: list[tuple[float, int, int, int]] = []  # (wall time, main VmRSS, RssAnon, RssShmem) in KiB
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for p in _tree(proc.pid):
                st = _status_fields(p, SAMPLED)
                peak[p] = max(peak.get(p, 0), st["VmHWM"])
                rchar[p] = max(rchar.get(p, 0), _rchar(p))
                if p == proc.pid and st["VmRSS"]:
                    series.append((time.time(), st["VmRSS"], st["RssAnon"], st["RssShmem"]))
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
    row = {"stage": name, "wall_s": round(wall, 2), "main_peak_rss_mib": round(main_peak / 1024, 1),
           "worker_peak_rss_mib": round(max(peak.values(), default=0) / 1024, 1), "workers_seen": len(peak),
           "dev_shm_peak_mib": round(shm[0] / 2**20, 1), "bytes_read_mib": round(sum(rchar.values()) / 2**20, 1),
           "exit": proc.returncode, "tail": output.strip().splitlines()[-1][:200] if output.strip() else ""}
    if metrics is not None:
        row.update(step_profile(metrics, series, start_wall))
    return row


def step_profile(metrics: Path, series: list[tuple[float, int, int, int]], start_wall: float) -> dict:
    """From a run logged every step (each step record's `time`: the wall clock when it was written, right after
    the step) and the RSS sampled every 0.1 s: the start-up to the first step of this process, and the main
    process's RSS at the steps (the sample nearest in time), as points and as a steady-state slope."""
    steps = [r for r in map(json.loads, metrics.read_text().splitlines())
             if r.get("event") == "step" and r.get("time", 0) >= start_wall]  # this process's steps only
    if not steps or not series:
        return {}
    times = np.array([t for t, *_ in series])
    rss = np.array([[v / 1024 for v in rest] for _, *rest in series])  # MiB: VmRSS, RssAnon, RssShmem

    def at(wall: float) -> np.ndarray:
        return rss[int(np.clip(np.searchsorted(times, wall), 0, len(times) - 1))]

    step_no = np.array([r["step"] for r in steps], float)
    per_step = np.array([at(r["time"]) for r in steps])
    n = len(steps)
    points = {f"{q}%": round(float(per_step[min(n - 1, max(0, round(q / 100 * n) - 1)), 0]), 1)
              for q in (0, 10, 25, 50, 75, 100)}
    half = slice(n // 2, n)

    def slope(col: int) -> list[float] | None:
        """[MiB per 1,000 steps, its standard error]: least squares over the second half. The RSS moves by tens
        of MiB from step to step (the allocator takes and returns memory), so over few steps the error is wide."""
        x, y = step_no[half], per_step[half, col]
        if x.size < 4 or np.ptp(x) == 0:
            return None
        fit, cov = np.polyfit(x, y, 1, cov=True)
        return [round(float(fit[0] * 1000), 1), round(float(np.sqrt(cov[0, 0]) * 1000), 1)]

    return {"first_step_s": round(steps[0]["time"] - start_wall, 2), "steps_run": n,
            "first_step": int(step_no[0]), "last_step": int(step_no[-1]),
            "rss_over_steps_mib": points,
            "rss_slope_mib_per_1k_steps": slope(0), "anon_slope_mib_per_1k_steps": slope(1),
            "rss_warmup_mib": round(float(per_step[n // 2, 0] - per_step[0, 0]), 1),
            "shmem_at_end_mib": round(float(per_step[-1, 2]), 1)}


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
    epoch_steps = samples // BATCH
    cap = min(epoch_steps, a.train_steps) if a.train_steps else 0
    half = (cap or epoch_steps) // 2

    def train(run: str, *extra: str) -> list[str]:
        return ["train-student", *common, "--cache", str(cache), "--out", str(work / f"{run}-{samples}"), "--arch",
                "resnet18", "--epochs", "1", "--batch-size", str(BATCH), "--workers", str(a.workers),
                "--log-every", "1", "--no-progress", *extra]

    capped = ["--max-steps", str(cap)] if cap else []
    # a fresh start: no cache, no scan records, empty run directories
    for path in (cache, Path(f"{cache}.scan"), *(work / f"{r}-{samples}" for r in ("run", "run2", "run3"))):
        shutil.rmtree(path, ignore_errors=True)
    dump = ["dump-teacher", *common, "--weights", str(teacher), "--out", str(cache), "--arch", "resnet18", "--views",
            "1", "--codec", "topk:10", "--image-size", "16", "--workers", str(a.workers), "--batch-size", "256",
            "--calibration-views", "256", "--no-progress"]
    # (stage, command, run directory of a training stage); names are the same at every size (the table's rows)
    stages = [
        ("dump-teacher (fresh, first invocation)", dump, None),
        ("dump-teacher (again, cache complete)", dump, None),
        ("inspect", ["inspect", str(cache)], None),
        ("verify --samples 256", ["verify", "--cache", str(cache), *common, "--weights", str(teacher),
                                  "--samples", "256"], None),
        ("train-student, 1 epoch", train("run", *capped), "run"),
        ("train-student stopped mid-epoch (--max-steps half the epoch)", train("run3", "--max-steps", str(half)),
         "run3"),
        ("train-student --resume from the mid-epoch checkpoint (to the epoch's end)",
         train("run3", "--resume", *capped), "run3"),
        ("train-student again (scan records reused, 1 step)", train("run2", "--max-steps", "1"), "run2"),
    ]
    rows = []
    for name, args, run in stages:
        # verify's gate may fail (exit 1): the teacher is random, its flat logits are not what topk:10 serves
        metrics = work / f"{run}-{samples}" / "metrics.jsonl" if run else None
        row = {"samples": samples, **run_stage(name, args, env, (0, 1) if name.startswith("verify") else (0,),
                                               metrics)}
        if run:
            row["epoch_steps"] = epoch_steps
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict], notes: list[str] = ()) -> str:
    sizes = sorted({r["samples"] for r in rows})
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    by = {(r["samples"], r["stage"]): r for r in rows}

    def grid(cols: list[tuple[str, str]], which: list[str]) -> list[str]:
        labels = [label if k.startswith("x:") else f"{label} at {n:,}" for k, label in cols
                  for n in (sizes[:1] if k.startswith("x:") else sizes)]
        lines = ["| stage | " + " | ".join(labels) + " |", "|" + "---|" * (1 + len(labels))]
        for st in which:
            cells = [cell(st, k) if k.startswith("x:") else cell(by.get((n, st)), k) for k, _ in cols
                     for n in (sizes[:1] if k.startswith("x:") else sizes)]
            lines.append(f"| {st} | " + " | ".join(cells) + " |")
        return lines

    def cell(row: dict | None, key: str) -> str:
        if key.startswith("x:"):  # the largest size's value over the smallest's
            lo, hi = (cell(by.get((n, row)), key[2:]) for n in (sizes[0], sizes[-1]))
            return f"{float(hi) / float(lo):.2f}x" if lo not in ("", "0.0") and hi != "" else ""
        if row is None:
            return ""
        if key == "steps":
            return f"{row['first_step']}-{row['last_step']} of {row['epoch_steps']}" if "first_step" in row else ""
        if key.startswith("rss@"):
            return str(row.get("rss_over_steps_mib", {}).get(key[4:], ""))
        value = row.get(key)
        if isinstance(value, list):  # a slope and its standard error
            return f"{value[0]} ± {value[1]}"
        return "" if value is None else str(value)

    grows = len(sizes) > 1
    cols = [("wall_s", "wall s"), ("main_peak_rss_mib", "main peak RSS MiB"),
            *([("x:main_peak_rss_mib", "main peak growth")] if grows else []),
            ("worker_peak_rss_mib", "worker peak RSS MiB"),
            *([("x:worker_peak_rss_mib", "worker peak growth")] if grows else []),
            ("dev_shm_peak_mib", "/dev/shm peak MiB"), ("bytes_read_mib", "read MiB")]
    training = [st for st in stages if any("first_step_s" in r for r in rows if r["stage"] == st)]
    train_cols = [("steps", "steps"), ("first_step_s", "start-up to step 1 s"),
                  *((f"rss@{q}", f"main RSS MiB at {q}") for q in ("0%", "50%", "100%")),
                  ("rss_warmup_mib", "warm-up MiB (0 to 50 %)"),
                  ("rss_slope_mib_per_1k_steps", "RSS slope MiB/1k steps (2nd half)"),
                  ("anon_slope_mib_per_1k_steps", "private (RssAnon) slope MiB/1k steps")]
    out = grid(cols, stages)
    if training:
        out += ["", "Training stages, the main process through the run (RSS sampled every 0.1 s, read at each step):",
                "", *grid(train_cols, training)]
    if notes:
        out += ["", *(f"- {n}" for n in notes)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, nargs="+", default=[12800])
    ap.add_argument("--work", type=Path, default=Path("/tmp/dkd-scale"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=0, help="cap the training stages at N steps (0: an epoch)")
    ap.add_argument("--note", action="append", default=[], help="a line for the table's notes (repeatable)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--table", type=Path)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    for n in a.samples:  # the results are written after each size: a long run stopped keeps what it measured
        rows = one_size(n, a.work, a)
        result = {"machine": {"cpus": os.cpu_count(), "torch_threads": a.threads, "workers": a.workers},
                  "shard_size": SHARD_SIZE, "classes": CLASSES, "batch": BATCH, "notes": a.note, "rows": rows}
        if a.json and a.json.exists():  # the rows of the other sizes are kept (sizes may be run one at a time)
            old = json.loads(a.json.read_text())
            kept = [r for r in old.get("rows", []) if r["samples"] != n]
            result["rows"] = sorted(kept + rows, key=lambda r: r["samples"])
            result["notes"] = list(dict.fromkeys([*old.get("notes", []), *a.note]))
        if a.json:
            a.json.write_text(json.dumps(result, indent=1) + "\n")
        text = table(result["rows"], result["notes"])
        if a.table:
            a.table.write_text(text + "\n")
        print(text, flush=True)


if __name__ == "__main__":
    main()
