"""Decoders of the gpu renderer: the compressed bytes of a batch's images -> decoded uint8 images on the device.

    nvimgcodec  nvImageCodec's hardware JPEG decoder only (BackendKind.HW_GPU_ONLY), on a CUDA device. One backend,
                so which code decodes an image depends on its bytes alone, never on its batch neighbours (a mixed
                decoder may hand a batch's images to different backends as it balances load). Members the hardware
                decoder cannot take (progressive or arithmetic JPEG, CMYK / YCCK, PNG, WebP, anything it refuses)
                are decoded on the CPU instead (views.decode), one by one, and counted (Decoder.counts).
                An optional extra: pip install "dkd-cache[gpu]".
    cpu         views.decode (torchvision.io.decode_image, libjpeg-turbo) one image at a time, then one copy to the
                device: the gpu renderer on a CPU device (tests, CI), and the hardware decoder's fallback.

Which one runs is a function of the device (`decoder_for`): CUDA -> nvimgcodec, CPU -> cpu. The cache records it
(RendererInfo.decoder): the same renderer with the same decoder gives the same pixels, bit for bit.

Stream shape:   [bytes] (u,) -> Decoded(images: [uint8 (3, H, W) or (H, W, 3) on the device, or None], errors,
                layout "chw" / "hwc")
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence

import torch

from .errors import ConfigError
from .views import decode

INSTALL_GPU = 'pip install "dkd-cache[gpu]"'  # nvidia-nvimgcodec-cu13 and nvidia-nvjpeg (see pyproject.toml)
CPU_DECODER = "cpu: torchvision.io.decode_image (libjpeg-turbo), per image on the host"
NVIMGCODEC_DECODER = "nvimgcodec: nvImageCodec hardware JPEG decoder (HW_GPU_ONLY); other members on the host"


@dataclasses.dataclass(frozen=True)
class Decoded:
    """A batch's decoded images, on the device: images[i] is None where errors[i] says why it cannot be decoded."""

    images: list[torch.Tensor | None]  # uint8 (3, H, W) ("chw") or (H, W, 3) ("hwc"), contiguous
    errors: list[str | None]
    layout: str  # "chw" or "hwc"


def _cpu_decode_one(data: bytes) -> tuple[torch.Tensor | None, str | None]:
    try:
        return decode(bytes(data)), None
    except Exception as e:  # noqa: BLE001  (the caller names the sample and decides: skip or raise)
        return None, str(e) or type(e).__name__


class CpuDecoder:
    """views.decode per image on the host (the cpu and device renderers' decode), then to `device`."""

    name = CPU_DECODER
    layout = "chw"

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.counts: collections.Counter[str] = collections.Counter()

    def decode(self, datas: Sequence[bytes]) -> Decoded:
        images, errors = [], []
        for data in datas:
            img, err = _cpu_decode_one(data)
            images.append(None if img is None else img.to(self.device, non_blocking=True))
            errors.append(err)
        self.counts["cpu"] += sum(e is None for e in errors)
        return Decoded(images=images, errors=errors, layout="chw")


def hardware_jpeg(data: bytes) -> str | None:
    """None when the bytes are a JPEG the hardware decoder takes (baseline or extended Huffman, 8-bit, 1 or 3
    components); else why not ("not a JPEG", "progressive JPEG", "4 components (CMYK)", ...). Reads markers only."""
    if data[:2] != b"\xff\xd8":
        return "not a JPEG"
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return "unreadable JPEG markers"
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xC0, 0xC1):
            if i + 10 > n:
                return "truncated frame header"
            precision, components = data[i + 4], data[i + 9]
            if precision != 8:
                return f"{precision}-bit JPEG"
            return None if components in (1, 3) else f"{components} components (CMYK / YCCK)"
        if marker in (0xC2, 0xC6, 0xCA, 0xCE):
            return "progressive JPEG"
        if marker in (0xC3, 0xC5, 0xC7, 0xC9, 0xCB, 0xCD, 0xCF):
            return "lossless, hierarchical or arithmetic-coded JPEG"
        if marker in (0xD9, 0xDA):
            return "no frame header before the scan"
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return "truncated JPEG"


def load_nvimgcodec():
    """The nvImageCodec module, imported here (an optional extra), or a ConfigError saying what to install."""
    try:
        from nvidia import nvimgcodec
    except ImportError as e:
        raise ConfigError(f"the gpu renderer decodes on CUDA devices with nvImageCodec, which is not installed "
                          f"({e}). Install it with: {INSTALL_GPU} (nvidia-nvimgcodec-cu13 and nvidia-nvjpeg, for "
                          "torch's CUDA 13 builds), or use --renderer device") from None
    return nvimgcodec


def nvimgcodec_version() -> str:
    import importlib.metadata

    for dist in ("nvidia-nvimgcodec-cu13", "nvidia-nvimgcodec-cu12"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return str(getattr(load_nvimgcodec(), "__version__", "unknown"))


class NvImageCodecDecoder:
    """nvImageCodec pinned to the hardware JPEG decoder; members it cannot take decode on the host (counted)."""

    name = NVIMGCODEC_DECODER
    layout = "hwc"

    def __init__(self, device: torch.device | str):
        nv = load_nvimgcodec()
        self.device = torch.device(device)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        try:
            self._decoder = nv.Decoder(device_id=index, backends=[nv.Backend(nv.BackendKind.HW_GPU_ONLY)])
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"nvImageCodec's hardware JPEG decoder is not available on {self.device} ({e}); "
                              "the gpu renderer needs a GPU with a JPEG engine (A100, H100, H200, ...): use "
                              "--renderer device there") from None
        # RGB like views.decode; no EXIF rotation (torchvision's decode_image applies none either)
        # (nvImageCodec 0.9 names RGB SRGB and takes the interleaved layout as a sample format; older ones RGB)
        params = dict(color_spec=nv.ColorSpec.SRGB if hasattr(nv.ColorSpec, "SRGB") else nv.ColorSpec.RGB,
                      allow_any_depth=False, apply_exif_orientation=False)
        if hasattr(nv, "SampleFormat"):
            params["sample_format"] = nv.SampleFormat.I_RGB
        self._params = nv.DecodeParams(**params)
        self.counts: collections.Counter[str] = collections.Counter()

    def decode(self, datas: Sequence[bytes]) -> Decoded:
        images: list[torch.Tensor | None] = [None] * len(datas)
        errors: list[str | None] = [None] * len(datas)
        hard = [i for i, d in enumerate(datas) if hardware_jpeg(d) is None]
        stream = torch.cuda.current_stream(self.device)
        out = self._decoder.decode([bytes(datas[i]) for i in hard], params=self._params,
                                   cuda_stream=stream.cuda_stream) if hard else []
        for i, img in zip(hard, out):
            if img is not None:
                images[i] = torch.as_tensor(img, device=self.device)  # (H, W, 3) uint8, nvImageCodec's memory
        self.counts["hardware"] += sum(images[i] is not None for i in hard)
        for i, data in enumerate(datas):  # the rest: the host decodes them (views.decode), then one copy each
            if images[i] is None:
                reason = hardware_jpeg(data) or "refused by the hardware decoder"
                img, errors[i] = _cpu_decode_one(data)
                if img is not None:
                    images[i] = img.permute(1, 2, 0).contiguous().to(self.device, non_blocking=True)
                    self.counts[f"cpu fallback: {reason}"] += 1
        return Decoded(images=images, errors=errors, layout="hwc")


def decoder_name(device: torch.device | str) -> str:
    """The decoder the gpu renderer runs with on `device` (recorded in the cache)."""
    return NVIMGCODEC_DECODER if torch.device(device).type == "cuda" else CPU_DECODER


@functools.lru_cache(maxsize=8)
def decoder_for(device: torch.device | str) -> CpuDecoder | NvImageCodecDecoder:
    """The gpu renderer's decoder on `device`, made once per device (nvImageCodec's set-up costs ~100 ms)."""
    device = torch.device(device)
    if device.type == "cuda":
        return NvImageCodecDecoder(device)
    if device.type != "cpu":
        raise ConfigError(f"the gpu renderer decodes on CUDA devices (or the CPU), not on {device}")
    return CpuDecoder(device)
