"""What a training run reports: metrics.jsonl (mirrored to TensorBoard on request) and the plain progress lines
printed when no progress bar is drawn (a log file, Slurm, nohup). Only rank 0 writes or prints.

Step losses stay on the device: a step only appends its stacked [loss, ce, dkd] to the log's window; every
`log_every` steps (and before a checkpoint or the epoch's end) the window is read in one host sync and written in
one append.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from . import tb_log
from .progress import hms


@dataclasses.dataclass(frozen=True, kw_only=True)
class PendingStep:
    """A step whose losses are still on the device."""

    epoch: int  # the epoch of views the step is in
    step: int
    lr: float
    losses: torch.Tensor  # stacked [loss, ce, dkd], detached
    t: float  # host seconds since the run started when the step was issued


def trim_metrics(path: Path, *, step: int, epoch: int) -> None:
    """Keep the metrics.jsonl records the checkpoint stands for: step records up to its step, epoch records of
    the epochs it finished. Rewritten atomically (temporary file, rename)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill
        if (r.get("event") == "step" and r.get("step", 0) <= step) or \
                (r.get("event") == "epoch" and r.get("epoch", 0) < epoch):
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class MetricsLog:
    """RUN_DIR/metrics.jsonl of one run (rank 0; on other ranks every call only empties the window)."""

    def __init__(self, out: Path, *, main: bool, tensorboard: bool, step: int, epoch: int):
        self.path, self.main = out / "metrics.jsonl", main
        self.window: list[PendingStep] = []
        self.last: dict[str, Any] = {}  # the last step record merged with the last epoch record: the run's summary
        if main:  # what a killed or stopped run logged after its checkpoint is logged again by this one
            trim_metrics(self.path, step=step, epoch=epoch)
        self.tb_write, self.tb_close = (tb_log.open_writer(out, step) if tensorboard and main else (None, None))

    def add_step(self, pending: PendingStep) -> None:
        self.window.append(pending)

    def flush_steps(self) -> dict[str, Any] | None:
        """Write the window's step records; the last of them (None when the window was empty)."""
        if not self.window:
            return None
        values = torch.stack([p.losses for p in self.window]).tolist()
        records = [{"event": "step", "epoch": p.epoch, "step": p.step, "loss": loss, "ce": ce, "dkd": kd, "lr": p.lr,
                    "t": round(p.t, 4)} for p, (loss, ce, kd) in zip(self.window, values)]  # finite: train_step checked
        self.window.clear()
        self.last = records[-1]
        self.write(*records)
        return self.last

    def write_epoch(self, record: dict[str, Any]) -> None:
        self.last.update(record)
        self.write(record)

    def write(self, *records: dict[str, Any]) -> None:
        if not (self.main and records):
            return
        now = time.time()
        with open(self.path, "a") as f:
            f.write("".join(json.dumps({**r, "time": now}) + "\n" for r in records))
        if self.tb_write is not None:
            for r in records:
                tb_write_step = r.get("step", self.last.get("step", 0))
                self.tb_write(r, tb_write_step)

    def close(self) -> None:
        if self.tb_close is not None:
            self.tb_close()


@dataclasses.dataclass(frozen=True, kw_only=True)
class EpochClock:
    """An epoch's progress for the status lines: its steps, where this process started in it, and when."""

    steps: int
    first_step: int  # the global step before this process's first step in the epoch
    step_in_epoch0: int  # steps of the epoch done before this process started it (a resume)
    t0: float


def status_line(record: dict[str, Any], clock: EpochClock, *, epochs: int, batch_size: int, max_steps: int) -> str:
    """One plain progress line for logs: position, throughput, loss, lr and the time left."""
    done = record["step"] - clock.first_step
    elapsed = time.perf_counter() - clock.t0
    rate = done * batch_size / max(elapsed, 1e-9)
    left = (clock.steps - clock.step_in_epoch0 - done) + (epochs - record["epoch"] - 1) * clock.steps
    if max_steps:
        left = min(left, max_steps - record["step"])
    eta = left * elapsed / max(done, 1)
    return (f"epoch {record['epoch'] + 1}/{epochs}  step {clock.step_in_epoch0 + done}/{clock.steps} "
            f"(total {record['step']})  {rate:.1f} img/s  loss {record['loss']:.4f}  lr {record['lr']:.4g}  "
            f"ETA {hms(eta)}")
