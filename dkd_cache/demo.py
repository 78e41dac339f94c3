"""`dkd-cache demo`: the whole pipeline on synthetic shards, then a table of accuracy, time and speed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from . import cache as cache_mod
from .config import load_toml, merge
from .dump import DumpSettings, dump_teacher
from .errors import ConfigError
from .synth import make_shards
from .train import TrainConfig, train_student
from .views import Recipe

DEMO_KEYS = {"classes": 100, "train_per_class": 30, "val_per_class": 10, "shard_size": 400,
             "teacher_arch": "resnet34", "teacher_epochs": 6, "teacher_lr": 0.02}


def run_demo(workdir: str | Path, config: str | Path, *, echo=print) -> dict[str, Any]:
    work = Path(workdir)
    file = load_toml(config)
    unknown = set(file["demo"]) - set(DEMO_KEYS)
    if unknown:
        raise ConfigError(f"{config} [demo]: unknown key(s) {sorted(unknown)}; known: {sorted(DEMO_KEYS)}")
    demo = {**DEMO_KEYS, **file["demo"]}
    recipe = merge(Recipe, file["recipe"], {}, where=f"{config} [recipe]")
    rows: list[dict[str, Any]] = []

    def stage(name: str, fn, **info):
        echo(f"== {name}")
        t0 = time.perf_counter()
        out = fn()
        rows.append({"stage": name, "seconds": time.perf_counter() - t0, **info, **(out or {})})
        return out

    shards_dir = work / "shards"
    if not (shards_dir / "train.txt").exists():
        stage("make-shards", lambda: {"samples": make_shards(
            shards_dir, classes=demo["classes"], train_per_class=demo["train_per_class"],
            val_per_class=demo["val_per_class"], shard_size=demo["shard_size"], seed=0)["train_samples"]})
    train_shards, val_shards = str(shards_dir / "train.txt"), str(shards_dir / "val.txt")

    def train(name: str, **overrides) -> dict:
        out = work / "runs" / name
        cfg = merge(TrainConfig, file["train"], {}, where=f"{config} [train]",
                    fixed={"shards": train_shards, "val_shards": val_shards, "out": str(out), **overrides})
        r = train_student(cfg, resume=out.exists(), progress=True)
        return {"val_top1": r.get("val_top1"), "images_per_s": r.get("images_per_s")}

    teacher_ckpt = work / "runs" / "teacher" / "checkpoint.pt"
    stage("train teacher (CE)", lambda: train(
        "teacher", arch=demo["teacher_arch"], loss="ce", cache=None, num_classes=demo["classes"],
        epochs=demo["teacher_epochs"], lr=demo["teacher_lr"], lr_milestones=(int(demo["teacher_epochs"] * 0.75),),
        recipe=recipe.to_dict()))

    cache_path = work / "teacher.zarr"
    dump = merge(DumpSettings, file["dump"], {}, where=f"{config} [dump]",
                 fixed={"shards": train_shards, "weights": str(teacher_ckpt), "out": str(cache_path), "recipe": recipe})
    stage("dump-teacher", lambda: (lambda r: {"images_per_s": r.images_per_s})(dump_teacher(dump)))
    size = cache_mod.disk_bytes(cache_path)
    stage("student CE only", lambda: train("student-ce", loss="ce", cache=str(cache_path)))
    stage("student DKD from cache", lambda: train("student-dkd-cache", loss="dkd", cache=str(cache_path)))
    stage("student DKD live teacher", lambda: train("student-dkd-live", loss="dkd", cache=str(cache_path),
                                                    live_teacher=str(teacher_ckpt), teacher_arch=demo["teacher_arch"]))
    try:
        from .verify import VerifySettings, verify

        report = stage("verify", lambda: (lambda r: {"verdict": "passed" if r["passed"] else "FAILED: " + "; ".join(
            r["failures"])})(verify(VerifySettings(cache=str(cache_path), shards=train_shards,
                                                   weights=str(teacher_ckpt), samples=64))))
    except ImportError:  # verify lands separately
        report = None
    table = render_table(rows, size)
    echo(table)
    (work / "demo.json").write_text(json.dumps({"stages": rows, "cache_bytes": size}, indent=2))
    return {"stages": rows, "cache_bytes": size, "verify": report}


def render_table(rows: list[dict[str, Any]], cache_bytes: int) -> str:
    lines = [f"{'stage':<28}{'seconds':>9}{'img/s':>9}{'val top-1':>11}", "-" * 57]
    for r in rows:
        top1 = r.get("val_top1")
        ips = r.get("images_per_s")
        lines.append(f"{r['stage']:<28}{r['seconds']:>9.1f}{(f'{ips:.0f}' if ips else '-'):>9}"
                     f"{(f'{100 * top1:.1f}%' if top1 is not None else '-'):>11}")
        if "verdict" in r:
            lines[-1] += f"   {r['verdict']}"
    lines.append(f"cache on disk: {cache_bytes / 2**20:.2f} MiB")
    return "\n".join(lines)



