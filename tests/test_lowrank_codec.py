"""The learned low-rank codec: fit, integer-exact decode, provenance of the basis, fidelity on real logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dkd_cache.errors import CacheError, CacheMismatchError, ConfigError
from dkd_cache.logit_codecs import (LowRankBasis, LowRankCodec, codec_from_dict, fit_lowrank_basis, parse_codec,
                                    roundtrip)
from dkd_cache.loss import dkd_loss

from .helpers import real_logits

C = 40


def structured(n=300, c=C, rank=6, seed=0, noise=0.05):
    """Logits that live near a rank-`rank` space (as W f + b does), plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rank, c, generator=g)
    f = torch.randn(n, rank, generator=g) * 2
    return f @ w + torch.randn(c, generator=g) + noise * torch.randn(n, c, generator=g)


def as_torch(arrays):
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def test_spec_parse_and_arrays():
    codec = parse_codec("lowrank:8+top:16+sparse:4", C)
    assert (codec.rank, codec.top, codec.sparse, codec.name) == (8, 16, 4, "lowrank:8+top:16+sparse:4")
    assert parse_codec("lowrank:8", C).name == "lowrank:8" and parse_codec("lowrank:8+sparse:3", C).sparse == 3
    spec = codec.arrays(C)
    assert spec == {"coef": ((8,), np.dtype(np.uint8)), "top_scale": ((), np.dtype(np.float16)),
                    "top_codes": ((8,), np.dtype(np.uint8)), "sparse_idx": ((4,), np.dtype(np.int16)),
                    "sparse_scale": ((), np.dtype(np.float16)), "sparse_codes": ((4,), np.dtype(np.uint8))}
    assert codec.bytes_per_entry(C) == 8 + 2 + 8 + 8 + 2 + 4
    for bad in ("lowrank:", "lowrank:0", "lowrank:8+sparse:2+top:3", "lowrank:8+top:x", "lowrank:-1"):
        with pytest.raises(ConfigError):
            parse_codec(bad, C)
    # sizes above the class count keep every class: one spec serves any teacher
    big = parse_codec("lowrank:64+top:128+sparse:50", C)
    assert big.sizes(C) == (C, C, C) and big.arrays(C)["top_codes"][0] == (C // 2,)
    x = structured(n=60)
    assert float((roundtrip(big.fit(x), x).full - x).abs().max()) < 0.05  # full rank, every class corrected


def test_fit_roundtrip_shapes_and_accuracy():
    x = structured()
    codec = parse_codec("lowrank:6+top:8+sparse:4", C).fit(x[:200])
    held = x[200:]
    arrays = codec.encode(held)
    for name, (shape, dtype) in codec.arrays(C).items():
        assert arrays[name].shape == (len(held), *shape) and arrays[name].dtype == dtype, name
    dec = codec.decode(as_torch(arrays), C).full
    assert dec.dtype == torch.float32 and dec.shape == held.shape
    err = (dec - held).abs()
    # rank 6 covers the structure: what is left is the noise (0.05) and 8-bit coefficients
    assert float(err.max()) < 0.5 and float(err.mean()) < 0.1, (float(err.max()), float(err.mean()))
    assert (err.double() <= codec.error_bound(held)).all()
    assert codec.record["calibration_views"] == 200 and codec.record["explained_variance"] > 0.99
    # each correction reduces the error it targets
    plain = parse_codec("lowrank:6", C).fit(x[:200])
    assert float((roundtrip(plain, held).full - held).abs().mean()) > float(err.mean())


def test_decode_is_integer_exact_and_batch_independent():
    x = structured(seed=1)
    codec = parse_codec("lowrank:5+top:10+sparse:3", C).fit(x[:150])
    arr = as_torch(codec.encode(x[150:]))
    whole = codec.decode(arr, C).full
    for i in (0, 7, 149):
        assert torch.equal(codec.decode({k: v[i:i + 1] for k, v in arr.items()}, C).full, whole[i:i + 1])
    # the approximation is g * (an integer): the same integers whatever the summation order
    b = codec.basis
    coef = arr["coef"].numpy().astype(np.int64) - 128
    score = b.mean.astype(np.int64) + (coef * b.mult.astype(np.int64)) @ b.basis.astype(np.int64)
    approx = LowRankCodec(rank=5, record=codec.record, basis=b).decode({"coef": arr["coef"]}, C).full
    assert torch.equal(approx, torch.from_numpy((score.astype(np.float64) * b.grid).astype(np.float32)))
    reversed_order = (coef[:, ::-1] * b.mult[::-1].astype(np.int64)) @ b.basis[::-1].astype(np.int64)
    assert np.array_equal(reversed_order + b.mean, score)


def test_top_residual_follows_decoded_ranking_with_ties_to_lower_class():
    # a basis under which classes 3 and 9 tie for the highest approximation: the lower class must be corrected
    grid = 2.0 ** -10
    mean = np.zeros(C, np.int32)
    mean[[3, 9]] = 1024
    basis_rows = np.zeros((1, C), np.int8)
    basis_rows[0, 0] = 1
    b = LowRankBasis(mean=mean, basis=basis_rows, mult=np.ones(1, np.int32), grid=grid)
    codec = LowRankCodec(rank=1, top=1, record={"sha256": b.sha256, "grid": grid}, basis=b)
    x = torch.zeros(3, C)
    x[:, 3], x[:, 9] = 3.0, 2.0
    dec = roundtrip(codec, x).full
    assert torch.allclose(dec[:, 3], x[:, 3], atol=1e-3)                  # corrected
    assert torch.equal(dec[:, 9], torch.ones(3))                          # left at the approximation (1.0)


def test_same_calibration_same_basis():
    x = structured(seed=4)
    a = parse_codec("lowrank:6+top:4", C).fit(x)
    b = parse_codec("lowrank:6+top:4", C).fit(x.clone())
    assert a.sha256 == b.sha256 and a == b
    c = parse_codec("lowrank:6+top:4", C).fit(x[1:])
    assert c.sha256 != a.sha256 and c != a


def test_record_and_state_roundtrip_and_hash_check():
    codec = parse_codec("lowrank:6+top:8+sparse:4", C).fit(structured(seed=5))
    d = codec.to_dict()
    assert d["kind"] == "lowrank" and d["fit"]["sha256"] == codec.basis.sha256
    loaded = codec_from_dict(d)
    assert loaded.basis is None
    with pytest.raises(ConfigError, match="no fitted basis"):
        loaded.encode(structured(n=2))
    state = codec.state_arrays()
    assert set(state) == {"mean", "basis", "mult"}
    back = loaded.with_state(state)
    x = structured(n=20, seed=6)
    assert torch.equal(roundtrip(back, x).full, roundtrip(codec, x).full)
    tampered = dict(state, basis=state["basis"].copy())
    tampered["basis"][0, 0] ^= 1
    with pytest.raises(CacheMismatchError, match="SHA-256"):
        loaded.with_state(tampered)
    with pytest.raises(CacheError, match="missing"):
        loaded.with_state({"mean": state["mean"], "basis": state["basis"]})
    with pytest.raises(CacheError, match="no fit record"):
        parse_codec("lowrank:6", C).with_state(state)
    with pytest.raises(CacheError):
        LowRankBasis(mean=state["mean"].astype(np.int64), basis=state["basis"], mult=state["mult"], grid=1.0)


def test_fit_refuses_bad_rank():
    with pytest.raises(ConfigError, match="rank"):
        fit_lowrank_basis(structured(n=5), 6)


# --------------------------------------------------------------------------------------------- real logits
def test_real_logits_held_out_views_beat_topk_of_the_same_size():
    """Fit on every other view, measure on the others: the low-rank codec at <= 128 bytes per view (raw) keeps DKD's
    gradient closer to exact than the top-k cache of similar size (topk:20, 88 raw bytes + 8) does."""
    t, s, y = real_logits()
    fit = torch.arange(len(t)) % 2 == 0
    ev = ~fit
    codec = parse_codec("lowrank:32+top:64+sparse:8", t.shape[1]).fit(t[fit])
    assert codec.bytes_per_entry(t.shape[1]) + 8 <= 128
    z, st, yy = t[ev], s[ev], y[ev]
    target_logit = z.gather(1, yy[:, None])[:, 0]
    lse = torch.logsumexp(z, dim=1)

    def grad(teacher, **kw):
        x = st.clone().requires_grad_(True)
        dkd_loss(x, teacher, yy, 1.0, 0.5, 1.0, **kw).backward()
        return x.grad

    g0 = grad(z)
    cos = torch.nn.functional.cosine_similarity(grad(roundtrip(codec, z).full, target_logit=target_logit,
                                                     teacher_lse=lse), g0, dim=1)
    top = roundtrip(parse_codec("topk:20+q2", t.shape[1]), z).full  # 20 fp16 + 2-bit tail: 3x the bytes
    cos_top = torch.nn.functional.cosine_similarity(grad(top, target_logit=target_logit, teacher_lse=lse), g0, dim=1)
    assert float(cos.median()) > 0.999 and float(cos.quantile(0.05)) > 0.99, (float(cos.median()),
                                                                              float(cos.quantile(0.05)))
    assert float(cos.quantile(0.05)) > float(cos_top.quantile(0.05))


def test_rank_is_never_silently_lowered_below_the_spec():
    x = structured(n=12)
    with pytest.raises(ConfigError, match="rank-20 basis needs at least 20 calibration views"):
        parse_codec("lowrank:20+top:8", C).fit(x)  # 12 views: refused, not a rank-12 basis behind the user's back
    codec = parse_codec("lowrank:12+top:8", C).fit(x)  # the smaller rank, chosen explicitly
    assert codec.basis.rank == 12 and codec.record["rank"] == 12 and codec.sizes(C) == (12, 8, 0)
    assert codec.arrays(C)["coef"][0] == (12,)
    loaded = codec_from_dict(codec.to_dict())
    assert loaded.arrays(C) == codec.arrays(C)  # the metadata alone gives the stored layout
    back = loaded.with_state(codec.state_arrays())
    assert torch.equal(roundtrip(back, x).full, roundtrip(codec, x).full)


def test_encoder_selections_match_their_full_sort_definitions():
    """The encoder picks its top-M order and sparse classes by partition; each must equal the definition by a
    full sort (descending score, ties to the lower class; the first K of a stable descending sort, sorted),
    including rows full of ties, and on both key widths of the order (int32 and float64)."""
    from dkd_cache.logit_codecs import _largest, _order, _rank_keys

    rng = np.random.default_rng(0)
    for trial in range(40):
        w = rng.integers(0, 6 if trial % 2 else 10_000, size=(17, 50)).astype(np.float32)
        w[3] = 0  # a row that is one tie
        for k in (1, 7, 49, 50):
            want = np.sort(np.argsort(-w, axis=1, kind="stable")[:, :k], axis=1)
            assert np.array_equal(_largest(w, k), want)
        score = rng.integers(-3, 4, size=(9, 50)).astype(np.float64) * (1.0 if trial % 2 else 2.0 ** 40)
        for m in (1, 10, 50):
            want = np.argsort(-_rank_keys(score, 50), axis=1)[:, :m]
            assert np.array_equal(_order(score, m), want)
