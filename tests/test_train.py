"""train-student: the three modes, DDP with unequal shards, exact resume, and refusal of mismatched input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dkd_cache.errors import CacheMismatchError, ConfigError
from dkd_cache.loader import (ITEMS_PER_TRANSFER, ItemGroup, batches, canonical_position, canonical_runs, plan_epoch,
                              skips_for)
from dkd_cache.synth import make_shards
from dkd_cache.checkpoint import read_checkpoint
from dkd_cache.train import TrainConfig, train_student, transfer_block

from .conftest import CLASSES


def cfg(shards, out, **kw) -> TrainConfig:
    base = dict(shards=str(Path(shards["train"][0]).parent), out=str(out), arch="resnet18", epochs=2, batch_size=16,
                lr=0.05, lr_batch=16, workers=0, lr_milestones=(1,), shuffle_buffer=16)
    base.update(kw)
    return TrainConfig(**base)


def weights(run: Path) -> dict:
    return read_checkpoint(run / "checkpoint.pt")["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_plan_gives_every_rank_the_same_count_and_covers_every_sample():
    sizes = [25, 25, 25, 3, 0, 7]
    for world in (1, 2, 3, 5):
        plans = [plan_epoch(sizes, seed=0, epoch=1, world=world, rank=r, workers=2) for r in range(world)]
        counts = {sum(p.counts) for p in plans}
        assert len(counts) == 1  # equal steps on every rank
        covered = sorted(t.shard for p in plans for w in p.workers for t in w if t.limit is None)
        assert covered == [i for i, n in enumerate(sizes) if n]  # each shard once, as a whole
        assert sum(p.padding for p in plans) == world * counts.pop() - sum(sizes)


def test_resume_skips_are_a_pure_function_of_position():
    counts = [20, 3, 18]  # round robin over workers by blocks of ITEMS_PER_TRANSFER (16) samples
    order = list(canonical_position(counts))
    assert len(order) == sum(counts) == len(set(order))
    assert order[:17] == [(0, s) for s in range(16)] + [(1, 0)]
    assert order[19:35] == [(2, s) for s in range(16)] and order[35:] == [(0, 16), (0, 17), (0, 18), (0, 19),
                                                                           (2, 16), (2, 17)]
    assert skips_for(counts, 20) == [16, 3, 1]
    assert skips_for(counts, 37) == [18, 3, 16]


def test_the_canonical_order_takes_blocks_of_the_transfer_block():
    counts = [20, 3, 18]
    order = list(canonical_position(counts, 8))
    assert order[:11] == [(0, s) for s in range(8)] + [(1, 0), (1, 1), (1, 2)]
    assert order[11:19] == [(2, s) for s in range(8)] and order[19:27] == [(0, s) for s in range(8, 16)]
    assert skips_for(counts, 19, 8) == [8, 3, 8]


def _groups(counts, block):
    """Worker groups of `block` samples whose pixels name their (worker, seq)."""
    out = []
    for w, n in enumerate(counts):
        for s0 in range(0, n, block):
            m = min(block, n - s0)
            seqs = torch.arange(s0, s0 + m)
            images = (seqs[:, None, None, None] + 100 * w).expand(m, 3, 2, 2).to(torch.uint8).contiguous()
            out.append(ItemGroup(w, s0, images, (seqs + 1000 * w).numpy(), {"logits/target": seqs.float().numpy()}))
    return out


def test_a_batch_inside_one_transfer_group_is_that_group_not_a_copy():
    counts, block = [20, 3, 18], 8
    plan = plan_epoch([20, 3, 18], seed=0, epoch=0, world=1, rank=0, workers=3)
    plan = type(plan)(workers=plan.workers, counts=tuple(counts), padding=0)
    groups = _groups(counts, block)
    order = list(canonical_position(counts, block))
    got = [(b.images, b.labels, b.entries) for b in batches(canonical_runs(iter(groups[::-1]), plan, [0, 0, 0],
                                                                            block), block)]
    assert sum(len(labels) for _, labels, _ in got) == sum(counts)
    at = 0
    for images, labels, entries in got:
        want = order[at:at + len(labels)]
        assert labels.tolist() == [s + 1000 * w for w, s in want]  # the canonical order, whatever the arrival
        assert images[:, 0, 0, 0].tolist() == [s + 100 * w for w, s in want]
        assert entries["logits/target"].tolist() == [float(s) for _, s in want]
        in_one = len({w for w, _ in want}) == 1 and want[0][1] // block == want[-1][1] // block
        shares = any(images.data_ptr() == g.images[want[0][1] - g.seq0:].data_ptr() for g in groups
                     if g.worker == want[0][0])
        assert shares == in_one  # a batch inside one group is a view of it; one across groups is copied
        at += len(labels)


def test_a_resumed_run_keeps_the_transfer_block_of_its_checkpoint():
    assert transfer_block(None, 64) == 64  # a new run: the rank's batch
    assert transfer_block({"consumed": 128, "transfer_block": 32}, 64) == 32
    assert transfer_block({"consumed": 128}, 64) == ITEMS_PER_TRANSFER == 16  # written before blocks were recorded


def test_cache_mode_never_builds_the_teacher(shards, cache_path, tmp_path, monkeypatch):
    import dkd_cache.teacher as teacher_mod
    import dkd_cache.train_setup as setup_mod

    built = []
    real_build = teacher_mod.build_model

    def spy(arch, num_classes):
        built.append(arch)
        return real_build(arch, num_classes)

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded in cache mode")

    monkeypatch.setattr(setup_mod, "build_model", spy)
    monkeypatch.setattr(setup_mod, "load_teacher", no_teacher)
    monkeypatch.setattr(teacher_mod, "load_teacher", no_teacher)
    r = train_student(cfg(shards, tmp_path / "run", cache=str(cache_path), epochs=1), progress=False)
    assert built == ["resnet18"]  # the student only
    assert r["dkd"] > 0 and r["rank_steps"] == [5]


def test_three_modes_share_one_loop(shards, cache_path, teacher_ckpt, tmp_path):
    ce = train_student(cfg(shards, tmp_path / "ce", loss="ce", cache=str(cache_path), epochs=1,
                           val_shards=str(Path(shards["val"][0]).parent)), progress=False)
    assert ce["dkd"] == 0 and 0 <= ce["val_top1"] <= 1 and ce["val_samples"] == shards["val_samples"]
    live = train_student(cfg(shards, tmp_path / "live", cache=str(cache_path), epochs=1,
                             live_teacher=str(teacher_ckpt), teacher_arch="resnet18"), progress=False)
    cached = train_student(cfg(shards, tmp_path / "cached", cache=str(cache_path), epochs=1), progress=False)
    # same views, same teacher: the cached top-k loss is close to the live full-logit one at the first step
    first = [json.loads(line) for line in (tmp_path / "live" / "metrics.jsonl").read_text().splitlines()][0]
    first_c = [json.loads(line) for line in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()][0]
    assert first["ce"] == pytest.approx(first_c["ce"], rel=1e-5)  # identical inputs and initial weights
    assert first["dkd"] == pytest.approx(first_c["dkd"], rel=0.25)
    assert live["rank_steps"] == cached["rank_steps"]
    # without a cache: CE from the shards, views drawn from (seed, epoch, key)
    nocache = train_student(cfg(shards, tmp_path / "nocache", loss="ce", num_classes=CLASSES, epochs=1,
                                recipe={"image_size": 32}), progress=False)
    assert nocache["samples"] == shards["train_samples"]


def test_resume_after_an_interrupted_epoch_equals_an_uninterrupted_run(shards, cache_path, tmp_path):
    full = tmp_path / "full"
    train_student(cfg(shards, full, cache=str(cache_path)), progress=False)
    part = tmp_path / "part"
    train_student(cfg(shards, part, cache=str(cache_path), max_steps=3), progress=False)  # stops mid-epoch 0
    assert read_checkpoint(part / "checkpoint.pt")["consumed"] == 48
    train_student(cfg(shards, part, cache=str(cache_path), max_steps=7), resume=True, progress=False)  # into epoch 1
    train_student(cfg(shards, part, cache=str(cache_path)), resume=True, progress=False)
    assert_same_weights(weights(full), weights(part))


def test_mismatched_cache_and_shards_are_refused(shards, cache_path, tmp_path):
    other = make_shards(tmp_path / "other", classes=CLASSES, train_per_class=8, val_per_class=1, shard_size=25,
                        seed=1, min_side=40, max_side=90)
    with pytest.raises(CacheMismatchError, match="shard"):
        train_student(cfg(other, tmp_path / "run", cache=str(cache_path)), progress=False)
    with pytest.raises(ConfigError, match="temperature"):
        train_student(cfg(shards, tmp_path / "run2", cache=str(cache_path), temperature=2.0), progress=False)
    with pytest.raises(ConfigError, match="recipe"):
        train_student(cfg(shards, tmp_path / "run3", cache=str(cache_path), recipe={"image_size": 48}),
                      progress=False)


def test_a_run_directory_holding_another_run_is_refused(shards, cache_path, tmp_path):
    run = tmp_path / "run"
    train_student(cfg(shards, run, cache=str(cache_path), max_steps=1), progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        train_student(cfg(shards, run, cache=str(cache_path)), progress=False)
    with pytest.raises(ConfigError, match="other settings"):
        train_student(cfg(shards, run, cache=str(cache_path), lr=0.1), resume=True, progress=False)
    (run / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(Exception, match="damaged"):
        train_student(cfg(shards, run, cache=str(cache_path)), resume=True, progress=False)


@pytest.mark.slow
def test_torchrun_two_ranks_unequal_shards_finish_with_equal_steps(shards, cache_path, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dkd_cache",
           "train-student", "--shards", str(Path(shards["train"][0]).parent), "--cache", str(cache_path),
           "--out", str(out), "--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--workers", "0",
           "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    epochs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == "epoch"]
    assert len(epochs) == 2
    for e in epochs:
        assert len(e["rank_steps"]) == 2 and e["rank_steps"][0] == e["rank_steps"][1]
        # 80 samples in shards of 25/25/25/5 over 2 ranks: 50 and 30, the second padded by 20; 6 full batches
        # of 8 per rank, the last 2 samples of each rank dropped
        assert e["samples"] == 96 and e["padding"] == 20 and e["dropped"] == 4
    # the summary is printed once, by rank 0
    summaries = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and json.loads(summaries[0])["epoch"] == 1, r.stdout


def test_a_live_teacher_is_compared_with_the_cache_by_its_tensors_not_its_file(shards, cache_path, teacher_ckpt,
                                                                               tmp_path):
    """The cache's teacher re-saved as safetensors is the same teacher (no warning); other tensors are warned of."""
    import warnings

    from safetensors.torch import save_file

    from dkd_cache import train_setup
    from dkd_cache.checkpoint import save_checkpoint

    sd = read_checkpoint(teacher_ckpt)["model"]
    resaved = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(resaved))
    other = tmp_path / "other.pt"
    save_checkpoint(other, model={k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}, arch="resnet18")
    for path, warned in ((resaved, False), (other, True)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            train_setup.resolve(cfg(shards, tmp_path / path.stem, cache=str(cache_path), live_teacher=str(path),
                                    teacher_arch="resnet18"))
        assert any("weights differ" in str(w.message) for w in seen) == warned, path
