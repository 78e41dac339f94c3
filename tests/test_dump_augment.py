"""dump-teacher with a strong recipe (issue 24): every view's augmentation record stored in views/aug, the teacher run
on the mixed pixels, both labels' exact logits stored (logits/target, logits/target_b); the same cache whatever the
worker count or a crash; crop + flip caches exactly as before."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from dkd_cache import augment
from dkd_cache import cache as cache_mod
from dkd_cache.cache_writer import augment_arrays
from dkd_cache.data import expand_shards, iter_raw_samples, parse_sample
from dkd_cache.dump import dump_teacher, render_shard
from dkd_cache.errors import ConfigError
from dkd_cache.inspect import describe, render_text
from dkd_cache.synth import make_shards
from dkd_cache.teacher import load_teacher
from dkd_cache.views import Recipe, decode, draw_view, normalize

from .conftest import CLASSES, dump_settings
from .helpers import assert_caches_equal, sample_members, write_tar

HARNESS = Path(__file__).with_name("fault_harness.py")
STRONG = Recipe(image_size=24, randaugment="rand-m9-mstd0.5", color_jitter=0.4, random_erasing=0.25, mixup=0.8,
                cutmix=1.0, mix_window=4)
# the arrays of a crop + flip cache (codec topk:4), as dkd-cache wrote them before augmentation existed
CROP_FLIP_ARRAYS = ["logits/lse", "logits/target", "logits/topk_idx", "logits/topk_val", "samples/height",
                    "samples/key", "samples/label", "samples/shard", "samples/status", "samples/width", "views/box",
                    "views/flip"]


def _arrays(path) -> list[str]:
    g = zarr.open_group(str(path), mode="r")
    return sorted(f"{grp}/{k}" for grp in ("samples", "views", "logits") for k, _ in g[grp].members())


@pytest.fixture(scope="module")
def strong_shards(tmp_path_factory) -> dict:
    """10 classes, 40 samples in shards of 15, 15, 10: mix windows of 4 end part-way through a shard (15 = 4+4+4+3,
    the 3's odd one out unmixed)."""
    return make_shards(tmp_path_factory.mktemp("strong") / "data", classes=CLASSES, train_per_class=4,
                       val_per_class=1, shard_size=15, seed=3, min_side=30, max_side=60)


def _strong_settings(strong_shards, teacher, out, **kw):
    base = dict(recipe=STRONG, codec="fp32", temperatures=(1.0,), calibration_views=64)
    return dump_settings(strong_shards, teacher, out, **{**base, **kw})


@pytest.fixture(scope="module")
def strong_cache(strong_shards, teacher_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("strong-cache") / "strong.zarr"
    report = dump_teacher(_strong_settings(strong_shards, teacher_ckpt, out), progress=False)
    assert report.complete and report.views_written == 40 * 2
    return out


# ------------------------------------------------------------------------------------------ format
def test_a_crop_flip_cache_holds_exactly_the_arrays_it_held_before(cache_path):
    assert _arrays(cache_path) == CROP_FLIP_ARRAYS
    meta = cache_mod.open_cache(cache_path).meta
    assert augment_arrays(meta) == {}
    stored = zarr.open_group(str(cache_path), mode="r").attrs["dkd_cache"]["recipe"]
    assert not set(stored) & {"randaugment", "color_jitter", "random_erasing", "mixup", "cutmix", "mix_window"}


def test_the_recipe_decides_which_arrays_are_added(cache_path):
    meta = cache_mod.open_cache(cache_path).meta
    only_ops = augment_arrays(dataclasses.replace(meta, recipe=Recipe(image_size=32, color_jitter=0.4)))
    assert set(only_ops) == {"views/aug"} and only_ops["views/aug"][0] == (5,)
    only_mix = augment_arrays(dataclasses.replace(meta, recipe=Recipe(image_size=32, mixup=0.8)))
    assert set(only_mix) == {"views/aug", "logits/target_b"} and only_mix["views/aug"][0] == (12,)


def test_a_strong_cache_adds_views_aug_and_target_b(strong_cache):
    assert _arrays(strong_cache) == sorted(["logits/full", "logits/lse", "logits/target", "logits/target_b",
                                            "samples/height", "samples/key", "samples/label", "samples/shard",
                                            "samples/status", "samples/width", "views/aug", "views/box",
                                            "views/flip"])
    cache = cache_mod.open_cache(strong_cache)
    assert "target_b" not in cache.codec_arrays
    g = zarr.open_group(str(strong_cache), mode="r")
    assert g["views/aug"].shape == (2, cache.meta.manifest.rows, 30) and g["views/aug"].dtype == np.uint8
    assert g["views/aug"].fill_value == 255
    assert g["logits/target_b"].shape == (2, cache.meta.manifest.rows)
    assert all(f.ok for f in cache.check(deep=True) if not f.warning)


def test_an_unfilled_views_aug_row_is_detected():
    values = np.zeros((3, 30), np.uint8)
    values[1] = 255  # the array's fill: what a lost inner chunk reads back as
    values[2, 1:] = 255  # a record whose flags byte is real is filled, whatever its other bytes
    assert cache_mod.unfilled_rows("views/aug", values).tolist() == [False, True, False]


def test_views_aug_bytes_per_view(strong_cache, capsys):
    """The measured size of the augmentation records: 30 bytes per view raw (1 flags + 2 RandAugment ops x 2 + 4
    jitter + 10 erasing + 11 mix), and on disk after zstd (printed, for the README)."""
    cache = cache_mod.open_cache(strong_cache)
    views = cache.meta.manifest.samples * cache.meta.views
    assert augment.record_bytes(STRONG) == 30
    assert augment.record_bytes(dataclasses.replace(STRONG, randaugment="rand-m9-mstd0.5-n3")) == 32
    on_disk = cache_mod.disk_bytes(strong_cache, "views/aug") / views
    info = describe(strong_cache)
    assert info["augment"]["record_bytes"] == 30 and info["augment"]["bytes_per_view_on_disk"] == on_disk
    text = render_text(info)
    assert "randaugment rand-m9-mstd0.5 -> colour jitter 0.4 -> random erasing p 0.25 -> mixup" in text
    assert "views/aug 30 bytes per view" in text
    with capsys.disabled():
        print(f"\nviews/aug: {augment.record_bytes(STRONG)} bytes per view raw, {on_disk:.1f} bytes per view on disk "
              f"({views} views, chunk_rows {cache.meta.chunk_rows})")


def test_inspect_of_a_crop_flip_cache_says_so(cache_path):
    info = describe(cache_path)
    assert info["augment"] == {"pipeline": "crop + flip", "record_bytes": 0, "bytes_per_view_on_disk": 0}
    assert "no views/aug record (crop + flip only)" in render_text(info)


# ------------------------------------------------------------------------------------------ the stored rows
def _shard_rows(cache, shard: int, name: str, view: int) -> np.ndarray:
    e = cache.meta.manifest.shards[shard]
    return cache.read_rows(name, e.row_start, e.row_start + e.samples, view=view)


def test_stored_records_are_the_parameters_redrawn_from_the_seed(strong_cache):
    cache = cache_mod.open_cache(strong_cache)
    m, recipe = cache.meta, cache.meta.recipe
    modes = []
    for shard, e in enumerate(m.manifest.shards):
        keys = cache_mod.decode_keys(cache.read_rows("samples/key", e.row_start, e.row_start + e.samples))
        h = cache.read_rows("samples/height", e.row_start, e.row_start + e.samples)
        w = cache.read_rows("samples/width", e.row_start, e.row_start + e.samples)
        for view in range(m.views):
            records = _shard_rows(cache, shard, "views/aug", view)
            boxes = _shard_rows(cache, shard, "views/box", view)
            mixes = [mix for win in range(-(-e.samples // recipe.mix_window)) for mix in augment.draw_mixes(
                m.seed, view, e.name, win, min(recipe.mix_window, e.samples - win * recipe.mix_window), recipe)]
            for pos, key in enumerate(keys):
                aug, mix = augment.unpack(records[pos], pos, recipe)
                assert aug == augment.draw_augment(m.seed, view, key, recipe)
                assert mix == mixes[pos]
                assert tuple(boxes[pos]) == draw_view(m.seed, view, key, int(h[pos]), int(w[pos]), recipe)[:4]
                modes.append(mix.mode)
    # the draw is not degenerate: both mixes, and the odd one out of each shard's 3-sample last window
    assert {0, 1, 2} <= set(modes)


def _render_pair_views(url: str, recipe, seed: int, view: int, shard_name: str, samples: int) -> list[torch.Tensor]:
    """Every sample's view `view`, rendered here through augment (render_view, then apply_mix with the partner's
    unmixed view), as training renders it."""
    decoded = [(s.key, decode(s.image)) for s in (parse_sample(r) for r in iter_raw_samples(url))]
    unmixed = []
    for key, img in decoded:
        box = draw_view(seed, view, key, img.shape[1], img.shape[2], recipe)
        unmixed.append(augment.render_view(img, box[:4], box[4], augment.draw_augment(seed, view, key, recipe),
                                           recipe))
    W = recipe.mix_window
    mixes = [mix for win in range(-(-samples // W))
             for mix in augment.draw_mixes(seed, view, shard_name, win, min(W, samples - win * W), recipe)]
    return [augment.apply_mix(unmixed[pos], unmixed[mixes[pos].partner], mixes[pos]) for pos in range(samples)]


def test_stored_logits_are_the_teachers_on_the_mixed_pixels(strong_cache, strong_shards, teacher_ckpt):
    cache = cache_mod.open_cache(strong_cache)
    m = cache.meta
    model, _ = load_teacher("resnet18", teacher_ckpt)
    shard = 1
    e = m.manifest.shards[shard]
    url = expand_shards(str(Path(strong_shards["train"][0]).parent))[shard]
    dumped = list(render_shard(shard, url, m, skip_bad=False))  # exactly what the dump's workers produced
    labels = cache.read_rows("samples/label", e.row_start, e.row_start + e.samples)
    differ = 0
    for view in range(m.views):
        images = _render_pair_views(url, m.recipe, m.seed, view, e.name, e.samples)
        for pos, img in enumerate(images):
            assert torch.equal(img, dumped[pos].images[view])  # bit for bit
        with torch.inference_mode():
            logits = model(normalize(torch.stack(images), m.recipe)).float()
        records = _shard_rows(cache, shard, "views/aug", view)
        partners = [augment.unpack(records[pos], pos, m.recipe)[1].partner for pos in range(e.samples)]
        label_b = labels[partners]
        rows = torch.arange(e.samples)
        target, target_b = _shard_rows(cache, shard, "logits/target", view), _shard_rows(cache, shard,
                                                                                         "logits/target_b", view)
        np.testing.assert_allclose(target, logits[rows, torch.from_numpy(labels).long()].numpy(), rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(target_b, logits[rows, torch.from_numpy(label_b).long()].numpy(), rtol=1e-5,
                                   atol=1e-5)
        full = _shard_rows(cache, shard, "logits/full", view)
        np.testing.assert_allclose(full, logits.numpy(), rtol=1e-5, atol=1e-5)
        # one set of logits: target and target_b read from the same row
        np.testing.assert_array_equal(target, full[rows, labels])
        np.testing.assert_array_equal(target_b, full[rows, label_b])
        differ += int((label_b != labels).sum())
    assert differ > 0  # some pairs do mix two classes


def test_caches_are_identical_across_worker_counts(strong_cache, strong_shards, teacher_ckpt, tmp_path):
    other = tmp_path / "w2.zarr"
    dump_teacher(_strong_settings(strong_shards, teacher_ckpt, other, workers=2), progress=False)
    assert_caches_equal(strong_cache, other)


# ------------------------------------------------------------------------------------------ bad samples, faults
def test_a_skipped_samples_partner_is_stored_unmixed(tmp_path, teacher_ckpt):
    """Mixing only (cutmix, no per-sample op: a 12-byte record). Sample 'c' is undecodable and skipped; its
    partner in the window is stored unmixed (mode 0, partner itself, target_b = target); the other pair mixes."""
    recipe = Recipe(image_size=24, cutmix=1.0, mix_window=4)
    members = sum((sample_members(k, i, seed=i) for i, k in enumerate("abcd")), [])
    members = [(n, b"not a jpeg" if n == "c.jpg" else b) for n, b in members]
    write_tar(tmp_path / "shards" / "x.tar", members)
    out = tmp_path / "c.zarr"
    report = dump_teacher(dump_settings({"train": [str(tmp_path / "shards" / "x.tar")]}, teacher_ckpt, out,
                                        recipe=recipe, skip_bad=True, codec="fp32", temperatures=(1.0,)),
                          progress=False)
    assert report.complete and report.skipped == 1
    cache = cache_mod.open_cache(out)
    for view in range(2):
        drawn = augment.draw_mixes(0, view, "x.tar", 0, 4, recipe)
        partner = drawn[2].partner  # of the skipped sample at position 2
        assert partner != 2 and drawn[partner].mode == 2
        records = cache.read_rows("views/aug", 0, 4, view=view)
        assert records.shape == (4, 12)
        _, mix = augment.unpack(records[partner], partner, recipe)
        assert mix == augment.ViewMix(partner=partner, mode=0)
        target, target_b = (cache.read_rows(n, 0, 4, view=view) for n in ("logits/target", "logits/target_b"))
        assert target_b[partner] == target[partner]
        for other in {0, 1, 3} - {partner}:  # the other pair mixes as drawn
            _, mix = augment.unpack(records[other], other, recipe)
            assert mix == drawn[other] and mix.mode == 2 and mix.partner not in (other, 2, partner)
            assert target_b[other] != target[other]  # another class's logit (labels 0, 1, 3 differ)
    assert all(f.ok for f in cache.check(deep=True) if not f.warning)


@pytest.mark.parametrize("renderer", ["device", "gpu"])
def test_the_batched_renderers_refuse_an_augmenting_recipe(strong_shards, teacher_ckpt, tmp_path, renderer):
    for recipe in (STRONG, Recipe(image_size=24, mixup=0.8), Recipe(image_size=24, random_erasing=0.25)):
        with pytest.raises(ConfigError, match="use --renderer cpu"):
            _strong_settings(strong_shards, teacher_ckpt, tmp_path / "c.zarr", renderer=renderer, recipe=recipe)
    _strong_settings(strong_shards, teacher_ckpt, tmp_path / "c.zarr", renderer=renderer, recipe=Recipe(image_size=24))


@pytest.mark.slow
def test_a_strong_dump_killed_mid_write_then_rerun_equals_uninterrupted(strong_cache, strong_shards, teacher_ckpt,
                                                                        tmp_path):
    """SIGKILL half way through the write of tar shard 1's logits/target_b chunk (fault_harness), then the same
    command again: the cache equals the uninterrupted one."""
    config = tmp_path / "strong.toml"
    config.write_text("[recipe]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in STRONG.to_dict().items()))
    out = tmp_path / "killed.zarr"
    args = ["dump-teacher", "--config", str(config), "--shards", str(Path(strong_shards["train"][0]).parent),
            "--weights", str(teacher_ckpt), "--out", str(out), "--arch", "resnet18", "--views", "2", "--codec",
            "fp32", "--temperature", "1", "--batch-size", "16", "--workers", "0", "--chunk-rows", "8",
            "--calibration-views", "64", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "DKD_FAULT": json.dumps({"put": {"match": "/logits/target_b/c/0/2", "n": 1}})}  # rows 16..23: shard 1
    r = subprocess.run([sys.executable, str(HARNESS), *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert len(list((out / "_dkd" / "done").glob("*.json"))) <= 1  # shard 0 at most: shard 1 was cut short
    env["DKD_FAULT"] = "{}"
    r = subprocess.run([sys.executable, str(HARNESS), *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_caches_equal(strong_cache, out)
