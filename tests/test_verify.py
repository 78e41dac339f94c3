"""verify: passes on an intact cache, fails (exit 1, reason named) on every kind of mismatch, trains in parity."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from dkd_cache.cli import app
from dkd_cache.dump import dump_teacher
from dkd_cache.errors import ConfigError
from dkd_cache.synth import make_shards
from dkd_cache.checkpoint import save_checkpoint
from dkd_cache.teacher import build_model
from dkd_cache.verify import VerifySettings, draw_entries, render_report, verify
from dkd_cache.views import Recipe

from .conftest import CLASSES, dump_settings


# the fixture's topk:4 of 10 classes, measured against live exact DKD (16 entries): 0.998 / 0.986 / 0.03 at T=1,
# 0.92 / 0.84 / 0.22 at T=4 (fewer entries, worse p5); tests of the other checks leave that approximation ungated
LOOSE_SETTINGS = dict(live_cosine_tol=-1.0, live_p5_tol=-1.0, live_loss_tol=100.0)
LOOSE = ("--live-cosine-tol", "-1", "--live-p5-tol", "-1", "--live-loss-tol", "100")


def _verify_cli(cache: Path, shards: str, weights: Path, *extra: str, samples: int = 16):
    args = ["verify", "--cache", str(cache), "--shards", shards, "--weights", str(weights), "--samples", str(samples),
            *extra]
    return CliRunner().invoke(app, args)


def _failed(result, out: Path) -> set[str]:
    """The names of the checks that failed, from the JSON report (the printed table names every check)."""
    assert result.exit_code == 1, result.output
    return {c["name"] for c in json.loads(out.read_text())["checks"] if not c["ok"]}


def _train_dir(shards: dict) -> str:
    return str(Path(shards["train"][0]).parent)


def _one_shard_cache(shards: dict, teacher: Path, out: Path, **kw) -> Path:
    """A variant cache of the first shard only (25 samples): quick to dump."""
    settings = dataclasses.replace(dump_settings(shards, teacher, out, **kw), shards=shards["train"][0])
    dump_teacher(settings, progress=False)
    return out


def test_verify_passes_on_intact_cache(cache_path, shards, teacher_ckpt, tmp_path):
    out = tmp_path / "report.json"
    # topk:4 of 10 classes is a deliberately lossy fixture: its approximation of exact DKD is gated in
    # test_verify_gates_the_codecs_approximation_of_exact_dkd; here what the cache got wrong (nothing) is
    result = _verify_cli(cache_path, _train_dir(shards), teacher_ckpt, "--json", str(out), *LOOSE)
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output
    report = json.loads(out.read_text())
    assert report["passed"] and report["failures"] == []
    assert all(c["ok"] for c in report["checks"])
    assert report["entries"]["compared"] == 16 and report["entries"]["shards_covered"] == 4
    lg = report["logits"]
    assert lg["target_logit"]["max"] < 1e-4 and lg["lse T=1"]["max"] < 1e-4  # same machine, fp32: rounding only
    assert lg["topk_set"]["violations"] == 0
    for key in ("T=1 uniform", "T=1 bucket", "T=4 uniform", "T=4 bucket"):
        assert report["loss"][key]["vs_ideal_cache"]["rel_err"] < 1e-5
        assert report["loss"][key]["vs_ideal_cache"]["cos_median"] > 0.9999
    assert "train" not in report


def test_verify_is_deterministic_and_stratified(cache_path, shards, teacher_ckpt):
    s = VerifySettings(cache=str(cache_path), shards=_train_dir(shards), weights=str(teacher_ckpt), samples=4, seed=3,
                       **LOOSE_SETTINGS)
    a, b = verify(s), verify(s)
    assert a["passed"] and b["passed"]
    assert [w["entry"] for w in a["logits"]["worst"]] == [w["entry"] for w in b["logits"]["worst"]]
    assert "PASSED" in render_report(a)

    rows = np.arange(100)  # e.g. 4 shards of 25 rows
    r1, v1 = draw_entries(rows, 2, 20, seed=0)
    r2, v2 = draw_entries(rows, 2, 20, seed=0)
    assert np.array_equal(r1, r2) and np.array_equal(v1, v2)
    assert len(set(zip(r1.tolist(), v1.tolist()))) == 20  # distinct entries
    assert np.bincount(r1 // 25, minlength=4).tolist() == [5, 5, 5, 5]  # every shard its share
    assert set(v1.tolist()) == {0, 1}
    r, v = draw_entries(rows[:3], 2, 50, seed=1)  # more asked than exist: all of them, once
    assert len(set(zip(r.tolist(), v.tolist()))) == 6 == r.size


def test_verify_fails_with_other_teacher_weights(cache_path, shards, tmp_path):
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    save_checkpoint(other, model=build_model("resnet18", CLASSES).state_dict(), arch="resnet18")
    out = tmp_path / "r.json"
    result = _verify_cli(cache_path, _train_dir(shards), other, "--json", str(out))
    failed = _failed(result, out)
    assert "verify FAILED" in result.output and "teacher weights SHA-256 = the cache's" in failed
    assert "logits: target logit |stored - live| max" in failed  # and the logits measurably differ
    assert not any(n.startswith(("shards:", "array ", "every shard")) for n in failed)  # the rest is intact


def test_verify_fails_on_a_tampered_chunk(cache_path, shards, teacher_ckpt, tmp_path):
    bad = tmp_path / "tampered.zarr"
    shutil.copytree(cache_path, bad)
    files = sorted((p for p in (bad / "logits" / "topk_val" / "c").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    target = files[-1]
    data = bytearray(target.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4] = bytes(b ^ 0xFF for b in data[mid:mid + 4])
    target.write_bytes(bytes(data))
    out = tmp_path / "report.json"
    result = _verify_cli(bad, _train_dir(shards), teacher_ckpt, "--json", str(out))
    # reported by the reader's own deep check (Cache.check), not crashed; the failure names the array
    assert _failed(result, out) >= {"every chunk reads back (checksums)"}
    report = json.loads(out.read_text())
    assert any("logits/topk_val" in f and "damaged" in f for f in report["failures"])


def test_verify_fails_when_a_shard_record_is_missing(cache_path, shards, teacher_ckpt, tmp_path):
    bad = tmp_path / "incomplete.zarr"
    shutil.copytree(cache_path, bad)
    (bad / "_dkd" / "done" / "000002.json").unlink()
    out = tmp_path / "r.json"
    failed = _failed(_verify_cli(bad, _train_dir(shards), teacher_ckpt, "--json", str(out)), out)
    assert "every shard has its done record" in failed
    assert "teacher weights SHA-256 = the cache's" not in failed


def test_verify_fails_when_stored_views_do_not_rerender(shards, teacher_ckpt, tmp_path):
    cache = _one_shard_cache(shards, teacher_ckpt, tmp_path / "nearest.zarr",
                             recipe=Recipe(image_size=32, interpolation="nearest"))
    ok = _verify_cli(cache, shards["train"][0], teacher_ckpt, *LOOSE)
    assert ok.exit_code == 0, ok.output  # with its true recipe the cache verifies
    group = zarr.open_group(str(cache), mode="r+")
    meta = dict(group.attrs["dkd_cache"])
    meta["recipe"] = {**meta["recipe"], "interpolation": "bilinear"}  # the metadata now lies about the rendering
    group.attrs["dkd_cache"] = meta
    out = tmp_path / "r.json"
    failed = _failed(_verify_cli(cache, shards["train"][0], teacher_ckpt, "--json", str(out)), out)
    assert "logits: target logit |stored - live| max" in failed
    assert any(n.startswith("loss: DKD") for n in failed)
    assert "teacher weights SHA-256 = the cache's" not in failed


def test_verify_fails_on_other_shards(cache_path, teacher_ckpt, tmp_path):
    other = make_shards(tmp_path / "other", classes=CLASSES, train_per_class=8, val_per_class=1, shard_size=25,
                        seed=1, min_side=40, max_side=90)
    out = tmp_path / "r.json"
    failed = _failed(_verify_cli(cache_path, _train_dir(other), teacher_ckpt, "--json", str(out)), out)
    assert "shards: keys match the manifest (SHA-256 per shard)" in failed
    assert "teacher weights SHA-256 = the cache's" not in failed


def test_verify_train_parity_with_fp32_cache(shards, teacher_ckpt, tmp_path):
    cache = _one_shard_cache(shards, teacher_ckpt, tmp_path / "fp32.zarr", codec="fp32")
    out = tmp_path / "report.json"
    result = _verify_cli(cache, shards["train"][0], teacher_ckpt, "--train-steps", "2", "--json", str(out),
                         samples=8)
    assert result.exit_code == 0, result.output
    assert "training parity" in result.output
    report = json.loads(out.read_text())
    tr = report["train"]
    assert tr["reference"] == "live" and tr["steps"] == 2 and len(tr["losses_cache"]) == 2
    np.testing.assert_allclose(tr["losses_cache"], tr["losses_live"], rtol=1e-5)
    r = tr["vs_reference"]
    assert r["first_loss_rel_diff"] <= 1e-5 and r["first_update_rel_diff"] <= 1e-4  # the gated figures
    assert r["max_rel_loss_diff"] <= 1e-5 and r["param_rel_to_norm"] <= 1e-4  # final weights ~ equal
    assert report["logits"]["stored_logits"]["max"] < 1e-4  # fp32 stores every logit, bit for bit up to rounding


def test_verify_settings_are_validated(tmp_path):
    base = dict(cache=str(tmp_path), shards=str(tmp_path), weights=str(tmp_path))
    for bad in (dict(samples=0), dict(samples=-3), dict(train_steps=-1), dict(logit_tol=-1.0),
                dict(loss_tol=float("nan")), dict(cosine_tol=1.5), dict(device="tpu"), dict(samples=True)):
        with pytest.raises(ConfigError):
            VerifySettings(**base, **bad)
    s = VerifySettings(**base)
    assert (s.samples, s.logit_tol, s.loss_tol, s.cosine_tol, s.parity_tol) == (64, 1e-3, 1e-2, 0.99, 1e-4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.samples = 3  # type: ignore[misc]
    result = CliRunner().invoke(app, ["verify", "--cache", str(tmp_path), "--shards", str(tmp_path), "--weights",
                                      str(tmp_path), "--samples", "0"])
    assert result.exit_code == 2 and "samples" in result.output


def test_verify_phases_return_their_checks_and_reuse_the_readers_findings(cache_path, shards, teacher_ckpt):
    from dkd_cache.cache import open_cache
    from dkd_cache.verify import entries_phase, integrity_phase
    from dkd_cache.verify_report import CheckResult

    s = VerifySettings(cache=str(cache_path), shards=_train_dir(shards), weights=str(teacher_ckpt), samples=4)
    cache = open_cache(cache_path)
    integrity = integrity_phase(cache, cache.codec, s, torch.device("cpu"))
    names = [c.name for c in integrity.phase.checks]
    # every finding of the reader's deep check is a check of the integrity phase, by its own name (not a copy)
    findings = [f.check.value for f in cache.check(deep=True) if not f.warning]
    assert "every chunk reads back (checksums)" in findings and set(findings) <= set(names)
    assert all(isinstance(c, CheckResult) and c.ok for c in integrity.phase.checks)
    with pytest.raises(dataclasses.FrozenInstanceError):
        integrity.phase.checks[0].ok = False  # type: ignore[misc]
    entries = entries_phase(cache, cache.codec, integrity, s)
    assert entries.images.shape == (4, 3, 32, 32) and len(entries.names) == 4
    assert "entries compared" in [c.name for c in entries.phase.checks]
    # the report is the phases' checks, in order
    report = verify(s)
    assert [c["name"] for c in report["checks"]][:len(names)] == names


def test_verify_fails_on_repeated_topk_classes(cache_path, shards, teacher_ckpt, tmp_path):
    bad = tmp_path / "repeated.zarr"
    shutil.copytree(cache_path, bad)
    arr = zarr.open_group(str(bad), mode="r+")["logits/topk_idx"]
    block = arr[1, 8:16]
    block[3, 1] = block[3, 0]  # one row of view 1 names a class twice: checksums fine, values wrong
    arr[1, 8:16] = block
    out = tmp_path / "r.json"
    failed = _failed(_verify_cli(bad, _train_dir(shards), teacher_ckpt, "--json", str(out)), out)
    assert "top-k classes in range and distinct" in failed
    assert "every chunk reads back (checksums)" not in failed


def _weights_check(report: dict) -> dict:
    return next(c for c in report["checks"] if c["name"] == "teacher weights SHA-256 = the cache's")


def test_verify_knows_the_teachers_weights_by_their_tensors(cache_path, shards, teacher_ckpt, tmp_path):
    from dkd_cache.teacher import read_state_dict

    resaved = tmp_path / "teacher.pth"  # the same tensors as a plain torchvision state dict: another file
    torch.save(read_state_dict(teacher_ckpt), resaved)
    assert resaved.read_bytes() != teacher_ckpt.read_bytes()
    s = VerifySettings(cache=str(cache_path), shards=_train_dir(shards), weights=str(resaved), samples=4,
                       **LOOSE_SETTINGS)
    report = verify(s)
    assert report["passed"], report["failures"]
    assert _weights_check(report)["ok"] and "same tensors in another file" in _weights_check(report)["detail"]
    other = tmp_path / "other.pth"  # other tensors fail, whatever their format
    moved = read_state_dict(teacher_ckpt)
    moved["fc.bias"] = moved["fc.bias"] + 1e-3
    torch.save(moved, other)
    report = verify(dataclasses.replace(s, weights=str(other)))
    assert not _weights_check(report)["ok"] and not report["passed"]


def test_verify_of_a_cache_recording_only_the_weights_file_hash(cache_path, shards, teacher_ckpt, tmp_path):
    """Caches written before tensor digests record the file's SHA-256 only: they open, and match by it."""
    from dkd_cache.teacher import read_state_dict

    old = tmp_path / "old.zarr"
    shutil.copytree(cache_path, old)
    group = zarr.open_group(str(old), mode="r+")
    meta = dict(group.attrs["dkd_cache"])
    meta["teacher"] = {k: v for k, v in meta["teacher"].items() if k != "tensors_sha256"}
    group.attrs["dkd_cache"] = meta
    s = VerifySettings(cache=str(old), shards=_train_dir(shards), weights=str(teacher_ckpt), samples=4,
                       **LOOSE_SETTINGS)
    assert verify(s)["passed"]
    resaved = tmp_path / "teacher.pth"
    torch.save(read_state_dict(teacher_ckpt), resaved)
    check = _weights_check(verify(dataclasses.replace(s, weights=str(resaved))))
    assert not check["ok"] and "records no tensor digest" in check["detail"]


def test_verify_gates_the_codecs_approximation_of_exact_dkd(cache_path, shards, teacher_ckpt, tmp_path):
    """Lossy codecs: stored against live exact DKD is a check at the recipe's temperatures, not a printed column."""
    out = tmp_path / "r.json"
    # topk:4 of 10 classes at T=4 (beta 0.5): every stored value is right, the codec leaves out too much
    failed = _failed(_verify_cli(cache_path, _train_dir(shards), teacher_ckpt, "--json", str(out)), out)
    assert "loss: DKD T=4 uniform median gradient cosine vs live exact" in failed
    assert not any("vs ideal" in n or n.startswith("logits:") for n in failed), failed
    report = json.loads(out.read_text())
    assert any("does not serve T=4" in f for f in report["failures"])
    # a badly fitted basis (rank 1, no corrections): its logit check passes by construction, the gate does not
    bad = _one_shard_cache(shards, teacher_ckpt, tmp_path / "rank1.zarr", codec="lowrank:1", views=1)
    failed = _failed(_verify_cli(bad, shards["train"][0], teacher_ckpt, "--json", str(out), "--temperature", "1"),
                     out)
    assert "loss: DKD T=1 exact median gradient cosine vs live exact" in failed
    assert not any(n.startswith("logits:") for n in failed), failed
