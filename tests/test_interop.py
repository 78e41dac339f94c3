"""Any Zarr v3 reader can open the cache: tensorstore (an independent implementation) reads every array alike."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from .conftest import dump_settings

ts = pytest.importorskip("tensorstore")


def _all_arrays(root) -> list[str]:
    g = zarr.open_group(str(root), mode="r")
    return sorted(f"{sub}/{k}" for sub in ("samples", "views", "logits") for k, _ in g[sub].members())


@pytest.mark.parametrize("codec", ["topk:4", "topk:3+q4", "q8", "fp16"])
def test_tensorstore_reads_every_array(codec, shards, teacher_ckpt, cache_path, tmp_path):
    from dkd_cache.dump import dump_teacher

    root = cache_path
    if codec != "topk:4":
        root = tmp_path / "c.zarr"
        dump_teacher(dump_settings(shards, teacher_ckpt, root, codec=codec, views=1), progress=False)
    g = zarr.open_group(str(root), mode="r")
    for name in _all_arrays(root):
        store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{root}/{name}"}}).result()
        ours = g[name][...]
        theirs = store.read().result()
        assert theirs.dtype == ours.dtype and np.array_equal(theirs, ours, equal_nan=ours.dtype.kind == "f"), name
