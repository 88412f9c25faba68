"""Backbone engines: the frozen backbone as a function from preprocessed images to features.

Three engines run the same backbone:

- ``torch``: PyTorch eager, channels_last (the reference);
- ``onnx``: ONNX Runtime, fp32;
- ``onnx-int8``: ONNX Runtime, static int8 (QDQ, per-channel weights), calibrated on the server.

The server makes every variant from the one backbone it holds (``common/export.py``), so all
clients of a run share one feature space. A variant's fingerprint covers the backbone's
fingerprint, the engine and the artifact's bytes: a client can check what it received, and
embeddings of different variants never share a cache.

No torch import at module level: ``edgesplit predict`` uses the ONNX engine on a torch-free board.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

ENGINES = ("torch", "onnx", "onnx-int8")
ENGINE_CHOICES = ("auto", *ENGINES)
ONNX_ENGINES = ("onnx", "onnx-int8")
ONNX_INPUT = "images"
ONNX_OUTPUT = "features"
# An exported model (common/export.py, read by client/predict.py): its description and outputs.
MODEL_INFO = "model.json"
LOGITS, PROBABILITIES = "logits", "probabilities"

# An engine maps a float32 batch (n, 3, h, w) to float32 features (n, feature_dim).
Engine = Callable[[np.ndarray], np.ndarray]


class EngineError(RuntimeError):
    """An engine cannot run here, or its artifact is not what was announced."""


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def resolve_engine(requested: str) -> str:
    """The engine a device runs for a requested one.

    ``auto`` picks ``onnx-int8`` wherever ONNX Runtime is installed: on the 2-core x86 machines we
    measured it is 2x ONNX fp32 and over 10x PyTorch eager, with the linear probe within a point
    (BENCHMARKS.md, "Backbone engines"). Without ONNX Runtime (e.g. 32-bit Raspberry Pi OS, which
    has no wheels) it falls back to ``torch``.
    """
    if requested not in ENGINE_CHOICES:
        raise EngineError(f"Unknown engine {requested!r}; choose one of {list(ENGINE_CHOICES)}.")
    if requested == "auto":
        return "onnx-int8" if onnxruntime_available() else "torch"
    if requested in ONNX_ENGINES and not onnxruntime_available():
        raise EngineError(
            f"engine={requested!r} needs ONNX Runtime, which is not installed on this device. "
            "Install it with: pip install 'edgesplit[edge]' (or pip install onnxruntime), or set engine='torch'."
        )
    return requested


def variant_fingerprint(backbone_fingerprint: str, engine: str, artifact: bytes | None = None) -> str:
    """The fingerprint of one engine's variant of a backbone.

    The torch variant is the backbone's own weights, so it keeps the backbone fingerprint.
    """
    if engine == "torch":
        return backbone_fingerprint
    if artifact is None:
        raise EngineError(f"engine {engine!r} needs the artifact's bytes to fingerprint it.")
    digest = hashlib.sha256(f"{backbone_fingerprint}|{engine}|".encode())
    digest.update(artifact)
    return digest.hexdigest()


class OnnxEngine:
    """An ONNX model in ONNX Runtime on the CPU.

    ``num_threads`` 0 keeps ONNX Runtime's default of one intra-op thread per physical core. One
    inference runs at a time (sequential execution, one inter-op thread): on a board with a few
    cores, parallelism inside each convolution is what pays.
    """

    def __init__(self, model: bytes | str | Path, num_threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if num_threads:
            options.intra_op_num_threads = num_threads
        source = str(model) if isinstance(model, Path) else model
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # ONNX Runtime raises its own exception types
            raise EngineError(f"ONNX Runtime cannot load the model: {error}") from error
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)[0]

    def run(self, batch: np.ndarray) -> list[Any]:
        """Every output of the model, in order."""
        return list(self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}))


class TorchEngine:
    """A PyTorch module in eager mode, channels_last by default (about 2x NCHW on x86 CPUs)."""

    def __init__(self, model: nn.Module, channels_last: bool = True) -> None:
        import torch

        self.channels_last = channels_last
        self.model = model.eval().to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            inputs = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            if self.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            return np.asarray(self.model(inputs).float().numpy(), dtype=np.float32)
