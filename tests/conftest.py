"""Shared test setup: import path, thread count, small image helpers."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from common.data import LabelledFiles  # noqa: E402  (after the path set-up)
from common.preprocess import decode_image  # noqa: E402

if TYPE_CHECKING:
    from server.variants import BackboneVariants

# Two xdist workers share two cores: one torch thread each (two each oversubscribe them).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# The files that take longest first (each over ~10 s), in this order: `make test` keeps it
# (--no-loadscope-reorder). xdist gives each of the two workers two files to start with (the 1st
# and 3rd to one, the 2nd and 4th to the other), then the rest as they free up: so the longest file
# (the deployment, about 3 minutes) starts beside a short one while the other worker works through
# the next longest, and no long file starts last and runs alone. The 2nd makes the session's shared
# Lite0 variants at once (its first run is in process), before the deployment's first run needs them.
LONGEST_FIRST = (
    "test_deployment.py",
    "test_faults_runtime.py",
    "test_ray_cluster.py",
    "test_personal_ncm.py",
    "test_secure_runs.py",
    "test_flower_runtime.py",
    "test_flower_variants.py",
    "test_edge_client.py",
    "test_export.py",
    "test_engines.py",
    "test_dashboard.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file stays


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


@dataclass(frozen=True)
class RealLite0:
    """The embedded EfficientNet-Lite0 at 224 px, its server-made engine variants (int8
    calibrated on the server's ELPV held-out split) and real ELPV images from the clients' share."""

    variants: BackboneVariants
    torch_model: torch.nn.Module
    images: np.ndarray  # (n, 3, 224, 224), preprocessed
    files: LabelledFiles


@pytest.fixture(scope="session")
def server_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of server-made backbone variants for the whole test session, xdist workers
    included: exporting and calibrating Lite0 costs ~20 s of CPU, and every Flower run with a
    fresh cache would pay it again. ``BackboneVariants`` locks the folder while it makes one."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / "shared-server-engines"
    path.mkdir(exist_ok=True)
    return path


def with_server_engines(cache: Path, engines: Path) -> Path:
    """A run cache whose server variants are the session's shared ones (node caches stay fresh)."""
    link = cache / "server" / "engines"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(engines, target_is_directory=True)
    return cache


def lite0_variants(engines: Path, cut: int = 0) -> BackboneVariants:
    """The embedded Lite0's server-made variants at 224 px (up to ``cut``) in the session's shared
    folder, int8 calibrated on the server's ELPV held-out split: whichever test needs one first
    makes it, for every later one and every Flower run of the session."""
    from common.backbones import fingerprint, load_backbone_weights, preprocess_for
    from common.data import elpv_split
    from common.export import calibration_images
    from server.variants import BackboneVariants

    name = "efficientnet_lite0"
    state = load_backbone_weights(name)
    preprocess = preprocess_for(name, 224, 1.0)
    server_test = elpv_split("4-level", 0, 0.25, 42)[1]
    return BackboneVariants(
        engines,
        name,
        state,
        preprocess,
        fingerprint(name, state, preprocess),
        calibration=lambda: calibration_images(server_test, preprocess),
        cut=cut,
    )


@pytest.fixture(scope="session")
def real_lite0(server_engines: Path) -> RealLite0:
    from common.backbones import build_backbone, load_backbone_weights, preprocess_for
    from common.data import elpv_split

    name = "efficientnet_lite0"
    state = load_backbone_weights(name)
    preprocess = preprocess_for(name, 224, 1.0)
    client_share = elpv_split("4-level", 0, 0.25, 42)[0]
    variants = lite0_variants(server_engines)
    files = client_share.subset(np.linspace(0, len(client_share) - 1, 64).round().astype(int))
    images = np.stack([preprocess(decode_image(Path(p).read_bytes())) for p in files.paths])
    return RealLite0(variants, build_backbone(name, state), images, files)
