"""Logit codecs: round trips within the stated bounds, bit packing, specs, configs, batched decode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dkd_cache.errors import CacheError, ConfigError
from dkd_cache.logit_codecs import (Decoded, FloatCodec, Q8Codec, TopKCodec, codec_from_dict, max_abs_error,
                                    pack_bits, packed_length, parse_codec, roundtrip, unpack_bits)
from dkd_cache.loss import dkd_loss

from .helpers import real_logits

SPECS = ["fp32", "fp16", "q8", "topk:1", "topk:10", "topk:37", "topk:10+q2", "topk:10+q4", "topk:10+q8",
         "topk:36+q4"]
C = 37


def logits(b=9, c=C, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, generator=g) * scale
    x[0] = 1.5             # a constant row: zero range
    x[1, :] = torch.arange(c, dtype=torch.float32) * 1e-3   # tiny range
    x[2] *= 1000           # wide range
    return x


def as_torch(arrays):
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


@pytest.mark.parametrize("spec", SPECS)
def test_roundtrip_within_stated_bound(spec):
    codec = parse_codec(spec, C)
    x = logits()
    arrays = codec.encode(x)
    assert set(arrays) == set(codec.arrays(C))
    for name, (shape, dtype) in codec.arrays(C).items():
        assert arrays[name].shape == (x.shape[0], *shape), name
        assert arrays[name].dtype == dtype, name
    assert codec.bytes_per_entry(C) == sum(a[0].nbytes for a in arrays.values())
    dec = codec.decode(as_torch(arrays), C)
    bound = codec.error_bound(x)
    assert bound.shape == x.shape
    if dec.full is not None:
        assert dec.full.dtype == torch.float32 and dec.full.shape == x.shape
        err = (dec.full.double() - x.double()).abs()
        assert torch.isfinite(bound).all()
        assert (err <= bound).all(), float((err - bound).max())
    else:
        k = codec.k
        assert dec.topk_idx.dtype == torch.long and dec.topk_idx.shape == (x.shape[0], k)
        assert dec.topk_val.dtype == torch.float32 and dec.topk_val.shape == (x.shape[0], k)
        assert torch.equal(dec.topk_idx.sort(1).values, x.topk(k, 1).indices.sort(1).values) or k == C
        assert (dec.topk_val[:, :-1] >= dec.topk_val[:, 1:]).all()  # descending
        err = (dec.topk_val.double() - x.gather(1, dec.topk_idx).double()).abs()
        assert (err <= bound.gather(1, dec.topk_idx)).all()
        stored = torch.zeros_like(x, dtype=torch.bool).scatter_(1, dec.topk_idx, True)
        assert torch.isinf(bound[~stored]).all()
    assert max_abs_error(codec, x) <= float(bound[torch.isfinite(bound)].max())


def test_fp32_is_bit_exact():
    x = logits()
    x[3, :5] = torch.tensor([1e-38, -0.0, 3.4e38, -3.4e38, 1 / 3])
    dec = roundtrip(parse_codec("fp32", C), x)
    assert torch.equal(dec.full.view(torch.int32), x.view(torch.int32))


def test_quantised_levels_and_constant_rows():
    codec = parse_codec("q8", C)
    x = logits()
    arr = codec.encode(x)
    assert arr["scale"][0] == 0 and (arr["codes"][0] == 1).all()  # code 1: a row of 0s is the cache's fill value
    dec = codec.decode(as_torch(arr), C).full
    assert torch.equal(dec[0], x[0])                               # zero range decodes exactly
    assert torch.equal(dec.min(1).values, x.min(1).values)         # the minimum is a level
    levels = x.min(1).values.view(-1, 1) + torch.arange(256).float() * torch.from_numpy(arr["scale"]).view(-1, 1)
    assert torch.equal(dec, levels.gather(1, torch.from_numpy(arr["codes"]).long()))


def test_topk_tail_is_in_class_order():
    codec = parse_codec("topk:3+q8", 8)
    x = torch.tensor([[0.0, 9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 4.0]])
    arr = codec.encode(x)
    assert arr["topk_idx"].tolist() == [[1, 3, 5]] and arr["topk_val"].tolist() == [[9.0, 8.0, 7.0]]
    tail = unpack_bits(torch.from_numpy(arr["tail_codes"]), 8, 5).float() * float(arr["tail_scale"][0])
    half_step = float(arr["tail_scale"][0]) / 2
    torch.testing.assert_close(tail + float(arr["tail_lo"][0]), torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]),
                               rtol=0, atol=half_step * 1.001)
    dec = codec.decode(arr, 8).full
    assert torch.equal(dec[0, [1, 3, 5]], torch.tensor([9.0, 8.0, 7.0]))
    assert (dec[0, [0, 2, 4, 6, 7]].diff() > 0).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 4, 7, 8, 9, 990])
def test_pack_unpack_exact(bits, n):
    rng = np.random.default_rng(bits * 1000 + n)
    codes = rng.integers(0, 1 << bits, size=(5, n), dtype=np.uint8)
    codes[0] = (1 << bits) - 1
    codes[1] = 0
    packed = pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (5, packed_length(n, bits)) == (5, -(-n * bits // 8))
    assert torch.equal(unpack_bits(torch.from_numpy(packed), bits, n), torch.from_numpy(codes))


def test_pack_is_little_endian():
    assert pack_bits(np.array([[1, 2, 3, 0, 1]], np.uint8), 2).tolist() == [[0b00111001, 0b01]]
    assert pack_bits(np.array([[0xA, 0x5, 0xF]], np.uint8), 4).tolist() == [[0x5A, 0x0F]]


def test_pack_rejects_out_of_range():
    with pytest.raises(ConfigError):
        pack_bits(np.array([[4]], np.uint8), 2)
    with pytest.raises(ConfigError):
        pack_bits(np.array([[1]], np.uint8), 3)


@pytest.mark.parametrize("spec,match", [
    ("", "not one of"), ("topk", "not one of"), ("topk:0", "not one of"), ("topk:-3", "not one of"),
    ("topk:10+q3", "tail bits"), ("topk:10+q16", "tail bits"), ("topk:10+", "not one of"), ("q4", "not one of"),
    ("fp64", "not one of"), ("topk:38", "k must be"), ("topk:37+q4", "k must be"), ("TOPK:10", "not one of"),
])
def test_parse_codec_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_codec(spec, C)


def test_parse_codec_values():
    assert parse_codec(" topk:10+q4 ", C) == TopKCodec(k=10, tail_bits=4)
    assert parse_codec("topk:37", C) == TopKCodec(k=37)
    assert parse_codec("q8", C) == Q8Codec() and parse_codec("fp16", C) == FloatCodec(dtype="fp16")
    for spec in SPECS:
        assert parse_codec(spec, C).name == spec
    with pytest.raises(ConfigError, match="num_classes"):
        parse_codec("fp32", 1)
    assert parse_codec("topk:5", 40000).arrays(40000)["topk_idx"][1] == np.int32
    assert parse_codec("topk:5", 1000).arrays(1000)["topk_idx"][1] == np.int16


@pytest.mark.parametrize("spec", SPECS)
def test_to_dict_from_dict_roundtrip(spec):
    codec = parse_codec(spec, C)
    d = codec.to_dict()
    assert codec_from_dict(d) == codec == type(codec).from_dict(d)
    assert codec_from_dict(json.loads(json.dumps(d))) == codec


@pytest.mark.parametrize("d,field", [
    ({"kind": "topk", "k": "10", "tail_bits": 0}, "'k'"), ({"kind": "topk", "tail_bits": 0}, "'k'"),
    ({"kind": "topk", "k": 10, "tail_bits": 3}, "'tail_bits'"), ({"kind": "topk", "k": True}, "'k'"),
    ({"kind": "topk", "k": 10, "bits": 4}, "'bits'"), ({"kind": "float", "dtype": "bf16"}, "'dtype'"),
    ({"kind": "float"}, "'dtype'"), ({"kind": "q8", "bits": 8}, "'bits'"), ({"kind": "zip"}, "'kind'"),
    ({}, "'kind'"), ({"kind": "topk", "k": 0}, "'k'"),
])
def test_from_dict_names_the_bad_field(d, field):
    with pytest.raises(ConfigError, match=field):
        codec_from_dict(d)
    with pytest.raises(ConfigError):
        codec_from_dict([1, 2])


def test_codecs_are_frozen():
    codec = parse_codec("topk:10", C)
    with pytest.raises(Exception):
        codec.k = 3  # type: ignore[misc]


@pytest.mark.parametrize("spec", SPECS)
def test_batched_decode_matches_rowwise(spec):
    codec = parse_codec(spec, C)
    x = logits(b=13, seed=2)
    arr = as_torch(codec.encode(x))
    whole = codec.decode(arr, C)
    for i in (0, 5, 12):
        one = codec.decode({k: v[i:i + 1] for k, v in arr.items()}, C)
        for field in ("full", "topk_idx", "topk_val"):
            a, b = getattr(whole, field), getattr(one, field)
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a[i:i + 1], b)
    empty = codec.decode({k: v[:0] for k, v in arr.items()}, C)
    assert (empty.full if empty.full is not None else empty.topk_val).shape[0] == 0


def test_decode_rejects_mismatched_arrays():
    codec = parse_codec("topk:10+q4", C)
    arr = as_torch(codec.encode(logits()))
    with pytest.raises(CacheError, match="missing"):
        codec.decode({k: v for k, v in arr.items() if k != "tail_lo"}, C)
    with pytest.raises(CacheError, match="shape"):
        codec.decode(arr, C + 5)  # (C + 1 could share the packed row length: the cache's class count is trusted)
    with pytest.raises(CacheError, match="dtype"):
        codec.decode({**arr, "topk_val": arr["topk_val"].float()}, C)
    with pytest.raises(CacheError, match="batch"):
        codec.decode({**arr, "tail_lo": arr["tail_lo"][:2]}, C)


def test_encode_rejects_bad_logits():
    with pytest.raises(ConfigError, match="NaN"):
        parse_codec("fp32", C).encode(torch.full((2, C), float("nan")))
    with pytest.raises(ConfigError, match="float16"):
        parse_codec("fp16", C).encode(torch.full((2, C), 1e5))
    with pytest.raises(ConfigError, match="shape"):
        parse_codec("q8", C).encode(torch.zeros(C))
    with pytest.raises(ValueError):
        Decoded()


def test_decode_accepts_numpy_and_keeps_device():
    codec = parse_codec("topk:10+q4", C)
    x = logits()
    arr = codec.encode(x)
    a = codec.decode(arr, C).full
    b = codec.decode(as_torch(arr), C).full
    assert torch.equal(a, b) and a.device == torch.device("cpu")


# --------------------------------------------------------------------------------------------- real logits
def test_real_logits_topk_q4_dkd_close_to_exact():
    t, s, y = real_logits()
    dec = {spec: roundtrip(parse_codec(spec, t.shape[1]), t).full for spec in ("topk:10+q2", "topk:10+q4", "q8")}
    for temp, alpha, beta in ((1.0, 0.5, 0.5), (4.0, 1.0, 8.0)):
        def grads(teacher):
            x = s.clone().requires_grad_(True)
            loss = dkd_loss(x, teacher, y, alpha, beta, temp)
            loss.backward()
            return float(loss.detach()), x.grad

        exact, g = grads(t)
        cos = {}
        for spec, full in dec.items():
            loss, gs = grads(full)
            c = torch.nn.functional.cosine_similarity(gs, g, dim=1)
            cos[spec] = float(c.median())
            if spec != "topk:10+q2":
                assert abs(loss - exact) <= 0.05 * exact, (spec, temp, loss, exact)
                assert float(c.quantile(0.05)) > 0.95, (spec, temp)
        assert cos["topk:10+q2"] <= cos["topk:10+q4"] <= cos["q8"] + 1e-6, (temp, cos)


@pytest.mark.parametrize("spec", ["q8", "topk:3+q4", "topk:3+q2", "lowrank:4+top:3+sparse:2"])
def test_a_lost_inner_chunk_of_any_codes_array_reads_back_as_detectable(spec, tmp_path):
    """Every unsigned codes array: no codec writes an all-zero row (their fill value), constant rows included."""
    import zarr

    from dkd_cache import cache as cache_mod
    from dkd_cache.cache import Check
    from dkd_cache.cache_writer import Calibrated

    from .test_cache_writer import CHUNK, synthetic_cache, synthetic_logits, write_synthetic

    codec = parse_codec(spec, 10)
    constant = torch.full((2, 10), 3.5)  # scale 0: decodes exactly, and stores code 1, not the fill 0
    if not codec.learned:
        enc = codec.encode(constant)
        assert all((v.reshape(2, -1) != 0).any(axis=1).all() for k, v in enc.items() if v.dtype == np.uint8)
        assert torch.equal(roundtrip(codec, constant).full, constant)

    def fit(new):
        z = torch.from_numpy(np.stack([synthetic_logits(9, p, 0) for p in range(64)]))
        return Calibrated(codec=new.meta.codec.fit(z))

    out = tmp_path / "c.zarr"
    assert write_synthetic(str(out), plan=lambda: synthetic_cache(codec=spec), calibrate=fit if codec.learned else None)
    names = [f"logits/{n}" for n, (_, dt) in codec.arrays(10).items() if np.dtype(dt).kind == "u"]
    intact = {f.check: f for f in cache_mod.open_cache(out).check(deep=True)}
    assert names and intact[Check.CHUNKS_FILLED].ok
    group = zarr.open_group(str(out), mode="r+")
    for name in names:  # the fill value written over one inner chunk (view 1, rows CHUNK..2 CHUNK): a lost chunk
        group[name][1, CHUNK:2 * CHUNK] = 0
    findings = {f.check: f for f in cache_mod.open_cache(out).check(deep=True)}
    assert not findings[Check.CHUNKS_FILLED].ok
    for name in names[:3]:  # the finding lists the first three
        assert f"{name} view 1" in findings[Check.CHUNKS_FILLED].detail, findings[Check.CHUNKS_FILLED].detail
