"""Recorded views: drawn from (seed, view, key) alone, torchvision's algorithm, and rendered bit for bit."""


import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from dkd_cache.errors import ConfigError
from dkd_cache.views import Recipe, draw_view, image_size_of, render


def test_draw_is_a_pure_function_of_seed_view_key():
    r = Recipe()
    a = draw_view(0, 3, "n01440764_10026", 375, 500, r)
    assert a == draw_view(0, 3, "n01440764_10026", 375, 500, r)
    assert a != draw_view(1, 3, "n01440764_10026", 375, 500, r)
    assert a != draw_view(0, 4, "n01440764_10026", 375, 500, r)
    # global RNG state has no influence
    torch.manual_seed(123)
    np.random.seed(123)
    assert a == draw_view(0, 3, "n01440764_10026", 375, 500, r)


def test_boxes_follow_randomresizedcrop_bounds():
    r = Recipe()
    areas, ratios, flips = [], [], []
    for i in range(2000):
        top, left, h, w, flip = draw_view(0, 0, f"k{i}", 300, 400, r)
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400 and h > 0 and w > 0
        areas.append(h * w / (300 * 400))
        ratios.append(w / h)
        flips.append(flip)
    assert min(areas) >= 0.07 and max(areas) <= 1.0
    assert min(ratios) >= 0.74 and max(ratios) <= 1.35
    assert 0.45 < np.mean(flips) < 0.55


def test_fallback_is_a_central_crop_for_extreme_aspect():
    # a 10x1000 strip: no sampled box fits, so the fallback (centre crop at the max ratio) is taken
    r = Recipe(scale=(0.9, 1.0))
    top, left, h, w, _ = draw_view(0, 0, "strip", 10, 1000, r)
    assert (top, h) == (0, 10) and w == round(10 * 4 / 3) and left == (1000 - w) // 2


def test_render_matches_torchvision_functional(tmp_path):
    from PIL import Image
    import io

    img = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    out = render(buf.getvalue(), (5, 7, 40, 50), True, Recipe(image_size=32))
    ref = v2.functional.resized_crop(torch.from_numpy(img).permute(2, 0, 1), 5, 7, 40, 50, [32, 32], antialias=True)
    assert torch.equal(out, v2.functional.horizontal_flip(ref))
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)


def test_recipe_validation_and_roundtrip():
    r = Recipe(image_size=64, interpolation="bicubic")
    assert Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(ConfigError):
        Recipe(image_size=0)
    with pytest.raises(ConfigError):
        Recipe(interpolation="lanczos9")
    with pytest.raises(ConfigError):
        Recipe.from_dict({"image_size": 32, "colour": 1})


def test_image_bomb_is_refused_from_the_header():
    import struct
    import zlib

    # a PNG header declaring 100000 x 100000 pixels, with almost no data
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")
    with pytest.raises(Exception) as e:
        image_size_of(png)
    assert "pixels" in str(e.value).lower() or "decompression" in type(e.value).__name__.lower()


def _jpeg(width: int, height: int, **save) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng([width, height])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format="JPEG", **save)
    return buf.getvalue()


def test_the_header_reader_gives_pils_size_for_every_kind_of_jpeg_and_png():
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated; the stored size is what the decoder returns
    images = [_jpeg(37, 23), _jpeg(400, 351, quality=90), _jpeg(64, 48, progressive=True),
              _jpeg(33, 65, exif=exif.tobytes()), _jpeg(50, 20, subsampling=0, optimize=True)]
    padded = images[0][:2] + b"\xff\xff" + images[0][2:]  # fill bytes before a marker are allowed
    buf = io.BytesIO()
    Image.new("RGB", (29, 17)).save(buf, format="PNG")
    gif = io.BytesIO()
    Image.new("RGB", (13, 11)).save(gif, format="GIF")  # neither: PIL reads it
    for data in [*images, padded, buf.getvalue(), gif.getvalue()]:
        with Image.open(io.BytesIO(data)) as im:
            assert image_size_of(data) == (im.size[1], im.size[0])
    # a header this reader cannot walk goes to PIL, which refuses it as before
    with pytest.raises(Exception):
        image_size_of(images[0][:2] + b"\x00" * 20)


def test_a_jpeg_bomb_is_refused_from_its_frame_header():
    data = bytearray(_jpeg(40, 30))
    at = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xC0)
    data[at + 5:at + 9] = (60_000).to_bytes(2, "big") + (60_000).to_bytes(2, "big")
    with pytest.raises(ValueError, match="decompression bomb"):
        image_size_of(bytes(data))


def test_the_direct_uint8_resize_gives_torchvisions_pixels():
    # render_decoded calls torch's uint8 bilinear kernel itself where torchvision v2 would: the same pixels, for
    # either layout, full-width and full-image crops, the same-size crop (no resize), flips, and antialias off.
    from torchvision.transforms.v2 import functional as F

    from dkd_cache.views import pixel_major, render_decoded

    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.integers(0, 256, (3, 61, 83), dtype=np.uint8))
    boxes = [(0, 0, 61, 83), (5, 0, 40, 83), (3, 7, 20, 31), (10, 10, 24, 24), (0, 50, 61, 33), (2, 3, 1, 5)]
    for layout in (img, pixel_major(img)):
        for size in (24, 32, 100):
            for antialias in (True, False):
                recipe = Recipe(image_size=size, antialias=antialias)
                for top, left, h, w in boxes:
                    for flip in (False, True):
                        want = F.resized_crop(layout, top, left, h, w, [size, size], antialias=antialias)
                        want = F.horizontal_flip(want) if flip else want
                        got = render_decoded(layout, (top, left, h, w), flip, recipe)
                        assert torch.equal(got, want), (layout.stride(), size, antialias, (top, left, h, w), flip)
