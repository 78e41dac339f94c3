"""Training's loader replays augmented and mixed views bit for bit (issue 24, design section 6): each view rendered
by augment.render_view from its drawn (or stored) parameters, mixed with its partner's same view by
augment.apply_mix; mix windows travel as one unit, so the pixels do not depend on workers, ranks or a resume."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import dkd_cache
from dkd_cache import augment
from dkd_cache.data import expand_shards, iter_raw_samples, parse_sample, shard_name
from dkd_cache.loader import RankPlan, StreamSpec, Task, worker_items
from dkd_cache.views import Recipe, center_crop, decode, draw_view, normalize

from .conftest import CLASSES
from .helpers import sample_members, write_tar

STRONG = Recipe(image_size=32, randaugment="rand-m9-mstd0.5", color_jitter=0.4, random_erasing=0.25, mixup=0.8,
                cutmix=1.0)  # the DeiT-style recipe at the tests' size; windows of 8 (shards of 25: a last one of 1)


def _glob(shards) -> str:
    return str(Path(shards["train"][0]).parent / "train-*.tar")


def _loader(shards, recipe=STRONG, **kw) -> dkd_cache.DistillLoader:
    kw = {"batch_size": 16, "workers": 0, "num_classes": CLASSES, "normalize": False, **kw}
    return dkd_cache.DistillLoader(_glob(shards), recipe=recipe, **kw)


def _rows(batches) -> list[tuple]:
    """Each row of the batches as (pixels, label, entries' values): what a row is, wherever it lands."""
    return [(b.images[i].numpy().tobytes(), int(b.labels[i]),
             *((k, v.item() if v.ndim == 0 else v.numpy().tobytes())
               for k, v in sorted((k, b.entries[k][i]) for k in b.entries)))
            for b in batches for i in range(len(b))]


def _same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels) and x.entries.keys() == y.entries.keys()
        and all(torch.equal(x.entries[k], y.entries[k]) for k in x.entries) for x, y in zip(a, b))


def reference_rows(shards, recipe: Recipe, *, seed: int, view: int) -> collections.Counter:
    """Every sample's view as the dump draws and renders it, written out from the design's functions alone:
    box and flip (views.draw_view), per-sample parameters (augment.draw_augment), augment.render_view, each mix
    window's pairs (augment.draw_mixes), augment.apply_mix with the partner's unmixed view."""
    rows = collections.Counter()
    for url in expand_shards(_glob(shards)):
        samples = [parse_sample(raw) for raw in iter_raw_samples(url)]
        own = []
        for s in samples:
            img = decode(s.image)
            top, left, h, w, flip = draw_view(seed, view, s.key, img.shape[1], img.shape[2], recipe)
            own.append(augment.render_view(img, (top, left, h, w), flip,
                                           augment.draw_augment(seed, view, s.key, recipe), recipe))
        width = recipe.mix_window
        for window in range(-(-len(samples) // width)):
            count = min(width, len(samples) - window * width)
            for pos, mix in enumerate(augment.draw_mixes(seed, view, shard_name(url), window, count, recipe),
                                      start=window * width):
                pixels = augment.apply_mix(own[pos], own[mix.partner], mix)
                rows[(pixels.numpy().tobytes(), samples[pos].label, ("mix/label", samples[mix.partner].label),
                      ("mix/lam", float(np.float32(mix.lam(recipe.image_size)))))] += 1
    return rows


def test_without_a_cache_the_strong_recipes_views_are_the_dumps_on_any_number_of_workers(shards):
    """CE and live-teacher runs draw every parameter as the dump draws it: the epoch's rows are the reference's,
    whatever the workers; 0 and 1 workers read in one stream (the same batches), and the same seed on 2 workers
    gives the same batches again."""
    want = reference_rows(shards, STRONG, seed=0, view=0)
    runs = {w: list(_loader(shards, workers=w)) for w in (0, 1, 2)}
    for w, batches in runs.items():
        assert collections.Counter(_rows(batches)) == want, w
        assert all(sorted(b.entries) == ["mix/label", "mix/lam"] for b in batches)
        assert all(b.entries["mix/lam"].dtype == torch.float32 and b.entries["mix/label"].dtype == torch.int64
                   for b in batches)
    assert _same_batches(runs[0], runs[1])
    assert _same_batches(runs[2], list(_loader(shards, workers=2)))
    lam = torch.cat([b.entries["mix/lam"] for b in runs[0]])
    same = torch.cat([b.entries["mix/label"] == b.labels for b in runs[0]])
    assert (lam < 1).sum() > 40 and bool((lam[~same] < 1).all())  # mixed rows, each with its partner's label
    assert torch.equal(lam[~same], lam[~same].clamp(0, 1))


def test_each_epochs_views_and_pairs_are_its_own(shards):
    """Epoch e without a cache draws view e: other boxes, augmentations and pairs, the reference's for view e."""
    loader = _loader(shards, epoch=1)
    assert collections.Counter(_rows(loader)) == reference_rows(shards, STRONG, seed=0, view=1)
    assert collections.Counter(_rows(_loader(shards, seed=3))) == reference_rows(shards, STRONG, seed=3, view=0)


def test_a_resume_mid_epoch_gives_the_rest_of_the_uninterrupted_epoch(shards):
    """Resume counts items, not mix windows: batch k.. of the uninterrupted epoch, also when a window's rows
    straddle the resume point."""
    for workers in (0, 2):
        whole = list(_loader(shards, workers=workers, batch_size=6))
        for start in (1, 5, len(whole) - 1):
            rest = list(_loader(shards, workers=workers, batch_size=6, start_step=start))
            assert _same_batches(rest, whole[start:]), (workers, start)


def test_ranks_split_the_windows_and_pad_with_rendered_rows(shards):
    """Over 3 ranks (shards of 25/25/25/5, padded): every rank's rows are the reference's (a padding task renders
    the partners past its limit), and together the ranks cover every row."""
    want = reference_rows(shards, STRONG, seed=0, view=0)
    seen = collections.Counter()
    for rank in range(3):
        loader = _loader(shards, rank=rank, world=3, batch_size=2, workers=2 if rank == 1 else 0)
        assert loader.dropped == 0 and loader.padding > 0
        rows = collections.Counter(_rows(loader))
        assert all(row in want for row in rows), rank
        seen += rows
    assert set(seen) == set(want) and sum(seen.values()) > sum(want.values())  # padding repeats rows


def test_views_per_decode_mixes_each_view_with_its_partners_same_view(shards):
    loader = _loader(shards, views_per_decode=2)
    assert loader.samples == 160
    assert collections.Counter(_rows(loader)) == (reference_rows(shards, STRONG, seed=0, view=0)
                                                  + reference_rows(shards, STRONG, seed=0, view=1))


def test_a_recipe_without_mixes_renders_augmented_views_with_no_mix_entries(shards):
    """Per-sample augmentations alone: render_view's pixels, entries as a crop+flip recipe has them (none)."""
    recipe = dataclasses.replace(STRONG, mixup=0.0, cutmix=0.0)
    batches = list(_loader(shards, recipe=recipe))
    assert all(b.entries == {} for b in batches)
    want = collections.Counter((pixels, label) for pixels, label, *_ in reference_rows(shards, recipe, seed=0,
                                                                                        view=0).elements())
    assert collections.Counter(_rows(batches)) == want


def test_crop_and_flip_rows_are_unchanged(shards):
    """A recipe without augmentations: the rows are views.render_decoded's, with no mix entries."""
    recipe = Recipe(image_size=32)
    assert collections.Counter((p, label) for p, label, *_ in reference_rows(shards, recipe, seed=0, view=0)
                               .elements()) == collections.Counter(_rows(_loader(shards, recipe=recipe)))


def test_evaluation_is_never_augmented(shards):
    url = expand_shards(_glob(shards))[3]
    spec = StreamSpec(urls=(url,), recipe=STRONG, seed=0, epoch=0, view=0, rank=0, cache_path=None,
                      num_classes=CLASSES, evaluation=True)
    items = list(worker_items(spec, (Task(0),), 0, 0))
    raws = [parse_sample(raw) for raw in iter_raw_samples(url)]
    assert len(items) == len(raws) == 5
    for item, s in zip(items, raws):
        assert item.entry == {} and torch.equal(item.image, center_crop(s.image, STRONG))


def test_the_live_teacher_gets_the_partner_labels(shards, teacher_ckpt):
    """A LiveTeacher's entries for a mixing recipe: the partner label's exact logit beside the own one, and the
    rows' lam and partner label, as a cache of the same recipe gives them."""
    live = dkd_cache.LiveTeacher.from_file(teacher_ckpt, arch="resnet18")
    batch = next(iter(_loader(shards, teacher=live, normalize=True)))
    assert {"logits/target", "logits/target_b", "mix/lam", "mix/label"} <= set(batch.entries)
    mixed = batch.entries["mix/label"] != batch.labels
    assert bool(mixed.any())
    assert torch.equal(batch.entries["logits/target_b"][~mixed], batch.entries["logits/target"][~mixed])
    assert not torch.equal(batch.entries["logits/target_b"][mixed], batch.entries["logits/target"][mixed])


def test_a_windows_samples_travel_together(shards):
    """Two workers split the shards, never a window: each worker's stream holds whole windows, so every row's
    partner is rendered by the worker that renders the row."""
    urls = tuple(expand_shards(_glob(shards)))
    spec = StreamSpec(urls=urls, recipe=STRONG, seed=0, epoch=0, view=0, rank=0, cache_path=None,
                      num_classes=CLASSES, shuffle_buffer=8)
    plan = RankPlan(workers=((Task(0), Task(3)), (Task(1), Task(2))), counts=(30, 50), padding=0)
    want = reference_rows(shards, STRONG, seed=0, view=0)
    got = collections.Counter()
    for w in (0, 1):
        items = list(worker_items(spec, plan.workers[w], w, 0))
        assert [i.seq for i in items] == list(range(plan.counts[w]))
        got += collections.Counter((i.image.contiguous().numpy().tobytes(), i.label,
                                    ("mix/label", int(i.entry["mix/label"])), ("mix/lam", float(i.entry["mix/lam"])))
                                   for i in items)
    assert got == want


# --------------------------------------------------------------------------------------------- from a cache
def _dump_recording(shards_dir: str, teacher_ckpt, out: Path, **kw) -> dict[bytes, bytes]:
    """Dump a strong-recipe cache (fp32 logits) and record what the teacher was fed: {normalised pixels: logits}."""
    from dkd_cache import dump as dump_mod

    fed: dict[bytes, bytes] = {}
    real = dump_mod.teacher_forward

    def recording(model, images, policy):
        logits = real(model, images, policy)
        for x, z in zip(images, logits):
            fed[x.contiguous().numpy().tobytes()] = z.numpy().tobytes()
        return logits

    settings = dict(shards=shards_dir, weights=str(teacher_ckpt), out=str(out), arch="resnet18", views=2,
                    codec="fp32", temperatures=(1.0,), recipe=STRONG, batch_size=16, workers=0, chunk_rows=8, seed=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dump_mod, "teacher_forward", recording)
        dump_mod.dump_teacher(dump_mod.DumpSettings(**{**settings, **kw}), progress=False)
    return fed


@pytest.fixture(scope="module")
def strong_cache(shards, teacher_ckpt, tmp_path_factory) -> tuple[Path, dict[bytes, bytes]]:
    out = tmp_path_factory.mktemp("strong") / "cache.zarr"
    return out, _dump_recording(str(Path(shards["train"][0]).parent), teacher_ckpt, out)


def _check_rows_are_the_teachers(batches, fed: dict[bytes, bytes], recipe: Recipe) -> int:
    """Every row's pixels are pixels the dump fed the teacher, and its stored logits are what the teacher gave for
    exactly those pixels; the row's two targets are those logits at its label and at its partner's."""
    n = 0
    for b in batches:
        x = normalize(b.images, recipe, channels_last=False)
        full = b.entries["logits/full"]
        for i in range(len(b)):
            seen = fed.get(x[i].numpy().tobytes())
            assert seen is not None, "a row the teacher never saw"
            assert seen == full[i].numpy().tobytes()
            assert b.entries["logits/target"][i] == full[i, b.labels[i]]
            assert b.entries["logits/target_b"][i] == full[i, b.entries["mix/label"][i]]
            n += 1
    return n


def test_training_renders_the_pixels_the_dump_fed_the_teacher_on_any_workers_and_ranks(shards, strong_cache):
    path, fed = strong_cache
    cache = dkd_cache.open_cache(path)
    assert {"mix/lam", "mix/label", "logits/target_b"} <= set(next(iter(_cached(shards, path))).entries)
    for epoch in (0, 1):  # stored views 0 and 1
        runs = {w: list(_cached(shards, path, workers=w, epoch=epoch)) for w in (0, 2)}
        assert _check_rows_are_the_teachers(runs[0], fed, cache.recipe) == 80
        assert _check_rows_are_the_teachers(runs[2], fed, cache.recipe) == 80
        assert collections.Counter(_rows(runs[0])) == collections.Counter(_rows(runs[2]))
    for rank in range(2):
        _check_rows_are_the_teachers(_cached(shards, path, rank=rank, world=2, workers=2 * rank, batch_size=8),
                                     fed, cache.recipe)
    lam = torch.cat([b.entries["mix/lam"] for b in runs[0]])
    assert (lam < 1).sum() > 40


def test_a_cached_resume_gives_the_rest_of_the_epoch(shards, strong_cache):
    path, _ = strong_cache
    for workers in (0, 2):
        whole = list(_cached(shards, path, workers=workers, batch_size=6, epoch=1))
        for start in (1, 7):
            assert _same_batches(list(_cached(shards, path, workers=workers, batch_size=6, epoch=1,
                                              start_step=start)), whole[start:]), (workers, start)


def test_the_cache_and_the_recipe_drawn_anew_give_the_same_rows(shards, strong_cache):
    """What a CE or live-teacher run draws without the cache is what the dump stored (same seed and view)."""
    path, _ = strong_cache
    cached = collections.Counter(tuple(r[:2]) + tuple(x for x in r[2:] if x[0].startswith("mix/"))
                                 for r in _rows(_cached(shards, path)))
    assert cached == collections.Counter(_rows(_loader(shards)))


def _cached(shards, path, **kw) -> dkd_cache.DistillLoader:
    kw = {"batch_size": 16, "workers": 0, "normalize": False, **kw}
    return dkd_cache.DistillLoader(_glob(shards), str(path), **kw)


@pytest.mark.filterwarnings("ignore:calibration")
def test_a_skipped_partner_leaves_its_pair_unmixed(tmp_path, teacher_ckpt):
    """A sample the dump skipped (--skip-bad) is not in training's stream, and its partner, stored unmixed, is
    rendered unmixed: its own label twice, lam 1; every row is still the teacher's."""
    members = []
    for i in range(12):
        members += sample_members(f"s{i:02d}", i % CLASSES, seed=i, image=b"not an image" if i in (1, 9) else None)
    write_tar(tmp_path / "data" / "train-000000.tar", members)
    path = tmp_path / "cache.zarr"
    fed = _dump_recording(str(tmp_path / "data"), teacher_ckpt, path, skip_bad=True)
    loader = dkd_cache.DistillLoader(str(tmp_path / "data"), str(path), batch_size=2, workers=0, normalize=False)
    batches = list(loader)
    assert loader.samples == 10 and _check_rows_are_the_teachers(batches, fed, loader.recipe) == 10
    cache = dkd_cache.open_cache(path)
    unmixed = collections.Counter()  # per view: rows stored unmixed
    for view in range(2):
        for pos in sorted(set(range(12)) - {1, 9}):  # the skipped rows hold no record
            _, mix = augment.unpack(cache.read_rows("views/aug", pos, pos + 1, view=view)[0], pos, STRONG)
            assert mix.partner not in (1, 9)
            unmixed[view] += mix.mode == 0
    # windows 0..7 and 8..11 (even: every position paired), each with one skipped sample: its partner unmixed
    assert unmixed == {0: 2, 1: 2}
    rows = [(label, dict(entries)) for _, label, *entries in _rows(batches)]  # epoch 0: view 0
    assert sum(e["mix/lam"] == 1.0 and e["mix/label"] == label for label, e in rows) == 2
    # a record naming a skipped sample as partner contradicts the cache: refused, naming the sample and partner
    import zarr

    aug, _ = augment.unpack(cache.read_rows("views/aug", 0, 1, view=0)[0], 0, STRONG)
    record = augment.pack(aug, augment.ViewMix(partner=1, mode=1, lam_code=30000), 0, STRONG)
    zarr.open_group(str(path), mode="r+")["views/aug"][0, 0] = record
    with pytest.raises(dkd_cache.CacheError, match=r"'s00' \(position 0\) is mixed with position 1"):
        list(dkd_cache.DistillLoader(str(tmp_path / "data"), str(path), batch_size=2, workers=0))


def test_train_student_resumed_mid_epoch_equals_the_uninterrupted_run(shards, strong_cache, tmp_path):
    """train-student on a strong-recipe cache with DataLoader workers: stopped in epoch 0 and resumed, the student
    is the uninterrupted one bit for bit (the same mixed batches, the same mixed losses)."""
    from dkd_cache.checkpoint import read_checkpoint
    from dkd_cache.train import TrainConfig, train_student

    path, _ = strong_cache
    base = TrainConfig(shards=str(Path(shards["train"][0]).parent), out=str(tmp_path / "full"), cache=str(path),
                       arch="resnet18", epochs=2, batch_size=16, lr=0.05, lr_batch=16, workers=2, lr_milestones=(1,),
                       shuffle_buffer=16, temperature=1.0)
    train_student(base, progress=False)
    part = str(tmp_path / "part")
    train_student(dataclasses.replace(base, out=part, max_steps=3), progress=False)
    train_student(dataclasses.replace(base, out=part), resume=True, progress=False)
    a, b = (read_checkpoint(Path(run) / "checkpoint.pt")["model"] for run in (base.out, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
