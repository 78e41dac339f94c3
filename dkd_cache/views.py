"""Recorded augmentation: draw a view's crop box and flip reproducibly, and render it.

A view is (box, flip): box = (top, left, height, width) in source pixels, flip = horizontal flip.
It is drawn from a generator seeded by SHA-256 of (seed, view, key), so it depends on nothing but
those three values: not on worker count, rank count, shard order or any global RNG state.

`render` is the one function that turns (image bytes, box, flip, recipe) into the network's input;
dump, training and verify all call it, so the student sees bit for bit the tensor the teacher saw.
It returns uint8 (3, S, S); `normalize` turns a batch of those into float32 on the compute device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import re
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .errors import ConfigError

INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                  "nearest": InterpolationMode.NEAREST}
# Refuse images whose header declares more pixels than this (decompression bombs); ImageNet's largest is ~ 50 Mpx.
MAX_PIXELS = 178_956_970


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """The augmentation and preprocessing recipe; stored in the cache and read back by every stage."""

    image_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    interpolation: str = "bilinear"
    antialias: bool = True
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Augmentations beyond the crop (dkd_cache/augment.py draws, stores and renders them); every default is "off",
    # so a recipe stored before these fields existed reads back equal to a default Recipe.
    randaugment: str = ""         # "" off; "rand-m9-mstd0.5" (timm: -m magnitude 0..10, -n ops 1..3, -mstd, -p),
                                  # or "trivial" (TrivialAugmentWide)
    color_jitter: float = 0.0     # brightness, contrast, saturation factors uniform in [1-x, 1+x], random order
    random_erasing: float = 0.0   # probability of one erased box filled with uint8 noise
    mixup: float = 0.0            # Beta(alpha, alpha) alpha; 0 off
    cutmix: float = 0.0           # Beta(alpha, alpha) alpha; 0 off
    mix_prob: float = 1.0         # probability that a pair is mixed at all
    mix_switch_prob: float = 0.5  # with mixup and cutmix on: probability that a pair uses cutmix
    mix_window: int = 8           # pairs are drawn among this many consecutive shard positions (2..64, even)

    def __post_init__(self) -> None:
        parse_positive_int("image_size", self.image_size)
        lo, hi = self.scale
        if not (0 < lo <= hi <= 1):
            raise ConfigError(f"recipe.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ConfigError(f"recipe.ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if not (0 <= self.hflip <= 1):
            raise ConfigError(f"recipe.hflip is a probability in [0, 1], got {self.hflip}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"recipe.interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"recipe.mean and recipe.std need 3 values, std > 0; got {self.mean}, {self.std}")
        parse_randaugment(self.randaugment)
        for name, lo, hi in (("color_jitter", 0.0, 1.0), ("random_erasing", 0.0, 1.0), ("mixup", 0.0, 1e3),
                             ("cutmix", 0.0, 1e3), ("mix_prob", 0.0, 1.0), ("mix_switch_prob", 0.0, 1.0)):
            object.__setattr__(self, name, _parse_float_in(f"recipe.{name}", getattr(self, name), lo, hi))
        w = self.mix_window
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or not (2 <= w <= 64) or w % 2:
            raise ConfigError(f"recipe.mix_window must be an even integer in 2..64, got {w!r}")
        object.__setattr__(self, "mix_window", int(w))

    def to_dict(self) -> dict[str, Any]:
        """The recipe as stored; the augmentation fields only where they differ from their "off" defaults, so a
        recipe without augmentations is stored (and fingerprinted) exactly as before those fields existed."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
                if k not in _AUGMENT_DEFAULTS or v != _AUGMENT_DEFAULTS[k]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown recipe keys {sorted(unknown)}; known keys: {sorted(known)}")
        kw = {k: tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else v for k, v in d.items()}
        return cls(**kw)


_AUGMENT_DEFAULTS = {"randaugment": "", "color_jitter": 0.0, "random_erasing": 0.0, "mixup": 0.0, "cutmix": 0.0,
                     "mix_prob": 1.0, "mix_switch_prob": 0.5, "mix_window": 8}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RandAugmentSpec:
    """A parsed recipe.randaugment: `trivial` (TrivialAugmentWide, one op) or timm's RandAugment."""

    trivial: bool = False
    ops: int = 2                   # op slots per view (trivial: 1)
    magnitude: int = 0             # 0..10 (timm's level)
    magnitude_std: float = 0.0     # N(magnitude, std) per op, clipped to [0, 10]; inf: uniform in [0, magnitude]
    prob: float = 0.5              # per-slot apply probability


_RAND_KEYS = {"m": "magnitude 0..10", "n": "ops per view 1..3", "mstd": "magnitude noise std >= 0",
              "p": "per-op probability in [0, 1]"}


def parse_randaugment(text: Any) -> RandAugmentSpec | None:
    """recipe.randaugment -> its spec (None when off). timm's syntax: "rand-m9-mstd0.5-n2-p0.5" ("-m" required)."""
    allowed = ('"" (off), "trivial", or timm-style "rand-m<0..10>[-n<1..3>][-mstd<float>][-p<0..1>]", '
               'e.g. "rand-m9-mstd0.5"')
    if not isinstance(text, str):
        raise ConfigError(f"recipe.randaugment must be a string: {allowed}; got {text!r}")
    if text == "":
        return None
    if text == "trivial":
        return RandAugmentSpec(trivial=True, ops=1)
    parts = text.split("-")
    if parts[0] != "rand" or len(parts) < 2:
        raise ConfigError(f"recipe.randaugment must be {allowed}; got {text!r}")
    values: dict[str, str] = {}
    for part in parts[1:]:
        m = re.fullmatch(r"([a-z]+)([0-9].*|inf)", part)
        if m is None or m.group(1) not in _RAND_KEYS or m.group(1) in values:
            raise ConfigError(f"recipe.randaugment {text!r}: bad or repeated part {part!r}; known parts: "
                              f"{', '.join(f'-{k}<{v}>' for k, v in _RAND_KEYS.items())}")
        values[m.group(1)] = m.group(2)
    if "m" not in values:
        raise ConfigError(f"recipe.randaugment {text!r} lacks the magnitude: {allowed}")
    try:
        spec = RandAugmentSpec(magnitude=int(values["m"]), ops=int(values.get("n", 2)),
                               magnitude_std=float(values.get("mstd", 0.0)), prob=float(values.get("p", 0.5)))
    except ValueError:
        raise ConfigError(f"recipe.randaugment {text!r}: a value is not a number: {allowed}") from None
    if not (0 <= spec.magnitude <= 10 and 1 <= spec.ops <= 3 and spec.magnitude_std >= 0 and 0 <= spec.prob <= 1):
        raise ConfigError(f"recipe.randaugment {text!r}: out of range; {', '.join(f'-{k}: {v}' for k, v in _RAND_KEYS.items())}")
    return spec


def _parse_float_in(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not (lo <= float(value) <= hi):
        raise ConfigError(f"{name} must be a number in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def parse_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def view_rng(seed: int, view: int, key: str) -> np.random.Generator:
    """A generator that depends only on (seed, view, key), via SHA-256: stable across processes and machines."""
    digest = hashlib.sha256(f"dkd-cache/view/{seed}/{view}/{key}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def draw_view(seed: int, view: int, key: str, height: int, width: int, recipe: Recipe) -> tuple[int, int, int, int, bool]:
    """Draw (top, left, h, w, flip) with torchvision's RandomResizedCrop algorithm, fallback included."""
    rng = view_rng(seed, view, key)
    area = height * width
    log_ratio = (math.log(recipe.ratio[0]), math.log(recipe.ratio[1]))
    box = None
    for _ in range(10):
        target_area = area * rng.uniform(recipe.scale[0], recipe.scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            box = (top, left, h, w)
            break
    if box is None:  # fallback: central crop at the nearest allowed aspect ratio
        in_ratio = width / height
        if in_ratio < recipe.ratio[0]:
            w, h = width, int(round(width / recipe.ratio[0]))
        elif in_ratio > recipe.ratio[1]:
            h, w = height, int(round(height * recipe.ratio[1]))
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    flip = bool(rng.random() < recipe.hflip)
    return (*box, flip)


def image_size_of(data: bytes) -> tuple[int, int]:
    """(height, width) from the image header only; refuses decompression bombs before decoding.

    JPEG (the first frame header, the one libjpeg decodes) and PNG headers are read here, in a few microseconds;
    other formats, and headers this reader does not understand, go to PIL (~100 us per image)."""
    size = _jpeg_size(data) or _png_size(data)
    if size is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
        size = height, width
    height, width = size
    limit = min(MAX_PIXELS, Image.MAX_IMAGE_PIXELS or MAX_PIXELS)  # PIL's limit too, as when PIL read every header
    if width * height > limit:
        raise ValueError(f"image declares {width}x{height} pixels, more than the {limit} allowed "
                         "(a decompression bomb?)")
    if width <= 0 or height <= 0:
        raise ValueError(f"image declares an empty size {width}x{height}")
    return height, width


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT, JPG, DAC)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG's first frame header, walking the marker segments before it; None when the bytes
    are not a JPEG or the walk meets anything unexpected (PIL then reads the header, or refuses it)."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF:
            height, width = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            return (height, width) if height and width else None  # 0: height given later (DNL): PIL decides
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before it
            return None
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR chunk (always the first); None when the bytes are not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")


def decode(data: bytes) -> torch.Tensor:
    """Decode image bytes to uint8 RGB (3, H, W). Checks the header size first (bomb guard)."""
    height, width = image_size_of(data)
    img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    if img.shape[1:] != (height, width):
        raise ValueError(f"decoded size {tuple(img.shape[1:])} differs from the header's {(height, width)}")
    return img


def pixel_major(img: torch.Tensor) -> torch.Tensor:
    """The same uint8 (3, H, W) image, its pixels stored channel-interleaved (channels-last strides): torch's uint8
    resize works in that layout and otherwise converts every crop to it, so an image decoded once for several
    views is converted once here. The rendered pixels are identical either way (tests/test_views.py)."""
    return img.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def render_decoded(img: torch.Tensor, box: tuple[int, int, int, int], flip: bool, recipe: Recipe,
                   contiguous: bool = True) -> torch.Tensor:
    """Crop, resize to the recipe's size, flip: uint8 (3, S, S). `img` in either layout (pixel_major); the result
    contiguous, or with `contiguous=False` in whatever layout the resize gave (the caller copies it anyway)."""
    top, left, h, w = (int(x) for x in box)
    size = recipe.image_size
    if (recipe.interpolation == "bilinear" and img.dtype == torch.uint8 and img.device.type == "cpu"
            and _NATIVE_UINT8_BILINEAR and top >= 0 and left >= 0 and top + h <= img.shape[-2]
            and left + w <= img.shape[-1] and 0 < h and 0 < w and (h, w) != (size, size)):
        out = _resize_uint8_bilinear(img[:, top:top + h, left:left + w], size, recipe.antialias)
    else:
        out = F.resized_crop(img, top, left, h, w, [size, size], interpolation=INTERPOLATIONS[recipe.interpolation],
                             antialias=recipe.antialias)
    if flip:
        out = out.flip(-1)  # F.horizontal_flip of a tensor
    return out.contiguous() if contiguous else out


# torchvision's v2 resize runs torch's native uint8 kernel for bilinear on x86 CPUs with AVX2 (or AVX512); there
# render_decoded calls the same kernel with the same arguments itself: the pixels are identical (tests/test_views.py)
# and each view saves ~40 us of torchvision's Python dispatch (~13% of a view's crop and resize at 224 px).
_NATIVE_UINT8_BILINEAR = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _resize_uint8_bilinear(crop: torch.Tensor, size: int, antialias: bool) -> torch.Tensor:
    """uint8 (3, h, w) -> (3, size, size): torchvision's resize_image for uint8 bilinear on the CPU, its steps kept
    (a one-image batch; a channels-last input restrided so that the output stays channels-last, as it does)."""
    x = crop.unsqueeze(0)
    strides = x.stride()
    if x.is_contiguous(memory_format=torch.channels_last) and x.numel() != strides[0]:
        x = x.as_strided(x.shape, (x.numel(), *strides[1:]))
    out = torch.nn.functional.interpolate(x, size=[size, size], mode="bilinear", align_corners=False,
                                          antialias=antialias)
    return out[0]


def render(data: bytes, box: tuple[int, int, int, int], flip: bool, recipe: Recipe) -> torch.Tensor:
    """(image bytes, box, flip, recipe) -> uint8 (3, S, S): the single rendering path of every stage."""
    return render_decoded(decode(data), box, flip, recipe)


def center_crop(data: bytes, recipe: Recipe) -> torch.Tensor:
    """Evaluation view: resize the short side to S * 256/224, centre-crop S. uint8 (3, S, S)."""
    img = decode(data)
    size = recipe.image_size
    img = F.resize(img, [int(round(size * 256 / 224))], interpolation=INTERPOLATIONS[recipe.interpolation],
                   antialias=recipe.antialias)
    return F.center_crop(img, [size, size]).contiguous()


def normalize(batch: torch.Tensor, recipe: Recipe, channels_last: bool = True) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32 normalised, on batch's device; the same arithmetic in every stage."""
    mean = torch.tensor(recipe.mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(recipe.std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    x = (batch.to(torch.float32) / 255.0 - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
