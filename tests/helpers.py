"""Small helpers for tests: hand-made tar shards and cache comparison."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from dkd_cache.store import location


def jpeg(seed: int = 0, size=(40, 50)) -> bytes:
    arr = (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with members (name, bytes) in the given order, like `tar cf` of a folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, label, seed: int = 0, image: bytes | None = None) -> list[tuple[str, bytes]]:
    out = [(f"{key}.jpg", jpeg(seed) if image is None else image)]
    if label is not None:
        out.append((f"{key}.cls", str(label).encode()))
    return out


def assert_caches_equal(a: str | Path, b: str | Path) -> None:
    """Every array of two caches (local folders or s3:// urls) equal, value for value (NaN == NaN), same metadata."""
    ga, gb = (zarr.open_group(location(str(x)).zarr_store(read_only=True), mode="r") for x in (a, b))
    names = sorted(f"{g}/{k}" for g in ("samples", "views", "logits") for k, _ in ga[g].members())
    assert names == sorted(f"{g}/{k}" for g in ("samples", "views", "logits") for k, _ in gb[g].members())
    for name in names:
        x, y = ga[name][...], gb[name][...]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), f"{name} differs"
    ma, mb = dict(ga.attrs["dkd_cache"]), dict(gb.attrs["dkd_cache"])
    assert ma == mb


def real_logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(teacher logits, student logits, labels) of shared/data/imagenet-real-logits, or skip the test without it."""
    rel = Path("data/imagenet-real-logits/logits.npz")
    root = Path(__file__).resolve().parents[1]
    for p in (os.environ.get("DKD_REAL_LOGITS"), root / "shared" / rel, root.parent / "shared" / rel):
        if p and Path(p).is_file():
            d = np.load(p)
            return (torch.from_numpy(d["teacher_logits"]).float(), torch.from_numpy(d["student_logits"]).float(),
                    torch.from_numpy(d["labels"].astype(np.int64)))
    if os.environ.get("DKD_REAL_LOGITS"):  # CI points here: a wrong path must fail, never skip
        pytest.fail(f"DKD_REAL_LOGITS={os.environ['DKD_REAL_LOGITS']} is not a file")
    pytest.skip("real ImageNet logits (shared/data/imagenet-real-logits/logits.npz) are not available")


def sample_views(shards, n=12, size=32):
    """(bytes, box, flip) of n real samples, boxes drawn by the recipe, plus one whole-image box."""
    from dkd_cache.data import iter_raw_samples
    from dkd_cache.views import Recipe, draw_view, image_size_of

    raws = [r for _, r in zip(range(n), iter_raw_samples(shards["train"][0]))]
    recipe = Recipe(image_size=size)
    data, boxes, flips = [], [], []
    for k, r in enumerate(raws):
        h, w = image_size_of(r["jpg"])
        top, left, bh, bw, flip = draw_view(0, k, r["__key__"], h, w, recipe)
        data.append(r["jpg"])
        boxes.append((0, 0, h, w) if k == 0 else (top, left, bh, bw))
        flips.append(flip)
    return data, np.array(boxes), np.array(flips), recipe
