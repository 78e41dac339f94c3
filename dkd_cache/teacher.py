"""The teacher: build a torchvision classifier by name and load its weights safely and strictly.

Weights files accepted (the format is sniffed from the bytes, not the suffix):
    torchvision   a plain state dict saved with ``torch.save(model.state_dict(), path)``
    safetensors   a ``.safetensors`` file
    dkd-cache     a checkpoint written by :func:`save_checkpoint`: ``{"model": state_dict, "config": ..., ...}``
    mmpretrain    an mmpretrain / mmcls checkpoint ``{"meta": ..., "state_dict": {...}}``; ResNet-family keys
                  (``backbone.conv1``, ``backbone.bn1``, ``backbone.layerI.J.*``, ``head.fc.*``) are renamed to
                  torchvision's (``conv1``, ``bn1``, ``layerI.J.*``, ``fc.*``). Only mmpretrain's plain ``ResNet``
                  (V1b, the default ``style='pytorch'``) matches torchvision's layout; ResNetV1c/V1d (deep stem,
                  average-pool downsample) and other backbones keep their names and fail the strict load, naming keys.
A ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix shared by every key is stripped.

Safety: files are read only with ``torch.load(..., weights_only=True)``; a file holding any pickled object other than
tensors, containers, strings and numbers (and numpy scalars, dtypes and arrays, which mmcv/mmengine checkpoints keep
in their ``meta``) is refused with :class:`CheckpointError`, never loaded with ``weights_only=False``.

Loading is strict: missing, unexpected and wrong-shaped keys are all named in one error. One exception: a missing
``*.num_batches_tracked`` buffer is tolerated (the model keeps its own 0); BatchNorm reads it only in training with
``momentum=None``, never in eval, so the teacher's logits do not depend on it.

Identity: a teacher is recorded (TeacherInfo) by arch, classes, the SHA-256 of its weights file and the digest of
its tensors (:func:`tensors_digest`), so that the same tensors re-saved in another format or key naming are
recognised as the same weights (:func:`same_weights`); records written before the tensor digest carry the file's
SHA-256 only, and are matched by it.

Preprocessing is not part of the weights: mmpretrain's ``data_preprocessor`` mean/std (0-255 scale) equal torchvision's
ImageNet mean/std (0-1 scale), so the recipe's defaults fit both. torchvision's own googlenet / inception_v3 ImageNet
weights expect ``transform_input=True``, which :func:`build_model` does not set (``weights=None`` turns it off).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from .checkpoint import _load_object, _read_bytes
from .errors import CheckpointError, CheckpointNotFoundError, ConfigError

SOURCE_FORMATS = ("torchvision", "safetensors", "dkd-cache", "mmpretrain")
EXAMPLE_ARCHS = ("resnet18", "resnet34", "resnet50", "vit_b_16")
MAX_LISTED = 20  # names listed per category in a load error
HASH_BLOCK = 1 << 20
# Prefixes that wrappers add to every key: DistributedDataParallel / DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Checkpoint entries that hold the state dict, in order of preference.
CONTAINER_KEYS = {"model": "dkd-cache", "state_dict": "mmpretrain"}
# The tensor digest's version: a change of its definition gets a new tag, and so other digests.
TENSORS_DIGEST = "dkd-cache tensors v1"
# Where torchvision models keep their classifier, for archs that cannot be built on the meta device (RegNet).
_CLASSIFIER_GUESSES = ("fc.weight", "classifier.weight", "head.weight", "heads.head.weight")



@dataclasses.dataclass(frozen=True, kw_only=True)
class TeacherInfo:
    """What identifies a teacher: stored in the cache and compared on reuse."""

    arch: str
    sha256: str  # of the weights file's bytes
    num_classes: int
    source_format: str  # one of SOURCE_FORMATS
    tensors_sha256: str | None = None  # tensors_digest of the weights; None: recorded before it was (file hash only)

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not self.arch:
            raise ConfigError(f"teacher.arch must be a non-empty string, got {self.arch!r}")
        if not isinstance(self.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ConfigError(f"teacher.sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        n = self.num_classes
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ConfigError(f"teacher.num_classes must be a positive integer, got {self.num_classes!r}")
        if self.source_format not in SOURCE_FORMATS:
            raise ConfigError(f"teacher.source_format must be one of {list(SOURCE_FORMATS)}, "
                              f"got {self.source_format!r}")
        t = self.tensors_sha256
        if t is not None and (not isinstance(t, str) or not re.fullmatch(r"[0-9a-f]{64}", t)):
            raise ConfigError(f"teacher.tensors_sha256 must be 64 lowercase hex digits, got {t!r}")
        object.__setattr__(self, "num_classes", int(self.num_classes))

    def to_dict(self) -> dict[str, Any]:
        """The record; without tensors_sha256 when it is unknown (an older record stays as it was written)."""
        d = dataclasses.asdict(self)
        if d["tensors_sha256"] is None:
            del d["tensors_sha256"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TeacherInfo":
        """Exactly the fields; tensors_sha256 may be absent (records written before it was)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = set(d) - known, known - set(d) - {"tensors_sha256"}
        if unknown or missing:
            raise ConfigError(f"teacher info: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}; "
                              f"expected exactly {sorted(known)}")
        return cls(**d)


def tensors_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The weights' identity by their tensors, whatever file holds them (a pure function of the state dict).

    SHA-256 over the tag TENSORS_DIGEST and a newline, then, for each entry in sorted name order, one JSON line
    ``{"name": ..., "dtype": ..., "shape": [...]}`` (torch's dtype name without ``torch.``) and the tensor's raw
    bytes in C order (native byte order: little-endian on every host torch supports). Names are those of the
    normalised state dict (:func:`normalize_keys`: torchvision naming, wrapper prefixes stripped), so the same
    tensors saved as a torchvision ``.pth``, a safetensors file, a dkd-cache or an mmpretrain checkpoint give the
    same digest; another value, dtype, shape or name gives another. ``*.num_batches_tracked`` is left out: the
    loader tolerates its absence and the logits never read it."""
    h = hashlib.sha256(TENSORS_DIGEST.encode() + b"\n")
    for name in sorted(state_dict):
        if name.endswith(".num_batches_tracked"):
            continue
        t = state_dict[name].detach().to("cpu").contiguous()
        head = {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        h.update(json.dumps(head, sort_keys=True).encode() + b"\n")
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def same_weights(given: TeacherInfo, recorded: TeacherInfo) -> bool:
    """Whether `given` holds the weights `recorded` names: the same tensors (when both records carry their digest)
    or the same file (SHA-256 of its bytes: the only identity of records written before tensor digests)."""
    same_tensors = given.tensors_sha256 is not None and given.tensors_sha256 == recorded.tensors_sha256
    return same_tensors or given.sha256 == recorded.sha256


def same_teacher(given: TeacherInfo, recorded: TeacherInfo) -> bool:
    """The same arch and classes with the same weights (same_weights); the file format may differ."""
    return (given.arch, given.num_classes) == (recorded.arch, recorded.num_classes) and same_weights(given, recorded)


# --------------------------------------------------------------------------------------------------- models


def classification_archs() -> list[str]:
    """Names of torchvision's classification models (detection, segmentation, video, quantized excluded)."""
    return torchvision.models.list_models(module=torchvision.models)


def _check_arch(arch: str) -> None:
    names = classification_archs()
    if arch not in names:
        close = difflib.get_close_matches(str(arch), names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown teacher arch {arch!r}: {hint}it must name a torchvision classification model, "
                          f"e.g. {', '.join(n for n in EXAMPLE_ARCHS if n in names)} "
                          f"({len(names)} in all: torchvision.models.list_models(module=torchvision.models))")


def _get_model(arch: str, num_classes: int) -> nn.Module:
    with warnings.catch_warnings():
        # googlenet / inception_v3 warn that their default init will change; the weights replace it anyway.
        warnings.filterwarnings("ignore", message="The default weight initialization", category=FutureWarning)
        warnings.filterwarnings("ignore", message="The default weight initialization", category=UserWarning)
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised torchvision classifier; never downloads weights."""
    _check_arch(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    return _get_model(arch, num_classes)


@functools.lru_cache(maxsize=None)
def _shapes_on_meta(arch: str, num_classes: int) -> dict[str, tuple[int, ...]] | None:
    """Every state-dict key of the arch with its shape (built on the meta device); None if it cannot be built."""
    try:
        with torch.device("meta"):
            sd = _get_model(arch, num_classes).state_dict()
    except Exception:
        return None
    return {k: tuple(v.shape) for k, v in sd.items() if not k.endswith(".num_batches_tracked")}


def guess_arch(sd: Mapping[str, torch.Tensor], tried: str) -> str | None:
    """The arch of the same family as `tried` (resnet34 -> resnet*) whose keys and shapes the weights fit
    exactly, or None."""
    family = re.match(r"[a-z_]*[a-z]", tried)
    if family is None:
        return None
    given = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith(".num_batches_tracked")}
    for arch in classification_archs():
        if arch == tried or re.match(r"[a-z_]*[a-z]", arch).group(0) != family.group(0):
            continue
        try:
            classes = num_classes_from_state_dict(sd, arch)
        except ConfigError:
            continue
        if _shapes_on_meta(arch, classes) == given:
            return arch
    return None


@functools.lru_cache(maxsize=None)
def _classifier_keys(arch: str) -> tuple[tuple[str, int], ...] | None:
    """(state-dict key, axis) of every entry whose shape follows num_classes, found by building the model twice
    on the meta device (no memory, no init cost); None where the arch cannot be built there."""
    try:
        with torch.device("meta"):
            a = _get_model(arch, 1000).state_dict()
            b = _get_model(arch, 1001).state_dict()
    except Exception:  # RegNet copies data out of a tensor in __init__, which the meta device cannot do
        return None
    out = []
    for k, t in a.items():
        if t.shape != b[k].shape:
            axes = [i for i, (x, y) in enumerate(zip(t.shape, b[k].shape)) if x != y]
            out.append((k, axes[0]))
    return tuple(out)


def num_classes_from_state_dict(sd: Mapping[str, torch.Tensor], arch: str) -> int:
    """The number of classes the weights' classifier has (``fc.weight`` rows for ResNets). Keys must already be in
    torchvision naming (see :func:`normalize_keys`). ConfigError if the weights do not tell."""
    _check_arch(arch)
    keys = _classifier_keys(arch)
    if keys is None:
        candidates = [(k, 0) for k in _CLASSIFIER_GUESSES]
        cls_idx = sorted((int(m.group(1)), k) for k in sd if (m := re.fullmatch(r"classifier\.(\d+)\.weight", k)))
        candidates += [(k, 0) for _, k in reversed(cls_idx)]
        candidates = [c for c in candidates if c[0] in sd][:1]
    else:
        candidates = [(k, ax) for k, ax in keys if k in sd]
    found = {k: int(sd[k].shape[ax]) for k, ax in candidates if sd[k].dim() > ax}
    if not found:
        wanted = [k for k, _ in keys] if keys else list(_CLASSIFIER_GUESSES)
        raise ConfigError(f"cannot tell how many classes the {arch} weights have: none of its classifier keys "
                          f"{wanted} is in them (first keys: {list(sd)[:5]}); is the arch right?")
    if len(set(found.values())) > 1:
        raise ConfigError(f"the {arch} weights' classifier entries disagree on the number of classes: {found}")
    return next(iter(found.values()))


# --------------------------------------------------------------------------------------------------- reading


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _extract_state_dict(path: Path, obj: Any) -> tuple[dict[str, torch.Tensor], str | None]:
    """(state dict, container key or None) out of whatever the file held."""
    if _is_tensor_dict(obj):
        return dict(obj), None
    if isinstance(obj, Mapping):
        for key in CONTAINER_KEYS:
            if key in obj and _is_tensor_dict(obj[key]):
                return dict(obj[key]), key
        tops = list(obj)[:10]
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:5]
        raise CheckpointError(
            f"{path}: no state dict found: expected a dict of tensors, or a checkpoint whose 'model' or 'state_dict' "
            f"entry is one; top-level keys {tops}{' ...' if len(obj) > 10 else ''} (non-tensor entries: {bad})")
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")


def normalize_keys(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Strip wrapper prefixes shared by every key, then rename mmpretrain ResNet keys to torchvision's.
    Returns (state dict, whether mmpretrain naming was found)."""
    out = dict(sd)
    stripped = True
    while stripped and out:
        stripped = False
        for pre in WRAPPER_PREFIXES:
            if all(k.startswith(pre) for k in out):
                out = {k[len(pre):]: v for k, v in out.items()}
                stripped = True
    if not any(k.startswith("backbone.") for k in out):
        return out, False
    renamed: dict[str, torch.Tensor] = {}
    for k, v in out.items():
        if k.startswith("backbone."):
            new = k[len("backbone."):]
        elif k.startswith("head.fc."):
            new = "fc." + k[len("head.fc."):]
        else:
            new = k  # neck / other head layouts: left as is, the strict load names them
        if new in renamed:
            raise CheckpointError(f"two keys map to {new!r} when renaming mmpretrain keys to torchvision's")
        renamed[new] = v
    return renamed, True


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str, str]:
    """(state dict in torchvision naming, source_format, sha256 of exactly the bytes parsed).
    The file is read once into memory so that the digest describes the weights loaded."""
    p = Path(path)
    data = _read_bytes(p)
    digest = hashlib.sha256(data).hexdigest()
    obj, kind = _load_object(p, data)
    del data
    sd, container = _extract_state_dict(p, obj)
    sd, mm = normalize_keys(sd)
    if kind == "safetensors":
        fmt = "safetensors"
    elif mm or container == "state_dict":
        fmt = "mmpretrain"
    elif container == "model":
        fmt = "dkd-cache"
    else:
        fmt = "torchvision"
    return sd, fmt, digest


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a weights file, in torchvision naming (see the module docstring for formats)."""
    return read_weights(path)[0]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(HASH_BLOCK):
                h.update(block)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{path}: file not found") from e
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------- loading


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    more = f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"{len(items)} {title}: {shown}{more}"


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                 path_for_messages: str | os.PathLike) -> None:
    """Copy the weights into the model, strictly: every mismatch is named in one CheckpointError.
    A missing ``*.num_batches_tracked`` is tolerated (see the module docstring)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} (file {tuple(v.shape)}, model {tuple(expected[k].shape)})"
             for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [_listing(t, x) for t, x in (("missing keys", missing), ("unexpected keys", unexpected),
                                              ("keys with the wrong shape", wrong)) if x]
        hint = ""
        if len(missing) > len(expected) // 2:
            hint = (f" Most of the model's keys are missing: do the weights belong to another arch, or carry a "
                    f"prefix? (first keys in the file: {list(state_dict)[:5]})")
        raise CheckpointError(f"{path_for_messages}: the weights do not fit {type(model).__name__}: "
                              + "; ".join(parts) + "." + hint)
    result = model.load_state_dict(state_dict, strict=False)
    assert not result.unexpected_keys and all(k.endswith(".num_batches_tracked") for k in result.missing_keys)


def load_teacher(arch: str, weights_path: str | os.PathLike, device: str | torch.device = "cpu",
                 channels_last: bool = True) -> tuple[nn.Module, TeacherInfo]:
    """The teacher in eval mode with gradients off, on ``device``, and its identity."""
    _check_arch(arch)
    sd, fmt, digest = read_weights(weights_path)
    try:
        num_classes = num_classes_from_state_dict(sd, arch)
    except ConfigError:
        # Name every mismatch (a wrong arch, mmpretrain V1d...) rather than only the missing classifier.
        load_weights(_get_model(arch, 1000), sd, weights_path)
        raise
    model = build_model(arch, num_classes)
    try:
        load_weights(model, sd, weights_path)
    except CheckpointError as e:
        guess = guess_arch(sd, arch)
        if guess is None:
            raise
        raise CheckpointError(f"{e} The weights look like {guess} (its keys and shapes fit them exactly): pass "
                              f"--arch {guess} (or --teacher-arch {guess})") from e
    tensors = tensors_digest(sd)
    del sd
    model.eval().requires_grad_(False).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, TeacherInfo(arch=arch, sha256=digest, num_classes=num_classes, source_format=fmt,
                              tensors_sha256=tensors)
