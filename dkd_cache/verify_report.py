"""verify's report: one frozen record per check, what each phase returns, the JSON report and its text table.

Shapes:
    phase function  ->  its own result (verify.Integrity, verify.Entries, verify_fidelity.Fidelity, ...) holding a
                        PhaseResult: checks (CheckResult, in the order made), warnings, figures (report sections)
    [PhaseResult]   --build_report-->  JSON-serialisable dict: passed, failures, warnings, checks, figures, seconds
    dict            --render_report->  the text table the CLI prints
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckResult:
    """One judged figure: its name (what the report prints), whether it passed, the figure and its tolerance."""

    name: str
    ok: bool
    figure: Any = None
    tolerance: Any = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": bool(self.ok), "figure": jsonable(self.figure),
                "tolerance": jsonable(self.tolerance), "detail": self.detail}

    def failure(self) -> str:
        """The line `failures` lists for a failed check: name, figure (tolerance) - detail."""
        msg = self.name
        figure = jsonable(self.figure)
        if figure is not None:
            msg += f": {fmt(figure)}"
            if self.tolerance is not None:
                msg += f" (tolerance {fmt(jsonable(self.tolerance))})"
        if self.detail:
            msg += f" - {self.detail}"
        return msg


@dataclasses.dataclass(frozen=True, kw_only=True)
class PhaseResult:
    """What one phase found: its checks, its warnings, the report sections it adds and the seconds it took."""

    name: str
    checks: tuple[CheckResult, ...] = ()
    warnings: tuple[str, ...] = ()
    figures: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seconds: Mapping[str, float] = dataclasses.field(default_factory=dict)


class Checks:
    """A phase's checks and warnings as it makes them; `done` freezes them into the phase's PhaseResult."""

    def __init__(self) -> None:
        self.checks: list[CheckResult] = []
        self.warnings: list[str] = []

    def check(self, name: str, ok: bool, figure: Any = None, tolerance: Any = None, detail: str = "") -> bool:
        self.checks.append(CheckResult(name=name, ok=bool(ok), figure=figure, tolerance=tolerance, detail=detail))
        return bool(ok)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def done(self, name: str, figures: Mapping[str, Any] | None = None,
             seconds: Mapping[str, float] | None = None) -> PhaseResult:
        return PhaseResult(name=name, checks=tuple(self.checks), warnings=tuple(self.warnings),
                           figures=dict(figures or {}), seconds=dict(seconds or {}))


def build_report(phases: Sequence[PhaseResult], head: Mapping[str, Any], versions_differ: Mapping[str, Any],
                 total_seconds: float) -> dict[str, Any]:
    """The JSON report: "passed", "failures", "warnings", "checks", then `head` (cache, settings), every phase's
    figures and "seconds". A failed logit check under other library versions gets a note naming them."""
    checks = [c for p in phases for c in p.checks]
    failures = [c.failure() for c in checks if not c.ok]
    if failures and versions_differ and any(c.name.startswith("logits:") and not c.ok for c in checks):
        failures.append("note: library versions differ from the dump's (" + ", ".join(versions_differ) + "); "
                        "decoders and kernels of other versions can move logits")
    figures: dict[str, Any] = {**head, "versions_differ": dict(versions_differ)}
    seconds: dict[str, float] = {}
    for p in phases:
        figures.update(p.figures)
        seconds.update(p.seconds)
    return jsonable({"passed": not failures, "failures": failures,
                     "warnings": [w for p in phases for w in p.warnings],
                     "checks": [c.to_dict() for c in checks], **figures,
                     "seconds": {**seconds, "total": total_seconds}})


def jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if (x == 0 or 1e-3 <= abs(x) < 1e4) else f"{x:.2e}"
    return str(x)


def stats(x: np.ndarray | Sequence[float]) -> dict[str, float | int | None]:
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        return {"n": 0, "median": None, "p99": None, "max": None}
    return {"n": int(a.size), "median": float(np.median(a)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}


# --------------------------------------------------------------------------------------------- text
def render_report(report: dict[str, Any]) -> str:
    """The report as a readable table."""
    c = report.get("cache", {})
    r = c.get("renderer") or {}
    lines = [f"dkd-cache verify  {c.get('path')}",
             f"  codec {c.get('codec')}, {c.get('classes')} classes, {c.get('views')} views, T {c.get('temperatures')}, "
             f"{c.get('samples')} samples in {c.get('shards')} shards; teacher {c.get('teacher', {}).get('arch')}"]
    if r:
        lines.append(f"  renderer {r.get('name')}, resize {c.get('resize_kernel')}")
    ent = report.get("entries")
    if ent:
        lines.append(f"  entries: {ent['compared']} compared of {ent['drawn']} drawn ({ent['requested']} requested), "
                     f"{ent['shards_covered']} shards covered")
    lines += ["", f"{'check':<70} {'figure':>12} {'tolerance':>12}  result", "-" * 104]
    for ch in report.get("checks", []):
        fig = "" if ch["figure"] is None else fmt(ch["figure"])
        tol = "" if ch["tolerance"] is None else fmt(ch["tolerance"])
        lines.append(f"{ch['name'][:70]:<70} {fig[:12]:>12} {tol[:12]:>12}  {'ok' if ch['ok'] else 'FAIL'}")
    lg = report.get("logits")
    if lg:
        lines += ["", f"{'|stored - live|':<40} {'median':>11} {'p99':>11} {'max':>11}", "-" * 76]
        for k, v in lg.items():
            if isinstance(v, dict) and "median" in v and v.get("n"):
                lines.append(f"{k:<40} {v['median']:>11.3g} {v['p99']:>11.3g} {v['max']:>11.3g}")
        if "topk_set" in lg:
            t = lg["topk_set"]
            lines.append(f"top-{t['k']} sets: {t['exact']} exact, {t['tie_tolerated']} tie-tolerated, "
                         f"{t['violations']} violations")
    ls = report.get("loss")
    if ls:
        lines += ["", f"DKD loss (alpha {ls['alpha']}, beta {ls['beta']}), student {ls['student']}",
                  f"{'':<20} {'vs ideal cache: rel err':>24} {'cos med':>9} {'cos p5':>9}"
                  f" {'| vs live exact: rel err':>25} {'cos med':>9} {'cos p5':>9}", "-" * 110]
        for k, v in ls.items():
            if isinstance(v, dict) and "vs_ideal_cache" in v:
                a, b = v["vs_ideal_cache"], v["vs_live_exact"]
                lines.append(f"{k:<20} {a['rel_err']:>24.3g} {a['cos_median']:>9.6f} {a['cos_p5']:>9.6f}"
                             f" {b['rel_err']:>25.3g} {b['cos_median']:>9.6f} {b['cos_p5']:>9.6f}")
    rd = report.get("renderer_drift")
    if rd:
        lines += ["", f"renderer drift: {rd['other_renderer']} against the cache's {rd['cache_renderer']} "
                      f"(student {rd['student']}; reported, not judged)",
                  f"  pixels |a - b|: max {rd['pixels']['max_abs']:.0f}, mean {rd['pixels']['mean_abs']:.3f} levels; "
                  f"teacher logits |z_a - z_b|: max {rd['teacher_logits']['max_abs']:.4g}, "
                  f"median {rd['teacher_logits']['median_abs']:.4g}"]
        for k, v in rd.items():
            if k.startswith("grad_T"):
                lines.append(f"  DKD gradient, cache vs a cache of the other renderer, T={k[6:]}: cos median "
                             f"{v['cos_median']:.6f}, p5 {v['cos_p5']:.6f}, loss rel err {v['rel_err']:.3g}")
    tr = report.get("train")
    if tr:
        lines += _train_lines(tr)
    for w in report.get("warnings", []):
        lines.append(f"warning: {w}")
    secs = report.get("seconds", {})
    lines += ["", f"{'PASSED' if report.get('passed') else 'FAILED'}"
                  f"  ({', '.join(f'{k} {v:.1f} s' for k, v in secs.items())})"]
    return "\n".join(lines)


def _train_lines(tr: dict[str, Any]) -> list[str]:
    r, nf = tr["vs_reference"], tr["noise_floor"]

    def curve(xs):
        return " ".join(f"{x:.5f}" for x in xs[:8]) + (" ..." if len(xs) > 8 else "")

    lines = ["", f"training parity: {tr['steps']} SGD steps, batch {tr['batch']}, lr {tr['lr']}, T {tr['temperature']}"
                 f"{'' if tr['rule'] is None else ', rule ' + tr['rule']}; cache vs {tr['reference']}",
             f"  {'loss (cache)':<19}{curve(tr['losses_cache'])}",
             f"  {'loss (' + tr['reference'] + ')':<19}{curve(tr['losses_reference'])}",
             f"  first step: loss {r['first_loss_rel_diff']:.3g}, weight update {r['first_update_rel_diff']:.3g} "
             "(relative)",
             f"  whole run:  max |loss diff| {r['max_abs_loss_diff']:.3g} (relative {r['max_rel_loss_diff']:.3g}); "
             f"final weights {r['param_rel_to_norm']:.3g} of their norm, {r['param_rel_to_moved']:.3g} of the "
             "distance moved",
             f"  noise floor (reference with its teacher logits moved 1 ulp): max relative loss diff "
             f"{nf['max_rel_loss_diff']:.3g}, final weights {nf['param_rel_to_norm']:.3g} of their norm"]
    if "vs_live" in tr:
        v = tr["vs_live"]
        lines.append(f"  cache vs live exact DKD (the codec's approximation): max relative loss diff "
                     f"{v['max_rel_loss_diff']:.3g}, final weights {v['param_rel_to_norm']:.3g} of their norm")
    return lines
