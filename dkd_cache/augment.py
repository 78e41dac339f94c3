"""Recorded augmentation beyond the crop: RandAugment / TrivialAugmentWide, colour jitter, random erasing (one view's
pixels), mixup and cutmix (a pair of views). Design: /work/notes/aug_design.md, sections 1-2 (issue 24).

Every parameter is drawn from a numpy Generator seeded by SHA-256 of the view's identity (never global RNG state,
never hash()), quantised to small integer codes, and stored packed in the cache's `views/aug` row; rendering is a
pure function of those codes, so the dump, training and verify see the same uint8 pixels bit for bit.

    draw_augment(seed, view, key, recipe) -> ViewAugment     one sample's view: ops, jitter, erasing
    draw_mixes(seed, view, shard, window, count, recipe)     one mix window's pairs: [ViewMix per position]
    pack / unpack                                            ViewAugment + ViewMix <-> uint8 (record_bytes,) row
    render_view(img, box, flip, aug, recipe)                 views.render_decoded, then apply_augment
    apply_mix(own, partner, mix)                             the pair's mixed pixels

Record layout (little-endian; only the sections the recipe enables, in this order):
    byte 0      flags: bit0 randaugment section, bit1 jitter, bit2 erase applied, bits 3-4 mix mode (never 255)
    randaugment n x (op uint8, magnitude int8)
    jitter      3 x uint8 codes + 1 byte order
    erasing     4 x uint16 box + uint16 fill seed (zeros when not applied)
    mix         int8 partner offset, uint16 lam_code, 4 x uint16 box
Fractions of the image side are uint16 codes; at size S a code is round(code * S / 65535) pixels, rounding halves
up (integer arithmetic, `pixels`).

Names and signatures are the design's. Beyond it: OPS = RAND_OPS (timm's RandAugment list) + WIDE_OPS
(TrivialAugmentWide's, prefixed "Wide": their magnitude code is a signed bin index 0..30, not a level); SKIPPED (255);
helpers pixels, jitter_factors, erase_fill; views.parse_randaugment parses recipe.randaugment. A cutmix ViewMix's
lam_code holds the drawn lam (its lam(size) is the box's, as the design says). Recipe.to_dict leaves out the
augmentation fields that are at their "off" defaults, so old recipes store and fingerprint exactly as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from . import views
from .errors import CacheError, ConfigError
from .views import Recipe

# The op table. RandAugment's ops and their magnitude -> argument mapping follow timm's auto_augment.py
# (_RAND_TRANSFORMS, LEVEL_TO_ARG, _LEVEL_DENOM = 10: rotate 30 deg, shear 0.3, translate 0.45 of the side, enhance
# (m/10)*1.8+0.1, posterize int(m/10*4) bits, solarize threshold int(m/10*256), solarize-add int(m/10*110) below
# 128; rotate, shear and translate get a random sign). Their magnitude code is the level in tenths (0..100, signed).
# TrivialAugmentWide's ops ("Wide...") follow torchvision's TrivialAugmentWide._augmentation_space with 31 bins;
# their magnitude code is the signed bin index (-30..30). Geometric ops use NEAREST and fill (128, 128, 128) as timm.
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
WIDE_OPS = ("WideIdentity", "WideShearX", "WideShearY", "WideTranslateX", "WideTranslateY", "WideRotate",
            "WideBrightness", "WideColor", "WideContrast", "WideSharpness", "WidePosterize", "WideSolarize",
            "WideAutoContrast", "WideEqualize")
OPS = RAND_OPS + WIDE_OPS
SKIPPED = 255          # op code of a slot whose op was not applied
WIDE_BINS = 31
_SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "WideShearX", "WideShearY",
           "WideTranslateX", "WideTranslateY", "WideRotate", "WideBrightness", "WideColor", "WideContrast",
           "WideSharpness"}
_FILL = [128.0, 128.0, 128.0]
_NEAREST = InterpolationMode.NEAREST
JITTER_ORDERS = tuple(itertools.permutations(range(3)))  # (brightness, contrast, saturation) = (0, 1, 2)
U16 = 65535


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViewAugment:
    """One view's per-sample parameters, as stored (quantised codes: a pack/unpack round trip is exact)."""

    ops: tuple[tuple[int, int], ...] = ()         # (op index into OPS or 255 = not applied, signed magnitude code)
    jitter: tuple[int, int, int] | None = None    # brightness, contrast, saturation codes 0..255:
                                                  # factor = 1 + color_jitter * (code / 127.5 - 1)
    jitter_order: int = 0                         # index into JITTER_ORDERS
    erase: tuple[int, int, int, int] | None = None  # top, left, h, w as uint16 fractions of the side
    erase_seed: int = 0                           # uint16; the fill's noise generator's seed


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViewMix:
    """One row's pairing: its partner's shard position, the mode and the mix's lam / cutmix box."""

    partner: int                                   # shard position of the partner; own position when not mixed
    mode: int                                      # 0 none, 1 mixup, 2 cutmix
    lam_code: int = U16                            # lam = lam_code / 65535 (cutmix: the drawn lam, before clipping)
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # cutmix: y0, x0, y1, x1 as uint16 fractions of the side

    def lam(self, size: int) -> float:
        """The weight of the row's own label: mixup lam_code / 65535; cutmix 1 - (box area at size S) / S^2, the
        box as apply_mix renders it; none 1.0."""
        if self.mode == 1:
            return self.lam_code / U16
        if self.mode == 2:
            y0, x0, y1, x1 = (pixels(c, size) for c in self.box)
            return 1.0 - (y1 - y0) * (x1 - x0) / (size * size)
        return 1.0


def pixels(code: int, size: int) -> int:
    """A uint16 fraction of the side in pixels at `size`: round(code * size / 65535), halves up, exact."""
    return (int(code) * int(size) * 2 + U16) // (2 * U16)


def _rng(stream: str) -> np.random.Generator:
    digest = hashlib.sha256(stream.encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


# --- what a recipe enables ------------------------------------------------------------------------------------------

def augments(recipe: Recipe) -> bool:
    """Whether the recipe has any per-sample op (randaugment, colour jitter, random erasing)."""
    return bool(recipe.randaugment) or recipe.color_jitter > 0 or recipe.random_erasing > 0


def mixes(recipe: Recipe) -> bool:
    """Whether the recipe mixes pairs (mixup or cutmix on)."""
    return recipe.mixup > 0 or recipe.cutmix > 0


def _op_slots(recipe: Recipe) -> int:
    spec = views.parse_randaugment(recipe.randaugment)
    return 0 if spec is None else spec.ops


def record_bytes(recipe: Recipe) -> int:
    """Bytes of a view's packed record: 0 when the recipe neither augments nor mixes; at most 32."""
    if not augments(recipe) and not mixes(recipe):
        return 0
    n = (1 + 2 * _op_slots(recipe) + (4 if recipe.color_jitter > 0 else 0)
         + (10 if recipe.random_erasing > 0 else 0) + (11 if mixes(recipe) else 0))
    if n > 32:
        raise ConfigError(f"recipe's augmentation record takes {n} bytes per view, more than the 32 allowed; "
                          "use fewer randaugment ops (-n)")
    return n


def window_of(pos: int, recipe: Recipe) -> int:
    """The mix window of shard position `pos`."""
    return pos // recipe.mix_window


# --- drawing --------------------------------------------------------------------------------------------------------

def draw_augment(seed: int, view: int, key: str, recipe: Recipe) -> ViewAugment:
    """One view's per-sample parameters from its own SHA-256 stream (views.draw_view's stream is untouched).
    Each section draws a fixed number of values, so one section's outcome never shifts another's."""
    rng = _rng(f"dkd-cache/augment/{seed}/{view}/{key}")
    spec = views.parse_randaugment(recipe.randaugment)
    ops: tuple[tuple[int, int], ...] = ()
    if spec is not None and spec.trivial:  # torchvision's TrivialAugmentWide: one op, a uniform bin, a sign
        op, mag_bin, negate = int(rng.integers(len(WIDE_OPS))), int(rng.integers(WIDE_BINS)), rng.random() < 0.5
        name = WIDE_OPS[op]
        ops = ((len(RAND_OPS) + op, -mag_bin if negate and name in _SIGNED else mag_bin),)
    elif spec is not None:  # timm's RandAugment: n ops with replacement, each applied with probability p
        slots = []
        for _ in range(spec.ops):
            op, applied = int(rng.integers(len(RAND_OPS))), rng.random() < spec.prob
            if math.isinf(spec.magnitude_std):  # timm: mstd inf draws the level uniformly in [0, m]
                level = rng.uniform(0, spec.magnitude)
            else:
                level = rng.normal(spec.magnitude, spec.magnitude_std) if spec.magnitude_std > 0 else spec.magnitude
            code = int(np.rint(min(max(float(level), 0.0), 10.0) * 10))
            negate = rng.random() < 0.5
            if not applied:
                slots.append((SKIPPED, 0))
            else:
                slots.append((op, -code if negate and RAND_OPS[op] in _SIGNED else code))
        ops = tuple(slots)
    jitter, order = None, 0
    if recipe.color_jitter > 0:
        jitter = tuple(int(c) for c in rng.integers(0, 256, size=3))
        order = int(rng.integers(len(JITTER_ORDERS)))
    erase, erase_seed = None, 0
    if recipe.random_erasing > 0 and rng.random() < recipe.random_erasing:
        erase, erase_seed = _draw_erase(rng), int(rng.integers(0, U16 + 1))
        if erase is None:
            erase_seed = 0
    return ViewAugment(ops=ops, jitter=jitter, jitter_order=order, erase=erase, erase_seed=erase_seed)


def _draw_erase(rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    """timm's RandomErasing box (area 0.02..1/3 of the image, log-uniform aspect 0.3..1/0.3, 10 tries), in
    fractions of the side; None when no try fits."""
    for _ in range(10):
        area = rng.uniform(0.02, 1 / 3)
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        h, w = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if h < 1 and w < 1:
            top, left = rng.uniform(0, 1 - h), rng.uniform(0, 1 - w)
            return (int(round(top * U16)), int(round(left * U16)), int(round(h * U16)), int(round(w * U16)))
    return None


def draw_mixes(seed: int, view: int, shard_name: str, window: int, count: int, recipe: Recipe) -> list[ViewMix]:
    """The pairs of mix window `window` (shard positions window*W .. window*W+count-1): a permutation of the
    positions paired (perm[0], perm[1]), (perm[2], perm[3]), ...; an odd one out is not mixed. One ViewMix per
    position, in position order; both rows of a pair share mode, lam_code and box and name each other."""
    W = recipe.mix_window
    if not (1 <= count <= W):
        raise ValueError(f"a mix window holds 1..{W} positions, got count={count}")
    start = window * W
    out = [ViewMix(partner=start + i, mode=0) for i in range(count)]
    if not mixes(recipe):
        return out
    rng = _rng(f"dkd-cache/mix/{seed}/{view}/{shard_name}/{window}")
    perm = rng.permutation(count)
    for a, b in zip(perm[0::2], perm[1::2]):
        # the same draws for every pair (mixed?, cutmix?, lam, box centre), whatever their outcome
        mixed, switch = rng.random() < recipe.mix_prob, rng.random() < recipe.mix_switch_prob
        use_cutmix = recipe.cutmix > 0 and (recipe.mixup <= 0 or switch)
        alpha = recipe.cutmix if use_cutmix else recipe.mixup
        lam = float(rng.beta(alpha, alpha))
        cy, cx = rng.random(), rng.random()
        if not mixed:
            continue
        box = (0, 0, 0, 0)
        if use_cutmix:  # timm's rand_bbox in fractions: side sqrt(1 - lam), centre uniform, clipped to the image
            half = math.sqrt(1.0 - lam) / 2
            box = tuple(int(round(min(max(v, 0.0), 1.0) * U16)) for v in (cy - half, cx - half, cy + half, cx + half))
        lam_code = int(round(lam * U16))
        mode = 2 if use_cutmix else 1
        out[a] = ViewMix(partner=start + int(b), mode=mode, lam_code=lam_code, box=box)
        out[b] = ViewMix(partner=start + int(a), mode=mode, lam_code=lam_code, box=box)
    return out


# --- the packed record ----------------------------------------------------------------------------------------------

def pack(aug: ViewAugment, mix: ViewMix | None, pos: int, recipe: Recipe) -> np.ndarray:
    """One view's record: uint8 (record_bytes(recipe),). `pos` is the row's own shard position (the partner is
    stored as an int8 offset from it)."""
    n = record_bytes(recipe)
    if n == 0:
        return np.zeros(0, np.uint8)
    out = bytearray([0])
    slots = _op_slots(recipe)
    if slots:
        if len(aug.ops) != slots:
            raise ValueError(f"the recipe has {slots} op slot(s), the augment {len(aug.ops)}")
        out[0] |= 1
        for op, mag in aug.ops:
            out += int(op).to_bytes(1, "little") + int(mag).to_bytes(1, "little", signed=True)
    if recipe.color_jitter > 0:
        if aug.jitter is None:
            raise ValueError("the recipe has colour jitter, the augment no jitter codes")
        out[0] |= 2
        out += bytes(aug.jitter) + bytes([aug.jitter_order])
    if recipe.random_erasing > 0:
        if aug.erase is not None:
            out[0] |= 4
        out += b"".join(int(v).to_bytes(2, "little") for v in (*(aug.erase or (0, 0, 0, 0)), aug.erase_seed))
    if mixes(recipe):
        if mix is None:
            raise ValueError("the recipe mixes: pack needs the row's ViewMix")
        out[0] |= mix.mode << 3
        out += int(mix.partner - pos).to_bytes(1, "little", signed=True)
        out += b"".join(int(v).to_bytes(2, "little") for v in (mix.lam_code, *mix.box))
    elif mix is not None:
        raise ValueError("the recipe does not mix: pack takes mix=None")
    return np.frombuffer(bytes(out), np.uint8).copy()


def unpack(record: np.ndarray, pos: int, recipe: Recipe) -> tuple[ViewAugment, ViewMix | None]:
    """A stored record back to (ViewAugment, ViewMix or None when the recipe does not mix); `pos` the row's own
    shard position. Raises CacheError for an unfilled row (byte 0 is 255) or codes no pack writes."""
    raw = bytes(np.asarray(record, np.uint8).reshape(-1))
    n = record_bytes(recipe)
    if len(raw) != n:
        raise CacheError(f"views/aug row at position {pos} has {len(raw)} bytes, the recipe's record {n}")
    if n == 0:
        return ViewAugment(), None
    flags = raw[0]
    if flags == 255:
        raise CacheError(f"views/aug row at position {pos} was never written (byte 0 is the fill value 255)")
    want = (1 if _op_slots(recipe) else 0) | (2 if recipe.color_jitter > 0 else 0)
    if flags & 3 != want or (flags & 4 and recipe.random_erasing <= 0) or flags >> 5 or (flags >> 3) & 3 == 3 \
            or ((flags >> 3) & 3 and not mixes(recipe)):
        raise CacheError(f"views/aug row at position {pos}: flags {flags:#04x} do not match the recipe")
    i, ops = 1, []
    for _ in range(_op_slots(recipe)):
        op, mag = raw[i], int.from_bytes(raw[i + 1:i + 2], "little", signed=True)
        if op != SKIPPED and op >= len(OPS):
            raise CacheError(f"views/aug row at position {pos}: op code {op} is not one of the {len(OPS)} ops")
        ops.append((op, mag))
        i += 2
    jitter, order = None, 0
    if recipe.color_jitter > 0:
        jitter, order = tuple(raw[i:i + 3]), raw[i + 3]
        i += 4
        if order >= len(JITTER_ORDERS):
            raise CacheError(f"views/aug row at position {pos}: jitter order {order} is not below 6")
    erase, erase_seed = None, 0
    if recipe.random_erasing > 0:
        vals = [int.from_bytes(raw[i + 2 * k:i + 2 * k + 2], "little") for k in range(5)]
        i += 10
        if flags & 4:
            erase, erase_seed = tuple(vals[:4]), vals[4]
    aug = ViewAugment(ops=tuple(ops), jitter=jitter, jitter_order=order, erase=erase, erase_seed=erase_seed)
    if not mixes(recipe):
        return aug, None
    offset = int.from_bytes(raw[i:i + 1], "little", signed=True)
    if window_of(pos + offset, recipe) != window_of(pos, recipe) or ((flags >> 3) & 3 == 0) != (offset == 0):
        raise CacheError(f"views/aug row at position {pos}: partner offset {offset} is not in the row's mix window "
                         f"of {recipe.mix_window} (or does not match its mix mode)")
    lam_code, *box = (int.from_bytes(raw[i + 1 + 2 * k:i + 3 + 2 * k], "little") for k in range(5))
    return aug, ViewMix(partner=pos + offset, mode=(flags >> 3) & 3, lam_code=lam_code, box=tuple(box))


# --- rendering ------------------------------------------------------------------------------------------------------

def _apply_op(img: torch.Tensor, name: str, code: int) -> torch.Tensor:
    """One op on uint8 (3, H, W). RandAugment ops: code = signed level in tenths; Wide ops: signed bin index."""
    sign = -1.0 if code < 0 else 1.0
    level = abs(code) / 100  # RandAugment: level / _LEVEL_DENOM, in [0, 1]
    side = img.shape[-1]
    if name.startswith("Wide"):
        name, b = name[4:], abs(code)
        if name == "Identity":
            return img
        if name in ("ShearX", "ShearY"):
            return _shear(img, name, sign * _wide_bin(0.99, b))
        if name in ("TranslateX", "TranslateY"):
            return _translate(img, name, int(sign * _wide_bin(32.0, b)))
        if name == "Rotate":
            return F.rotate(img, sign * _wide_bin(135.0, b), interpolation=_NEAREST, fill=_FILL)
        if name in ("Brightness", "Color", "Contrast", "Sharpness"):
            return _enhance(img, name, 1.0 + sign * _wide_bin(0.99, b))
        if name == "Posterize":  # torchvision: 8 - (arange(31) / (30 / 6)).round()
            return _posterize(img, int(8 - (torch.arange(WIDE_BINS) / ((WIDE_BINS - 1) / 6)).round().int()[b]))
        if name == "Solarize":
            return _solarize(img, float(torch.linspace(255.0, 0.0, WIDE_BINS)[b]))
        if name in ("AutoContrast", "Equalize"):
            return _apply_op(img, name, 0)
        raise ValueError(f"unknown op {name!r}")
    if name == "AutoContrast":
        return F.autocontrast(img)
    if name == "Equalize":
        return F.equalize(img)
    if name == "Invert":
        return F.invert(img)
    if name == "Rotate":
        return F.rotate(img, sign * level * 30.0, interpolation=_NEAREST, fill=_FILL)
    if name == "Posterize":
        return _posterize(img, abs(code) * 4 // 100)
    if name == "Solarize":
        return _solarize(img, abs(code) * 256 // 100)
    if name == "SolarizeAdd":
        add = abs(code) * 110 // 100  # timm adds below 128 and clips at 255: 127 + 110 never reaches it
        return torch.where(img < 128, img + add, img)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return _enhance(img, name, level * 1.8 + 0.1)
    if name in ("ShearX", "ShearY"):
        return _shear(img, name, sign * level * 0.3)
    if name in ("TranslateXRel", "TranslateYRel"):
        return _translate(img, name[:-3], -sign * level * 0.45 * side)  # PIL's affine data: a positive one moves left
    raise ValueError(f"unknown op {name!r}")


def _wide_bin(top: float, b: int) -> float:
    """torchvision's TrivialAugmentWide magnitude of bin b: float(torch.linspace(0, top, 31)[b]), its float32
    rounding included (int() of a translation depends on it)."""
    return float(torch.linspace(0.0, top, WIDE_BINS)[b])


def _shear(img: torch.Tensor, name: str, factor: float) -> torch.Tensor:
    # about the top-left corner as PIL's transform (and torchvision's _apply_op) do
    angle = math.degrees(math.atan(factor))
    shear = [angle, 0.0] if name == "ShearX" else [0.0, angle]
    return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=_NEAREST, fill=_FILL,
                    center=[0, 0])


def _translate(img: torch.Tensor, name: str, amount: float) -> torch.Tensor:
    translate = [amount, 0.0] if name == "TranslateX" else [0.0, amount]
    return F.affine(img, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0], interpolation=_NEAREST,
                    fill=_FILL)


def _enhance(img: torch.Tensor, name: str, factor: float) -> torch.Tensor:
    fn = {"Color": F.adjust_saturation, "Contrast": _adjust_contrast, "Brightness": F.adjust_brightness,
          "Sharpness": F.adjust_sharpness}[name]
    return fn(img, factor)


def _adjust_contrast(img: torch.Tensor, factor: float) -> torch.Tensor:
    """F.adjust_contrast of a uint8 RGB image, its grey mean summed exactly (int64): torch's float32 sum of a large
    image depends on the number of threads, and so would the pixels. Identical to F.adjust_contrast whenever its
    float32 sum is exact (images up to 256 x 256 px)."""
    r, g, b = img.unbind(-3)
    grey = r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_()  # torchvision's _rgb_to_grayscale
    mean = torch.tensor(grey.to(torch.int64).sum().item() / grey.numel(), dtype=torch.float32)
    return img.mul(float(factor)).add_(mean, alpha=1.0 - float(factor)).clamp_(0, 255).to(torch.uint8)  # _blend


def _posterize(img: torch.Tensor, bits: int) -> torch.Tensor:
    if bits >= 8:
        return img
    return img & ((0xFF << (8 - bits)) & 0xFF)  # keep the top `bits` bits (0: black), as PIL's posterize


def _solarize(img: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(img >= threshold, 255 - img, img)  # a threshold above 255 leaves the image as it is


def jitter_factors(aug: ViewAugment, recipe: Recipe) -> tuple[float, float, float]:
    """(brightness, contrast, saturation) factors of a view's jitter codes."""
    return tuple(max(0.0, 1.0 + recipe.color_jitter * (c / 127.5 - 1.0)) for c in aug.jitter)


def erase_fill(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The erased box's uint8 noise: PCG64 seeded via SHA-256 of ("dkd-cache/erase", seed)."""
    noise = _rng(f"dkd-cache/erase/{seed}").integers(0, 256, size=shape, dtype=np.uint8)
    return torch.from_numpy(noise)


def apply_augment(img: torch.Tensor, aug: ViewAugment, recipe: Recipe) -> torch.Tensor:
    """uint8 (3, S, S) -> uint8 (3, S, S): the ops in order, then colour jitter, then random erasing."""
    out = img
    for op, code in aug.ops:
        if op != SKIPPED:
            out = _apply_op(out, OPS[op], code)
    if aug.jitter is not None and recipe.color_jitter > 0:
        factors = jitter_factors(aug, recipe)
        adjust = (F.adjust_brightness, _adjust_contrast, F.adjust_saturation)
        for k in JITTER_ORDERS[aug.jitter_order]:
            out = adjust[k](out, factors[k])
    if aug.erase is not None:
        height, width = out.shape[-2:]
        top, left, h, w = (pixels(c, s) for c, s in zip(aug.erase, (height, width, height, width)))
        h, w = min(h, height - top), min(w, width - left)
        if h > 0 and w > 0:
            out = out.clone() if out is img else out
            out[:, top:top + h, left:left + w] = erase_fill(aug.erase_seed, (out.shape[0], h, w))
    return out


def render_view(img: torch.Tensor, box: tuple[int, int, int, int], flip: bool, aug: ViewAugment | None,
                recipe: Recipe, contiguous: bool = True) -> torch.Tensor:
    """THE per-sample rendering of dump, training and verify: views.render_decoded, then apply_augment. With aug
    None or a recipe without augments it is render_decoded alone, bit for bit."""
    out = views.render_decoded(img, box, flip, recipe, contiguous=contiguous)
    if aug is None or not augments(recipe):
        return out
    out = apply_augment(out, aug, recipe)
    return out.contiguous() if contiguous else out


def apply_mix(own: torch.Tensor, partner: torch.Tensor, mix: ViewMix) -> torch.Tensor:
    """uint8 (3, S, S): mixup round(lam * own + (1 - lam) * partner) in float32, clamped; cutmix own with the box
    (at this size) taken from partner; none: own."""
    if mix.mode == 1:
        lam = torch.tensor(mix.lam_code / U16, dtype=torch.float32)
        mixed = own.to(torch.float32) * lam + partner.to(torch.float32) * (1 - lam)
        return mixed.round().clamp(0, 255).to(torch.uint8)
    if mix.mode == 2:
        size = own.shape[-1]
        y0, x0, y1, x1 = (pixels(c, size) for c in mix.box)
        out = own.clone()
        out[:, y0:y1, x0:x1] = partner[:, y0:y1, x0:x1]
        return out
    return own
