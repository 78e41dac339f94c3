"""Synthetic ImageNet-like data in webdataset layout, made locally (nothing is downloaded).

Layout written by `make_shards(out)`::

    out/train/train-000000.tar ...   out/val/val-000000.tar ...   out/train.txt   out/val.txt
    out/extra/extra-000000.tar ...   out/extra.txt      (only with extra_per_class > 0)

Each sample has three members: ``KEY.jpg`` (JPEG, quality 90), ``KEY.cls`` (class as ASCII digits) and
``KEY.json`` (``{"class": c, "synset": "s0017"}``). Train keys look like ``s0017_000042``, val keys like
``s0017_v000042``, extra keys (a held-back training split, e.g. for a teacher that sees more data than its
students) like ``s0017_x000042``, so keys are unique across splits and never contain a dot.

A class is a combination of a shape kind, a texture (kind and frequency) and a hue. Each image shows one
object of its class at a random position, scale and rotation, over a random colour gradient with a few
small distractor shapes, then gets colour jitter and pixel noise. Every random draw comes from
``numpy.random.default_rng`` seeded with ``SeedSequence([seed, split_id, ...])``, so one seed always gives
byte-identical shards (for one Pillow / libjpeg build).
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import io
import json
import math
import os
import tarfile
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from .errors import ConfigError

SPLITS = {"train": 0, "val": 1, "extra": 2}
_KEY_TAG = {"train": "", "val": "v", "extra": "x"}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon", "crescent", "arrow")
# (texture kind, cycles across the object); "plain" has no frequency.
TEXTURES = (("plain", 0), ("stripes", 3), ("stripes", 6), ("checker", 2), ("checker", 4), ("dots", 3), ("dots", 5))
MAX_CLASSES = 10000
MAX_PER_CLASS = 999_999
JPEG_QUALITY = 90
TAR_MTIME = 0  # fixed member times: tar bytes depend only on the content
_ORDER_TAG = 0x0D0E  # SeedSequence entropy word for the sample order (not a valid class index)
_CLASSDEF_TAG = 0xC1A5
_NOISE_TAG = 0x1015E
_NOISE_BANK_SIZE = 1 << 20  # 4 MiB of float32 per table: covers images up to 590 x 590


@dataclasses.dataclass(frozen=True)
class ClassSpec:
    """What defines a class: shape kind, texture (kind, cycles across the object) and hue in [0, 1)."""

    shape: str
    texture: str
    freq: int
    hue: float
    hue_step: float  # spacing of the hue grid: per-image hue jitter stays well inside it


def _regular(n: int, r: float = 1.0, phase: float = -math.pi / 2, cx: float = 0.0) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star() -> list[tuple[float, float]]:
    return [
        (r * math.cos(-math.pi / 2 + math.pi * k / 5), r * math.sin(-math.pi / 2 + math.pi * k / 5))
        for k, r in zip(range(10), [1.0, 0.42] * 5)
    ]


# Each shape: polygons in unit coordinates (inside the unit disc), each with fill 255 (add) or 0 (cut out).
_UNIT_SHAPES: dict[str, list[tuple[list[tuple[float, float]], int]]] = {
    "circle": [(_regular(32), 255)],
    "square": [(_regular(4, phase=math.pi / 4), 255)],
    "triangle": [(_regular(3), 255)],
    "star": [(_star(), 255)],
    "cross": [([(-0.3, -0.95), (0.3, -0.95), (0.3, -0.3), (0.95, -0.3), (0.95, 0.3), (0.3, 0.3), (0.3, 0.95),
                (-0.3, 0.95), (-0.3, 0.3), (-0.95, 0.3), (-0.95, -0.3), (-0.3, -0.3)], 255)],
    "ring": [(_regular(32), 255), (_regular(32, 0.55), 0)],
    "diamond": [([(0.0, -1.0), (0.55, 0.0), (0.0, 1.0), (-0.55, 0.0)], 255)],
    "hexagon": [(_regular(6, phase=0.0), 255)],
    "crescent": [(_regular(32), 255), (_regular(32, 0.85, cx=0.45), 0)],
    "arrow": [([(-0.95, -0.25), (0.2, -0.25), (0.2, -0.7), (0.95, 0.0), (0.2, 0.7), (0.2, 0.25), (-0.95, 0.25)], 255)],
}


def class_specs(classes: int, seed: int = 0, textures: int = len(TEXTURES), shapes: int = len(SHAPES)
                ) -> list[ClassSpec]:
    """Distinct (shape, texture, hue) combinations for `classes` classes, drawn by a seeded permutation.

    Only the first `shapes` entries of SHAPES and the first `textures` of TEXTURES are used (textures=1: plain
    objects, classes differ by shape and hue). The hue grid has at least 8 steps and grows so that the grid
    always holds enough combinations.
    """
    n_tex = textures
    n_hue = max(8, math.ceil(classes / (shapes * n_tex)))
    grid = shapes * n_tex * n_hue
    rng = np.random.default_rng(np.random.SeedSequence([seed, _CLASSDEF_TAG]))
    picks = rng.permutation(grid)[:classes]
    specs = []
    for p in picks.tolist():
        shape_i, rest = divmod(p, n_tex * n_hue)
        tex_i, hue_i = divmod(rest, n_hue)
        kind, freq = TEXTURES[tex_i]
        specs.append(ClassSpec(SHAPES[shape_i], kind, freq, hue_i / n_hue, 1.0 / n_hue))
    return specs


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(r * 255 + 0.5), int(g * 255 + 0.5), int(b * 255 + 0.5)


def _shape_mask(shape: str, size: int, angle: float, fill: float = 0.95) -> Image.Image:
    """An L-mode mask of `shape` rotated by `angle` radians, filling `fill` of a `size` x `size` box."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    c, s, half = math.cos(angle), math.sin(angle), size / 2
    r = half * fill
    for poly, value in _UNIT_SHAPES[shape]:
        pts = [(half + r * (x * c - y * s), half + r * (x * s + y * c)) for x, y in poly]
        draw.polygon(pts, fill=value)
    return mask


def _texture(spec: ClassSpec, size: int, angle: float, c1, c2, rng: np.random.Generator) -> Image.Image:
    """A size x size RGB patch with the class texture in colours c1 (ground) and c2 (pattern), rotated with the object."""
    if spec.texture == "plain":
        return Image.new("RGB", (size, size), c1)
    coords = np.arange(size, dtype=np.float32) - size / 2
    period = size / spec.freq
    ca, sa = math.cos(angle), math.sin(angle)
    u = (coords[None, :] * ca + coords[:, None] * sa) / period + rng.random()
    if spec.texture == "stripes":
        on = (np.floor(u).astype(np.int32) & 1).astype(bool)
    else:
        v = (coords[:, None] * ca - coords[None, :] * sa) / period + rng.random()
        if spec.texture == "checker":
            on = ((np.floor(u) + np.floor(v)).astype(np.int32) & 1).astype(bool)
        else:  # dots
            on = ((u - np.floor(u) - 0.5) ** 2 + (v - np.floor(v) - 0.5) ** 2) < 0.09
    out = np.where(on[:, :, None], np.array(c2, np.uint8), np.array(c1, np.uint8))
    return Image.fromarray(out, "RGB")


def render_image(spec: ClassSpec, rng: np.random.Generator, min_side: int = 48, max_side: int = 160,
                 clutter: int = 5, rotation: float = 180.0) -> Image.Image:
    """Draw one RGB image of class `spec` with every random choice taken from `rng`; 1..`clutter` distractors.

    The main object is rotated by at most `rotation` degrees either way (180: any angle; 0: upright). The angle
    is drawn the same way whatever `rotation` is, so the other random choices of an image do not depend on it.
    """
    w, h = (int(x) for x in rng.integers(min_side, max_side + 1, size=2))
    short = min(w, h)

    # Background: linear gradient between two low-saturation colours, in a random direction.
    b1 = _rgb(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.3, 1.0))
    b2 = _rgb(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.3, 1.0))
    theta = rng.uniform(0, 2 * math.pi)
    xs = np.linspace(-127.5, 127.5, w, dtype=np.float32) * math.cos(theta)
    ys = np.linspace(-127.5, 127.5, h, dtype=np.float32) * math.sin(theta)
    t = np.clip(xs[None, :] + ys[:, None] + 128.0, 0.0, 255.0).astype(np.uint8)
    img = Image.composite(Image.new("RGB", (w, h), b2), Image.new("RGB", (w, h), b1), Image.fromarray(t, "L"))

    # Clutter: a few small plain shapes of any kind and colour, behind the main object.
    for _ in range(int(rng.integers(1, clutter + 1)) if clutter else 0):
        size = max(4, int(short * rng.uniform(0.1, 0.3)))
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = _rgb(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0))
        pos = (int(rng.integers(-size // 2, w - size // 2)), int(rng.integers(-size // 2, h - size // 2)))
        img.paste(colour, (*pos, pos[0] + size, pos[1] + size), _shape_mask(kind, size, rng.uniform(0, 2 * math.pi)))

    # Main object: class shape with class texture, in the class hue (jittered well inside its hue step).
    size = max(8, int(short * rng.uniform(0.4, 0.85)))
    angle = rng.uniform(0, 2 * math.pi)
    if rotation < 180:  # the same draw, mapped onto [-rotation, +rotation] degrees
        angle = (angle - math.pi) * (rotation / 180.0)
    hue = spec.hue + rng.uniform(-0.3, 0.3) * spec.hue_step
    c1 = _rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    c2 = _rgb(hue, rng.uniform(0.2, 0.6), rng.uniform(0.1, 0.35)) if rng.random() < 0.5 else _rgb(
        hue, rng.uniform(0.0, 0.25), rng.uniform(0.85, 1.0))
    margin = int(size * 0.35)
    x0 = int(rng.integers(-margin, max(-margin + 1, w - size + margin)))
    y0 = int(rng.integers(-margin, max(-margin + 1, h - size + margin)))
    img.paste(_texture(spec, size, angle, c1, c2, rng), (x0, y0), _shape_mask(spec.shape, size, angle))

    # Colour jitter (per-channel gain, common offset) and pixel noise (gaussian or uniform, std `sigma`).
    gain = rng.uniform(0.8, 1.2) * rng.uniform(0.93, 1.07, size=3)
    offset = rng.uniform(-20, 20)
    sigma = rng.uniform(2.0, 12.0)
    gaussian, n = bool(rng.random() < 0.5), h * w * 3
    if n <= _NOISE_BANK_SIZE:
        start = int(rng.integers(0, _NOISE_BANK_SIZE - n + 1))
        noise = _noise_bank(gaussian)[start:start + n].reshape(h, w, 3)
    else:  # too big for the table: draw fresh (slower)
        noise = _unit_noise(np.random.default_rng(rng.integers(2**63)), gaussian, (h, w, 3))
    arr = np.asarray(img, dtype=np.float32)
    arr *= gain.astype(np.float32)
    arr += noise * np.float32(sigma) + np.float32(offset + 0.5)
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


@functools.cache
def _noise_bank(gaussian: bool) -> np.ndarray:
    """A fixed table of unit-variance noise (gaussian or uniform); images take slices at random offsets.

    Drawing fresh gaussian noise per image costs more than the rest of the drawing; a constant-seeded table
    sliced at an offset from the image's own rng is as deterministic and ~10x cheaper.
    """
    return _unit_noise(np.random.default_rng(np.random.SeedSequence([_NOISE_TAG, int(gaussian)])), gaussian,
                       (_NOISE_BANK_SIZE,))


def _unit_noise(rng: np.random.Generator, gaussian: bool, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 noise of mean 0 and variance 1: gaussian, or uniform on [-sqrt(3), sqrt(3)]."""
    if gaussian:
        return rng.standard_normal(shape, dtype=np.float32)
    return (rng.random(shape, dtype=np.float32) - np.float32(0.5)) * np.float32(math.sqrt(12.0))


def sample_key(split: str, cls: int, j: int) -> str:
    """Key of the j-th sample of class `cls` in `split` (no dots; unique across splits)."""
    return f"s{cls:04d}_{_KEY_TAG[split]}{j:06d}"


def encode_sample(spec: ClassSpec, split: str, cls: int, j: int, *, seed: int, min_side: int, max_side: int,
                  clutter: int = 5, rotation: float = 180.0) -> dict:
    """The members of one sample as bytes: {"__key__", "jpg", "cls", "json"}; deterministic in its arguments."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], cls, j]))
    buf = io.BytesIO()
    render_image(spec, rng, min_side, max_side, clutter, rotation).save(buf, format="JPEG", quality=JPEG_QUALITY)
    meta = json.dumps({"class": cls, "synset": f"s{cls:04d}"}).encode()
    return {"__key__": sample_key(split, cls, j), "jpg": buf.getvalue(), "cls": str(cls).encode(), "json": meta}


def _write_shard_webdataset(path: Path, samples: list[dict]) -> None:
    import webdataset as wds

    # TarWriter stamps members with time.time() unless mtime is given, and passes bytes values through as-is.
    with open(path, "wb") as f, wds.TarWriter(f, mtime=TAR_MTIME, encoder=False) as tw:
        for s in samples:
            tw.write(s)


def _write_shard_tar(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for s in samples:
            for ext in ("jpg", "cls", "json"):
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(s[ext]), TAR_MTIME, 0o644
                tf.addfile(info, io.BytesIO(s[ext]))


def _check_args(classes, train_per_class, val_per_class, shard_size, seed, min_side, max_side, writer,
                extra_per_class=0, clutter=5, textures=len(TEXTURES), shapes=len(SHAPES), rotation=180.0) -> None:
    ints = dict(classes=classes, train_per_class=train_per_class, val_per_class=val_per_class,
                shard_size=shard_size, seed=seed, min_side=min_side, max_side=max_side,
                extra_per_class=extra_per_class, clutter=clutter, textures=textures, shapes=shapes)
    for name, v in ints.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ConfigError(f"{name} must be an integer, got {v!r}")
    for name in ("classes", "train_per_class", "val_per_class", "shard_size"):
        if ints[name] <= 0:
            raise ConfigError(f"{name} must be positive, got {ints[name]}")
    if classes > MAX_CLASSES:
        raise ConfigError(f"classes must be at most {MAX_CLASSES} (keys hold 4 digits), got {classes}")
    if not 1 <= textures <= len(TEXTURES) or not 1 <= shapes <= len(SHAPES):
        raise ConfigError(f"textures must lie in 1..{len(TEXTURES)} and shapes in 1..{len(SHAPES)}, "
                          f"got {textures} and {shapes}")
    if isinstance(rotation, bool) or not isinstance(rotation, (int, float)) or not 0 <= rotation <= 180:
        raise ConfigError(f"rotation must be a number of degrees in 0..180, got {rotation!r}")
    if extra_per_class < 0 or clutter < 0:
        raise ConfigError(f"extra_per_class and clutter must be >= 0, got {extra_per_class} and {clutter}")
    if max(train_per_class, val_per_class, extra_per_class) > MAX_PER_CLASS:
        raise ConfigError(f"at most {MAX_PER_CLASS} samples per class and split")
    if seed < 0:
        raise ConfigError(f"seed must be non-negative, got {seed}")
    if min_side < 16 or max_side > 4096:
        raise ConfigError(f"image sides must lie in 16..4096, got min_side={min_side} max_side={max_side}")
    if min_side > max_side:
        raise ConfigError(f"min_side ({min_side}) is larger than max_side ({max_side})")
    if writer not in ("webdataset", "tar"):
        raise ConfigError(f"writer must be 'webdataset' or 'tar', got {writer!r}")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def make_shards(out: str | Path, *, classes: int = 100, train_per_class: int = 30, val_per_class: int = 10,
                shard_size: int = 500, seed: int = 0, min_side: int = 48, max_side: int = 160,
                writer: Literal["webdataset", "tar"] = "webdataset", extra_per_class: int = 0,
                clutter: int = 5, textures: int = len(TEXTURES), shapes: int = len(SHAPES),
                rotation: float = 180.0) -> dict:
    """Write a synthetic dataset of `classes` classes as train and val tar shards under `out`.

    Samples of each split are in a seeded shuffled order across classes, `shard_size` per shard (the last
    shard may hold fewer). `writer="webdataset"` writes with `webdataset.TarWriter`; `writer="tar"` with
    Python's `tarfile` (GNU format, like `tar cf`). Shards are written as `NAME.tar.tmp` and renamed.
    Also writes `out/train.txt` and `out/val.txt` with one absolute shard path a line. `extra_per_class` > 0
    adds a third split, `out/extra` and `out/extra.txt`: more training images of the same classes, drawn like
    the train split but from their own seeds (a teacher may train on train + extra; students see train only).

    Returns {"train": [paths], "val": [paths], "classes", "train_samples", "val_samples"} (and "extra",
    "extra_samples" with an extra split).
    Raises ConfigError for invalid arguments, or when `out/train` or `out/val` exists and is not empty.
    """
    _check_args(classes, train_per_class, val_per_class, shard_size, seed, min_side, max_side, writer,
                extra_per_class, clutter, textures, shapes, rotation)
    splits = {"train": train_per_class, "val": val_per_class, **({"extra": extra_per_class} if extra_per_class else {})}
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    for split in splits:
        d = out / split
        if d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise ConfigError(f"{d} already exists and is not empty: pick another output folder or delete it")
    specs = class_specs(classes, seed, textures, shapes)
    write = _write_shard_webdataset if writer == "webdataset" else _write_shard_tar
    summary: dict = {"classes": classes}
    for split, per_class in splits.items():
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        order = [(c, j) for c in range(classes) for j in range(per_class)]
        perm = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], _ORDER_TAG])).permutation(len(order))
        order = [order[i] for i in perm.tolist()]
        paths = []
        for n, start in enumerate(range(0, len(order), shard_size)):
            samples = [encode_sample(specs[c], split, c, j, seed=seed, min_side=min_side, max_side=max_side,
                                     clutter=clutter, rotation=rotation)
                       for c, j in order[start:start + shard_size]]
            path = d / f"{split}-{n:06d}.tar"
            tmp = path.with_name(path.name + ".tmp")
            try:
                write(tmp, samples)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            paths.append(str(path))
        _atomic_write_text(out / f"{split}.txt", "".join(p + "\n" for p in paths))
        summary[split] = paths
        summary[f"{split}_samples"] = len(order)
    return summary
