"""Held-out codec fidelity: how closely training's DKD from a codec's stored entries follows DKD from the exact
teacher logits, on calibration views the codec was not fitted on. The record a cache keeps of it (CodecFidelity,
the metadata field `fidelity`), the bar `--codec auto` and train-student judge by, and the auto choice.

Measure (score_codec), at every stored temperature T, with the recipe's alpha and beta, for two students:
  near-uniform  logits N(0, 0.1^2) (torch.Generator seed 0): a freshly initialised network's outputs;
  trained-like  the teacher's own logits blurred: 0.7 z + N(0, (0.5 std_row(z))^2) (seed 1), a student that ranks
                classes much as the teacher does and is not it (DKD's gradient vanishes at s = z). On the real
                ImageNet logits (every other view held out) it is a little harsher than a real trained student
                (EfficientNet-Lite1): lowrank:64+top:128+sparse:32 at T=1 p5 0.9987 against 0.9994, at T=4
                (beta 8) 0.915 against 0.932; topk:10+q4 at T=4 0.983 against 0.988.
  per view: cosine between d DKD / d student logits from the codec's entries (teacher_signal.encode_entries then
  dkd_from_entries: training's loss) and from the exact logits (loss.dkd_loss): median and 5th percentile;
  relative error of the batch-mean loss.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .errors import ConfigError
from .logit_codecs import Codec, FloatCodec, LowRankCodec, parse_codec
from .loss import dkd_loss
from .teacher_signal import Storage, dkd_from_entries, encode_entries

BAR_MEDIAN, BAR_P5 = 0.9995, 0.995  # what --codec auto asks of a codec at every stored temperature
STUDENTS = ("near-uniform", "trained-like")
# --codec auto's candidates, tried from the smallest (raw bytes per view for the teacher's class count); fp32 is the
# fallback. The learned ones need rank <= fit views; the frontier (benchmarks/fidelity.py) says why these.
AUTO_CANDIDATES = ("lowrank:32+top:64+sparse:16", "lowrank:64+top:128+sparse:32", "lowrank:128+top:128+sparse:32",
                   "topk:10+q4", "topk:20+q4", "q8")
AUTO = "auto"


# --------------------------------------------------------------------------------------------- the record
@dataclasses.dataclass(frozen=True, kw_only=True)
class FidelityScore:
    """One (temperature, beta, student) cell of a held-out measurement."""

    temperature: float
    beta: float
    student: str
    cos_median: float
    cos_p5: float
    rel_loss_error: float

    def meets(self, median: float = BAR_MEDIAN, p5: float = BAR_P5) -> bool:
        return self.cos_median >= median and self.cos_p5 >= p5

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CodecFidelity:
    """A cache's measured fidelity (metadata field `fidelity`; absent in caches written before it was recorded).

    codec: the spec measured (the cache's); alpha, beta: the DKD weights it was measured with; rule: the residual
    rule (top-k codecs without a tail); fit_views / scored_views: calibration views the codec was fitted on and
    scored on (disjoint samples); classes_seen: distinct labels among the fit views, of num_classes; choice: why
    this codec (--codec auto), else ''; scores: one per stored temperature and student."""

    codec: str
    alpha: float
    beta: float
    rule: str
    fit_views: int
    scored_views: int
    classes_seen: int
    num_classes: int
    scores: tuple[FidelityScore, ...]
    choice: str = ""

    def temperatures(self) -> tuple[float, ...]:
        return tuple(dict.fromkeys(s.temperature for s in self.scores))

    def covers(self, temperature: float, beta: float) -> bool:
        """Whether a recipe at this temperature and beta was measured (to a relative 1e-6)."""
        return any(math.isclose(s.temperature, temperature, rel_tol=1e-6) and math.isclose(s.beta, beta, rel_tol=1e-6)
                   for s in self.scores)

    def worst(self, temperature: float | None = None) -> FidelityScore:
        """The cell of lowest p5 cosine (at one temperature, or anywhere)."""
        cells = [s for s in self.scores if temperature is None or math.isclose(s.temperature, temperature,
                                                                              rel_tol=1e-6)]
        if not cells:
            raise ConfigError(f"no fidelity measured at T={temperature:g}; measured at {list(self.temperatures())}")
        return min(cells, key=lambda s: (s.cos_p5, s.cos_median))

    def meets(self, median: float = BAR_MEDIAN, p5: float = BAR_P5) -> bool:
        return all(s.meets(median, p5) for s in self.scores)

    def summary(self) -> str:
        """One line per temperature: the worst student's median / p5 cosine and loss error."""
        parts = []
        for t in self.temperatures():
            w = self.worst(t)
            err = max(s.rel_loss_error for s in self.scores if s.temperature == t)
            parts.append(f"T={t:g}: cos median {w.cos_median:.5f} p5 {w.cos_p5:.4f} ({w.student}), "
                         f"loss error {err:.1e}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"codec": self.codec, "alpha": self.alpha, "beta": self.beta, "rule": self.rule,
                "fit_views": self.fit_views, "scored_views": self.scored_views, "classes_seen": self.classes_seen,
                "num_classes": self.num_classes, "scores": [s.to_dict() for s in self.scores], "choice": self.choice}

    @classmethod
    def from_dict(cls, d: Any) -> "CodecFidelity":
        return parse_fidelity(d)


def parse_fidelity(value: Any) -> CodecFidelity | None:
    """A CodecFidelity, its table, or None (not recorded). Raises ConfigError naming what is wrong."""
    if value is None or isinstance(value, CodecFidelity):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"must be a table, got {value!r}")
    fields = ("codec", "alpha", "beta", "rule", "fit_views", "scored_views", "classes_seen", "num_classes", "scores",
              "choice")
    if set(value) != set(fields):
        raise ConfigError(f"must have exactly {list(fields)}, got {sorted(value)}")
    number = lambda k, v: v if not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) \
        else _bad(k, v)  # noqa: E731
    count = lambda k, v: int(v) if not isinstance(v, bool) and isinstance(v, int) and v >= 0 else _bad(k, v)  # noqa
    if not isinstance(value["scores"], (list, tuple)):
        _bad("scores", value["scores"])
    scores = []
    for s in value["scores"]:
        names = [f.name for f in dataclasses.fields(FidelityScore)]
        if not isinstance(s, Mapping) or set(s) != set(names) or s["student"] not in STUDENTS:
            raise ConfigError(f"scores: each must have exactly {names} (student one of {list(STUDENTS)}), got {s!r}")
        scores.append(FidelityScore(student=s["student"], **{k: float(number(k, s[k])) for k in names
                                                              if k != "student"}))
    for k in ("codec", "rule", "choice"):
        if not isinstance(value[k], str):
            _bad(k, value[k])
    return CodecFidelity(codec=value["codec"], alpha=float(number("alpha", value["alpha"])),
                         beta=float(number("beta", value["beta"])), rule=value["rule"],
                         fit_views=count("fit_views", value["fit_views"]),
                         scored_views=count("scored_views", value["scored_views"]),
                         classes_seen=count("classes_seen", value["classes_seen"]),
                         num_classes=count("num_classes", value["num_classes"]), scores=tuple(scores),
                         choice=value["choice"])


def _bad(key: str, value: Any):
    raise ConfigError(f"{key}: invalid value {value!r}")


def recipe_problem(fidelity: CodecFidelity | None, codec: Codec, temperature: float, beta: float) -> str | None:
    """Why a training recipe (temperature, beta) is not vouched for by a cache's recorded fidelity, or None: the
    fidelity was measured at that temperature and beta and meets the bar there (fp32 is exact: always None)."""
    if isinstance(codec, FloatCodec) and codec.dtype == "fp32":
        return None
    check = (f"dkd-cache verify --temperature {temperature:g} --beta {beta:g} measures it on this cache; or re-dump "
             f"with --codec auto --temperature {temperature:g} --beta {beta:g}")
    if fidelity is None:
        return f"the cache's codec {codec.name} has no recorded fidelity (a cache written before it was measured): {check}"
    if not fidelity.covers(temperature, beta):
        cells = sorted({(s.temperature, s.beta) for s in fidelity.scores})
        return (f"the cache's codec {codec.name} was measured at (T, beta) {[(f'{t:g}', f'{b:g}') for t, b in cells]}, "
                f"not at T={temperature:g}, beta {beta:g}, this run's: {check}")
    cells = [s for s in fidelity.scores if math.isclose(s.temperature, temperature, rel_tol=1e-6)]
    worst = min(cells, key=lambda s: (s.cos_p5, s.cos_median))
    if not worst.meets():
        return (f"the cache's codec {codec.name} measured gradient cosine median {worst.cos_median:.5f} / p5 "
                f"{worst.cos_p5:.4f} at T={temperature:g} ({worst.student} student), below the bar "
                f"{BAR_MEDIAN} / {BAR_P5}: re-dump with --codec auto --temperature {temperature:g} --beta {beta:g}")
    return None


# --------------------------------------------------------------------------------------------- the measure
def students(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two students' logits for teacher logits z (N, C), deterministic (their own seeded generators)."""
    n, c = z.shape
    uniform = torch.randn((n, c), generator=torch.Generator().manual_seed(0)) * 0.1
    noise = torch.randn((n, c), generator=torch.Generator().manual_seed(1))
    trained = 0.7 * z + noise * (0.5 * z.std(dim=1, keepdim=True))
    return {"near-uniform": uniform, "trained-like": trained}


def loss_and_grad(fn, s: torch.Tensor) -> tuple[float, torch.Tensor]:
    """fn(s) and its gradient with respect to the student logits s (float64), for the fidelity measures here and in
    verify."""
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s)
    (g,) = torch.autograd.grad(loss, s)
    return float(loss.detach()), g.double()


def row_cosines(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Cosine of each row of a with the same row of b (two zero rows agree: 1)."""
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a * b).sum(dim=1) / (na * nb).clamp(min=1e-300)
    return torch.where((na == 0) & (nb == 0), torch.ones_like(cos), cos).numpy()


def score_codec(codec: Codec, z: torch.Tensor, y: torch.Tensor, temperatures: Sequence[float], *, alpha: float,
                beta: float, rule: str = "uniform") -> tuple[FidelityScore, ...]:
    """Held-out scores of a (fitted) codec on teacher logits z (N, C) float32 with labels y (N,)."""
    z = z.float()
    y = y.long()
    storage = Storage(codec=codec, num_classes=z.shape[1], temperatures=tuple(temperatures))
    entries = encode_entries(z, y, storage)
    out = []
    for t in temperatures:
        for name, s in students(z).items():
            l0, g0 = loss_and_grad(lambda x: dkd_loss(x, z, y, alpha, beta, t), s)
            l1, g1 = loss_and_grad(lambda x: dkd_from_entries(x, y, entries, storage, alpha=alpha, beta=beta,
                                                               temperature=t, rule=rule), s)
            cos = row_cosines(g1, g0)
            out.append(FidelityScore(temperature=float(t), beta=float(beta), student=name,
                                     cos_median=float(np.median(cos)), cos_p5=float(np.percentile(cos, 5)),
                                     rel_loss_error=abs(l1 - l0) / max(abs(l0), 1e-12)))
    return tuple(out)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sample:
    """The calibration sample split in two: the codec is fitted on `fit` and scored on `scored` (other samples)."""

    fit: torch.Tensor  # (Nf, C) float32 teacher logits
    scored: torch.Tensor  # (Ns, C)
    scored_labels: torch.Tensor  # (Ns,)
    classes_seen: int  # distinct labels among the fit views
    temperatures: tuple[float, ...]
    alpha: float
    beta: float
    rule: str = "uniform"


def fit_and_score(codec: Codec, sample: Sample, choice: str = "") -> tuple[Codec, CodecFidelity]:
    """The codec fitted on the fit part (learned codecs; a rank above the fit views is a ConfigError), and its
    scores on the other part."""
    if codec.learned:
        codec = codec.fit(sample.fit)
    scores = score_codec(codec, sample.scored, sample.scored_labels, sample.temperatures, alpha=sample.alpha,
                         beta=sample.beta, rule=sample.rule)
    return codec, CodecFidelity(codec=codec.name, alpha=sample.alpha, beta=sample.beta,
                                rule=sample.rule if not codec.decodes_full else "exact",
                                fit_views=int(sample.fit.shape[0]) if codec.learned else 0,
                                scored_views=int(sample.scored.shape[0]), classes_seen=sample.classes_seen,
                                num_classes=int(sample.fit.shape[1]), scores=scores, choice=choice)


def choose_auto(sample: Sample, candidates: Sequence[str] = AUTO_CANDIDATES) -> tuple[Codec, CodecFidelity]:
    """--codec auto: the smallest candidate (raw bytes per view) whose held-out fidelity meets the bar at every
    stored temperature for both students; fp32 when none does. The record's `choice` says which and why."""
    c = int(sample.fit.shape[1])
    bar = f"median >= {BAR_MEDIAN} and p5 >= {BAR_P5} at T = {', '.join(f'{t:g}' for t in sample.temperatures)}"
    failed, parsed = [], []
    for spec in candidates:
        try:
            parsed.append(parse_codec(spec, c))
        except ConfigError:  # e.g. topk:10+q4 for a teacher of 10 classes
            continue
    parsed.sort(key=lambda k: (k.bytes_per_entry(c), k.name))
    for codec in parsed:
        if isinstance(codec, LowRankCodec) and codec.sizes(c)[0] > sample.fit.shape[0]:
            failed.append(f"{codec.name} (rank {codec.sizes(c)[0]} needs as many fit views, "
                          f"has {sample.fit.shape[0]})")
            continue
        fitted, fid = fit_and_score(codec, sample)
        if fid.meets():
            why = (f"auto: {fitted.name} ({fitted.bytes_per_entry(c)} raw bytes/view) is the smallest candidate "
                   f"whose held-out gradient cosine meets {bar}")
            return fitted, dataclasses.replace(fid, choice=why + _failed(failed))
        w = fid.worst()
        failed.append(f"{codec.name} (median {w.cos_median:.5f} p5 {w.cos_p5:.4f} at T={w.temperature:g}, "
                      f"{w.student})")
    fallback, fid = fit_and_score(FloatCodec(dtype="fp32"), sample)
    return fallback, dataclasses.replace(fid, choice=f"auto: fp32 (exact): no candidate meets {bar}" + _failed(failed))


def _failed(failed: list[str]) -> str:
    return f"; smaller ones failed: {', '.join(failed)}" if failed else ""
