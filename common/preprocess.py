"""Image preprocessing: one spec shared by server and clients, part of the fingerprint.

NumPy and Pillow only, so that ``edgesplit predict`` runs on a board without importing torch.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# What a bad file can raise while decoding; PIL's decompression-bomb guard stays on, so a huge
# image is skipped like a corrupt one.
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)

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
        image = image.convert("RGB")
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
    """Decode fully (not lazily) so that truncated files fail here, not inside the batch."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
