"""Image preprocessing: golden sizes computed by hand, patch order, normalisation, decode errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dotsvlm_serving.model.preprocess import (
    ImageError,
    decode_image,
    image_token_count,
    patchify,
    preprocess_images,
    smart_resize,
)

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@pytest.mark.parametrize(
    ("width", "height", "resized_hw", "tokens"),
    [
        # 768/28 = 27.4 -> 27*28 = 756; 1024/28 = 36.6 -> 37*28 = 1036; grid 27x37 windows -> 999 tokens
        (1024, 768, (756, 1036), 999),
        # 480/28 = 17.1 -> 476; 640/28 = 22.9 -> 644; 17*23 = 391
        (640, 480, (476, 644), 391),
        # 28x28 = 784 < 3136: beta = 2, ceil(28*2/28)*28 = 56 -> 56x56, 2x2 windows = 4 tokens
        (28, 28, (56, 56), 4),
        # 1x1: rounds to 28x28, below min: beta = 56 -> 56x56 -> 4 tokens
        (1, 1, (56, 56), 4),
        # aspect exactly 200 is allowed: 1 -> 28 (floor at factor), 200/28 = 7.1 -> 196; 28*196 = 5488 >= 3136
        (200, 1, (28, 196), 7),
        # 4000x3000 -> 4004x2996 = 11,995,984 > max: beta = sqrt(12e6/11289600) = 1.03098;
        # 3000/1.03098/28 = 103.9 -> 103*28 = 2884; 4000/1.03098/28 = 138.6 -> 138*28 = 3864; 103*138 windows
        (4000, 3000, (2884, 3864), 14214),
    ],
)
def test_smart_resize_golden(width: int, height: int, resized_hw: tuple[int, int], tokens: int) -> None:
    assert smart_resize(height, width) == resized_hw
    assert image_token_count(height, width) == tokens


def test_golden_token_counts_written_out() -> None:
    assert image_token_count(768, 1024) == 999
    assert image_token_count(3000, 4000) == 14214  # 103 x 138 windows
    # a lower pixel budget: 786432 px / 200000 -> beta 1.983; 768/1.983/28 = 13.8 -> 13; 1024/1.983/28 = 18.4 -> 18
    assert smart_resize(768, 1024, max_pixels=200_000) == (364, 504)
    assert image_token_count(768, 1024, max_pixels=200_000) == 234


@pytest.mark.parametrize(("h", "w"), [(0, 10), (10, 0), (1, 201), (5000, 24)])
def test_smart_resize_refuses_zero_size_and_extreme_aspect(h: int, w: int) -> None:
    with pytest.raises(ImageError) as err:
        smart_resize(h, w)
    assert "zero size" in str(err.value) or "aspect ratio" in str(err.value)


def test_preprocess_1024x768_shapes() -> None:
    out = preprocess_images([Image.new("RGB", (1024, 768), (1, 2, 3))])
    assert out.pixel_values.shape == (3996, 588) and out.pixel_values.dtype == torch.float32
    assert out.grid_thw.tolist() == [[1, 54, 74]] and out.grid_thw.dtype == torch.int64
    assert out.num_tokens == [999]
    assert out.nbytes == 3996 * 588 * 4 + 3 * 8


def test_normalisation_of_a_solid_colour() -> None:
    out = preprocess_images([Image.new("RGB", (56, 56), (255, 128, 0))])
    expected = (np.array([255, 128, 0], dtype=np.float32) / 255 - MEAN) / STD
    rows = out.pixel_values.view(-1, 3, 14 * 14)
    for c in range(3):
        torch.testing.assert_close(rows[:, c], torch.full_like(rows[:, c], float(expected[c])), atol=1e-5, rtol=0)


def test_patchify_row_order_is_merge_window_then_c_py_px() -> None:
    h, w = 56, 84  # grid 4 x 6 patches
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    img = np.stack([ys * 1000 + xs, ys * 1000 + xs + 1e6, ys * 1000 + xs + 2e6]).astype(np.float64)
    rows, grid = patchify(img)
    assert grid == (1, 4, 6) and rows.shape == (24, 588)
    # rows 0..3: patches (0,0), (0,1), (1,0), (1,1); row 4 starts the next window: patch (0,2)
    for i, (pr, pc) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3), (0, 4)]):
        r = rows[i].reshape(3, 14, 14)
        assert r[0, 0, 0] == (pr * 14) * 1000 + pc * 14
        assert r[0, 2, 5] == (pr * 14 + 2) * 1000 + pc * 14 + 5  # (py, px) inside the patch
        assert r[2, 0, 0] == r[0, 0, 0] + 2e6  # channel-major
    # the first patch of the second window row: grid row 2, col 0 (after 3 windows x 4 patches)
    assert rows[12].reshape(3, 14, 14)[0, 0, 0] == 28 * 1000


def test_packing_keeps_image_order() -> None:
    a, b = Image.new("RGB", (56, 56), (255, 0, 0)), Image.new("RGB", (84, 56), (0, 0, 255))
    out = preprocess_images([a, b])
    assert out.grid_thw.tolist() == [[1, 4, 4], [1, 4, 6]]
    assert out.num_tokens == [4, 6]
    parts = out.split()
    torch.testing.assert_close(parts[1].pixel_values, preprocess_images([b]).pixel_values)
    again = type(out).concat(parts)
    torch.testing.assert_close(again.pixel_values, out.pixel_values)


def test_too_many_images_is_refused() -> None:
    imgs = [Image.new("RGB", (28, 28))] * 3
    with pytest.raises(ImageError, match="3 images, over the limit of 2"):
        preprocess_images(imgs, max_images=2)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF"])
def test_decode_common_formats_to_rgb(fmt: str) -> None:
    data = _encode(Image.new("RGB", (40, 30), (200, 100, 50)), fmt)
    img = decode_image(data, max_bytes=1 << 20)
    assert img.mode == "RGB" and img.size == (40, 30)
    assert np.abs(np.asarray(img, dtype=int)[15, 20] - [200, 100, 50]).max() <= 4


def test_decode_gif_takes_the_first_frame() -> None:
    frames = [Image.new("RGB", (20, 10), c) for c in [(255, 0, 0), (0, 255, 0)]]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    img = decode_image(data, max_bytes=1 << 20)
    assert img.mode == "RGB" and tuple(np.asarray(img)[5, 5]) == (255, 0, 0)


def test_decode_transparent_png_composites_on_white() -> None:
    data = _encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG")
    assert tuple(np.asarray(decode_image(data, max_bytes=1 << 20))[0, 0]) == (255, 255, 255)


def test_decode_errors_are_clear() -> None:
    png = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    cases = {
        b"": "empty",
        b"not an image at all": "could not be decoded",
        png[: len(png) // 2]: "corrupt or truncated",
    }
    for data, msg in cases.items():
        with pytest.raises(ImageError, match=msg):
            decode_image(data, max_bytes=1 << 20)
    with pytest.raises(ImageError, match="over the limit of 100 bytes"):
        decode_image(png, max_bytes=100)
    with pytest.raises(ImageError, match="4096 pixels, over the limit of 1000 pixels"):
        decode_image(png, max_bytes=1 << 20, max_input_pixels=1000)
    with pytest.raises(ImageError, match="aspect ratio"):
        decode_image(_encode(Image.new("RGB", (402, 2)), "PNG"), max_bytes=1 << 20)
    assert issubclass(ImageError, ValueError)


def test_formats_outside_the_list_are_refused_at_the_header() -> None:
    """ICO decodes whole at open (on the ingress's event loop), ICNS holds an image of another size than its
    header says (the prompt then counted the wrong number of image tokens, and the request failed as if
    its embeddings were lost), EPS runs Ghostscript: only the listed formats are read."""
    from dotsvlm_serving.model.preprocess import probe_image

    icon = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "ICO")
    with pytest.raises(ImageError, match="could not be decoded.*PNG, JPEG, WebP, GIF, BMP, TIFF"):
        probe_image(icon, max_bytes=1 << 20)


def test_a_photo_is_turned_as_its_exif_orientation_says_in_the_probe_and_the_decode() -> None:
    """A phone photo's pixels are stored as the sensor saw them, with an EXIF tag that says how to turn them:
    the model sees it the way viewers show it, and the prompt is sized for that same shape."""
    from dotsvlm_serving.model.preprocess import probe_image

    stored = Image.new("RGB", (80, 20), (255, 255, 255))
    stored.paste((0, 0, 0), (0, 0, 10, 20))  # a black band on the stored image's left
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    data = _encode(stored, "JPEG", exif=exif.tobytes(), quality=95)
    assert probe_image(data, max_bytes=1 << 20) == (20, 80)
    img = decode_image(data, max_bytes=1 << 20)
    assert img.size == (20, 80)
    assert np.asarray(img, dtype=int)[2, 10].max() < 60  # the band is now at the top


def test_deep_greyscale_is_scaled_to_8_bits_not_clipped_white() -> None:
    ramp = (np.arange(256, dtype=np.uint16).reshape(1, 256).repeat(4, 0) * 257)
    data = _encode(Image.fromarray(ramp), "PNG")  # a 16-bit greyscale scan
    img = np.asarray(decode_image(data, max_bytes=1 << 20), dtype=int)
    assert abs(img[0, 128, 0] - 128) <= 1 and img[0, 0, 0] == 0 and img[0, 255, 0] == 255
    floats = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))  # a float TIFF in [0, 1]
    assert abs(int(np.asarray(decode_image(_encode(floats, "TIFF"), max_bytes=1 << 20))[0, 0, 0]) - 128) <= 1


def test_a_colour_key_transparency_composites_on_white() -> None:
    img = Image.new("RGB", (8, 8), (0, 0, 0))
    data = _encode(img, "PNG", transparency=(0, 0, 0))  # tRNS: black is transparent
    assert tuple(np.asarray(decode_image(data, max_bytes=1 << 20))[0, 0]) == (255, 255, 255)


def test_a_16_bit_colour_key_composites_on_white_like_an_8_bit_one() -> None:
    """A 16-bit greyscale PNG's tRNS key is a 16-bit value: its pixels (and only they, not the others that
    scale to the same 8-bit grey) come out white, as an 8-bit image's keyed pixels do."""
    deep = np.array([[1000, 1000, 1200], [30000, 65535, 0]], dtype=np.uint16)
    data = _encode(Image.fromarray(deep), "PNG", transparency=1000)  # mode I;16 with a 16-bit key
    img = np.asarray(decode_image(data, max_bytes=1 << 20), dtype=int)[..., 0]
    assert img.tolist() == [[255, 255, 1200 >> 8], [30000 >> 8, 255, 0]]
    shallow = np.array([[3, 3, 4], [117, 255, 0]], dtype=np.uint8)
    data = _encode(Image.fromarray(shallow), "PNG", transparency=3)  # the 8-bit image with the same key
    assert np.asarray(decode_image(data, max_bytes=1 << 20), dtype=int)[..., 0].tolist() == img.tolist()
    keyed = Image.fromarray(deep.astype(np.int32))  # mode I with a key, as an older Pillow opens a 16-bit PNG
    keyed.info["transparency"] = 1000
    from dotsvlm_serving.model import preprocess

    got = preprocess._to_8_bit(keyed).convert("RGBA")
    white = Image.alpha_composite(Image.new("RGBA", got.size, (255, 255, 255, 255)), got).convert("L")
    assert np.asarray(white, dtype=int).tolist() == [[255, 255, 5], [117, 255, 0]]


def test_deep_greyscale_in_8_bit_range_or_with_nan_is_not_black() -> None:
    """A 32-bit integer image whose values are all within 0..255 is already 8-bit (200 was divided by 65535,
    to ~1); a float image with a NaN ("no data") keeps its other pixels (one NaN made the image black)."""
    ints = Image.fromarray(np.array([[200, 0], [255, 17]], dtype=np.int32))
    img = np.asarray(decode_image(_encode(ints, "TIFF"), max_bytes=1 << 20), dtype=int)[..., 0]
    assert img.tolist() == [[200, 0], [255, 17]]
    sixteen = Image.fromarray(np.array([[65535, 0], [32896, 257]], dtype=np.int32))  # 16-bit values in mode I
    img = np.asarray(decode_image(_encode(sixteen, "TIFF"), max_bytes=1 << 20), dtype=int)[..., 0]
    assert img.tolist() == [[255, 0], [128, 1]]
    floats = Image.fromarray(np.array([[0.5, np.nan], [1.0, 0.0]], dtype=np.float32))
    img = np.asarray(decode_image(_encode(floats, "TIFF"), max_bytes=1 << 20), dtype=int)[..., 0]
    assert img.tolist() == [[128, 0], [255, 0]]
    floats = Image.fromarray(np.array([[25.0, np.nan], [100.0, 0.0]], dtype=np.float32))  # its own range
    img = np.asarray(decode_image(_encode(floats, "TIFF"), max_bytes=1 << 20), dtype=int)[..., 0]
    assert img.tolist() == [[64, 0], [255, 0]]


@pytest.mark.parametrize(("size", "max_pixels"), [((500, 300), 200_000), ((30, 20), 200_000), ((90, 1000), 200_000),
                                                  ((5636, 32), 11_289_600), ((22775, 117), 100_000)])
def test_resizing_each_image_first_gives_the_same_model_input(size, max_pixels) -> None:
    """A server resizes each image as soon as it is decoded (one full-size image in memory at a time): the
    patches are bit for bit those of resizing inside preprocess_images, and the image tokens are those the
    ingress counts from the original size. (Resizing twice gave a 5636x32 image "aspect ratio 201:1 (5628x28)",
    and a 22775x117 one at 100,000 pixels fewer embeddings than prompt tokens.)"""
    from dotsvlm_serving.model.preprocess import resize_for_model

    w, h = size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    kw = {"min_pixels": 3136, "max_pixels": max_pixels}
    whole = preprocess_images([image], **kw)
    first = preprocess_images([resize_for_model(image, factor=28, **kw)], resized=True, **kw)
    assert torch.equal(whole.pixel_values, first.pixel_values) and torch.equal(whole.grid_thw, first.grid_thw)
    assert first.num_tokens == [image_token_count(h, w, **kw)]


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF", "WEBP", "PNG"])
@pytest.mark.parametrize(("orientation", "shown", "band_at"), [(6, (20, 80), (2, 10)), (2, (80, 20), (10, 77))])
def test_a_photo_is_turned_once_whatever_its_format(fmt: str, orientation: int, shown: tuple[int, int],
                                                     band_at: tuple[int, int]) -> None:
    """Recent Pillows turn a TIFF by its orientation tag themselves (its header's size is the turned one), and the
    decode turned it again: a TIFF photo reached the model turned twice (a quarter turn off, or not mirrored) and
    the prompt was sized for that wrong shape. Every format is turned exactly once, in the probe and the decode."""
    from dotsvlm_serving.model.preprocess import probe_image

    stored = Image.new("RGB", (80, 20), (255, 255, 255))
    stored.paste((0, 0, 0), (0, 0, 10, 20))  # a black band on the stored image's left
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: shown turned 90 degrees clockwise; 2: shown mirrored left to right
    data = _encode(stored, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    assert probe_image(data, max_bytes=1 << 20) == shown
    img = decode_image(data, max_bytes=1 << 20)
    assert img.size == shown
    row, col = band_at
    assert np.asarray(img, dtype=int)[row, col].max() < 60  # 6: the band is at the top; 2: on the right
