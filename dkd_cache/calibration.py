"""The calibration sample a learned codec is fitted on, drawn from the shards before any cache row is written.

Plan (a pure function of the shard index, the view count and the sample size): m samples are shared evenly over
the shards (shard i of S gets floor((i+1) m / S) - floor(i m / S); what a short shard cannot give is shared again
over the others), each shard giving its first usable samples, so only the head of each tar is read; the j-th
planned sample (in manifest order) gets views (j p + t) mod V for t < p, with p = ceil(n / usable samples) views
per sample (one on any real data set) and m = ceil(n / p).

Stream shapes:
    plan: (shard, pos, view) entries
      --per shard: iter_raw_samples up to its last planned pos + parse + draw_view + render-->  uint8 (3, S, S)
      --batches of batch_size ---------------------------------------------------------->  teacher logits (B, C)
The teacher runs as in the dump (same device, same autocast), so the logits are those the dump would store.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from .cache_writer import NewCache
from .data import ShardIndex, iter_raw_samples, match_shards, parse_sample
from .errors import BadSampleError, ConfigError
from .logit_codecs import Codec
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
    picks = [(i, p) for i, u in enumerate(usable) for p in u[:taken[i]]]
    out = []
    for j, (shard, pos) in enumerate(picks):
        out.extend((shard, pos, (j * per + t) % views) for t in range(per))
    return out[:n]


def render_plan(plan: Sequence[tuple[int, int, int]], urls: Sequence[str], names: Sequence[str], seed: int,
                recipe: Recipe, num_classes: int, skip_bad: bool = False) -> Iterator[torch.Tensor]:
    """uint8 (3, S, S) renders of the planned entries, in plan order (reads each shard only up to its last pick).
    A sample that cannot be used raises BadSampleError, or is left out of the sample with skip_bad."""
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
                    yield render_decoded(img, (top, left, bh, bw), flip, recipe)
            if pos >= last:
                break


def calibration_logits(renders: Iterator[torch.Tensor], forward: Callable[[torch.Tensor], torch.Tensor],
                       recipe: Recipe, device: torch.device, batch_size: int) -> torch.Tensor:
    """float32 (N, C) teacher logits of the renders, on the CPU; `forward` maps a normalised batch to logits."""
    # uint8 (3, S, S) renders -> lists of batch_size of them -> float32 (B, C) logits on the CPU
    out = [forward(normalize(torch.stack(batch).to(device), recipe)).float().cpu()
           for batch in _batched(renders, batch_size)]
    if not out:
        raise ConfigError("the calibration sample is empty: the shards hold no usable sample")
    return torch.cat(out)


def _batched(items: Iterator[torch.Tensor], n: int) -> Iterator[list[torch.Tensor]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def fit_codec(new: NewCache, *, model: torch.nn.Module, device: torch.device, urls: Sequence[str],
              calibration_views: int, batch_size: int, skip_bad: bool) -> Codec:
    """A learned codec fitted on the teacher's logits of the calibration sample, before any row is written: the
    fit hook dump-teacher hands its cache writer. The teacher runs exactly as for the cache's rows."""
    meta = new.meta
    names = [e.name for e in meta.manifest.shards]
    by_shard = match_shards(names, urls).found
    plan = calibration_plan(new.indexes, meta.views, calibration_views)
    renders = render_plan(plan, [by_shard[i] for i in range(len(names))], names, meta.seed, meta.recipe,
                          meta.num_classes, skip_bad)
    logits = calibration_logits(renders, lambda x: teacher_forward(model, x, meta.compute), meta.recipe, device,
                                batch_size)
    return meta.codec.fit(logits)
