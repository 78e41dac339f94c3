"""The examples and the README's Python section run, and the example's own loop is train-student's path: for the
same steps, seed and batches it gets the same loss at every step as `dkd-cache train-student` (its metrics.jsonl)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"^step (\d+) epoch (\d+) loss (\S+)", re.M)


def _run(args: list[str], cwd: Path | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


def _train_dir(shards) -> Path:
    return Path(shards["train"][0]).parent


def _losses(stdout: str) -> list[float]:
    return [float(m.group(3)) for m in STEP.finditer(stdout)]


def test_own_training_loop_trains_and_prints_the_loss(shards, cache_path):
    out = _run([str(ROOT / "examples" / "own_training_loop.py"), "--shards", str(_train_dir(shards) / "train-*.tar"),
                "--cache", str(cache_path), "--steps", "3", "--batch-size", "16", "--workers", "2",
                "--device", "cpu"])
    losses = _losses(out)
    assert len(losses) == 3 and all(0 < x < 100 for x in losses), out
    assert "codec topk:4" in out


def test_own_training_loop_is_under_80_lines():
    assert len((ROOT / "examples" / "own_training_loop.py").read_text().splitlines()) < 80


def test_lightning_style_example_runs_with_its_own_optimiser_ema_and_amp(shards, cache_path):
    out = _run([str(ROOT / "examples" / "lightning_style.py"), "--shards", str(_train_dir(shards)),
                "--cache", str(cache_path), "--steps", "3", "--batch-size", "16", "--workers", "0",
                "--amp", "bf16", "--device", "cpu"])
    assert len(_losses(out)) == 3 and "the EMA student" in out, out


def test_the_example_loop_gets_train_students_loss_at_every_step(shards, cache_path, tmp_path):
    """Same student (resnet18, seed 0), same batches (epoch 0 then 1, batch 16, no workers), same SGD: the losses of
    7 steps across an epoch boundary are train-student's, as metrics.jsonl records them."""
    run = tmp_path / "run"
    _run(["-m", "dkd_cache", "train-student", "--shards", str(_train_dir(shards)), "--cache", str(cache_path),
          "--out", str(run), "--arch", "resnet18", "--epochs", "2", "--batch-size", "16", "--lr", "0.05",
          "--lr-batch", "16", "--workers", "0", "--seed", "0", "--max-steps", "7", "--device", "cpu",
          "--no-progress"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    cli = [(r["step"], r["epoch"], r["loss"]) for r in records if r["event"] == "step"]
    out = _run([str(ROOT / "examples" / "own_training_loop.py"), "--shards", str(_train_dir(shards) / "train-*.tar"),
                "--cache", str(cache_path), "--steps", "7", "--batch-size", "16", "--lr", "0.05", "--workers", "0",
                "--seed", "0", "--device", "cpu"])
    ours = [(int(m.group(1)), int(m.group(2)), float(m.group(3))) for m in STEP.finditer(out)]
    assert [s for s, _, _ in cli] == [s for s, _, _ in ours] == list(range(1, 8))
    assert [e for _, e, _ in cli] == [e for _, e, _ in ours] == [0] * 5 + [1] * 2
    for (step, _, a), (_, _, b) in zip(cli, ours):
        assert b == pytest.approx(a, abs=1e-6), f"step {step}: train-student {a}, the example {b}"


def _readme_python() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it from Python", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readmes_first_python_example_trains(shards, cache_path, tmp_path):
    """The README's shortest example, as written, in a folder with its `data/` shards and `teacher.zarr`."""
    (tmp_path / "data").symlink_to(_train_dir(shards))
    (tmp_path / "teacher.zarr").symlink_to(cache_path)
    code = _readme_python()
    assert "dkd_cache.open_cache" in code and "dkd_cache.DKDLoss" in code
    out = _run(["-c", code], cwd=tmp_path)
    assert re.findall(r"epoch \d: loss \d", out), out
