"""verify's part for recipes beyond crop and flip (issue 24): the drawn entries' stored augmentation records
(views/aug) against the records re-drawn from the seed, the mix partner each names, and the entries' pixels as the
dump rendered them.

    records re-drawn: augment.draw_augment(seed, view, key) and, when the recipe mixes, augment.draw_mixes of the
      row's mix window (a pair whose partner was skipped is stored unmixed, as the dump stores it), packed by
      augment.pack: the stored record must be that, byte for byte (`expected_record`)
    pixels: augment.render_view of the sample's stored box, flip and record (the one per-sample rendering of the
      dump and training) and, for a mixed view, of its partner's same view (the partner's stored box, flip and
      record, its bytes read from the shard), mixed by augment.apply_mix (`render_source`)

A crop + flip recipe's cache has no views/aug: verify renders and checks it as before (verify.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from . import augment
from .cache_meta import STATUS_OK
from .errors import CacheError
from .views import Recipe, decode, pixel_major


@dataclasses.dataclass(frozen=True, kw_only=True)
class RowRecord:
    """One entry's stored record, unpacked: its per-sample augmentation and its mix (None: the recipe does not mix),
    and the cache row of the partner the mix names (its own row when unmixed)."""

    aug: augment.ViewAugment
    mix: augment.ViewMix | None
    partner_row: int


def unpack_records(meta, rows: np.ndarray, records: np.ndarray, status: np.ndarray | None
                   ) -> tuple[list[RowRecord | None], list[str]]:
    """Each entry's stored record unpacked (augment.unpack), or None with the problem named: a record no pack
    writes (flags of another recipe, an op code out of range), or a mix whose partner lies outside the row's shard
    or is not a status-OK sample."""
    m, recipe = meta.manifest, meta.recipe
    starts = np.array([e.row_start for e in m.shards])
    out: list[RowRecord | None] = []
    problems: list[str] = []
    for r, record in zip(rows.tolist(), records):
        e = m.shards[int(np.searchsorted(starts, r, side="right")) - 1]
        pos = r - e.row_start
        try:
            aug, mix = augment.unpack(record, pos, recipe)
        except CacheError as err:
            out.append(None)
            problems.append(f"{e.name} position {pos}: {err}")
            continue
        partner = r if mix is None or mix.mode == 0 else e.row_start + mix.partner
        if not e.row_start <= partner < e.row_start + e.samples or (
                status is not None and status[partner] != STATUS_OK):
            out.append(None)
            problems.append(f"{e.name} position {pos}: mixed with position {mix.partner}, not a sample of the shard "
                            "the dump rendered")
            continue
        out.append(RowRecord(aug=aug, mix=mix, partner_row=partner))
    return out, problems


def expected_record(meta, status: np.ndarray, row: int, view: int, key: str,
                    windows: dict[tuple[int, int, int], list[augment.ViewMix]]) -> np.ndarray:
    """The record the dump writes for (row, view): augment.pack of draw_augment(seed, view, key) and, when the
    recipe mixes, of the row's entry in draw_mixes of its mix window; a pair whose partner is not a status-OK
    sample is stored unmixed (mode 0, partner its own position). `windows` memoises draw_mixes per
    (view, shard, window) over the calls of one verify."""
    m, recipe = meta.manifest, meta.recipe
    starts = np.array([e.row_start for e in m.shards])
    shard = int(np.searchsorted(starts, row, side="right")) - 1
    e = m.shards[shard]
    pos = row - e.row_start
    aug = augment.draw_augment(meta.seed, view, key, recipe)
    if not augment.mixes(recipe):
        return augment.pack(aug, None, pos, recipe)
    w = augment.window_of(pos, recipe)
    first = w * recipe.mix_window
    if (view, shard, w) not in windows:
        count = min(recipe.mix_window, e.samples - first)
        windows[(view, shard, w)] = augment.draw_mixes(meta.seed, view, e.name, w, count, recipe)
    mix = windows[(view, shard, w)][pos - first]
    if mix.mode != 0 and status[e.row_start + mix.partner] != STATUS_OK:
        mix = augment.ViewMix(partner=pos, mode=0)
    return augment.pack(aug, mix, pos, recipe)


def record_mismatches(meta, status: np.ndarray, rows: np.ndarray, views: np.ndarray, keys: dict[int, str],
                      records: np.ndarray) -> list[int]:
    """The entries (indices) whose stored record differs from the one re-drawn (expected_record)."""
    windows: dict[tuple[int, int, int], list[augment.ViewMix]] = {}
    return [i for i, (r, v) in enumerate(zip(rows.tolist(), views.tolist()))
            if not np.array_equal(records[i], expected_record(meta, status, r, v, keys[r], windows))]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViewParams:
    """What rendering one sample's view takes: the image's bytes, the stored box and flip, the per-sample
    augmentation (None: crop and flip only)."""

    data: bytes
    box: tuple[int, int, int, int]
    flip: bool
    aug: augment.ViewAugment | None


def partner_params(meta, row: int, data: bytes, box: np.ndarray, flip: np.ndarray | bool, record: np.ndarray
                   ) -> ViewParams | None:
    """A mix partner's view: its bytes and stored box, flip and augmentation (its record unpacked at its own shard
    position); None when its record cannot be unpacked (its own entry, if drawn, names the problem; the mixed view
    then renders without its partner, and the logit check shows it)."""
    m = meta.manifest
    starts = np.array([e.row_start for e in m.shards])
    pos = row - m.shards[int(np.searchsorted(starts, row, side="right")) - 1].row_start
    try:
        aug, _ = augment.unpack(record, pos, meta.recipe)
    except CacheError:
        return None
    return ViewParams(data=data, box=tuple(int(x) for x in box), flip=bool(flip), aug=aug)


def render_one(p: ViewParams, recipe: Recipe) -> torch.Tensor:
    """uint8 (3, S, S): the view as the dump renders it (decoded, pixel-major, augment.render_view)."""
    out = torch.empty((3, recipe.image_size, recipe.image_size), dtype=torch.uint8)
    out.copy_(augment.render_view(pixel_major(decode(p.data)), p.box, p.flip, p.aug, recipe, contiguous=False))
    return out


def render_source(own: ViewParams, partner: ViewParams | None, mix: augment.ViewMix | None,
                  recipe: Recipe) -> torch.Tensor:
    """An entry's pixels: its view, mixed with its partner's same view when the record mixes it."""
    image = render_one(own, recipe)
    if mix is None or mix.mode == 0 or partner is None:
        return image
    return augment.apply_mix(image, render_one(partner, recipe), mix)


def mix_entries(records: Sequence[RowRecord], labels: np.ndarray, size: int) -> dict[str, torch.Tensor]:
    """The batch entries a mixed batch's loss reads ("mix/lam" at `size`, "mix/label" the partner's label) of the
    compared entries' records; labels: the cache's per-row labels."""
    lam = [1.0 if r.mix is None else r.mix.lam(size) for r in records]
    return {"mix/lam": torch.tensor(lam, dtype=torch.float32),
            "mix/label": torch.as_tensor(labels[[r.partner_row for r in records]].astype(np.int64))}
