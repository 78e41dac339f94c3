"""Teacher loading: formats, key remapping, strictness, pickle safety, corrupt files, identity."""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib

import numpy as np
import pytest
import safetensors.torch
import torch

from dkd_cache.errors import CheckpointError, CheckpointNotFoundError, ConfigError, DKDCacheError
from dkd_cache.checkpoint import read_checkpoint, save_checkpoint
from dkd_cache.teacher import (
    TeacherInfo,
    build_model,
    file_sha256,
    load_teacher,
    load_weights,
    normalize_keys,
    num_classes_from_state_dict,
    read_state_dict,
    read_weights,
    same_teacher,
    same_weights,
    tensors_digest,
)

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    """A resnet18 state dict with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = build_model("resnet18", NUM_CLASSES)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32) * 2 + 0.5)  # moves running_mean / running_var off 0 / 1
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32)


def _mmpretrain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {("head." + k if k.startswith("fc.") else "backbone." + k): v for k, v in sd.items()}


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x.contiguous(memory_format=torch.channels_last))


def test_all_formats_give_identical_logits(tmp_path, weights, x):
    files = {
        "torchvision": tmp_path / "tv.pth",
        "safetensors": tmp_path / "w.safetensors",
        "dkd-cache": tmp_path / "ckpt.pt",
        "mmpretrain": tmp_path / "mm.pth",
    }
    torch.save(weights, files["torchvision"])
    safetensors.torch.save_file({k: v.contiguous() for k, v in weights.items()}, files["safetensors"])
    save_checkpoint(files["dkd-cache"], model=weights, config={"arch": "resnet18", "lr": 0.1}, epoch=3)
    meta = {"mmpretrain_version": "1.2.0", "epoch": 100, "config": "model = dict(type='ImageClassifier')",
            "dataset_meta": {"classes": tuple(f"c{i}" for i in range(NUM_CLASSES))}}
    torch.save({"meta": meta, "state_dict": _mmpretrain(weights)}, files["mmpretrain"])

    reference = build_model("resnet18", NUM_CLASSES)
    reference.load_state_dict(weights)
    expected = _logits(reference.eval().to(memory_format=torch.channels_last), x)  # same kernels as the teacher
    for fmt, path in files.items():
        model, info = load_teacher("resnet18", path)
        assert info.source_format == fmt
        assert info.num_classes == NUM_CLASSES and info.arch == "resnet18"
        assert torch.equal(_logits(model, x), expected), fmt
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_the_same_tensors_in_every_format_have_one_digest(tmp_path, weights):
    files = [tmp_path / "tv.pth", tmp_path / "w.safetensors", tmp_path / "ckpt.pt", tmp_path / "mm.pth",
             tmp_path / "ddp.pth"]
    torch.save(weights, files[0])
    safetensors.torch.save_file({k: v.contiguous() for k, v in weights.items()}, files[1])
    save_checkpoint(files[2], model=weights, arch="resnet18")
    # mmpretrain naming, and without num_batches_tracked (the loader tolerates its absence; logits never read it)
    torch.save({"meta": {"epoch": 1}, "state_dict": {k: v for k, v in _mmpretrain(weights).items()
                                                     if not k.endswith("num_batches_tracked")}}, files[3])
    torch.save({"module." + k: v for k, v in weights.items()}, files[4])
    infos = [load_teacher("resnet18", f)[1] for f in files]
    assert len({i.sha256 for i in infos}) == 5  # five different files
    assert {i.tensors_sha256 for i in infos} == {tensors_digest(weights)}  # one set of tensors
    assert all(same_weights(i, infos[0]) and same_teacher(i, infos[0]) for i in infos)


def test_tensors_digest_tells_other_tensors_apart(weights):
    base = tensors_digest(weights)
    assert tensors_digest(dict(reversed(list(weights.items())))) == base  # entry order does not matter
    moved = dict(weights)
    moved["fc.bias"] = weights["fc.bias"].clone()
    moved["fc.bias"][3] = torch.nextafter(moved["fc.bias"][3], torch.tensor(1.0))  # one ulp of one value
    as_double = {**weights, "fc.bias": weights["fc.bias"].double()}  # same values, another dtype
    renamed = {("fc2.bias" if k == "fc.bias" else k): v for k, v in weights.items()}
    reshaped = {**weights, "fc.bias": weights["fc.bias"].reshape(2, -1)}
    digests = {tensors_digest(d) for d in (moved, as_double, renamed, reshaped)}
    assert len(digests) == 4 and base not in digests


def test_same_weights_falls_back_to_the_file_hash_for_older_records():
    old = TeacherInfo(arch="resnet18", sha256="ab" * 32, num_classes=10, source_format="torchvision")
    now_same_file = TeacherInfo(arch="resnet18", sha256="ab" * 32, num_classes=10, source_format="torchvision",
                                tensors_sha256="cd" * 32)
    now_other_file = TeacherInfo(arch="resnet18", sha256="ef" * 32, num_classes=10, source_format="safetensors",
                                 tensors_sha256="cd" * 32)
    assert same_weights(now_same_file, old) and not same_weights(now_other_file, old)  # old: the file only
    assert same_weights(now_other_file, now_same_file)  # both carry tensor digests: the tensors decide
    other_tensors = TeacherInfo(arch="resnet18", sha256="ef" * 32, num_classes=10, source_format="torchvision",
                                tensors_sha256="00" * 32)
    assert not same_weights(other_tensors, now_same_file)
    assert not same_teacher(TeacherInfo(**{**now_same_file.to_dict(), "arch": "resnet34"}), now_same_file)


def test_format_is_sniffed_not_taken_from_suffix(tmp_path, weights):
    path = tmp_path / "weights.bin"
    safetensors.torch.save_file({k: v.contiguous() for k, v in weights.items()}, path)
    sd, fmt, _ = read_weights(path)
    assert fmt == "safetensors" and sd.keys() == weights.keys()


def test_wrapper_prefixes_are_stripped(tmp_path, weights, x):
    path = tmp_path / "ddp.pth"
    torch.save({"module._orig_mod." + k: v for k, v in weights.items()}, path)
    model, info = load_teacher("resnet18", path)
    assert info.source_format == "torchvision"
    assert read_state_dict(path).keys() == weights.keys()
    ddp_mm = {"module." + k: v for k, v in _mmpretrain(weights).items()}
    assert normalize_keys(ddp_mm) == (dict(weights), True)


def test_numpy_values_in_meta_are_read(tmp_path, weights):
    # mmcv checkpoints keep numpy scalars (best scores) in meta; they are data, allowed by weights_only loading.
    path = tmp_path / "mmcv.pth"
    meta = {"hook_msgs": {"best_score": np.float64(0.71), "last_ckpt": "epoch_100.pth"}, "iter": np.int64(5),
            "mean": np.array([123.675, 116.28, 103.53])}
    torch.save({"meta": meta, "state_dict": _mmpretrain(weights)}, path)
    _, info = load_teacher("resnet18", path)
    assert info.source_format == "mmpretrain"
    assert read_checkpoint(path)["meta"]["hook_msgs"]["best_score"] == 0.71


def test_mismatches_are_named_in_one_error(weights):
    sd = dict(weights)
    del sd["layer1.0.conv1.weight"]
    sd["bogus.weight"] = torch.zeros(3)
    sd["layer2.0.bn1.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as e:
        load_weights(build_model("resnet18", NUM_CLASSES), sd, "teacher.pth")
    msg = str(e.value)
    assert "teacher.pth" in msg
    assert "1 missing keys: layer1.0.conv1.weight" in msg
    assert "1 unexpected keys: bogus.weight" in msg
    assert "layer2.0.bn1.weight (file (3,), model (128,))" in msg


def test_long_mismatch_lists_are_capped(weights):
    sd = {k: v for k, v in weights.items() if not k.startswith("layer4.")}
    n_missing = sum(k.startswith("layer4.") and not k.endswith("num_batches_tracked") for k in weights)
    assert n_missing > 20
    with pytest.raises(CheckpointError, match=rf"{n_missing} missing keys: .* and {n_missing - 20} more"):
        load_weights(build_model("resnet18", NUM_CLASSES), sd, "t.pth")


def test_missing_num_batches_tracked_is_tolerated(tmp_path, weights, x):
    path = tmp_path / "no_nbt.pth"
    torch.save({k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}, path)
    model, _ = load_teacher("resnet18", path)
    reference, _ = load_teacher("resnet18", _save(tmp_path / "ref.pth", weights))
    assert torch.equal(_logits(model, x), _logits(reference, x))


def test_wrong_arch_names_the_mismatch(tmp_path, weights):
    with pytest.raises(CheckpointError, match="missing keys: .*layer1.2"):
        load_teacher("resnet34", _save(tmp_path / "r18.pth", weights))


def _save(path: pathlib.Path, obj) -> pathlib.Path:
    torch.save(obj, path)
    return path


class _TouchPayload:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class _SystemPayload:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [_TouchPayload, _SystemPayload])
@pytest.mark.parametrize("zipfile", [True, False])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, weights, payload, zipfile):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({**weights, "extra": payload(marker)}, path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(CheckpointError, match="pickled objects other than tensors") as e:
        load_teacher("resnet18", path)
    assert str(path) in str(e.value)
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    assert not marker.exists()


def test_torchvision_reference_script_checkpoint_loads(tmp_path, weights):
    # torchvision's references/classification saves {"model", "optimizer", "lr_scheduler", "epoch", "args"}
    # with args an argparse.Namespace: a plain attribute bag, allowed, so users' checkpoints load as they are.
    path = _save(tmp_path / "ref_script.pth", {"model": weights, "args": argparse.Namespace(lr=0.1), "epoch": 89})
    sd = read_state_dict(path)
    assert sd.keys() == weights.keys() and all(torch.equal(sd[k], weights[k]) for k in sd)


class Opaque:
    """Not a safe global: torch's weights_only loader refuses it."""


@pytest.mark.parametrize("name,write", [
    ("zip.pth", lambda p, sd: torch.save(sd, p)),
    ("legacy.pth", lambda p, sd: torch.save(sd, p, _use_new_zipfile_serialization=False)),
    ("w.safetensors", lambda p, sd: safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, p)),
])
def test_truncated_file_is_named(tmp_path, weights, name, write):
    full = tmp_path / f"full_{name}"
    write(full, weights)
    path = tmp_path / name
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_teacher("resnet18", path)
    assert str(path) in str(e.value)


def test_empty_and_garbage_files(tmp_path):
    for name, data in (("empty.pth", b""), ("text.pth", b"not a checkpoint at all\n" * 10)):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=name):
            read_state_dict(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as e:
        load_teacher("resnet18", tmp_path / "nope.pth")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, DKDCacheError)
    assert "nope.pth" in str(e.value)


def test_no_state_dict_inside(tmp_path):
    path = _save(tmp_path / "odd.pth", {"weights": [1, 2, 3], "epoch": 1})
    with pytest.raises(CheckpointError, match="no state dict found.*weights"):
        read_state_dict(path)


def test_num_classes_is_inferred_and_sha256_matches(tmp_path, x):
    torch.manual_seed(0)
    path = _save(tmp_path / "seven.pth", build_model("resnet18", 7).state_dict())
    model, info = load_teacher("resnet18", path)
    assert info.num_classes == 7
    assert _logits(model, x).shape == (4, 7)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.sha256 == expected == file_sha256(path)


def test_num_classes_for_other_classifier_layouts():
    assert num_classes_from_state_dict({"fc.weight": torch.zeros(5, 512)}, "resnet50") == 5
    assert num_classes_from_state_dict({"classifier.3.weight": torch.zeros(6, 1024)}, "mobilenet_v3_small") == 6
    assert num_classes_from_state_dict({"heads.head.weight": torch.zeros(3, 768)}, "vit_b_16") == 3
    assert num_classes_from_state_dict({"classifier.1.weight": torch.zeros(4, 512, 1, 1)}, "squeezenet1_1") == 4
    assert num_classes_from_state_dict({"fc.weight": torch.zeros(9, 400)}, "regnet_x_400mf") == 9  # no meta build
    with pytest.raises(ConfigError, match="cannot tell"):
        num_classes_from_state_dict({"conv1.weight": torch.zeros(64, 3, 7, 7)}, "resnet18")


def test_unknown_arch(tmp_path, weights):
    for arch in ("resnet19", "fasterrcnn_resnet50_fpn"):
        with pytest.raises(ConfigError, match="unknown teacher arch"):
            build_model(arch, 10)
    with pytest.raises(ConfigError, match="did you mean resnet18"):
        load_teacher("resnet19", tmp_path / "never_read.pth")


def test_teacher_info_round_trip():
    info = TeacherInfo(arch="resnet34", sha256="ab" * 32, num_classes=1000, source_format="mmpretrain")
    assert TeacherInfo.from_dict(info.to_dict()) == info
    assert "tensors_sha256" not in info.to_dict()  # an older record is written back as it was
    with_tensors = TeacherInfo(**info.to_dict(), tensors_sha256="cd" * 32)
    assert TeacherInfo.from_dict(with_tensors.to_dict()) == with_tensors
    with pytest.raises(ConfigError, match="tensors_sha256"):
        TeacherInfo(**info.to_dict(), tensors_sha256="CD" * 32)
    with pytest.raises(ConfigError):
        TeacherInfo.from_dict({**info.to_dict(), "extra": 1})
    with pytest.raises(ConfigError):
        TeacherInfo(arch="resnet34", sha256="ab" * 32, num_classes=1000, source_format="onnx")
    with pytest.raises(TypeError):
        TeacherInfo("resnet34", "ab" * 32, 1000, "torchvision")  # keyword-only


def test_save_checkpoint_is_atomic_and_refuses_unreadable_entries(tmp_path, weights):
    path = tmp_path / "sub" / "ckpt.pt"
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    save_checkpoint(path, model=weights, optimizer=opt.state_dict(), config={"lr": 0.1, "sizes": (1, 2)}, epoch=1)
    ck = read_checkpoint(path)
    assert ck["epoch"] == 1 and ck["config"] == {"lr": 0.1, "sizes": (1, 2)}
    assert read_weights(path)[1] == "dkd-cache"
    before = path.read_bytes()
    with pytest.raises(TypeError, match="Opaque"):
        save_checkpoint(path, model=weights, args=Opaque())
    assert path.read_bytes() == before  # the old checkpoint is untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]  # no temp file left


def test_numpy1_pickle_names_are_read(tmp_path, weights):
    # numpy 1.x pickles name numpy.core.multiarray, numpy 2.x numpy._core.multiarray: both are read.
    path = tmp_path / "np1.pth"
    torch.save({"meta": {"best": np.float64(0.5)}, "state_dict": weights}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert b"numpy._core.multiarray" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert read_checkpoint(path)["meta"]["best"] == 0.5


def test_a_cache_is_resumed_with_the_same_tensors_and_refused_with_others(cache_path):
    """CacheMeta.differences (dump's create-or-compare) compares teachers with same_teacher: a cache recording only
    the file hash (written before tensor digests) is resumed by the same file; the same tensors re-saved are the
    same teacher; other tensors are a difference."""
    import dataclasses

    from dkd_cache.cache import open_cache

    meta = open_cache(cache_path).meta
    t = meta.teacher
    assert t.tensors_sha256 is not None
    older = dataclasses.replace(meta, teacher=dataclasses.replace(t, tensors_sha256=None))
    resaved = dataclasses.replace(meta, teacher=dataclasses.replace(t, sha256="ab" * 32, source_format="torchvision"))
    other = dataclasses.replace(meta, teacher=dataclasses.replace(t, sha256="ab" * 32, tensors_sha256="cd" * 32))
    assert older.differences(meta) == [] and meta.differences(resaved) == []
    assert [d.split(":")[0] for d in meta.differences(other)] == ["teacher"]
