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
    gpu     workers decode nothing: they read the tar, parse, check the image header (views.image_size_of) and draw
            the views, then send each sample's compressed bytes with its boxes and flips (tens of us per image).
            The main process decodes whole batches on the compute device (gpu_decode: nvImageCodec's hardware
            JPEG decoder on CUDA, the CPU decoder views.decode elsewhere) and renders them as the device renderer
            does (render_batch): given the same decoded images, its pixels are the device renderer's, bit for bit.
            The decoder is part of the record (RendererInfo.decoder). Bilinear only.

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
Stream shapes (gpu renderer):
    worker:  bytes -> Compressed(bytes, name) + box + flip           (header read, views drawn; no decode)
    main:    [Compressed] -> Encoded(flat bytes, lengths, index)       (one transfer per group, one per batch)
    device:  Encoded -> decoder -> [decoded] -> render_batch -> uint8 (B, 3, S, S)      (to_device / dump)
render_batch builds its float canvas with one gather of rows from the images' flat memory (no per-image loop), at most
CANVAS_ELEMENTS per roi_align call: a batch with a very large image is cut into several calls, which cannot move
a pixel (each view reads only its own image, at most one pixel past its box).
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from . import augment, gpu_decode
from .errors import BadSampleError, CacheMismatchError, ConfigError
from .transfer import shared_empty
from .views import Recipe, decode, render_decoded

RENDERERS = ("cpu", "device", "gpu")
BATCHED = ("device", "gpu")  # the renderers that crop, resize and flip whole batches with render_batch
BACKENDS = {
    "cpu": "decode torchvision.io.decode_image (CPU); crop+resize+flip torchvision.transforms.v2 uint8, per view",
    "device": "decode torchvision.io.decode_image (CPU); crop+resize+flip torchvision.ops.roi_align float32 "
              "(adaptive sampling, aligned) per batch on the compute device, rounded to uint8",
    "gpu": "workers send compressed bytes; decode per batch in the main process (gpu_decode: nvImageCodec's "
           "hardware JPEG decoder on CUDA, other members on the CPU; torchvision.io.decode_image on a CPU device); "
           "crop+resize+flip torchvision.ops.roi_align float32 per batch on the compute device, rounded to uint8",
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
    decoder: str | None = None  # gpu renderer: the decoder (gpu_decode.decoder_name); None for the others

    def kernel(self, interpolation: str) -> str:
        """The resize kernel that rendered this interpolation's views, with the host's CPU capability."""
        if interpolation not in self.resize:
            return "not recorded (written before resize kernels were)"
        return f"{self.resize[interpolation]}; CPU capability {self.cpu_capability}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "backend": self.backend, "versions": dict(self.versions)}
        if self.cpu_capability is not None:  # an older record is written back as it was
            d.update(cpu_capability=self.cpu_capability, resize=dict(self.resize))
        if self.decoder is not None:
            d["decoder"] = self.decoder
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "RendererInfo":
        """A cache's record; None (a cache written before renderers were recorded) is the cpu renderer. The resize
        kernel may be absent (caches written before it was recorded)."""
        if d is None:
            return cls(name="cpu", backend=BACKENDS["cpu"] + " (not recorded: written before renderers were)")
        unknown = sorted(set(d) - {"name", "backend", "versions", "cpu_capability", "resize", "decoder"})
        if unknown:
            raise ConfigError(f"renderer record has unknown keys {unknown}")
        parse_renderer(d.get("name"))
        cap, resize = d.get("cpu_capability"), d.get("resize", {})
        if cap is not None and not isinstance(cap, str):
            raise ConfigError(f"renderer cpu_capability must be a string, got {cap!r}")
        if not isinstance(resize, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in resize.items()):
            raise ConfigError(f"renderer resize must be a table of interpolation -> kernel, got {resize!r}")
        decoder = d.get("decoder")
        if decoder is not None and not isinstance(decoder, str):
            raise ConfigError(f"renderer decoder must be a string, got {decoder!r}")
        return cls(name=d["name"], backend=str(d.get("backend", "")), versions=dict(d.get("versions", {})),
                   cpu_capability=cap, resize=dict(resize), decoder=decoder)


UINT8_KERNEL = "uint8: torch's native uint8 kernel"
FLOAT_KERNEL = "float32: uint8 -> float32, interpolate, round to uint8"


def native_uint8_bilinear(capability: str, machine: str) -> bool:
    """Whether torch's uint8 bilinear kernel serves views on a host (torchvision's own rule, which views follows:
    x86 with AVX2 or AVX512, or ARM); elsewhere torchvision resizes bilinear through float32."""
    return capability in ("AVX2", "AVX512") or machine in ("aarch64", "arm64")


def resize_kernels(name: str, capability: str | None = None, machine: str | None = None) -> dict[str, str]:
    """The resize kernel of each interpolation for renderer `name` on a host (default: this one)."""
    parse_renderer(name)
    if name in BATCHED:
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


def renderer_info(name: str, device: torch.device | str = "cpu") -> RendererInfo:
    """What renderer `name` runs with on `device` (the gpu renderer's decoder depends on it: a CUDA device without
    nvImageCodec is a ConfigError saying what to install)."""
    import torchvision

    parse_renderer(name)
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__}
    decoder = None
    if name == "gpu":
        decoder = gpu_decode.decoder_name(device)
        if decoder == gpu_decode.NVIMGCODEC_DECODER:
            versions["nvimgcodec"] = gpu_decode.nvimgcodec_version()  # raises ConfigError when not installed
    return RendererInfo(name=name, backend=BACKENDS[name], versions=versions,
                        cpu_capability=torch.backends.cpu.get_cpu_capability(), resize=resize_kernels(name),
                        decoder=decoder)


def check_recipe(name: str, recipe: Recipe) -> None:
    """The device and gpu renderers are bilinear only, and render crop + flip only: RandAugment, colour jitter,
    random erasing, mixup and cutmix are rendered by augment.render_view / apply_mix on the CPU."""
    if name in BATCHED and recipe.interpolation != "bilinear":
        raise ConfigError(f"the {name} renderer resizes bilinearly; the recipe asks for {recipe.interpolation!r}: "
                          "use --renderer cpu")
    if name in BATCHED and (augment.augments(recipe) or augment.mixes(recipe)):
        asked = [k for k in ("randaugment", "color_jitter", "random_erasing", "mixup", "cutmix")
                 if getattr(recipe, k) not in ("", 0.0)]
        raise ConfigError(f"the {name} renderer renders crop and flip only; the recipe asks for {', '.join(asked)}, "
                          "which are rendered on the CPU: use --renderer cpu")


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


def check_decoder(name: str, cache_renderer: RendererInfo | None, device: torch.device | str,
                  allow_other: bool) -> None:
    """Before the first batch: the gpu renderer's decoder on `device` can be made (nvImageCodec on CUDA: a
    ConfigError saying what to install), and it is the one the cache records, or another is allowed explicitly:
    the same renderer decoding with another decoder (nvImageCodec against the CPU's libjpeg-turbo) gives slightly
    other pixels than the teacher saw."""
    if name != "gpu":
        return
    gpu_decode.decoder_for(torch.device(device))
    here = gpu_decode.decoder_name(device)
    if cache_renderer is None or cache_renderer.name != "gpu" or cache_renderer.decoder in (None, here):
        return
    if not allow_other:
        raise CacheMismatchError(f"the cache was rendered by the gpu renderer decoding with "
                                 f"{cache_renderer.decoder!r}; on {device} it decodes with {here!r}, whose pixels "
                                 "differ slightly. Train on the kind of device the cache was dumped on, or pass "
                                 "--allow-other-renderer to train so anyway (dkd-cache verify measures the drift)")


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


@dataclasses.dataclass(frozen=True)
class Compressed:
    """One sample's compressed image as a gpu-renderer worker hands it on (with the header's size, read there)."""

    data: bytes
    height: int
    width: int
    shard: str
    key: str


@dataclasses.dataclass(frozen=True)
class Encoded:
    """The compressed images of a group or batch (gpu renderer): one shared-memory transfer, decoded in the main
    process. Several rows may share an image (the views of one decode: `index`, non-decreasing)."""

    data: torch.Tensor  # uint8 (sum of lengths,): the images' bytes, one after another
    lengths: np.ndarray  # int64 (u,)
    shapes: np.ndarray  # int64 (u, 2): height, width from the header
    names: tuple[tuple[str, str], ...]  # (u,) (shard, key) of each image, for errors
    index: np.ndarray  # int64 (m,): row -> image

    def __len__(self) -> int:
        return len(self.index)

    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)

    def members(self) -> list[bytes]:
        """Each image's bytes."""
        buf, off = self.data.numpy(), self.offsets()
        return [buf[int(off[i]):int(off[i + 1])].tobytes() for i in range(len(self.lengths))]

    def slice(self, start: int, stop: int) -> "Encoded":
        """Rows start..stop-1 with the images they use (a view: nothing copied)."""
        index = self.index[start:stop]
        if not len(index):
            return Encoded(self.data[:0], self.lengths[:0], self.shapes[:0], (), index)
        lo, hi = int(index[0]), int(index[-1]) + 1
        off = self.offsets()
        return Encoded(self.data[int(off[lo]):int(off[hi])], self.lengths[lo:hi], self.shapes[lo:hi],
                       self.names[lo:hi], index - lo)


def encode(samples: Sequence[Compressed]) -> Encoded:
    """A group's rows -> Encoded; consecutive rows holding the same Compressed (views of one decode) share it."""
    index = np.zeros(len(samples), np.int64)
    unique: list[Compressed] = []
    for i, c in enumerate(samples):
        if not unique or c is not unique[-1]:
            unique.append(c)
        index[i] = len(unique) - 1
    lengths = np.array([len(c.data) for c in unique], np.int64)
    data = transfer_buffer((int(lengths.sum()),))
    out, at = data.numpy(), 0
    for c in unique:
        out[at:at + len(c.data)] = np.frombuffer(c.data, np.uint8)
        at += len(c.data)
    return Encoded(data, lengths, np.array([[c.height, c.width] for c in unique], np.int64).reshape(-1, 2),
                   tuple((c.shard, c.key) for c in unique), index)


def concat_encoded(parts: Sequence[Encoded]) -> Encoded:
    """One Encoded from several (a batch from group slices)."""
    data = torch.empty(sum(int(p.data.numel()) for p in parts), dtype=torch.uint8)
    _copy_into(data, [p.data for p in parts])
    base = np.cumsum([0] + [len(p.lengths) for p in parts])
    return Encoded(data, np.concatenate([p.lengths for p in parts]).astype(np.int64),
                   np.concatenate([p.shapes for p in parts]).reshape(-1, 2),
                   tuple(n for p in parts for n in p.names),
                   np.concatenate([p.index + b for p, b in zip(parts, base)]).astype(np.int64))


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


# One roi_align call's float32 canvas holds at most this many elements (512 MiB).
CANVAS_ELEMENTS = 1 << 27


def render_batch(images: Packed | Sequence[torch.Tensor], boxes: torch.Tensor | np.ndarray,
                 flips: torch.Tensor | np.ndarray, recipe: Recipe, device: torch.device | str,
                 size: int | None = None, *, index: np.ndarray | None = None, layout: str = "chw") -> torch.Tensor:
    """The device and gpu renderers: decoded images + boxes (B, 4: top, left, h, w) + flips (B,) -> uint8
    (B, 3, S, S) on `device`. `images`: Packed, or uint8 images in `layout` ("chw": (3, H, W); "hwc": (H, W, 3)),
    on any device; `index` (B,) maps rows to images (default: row i is image i). No per-image loop: the images'
    memory is one flat tensor, whose rows are gathered into one canvas per roi_align call (render_rows)."""
    check_recipe("device", recipe)
    device = torch.device(device)
    size = size or recipe.image_size
    boxes = (boxes.to(torch.int64).cpu().numpy() if torch.is_tensor(boxes) else np.asarray(boxes)
             ).astype(np.int64).reshape(-1, 4)
    flips = (flips.cpu().numpy() if torch.is_tensor(flips) else np.asarray(flips)).astype(bool).reshape(-1)
    n = len(boxes)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8, device=device)
    if n == 0:
        return out
    bottom, right = boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]
    tail = torch.zeros(3 * (int(right.max()) + 1), dtype=torch.uint8, device=device)  # the last row's window
    if isinstance(images, Packed):
        parts, shapes, layout = [images.flat], images.shapes, "chw"
    else:
        parts = [i.reshape(-1) for i in images]
        shapes = np.array([tuple(i.shape[1:]) if layout == "chw" else tuple(i.shape[:2]) for i in images],
                          np.int64).reshape(-1, 2)
    if device.type == "cpu":  # numpy's memcpy: torch.cat of uint8 on the CPU is several times slower
        flat = torch.empty(sum(int(p.numel()) for p in parts) + int(tail.numel()), dtype=torch.uint8)
        _copy_into(flat, [p.cpu() for p in parts] + [tail])
    else:
        flat = torch.cat([p.to(device, non_blocking=True) for p in parts] + [tail])
    starts = np.concatenate([[0], np.cumsum(3 * shapes[:, 0] * shapes[:, 1])])[:-1].astype(np.int64)
    index = np.arange(n, dtype=np.int64) if index is None else np.asarray(index, np.int64).reshape(n)
    for a, b in _row_chunks(bottom, right, 0, n):
        rows = index[a:b]
        out[a:b] = render_rows(flat, starts[rows], shapes[rows], boxes[a:b], flips[a:b], recipe, size, layout)
    return out


def _row_chunks(bottom: np.ndarray, right: np.ndarray, start: int, stop: int):
    """(start, stop) runs of rows whose canvas fits CANVAS_ELEMENTS: the whole batch, or halves until it fits."""
    if stop - start <= 1 or (stop - start) * 3 * (int(bottom[start:stop].max()) + 1) * \
            (int(right[start:stop].max()) + 1) <= CANVAS_ELEMENTS:
        if stop > start:
            yield start, stop
        return
    mid = (start + stop) // 2
    yield from _row_chunks(bottom, right, start, mid)
    yield from _row_chunks(bottom, right, mid, stop)


def render_rows(flat: torch.Tensor, starts: np.ndarray, shapes: np.ndarray, boxes: np.ndarray, flips: np.ndarray,
                recipe: Recipe, size: int, layout: str = "chw") -> torch.Tensor:
    """Rows (image at `starts` in `flat`, of `shapes` (m, 2), in `layout`) -> uint8 (m, 3, S, S), one roi_align.
    `flat` ends with at least 3 Wc bytes past its last image (a row's window may run past its image).

    The canvas (m, 3, Hc, Wc) float32 is one gather of image rows from `flat` (each canvas row a window of Wc
    pixels starting at an image row; rows past the image repeat its last row), then its column w set to column
    w - 1. The samples of a view reach at most one pixel past its box, so they read the image and that repeated
    row or column, never what lies beyond (the next row's pixels, a neighbour's). Hc and Wc reach one pixel past
    the lowest and rightmost box of the rows, never beyond: roi_align's edge clamps never fire, so a view's pixels
    do not depend on the canvas's size, that is on which rows share the call."""
    from torchvision.ops import roi_align

    dev, m = flat.device, len(boxes)
    top, left, bh, bw = (boxes[:, j] for j in range(4))
    hc, wc = int((top + bh).max()) + 1, int((left + bw).max()) + 1

    # the rows' numbers in one copy, from pinned memory on CUDA: a copy from pageable memory would wait for the
    # device's queued work (a host synchronisation per batch)
    rows = torch.from_numpy(np.concatenate([np.reshape(starts, (m, 1)), shapes, boxes, np.reshape(flips, (m, 1))],
                                           1).astype(np.int64))
    rows = (rows.pin_memory() if dev.type == "cuda" else rows).to(dev, non_blocking=True)
    st, hs, ws = rows[:, 0], rows[:, 1], rows[:, 2]
    ys = torch.minimum(torch.arange(hc, device=dev)[None], hs[:, None] - 1)  # (m, Hc): image rows, the last repeated
    if layout == "chw":
        first = (st[:, None] + torch.arange(3, device=dev)[None] * (hs * ws)[:, None])[:, :, None] \
            + (ys * ws[:, None])[:, None, :]  # (m, 3, Hc): where each canvas row starts in flat
        canvas = flat.unfold(0, wc, 1).index_select(0, first.reshape(-1)).view(m, 3, hc, wc).to(torch.float32)
    elif layout == "hwc":
        first = st[:, None] + ys * (3 * ws)[:, None]  # (m, Hc)
        canvas = flat.unfold(0, 3 * wc, 1).index_select(0, first.reshape(-1)).view(m, hc, wc, 3) \
            .permute(0, 3, 1, 2).to(torch.float32).contiguous()
    else:
        raise ConfigError(f"layout must be 'chw' or 'hwc', got {layout!r}")
    last = (ws - 1).clamp(max=wc - 1).view(m, 1, 1, 1).expand(m, 3, hc, 1)  # column w = column w - 1
    canvas.scatter_(3, ws.clamp(max=wc - 1).view(m, 1, 1, 1).expand(m, 3, hc, 1), canvas.gather(3, last))
    b = rows[:, 3:7].to(torch.float32)  # top, left, h, w: integers, exact in float32
    rois = torch.stack([torch.arange(m, dtype=torch.float32, device=dev), b[:, 1], b[:, 0], b[:, 1] + b[:, 3],
                        b[:, 0] + b[:, 2]], 1)
    out = roi_align(canvas, rois, output_size=(size, size), spatial_scale=1.0,
                    sampling_ratio=-1 if recipe.antialias else 1, aligned=True)
    out = torch.where(rows[:, 7].bool()[:, None, None, None], out.flip(-1), out)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def decode_encoded(images: Encoded, device: torch.device | str) -> gpu_decode.Decoded:
    """The gpu renderer's decode of a batch's images on `device`; an image that cannot be decoded, or whose pixels
    do not have its header's size, is a BadSampleError naming its shard and key."""
    dec = gpu_decode.decoder_for(torch.device(device)).decode(images.members())
    for (shard, key), img, err, (h, w) in zip(images.names, dec.images, dec.errors, images.shapes):
        got = None if img is None else tuple(img.shape[1:] if dec.layout == "chw" else img.shape[:2])
        if err is None and got != (int(h), int(w)):
            err = f"decoded size {got} differs from the header's {(int(h), int(w))}"
        if err is not None:
            raise BadSampleError(shard, key, f"image cannot be decoded ({err})",
                                 advice="Fix or remove the sample (dump-teacher --skip-bad leaves such samples out "
                                        "of a cache, recording each).")
    return dec


def render_encoded(images: Encoded, boxes: torch.Tensor | np.ndarray, flips: torch.Tensor | np.ndarray,
                   recipe: Recipe, device: torch.device | str, size: int | None = None) -> torch.Tensor:
    """The gpu renderer: a batch's compressed images decoded on `device`, then rendered as render_batch does."""
    check_recipe("gpu", recipe)
    dec = decode_encoded(images, device)
    return render_batch(dec.images, boxes, flips, recipe, device, size, index=images.index, layout=dec.layout)


def render_views(name: str, data: Sequence[bytes], boxes: np.ndarray, flips: np.ndarray, recipe: Recipe,
                 device: torch.device | str = "cpu", size: int | None = None) -> torch.Tensor:
    """(bytes, box, flip) of each view -> uint8 (B, 3, S, S) on `device`, with renderer `name` (verify, tests)."""
    parse_renderer(name)
    size = size or recipe.image_size
    if name == "device":
        return render_batch([decode_for_device(d) for d in data], boxes, flips, recipe, device, size)
    if name == "gpu":
        check_recipe("gpu", recipe)
        dec = gpu_decode.decoder_for(torch.device(device)).decode(data)
        bad = next((e for e in dec.errors if e is not None), None)
        if bad is not None:
            raise ValueError(f"an image cannot be decoded ({bad})")
        return render_batch(dec.images, boxes, flips, recipe, device, size, layout=dec.layout)
    at_size = dataclasses.replace(recipe, image_size=size)
    out = [render_decoded(decode(d), tuple(int(x) for x in b), bool(f), at_size) for d, b, f in zip(data, boxes, flips)]
    stacked = torch.stack(out) if out else torch.empty((0, 3, size, size), dtype=torch.uint8)
    return stacked.to(device)


def to_device(images: torch.Tensor | Packed | Encoded, entries: dict[str, torch.Tensor], recipe: Recipe,
              device: torch.device | str, size: int | None = None) -> torch.Tensor:
    """A loader batch's pixels on the compute device, uint8 (B, 3, S, S): rendered views are copied
    (non-blocking from pinned memory); decoded images (device renderer) are rendered there from the batch's
    stored boxes and flips; compressed images (gpu renderer) are decoded there first."""
    if isinstance(images, Encoded):
        return render_encoded(images, entries["views/box"], entries["views/flip"], recipe, device, size)
    if isinstance(images, Packed):
        return render_batch(images, entries["views/box"], entries["views/flip"], recipe, device, size)
    return images.to(device, non_blocking=True)
