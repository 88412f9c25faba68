"""Shared test setup: import path, thread count, small image helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

torch.set_num_threads(2)


def write_png(path: Path, seed: int, size: int = 40) -> Path:
    """A real RGB PNG: a colour drawn from ``seed`` plus noise, so images differ clearly."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 192, 3)
    pixels = colour + rng.integers(0, 64, (size, size, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path, format="PNG")
    return path


@pytest.fixture
def png_writer():
    return write_png
