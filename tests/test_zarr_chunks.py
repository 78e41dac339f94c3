"""dump-teacher writes whole chunks itself (dkd_cache/zarr_chunks.py): the files must be zarr-python's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from dkd_cache import zarr_chunks
from dkd_cache.cache_writer import COMPRESSORS

V, C, ROWS = 3, 8, 32


def _arrays(root: Path, compressors=COMPRESSORS):
    """The cache's two kinds of array: per sample (chunks of C rows) and per view (Zarr shards of (V, C) rows)."""
    g = zarr.open_group(str(root), mode="w")
    per_row = g.create_array("samples/height", shape=(ROWS,), dtype=np.int32, chunks=(C,), compressors=compressors,
                             config={"write_empty_chunks": True})
    per_view = g.create_array("logits/codes", shape=(V, ROWS, 5), dtype=np.float16, chunks=(1, C, 5),
                              shards=(V, C, 5), compressors=compressors, config={"write_empty_chunks": True})
    return per_row, per_view


def _files(root: Path) -> dict[str, bytes]:
    """Every chunk file below root (the metadata files left out)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "c" in p.relative_to(root).parts}


def test_whole_chunks_are_byte_identical_to_zarr(tmp_path):
    rng = np.random.default_rng(0)
    heights = rng.integers(0, 1000, ROWS).astype(np.int32)
    codes = rng.standard_normal((V, ROWS, 5)).astype(np.float16)
    via_zarr = _arrays(tmp_path / "zarr")
    via_zarr[0][8:24] = heights[8:24]
    via_zarr[1][:, 8:24] = codes[:, 8:24]
    mine = _arrays(tmp_path / "mine")
    for arr, name, origin, values in ((mine[0], "samples/height", (8,), heights[8:24]),
                                      (mine[1], "logits/codes", (0, 8, 0), codes[:, 8:24])):
        lay = zarr_chunks.layout(arr.metadata.to_dict())
        assert lay is not None
        files = zarr_chunks.encode(lay, origin, values)
        assert sorted(files) == (["c/1", "c/2"] if name.startswith("samples") else ["c/0/1/0", "c/0/2/0"])
        for key, data in files.items():
            (tmp_path / "mine" / name / key).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "mine" / name / key).write_bytes(data)
    assert _files(tmp_path / "mine") == _files(tmp_path / "zarr") != {}
    back = zarr.open_group(str(tmp_path / "mine"), mode="r")
    assert np.array_equal(back["samples/height"][8:24], heights[8:24])
    assert np.array_equal(back["logits/codes"][:, 8:24], codes[:, 8:24])


def test_other_codecs_and_partial_chunks_are_left_to_zarr(tmp_path):
    blosc = _arrays(tmp_path / "blosc", compressors=(BloscCodec(cname="lz4"), Crc32cCodec()))
    assert zarr_chunks.layout(blosc[0].metadata.to_dict()) is None
    g = zarr.open_group(str(tmp_path / "start"), mode="w")
    index_first = g.create_array("logits/start", shape=(V, ROWS, 5), dtype=np.float16, chunks=(1, C, 5),
                                 shards={"shape": (V, C, 5), "index_location": "start"}, compressors=COMPRESSORS)
    assert zarr_chunks.layout(index_first.metadata.to_dict()) is None
    lay = zarr_chunks.layout(_arrays(tmp_path / "cache")[0].metadata.to_dict())
    assert zarr_chunks.encode(lay, (4,), np.zeros(8, np.int32)) is None  # not on a chunk boundary
    assert zarr_chunks.encode(lay, (8,), np.zeros(12, np.int32)) is None  # not whole chunks
    assert zarr_chunks.encode(lay, (8,), np.zeros(16, np.int32)) is not None
