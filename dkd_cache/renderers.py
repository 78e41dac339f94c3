"""Renderers: how a stored view (box, flip) of an image becomes the network's uint8 input. A named choice,
recorded in the cache, because two renderers give slightly different pixels for the same view.

    cpu     decode (torchvision.io, libjpeg-turbo) and crop + resize + flip (torchvision v2 on uint8, the recipe's
            interpolation and antialias) one view at a time in DataLoader workers: views.render_decoded.
            Every cache written before renderers were recorded used this one.
    device  decode in workers (on the CPU in this version: the GPU decoder plugs in at `decode_for_device`), then
            crop, resize and flip of a whole batch in one torchvision.ops.roi_align call on the compute device:
            float bilinear samples, `sampling_ratio` adaptive (each output pixel averages ceil(box/size)^2 samples
            spread over its footprint, an area filter when shrinking; one sample, plain bilinear, when enlarging),
            rounded to uint8. Bilinear only.

The resize kernel is part of the record (RendererInfo.cpu_capability, .resize): torch's native uint8 kernels run
bilinear only on hosts with AVX2 (or AVX512) or on ARM; elsewhere torchvision resizes bilinear views through float32
(uint8 -> float32, interpolate, round), which gives slightly other pixels. `resize_kernels` names the kernel each
interpolation runs with on this host; a cache names the one that produced it, inspect and verify show it, and verify
warns when the host it runs on would resize otherwise. Caches written before it was recorded say "not recorded".

A view's pixels depend only on (image bytes, box, flip, recipe, renderer, resize kernel). The device renderer pads each image of a
batch with one replicated row and column and zeros beyond: its samples reach at most one pixel past the box, so
they never read a neighbour's pixels or the zero padding, and the batch's composition cannot move a pixel.

Stream shapes (device renderer):
    worker:  bytes -> decoded uint8 (3, h, w) + box + flip            (loader / dump workers)
    main:    [decoded] -> Packed(flat uint8, shapes)                   (one transfer per group, one per batch)
    device:  Packed + boxes (B, 4) + flips (B,) -> uint8 (B, 3, S, S)  (render_batch: one roi_align call)
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from .errors import CacheMismatchError, ConfigError
from .transfer import shared_empty
from .views import Recipe, decode, render_decoded

RENDERERS = ("cpu", "device")
BACKENDS = {
    "cpu": "decode torchvision.io.decode_image (CPU); crop+resize+flip torchvision.transforms.v2 uint8, per view",
    "device": "decode torchvision.io.decode_image (CPU); crop+resize+flip torchvision.ops.roi_align float32 "
              "(adaptive sampling, aligned) per batch on the compute device, rounded to uint8",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RendererInfo:
    """The renderer a cache was dumped with: name, what it runs, the library versions it ran with, and the resize
    kernel that produced its pixels (the host's CPU capability and resize_kernels; None / empty: not recorded)."""

    name: str
    backend: str
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    cpu_capability: str | None = None  # torch.backends.cpu.get_cpu_capability() of the host that rendered
    resize: dict[str, str] = dataclasses.field(default_factory=dict)  # interpolation -> kernel (resize_kernels)

    def kernel(self, interpolation: str) -> str:
        """The resize kernel that rendered this interpolation's views, with the host's CPU capability."""
        if interpolation not in self.resize:
            return "not recorded (written before resize kernels were)"
        return f"{self.resize[interpolation]}; CPU capability {self.cpu_capability}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "backend": self.backend, "versions": dict(self.versions)}
        if self.cpu_capability is not None:  # an older record is written back as it was
            d.update(cpu_capability=self.cpu_capability, resize=dict(self.resize))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "RendererInfo":
        """A cache's record; None (a cache written before renderers were recorded) is the cpu renderer. The resize
        kernel may be absent (caches written before it was recorded)."""
        if d is None:
            return cls(name="cpu", backend=BACKENDS["cpu"] + " (not recorded: written before renderers were)")
        unknown = sorted(set(d) - {"name", "backend", "versions", "cpu_capability", "resize"})
        if unknown:
            raise ConfigError(f"renderer record has unknown keys {unknown}")
        parse_renderer(d.get("name"))
        cap, resize = d.get("cpu_capability"), d.get("resize", {})
        if cap is not None and not isinstance(cap, str):
            raise ConfigError(f"renderer cpu_capability must be a string, got {cap!r}")
        if not isinstance(resize, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in resize.items()):
            raise ConfigError(f"renderer resize must be a table of interpolation -> kernel, got {resize!r}")
        return cls(name=d["name"], backend=str(d.get("backend", "")), versions=dict(d.get("versions", {})),
                   cpu_capability=cap, resize=dict(resize))


UINT8_KERNEL = "uint8: torch's native uint8 kernel"
FLOAT_KERNEL = "float32: uint8 -> float32, interpolate, round to uint8"


def native_uint8_bilinear(capability: str, machine: str) -> bool:
    """Whether torch's uint8 bilinear kernel serves views on a host (torchvision's own rule, which views follows:
    x86 with AVX2 or AVX512, or ARM); elsewhere torchvision resizes bilinear through float32."""
    return capability in ("AVX2", "AVX512") or machine in ("aarch64", "arm64")


def resize_kernels(name: str, capability: str | None = None, machine: str | None = None) -> dict[str, str]:
    """The resize kernel of each interpolation for renderer `name` on a host (default: this one)."""
    parse_renderer(name)
    if name == "device":
        return {"bilinear": "float32: torchvision.ops.roi_align on the compute device, rounded to uint8"}
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    machine = platform.machine() if machine is None else machine
    return {"bilinear": UINT8_KERNEL if native_uint8_bilinear(capability, machine) else FLOAT_KERNEL,
            "bicubic": UINT8_KERNEL,  # torchvision keeps uint8 for bicubic on every CPU
            "nearest": "uint8: nearest neighbour (copies pixels)"}


def parse_renderer(name: Any) -> str:
    if name not in RENDERERS:
        raise ConfigError(f"renderer must be one of {list(RENDERERS)}, got {name!r}")
    return name


def renderer_info(name: str) -> RendererInfo:
    import torchvision

    parse_renderer(name)
    return RendererInfo(name=name, backend=BACKENDS[name],
                        versions={"torch": torch.__version__, "torchvision": torchvision.__version__},
                        cpu_capability=torch.backends.cpu.get_cpu_capability(), resize=resize_kernels(name))


def check_recipe(name: str, recipe: Recipe) -> None:
    """The device renderer is bilinear only."""
    if name == "device" and recipe.interpolation != "bilinear":
        raise ConfigError(f"the device renderer resizes bilinearly; the recipe asks for {recipe.interpolation!r}: "
                          "use --renderer cpu")


def choose_renderer(cache_renderer: RendererInfo, requested: str | None, allow_other: bool) -> str:
    """The cache's renderer unless another is requested; another needs an explicit allow (its pixels differ from
    those the teacher saw: `dkd-cache verify --renderer NAME` measures by how much)."""
    if requested is None or requested == cache_renderer.name:
        return cache_renderer.name
    parse_renderer(requested)
    if not allow_other:
        raise CacheMismatchError(f"the cache was rendered with the {cache_renderer.name!r} renderer, not "
                                 f"{requested!r}; the student would see other pixels than the teacher. Pass "
                                 f"--allow-other-renderer to train so anyway (measure the drift first with "
                                 f"dkd-cache verify --renderer {requested})")
    return requested


# ------------------------------------------------------------------------------------------------ packing
@dataclasses.dataclass(frozen=True)
class Packed:
    """Decoded images of several sizes in one tensor: one shared-memory transfer, one host-to-device copy."""

    flat: torch.Tensor  # uint8 (sum of 3 h w,)
    shapes: np.ndarray  # int64 (m, 2): h, w

    def __len__(self) -> int:
        return len(self.shapes)

    def offsets(self) -> np.ndarray:
        sizes = 3 * self.shapes[:, 0] * self.shapes[:, 1]
        return np.concatenate([[0], np.cumsum(sizes)])

    def unpack(self, flat: torch.Tensor | None = None) -> list[torch.Tensor]:
        flat = self.flat if flat is None else flat
        off = self.offsets()
        return [flat[int(off[i]):int(off[i + 1])].view(3, int(h), int(w)) for i, (h, w) in enumerate(self.shapes)]

    def slice(self, start: int, stop: int) -> "Packed":
        off = self.offsets()
        return Packed(self.flat[int(off[start]):int(off[stop])], self.shapes[start:stop])


def pack(images: Sequence[torch.Tensor]) -> Packed:
    shapes = np.array([[int(i.shape[1]), int(i.shape[2])] for i in images], np.int64).reshape(-1, 2)
    flat = torch.empty(int((3 * shapes[:, 0] * shapes[:, 1]).sum()), dtype=torch.uint8)
    _copy_into(flat, [i.reshape(-1) for i in images])
    return Packed(flat, shapes)


def concat(parts: Sequence[Packed], pin_memory: bool = False) -> Packed:
    """One Packed from several (a batch from group slices); numpy memcpy, no torch thread pool."""
    flat = torch.empty(sum(int(p.flat.numel()) for p in parts), dtype=torch.uint8, pin_memory=pin_memory)
    _copy_into(flat, [p.flat for p in parts])
    return Packed(flat, np.concatenate([p.shapes for p in parts]).reshape(-1, 2))


def transfer_buffer(shape: Sequence[int], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An empty tensor to fill in a DataLoader worker and hand to the main process: in shared memory from the
    start (as torch's default_collate does), so that handing it over does not copy it there; elsewhere plain."""
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    return shared_empty(shape, dtype)


def stack(images: Sequence[torch.Tensor], pin_memory: bool = False) -> torch.Tensor:
    """torch.stack of same-shaped uint8 images into fresh (pinned) memory with numpy's memcpy: a torch copy in
    the main process wakes the intra-op thread pool, which stalls while DataLoader workers hold the cores."""
    out = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype, pin_memory=pin_memory)
    _copy_into(out.view(-1), [i.reshape(-1) for i in images])
    return out


def _copy_into(dst: torch.Tensor, parts: Sequence[torch.Tensor]) -> None:
    out, at = dst.numpy(), 0
    for p in parts:
        n = int(p.numel())
        np.copyto(out[at:at + n], p.numpy())
        at += n


# ------------------------------------------------------------------------------------------------ rendering
def decode_for_device(data: bytes) -> torch.Tensor:
    """The device renderer's decode step: uint8 (3, H, W). CPU (libjpeg-turbo) here; a GPU decoder replaces it."""
    return decode(data)


def render_batch(images: Packed | Sequence[torch.Tensor], boxes: torch.Tensor | np.ndarray,
                 flips: torch.Tensor | np.ndarray, recipe: Recipe, device: torch.device | str,
                 size: int | None = None) -> torch.Tensor:
    """The device renderer: decoded images + boxes (B, 4: top, left, h, w) + flips (B,) -> uint8 (B, 3, S, S) on
    `device`, with one roi_align call for the batch."""
    from torchvision.ops import roi_align

    check_recipe("device", recipe)
    device = torch.device(device)
    size = size or recipe.image_size
    if isinstance(images, Packed):
        flat = images.flat.to(device, non_blocking=True)
        imgs = images.unpack(flat)
    else:
        imgs = [i.to(device, non_blocking=True) for i in images]
    n = len(imgs)
    boxes = torch.as_tensor(np.ascontiguousarray(boxes, dtype=np.float32) if not torch.is_tensor(boxes) else boxes,
                            dtype=torch.float32).reshape(n, 4)
    flips = torch.as_tensor(np.ascontiguousarray(flips) if not torch.is_tensor(flips) else flips
                            ).reshape(n).to(torch.bool)
    if n == 0:
        return torch.empty((0, 3, size, size), dtype=torch.uint8, device=device)
    hmax = max(int(i.shape[1]) for i in imgs) + 1
    wmax = max(int(i.shape[2]) for i in imgs) + 1
    canvas = torch.zeros((n, 3, hmax, wmax), dtype=torch.float32, device=device)
    for k, img in enumerate(imgs):  # the image, then one replicated row and column
        h, w = int(img.shape[1]), int(img.shape[2])
        canvas[k, :, :h, :w] = img
        canvas[k, :, h, :w] = canvas[k, :, h - 1, :w]
        canvas[k, :, :h + 1, w] = canvas[k, :, :h + 1, w - 1]
    top, left, bh, bw = boxes.unbind(1)
    rois = torch.stack([torch.arange(n, dtype=torch.float32), left, top, left + bw, top + bh], 1).to(device)
    out = roi_align(canvas, rois, output_size=(size, size), spatial_scale=1.0,
                    sampling_ratio=-1 if recipe.antialias else 1, aligned=True)
    out = torch.where(flips.to(device)[:, None, None, None], out.flip(-1), out)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def render_views(name: str, data: Sequence[bytes], boxes: np.ndarray, flips: np.ndarray, recipe: Recipe,
                 device: torch.device | str = "cpu", size: int | None = None) -> torch.Tensor:
    """(bytes, box, flip) of each view -> uint8 (B, 3, S, S) on `device`, with renderer `name` (verify, tests)."""
    parse_renderer(name)
    size = size or recipe.image_size
    if name == "device":
        return render_batch([decode_for_device(d) for d in data], boxes, flips, recipe, device, size)
    at_size = dataclasses.replace(recipe, image_size=size)
    out = [render_decoded(decode(d), tuple(int(x) for x in b), bool(f), at_size) for d, b, f in zip(data, boxes, flips)]
    stacked = torch.stack(out) if out else torch.empty((0, 3, size, size), dtype=torch.uint8)
    return stacked.to(device)


def to_device(images: torch.Tensor | Packed, entries: dict[str, torch.Tensor], recipe: Recipe,
              device: torch.device | str, size: int | None = None) -> torch.Tensor:
    """A loader batch's pixels on the compute device, uint8 (B, 3, S, S): rendered views are copied
    (non-blocking from pinned memory); decoded images (device renderer) are rendered there from the batch's
    stored boxes and flips."""
    if isinstance(images, Packed):
        return render_batch(images, entries["views/box"], entries["views/flip"], recipe, device, size)
    return images.to(device, non_blocking=True)
