"""The server's backbone in every engine's form, made on first request and kept on disk.

One backbone, one fingerprint, three variants (``common/engines.py``): the torch weights
themselves, an ONNX fp32 export and an int8 model calibrated on the server's own held-out
images. At a later cut (``common/split.py``) the ONNX variants are the backbone up to the cut:
what the devices run once per image. Exporting and calibrating take ~10 s for
EfficientNet-Lite0 on two cores, so each is done once per backbone, cut and cache folder, and
only for an engine some client or the server uses.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.backbones import build_backbone, get_spec
from common.engines import ONNX_ENGINES, Engine, EngineKind, OnnxKind, TorchEngine, engine_kind
from common.export import export_onnx
from common.logs import quiet_root_logger
from common.preprocess import PreprocessSpec
from common.protocol import ONNX_INPUT, ONNX_OUTPUT, GoldenBatch
from common.split import split_backbone

log = logging.getLogger(__name__)

GOLDEN_IMAGES = 4  # held-out images a node checks its engine on: ~1.2 MB at 224 px in float16


class BackboneVariants:
    """Artifacts and fingerprints of one backbone's engine variants."""

    def __init__(
        self,
        directory: Path,
        name: str,
        state: dict[str, torch.Tensor],
        preprocess: PreprocessSpec,
        fingerprint: str,
        calibration: Callable[[], np.ndarray],
        cut: int = 0,
    ) -> None:
        self.directory = directory / fingerprint[:32] / (f"cut{cut}" if cut else "")
        self.cut = cut
        self.name = name
        self.state = state
        self.preprocess = preprocess
        self.fingerprint = fingerprint
        self._calibration = calibration
        self._lock = threading.Lock()
        self._bytes: dict[str, bytes] = {}
        self._fingerprints: dict[str, str] = {}  # asked for every message of every round: hash once
        self._golden: GoldenBatch | None = None

    def path(self, kind: EngineKind | str) -> Path:
        """The ONNX file of an ONNX engine's variant, made if this server has not made it yet."""
        kind = engine_kind(kind) if isinstance(kind, str) else kind
        if not isinstance(kind, OnnxKind):
            raise ValueError(f"No ONNX variant for engine '{kind.name}'; ONNX engines: {list(ONNX_ENGINES)}.")
        with self._lock:
            return self._ensure(kind)

    def artifact(self, kind: EngineKind | str) -> Any:
        """What a client of this engine receives: the weights, or the ONNX file's bytes."""
        kind = engine_kind(kind) if isinstance(kind, str) else kind
        if not isinstance(kind, OnnxKind):
            return self.state
        with self._lock:
            if kind.name not in self._bytes:
                self._bytes[kind.name] = self._ensure(kind).read_bytes()
            return self._bytes[kind.name]

    def variant_fingerprint(self, kind: EngineKind | str) -> str:
        kind = engine_kind(kind) if isinstance(kind, str) else kind
        if kind.name not in self._fingerprints:
            artifact = self.artifact(kind) if isinstance(kind, OnnxKind) else None
            self._fingerprints[kind.name] = kind.variant_fingerprint(self.fingerprint, artifact)
        return self._fingerprints[kind.name]

    def golden(self) -> GoldenBatch:
        """A few of the server's own held-out images (the calibration images, evenly spread) as
        float16, and the fp32 torch backbone's features (up to the cut) of exactly those values."""
        with self._lock:
            if self._golden is None:
                path = self.directory / "golden.npz"
                if not path.is_file():
                    images = self._calibration()
                    picks = np.linspace(0, len(images) - 1, min(GOLDEN_IMAGES, len(images))).round().astype(int)
                    small = images[picks].astype(np.float16)
                    features = TorchEngine(self._prefix(), channels_last=False)(small.astype(np.float32))
                    self.directory.mkdir(parents=True, exist_ok=True)
                    temporary = path.with_suffix(f".tmp{os.getpid()}")
                    with temporary.open("wb") as handle:
                        np.savez(handle, images=small, features=features)
                    temporary.replace(path)
                with np.load(path) as stored:
                    self._golden = GoldenBatch.from_arrays({name: stored[name] for name in stored.files})
            return self._golden

    def engine(self, kind: EngineKind | str, num_threads: int = 0) -> Engine:
        """A runnable engine of this backbone (up to the cut) for the server's own embedding."""
        kind = engine_kind(kind) if isinstance(kind, str) else kind
        if not isinstance(kind, OnnxKind):
            return TorchEngine(self._prefix())
        return kind.load(self.path(kind), self.cut, num_threads)

    def _ensure(self, kind: OnnxKind) -> Path:
        # Another server process may share this cache: one makes a variant, the other waits for it.
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._make(kind)

    def _make(self, kind: OnnxKind) -> Path:
        fp32 = self.directory / OnnxKind.server_file
        if not fp32.is_file():
            log.info("Exporting backbone %s to ONNX (once per backbone)", self.name)
            image_size = self.preprocess.image_size
            export_onnx(self._prefix(), (3, image_size, image_size), fp32, ONNX_INPUT, [ONNX_OUTPUT])
        target = self.directory / kind.server_file
        if not target.is_file():
            log.info("Making the %s backbone from the fp32 export (once per backbone)", kind.name)
            with quiet_root_logger():  # the quantizer logs every rescaled channel at INFO
                kind.make(fp32, target, self._calibration, get_spec(self.name).int8_float_convs)
        return target

    def _prefix(self) -> torch.nn.Module:
        return split_backbone(self.name, build_backbone(self.name, self.state), self.cut)[0]
