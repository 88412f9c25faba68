"""Backbone engines: each variant the server makes computes the torch backbone's features on real
ELPV images, is fingerprinted by its bytes, and is refused by a client when it does not match."""

from __future__ import annotations

import importlib.util
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from client.state import ProcessState
from common.engines import (
    ENGINE_KINDS,
    EngineError,
    FingerprintMismatch,
    OnnxEngine,
    TorchEngine,
    resolve_engine,
)
from common.protocol import ONNX_MODEL
from tests.conftest import RealLite0
from tests.protocol_samples import instructions


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def reference(real_lite0: RealLite0) -> np.ndarray:
    """PyTorch eager (NCHW) features: the reference every engine is held to."""
    with torch.inference_mode():
        return real_lite0.torch_model(torch.from_numpy(real_lite0.images)).numpy()


def test_torch_channels_last_matches_eager(real_lite0: RealLite0, reference: np.ndarray) -> None:
    features = TorchEngine(real_lite0.torch_model)(real_lite0.images)
    assert _cosines(features, reference).min() > 0.9999


def test_onnx_fp32_matches_torch_on_every_image(real_lite0: RealLite0, reference: np.ndarray) -> None:
    engine = OnnxEngine(real_lite0.variants.path("onnx"))
    features = np.concatenate([engine(batch) for batch in np.array_split(real_lite0.images, 8)])
    assert features.shape == reference.shape == (64, 1280)
    assert _cosines(features, reference).min() > 0.999


def test_onnx_int8_stays_close_to_torch(real_lite0: RealLite0, reference: np.ndarray) -> None:
    """What this CPU's int8 kernels compute (x86 with or without VNNI, ARM): the engine asks ONNX
    Runtime for its exact kernels where the fast ones saturate, so the bar is the same everywhere."""
    engine = OnnxEngine(real_lite0.variants.path("onnx-int8"))
    cosines = _cosines(engine(real_lite0.images), reference)
    assert cosines.mean() > 0.98, np.round(np.sort(cosines)[:5], 4)
    assert cosines.min() > 0.95, np.round(np.sort(cosines)[:5], 4)
    # and it is really int8: a quarter of the fp32 file, with quantize/dequantize pairs
    int8_size, fp32_size = (real_lite0.variants.path(e).stat().st_size for e in ("onnx-int8", "onnx"))
    assert int8_size < 0.4 * fp32_size


# Run in a torch-free child process under emulation: int8 features of the engine as it sets itself
# up on that CPU, and of the same model on ONNX Runtime's fast kernels only (the engine before issue 15).
_EMULATED_CHILD = """
import json, sys
import numpy as np
from common.engines import OnnxEngine, int8_kernels_saturate
images = np.load(sys.argv[2])
features = {str(exact): OnnxEngine(sys.argv[1], 1, exact_int8=exact)(images).tolist() for exact in (None, False)}
print(json.dumps({"saturates": int8_kernels_saturate(), **features}))
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates an x86-64 CPU class with this x86-64 Python")
def test_onnx_int8_holds_on_an_emulated_avx2_cpu_without_vnni(
    real_lite0: RealLite0, reference: np.ndarray, tmp_path: Path
) -> None:
    """The CPU class where ONNX Runtime's u8s8 kernels saturate (AVX2, no AVX-512, no VNNI), emulated
    by qemu so that ONNX Runtime dispatches the kernels such a CPU runs (slow: four images)."""
    assert shutil.which("qemu-x86_64"), "qemu-user is missing: `make setup` installs it (apt-get install qemu-user)"
    np.save(tmp_path / "images.npy", real_lite0.images[:4])
    command = ["qemu-x86_64", "-cpu", "Haswell", sys.executable, "-c", _EMULATED_CHILD]
    model = str(real_lite0.variants.path("onnx-int8"))
    done = subprocess.run(
        [*command, model, str(tmp_path / "images.npy")],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout.splitlines()[-1])
    assert answer.pop("saturates") is True  # the engine sees the emulated CPU, not its VNNI host
    features = {key: np.asarray(value) for key, value in answer.items()}
    exact, fast = (_cosines(features[key], reference[:4]) for key in ("None", "False"))
    assert exact.mean() > 0.98 and exact.min() > 0.95, exact  # the engine as a board runs it
    assert fast.mean() < 0.95, fast  # the saturation the engine avoids is really there on this class


# Run by the emulated arm64 Python: the int8 engine as a board sets it up, and what the emulated CPU
# says it has (AT_HWCAP from the auxiliary vector: bit 20 is the dot-product instructions, asimddp).
_ARM64_CHILD = """
import json, platform, struct, sys
import numpy as np
from common.engines import OnnxEngine, int8_kernels_saturate
images = np.load(sys.argv[2])
auxv = dict(struct.iter_unpack("<QQ", open("/proc/self/auxv", "rb").read()))
features = OnnxEngine(sys.argv[1], 1)(images).tolist()
print(json.dumps({"machine": platform.machine(), "dotprod": bool(auxv.get(16, 0) >> 20 & 1),
                  "saturates": int8_kernels_saturate(), "features": features}))
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="compares an emulated aarch64 board with this x86-64 host")
def test_onnx_int8_on_an_emulated_arm64_board_computes_the_x86_features(
    real_lite0: RealLite0, reference: np.ndarray, tmp_path: Path
) -> None:
    """A Raspberry Pi 5's CPU (qemu-aarch64 -cpu cortex-a76: dot-product instructions) runs the int8
    model in the aarch64 ONNX Runtime wheel of a board's install (deploy/arm64_userland.py) and
    computes this x86 host's int8 features: both accumulate int8 products in 32 bits, so only the
    float parts differ. The bar (cosine 0.999 on every image) sits between that agreement and the
    int8-vs-fp32 gap (about 0.994), so a saturating or otherwise different ARM kernel fails it."""
    from deploy.arm64_userland import SetupError, require

    try:
        userland = require()
    except SetupError as error:
        pytest.fail(str(error))
    images = real_lite0.images[:4]
    np.save(tmp_path / "images.npy", images)
    model = str(real_lite0.variants.path("onnx-int8"))
    done = subprocess.run(
        userland.command("-c", _ARM64_CHILD, model, str(tmp_path / "images.npy"), cpu="cortex-a76"),
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout.splitlines()[-1])
    assert (answer["machine"], answer["dotprod"], answer["saturates"]) == ("aarch64", True, False)
    arm = np.asarray(answer["features"])
    x86 = OnnxEngine(real_lite0.variants.path("onnx-int8"), 1)(images)  # exact on every x86 class (above)
    to_x86 = _cosines(arm, x86)
    assert to_x86.min() > 0.999, to_x86
    to_fp32 = _cosines(arm, reference[:4])
    assert to_fp32.mean() > 0.98 and to_fp32.min() > 0.95, to_fp32  # the golden check's bar


def test_variant_fingerprints_name_the_engine_and_cover_the_bytes(real_lite0: RealLite0) -> None:
    variants = real_lite0.variants
    prints = {engine: variants.variant_fingerprint(engine) for engine in ("torch", "onnx", "onnx-int8")}
    assert prints["torch"] == variants.fingerprint  # the torch variant is the backbone itself
    assert len(set(prints.values())) == 3
    artifact = variants.artifact("onnx-int8")
    int8, fp32 = ENGINE_KINDS["onnx-int8"], ENGINE_KINDS["onnx"]
    assert int8.variant_fingerprint(variants.fingerprint, artifact) == prints["onnx-int8"]
    assert fp32.variant_fingerprint(variants.fingerprint, artifact) != prints["onnx-int8"]
    flipped = bytearray(artifact)
    flipped[len(flipped) // 2] ^= 1
    assert int8.variant_fingerprint(variants.fingerprint, bytes(flipped)) != prints["onnx-int8"]


def test_made_once_then_read_from_the_server_cache(real_lite0: RealLite0) -> None:
    from server.variants import BackboneVariants

    variants = real_lite0.variants
    path = variants.path("onnx-int8")
    before = path.stat().st_mtime_ns
    again = BackboneVariants(
        variants.directory.parent,
        variants.name,
        variants.state,
        variants.preprocess,
        variants.fingerprint,
        calibration=lambda: pytest.fail("calibrated again"),  # type: ignore[arg-type, return-value]
    )
    assert again.variant_fingerprint("onnx-int8") == variants.variant_fingerprint("onnx-int8")
    assert path.stat().st_mtime_ns == before


def test_a_client_keeps_a_variant_only_if_it_hashes_as_announced(real_lite0: RealLite0, tmp_path: Path) -> None:
    variants, fp, kind = real_lite0.variants, real_lite0.variants.fingerprint, ENGINE_KINDS["onnx-int8"]
    expected = variants.variant_fingerprint("onnx-int8")
    sent = instructions(fingerprint=fp, engine=kind.name, engine_fingerprint=expected)
    cache = ProcessState().backbones(tmp_path)
    assert cache.held(kind, fp) is None
    tampered = bytearray(variants.artifact("onnx-int8"))
    tampered[-100] ^= 0xFF
    with pytest.raises(FingerprintMismatch, match="announced"):
        cache.keep(kind, kind.pack(bytes(tampered)), sent)
    assert cache.held(kind, fp) is None  # nothing half-kept

    cache.keep(kind, {ONNX_MODEL: np.frombuffer(variants.artifact("onnx-int8"), np.uint8)}, sent)
    assert cache.holds(kind, fp, expected)
    features = cache.engine(kind, fp, expected)(real_lite0.images[:2])
    assert features.shape == (2, 1280)

    # the file rots on disk: a new process sees another hash and the server sends it again
    path = tmp_path / "backbones" / f"{fp}.onnx-int8.onnx"
    path.write_bytes(bytes(tampered))
    assert not ProcessState().backbones(tmp_path).holds(kind, fp, expected)
    with pytest.raises(FingerprintMismatch, match="server must send it"):
        ProcessState().backbones(tmp_path).engine(kind, fp, expected)


def test_auto_picks_int8_where_onnx_runtime_exists_and_torch_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_engine("auto") is ENGINE_KINDS["onnx-int8"]
    assert resolve_engine("torch") is ENGINE_KINDS["torch"]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a)
    )
    assert resolve_engine("auto").name == "torch"
    with pytest.raises(EngineError, match=r"pip install 'edgesplit\[edge\]'"):
        resolve_engine("onnx-int8")
    with pytest.raises(EngineError, match="Unknown engine"):
        resolve_engine("tensorrt")
