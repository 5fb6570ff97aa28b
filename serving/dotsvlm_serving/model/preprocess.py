"""Image preprocessing as pure functions: decode -> RGB -> smart resize -> normalise -> patchify.

Limits (decided here, documented in docs/model.md):
- `decode_image` refuses more than `max_bytes` of input and images whose *original* size exceeds
  `max_input_pixels` (a decompression-bomb guard, checked from the header before pixels are decoded).
- `smart_resize` refuses zero sizes and aspect ratios over 200; larger images are *downscaled* to at
  most `max_pixels` (that is the model's pixel budget, not an error), smaller ones upscaled to
  `min_pixels`.
- `preprocess_images` refuses more than `max_images` images.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .config import PreprocessConfig

DEFAULTS = PreprocessConfig()
MAX_ASPECT_RATIO = 200
# Hard cap on an image's original size (pixels), before resizing: about 16k x 10k. Larger inputs are a
# decoding-memory risk and are refused rather than downscaled.
DEFAULT_MAX_INPUT_PIXELS = 178_956_970
# The formats read: what cameras, phones, browsers and screenshot tools write. Pillow reads many more, some of
# which decode whole at open (ICO: on the ingress's event loop), hold several images of other sizes than the
# header says (ICNS: the prompt then counts the wrong number of image tokens), or run external programs (EPS).
Image.init()  # registers every plugin, so that Image.OPEN lists what this Pillow reads
FORMATS = tuple(f for f in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF") if f in Image.OPEN)
_FORMAT_NAMES = ", ".join({"WEBP": "WebP"}.get(f, f) for f in FORMATS[:-1]) + f" or {FORMATS[-1]}"
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# EXIF orientation -> the turn that shows the image as viewers do (as PIL.ImageOps.exif_transpose does it).
_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_90}


def _pillow_turns_tiffs() -> bool:
    """Whether this Pillow turns a TIFF by its orientation tag itself (recent ones do: the header's size is the
    turned one, and load() turns the pixels). Turning it again here turned TIFF photos a second time. Asked of
    a 2x1 TIFF once, so that older Pillows (pillow>=10) still get the turn from `decode_image`."""
    try:
        exif = Image.Exif()
        exif[0x0112] = 6
        buf = io.BytesIO()
        Image.new("L", (2, 1)).save(buf, "TIFF", exif=exif)
        return Image.open(buf).size == (1, 2)
    except Exception:  # a Pillow that cannot write it: it does not turn either
        return False


_PILLOW_TURNS_TIFFS = _pillow_turns_tiffs()


class ImageError(ValueError):
    """An image the service refuses; str() is a message for the API user saying what to fix."""


def probe_image(data: bytes, *, max_bytes: int, max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> tuple[int, int]:
    """(width, height) from the image's header, with every check that does not need the pixels (size in
    bytes, format, zero size, aspect ratio, original pixel cap). Cheap: nothing is decoded, so the
    ingress can size the prompt while the full decode happens on the vision pool. The size is as the image
    is shown: a photo whose EXIF orientation turns it a quarter has its width and height swapped."""
    img = open_image(data, max_bytes=max_bytes, max_input_pixels=max_input_pixels)
    w, h = img.size
    return (h, w) if _orientation(img) in _ROTATED else (w, h)


def decode_image(data: bytes, *, max_bytes: int, max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> Image.Image:
    """Decode PNG / JPEG / WebP / GIF (first frame) / BMP / TIFF / AVIF into an RGB image, turned as its EXIF
    orientation says (as viewers show a phone photo), with transparency over white."""
    img = open_image(data, max_bytes=max_bytes, max_input_pixels=max_input_pixels)
    header, orientation = img.size, _orientation(img)  # both as `probe_image` sized the prompt
    try:
        img.load()  # truncated data raises here (ImageFile.LOAD_TRUNCATED_IMAGES stays False)
        if img.size != header:
            raise ImageError(f"the image's header says {header[0]}x{header[1]} but its data is {img.size[0]}x"
                             f"{img.size[1]}: send a valid {_FORMAT_NAMES} file")
        if orientation in _TURNS:
            img = img.transpose(_TURNS[orientation])
        img = _to_8_bit(img)
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            # Composite transparency (an alpha channel, or a palette or colour key) over white, like a browser
            # shows it, instead of black.
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(bg, rgba).convert("RGB")
        return img.convert("RGB")
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"the image data is corrupt or truncated ({type(exc).__name__}: {exc}): send the complete file") from exc


def _orientation(img: Image.Image) -> int | None:
    """The EXIF orientation tag (1-8) from the header, before any pixel is read; None without one. (A PNG's
    eXIf chunk after its pixel data is not read: Pillow would decode the image to reach it, on the ingress's
    event loop, and the probe and the decode must agree. A TIFF that Pillow turns itself has none to apply.)"""
    if (img.format == "PNG" and "exif" not in img.info) or (img.format == "TIFF" and _PILLOW_TURNS_TIFFS):
        return None
    try:
        value = img.getexif().get(0x0112)
    except Exception:  # a broken EXIF block: shown as stored
        return None
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else None


def _to_8_bit(img: Image.Image) -> Image.Image:
    """Greyscale of more than 8 bits (16-bit PNGs, 32-bit integer or float TIFFs) as 8-bit greyscale, scaled:
    Pillow's convert("RGB") clips them, and a 16-bit scan came out almost all white. A colour key
    (`info["transparency"]`, one grey value at the image's own depth) is kept as an alpha channel ("LA")
    built from the unscaled values, so its pixels, and only they, are composited on white as an 8-bit key is."""
    if img.mode.startswith("I;16"):
        a = np.asarray(img)
        return _with_key(img, a, (a.astype(np.uint32) >> 8).astype(np.uint8))
    if img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(a)
        top = float(np.nanmax(np.where(finite, a, np.nan))) if finite.any() else 0.0
        # NaN (a float TIFF's "no data") as black, +inf as the brightest finite value: one NaN made the
        # maximum NaN and the whole image black.
        values = np.nan_to_num(a, nan=0.0, posinf=top, neginf=0.0)
        if img.mode == "I":
            # Values within 0..255 are already 8-bit; 16-bit values (what a 16-bit PNG opens as in mode I)
            # over 65535; else the image's own range. (200 was divided by 65535 and came out black.)
            full = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
        else:  # a float image in [0, 1], else its own range
            full = 1.0 if top <= 1.0 else top
        return _with_key(img, a, np.clip(values * (255.0 / full), 0, 255).round().astype(np.uint8))
    return img


def _with_key(img: Image.Image, original: np.ndarray, grey: np.ndarray) -> Image.Image:
    """`grey` as "L", or as "LA" transparent where `original` equals the image's colour key: Image.fromarray
    drops `info`, and a key scaled to 8 bits would also catch the other values that scale to it."""
    key = img.info.get("transparency")
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        alpha = np.where(original == key, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey, alpha], axis=-1), mode="LA")
    return Image.fromarray(grey, mode="L")


def open_image(data: bytes, *, max_bytes: int, max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> Image.Image:
    """Open lazily (header only) and apply the checks that need no pixels."""
    if not data:
        raise ImageError("the image is empty (0 bytes): send the image file's contents")
    if len(data) > max_bytes:
        raise ImageError(f"the image is {len(data)} bytes, over the limit of {max_bytes} bytes: send a smaller or more compressed image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own pixel cap below
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        w, h = img.size  # from the header: nothing decoded yet
    except Image.DecompressionBombError as exc:
        raise ImageError(f"the image has too many pixels ({exc}): downscale it before sending") from exc
    except Exception as exc:  # PIL raises several types for bad data
        raise ImageError(f"the image could not be decoded ({type(exc).__name__}): send a valid {_FORMAT_NAMES} file") from exc
    _check_size(h, w)
    if w * h > max_input_pixels:
        raise ImageError(f"the image is {w}x{h} = {w * h} pixels, over the limit of {max_input_pixels} pixels: downscale it before sending")
    return img


def _check_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise ImageError(f"the image has zero size ({width}x{height}): send an image with at least one pixel")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"the image's aspect ratio is {max(height, width) / min(height, width):.0f}:1 ({width}x{height}), "
                         f"over the limit of {MAX_ASPECT_RATIO}:1: crop or pad it")


def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int = 3136, max_pixels: int = 11_289_600) -> tuple[int, int]:
    """The resized (height, width): multiples of `factor`, aspect ratio kept, pixels in [min, max]."""
    _check_size(height, width)
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must be <= max_pixels ({max_pixels})")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_token_count(height: int, width: int, *, patch_size: int = 14, merge_size: int = 2,
                      min_pixels: int = 3136, max_pixels: int = 11_289_600) -> int:
    """Image-pad tokens for an original image of this size (1024x768 -> 999)."""
    factor = patch_size * merge_size
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // factor) * (w // factor)


@dataclass
class PreprocessedImages:
    """Packed model input for a list of images, in order."""

    pixel_values: torch.Tensor  # [N_patches, C*T*P*P] float32
    grid_thw: torch.Tensor  # [n_images, 3] int64, in patches
    num_tokens: list[int] = field(default_factory=list)  # image-pad tokens per image (= h*w/merge^2)

    @property
    def nbytes(self) -> int:
        return self.pixel_values.numel() * self.pixel_values.element_size() + self.grid_thw.numel() * 8

    @property
    def num_patches(self) -> list[int]:
        return [int(t * h * w) for t, h, w in self.grid_thw.tolist()]

    def split(self) -> list["PreprocessedImages"]:
        """One PreprocessedImages per image (views, no copy)."""
        out, start = [], 0
        for i, n in enumerate(self.num_patches):
            out.append(PreprocessedImages(self.pixel_values[start:start + n], self.grid_thw[i:i + 1], [self.num_tokens[i]]))
            start += n
        return out

    @staticmethod
    def concat(parts: list["PreprocessedImages"]) -> "PreprocessedImages":
        """Pack several preprocessed batches into one (for batching across requests)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        return PreprocessedImages(torch.cat([p.pixel_values for p in parts]), torch.cat([p.grid_thw for p in parts]),
                                  [n for p in parts for n in p.num_tokens])


def patchify(pixels: np.ndarray, *, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 1) -> tuple[np.ndarray, tuple[int, int, int]]:
    """[C, H, W] float array -> rows [grid_h*grid_w, C*T*P*P] in merge-window order, and (t, h, w) grid.

    Row order: for each 2x2 window (row-major over windows), its 4 patches row-major; values in a row are
    (c, t, py, px). A still image is repeated `temporal_patch_size` times along t.
    """
    c, height, width = pixels.shape
    p, m, t = patch_size, merge_size, temporal_patch_size
    gh, gw = height // p, width // p
    if gh * p != height or gw * p != width or gh % m or gw % m:
        raise ValueError(f"image size {width}x{height} is not a multiple of {p * m}: call smart_resize first")
    x = np.broadcast_to(pixels[None], (t, c, height, width))
    x = x.reshape(t, c, gh // m, m, p, gw // m, m, p)
    # -> (hb, wb, mh, mw, c, t, py, px)
    x = x.transpose(2, 5, 3, 6, 1, 0, 4, 7)
    return np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p)), (1, gh, gw)


def resize_for_model(img: Image.Image, *, factor: int, min_pixels: int, max_pixels: int) -> Image.Image:
    """The image in RGB at its `smart_resize` size (bicubic). A server may resize each image as soon as it is
    decoded (one full-size image in memory at a time) and pass `resized=True` to `preprocess_images`: resizing
    again is not a no-op (`smart_resize`'s rounding can move a resized size, or past the aspect-ratio limit)."""
    w, h = img.size
    rh, rw = smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    if (rw, rh) != (w, h):
        rgb = rgb.resize((rw, rh), resample=Image.Resampling.BICUBIC)
    return rgb


def preprocess_images(images: list[Image.Image], *, min_pixels: int = DEFAULTS.min_pixels, max_pixels: int = DEFAULTS.max_pixels,
                      max_images: int | None = None, patch_size: int = DEFAULTS.patch_size, merge_size: int = DEFAULTS.merge_size,
                      temporal_patch_size: int = DEFAULTS.temporal_patch_size,
                      image_mean: tuple[float, float, float] = DEFAULTS.image_mean,
                      image_std: tuple[float, float, float] = DEFAULTS.image_std,
                      resized: bool = False) -> PreprocessedImages:
    """Resize (bicubic), rescale 1/255, normalise and patchify each image; pack them in order. `resized`: the
    images come from `resize_for_model` with these bounds already, and are used at their size."""
    if max_images is not None and len(images) > max_images:
        raise ImageError(f"the request has {len(images)} images, over the limit of {max_images} per request: send fewer images")
    factor = patch_size * merge_size
    mean = np.asarray(image_mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(image_std, dtype=np.float32).reshape(3, 1, 1)
    rows, grids, tokens = [], [], []
    for img in images:
        if resized:
            rgb = img if img.mode == "RGB" else img.convert("RGB")
        else:
            rgb = resize_for_model(img, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        arr = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
        arr = (arr - mean) / std
        r, grid = patchify(arr, patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size)
        rows.append(torch.from_numpy(r))
        grids.append(grid)
        tokens.append(grid[0] * grid[1] * grid[2] // merge_size**2)
    dim = 3 * temporal_patch_size * patch_size * patch_size
    pixel_values = torch.cat(rows) if rows else torch.empty(0, dim)
    grid_thw = torch.tensor(grids, dtype=torch.int64).view(-1, 3)
    return PreprocessedImages(pixel_values, grid_thw, tokens)


def preprocess_with_config(images: list[Image.Image], cfg: PreprocessConfig, *, max_images: int | None = None,
                           max_pixels: int | None = None) -> PreprocessedImages:
    """`preprocess_images` with the checkpoint's values; `max_pixels` may lower the checkpoint's budget."""
    return preprocess_images(images, min_pixels=cfg.min_pixels, max_pixels=min(cfg.max_pixels, max_pixels or cfg.max_pixels),
                             max_images=max_images, patch_size=cfg.patch_size, merge_size=cfg.merge_size,
                             temporal_patch_size=cfg.temporal_patch_size, image_mean=cfg.image_mean, image_std=cfg.image_std)
