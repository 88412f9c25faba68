"""Image preprocessing: one spec shared by server and clients, part of the fingerprint.

NumPy and Pillow only, so that ``edgesplit predict`` runs on a board without importing torch.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 64_000_000  # larger images are refused before decoding (a 64 MP photo is ~200 MB as RGB)
# The formats of common/data.py's IMAGE_EXTENSIONS (PPM covers .pgm): Pillow tries no other decoder
# on untrusted bytes, whatever their name (EPS would run Ghostscript; PSD, ICO and the rest are code
# the product never needs).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")
BAND_PIXELS = 1 << 20  # high-bit-depth images are scaled to 8 bits about a million pixels at a time


class UnusableImage(ValueError):
    """A file's bytes are not an image we can use. ``reason`` is a short category for counting
    (e.g. "undecodable (UnidentifiedImageError)"); the message adds the details."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# What reading and decoding one untrusted file can raise: the file is skipped, the client goes on.
DECODE_ERRORS = (UnusableImage, OSError)

_INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes a backbone input tensor.

    Parameters
    ----------
    image_size : int
        Side of the square input the backbone sees.
    crop_pct : float
        Fraction of the resized image kept by the centre crop. 1.0 keeps the whole image, which
        suits tightly framed images such as solar cells; timm's ImageNet evaluation uses 0.875.
    interpolation : str
        "bicubic" or "bilinear".
    mean, std : tuple[float, float, float]
        Per-channel normalisation applied to RGB values in [0, 1].
    """

    image_size: int = 224
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in [32, 1024], got {self.image_size}.")
        if not 0.1 <= self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in [0.1, 1.0], got {self.crop_pct}.")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}.")

    def to_json(self) -> str:
        """Canonical JSON: the form that is hashed and sent over the wire."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        raw = json.loads(text)
        raw["mean"] = tuple(raw["mean"])
        raw["std"] = tuple(raw["std"])
        return cls(**raw)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """Resize the short side, centre-crop, normalise; returns a CHW float32 array."""
        image = to_rgb(image)
        resize_to = math.floor(self.image_size / self.crop_pct)
        width, height = image.size
        scale = resize_to / min(width, height)
        image = image.resize(
            (max(resize_to, round(width * scale)), max(resize_to, round(height * scale))),
            _INTERPOLATIONS[self.interpolation],
        )
        width, height = image.size
        left, top = (width - self.image_size) // 2, (height - self.image_size) // 2
        image = image.crop((left, top, left + self.image_size, top + self.image_size))
        pixels = (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        return np.ascontiguousarray((pixels - mean) / std, dtype=np.float32)


def decode_image(data: bytes) -> Image.Image:
    """Decode fully (not lazily) into RGB, so that a bad file fails here, not inside the batch.

    The bytes are untrusted: only the decoders of ``IMAGE_FORMATS`` see them, and whatever Pillow
    raises on them (there are many exception types for many formats) becomes ``UnusableImage``
    naming the cause. Huge images are refused from their header, before their pixels are decoded.
    """
    # Pillow warns about damage it works around (corrupt EXIF, odd tags); what matters is whether
    # the image decodes, and a skipped file is reported once, by the caller.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise UnusableImage(
                    "too large", f"{width}x{height} pixels, limit {MAX_PIXELS // 1_000_000} MP; downscale it"
                )
            image.load()
            return to_rgb(image)
        except UnusableImage:
            raise
        except UnidentifiedImageError as error:
            detail = f"{error}; it is damaged, or not in a format read here ({', '.join(IMAGE_FORMATS)})"
            raise UnusableImage("undecodable (UnidentifiedImageError)", detail) from error
        except Image.DecompressionBombError as error:  # Pillow's own guard, for even larger images
            raise UnusableImage("too large", f"{error} Downscale it.") from error
        except Exception as error:  # untrusted input: any failure means this file is unusable
            raise UnusableImage(f"undecodable ({type(error).__name__})", str(error)) from error


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB. High-bit-depth greyscale (16-bit PNG and TIFF, 32-bit integer
    and float) is scaled to 8 bits rather than clipped, which would turn it white; transparency
    is dropped, as torchvision's ImageFolder loader does."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        return _high_bit_depth_to_grey(image).convert("RGB")
    if image.mode == "P":  # palette transparency needs RGBA first (Pillow warns otherwise)
        image = image.convert("RGBA")
    return image.convert("RGB")


def _high_bit_depth_to_grey(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float greyscale image as 8-bit "L": divided by its top (65535 or
    255; 1.0 or 255 for float), clipped to [0, 1], NaN as 0, scaled to 255 and rounded.

    In float64 one band of rows at a time, never the whole image: a 64 MP 16-bit image is 128 MB
    as it is, 512 MB as float64, and each step of the arithmetic would take as much again."""
    width, height = image.size
    rows = max(1, BAND_PIXELS // max(width, 1))
    bands = [(first, min(first + rows, height)) for first in range(0, height, rows)]

    def band(first: int, last: int) -> np.ndarray:
        return np.asarray(image.crop((0, first, width, last)), dtype=np.float64)

    # fmax ignores NaN, as nanmax does, without warning on an all-NaN band
    peak = max((float(np.fmax.reduce(band(*span), axis=None, initial=-np.inf)) for span in bands), default=-np.inf)
    tops = (1.0, 255.0) if image.mode == "F" else (255.0, 65535.0)  # (for a peak up to the first, above it)
    top = tops[0] if peak <= tops[0] else tops[1]
    grey = np.empty((height, width), dtype=np.uint8)
    for first, last in bands:
        values = band(first, last)
        values /= top  # in place: one band of float64 at a time
        np.clip(values, 0.0, 1.0, out=values)
        values *= 255.0
        grey[first:last] = np.nan_to_num(values, copy=False).round(out=values)
    return Image.fromarray(grey)
