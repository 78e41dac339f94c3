"""verify of a cache dumped with a strong recipe (issue 24): every sampled row's stored augmentation record is the
one re-drawn from the seed, the views are re-rendered through augment.render_view and mixed with their partner's
view as the dump mixed them, the partner label's stored logit is compared too, and a tampered record fails."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from dkd_cache import augment
from dkd_cache import cache as cache_mod
from dkd_cache.dump import dump_teacher
from dkd_cache.verify import VerifySettings, entries_phase, integrity_phase, verify
from dkd_cache.views import Recipe

from .conftest import dump_settings
from .helpers import sample_members, write_tar
from .test_verify import LOOSE_SETTINGS

STRONG = Recipe(image_size=24, randaugment="rand-m9-mstd0.5", color_jitter=0.4, random_erasing=0.25, mixup=0.8,
                cutmix=1.0, mix_window=4)
ENTRIES = 50  # every (sample, view) entry of the one-shard cache: 25 samples x 2 views
RE_DRAWN = "stored augmentations = re-drawn from (seed, view, key) and the recipe"
UNPACK = "stored augmentation records unpack (the recipe's sections, a partner in the shard)"
TARGET = "logits: target logit |stored - live| max"


@pytest.fixture(scope="module")
def strong_cache(shards, teacher_ckpt, tmp_path_factory) -> Path:
    """The first shard (25 samples: mix windows 4 x 6 + 1) dumped with the strong recipe at 24 px, topk:4."""
    out = tmp_path_factory.mktemp("strong-verify") / "strong.zarr"
    settings = dataclasses.replace(dump_settings(shards, teacher_ckpt, out, recipe=STRONG), shards=shards["train"][0])
    dump_teacher(settings, progress=False)
    return out


def _settings(cache: Path, shards: dict, teacher: Path, **kw) -> VerifySettings:
    return VerifySettings(cache=str(cache), shards=shards["train"][0], weights=str(teacher),
                          **{"samples": ENTRIES, **LOOSE_SETTINGS, **kw})


def _failed(report: dict) -> set[str]:
    return {c["name"] for c in report["checks"] if not c["ok"]}


def _records(cache: Path) -> tuple[np.ndarray, list[list[tuple[augment.ViewAugment, augment.ViewMix]]]]:
    """views/aug (V, N, B) and each (view, row) unpacked."""
    recipe = cache_mod.open_cache(cache).meta.recipe
    aug = zarr.open_group(str(cache), mode="r")["views/aug"][:]
    return aug, [[augment.unpack(aug[v, r], r, recipe) for r in range(25)] for v in range(aug.shape[0])]


def test_verify_passes_on_a_strong_recipe_cache_and_compares_the_mixed_views(strong_cache, shards, teacher_ckpt):
    _, unpacked = _records(strong_cache)
    modes = {mix.mode for view in unpacked for _, mix in view}
    assert modes == {0, 1, 2}  # the cache holds unmixed, mixup and cutmix views: each is compared below
    report = verify(_settings(strong_cache, shards, teacher_ckpt, train_steps=2))
    assert report["passed"], _failed(report)
    checks = {c["name"]: c for c in report["checks"]}
    # training parity on the mixed batches (mixed CE + mixed DKD): the cache's first step = the ideal cache's
    assert report["train"]["vs_reference"]["first_loss_rel_diff"] <= 1e-5
    assert checks[RE_DRAWN]["ok"] and checks[RE_DRAWN]["figure"] == f"0/{ENTRIES}"
    assert checks[UNPACK]["ok"]
    assert checks["logits: partner target logit |stored - live| max"]["ok"]
    assert report["entries"]["compared"] == ENTRIES
    # the live teacher saw the dump's mixed pixels: same logits up to float rounding, for both targets
    assert report["logits"]["target_logit"]["max"] < 1e-4 and report["logits"]["target_b_logit"]["max"] < 1e-4
    for key in ("T=1 uniform", "T=4 bucket"):  # the mixed DKD from the stored entries = from an ideal cache
        assert report["loss"][key]["vs_ideal_cache"]["rel_err"] < 1e-5


def test_verify_entries_carry_each_rows_mix(strong_cache, shards, teacher_ckpt):
    """The entries' mix/lam and mix/label are their records' (lam at the recipe's size, the partner's label)."""
    s = _settings(strong_cache, shards, teacher_ckpt)
    cache = cache_mod.open_cache(strong_cache)
    integrity = integrity_phase(cache, cache.codec, s, torch.device("cpu"))
    entries = entries_phase(cache, cache.codec, integrity, s)
    lam, label_b = entries.mix["mix/lam"], entries.mix["mix/label"]
    assert lam.shape == label_b.shape == (ENTRIES,) and (lam < 1).any() and (lam == 1).any()
    labels = integrity.per["label"]
    row_of = {k: r for r, k in enumerate(cache_mod.decode_keys(integrity.per["key"][:25]))}
    _, unpacked = _records(strong_cache)
    for src in entries.sources:
        key, view = entries.names[src.index].split("/", 1)[1].rsplit(" view ", 1)  # "shard/key view v"
        aug, mix = unpacked[int(view)][row_of[key]]
        assert src.aug == aug and src.mix == mix
        assert float(lam[src.index]) == pytest.approx(mix.lam(STRONG.image_size))
        assert int(label_b[src.index]) == int(labels[mix.partner])
        assert (src.partner is None) == (mix.mode == 0)  # a mixed view's partner is another sample
        assert mix.mode == 0 or src.partner.data != src.data


def test_verify_fails_on_a_tampered_augmentation_record(strong_cache, shards, teacher_ckpt, tmp_path):
    """One view's colour-jitter code changed: the record is no longer the one the seed draws, and the view it
    renders is not the one the teacher saw."""
    bad = tmp_path / "jitter.zarr"
    shutil.copytree(strong_cache, bad)
    arr = zarr.open_group(str(bad), mode="r+")["views/aug"]
    record = arr[1, 7].copy()
    record[5] = (int(record[5]) + 128) % 256  # flags (1) + 2 ops (4): the brightness code
    arr[1, 7] = record
    report = verify(_settings(bad, shards, teacher_ckpt))
    failed = _failed(report)
    assert not report["passed"]
    assert RE_DRAWN in failed and TARGET in failed
    assert UNPACK not in failed and "teacher weights SHA-256 = the cache's" not in failed
    assert {c["name"]: c for c in report["checks"]}[RE_DRAWN]["figure"] == f"1/{ENTRIES}"


def test_verify_fails_on_a_tampered_mix(strong_cache, shards, teacher_ckpt, tmp_path):
    """A mixed view's lam changed, and another record's flags made unreadable: both are named."""
    bad = tmp_path / "mix.zarr"
    shutil.copytree(strong_cache, bad)
    _, unpacked = _records(strong_cache)
    view, row = next((v, r) for v in range(2) for r in range(25) if unpacked[v][r][1].mode == 1)
    arr = zarr.open_group(str(bad), mode="r+")["views/aug"]
    record = arr[view, row].copy()
    lam_at = len(record) - 10  # mix section: partner offset (1), lam_code (2), box (8)
    lam_code = int.from_bytes(record[lam_at:lam_at + 2].tobytes(), "little")
    record[lam_at:lam_at + 2] = np.frombuffer(((lam_code + 20000) % 65535).to_bytes(2, "little"), np.uint8)
    arr[view, row] = record
    other = arr[0, 20].copy()
    other[0] |= 3 << 3  # mix mode 3: no record holds it
    arr[0, 20] = other
    report = verify(_settings(bad, shards, teacher_ckpt))
    failed = _failed(report)
    assert {RE_DRAWN, UNPACK, TARGET} <= failed
    assert report["entries"]["compared"] == ENTRIES - 1  # the unreadable record's entry is left out, named


def test_verify_re_draws_a_skipped_samples_partner_as_unmixed(tmp_path, teacher_ckpt):
    """Sample 'c' is undecodable and skipped (--skip-bad): the dump stores its drawn partner unmixed, and verify's
    re-draw knows it (the record it expects is the unmixed one), so the cache verifies; the same record stored
    mixed as drawn would not."""
    recipe = Recipe(image_size=24, cutmix=1.0, mix_window=4)
    members = sum((sample_members(k, i, seed=i) for i, k in enumerate("abcd")), [])
    members = [(n, b"not a jpeg" if n == "c.jpg" else b) for n, b in members]
    tar = write_tar(tmp_path / "shards" / "x.tar", members)
    out = tmp_path / "c.zarr"
    dump_teacher(dump_settings({"train": [str(tar)]}, teacher_ckpt, out, recipe=recipe, skip_bad=True, codec="fp32",
                               temperatures=(1.0,)), progress=False)
    settings = VerifySettings(cache=str(out), shards=str(tar), weights=str(teacher_ckpt), samples=6)
    report = verify(settings)
    assert report["passed"], _failed(report)
    assert report["entries"]["compared"] == 6
    assert {c["name"]: c for c in report["checks"]}[RE_DRAWN]["figure"] == "0/6"
    # the skipped sample's partner stored mixed with it, as drawn: verify names the record
    partner = augment.draw_mixes(0, 0, "x.tar", 0, 4, recipe)[2].partner
    arr = zarr.open_group(str(out), mode="r+")["views/aug"]
    arr[0, partner] = augment.pack(augment.ViewAugment(), augment.draw_mixes(0, 0, "x.tar", 0, 4, recipe)[partner],
                                   partner, recipe)
    failed = _failed(verify(settings))
    assert UNPACK in failed  # it names a skipped sample as its partner


def test_verify_of_a_recipe_that_augments_without_mixing(shards, teacher_ckpt, tmp_path):
    """Colour jitter and random erasing only: records without a mix section, views rendered through
    augment.render_view, no partner read, no logits/target_b; an erased box moved fails."""
    recipe = Recipe(image_size=24, color_jitter=0.4, random_erasing=0.5)
    out = tmp_path / "ops.zarr"
    dump_teacher(dataclasses.replace(dump_settings(shards, teacher_ckpt, out, recipe=recipe, codec="fp32",
                                                   temperatures=(1.0,)), shards=shards["train"][0]), progress=False)
    settings = VerifySettings(cache=str(out), shards=shards["train"][0], weights=str(teacher_ckpt), samples=ENTRIES)
    report = verify(settings)
    assert report["passed"], _failed(report)
    assert "target_b_logit" not in report["logits"] and report["logits"]["target_logit"]["max"] < 1e-4
    arr = zarr.open_group(str(out), mode="r+")["views/aug"]
    records = arr[:]
    view, row = next((v, r) for v in range(2) for r in range(25) if records[v, r, 0] & 4)  # an erased view
    moved = records[view, row].copy()
    moved[5:7] = np.frombuffer(((int.from_bytes(moved[5:7].tobytes(), "little") + 9000) % 30000).to_bytes(
        2, "little"), np.uint8)  # the erased box's top
    arr[view, row] = moved
    failed = _failed(verify(settings))
    assert RE_DRAWN in failed and TARGET in failed


def test_verify_checks_every_rows_partner_logit_against_its_lse(strong_cache, shards, teacher_ckpt, tmp_path):
    """A partner logit above the row's lse (p > 1) is named on every row, drawn or not."""
    bad = tmp_path / "target_b.zarr"
    shutil.copytree(strong_cache, bad)
    arr = zarr.open_group(str(bad), mode="r+")["logits/target_b"]
    arr[0, 3] = np.float32(1e4)
    report = verify(_settings(bad, shards, teacher_ckpt, samples=2))
    assert "stored partner p_t <= 1 (logits/target_b vs lse)" in _failed(report)
    assert {c["name"]: c for c in report["checks"]}["stored partner p_t <= 1 (logits/target_b vs lse)"]["figure"] == 1
