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
from dkd_cache.loss import dkd_loss, dkd_loss_topk
from dkd_cache.teacher import load_teacher
from dkd_cache.teacher_signal import (ComputePolicy, Storage, dkd_from_entries, encode_entries, lse_at,
                                      resolve_policy, teacher_forward)
from dkd_cache.train import TrainConfig, train_student
from dkd_cache.views import normalize, render

from .conftest import CLASSES, dump_settings


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
