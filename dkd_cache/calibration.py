"""The calibration sample, drawn from the shards before any cache row is written: a learned codec is fitted on one
part of it and every codec is scored on the other (codec_fidelity), so the cache records held-out fidelity.

Plan (a pure function of the shard index, the view count and the sample size): m samples are shared evenly over
the shards (shard i of S gets floor((i+1) m / S) - floor(i m / S); what a short shard cannot give is shared again
over the others). Within a shard the samples are stratified by the labels the scan already has: round robin over
the shard's labels (in order of first appearance), the earliest unused sample of each, so a shard written from
class folders (`tar --sort=name`) gives every class it holds, not only its first. The j-th planned sample (in
manifest order) gets views (j p + t) mod V for t < p, with p = ceil(n / usable samples) views per sample (one on
any real data set) and m = ceil(n / p). Split: every fourth planned sample (j mod 4 = 3) is scored, the others fit.

Stream shapes:
    plan: (shard, pos, view) entries
      --per shard: iter_raw_samples up to its last planned pos + parse + draw_view + render-->  CalibrationView
      --batches of batch_size ---------------------------------------------------------->  teacher logits (B, C)
The teacher runs as in the dump (same device, same autocast), so the logits are those the dump would store.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch

from .cache_writer import Calibrated, NewCache
from .codec_fidelity import Sample, choose_auto, fit_and_score
from .data import ShardIndex, iter_raw_samples, match_shards, parse_sample
from .errors import BadSampleError, ConfigError
from .teacher_signal import teacher_forward
from .views import Recipe, decode, draw_view, normalize, pixel_major, render_decoded


def calibration_plan(indexes: Sequence[ShardIndex], views: int, n: int) -> list[tuple[int, int, int]]:
    """(shard index, position in the shard, view) of the calibration entries, at most n of them."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"calibration views must be a positive integer, got {n!r}")
    usable = [[p for p in range(len(ix.keys)) if p not in {b for b, _ in ix.bad}] for ix in indexes]
    total = sum(len(u) for u in usable)
    if total == 0:
        return []
    per = min(views, math.ceil(n / total))           # views per sample
    m = min(total, math.ceil(n / per))               # samples
    taken = [0] * len(usable)
    while sum(taken) < m:  # even shares of what is left over the shards that still have samples (water filling)
        spare = [i for i, u in enumerate(usable) if taken[i] < len(u)]
        left = m - sum(taken)
        for j, i in enumerate(spare):
            taken[i] += min((j + 1) * left // len(spare) - j * left // len(spare), len(usable[i]) - taken[i])
    picks = [(i, p) for i, u in enumerate(usable)
             for p in stratified(u, [indexes[i].labels[q] for q in u], taken[i])]
    out = []
    for j, (shard, pos) in enumerate(picks):
        out.extend((shard, pos, (j * per + t) % views) for t in range(per))
    return out[:n]


def stratified(positions: Sequence[int], labels: Sequence[int], k: int) -> list[int]:
    """k of the positions, in increasing order: round robin over the labels (in order of first appearance), the
    earliest unused position of each label, until k are taken."""
    queues: dict[int, list[int]] = {}
    for p, label in zip(positions, labels):
        queues.setdefault(label, []).append(p)
    picked: list[int] = []
    for depth in range(max((len(q) for q in queues.values()), default=0)):
        picked.extend(q[depth] for q in queues.values() if depth < len(q))
        if len(picked) >= k:
            break
    return sorted(picked[:k])


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationView:
    """One planned view rendered: its sample (shard index, position), the sample's label and the pixels."""

    shard: int
    pos: int
    label: int
    image: torch.Tensor  # uint8 (3, S, S)


def render_plan(plan: Sequence[tuple[int, int, int]], urls: Sequence[str], names: Sequence[str], seed: int,
                recipe: Recipe, num_classes: int, skip_bad: bool = False) -> Iterator[CalibrationView]:
    """The planned entries rendered, in plan order (reads each shard only up to its last pick). A sample that
    cannot be used raises BadSampleError, or is left out of the sample with skip_bad."""
    by_shard: dict[int, dict[int, list[int]]] = {}
    for shard, pos, view in plan:
        by_shard.setdefault(shard, {}).setdefault(pos, []).append(view)
    for shard in sorted(by_shard):
        wanted = by_shard[shard]
        last = max(wanted)
        for pos, raw in enumerate(iter_raw_samples(urls[shard])):
            if pos in wanted:
                try:
                    sample = parse_sample(raw, num_classes)
                    try:
                        img = decode(sample.image)
                    except Exception as e:
                        raise BadSampleError(names[shard], sample.key, f"image cannot be decoded ({e})") from None
                except BadSampleError:
                    if not skip_bad:
                        raise
                    continue
                h, w = int(img.shape[1]), int(img.shape[2])
                if len(wanted[pos]) > 1:
                    img = pixel_major(img)
                for view in wanted[pos]:
                    top, left, bh, bw, flip = draw_view(seed, view, sample.key, h, w, recipe)
                    yield CalibrationView(shard=shard, pos=pos, label=sample.label,
                                          image=render_decoded(img, (top, left, bh, bw), flip, recipe))
            if pos >= last:
                break


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationLogits:
    logits: torch.Tensor  # float32 (N, C) on the CPU
    labels: torch.Tensor  # long (N,)
    samples: list[tuple[int, int]]  # (shard, pos) of each row


def calibration_logits(views: Iterator[CalibrationView], forward: Callable[[torch.Tensor], torch.Tensor],
                       recipe: Recipe, device: torch.device, batch_size: int) -> CalibrationLogits:
    """The teacher's logits of the rendered views; `forward` maps a normalised batch to logits."""
    # CalibrationView -> lists of batch_size of them -> float32 (B, C) logits on the CPU
    out, labels, samples = [], [], []
    for batch in _batched(views, batch_size):
        out.append(forward(normalize(torch.stack([v.image for v in batch]).to(device), recipe)).float().cpu())
        labels.extend(v.label for v in batch)
        samples.extend((v.shard, v.pos) for v in batch)
    if not out:
        raise ConfigError("the calibration sample is empty: the shards hold no usable sample")
    return CalibrationLogits(logits=torch.cat(out), labels=torch.tensor(labels, dtype=torch.long), samples=samples)


def _batched(items: Iterator, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


HELD_OUT_EVERY = 4  # every fourth calibration sample is scored, never fitted on


def split_sample(cal: CalibrationLogits, *, temperatures: Sequence[float], alpha: float, beta: float,
                 rule: str = "uniform") -> Sample:
    """Fit part and scored part by sample (every HELD_OUT_EVERY-th sample in plan order is scored), so no view of a
    scored sample is fitted on. With a single sample, both parts are that sample (a learned codec then refuses:
    see calibrate)."""
    order = {s: j for j, s in enumerate(dict.fromkeys(cal.samples))}
    held = torch.tensor([order[s] % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 for s in cal.samples])
    if not held.any():  # fewer than HELD_OUT_EVERY samples: score the last one
        held = torch.tensor([order[s] == len(order) - 1 for s in cal.samples])
    fit = ~held if (~held).any() else held
    return Sample(fit=cal.logits[fit], scored=cal.logits[held], scored_labels=cal.labels[held],
                  classes_seen=len(set(cal.labels[fit].tolist())), temperatures=tuple(temperatures), alpha=alpha,
                  beta=beta, rule=rule)


def calibrate(new: NewCache, *, model: torch.nn.Module, device: torch.device, urls: Sequence[str],
              calibration_views: int, batch_size: int, skip_bad: bool, alpha: float, beta: float,
              auto: bool = False) -> Calibrated:
    """The calibration hook dump-teacher hands its cache writer (run once, when the cache is created): the teacher's
    logits of the calibration sample, the codec fitted on one part (learned codecs) and scored on the other
    (codec_fidelity), or with `auto` the smallest candidate meeting the bar. The teacher runs exactly as for the
    cache's rows. A rank above the fit views is a ConfigError (never a silently lower rank); fewer classes seen
    than the teacher has is a warning, and recorded."""
    meta = new.meta
    names = [e.name for e in meta.manifest.shards]
    by_shard = match_shards(names, urls).found
    plan = calibration_plan(new.indexes, meta.views, calibration_views)
    views = render_plan(plan, [by_shard[i] for i in range(len(names))], names, meta.seed, meta.recipe,
                        meta.num_classes, skip_bad)
    cal = calibration_logits(views, lambda x: teacher_forward(model, x, meta.compute), meta.recipe, device,
                             batch_size)
    sample = split_sample(cal, temperatures=meta.temperatures, alpha=alpha, beta=beta)
    check_coverage(sample, new.indexes, meta.num_classes)
    if auto:
        codec, fidelity = choose_auto(sample)
        return Calibrated(codec=codec, fidelity=fidelity)
    codec = meta.codec
    if codec.learned:
        rank = codec.sizes(meta.num_classes)[0]
        fit_views = int(sample.fit.shape[0])
        if len(set(cal.samples)) < 2 or rank > fit_views:
            raise ConfigError(
                f"codec {codec.name}: a rank-{rank} basis needs at least {rank} fit views, and the calibration "
                f"sample gives {fit_views} ({len(cal.samples)} calibration views of {len(set(cal.samples))} samples; "
                f"every {HELD_OUT_EVERY}th sample is held out to score the fit). Raise --calibration-views to at "
                f"least {math.ceil(rank * HELD_OUT_EVERY / (HELD_OUT_EVERY - 1)) + 1}, or choose a smaller rank "
                f"explicitly (e.g. --codec lowrank:{max(1, fit_views)}...), or --codec auto")
    codec, fidelity = fit_and_score(codec, sample)
    return Calibrated(codec=codec, fidelity=fidelity)


def check_coverage(sample: Sample, indexes: Sequence[ShardIndex], num_classes: int) -> None:
    """Warn when the fit views hold fewer classes than the teacher has (the held-out score then covers less)."""
    if sample.classes_seen < num_classes:
        in_data = len({label for ix in indexes for label in ix.labels})
        fix = ("raise --calibration-views" if sample.classes_seen < in_data
               else "the shards hold no others: check the teacher and --shards")
        warnings.warn(f"calibration: the codec's fit views hold {sample.classes_seen} of the teacher's {num_classes} "
                      f"classes (the shards hold {in_data}); fidelity on the classes it never saw may be lower than "
                      f"recorded: {fix}", stacklevel=2)
