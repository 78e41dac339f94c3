"""Cached = live, over seeds: the demo's study repeated with several student seeds.

One teacher and one cache (the demo's stages: `dkd_cache.demo.prepare`, reused when WORKDIR already holds them),
then for each seed s the three students of the demo on the same stored views (`dkd_cache.demo.train_modes`):
CE only, DKD from the cache, DKD with the live teacher. The seed sets the student's initial weights and the
order of its samples; the views and the teacher are the same for every seed and mode.

Reports, from the final validation top-1 of every run:
  per mode         mean +- sample std over seeds (the seed-to-seed spread)
  paired           per seed, cache - live and cache - CE; their mean, sample std and 95% t interval
  verdict          from those intervals: does the cache differ from the live teacher by more than the seeds resolve,
                   and does distillation pay?
  --repeat         reruns the first seed's DKD-from-cache student twice more in a scratch folder: once as it was
                   (same seed, same machine: are the numbers identical?) and once with another number of torch
                   threads (another summation order in the CPU kernels, what another machine changes: by how much?)
Writes OUT.json (every number), OUT.txt (the table) and OUT.png (curves: each seed thin, the mean bold).

Reproduce (the committed result):
    OMP_NUM_THREADS=1 python benchmarks/parity.py --workdir /tmp/dkd-parity --seeds 5 --repeat --jobs 2 \\
        --out benchmarks/results/parity
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dkd_cache.demo import MODES, DemoSetup, finished, load_setup, prepare, train_modes  # noqa: E402
from dkd_cache.plot import plot_runs  # noqa: E402
from dkd_cache.train import TrainConfig, train_student  # noqa: E402
from dkd_cache.config import merge  # noqa: E402

# Two-sided 95% quantiles of Student's t, t_{0.975, df} for df = 1..30 (standard table values).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    return T975[df - 1] if df <= len(T975) else 1.96


def summary(xs: list[float]) -> dict[str, float]:
    """Mean, sample std and the 95% t interval of the mean (n >= 2)."""
    n = len(xs)
    mean = statistics.fmean(xs)
    std = statistics.stdev(xs) if n > 1 else float("nan")
    half = t975(n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half], "half_width": half}


def verdict(cache_live: dict[str, float], cache_ce: dict[str, float], mode_std: dict[str, float]) -> list[str]:
    """Sentences read off the intervals (nothing here is a threshold tuned to a run)."""
    lo, hi = cache_live["ci95"]
    spread = max(mode_std.values())
    out = []
    if lo <= 0 <= hi:
        out.append(f"cache = live within what {cache_live['n']} seeds resolve: the paired difference cache - live "
                   f"averages {_pts(cache_live['mean'])} and its 95% interval [{_pts(lo)}, {_pts(hi)}] contains 0; "
                   f"the seed-to-seed std of a single mode is up to {_pts(spread, sign=False)}.")
    else:
        side = "above" if lo > 0 else "below"
        out.append(f"the cache differs from the live teacher: cache - live averages {_pts(cache_live['mean'])}, "
                   f"95% interval [{_pts(lo)}, {_pts(hi)}] lies {side} 0 (seed std up to {_pts(spread, sign=False)}).")
    glo, ghi = cache_ce["ci95"]
    if glo > 0:
        out.append(f"distillation pays: DKD from the cache beats CE only by {_pts(cache_ce['mean'])} on average, "
                   f"95% interval [{_pts(glo)}, {_pts(ghi)}].")
    else:
        out.append(f"distillation is not shown to pay: cache - CE averages {_pts(cache_ce['mean'])}, "
                   f"95% interval [{_pts(glo)}, {_pts(ghi)}] reaches 0 or below.")
    return out


def _pts(x: float, sign: bool = True) -> str:
    return f"{100 * x:+.2f} pts" if sign else f"{100 * x:.2f} pts"


def final_top1(run_dir: str | Path) -> float:
    last = None
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "epoch":
            last = rec.get("val_top1")
    if last is None:
        raise SystemExit(f"{run_dir}: no epoch with val_top1 logged")
    return float(last)


def epoch_curve(run_dir: str | Path) -> list[float]:
    out: dict[int, float] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "epoch" and rec.get("val_top1") is not None:  # eval_every > 1 skips epochs
            out[int(rec["epoch"])] = float(rec["val_top1"])
    return [out[e] for e in sorted(out)]


def repeat_first_seed(setup: DemoSetup, seed: int, scratch: Path, threads: int,
                      only: str | None = None, names: tuple[str, ...] = ("same", "threads")) -> dict[str, Any]:
    """The seed's DKD-from-cache student again: as it was ("same"), and with `threads` torch threads ("threads").

    A rerun already finished in `scratch` with the same thread count is kept (as the seeds' runs are)."""
    base_threads = torch.get_num_threads()
    for name, n in (("same", base_threads), ("threads", threads)):
        if only not in (None, name) or name not in names:
            continue
        out = scratch / f"repeat-{name}"
        marker = out / "threads.json"
        if marker.exists() and json.loads(marker.read_text()) == {"threads": n} and (out / "checkpoint.pt").exists() \
                and finished(out, setup.file["train"].get("epochs", 0)):
            continue
        shutil.rmtree(out, ignore_errors=True)
        cfg = merge(TrainConfig, setup.file["train"], {}, where="repeat", fixed={
            "shards": str(setup.shards / "train.txt"), "val_shards": str(setup.shards / "val.txt"), "out": str(out),
            "cache": str(setup.cache_path), "seed": seed, "loss": "dkd"})
        torch.set_num_threads(n)
        try:
            train_student(cfg, progress=False)
        finally:
            torch.set_num_threads(base_threads)
        marker.write_text(json.dumps({"threads": n}))
    if only is not None:
        return {}
    ref = setup.work / "runs" / f"seed-{seed}" / "student-dkd-cache"
    ref_model = torch.load(ref / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    results = {}
    for name in names:
        out = scratch / f"repeat-{name}"
        model = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
        max_diff = max(float((model[k].double() - ref_model[k].double()).abs().max()) for k in ref_model
                       if ref_model[k].is_floating_point())
        curve, ref_curve = epoch_curve(out), epoch_curve(ref)
        results[name] = {"threads": json.loads((out / "threads.json").read_text())["threads"],
                         "val_top1_curve": curve, "reference_curve": ref_curve, "identical_curve": curve == ref_curve,
                         "max_abs_weight_diff": max_diff, "final_top1_diff": curve[-1] - ref_curve[-1]}
    return results


def run_span(run_dir: str | Path) -> float:
    """Seconds from a run's first to its last metrics record: its training time, also when parity.py found it
    finished and kept it (the run's own timestamps)."""
    times = [json.loads(line)["time"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
             if '"time"' in line]
    return max(times) - min(times) if times else 0.0


def identical_weights(a: Path, b: Path) -> bool:
    """Two runs' final weights equal bit for bit (exact storage: the cached student is the live one)."""
    wa = torch.load(a / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    wb = torch.load(b / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def render(report: dict[str, Any]) -> str:
    seeds = report["seeds"]
    lines = [f"{'seed':<6}" + "".join(f"{m:>18}" for _, m in MODES) + f"{'cache - live':>15}{'cache - CE':>13}"]
    for s in seeds:
        r = report["top1"][str(s)]
        lines.append(f"{s:<6}" + "".join(f"{100 * r[m]:>17.2f}%" for _, m in MODES)
                     + f"{100 * (r['DKD from cache'] - r['DKD live teacher']):>+15.2f}"
                     + f"{100 * (r['DKD from cache'] - r['CE only']):>+13.2f}")
    lines.append("-" * len(lines[0]))
    lines.append(f"{'mean':<6}" + "".join(f"{100 * report['per_mode'][m]['mean']:>17.2f}%" for _, m in MODES)
                 + f"{100 * report['paired']['cache_minus_live']['mean']:>+15.2f}"
                 + f"{100 * report['paired']['cache_minus_ce']['mean']:>+13.2f}")
    lines.append(f"{'std':<6}" + "".join(f"{100 * report['per_mode'][m]['std']:>18.2f}" for _, m in MODES)
                 + f"{100 * report['paired']['cache_minus_live']['std']:>15.2f}"
                 + f"{100 * report['paired']['cache_minus_ce']['std']:>13.2f}")
    cl, cc = report["paired"]["cache_minus_live"]["ci95"], report["paired"]["cache_minus_ce"]["ci95"]
    lines.append(f"{'95% CI':<6}" + " " * 54 + f"{f'[{100 * cl[0]:+.2f}, {100 * cl[1]:+.2f}]':>15}"
                 + f"{f'[{100 * cc[0]:+.2f}, {100 * cc[1]:+.2f}]':>13}")
    lines.append(f"teacher {report['teacher']['arch']}: {100 * report['teacher']['val_top1']:.2f}% val top-1; "
                 f"student {report['student_arch']}; cache codec {report.get('dump', {}).get('codec', '?')}; "
                 f"{report['val_images']:,} val images, chance {100 / report['classes']:.1f}%")
    lines += ["", "verdict:"] + [f"  - {v}" for v in report["verdict"]]
    same = report.get("identical_weights")
    if same:
        lines.append(f"  - cache and live students with identical final weights (bit for bit): seeds "
                     f"{[int(s) for s, v in same.items() if v] or 'none'} of {[int(s) for s in same]}")
    if report.get("repeat"):
        rs, rt = report["repeat"]["same"], report["repeat"].get("threads")
        lines += ["", f"determinism (seed {seeds[0]}, DKD from cache, rerun):",
                  f"  same machine, same threads ({rs['threads']}): identical per-epoch top-1: {rs['identical_curve']}, "
                  f"max |weight diff| {rs['max_abs_weight_diff']:.3g}"]
        if rt:
            lines.append(f"  {rt['threads']} threads instead (another summation order): final top-1 "
                         f"{100 * rt['final_top1_diff']:+.2f} pts, max |weight diff| {rt['max_abs_weight_diff']:.3g}")
    t = report["timing"]
    lines += ["", f"wall time {t['total_seconds'] / 60:.1f} min ({t['prepare_seconds'] / 60:.1f} min shards/teacher/dump"
              f"{' (reused)' if t['prepare_reused'] else ''}, {t['students_seconds'] / 60:.1f} min students in "
              f"{t['jobs']} process(es){', repeat included' if report.get('repeat') else ''}; {t['runs_kept']} "
              f"student runs found finished and kept) on {report['machine']}"]
    spans = t.get("run_spans")
    if spans:
        per_mode = {m: [v for r, v in spans.items() if Path(r).name == name] for name, m in MODES}
        lines.append("each run's own training time (first to last metrics record): " + ", ".join(
            f"{m} {statistics.mean(v) / 60:.1f} min" for m, v in per_mode.items() if v) + " on average")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="shards, teacher, cache and runs (reused when present)")
    ap.add_argument("--config", default=str(REPO / "pipelines" / "demo.toml"))
    ap.add_argument("--codec", default="", help="the cache's codec instead of the recipe's [dump] codec (e.g. q8: "
                                                "how far does that codec move the students?); use its own --workdir")
    ap.add_argument("--seeds", type=int, default=5, help="student seeds 0..N-1 (at least 2)")
    ap.add_argument("--repeat", nargs="?", const="both", choices=("both", "same"), default=None,
                    help="rerun the first seed's cached student (determinism): 'both' (default) as it was and with "
                         "another thread count, 'same' as it was only")
    ap.add_argument("--repeat-threads", type=int, default=0,
                    help="threads for the second rerun (default: 2 if torch uses 1, else 1)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="train the seeds after the first in this many processes at once (each seed's runs are the "
                         "same whichever process trains them)")
    ap.add_argument("--train-seeds", default="", help=argparse.SUPPRESS)  # internal: a --jobs worker's seeds
    ap.add_argument("--train-repeat", default="", help=argparse.SUPPRESS)  # internal: one rerun, "same" | "threads"
    ap.add_argument("--machine", default="", help="what ran it, for the report (e.g. 'shared 2-core VM')")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "parity"), help="OUT.json/.txt/.png")
    args = ap.parse_args(argv)
    if args.seeds < 2:
        ap.error("--seeds must be at least 2 (a spread needs two)")
    t0 = time.perf_counter()
    setup = load_setup(args.workdir, args.config)
    if args.codec:  # recorded in WORKDIR/recipe.json like any recipe key: a work directory holds one codec's cache
        setup = dataclasses.replace(setup, file={**setup.file, "dump": {**setup.file["dump"], "codec": args.codec}})
    if args.train_seeds:  # a --jobs worker: train these seeds' students, nothing else
        for s in (int(x) for x in args.train_seeds.split(",")):
            train_modes(setup, s, setup.work / "runs" / f"seed-{s}", progress=False)
        return {}
    if args.train_repeat:
        repeat_first_seed(setup, 0, setup.work / "repeat", args.repeat_threads or
                          (2 if torch.get_num_threads() == 1 else 1), only=args.train_repeat)
        return {}
    prep_rows = prepare(setup, progress=False)
    t_prep = time.perf_counter() - t0
    seeds = list(range(args.seeds))
    epochs = setup.file["train"].get("epochs", TrainConfig.__dataclass_fields__["epochs"].default)
    kept = sum(finished(setup.work / "runs" / f"seed-{s}" / name, epochs) for s in seeds for name, _ in MODES)
    top1: dict[str, dict[str, float]] = {}
    runs, rows = [], list(prep_rows)
    repeat = None
    if args.jobs > 1:
        train_modes(setup, seeds[0], setup.work / "runs" / f"seed-{seeds[0]}", progress=False)
        groups = [seeds[1:][j::args.jobs] for j in range(args.jobs)]
        procs = [subprocess.Popen([sys.executable, __file__, "--workdir", args.workdir, "--config", args.config,
                                   "--codec", args.codec, "--train-seeds", ",".join(map(str, g))])
                 for g in groups if g]
        if args.repeat:  # the main process reruns the first seed meanwhile
            repeat = repeat_first_seed(setup, seeds[0], setup.work / "repeat",
                                       args.repeat_threads or (2 if torch.get_num_threads() == 1 else 1),
                                       names=("same",) if args.repeat == "same" else ("same", "threads"))
        failed = [p.args for p in procs if p.wait() != 0]
        if failed:
            raise SystemExit(f"a --jobs worker failed: {failed}")
    for s in seeds:
        seed_rows = train_modes(setup, s, setup.work / "runs" / f"seed-{s}", progress=False)
        rows += seed_rows
        top1[str(s)] = {r["mode"]: final_top1(r["run_dir"]) for r in seed_rows}
        runs += [r["run_dir"] for r in seed_rows]
        print(f"seed {s}: " + ", ".join(f"{m} {100 * v:.2f}%" for m, v in top1[str(s)].items()), flush=True)
    t_students = time.perf_counter() - t0 - t_prep
    per_mode = {m: summary([top1[str(s)][m] for s in seeds]) for _, m in MODES}
    paired = {"cache_minus_live": summary([top1[str(s)]["DKD from cache"] - top1[str(s)]["DKD live teacher"]
                                           for s in seeds]),
              "cache_minus_ce": summary([top1[str(s)]["DKD from cache"] - top1[str(s)]["CE only"] for s in seeds]),
              "live_minus_ce": summary([top1[str(s)]["DKD live teacher"] - top1[str(s)]["CE only"] for s in seeds])}
    report: dict[str, Any] = {
        "config": str(Path(args.config).resolve().relative_to(REPO)) if Path(args.config).resolve().is_relative_to(REPO)
        else args.config,
        "demo": setup.demo, "train": setup.file["train"], "dump": setup.file["dump"], "seeds": seeds,
        "classes": setup.demo["classes"], "val_images": setup.demo["classes"] * setup.demo["val_per_class"],
        "student_arch": setup.file["train"].get("arch", "resnet18"),
        "teacher": {"arch": setup.demo["teacher_arch"], "val_top1": final_top1(setup.teacher_ckpt.parent)},
        "top1": top1, "per_mode": per_mode, "paired": paired,
        "identical_weights": {str(s): identical_weights(setup.work / "runs" / f"seed-{s}" / "student-dkd-cache",
                                                        setup.work / "runs" / f"seed-{s}" / "student-dkd-live")
                              for s in seeds},
        "verdict": verdict(paired["cache_minus_live"], paired["cache_minus_ce"],
                           {m: v["std"] for m, v in per_mode.items()}),
        "curves": {r: epoch_curve(r) for r in runs},
        "stages": rows,
        "machine": args.machine or f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
                                   f"{torch.get_num_threads()} torch thread(s)",
    }
    if args.repeat:
        threads = args.repeat_threads or (2 if torch.get_num_threads() == 1 else 1)
        report["repeat"] = repeat or repeat_first_seed(
            setup, seeds[0], setup.work / "repeat", threads,
            names=("same",) if args.repeat == "same" else ("same", "threads"))
    report["timing"] = {"total_seconds": time.perf_counter() - t0, "prepare_seconds": t_prep,
                        "prepare_reused": not prep_rows, "students_seconds": t_students, "jobs": args.jobs,
                        "runs_kept": kept,  # finished before this call (the --jobs workers' runs are new)
                        "run_spans": {r: run_span(r) for r in runs}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = render(report)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".txt").write_text(text + "\n")
    plot_runs(runs, out.with_suffix(".png"), title=f"{len(seeds)} seeds: {report['student_arch']} students of a "
                                                   f"{report['teacher']['arch']} teacher (thin: seeds, bold: mean)")
    print(text)
    return report


if __name__ == "__main__":
    main()
