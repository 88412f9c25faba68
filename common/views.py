"""Views of an image that the device embeds once and trains on: the flips and 90-degree rotations.

The frozen backbone is not invariant to them, so each view is its own embedding, computed once and
cached like any other. Training then draws a view per image per epoch (augmentation without
running the backbone again); evaluation can average the prediction over the views.

Solar cells (the embedded default) are symmetric under all eight (the dihedral group of the
square); for other data choose the set that keeps the label, e.g. ``hflip`` for photos.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Each view maps a (channels, height, width) array to the same shape (square images).
VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda x: x,
    "hflip": lambda x: x[:, :, ::-1],
    "vflip": lambda x: x[:, ::-1, :],
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "rot180": lambda x: np.rot90(x, 2, axes=(1, 2)),
    "rot270": lambda x: np.rot90(x, 3, axes=(1, 2)),
    "transpose": lambda x: x.transpose(0, 2, 1),
    "antitranspose": lambda x: np.rot90(x, 2, axes=(1, 2)).transpose(0, 2, 1),
}
VIEW_SETS: dict[str, tuple[str, ...]] = {
    "none": ("identity",),
    "hflip": ("identity", "hflip"),
    "flips": ("identity", "hflip", "vflip", "rot180"),
    "dihedral": tuple(VIEWS),
}


class ViewError(ValueError):
    """A view set names a view that does not exist."""


def parse_views(text: str) -> tuple[str, ...]:
    """A named set (``none``, ``hflip``, ``flips``, ``dihedral``) or a comma list of views; the
    identity always comes first, since evaluation without averaging uses it alone."""
    text = text.strip()
    names = VIEW_SETS.get(text) or tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in VIEWS]
    if unknown or not names:
        raise ViewError(
            f"Unknown view(s) {unknown or [text]}: use one of the sets {list(VIEW_SETS)} "
            f"or a comma list of {list(VIEWS)}."
        )
    return ("identity", *dict.fromkeys(name for name in names if name != "identity"))


def apply_view(name: str, image: np.ndarray) -> np.ndarray:
    """One view of a preprocessed (channels, height, width) image, as a contiguous array."""
    return np.ascontiguousarray(VIEWS[name](image))
