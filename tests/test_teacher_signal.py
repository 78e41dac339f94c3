"""The one teacher-signal path: compute policy, logits -> stored entries, entries -> the DKD loss training uses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dkd_cache import cache as cache_mod
from dkd_cache.dump import dump_teacher
from dkd_cache.errors import ConfigError
from dkd_cache.logit_codecs import parse_codec
from dkd_cache.loss import dkd_loss, dkd_loss_topk, mixed_cross_entropy
from dkd_cache.teacher import load_teacher
from dkd_cache.teacher_signal import (ComputePolicy, Storage, ce_from_entries, dkd_from_entries, encode_entries,
                                      lse_at, resolve_policy, teacher_forward)
from dkd_cache.train import TrainConfig, train_student
from dkd_cache.views import normalize, render

from .conftest import CLASSES, dump_settings
from .test_loss import mixed_batch, ref_dkd, ref_dkd_topk, ref_mixed


class _FlagSpy(torch.nn.Module):
    """Records the TF32 switches seen during its forward; optionally fails."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.seen: list[tuple[bool, bool]] = []
        self.fail = fail

    def forward(self, x):
        self.seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        if self.fail:
            raise RuntimeError("boom")
        return self.lin(x)


@pytest.fixture
def tf32_on():
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_teacher_forward_sets_tf32_for_the_forward_only(tf32_on):
    model = _FlagSpy()
    out = teacher_forward(model, torch.randn(2, 4), ComputePolicy(amp="none", tf32=False))
    assert model.seen == [(False, False)]  # fp32 means fp32 inside the teacher's forward
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)  # restored
    assert out.dtype == torch.float32 and not out.is_inference()  # usable in a differentiated loss
    with pytest.raises(RuntimeError, match="boom"):
        teacher_forward(_FlagSpy(fail=True), torch.randn(2, 4), ComputePolicy())
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)


def test_dump_leaves_the_tf32_switches_as_it_found_them(shards, teacher_ckpt, tmp_path, tf32_on):
    dump_teacher(dump_settings(shards, teacher_ckpt, tmp_path / "c.zarr", views=1), progress=False)
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)


def test_compute_policy_is_typed_and_round_trips():
    p = resolve_policy("cpu", None)
    assert p == ComputePolicy(device="cpu", amp="none", tf32=False)
    assert resolve_policy("cuda", None).amp == "bf16" and resolve_policy("cuda", "none").amp == "none"
    assert ComputePolicy.from_dict(p.to_dict()) == p
    for bad in ({"amp": "fp8"}, {"device": "tpu"}, {"tf32": "yes"}, {"speed": 1}):
        with pytest.raises(ConfigError):
            ComputePolicy.from_dict(bad)


def _batch(seed=0, b=6, c=CLASSES):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=g) * 4, torch.randn(b, c, generator=g) * 3,
            torch.randint(0, c, (b,), generator=g))


@pytest.mark.parametrize("spec", ["fp32", "fp16", "q8", "topk:4", "topk:4+q4"])
def test_per_sample_losses_average_to_the_batch_loss(spec):
    z, s, y = _batch()
    storage = Storage(codec=parse_codec(spec, CLASSES), num_classes=CLASSES, temperatures=(1.0, 4.0))
    entries = encode_entries(z, y, storage)
    for temp in (1.0, 4.0):
        for rule in ("uniform", "bucket"):
            mean = dkd_from_entries(s, y, entries, storage, alpha=1.0, beta=8.0, temperature=temp, rule=rule)
            per = dkd_from_entries(s, y, entries, storage, alpha=1.0, beta=8.0, temperature=temp, rule=rule,
                                   reduction="none")
            assert per.shape == (6,) and mean.shape == ()
            assert float(per.mean()) == pytest.approx(float(mean), rel=1e-6)
            # each sample's loss is that sample alone
            one = dkd_from_entries(s[2:3], y[2:3], {k: v[2:3] for k, v in entries.items()}, storage,
                                   alpha=1.0, beta=8.0, temperature=temp, rule=rule)
            assert float(one) == pytest.approx(float(per[2]), rel=1e-6)
    with pytest.raises(ConfigError, match="reduction"):
        dkd_from_entries(s, y, entries, storage, alpha=1.0, beta=8.0, temperature=1.0, reduction="sum")


def test_exact_storage_is_exact_dkd_and_topk_storage_is_the_cached_form():
    z, s, y = _batch(1)
    exact = Storage.exact(CLASSES, (2.0,))
    got = dkd_from_entries(s, y, encode_entries(z, y, exact), exact, alpha=1.0, beta=8.0, temperature=2.0)
    assert torch.equal(got, dkd_loss(s, z, y, 1.0, 8.0, 2.0))
    topk = Storage(codec=parse_codec("topk:3", CLASSES), num_classes=CLASSES, temperatures=(1.0, 2.0))
    e = encode_entries(z, y, topk)
    assert torch.equal(e["logits/target"], z.gather(1, y[:, None])[:, 0])
    assert torch.equal(e["logits/lse"], lse_at(z, (1.0, 2.0)))
    idx = z.topk(3, dim=1).indices
    want = dkd_loss_topk(s, idx, z.gather(1, idx).half().float(), z.gather(1, y[:, None])[:, 0],
                         torch.logsumexp(z / 2.0, dim=1), y, 1.0, 8.0, 2.0, rule="bucket")
    got = dkd_from_entries(s, y, e, topk, alpha=1.0, beta=8.0, temperature=2.0, rule="bucket")
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    with pytest.raises(ConfigError, match="temperature 3"):
        dkd_from_entries(s, y, e, topk, alpha=1.0, beta=8.0, temperature=3.0)


def test_the_cache_holds_what_encode_entries_computes(cache_path, shards, teacher_ckpt):
    """Dump stored, for a few samples, what the shared path computes from the live teacher on the stored view."""
    cache = cache_mod.open_cache(cache_path)
    m = cache.meta
    storage = Storage.of_cache(m)
    teacher, _ = load_teacher("resnet18", teacher_ckpt)
    e = m.manifest.shards[0]
    keys = cache_mod.decode_keys(cache.read_rows("samples/key", e.row_start, e.row_start + e.samples))
    from dkd_cache.data import iter_raw_samples, parse_sample

    raws = {r["__key__"]: r for r in iter_raw_samples(shards["train"][0])}
    rows = [0, 3, 7]
    imgs, labels = [], []
    box = cache.read_rows("views/box", e.row_start, e.row_stop, view=1)
    flip = cache.read_rows("views/flip", e.row_start, e.row_stop, view=1)
    for r in rows:
        sample = parse_sample(raws[keys[r]], CLASSES)
        imgs.append(render(sample.image, tuple(int(v) for v in box[r]), bool(flip[r]), m.recipe))
        labels.append(sample.label)
    z = teacher_forward(teacher, normalize(torch.stack(imgs), m.recipe), m.compute)
    live = encode_entries(z, torch.tensor(labels), storage)
    for name, values in live.items():
        stored = cache.read_rows(name, e.row_start, e.row_stop, view=1)[rows]
        np.testing.assert_allclose(stored.astype(np.float64), values.numpy().astype(np.float64), rtol=1e-4,
                                   atol=1e-4, err_msg=name)


def test_live_training_is_cached_training_with_exact_storage(shards, teacher_ckpt, tmp_path):
    """Live mode and an fp32 cache: same views, same teacher, same loss function: the same first step."""
    cache = tmp_path / "fp32.zarr"
    dump_teacher(dump_settings(shards, teacher_ckpt, cache, codec="fp32", temperatures=(1.0,)), progress=False)
    base = dict(shards=str(Path(shards["train"][0]).parent), cache=str(cache), arch="resnet18", epochs=1,
                batch_size=16, lr=0.05, lr_batch=16, workers=0, shuffle_buffer=16, max_steps=2)
    train_student(TrainConfig(out=str(tmp_path / "cached"), **base), progress=False)
    train_student(TrainConfig(out=str(tmp_path / "live"), live_teacher=str(teacher_ckpt), teacher_arch="resnet18",
                              **base), progress=False)
    steps = {}
    for mode in ("cached", "live"):
        lines = (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
        steps[mode] = [r for r in map(json.loads, lines) if r["event"] == "step"]
    assert len(steps["cached"]) == len(steps["live"]) == 2
    for a, b in zip(steps["cached"], steps["live"]):
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-5)
        assert a["dkd"] == pytest.approx(b["dkd"], rel=1e-4)  # the teacher's logits differ by rounding only


# --------------------------------------------------------------------------------------------- mixed views
def _mixed(seed=0, b=8, c=CLASSES):
    """Teacher and student logits, own and partner labels, lam: rows 0-1 unmixed (lam 1, b = a), row 2 lam 0."""
    z, s, y = _batch(seed, b, c)
    g = torch.Generator().manual_seed(seed + 1)
    y_b = (y + 1 + torch.randint(0, c - 1, (b,), generator=g)) % c
    y_b[:2] = y[:2]
    lam = torch.tensor([1.0, 1.0, 0.0, 0.3, 0.75, 0.5, 0.01, 0.99])[:b]
    return z, s, y, y_b, lam


def _with_mix(entries, y_b, lam):
    return {**entries, "mix/lam": lam, "mix/label": y_b}


@pytest.mark.parametrize("spec", ["fp32", "fp16", "q8", "topk:4", "topk:4+q4"])
def test_batches_without_mix_lam_are_computed_as_before(spec):
    """Without "mix/lam" the loss is today's, bit for bit: the one-target formula written out, whether or not the
    entries also carry "logits/target_b" (a mixing cache's batch read without its mix entries)."""
    z, s, y, y_b, _ = _mixed(2)
    storage = Storage(codec=parse_codec(spec, CLASSES), num_classes=CLASSES, temperatures=(1.0, 4.0))
    plain = encode_entries(z, y, storage)
    with_b = encode_entries(z, y, storage, labels_b=y_b)
    assert set(with_b) == set(plain) | {"logits/target_b"}
    assert torch.equal(with_b["logits/target_b"], z.gather(1, y_b[:, None])[:, 0])
    arrays = {k.split("/", 1)[1]: v for k, v in plain.items() if k not in ("logits/target", "logits/lse")}
    decoded = storage.codec.decode(arrays, CLASSES)
    tl, lse = plain["logits/target"], plain["logits/lse"]
    for temp in (1.0, 4.0, 2.0):
        if temp == 2.0 and decoded.full is None:
            continue  # the cached top-k form needs a stored temperature
        for rule in ("uniform", "bucket"):
            for reduction in ("mean", "none"):
                if decoded.full is not None:
                    full = decoded.full.scatter(1, y.view(-1, 1), tl.float().view(-1, 1))
                    stored = {} if temp == 2.0 else dict(target_logit=tl.float(),
                                                         teacher_lse=lse[:, storage.temperature_index(temp)])
                    want = dkd_loss(s, full, y, 1.0, 8.0, temp, reduction=reduction, **stored)
                else:
                    want = dkd_loss_topk(s, decoded.topk_idx, decoded.topk_val, tl,
                                         lse[:, storage.temperature_index(temp)], y, 1.0, 8.0, temp, rule=rule,
                                         reduction=reduction)
                for entries in (plain, with_b):
                    got = dkd_from_entries(s, y, entries, storage, alpha=1.0, beta=8.0, temperature=temp, rule=rule,
                                           reduction=reduction)
                    assert torch.equal(got, want), (spec, temp, rule, reduction)
    assert torch.equal(ce_from_entries(s, y, with_b), torch.nn.functional.cross_entropy(s, y))


@pytest.mark.parametrize("temp", [1.0, 4.0, 2.0])
def test_mixed_entries_in_exact_storage_give_the_float64_mixture(temp):
    """Exact storage (a LiveTeacher's): lam DKD(a) + (1 - lam) DKD(b) on the one teacher output, at stored
    temperatures (TCKD from the exact target logits and the stored lse) and at another."""
    z, s, y, y_b, lam = _mixed(3)
    exact = Storage.exact(CLASSES, (1.0, 4.0))
    entries = _with_mix(encode_entries(z, y, exact, labels_b=y_b), y_b, lam)
    got = dkd_from_entries(s, y, entries, exact, alpha=1.0, beta=8.0, temperature=temp)
    torch.testing.assert_close(got.double(), ref_mixed(ref_dkd, s, z, y, y_b, lam, 1.0, 8.0, temp),
                               rtol=1e-5, atol=1e-6)
    per = dkd_from_entries(s, y, entries, exact, alpha=1.0, beta=8.0, temperature=temp, reduction="none")
    assert per.shape == (8,) and float(per.mean()) == pytest.approx(float(got), rel=1e-6)
    plain = dkd_from_entries(s, y, encode_entries(z, y, exact), exact, alpha=1.0, beta=8.0, temperature=temp,
                             reduction="none")
    torch.testing.assert_close(per[:2], plain[:2], rtol=1e-6, atol=0)  # unmixed rows: their plain loss


def test_mixed_entries_of_a_full_logit_codec_scatter_both_exact_targets():
    """A lossy full-logit codec (q8): the decoded vector with both exact target logits in place, per target."""
    z, s, y, y_b, lam = _mixed(4)
    storage = Storage(codec=parse_codec("q8", CLASSES), num_classes=CLASSES, temperatures=(1.0,))
    entries = encode_entries(z, y, storage, labels_b=y_b)
    decoded = storage.codec.decode({"lo": entries["logits/lo"], "scale": entries["logits/scale"],
                                    "codes": entries["logits/codes"]}, CLASSES).full
    ref_logits = decoded.scatter(1, y[:, None], z.gather(1, y[:, None])).scatter(1, y_b[:, None],
                                                                                  z.gather(1, y_b[:, None]))
    assert not torch.equal(ref_logits, decoded)  # the targets' decoded values were not exact
    got = dkd_from_entries(s, y, _with_mix(entries, y_b, lam), storage, alpha=1.0, beta=8.0, temperature=2.0)
    torch.testing.assert_close(got.double(), ref_mixed(ref_dkd, s, ref_logits, y, y_b, lam, 1.0, 8.0, 2.0),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["uniform", "bucket"])
def test_mixed_entries_of_a_topk_codec_use_both_exact_target_logits(rule):
    """topk:4: the cached form per target, target b's exact logit and labels b, one lse. The teacher's logits are
    float16 values except both targets' (off by 1e-2), so the stored top-k values are exact but for the targets:
    where a target is among the top-k its exact logit is used in either target's loss."""
    s, z, y, y_b, lam = mixed_batch(seed=120, b=8)
    c = z.shape[1]
    z = z.half().float()
    order = z.argsort(dim=1, descending=True)
    y[5], y_b[3], y_b[4] = order[5, 0], order[3, 1], order[4, 3]  # targets among the top-4 in mixed rows
    z = z.scatter_add(1, y[:, None], torch.full((8, 1), 1e-2)).scatter_add(1, y_b[:, None], torch.full((8, 1), 1e-2))
    assert torch.equal(z.argsort(dim=1, descending=True)[:, :4], order[:, :4])
    storage = Storage(codec=parse_codec("topk:4", c), num_classes=c, temperatures=(1.0, 4.0))
    entries = _with_mix(encode_entries(z, y, storage, labels_b=y_b), y_b, lam)
    for temp in (1.0, 4.0):
        got = dkd_from_entries(s, y, entries, storage, alpha=1.0, beta=8.0, temperature=temp, rule=rule)
        torch.testing.assert_close(got.double(), ref_mixed(ref_dkd_topk, s, z, y, y_b, lam, 4, 1.0, 8.0, temp, rule),
                                   rtol=2e-5, atol=1e-6)


def test_mixed_entries_need_the_partner_label_and_logit():
    z, s, y, y_b, lam = _mixed(6)
    exact = Storage.exact(CLASSES, (1.0,))
    entries = _with_mix(encode_entries(z, y, exact), y_b, lam)  # no labels_b: no logits/target_b
    with pytest.raises(ConfigError, match="logits/target_b"):
        dkd_from_entries(s, y, entries, exact, alpha=1.0, beta=8.0, temperature=1.0)
    entries = encode_entries(z, y, exact, labels_b=y_b)
    with pytest.raises(ConfigError, match="mix/label"):
        dkd_from_entries(s, y, {**entries, "mix/lam": lam}, exact, alpha=1.0, beta=8.0, temperature=1.0)
    with pytest.raises(ConfigError, match="mix/label"):
        ce_from_entries(s, y, {"mix/lam": lam})
    with pytest.raises(ConfigError, match="shape"):
        dkd_from_entries(s, y, _with_mix(entries, y_b[:3], lam), exact, alpha=1.0, beta=8.0, temperature=1.0)
    with pytest.raises(ConfigError, match="lam holds"):
        dkd_from_entries(s, y, _with_mix(entries, y_b, lam + 1), exact, alpha=1.0, beta=8.0, temperature=1.0)
    with pytest.raises(ConfigError, match="labels_b"):
        encode_entries(z, y, exact, labels_b=y_b[:3])


def test_ce_from_entries_is_plain_ce_or_the_mixed_ce():
    z, s, y, y_b, lam = _mixed(7)
    assert torch.equal(ce_from_entries(s, y, {}), torch.nn.functional.cross_entropy(s, y))
    assert torch.equal(ce_from_entries(s, y, {}, reduction="none"),
                       torch.nn.functional.cross_entropy(s, y, reduction="none"))
    mixed = {"mix/lam": lam, "mix/label": y_b}
    assert torch.equal(ce_from_entries(s, y, mixed), mixed_cross_entropy(s, y, y_b, lam))
    assert float(ce_from_entries(s, y, mixed)) != pytest.approx(float(ce_from_entries(s, y, {})), rel=1e-3)
    with pytest.raises(ConfigError, match="reduction"):
        ce_from_entries(s, y, {}, reduction="sum")


def test_live_training_is_cached_training_on_mixed_views(shards, teacher_ckpt, tmp_path, monkeypatch):
    """A strong recipe (RandAugment, jitter, erasing, mixup / cutmix): an fp32 cache's mixed entries and a live
    teacher given the partner labels give the same first steps, both with the mixed CE and the mixed DKD."""
    from dkd_cache import teacher_signal
    from dkd_cache.views import Recipe

    calls = {"ce": 0, "dkd": 0}

    def counting(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(teacher_signal, "mixed_cross_entropy", counting("ce", teacher_signal.mixed_cross_entropy))
    monkeypatch.setattr(teacher_signal, "mix_losses", counting("dkd", teacher_signal.mix_losses))

    strong = Recipe(image_size=24, randaugment="rand-m9-mstd0.5", color_jitter=0.4, random_erasing=0.25,
                    mixup=0.8, cutmix=1.0, mix_window=4)
    cache = tmp_path / "strong.zarr"
    dump_teacher(dump_settings(shards, teacher_ckpt, cache, codec="fp32", temperatures=(1.0,), recipe=strong,
                               views=1), progress=False)
    base = dict(shards=str(Path(shards["train"][0]).parent), cache=str(cache), arch="resnet18", epochs=1,
                batch_size=16, lr=0.05, lr_batch=16, workers=0, shuffle_buffer=16, max_steps=2)
    train_student(TrainConfig(out=str(tmp_path / "cached"), **base), progress=False)
    train_student(TrainConfig(out=str(tmp_path / "live"), live_teacher=str(teacher_ckpt), teacher_arch="resnet18",
                              **base), progress=False)
    steps = {}
    for mode in ("cached", "live"):
        lines = (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
        steps[mode] = [r for r in map(json.loads, lines) if r["event"] == "step"]
    assert len(steps["cached"]) == len(steps["live"]) == 2
    for a, b in zip(steps["cached"], steps["live"]):
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-5)
        assert a["dkd"] == pytest.approx(b["dkd"], rel=1e-4)
    assert calls == {"ce": 4, "dkd": 4}  # every step of both runs: the mixed CE and the mixed DKD
