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


def write_image_folder(root: Path, classes: dict[str, int], seed: int, size: int = 48) -> Path:
    """An ImageFolder of real PNGs: one sub-folder per class, each class a different mean tone."""
    rng = np.random.default_rng(seed)
    for position, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        tone = 40 + (60 * position) % 200
        for index in range(count):
            pixels = np.clip(rng.normal(tone, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return root


@pytest.fixture
def png_writer():
    return write_png
