"""Shared fixtures: tiny synthetic shards, a tiny teacher checkpoint and a dumped cache (built once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")

from dkd_cache.dump import DumpSettings, dump_teacher  # noqa: E402
from dkd_cache.synth import make_shards  # noqa: E402
from dkd_cache.checkpoint import save_checkpoint  # noqa: E402
from dkd_cache.teacher import build_model  # noqa: E402
from dkd_cache.views import Recipe  # noqa: E402
from dkd_cache import transfer  # noqa: E402

# Every transfer ring made in the tests poisons the slots it takes back: a consumer that reads a batch after
# releasing it (or keeps a view of it) reads a flat POISON image, and the test comparing its pixels fails loudly.
transfer.POISON_RELEASED_SLOTS = True

CLASSES = 10
TINY_RECIPE = Recipe(image_size=32)


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> dict:
    """10 classes, 80 train samples in 4 shards of unequal size (25, 25, 25, 5), 20 val samples."""
    out = tmp_path_factory.mktemp("shards") / "data"
    return make_shards(out, classes=CLASSES, train_per_class=8, val_per_class=2, shard_size=25, seed=0,
                       min_side=40, max_side=90)


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A randomly initialised ResNet-18 'teacher' with 10 classes, saved as a dkd-cache checkpoint."""
    torch.manual_seed(0)
    model = build_model("resnet18", CLASSES)
    # Make the logits less flat than a fresh init so top-k and tails are non-trivial.
    with torch.no_grad():
        model.fc.weight.mul_(20.0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(path, model=model.state_dict(), arch="resnet18")
    return path


def dump_settings(shards: dict, teacher: Path, out: Path, **kw) -> DumpSettings:
    base = dict(shards=str(Path(shards["train"][0]).parent), weights=str(teacher), out=str(out), arch="resnet18",
                views=2, codec="topk:4", temperatures=(1.0, 4.0), recipe=TINY_RECIPE, batch_size=16, workers=0,
                chunk_rows=8, seed=0)
    base.update(kw)
    return DumpSettings(**base)


@pytest.fixture(scope="session")
def cache_path(shards, teacher_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "cache.zarr"
    dump_teacher(dump_settings(shards, teacher_ckpt, out), progress=False)
    return out
