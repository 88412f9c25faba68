"""Bad input on a device: a generated corpus of broken, odd and hostile files in an ImageFolder
is fully accounted for (every file used or skipped with its reason), odd modes are converted,
and a fuzzer feeding the image loader garbage never gets past ``UnusableImage``."""

from __future__ import annotations

import io
import struct
import tomllib
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packaging.requirements import Requirement
from PIL import Image

from common import preprocess
from common.data import IMAGE_EXTENSIONS, scan_image_folder
from common.embedding import EmbeddingCache, embed_files
from common.preprocess import DECODE_ERRORS, IMAGE_FORMATS, MAX_PIXELS, PreprocessSpec, UnusableImage, decode_image
from tests.conftest import REPO_ROOT

PREPROCESS = PreprocessSpec(image_size=32)


def features_engine(batch: np.ndarray) -> np.ndarray:
    """A stand-in backbone: per-channel means (the files, not the network, are under test)."""
    return batch.mean(axis=(2, 3))


def _encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (with valid CRCs) and carries no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))


def _rgb(seed: int, size: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An ImageFolder with one file of each kind; returns (root, file name -> expected outcome),
    where the outcome is "used" or the start of the skip reason."""
    root = tmp_path / "data"
    ok, crack = root / "ok", root / "crack"
    ok.mkdir(parents=True)
    crack.mkdir()
    (root / "empty-class").mkdir()  # a known class with no images: noted, not fatal
    (ok / "nested").mkdir()  # a sub-folder is not a file
    outside = tmp_path / "secret.png"
    outside.write_bytes(_encoded(_rgb(9), "PNG"))
    good_png = _encoded(_rgb(1), "PNG")
    good_jpeg = _encoded(_rgb(2), "JPEG", quality=90)
    grey16 = Image.fromarray(np.linspace(0, 65535, 40 * 40).reshape(40, 40).astype(np.uint16))
    palette = _rgb(3).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    frames = [_rgb(4).convert("P"), _rgb(5).convert("P")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    files = {
        ok / "good.png": (good_png, "used"),
        ok / "good.jpg": (good_jpeg, "used"),
        ok / "grey16.png": (_encoded(grey16, "PNG"), "used"),
        ok / "rgba.png": (_encoded(_rgb(6).convert("RGBA"), "PNG"), "used"),
        ok / "palette.png": (_encoded(palette, "PNG", transparency=0), "used"),
        ok / "grey.png": (_encoded(_rgb(7).convert("L"), "PNG"), "used"),
        ok / "bilevel.png": (_encoded(_rgb(8).convert("1"), "PNG"), "used"),
        ok / "cmyk.jpg": (_encoded(_rgb(10).convert("CMYK"), "JPEG"), "used"),
        ok / "float.tif": (_encoded(Image.fromarray(np.full((40, 40), 0.5, np.float32)), "TIFF"), "used"),
        ok / "animated.gif": (gif.getvalue(), "used"),
        crack / "truncated.png": (good_png[: len(good_png) // 2], "undecodable"),
        crack / "truncated.jpg": (good_jpeg[: len(good_jpeg) // 3], "undecodable"),
        crack / "random.png": (np.random.default_rng(0).bytes(700), "undecodable"),
        crack / "text.jpg": (b"this is not a JPEG\n" * 10, "undecodable"),
        crack / "pcx.png": (_encoded(_rgb(12), "PCX"), "undecodable"),  # Pillow reads PCX; the product does not
        crack / "zero.png": (b"", "empty file"),
        crack / "huge.png": (_png_header_only(9_000, 8_000), "too large"),
        crack / "notes.txt": (b"field notes", "not an image file"),
        crack / ".DS_Store": (b"\0\0\0\1Bud1", "not an image file"),
    }
    expected = {}
    for path, (data, outcome) in files.items():
        path.write_bytes(data)
        expected[path.name] = outcome
    (crack / "escape.png").symlink_to(outside)
    expected["escape.png"] = "symlink out of the data folder"
    (crack / "inside-link.png").symlink_to(ok / "good.png")
    expected["inside-link.png"] = "used"
    (crack / "dangling.png").symlink_to(ok / "deleted.png")
    expected["dangling.png"] = "unreadable"
    return root, expected


def test_every_file_of_a_bad_corpus_is_used_or_skipped_with_its_reason(
    corpus: tuple[Path, dict[str, str]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, expected = corpus
    files = scan_image_folder(root, ("ok", "crack", "empty-class"))
    assert "no images for classes: ['empty-class']" in files.notes
    cache = EmbeddingCache(tmp_path / "cache", "f" * 64)
    with caplog.at_level("WARNING"):
        embedded = embed_files(files, lambda: features_engine, PREPROCESS, cache, batch_size=4, who="board")
    cache.close()

    used = {Path(files.paths[i]).name for i in embedded.positions}
    skipped = {Path(path).name: reason for path, reason in embedded.stats.skipped_files}
    assert not used & set(skipped)
    assert used | set(skipped) == set(expected)  # nothing unaccounted for
    for name, outcome in expected.items():
        if outcome == "used":
            assert name in used, f"{name} was skipped: {skipped.get(name)}"
        else:
            assert skipped.get(name, "").startswith(outcome), f"{name}: {skipped.get(name)!r}, expected {outcome!r}"
    assert embedded.features.shape == (len(used), 1, 3) and np.all(np.isfinite(embedded.features))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1  # one clear warning, with counts by reason and a first example
    assert f"skipped {len(skipped)} of {len(expected)} images" in warnings[0]


@pytest.mark.parametrize("fmt", ["PCX", "TGA", "ICO", "SGI", "QOI", "DDS"])
def test_only_the_formats_the_product_reads_are_decoded(fmt: str) -> None:
    """Pillow decodes these; a board hands untrusted bytes to the decoders of its own formats only."""
    data = _encoded(_rgb(13, 16), fmt)
    with pytest.raises(UnusableImage, match="not in a format read here") as error:
        decode_image(data)
    assert error.value.reason == "undecodable (UnidentifiedImageError)"  # counted like other unreadable files


def test_every_image_extension_has_its_decoder_and_nothing_more() -> None:
    Image.init()
    formats = {Image.registered_extensions()[extension] for extension in IMAGE_EXTENSIONS}
    assert formats == set(IMAGE_FORMATS)
    for data in [*SEEDS, _encoded(_rgb(14, 16), "PPM"), _encoded(_rgb(15, 16).convert("L"), "PPM")]:
        assert decode_image(data).mode == "RGB"


def test_the_pillow_floor_has_the_libwebp_fix() -> None:
    """CVE-2023-4863 (libwebp heap overflow): Pillow 10.0.1's wheels bundle the fixed libwebp 1.3.2."""
    requirement = next(Requirement(r) for r in _project()["dependencies"] if r.startswith("pillow"))
    assert not requirement.specifier.contains("10.0.0") and requirement.specifier.contains("10.0.1")


def _project() -> dict[str, Any]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    image = decode_image(_encoded(Image.fromarray(ramp), "PNG"))
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    assert pixels.min() == 0 and pixels.max() == 255
    assert 120 < pixels.mean() < 136  # a ramp stays a ramp (clipping would make it nearly all white)


def _previous_grey(image: Image.Image) -> np.ndarray:
    """How high-bit-depth greyscale became 8 bits before it was done in bands: the reference."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if values.size and np.nanmax(values) <= 1.0 else 255.0
    else:
        top = 65535.0 if values.size and np.max(values) > 255 else 255.0
    return np.nan_to_num(np.clip(values / top, 0.0, 1.0) * 255.0).round().astype(np.uint8)


HIGH_BIT_DEPTH = {
    "16-bit ramp": np.linspace(0, 65535, 37 * 53).reshape(37, 53).astype(np.uint16),
    "16-bit, all below 256": np.arange(37 * 53).reshape(37, 53).astype(np.uint16) % 256,
    "32-bit, out of range": np.linspace(-70_000, 140_000, 37 * 53).reshape(37, 53).astype(np.int32),
    "float in [0, 1] with NaN": np.where(np.eye(37, 53) > 0, np.nan, np.linspace(0, 1, 37 * 53).reshape(37, 53)),
    "float above 1 with inf": np.where(np.eye(37, 53) > 0, np.inf, np.linspace(-3, 400, 37 * 53).reshape(37, 53)),
}


@pytest.mark.parametrize("name", list(HIGH_BIT_DEPTH))
def test_high_bit_depth_in_bands_equals_the_previous_pipeline(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pixels = HIGH_BIT_DEPTH[name]
    image = Image.fromarray(pixels.astype(np.float32) if pixels.dtype.kind == "f" else pixels)
    monkeypatch.setattr(preprocess, "BAND_PIXELS", 100)  # bands of one or two rows: the seams are exercised
    converted = np.asarray(preprocess.to_rgb(image))
    expected = _previous_grey(image)
    for channel in range(3):
        np.testing.assert_array_equal(converted[..., channel], expected)


def test_a_large_sixteen_bit_image_is_never_held_in_floats_at_full_size() -> None:
    """9 MP of 16-bit greyscale: the previous pipeline's float64 copies peaked near 260 MB of NumPy
    memory; now the 8-bit result (9 MB) and a few bands of float64 are all there is."""
    side = 3000
    ramp = (np.arange(side, dtype=np.uint32)[None, :] * 21 + np.arange(side, dtype=np.uint32)[:, None]) % 65536
    data = _encoded(Image.fromarray(ramp.astype(np.uint16)), "PNG", compress_level=1)
    del ramp
    tracemalloc.start()
    try:
        image = decode_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image.mode == "RGB" and image.size == (side, side)
    assert peak < side * side + 4 * 8 * preprocess.BAND_PIXELS, f"peak {peak / 1e6:.0f} MB"


@pytest.mark.parametrize("side", [9_000, 20_000])  # above our limit; above Pillow's bomb guard too
def test_a_huge_image_is_refused_from_its_header(side: int) -> None:
    assert side * 8_000 > MAX_PIXELS
    with pytest.raises(UnusableImage, match="too large") as error:
        decode_image(_png_header_only(side, 8_000))
    assert error.value.reason == "too large" and "downscale" in str(error.value).lower()


# --- fuzzing the loader --------------------------------------------------------------------------

SEEDS = [
    _encoded(_rgb(11, 24), fmt)
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")  # every format Pillow may be handed here
]


def _must_not_crash(data: bytes) -> None:
    try:
        image = decode_image(data)
    except DECODE_ERRORS as error:
        assert isinstance(error, UnusableImage) and error.reason
        return
    assert image.mode == "RGB"
    assert PREPROCESS(image).shape == (3, 32, 32)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_the_loader(data: bytes) -> None:
    _must_not_crash(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEEDS),
    cut=st.integers(min_value=0, max_value=4096),
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=4095), st.integers(1, 255)), max_size=8),
)
def test_damaged_real_images_never_crash_the_loader(seed: bytes, cut: int, flips: list[tuple[int, int]]) -> None:
    data = bytearray(seed[: max(cut, 8)])
    for position, mask in flips:
        if position < len(data):
            data[position] ^= mask
    _must_not_crash(bytes(data))


def test_a_folder_of_garbage_never_stops_embedding(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    folder = tmp_path / "data" / "ok"
    folder.mkdir(parents=True)
    (folder / "good.png").write_bytes(_encoded(_rgb(1), "PNG"))
    for index in range(40):
        seed = SEEDS[index % len(SEEDS)]
        data = bytearray(seed[: rng.integers(8, len(seed) + 1)])
        for position in rng.integers(0, len(data), 4):
            data[position] ^= int(rng.integers(1, 256))
        (folder / f"garbage{index}.png").write_bytes(bytes(data))
    files = scan_image_folder(tmp_path / "data", ("ok",))
    cache = EmbeddingCache(tmp_path / "cache", "f" * 64)
    embedded = embed_files(files, lambda: features_engine, PREPROCESS, cache, batch_size=8)
    cache.close()
    assert len(embedded.positions) + embedded.stats.num_skipped == 41
    assert "good.png" in {Path(files.paths[int(i)]).name for i in embedded.positions}
