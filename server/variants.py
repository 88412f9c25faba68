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
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common.backbones import build_backbone, get_spec
from common.engines import ONNX_INPUT, ONNX_OUTPUT, Engine, OnnxEngine, TorchEngine, variant_fingerprint
from common.export import export_onnx, quantize_int8
from common.logs import quiet_root_logger
from common.preprocess import PreprocessSpec
from common.split import split_backbone

log = logging.getLogger(__name__)


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

    def path(self, engine: str) -> Path:
        """The ONNX file of an ONNX engine's variant, made if this server has not made it yet."""
        with self._lock:
            return self._ensure(engine)

    def artifact(self, engine: str) -> bytes:
        """The bytes a client of this engine receives (ONNX engines only)."""
        with self._lock:
            if engine not in self._bytes:
                self._bytes[engine] = self._ensure(engine).read_bytes()
            return self._bytes[engine]

    def variant_fingerprint(self, engine: str) -> str:
        if engine not in self._fingerprints:
            artifact = None if engine == "torch" else self.artifact(engine)
            self._fingerprints[engine] = variant_fingerprint(self.fingerprint, engine, artifact)
        return self._fingerprints[engine]

    def engine(self, engine: str, num_threads: int = 0) -> Engine:
        """A runnable engine of this backbone (up to the cut) for the server's own embedding."""
        if engine == "torch":
            return TorchEngine(self._prefix())
        return OnnxEngine(self.path(engine), num_threads)

    def _ensure(self, engine: str) -> Path:
        # Another server process may share this cache: one makes a variant, the other waits for it.
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._make(engine)

    def _make(self, engine: str) -> Path:
        fp32 = self.directory / "backbone.onnx"
        if not fp32.is_file():
            log.info("Exporting backbone %s to ONNX (once per backbone)", self.name)
            image_size = self.preprocess.image_size
            export_onnx(self._prefix(), (3, image_size, image_size), fp32, ONNX_INPUT, [ONNX_OUTPUT])
        if engine == "onnx":
            return fp32
        if engine != "onnx-int8":
            raise ValueError(f"No ONNX variant for engine {engine!r}.")
        int8 = self.directory / "backbone-int8.onnx"
        if not int8.is_file():
            log.info("Calibrating the int8 backbone on the server's held-out images (once per backbone)")
            with quiet_root_logger():  # the quantizer logs every rescaled channel at INFO
                quantize_int8(fp32, int8, self._calibration(), get_spec(self.name).int8_float_convs)
        return int8

    def _prefix(self) -> torch.nn.Module:
        return split_backbone(self.name, build_backbone(self.name, self.state), self.cut)[0]
