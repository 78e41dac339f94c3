"""`dkd-cache demo`: distillation you can see, on synthetic shards, in minutes on a CPU.

Stages (each skipped when its output already exists, so a rerun of the same WORKDIR resumes)::

    make-shards  -> WORKDIR/shards/{train,extra,val}.txt     students see train; the teacher train + extra
    teacher (CE) -> WORKDIR/runs/teacher/checkpoint.pt       trained on more images and epochs than the students
    dump-teacher -> WORKDIR/teacher.zarr                     one view per student epoch
    students     -> WORKDIR/runs/<seed dir>/student-{ce,dkd-cache,dkd-live}   one seed, the three modes, same views
    verify, a table that says what each number means, and WORKDIR/curves.png

`benchmarks/parity.py` runs the same stages with several seeds (`prepare` once, `train_modes` per seed).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import resource
import time
from pathlib import Path
from typing import Any, Callable

from . import cache as cache_mod
from .config import load_toml, merge
from .dump import DumpSettings, dump_teacher
from .errors import ConfigError
from .synth import make_shards
from .train import TrainConfig, train_student
from .views import Recipe

DEMO_KEYS = {"classes": 40, "train_per_class": 15, "extra_per_class": 135, "val_per_class": 25,
             "shard_size": 500, "min_side": 36, "max_side": 56, "clutter": 2, "textures": 7, "shapes": 10, "rotation": 180.0, "data_seed": 0, "seed": 0,
             "teacher_arch": "resnet18", "teacher_epochs": 8, "teacher_lr": 0.1, "teacher_batch_size": 128}
MODES = (("student-ce", "CE only"), ("student-dkd-cache", "DKD from cache"), ("student-dkd-live", "DKD live teacher"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoSetup:
    """The resolved demo: config file, its tables, and where everything lives under the work directory."""

    work: Path
    config: Path
    file: dict[str, dict[str, Any]]
    demo: dict[str, Any]
    recipe: Recipe

    @property
    def shards(self) -> Path:
        return self.work / "shards"

    @property
    def teacher_ckpt(self) -> Path:
        return self.work / "runs" / "teacher" / "checkpoint.pt"

    @property
    def cache_path(self) -> Path:
        return self.work / "teacher.zarr"


def load_setup(workdir: str | Path, config: str | Path) -> DemoSetup:
    file = load_toml(config)
    unknown = set(file["demo"]) - set(DEMO_KEYS)
    if unknown:
        raise ConfigError(f"{config} [demo]: unknown key(s) {sorted(unknown)}; known: {sorted(DEMO_KEYS)}")
    demo = {**DEMO_KEYS, **file["demo"]}
    if file["dump"].get("arch", demo["teacher_arch"]) != demo["teacher_arch"]:
        raise ConfigError(f"{config}: [dump] arch {file['dump']['arch']!r} differs from [demo] teacher_arch "
                          f"{demo['teacher_arch']!r}; the dump runs the demo's teacher")
    recipe = merge(Recipe, file["recipe"], {}, where=f"{config} [recipe]")
    return DemoSetup(work=Path(workdir), config=Path(config), file=file, demo=demo, recipe=recipe)


def _timed(rows: list[dict[str, Any]], echo: Callable[[str], Any], name: str, fn: Callable[[], dict | None],
           **info) -> dict:
    echo(f"== {name}")
    t0, c0 = time.perf_counter(), cpu_seconds()
    out = fn() or {}
    rows.append({"stage": name, "seconds": time.perf_counter() - t0, "cpu_seconds": cpu_seconds() - c0, **info, **out})
    return out


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers): what the stage cost the machine,
    whatever else was running on it."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def check_workdir(setup: DemoSetup) -> None:
    """A work directory belongs to one recipe: finished stages are kept on a rerun, so a rerun with another recipe
    would report the old shards, teacher or students as the new recipe's. The first run records the recipe in
    WORKDIR/recipe.json; a rerun whose recipe differs is refused, naming the keys. The student seed ([demo] seed)
    may change: its runs live in their own folder."""
    def tables(file: dict[str, dict[str, Any]], demo: dict[str, Any]) -> dict[str, Any]:
        return json.loads(json.dumps({**file, "demo": {k: v for k, v in demo.items() if k != "seed"}}))

    now = tables(setup.file, setup.demo)
    record = setup.work / "recipe.json"
    if not record.exists():
        setup.work.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(record.name + ".tmp")
        tmp.write_text(json.dumps({"config": str(setup.config), **now}, indent=2))
        tmp.replace(record)
        return
    saved = json.loads(record.read_text())
    changed = [f"[{t}] {k}: {saved.get(t, {}).get(k)!r} -> {now[t].get(k)!r}" for t in now
               for k in sorted(set(now[t]) | set(saved.get(t, {}))) if saved.get(t, {}).get(k) != now[t].get(k)]
    if changed:
        raise ConfigError(f"{setup.work} was made with another recipe ({saved.get('config')}); {setup.config} "
                          f"differs in {'; '.join(changed)}. Its finished stages would be reported as this "
                          "recipe's: use a new work directory, or delete this one")


def prepare(setup: DemoSetup, *, echo: Callable[[str], Any] = print, progress: bool = True,
            stop_after: str | None = None) -> list[dict[str, Any]]:
    """Shards, the teacher and its cache: the part every seed shares. Returns one timing row per stage run."""
    check_workdir(setup)
    d, rows = setup.demo, []
    shards = setup.shards
    if not (shards / "val.txt").exists():
        _timed(rows, echo, "make-shards", lambda: {"samples": (lambda s: s["train_samples"] + s.get("extra_samples", 0))(
            make_shards(shards, classes=d["classes"], train_per_class=d["train_per_class"],
                        val_per_class=d["val_per_class"], extra_per_class=d["extra_per_class"],
                        shard_size=d["shard_size"], min_side=d["min_side"], max_side=d["max_side"],
                        clutter=d["clutter"], textures=d["textures"], shapes=d["shapes"], rotation=d["rotation"],
                        seed=d["data_seed"]))})
    if stop_after == "make-shards":
        return rows
    teacher_shards = (str(shards / "train.txt"),) + ((str(shards / "extra.txt"),) if d["extra_per_class"] else ())
    teacher_run = setup.teacher_ckpt.parent
    if not finished(teacher_run, d["teacher_epochs"]):
        epochs = d["teacher_epochs"]
        cfg = merge(TrainConfig, setup.file["train"], {}, where=f"{setup.config} [train]", fixed={
            "shards": teacher_shards, "val_shards": str(shards / "val.txt"), "out": str(teacher_run),
            "arch": d["teacher_arch"], "loss": "ce", "cache": None, "live_teacher": None,
            "num_classes": d["classes"], "epochs": epochs, "lr": d["teacher_lr"],
            "batch_size": d["teacher_batch_size"], "lr_batch": d["teacher_batch_size"],
            "lr_milestones": (max(1, int(epochs * 0.75)),), "seed": d["data_seed"], "recipe": setup.recipe.to_dict()})
        _timed(rows, echo, f"teacher {d['teacher_arch']} (CE)", lambda: _result(
            train_student(cfg, resume=teacher_run.exists(), progress=progress)),
               images=(d["train_per_class"] + d["extra_per_class"]) * d["classes"], epochs=epochs)
    if not _cache_complete(setup.cache_path):
        dump = merge(DumpSettings, setup.file["dump"], {}, where=f"{setup.config} [dump]", fixed={
            "shards": str(shards / "train.txt"), "weights": str(setup.teacher_ckpt), "out": str(setup.cache_path),
            "recipe": setup.recipe, "arch": d["teacher_arch"]})
        _timed(rows, echo, "dump-teacher", lambda: {"images_per_s": dump_teacher(dump).views_per_s})
    return rows


def train_modes(setup: DemoSetup, seed: int, run_root: Path, *, echo: Callable[[str], Any] = print,
                progress: bool = True) -> list[dict[str, Any]]:
    """The three students of one seed, on the same stored views: CE only, DKD from the cache, DKD live."""
    shards, rows = setup.shards, []
    student_arch = setup.file["train"].get("arch", TrainConfig.__dataclass_fields__["arch"].default)
    for name, mode in MODES:
        out = run_root / name
        overrides: dict[str, Any] = {"loss": "ce"} if mode == "CE only" else {"loss": "dkd"}
        if mode == "DKD live teacher":
            overrides.update(live_teacher=str(setup.teacher_ckpt), teacher_arch=setup.demo["teacher_arch"])
        cfg = merge(TrainConfig, setup.file["train"], {}, where=f"{setup.config} [train]", fixed={
            "shards": str(shards / "train.txt"), "val_shards": str(shards / "val.txt"), "out": str(out),
            "cache": str(setup.cache_path), "seed": seed, **overrides})
        if finished(out, cfg.epochs):
            rows.append({"stage": f"student {mode}", "mode": mode, "seed": seed, "run_dir": str(out),
                         "seconds": None, **_final(out)})
            continue
        _timed(rows, echo, f"student {mode}", lambda: {**_result(train_student(cfg, resume=out.exists(),
                                                                               progress=progress)),
                                                       "run_dir": str(out)},
               mode=mode, seed=seed, arch=student_arch)
    return rows


def _result(r: dict[str, Any]) -> dict[str, Any]:
    return {"val_top1": r.get("val_top1"), "images_per_s": r.get("images_per_s")}


def _final(run_dir: Path) -> dict[str, Any]:
    """val top-1 and images/s of a finished run's last epoch record."""
    last: dict[str, Any] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if '"epoch"' in line:
            rec = json.loads(line)
            if rec.get("event") == "epoch":
                last = rec
    return _result(last)


def finished(run_dir: Path, epochs: int) -> bool:
    """True when the run logged its last epoch (a killed run resumes from its checkpoint instead)."""
    m = run_dir / "metrics.jsonl"
    if not m.exists():
        return False
    for line in m.read_text().splitlines():
        if '"event": "epoch"' in line and json.loads(line).get("epoch") == epochs - 1:
            return True
    return False


def _cache_complete(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        cache_mod.require_complete(cache_mod.open_cache(str(path)))
    except Exception:  # incomplete or damaged: dump-teacher resumes or explains
        return False
    return True


STOP_POINTS = ("make-shards",)


def default_recipe(name: str = "demo.toml") -> Path:
    """A shipped recipe: package data `dkd_cache/pipelines/` in an installed wheel, the repository's `pipelines/`
    folder (its source) in a checkout."""
    try:
        return Path(str(importlib.resources.files("dkd_cache.pipelines").joinpath(name)))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "pipelines" / name


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_demo(workdir: str | Path, config: str | Path | None = None, *, echo=print, progress: bool = True,
             stop_after: str | None = None) -> dict[str, Any]:
    """The demo with `config` (default: the shipped pipelines/demo.toml); stop_after "make-shards" stops once the
    shards exist (what CI runs from an installed wheel)."""
    if stop_after is not None and stop_after not in STOP_POINTS:
        raise ConfigError(f"stop_after must be one of {STOP_POINTS}, got {stop_after!r}")
    t0, c0 = time.perf_counter(), cpu_seconds()
    setup = load_setup(workdir, config or default_recipe())
    rows = prepare(setup, echo=echo, progress=progress, stop_after=stop_after)
    if stop_after is not None:
        return {"stages": rows, "stopped_after": stop_after}
    seed = int(setup.demo["seed"])
    students = train_modes(setup, seed, setup.work / "runs" / f"seed-{seed}", echo=echo, progress=progress)
    rows += students
    from .verify import VerifySettings, verify

    report = _timed(rows, echo, "verify", lambda: (lambda r: {"verdict": "passed" if r["passed"] else
                                                             "FAILED: " + "; ".join(r["failures"])})(
        verify(VerifySettings(cache=str(setup.cache_path), shards=str(setup.shards / "train.txt"),
                              weights=str(setup.teacher_ckpt), samples=64))))
    size = cache_mod.disk_bytes(setup.cache_path)
    teacher_top1 = _final(setup.teacher_ckpt.parent)["val_top1"]
    from .plot import plot_runs

    png = plot_runs([r["run_dir"] for r in students], setup.work / "curves.png",
                    title=f"demo students, seed {seed}: {setup.file['train'].get('arch', 'resnet18')} "
                          f"taught by {setup.demo['teacher_arch']}")
    summary = {"stages": rows, "cache_bytes": size, "teacher_val_top1": teacher_top1, "seed": seed,
               "student_arch": setup.file["train"].get("arch", TrainConfig.__dataclass_fields__["arch"].default),
               "demo": setup.demo, "wall_seconds": time.perf_counter() - t0, "cpu_seconds": cpu_seconds() - c0,
               "torch_threads": torch_threads(), "curves": str(png),
               "verify": report.get("verdict"), "codec": setup.file["dump"].get("codec")}
    table = render_table(summary)
    echo(table)
    (setup.work / "demo.json").write_text(json.dumps(summary, indent=2))
    (setup.work / "demo.txt").write_text(table + "\n")
    return summary


def render_table(summary: dict[str, Any]) -> str:
    """The demo's result: time per stage, the accuracies, and the two differences that answer its questions."""
    d = summary["demo"]
    rows = summary["stages"]
    top1 = {r.get("mode"): r.get("val_top1") for r in rows if r.get("mode")}
    student_arch = summary.get("student_arch") or next((r.get("arch") for r in rows if r.get("arch")), "?")
    lines = [f"{'stage':<30}{'seconds':>9}{'cpu s':>8}{'img/s':>9}{'val top-1':>11}", "-" * 67]
    for r in rows:
        secs, ips, acc, cpu = r.get("seconds"), r.get("images_per_s"), r.get("val_top1"), r.get("cpu_seconds")
        lines.append(f"{r['stage']:<30}{(f'{secs:.1f}' if secs is not None else 'kept'):>9}"
                     f"{(f'{cpu:.0f}' if cpu is not None else '-'):>8}"
                     f"{(f'{ips:.0f}' if ips else '-'):>9}{(f'{100 * acc:.1f}%' if acc is not None else '-'):>11}"
                     + (f"   {r['verdict']}" if "verdict" in r else ""))
    lines.append(f"cache on disk: {summary['cache_bytes'] / 2**20:.2f} MiB; wall time "
                 f"{int(summary['wall_seconds'] // 60)}m{summary['wall_seconds'] % 60:02.0f}s, CPU time "
                 f"{int(summary['cpu_seconds'] // 60)}m{summary['cpu_seconds'] % 60:02.0f}s (all processes, {torch_threads()} "
                 "torch thread(s))")
    ce, cached, live = top1.get("CE only"), top1.get("DKD from cache"), top1.get("DKD live teacher")
    chance = 1.0 / d["classes"]
    lines += ["", "what the numbers mean (validation top-1 on "
              f"{d['classes'] * d['val_per_class']:,} held-out images, {d['classes']} classes, chance {100 * chance:.1f}%):",
              f"  teacher {d['teacher_arch']:<22}{_pct(summary['teacher_val_top1'])}  trained with CE on "
              f"{(d['train_per_class'] + d['extra_per_class'])} images/class for {d['teacher_epochs']} epochs",
              f"  student {student_arch + ', CE only':<18}{_pct(ce)}  the same student without a teacher: "
              f"{d['train_per_class']} images/class",
              f"  student, DKD from cache   {_pct(cached)}  the teacher's logits read from {Path('teacher.zarr')}",
              f"  student, DKD live teacher {_pct(live)}  the teacher run on every step (what the cache replaces)"]
    if None not in (ce, cached, live):
        gain, diff = cached - ce, cached - live
        lines += [f"  distillation gain (cache - CE)   {100 * gain:+.1f} points: "
                  + (f"the teacher's soft labels teach what {d['train_per_class']} images/class alone do not" if gain >= 0.03 else
                     "below the 3-point target: distillation did not visibly pay in this run"),
                  f"  cache - live                     {100 * diff:+.1f} points: both see the same views and teacher;"
                  + (" fp32 stores the live teacher's logits exactly, so the two are one computation"
                     if summary.get("codec") == "fp32" else
                     " they differ by the codec's rounding, which training's chaos grows to seed-to-seed size"),
                  "  is that difference noise? benchmarks/parity.py repeats this over seeds: its committed result "
                  "(README, 'Cached = live, over seeds') gives the seed spread and the paired cache - live interval"]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return f"{100 * x:5.1f}%" if x is not None else "    -"
