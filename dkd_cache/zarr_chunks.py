"""Whole Zarr v3 chunks (and Zarr shards) of one array, encoded in the calling thread.

zarr-python writes every chunk through its asyncio pipeline: a thread hop per compression and per file, and a read
of the existing Zarr shard before each sharded write. That costs ~3 ms per array per tar shard, more than encoding
the logits of a few hundred views. dump-teacher's rows always cover whole chunks (each tar shard owns whole
chunks), so it encodes them here, with the codecs that the array's own metadata names, and writes each chunk file
as one object. The layout is the Zarr v3 specification's:

    chunk        crc32c(zstd(bytes))       bytes: the values in C order, little-endian; crc32c appended as 4 bytes
    Zarr shard   chunk_0 … chunk_{n-1}, index, crc32c(index)
                 index: n (offset, nbytes) uint64 little-endian pairs; the index at the end ("index_location": "end")

Only that codec chain is encoded here (zstd at the array's level and checksum flag, crc32c; sharded arrays with one
axis of inner chunks, whose Morton order is plain order); `layout` returns None for any other array and the caller
writes it through zarr. tests/test_zarr_chunks.py checks the files are byte-for-byte zarr-python's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import Zstd


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
    """How one array's chunks are cut and encoded."""

    chunk: tuple[int, ...]  # the chunk grid's shape (the Zarr shard's, for a sharded array)
    inner: tuple[int, ...] | None  # the inner chunks of a Zarr shard; None when not sharded
    level: int  # zstd level
    checksum: bool  # zstd's own content checksum
    dtype: np.dtype  # little-endian


def _zstd_crc(codecs: Any) -> tuple[int, bool] | None:
    """(level, checksum) when `codecs` is exactly [bytes (little-endian), zstd, crc32c]."""
    if not (isinstance(codecs, (list, tuple)) and len(codecs) == 3):
        return None
    b, z, c = codecs
    if b.get("name") != "bytes" or b.get("configuration", {}).get("endian", "little") != "little":
        return None
    if z.get("name") != "zstd" or c.get("name") != "crc32c":
        return None
    conf = z.get("configuration", {})
    return int(conf.get("level", 0)), bool(conf.get("checksum", False))


def layout(metadata: dict[str, Any]) -> Layout | None:
    """The layout of an array from its zarr.json (Zarr v3 metadata as a dict); None if not one encoded here."""
    try:
        if metadata.get("zarr_format") != 3 or metadata.get("chunk_grid", {}).get("name") != "regular":
            return None
        key = metadata.get("chunk_key_encoding", {})
        if key.get("name") != "default" or key.get("configuration", {}).get("separator", "/") != "/":
            return None
        dtype = np.dtype(metadata["data_type"]).newbyteorder("<")
        chunk = tuple(int(n) for n in metadata["chunk_grid"]["configuration"]["chunk_shape"])
        codecs = metadata["codecs"]
        inner = None
        if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
            conf = codecs[0]["configuration"]
            inner = tuple(int(n) for n in conf["chunk_shape"])
            index = conf.get("index_codecs", [])
            if (conf.get("index_location", "end") != "end" or len(index) != 2 or index[0].get("name") != "bytes"
                    or index[0].get("configuration", {}).get("endian", "little") != "little"
                    or index[1].get("name") != "crc32c"):
                return None
            if len(inner) != len(chunk) or any(s % i for s, i in zip(chunk, inner)):
                return None
            if sum(s // i > 1 for s, i in zip(chunk, inner)) > 1:  # Morton order = plain order on one axis only
                return None
            codecs = conf["codecs"]
        zc = _zstd_crc(codecs)
    except (KeyError, TypeError, AttributeError, ValueError):
        return None
    if zc is None:
        return None
    return Layout(chunk=chunk, inner=inner, level=zc[0], checksum=zc[1], dtype=dtype)


def _with_crc(data: bytes) -> bytes:
    return data + np.uint32(google_crc32c.value(data)).astype("<u4").tobytes()


def _encode_chunk(values: np.ndarray, zstd: Zstd) -> bytes:
    return _with_crc(zstd.encode(np.ascontiguousarray(values)))


def encode(lay: Layout, origin: tuple[int, ...], values: np.ndarray) -> dict[str, bytes] | None:
    """{chunk key below the array ("c/0/3/0"): file bytes} for `values` written at `origin`; None unless the
    region is whole chunks of the grid (then zarr must merge it with what is stored)."""
    values = np.asarray(values)
    if values.ndim != len(lay.chunk) or len(origin) != values.ndim:
        return None
    if any(o % c or s % c or s == 0 for o, s, c in zip(origin, values.shape, lay.chunk)):
        return None
    values = values.astype(lay.dtype, copy=False)
    zstd = Zstd(level=lay.level, checksum=lay.checksum)
    out: dict[str, bytes] = {}
    for grid in np.ndindex(*(s // c for s, c in zip(values.shape, lay.chunk))):
        box = tuple(slice(g * c, (g + 1) * c) for g, c in zip(grid, lay.chunk))
        block = values[box]
        coords = tuple(o // c + g for o, c, g in zip(origin, lay.chunk, grid))
        key = "c/" + "/".join(str(i) for i in coords)
        if lay.inner is None:
            out[key] = _encode_chunk(block, zstd)
            continue
        parts = []
        for sub in np.ndindex(*(c // i for c, i in zip(lay.chunk, lay.inner))):
            parts.append(_encode_chunk(block[tuple(slice(s * i, (s + 1) * i) for s, i in zip(sub, lay.inner))],
                                       zstd))
        sizes = np.array([len(p) for p in parts], dtype="<u8")
        index = np.stack([np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype("<u8"), sizes], axis=1)
        out[key] = b"".join(parts) + _with_crc(index.astype("<u8").tobytes())
    return out

