"""Curves of training runs: validation top-1 and training loss against epochs, from each run's metrics.jsonl.

Runs are grouped by what they are (student arch and mode: CE only, DKD from the cache, DKD with the live
teacher, read from the run's config.json); within a group each run (a seed) is drawn thin and the mean
over the group's runs bold, so the spread between seeds is visible next to the difference between modes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .errors import ConfigError

MODE_CE, MODE_CACHE, MODE_LIVE = "CE only", "DKD from cache", "DKD live teacher"
MODE_COLOURS = {MODE_CE: "tab:gray", MODE_CACHE: "tab:blue", MODE_LIVE: "tab:orange"}
# Line style and marker of each mode's mean curve. The cache's student equals the live one bit for bit (exact
# storage), so their curves coincide (and at chance, CE's too): the cached one is drawn solid with small filled
# markers, the live one over it dashed with hollow squares, CE dotted with larger hollow diamonds, so that each can
# be seen where they lie on each other.
MODE_STYLES = {MODE_CE: {"linestyle": (0, (1, 2)), "marker": "D", "markersize": 13, "markerfacecolor": "none",
                         "markeredgewidth": 1.4, "zorder": 1},
               MODE_CACHE: {"linestyle": "-", "marker": "o", "markersize": 5, "zorder": 2},
               MODE_LIVE: {"linestyle": (0, (4, 3)), "marker": "s", "markersize": 10, "markerfacecolor": "none",
                           "markeredgewidth": 1.6, "zorder": 3}}
OTHER_STYLE = {"linestyle": "-.", "marker": "^", "markersize": 6, "zorder": 2}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunCurves:
    """One run's per-epoch figures: epochs counted from 1; None where the run logged no such figure."""

    run_dir: str
    label: str  # "<arch> <mode>": runs with the same label are seeds of one setting
    seed: int
    epochs: tuple[int, ...]
    val_top1: tuple[float | None, ...]
    train_loss: tuple[float | None, ...]  # mean of the step losses (the optimised total) over the epoch
    train_ce: tuple[float | None, ...]  # mean of the step cross-entropies over the epoch


def run_mode(config: dict[str, Any]) -> str:
    """The run's mode from its saved config: CE only, DKD from the cache, or DKD with a live teacher."""
    if config.get("loss") == "ce":
        return MODE_CE
    return MODE_LIVE if config.get("live_teacher") else MODE_CACHE


def read_run(run_dir: str | Path) -> RunCurves:
    """Per-epoch curves of a run directory written by train-student (config.json and metrics.jsonl)."""
    run = Path(run_dir)
    cfg_path, metrics_path = run / "config.json", run / "metrics.jsonl"
    for p in (cfg_path, metrics_path):
        if not p.is_file():
            raise ConfigError(f"{run} is not a train-student run directory: {p.name} is missing")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_path}: not valid JSON ({e}); the run directory is damaged") from e
    steps: dict[int, tuple[int, float, float]] = {}  # global step -> (epoch, loss, ce); a resumed run logs again
    val: dict[int, float | None] = {}
    for n, line in enumerate(metrics_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{metrics_path} line {n}: not valid JSON ({e}); a run killed mid-write leaves a "
                              "partial last line: delete that line") from e
        if rec.get("event") == "step":
            steps[int(rec["step"])] = (int(rec["epoch"]), float(rec["loss"]), float(rec["ce"]))
        elif rec.get("event") == "epoch":
            val[int(rec["epoch"])] = rec.get("val_top1")  # a resumed epoch logs again: the last record wins
    epochs = sorted(val)
    if not epochs:
        raise ConfigError(f"{metrics_path} holds no finished epoch yet; plot a run after its first epoch")

    by_epoch: dict[int, list[tuple[float, float]]] = {}
    for epoch, loss, ce in steps.values():
        by_epoch.setdefault(epoch, []).append((loss, ce))

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return RunCurves(
        run_dir=str(run), label=f"{config.get('arch', '?')} {run_mode(config)}", seed=int(config.get("seed", 0)),
        epochs=tuple(e + 1 for e in epochs), val_top1=tuple(val[e] for e in epochs),
        train_loss=tuple(mean([s[0] for s in by_epoch.get(e, [])]) for e in epochs),
        train_ce=tuple(mean([s[1] for s in by_epoch.get(e, [])]) for e in epochs))


def group_runs(runs: list[RunCurves]) -> dict[str, list[RunCurves]]:
    """Runs by label, labels in order of first appearance."""
    groups: dict[str, list[RunCurves]] = {}
    for r in runs:
        groups.setdefault(r.label, []).append(r)
    return groups


def mean_curve(runs: list[RunCurves], field: str) -> tuple[list[int], list[float]]:
    """Mean of `field` over the runs at each epoch every run reached with a value."""
    common = sorted(set.intersection(*(set(r.epochs) for r in runs)))
    xs, ys = [], []
    for e in common:
        vals = [getattr(r, field)[r.epochs.index(e)] for r in runs]
        if all(v is not None for v in vals):
            xs.append(e)
            ys.append(sum(vals) / len(vals))
    return xs, ys


def plot_runs(run_dirs: list[str | Path], out: str | Path, *, title: str | None = None) -> Path:
    """Draw validation top-1, training loss and training CE against epochs for `run_dirs` into the PNG `out`."""
    if not run_dirs:
        raise ConfigError("give at least one run directory to plot")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"{out}: the plot is written as PNG; name the file *.png")
    fig = draw_runs([read_run(d) for d in run_dirs], title=title)
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def draw_runs(runs: list[RunCurves], *, title: str | None = None):
    """The figure of plot_runs: a panel per figure (top-1, loss, CE); each mode in its colour, line style and marker."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    panels = (("val_top1", "validation top-1 (%)", 100.0), ("train_loss", "training loss (CE + KD term)", 1.0),
              ("train_ce", "training cross-entropy", 1.0))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    groups = group_runs(runs)
    palette = iter(["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
    drawn: dict[str, list] = {}  # label -> its mean curves, to name a curve that lies exactly on an earlier one
    for label, members in groups.items():
        mode = label.split(" ", 1)[1] if " " in label else label
        colour = MODE_COLOURS.get(mode) or next(palette, "black")
        style = MODE_STYLES.get(mode, OTHER_STYLE)
        curves = [mean_curve(members, field) for field, _, _ in panels]
        text = f"{label} (mean of {len(members)})" if len(members) > 1 else label
        same = [other for other, c in drawn.items() if c == curves]
        if same:
            text += f", identical to {same[0]}"
        drawn[label] = curves
        for ax, (field, ylabel, scale), (xs, ys) in zip(axes, panels, curves):
            for r in members:
                pts = [(e, v * scale) for e, v in zip(r.epochs, getattr(r, field)) if v is not None]
                if pts:
                    ax.plot(*zip(*pts), color=colour, linewidth=0.8, alpha=0.45, linestyle=style["linestyle"])
            if xs:
                ax.plot(xs, [y * scale for y in ys], color=colour, linewidth=2.2, label=text, **style)
    for ax, (field, ylabel, _) in zip(axes, panels):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if field != "val_top1":
            finite = [v for r in runs for v in getattr(r, field) if v is not None and math.isfinite(v)]
            if finite and min(finite) > 0:
                ax.set_yscale("log")
    axes[0].legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
