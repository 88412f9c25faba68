"""Deployable forms of the backbone and of the trained model. Server side: needs torch, onnx,
onnxscript and onnxruntime (the ``server`` extra).

- ``export_onnx``: a module as ONNX through PyTorch's dynamo exporter, batch dynamic and image
  size fixed, so TensorFlow-style 'same' padding folds into the convolutions instead of being
  computed per call (the older TorchScript exporter leaves Shape/Pad chains that run 30% slower
  and quantize badly).
- ``quantize_int8``: static int8 in QDQ format, per-channel weights, activation ranges from
  MinMax calibration on images the server may hold (never client data).
- ``export_model``: backbone up to the cut + the federated part (tail and head) as one ONNX
  model (fp32 and int8) and as TorchScript, with ``model.json`` (classes, preprocessing, cut,
  views, fingerprints) beside them.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.data import LabelledFiles
from common.preprocess import DECODE_ERRORS, PreprocessSpec, decode_image
from common.protocol import LOGITS, MODEL_INFO, ONNX_INPUT, ONNX_OUTPUT, PROBABILITIES

log = logging.getLogger(__name__)

MODEL_FILES = {"onnx": "model.onnx", "onnx-int8": "model-int8.onnx", "torchscript": "model.ts"}


def export_onnx(
    model: nn.Module, input_shape: Sequence[int], path: Path, input_name: str, output_names: Sequence[str]
) -> None:
    """Write ``model`` (eval mode) as ONNX with a dynamic batch dimension."""
    model = model.eval()
    example = torch.zeros(2, *input_shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter is chatty about internals we do not use
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[input_name],
            output_names=list(output_names),
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65_536)},),
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program; is onnxscript installed?")
    temporary = path.with_suffix(f".tmp{os.getpid()}")  # atomic, even with another process at it
    program.save(str(temporary))
    temporary.replace(path)


def calibration_images(files: LabelledFiles, preprocess: PreprocessSpec, count: int = 64) -> np.ndarray:
    """Up to ``count`` preprocessed images spread evenly over ``files`` (the server's own)."""
    picks = np.unique(np.linspace(0, len(files) - 1, num=min(count, len(files))).round().astype(int))
    images = []
    for index in picks:
        try:
            images.append(preprocess(decode_image(Path(files.paths[index]).read_bytes())))
        except DECODE_ERRORS:
            continue
    if not images:
        raise ValueError("No decodable image to calibrate int8 ranges on; check the server's held-out images.")
    return np.stack(images)


# Weight formats of quantize_int8: what the engine ships ("s8") and the documented alternatives
# against saturation on x86 without VNNI that BENCHMARKS.md measures against it.
INT8_WEIGHTS = {"s8": ("QInt8", False), "s7": ("QInt8", True), "u8": ("QUInt8", False)}


def quantize_int8(
    fp32_path: Path, int8_path: Path, calibration: np.ndarray, keep_float_convs: int, weights: str = "s8"
) -> None:
    """Static int8 (QDQ, per-channel weights, uint8 activations) of an ONNX image model.

    The first ``keep_float_convs`` convolutions stay float: the stem and first block see raw
    pixels at full resolution, quantizing them costs most of the error (EfficientNet-Lite0 on
    ELPV: mean cosine to fp32 0.982 with them int8, 0.993 without) and only ~5% of the compute.

    ``weights``: "s8" (full int8, what the engine uses: common/engines.py runs it without
    saturation everywhere), "s7" (ONNX Runtime's reduce_range: 7-bit weights, no saturation by
    construction but a bit less precise everywhere) or "u8" (uint8 weights: ONNX Runtime's u8u8
    kernels, slower on VNNI CPUs).
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches = iter(np.array_split(calibration, max(1, len(calibration) // 8)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    weight_type, reduce_range = INT8_WEIGHTS[weights]
    model = onnx.load(str(fp32_path))
    input_name = model.graph.input[0].name
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"]
    prepared = int8_path.with_suffix(f".prepared{os.getpid()}.onnx")
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared),
            str(int8_path.with_suffix(f".tmp{os.getpid()}")),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=getattr(QuantType, weight_type),
            reduce_range=reduce_range,
            nodes_to_exclude=convs[:keep_float_convs],
        )
        int8_path.with_suffix(f".tmp{os.getpid()}").replace(int8_path)
    finally:
        prepared.unlink(missing_ok=True)


class DeployableModel(nn.Module):
    """Backbone, then head: images in, logits and class probabilities out."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(self.backbone(images))
        return logits, torch.softmax(logits, dim=1)


class _HeadWithProbabilities(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(features)
        return logits, torch.softmax(logits, dim=1)


def export_model(
    directory: Path,
    backbone: nn.Module,
    head: nn.Module,
    backbone_onnx: Mapping[str, Path],
    info: Mapping[str, Any],
) -> dict[str, Path]:
    """Write the trained model in every deployable form; returns {form: path}.

    The ONNX models are the run's own backbone variants up to the cut (the very files clients
    embedded with) with the trained part's graph appended (the tail, if the cut is later, and
    the head), so the int8 model computes exactly what an int8 client does. ``backbone`` is the
    torch backbone up to the cut.
    """
    import onnx
    from onnx import compose

    directory.mkdir(parents=True, exist_ok=True)
    head = head.eval()
    feature_shape = tuple(info.get("feature_shape") or (int(info["feature_dim"]),))
    head_path = directory / "head.onnx"
    export_onnx(_HeadWithProbabilities(head), feature_shape, head_path, ONNX_OUTPUT, (LOGITS, PROBABILITIES))
    head_graph = compose.add_prefix(onnx.load(str(head_path)), "head/", rename_outputs=False)
    head_path.unlink()
    written: dict[str, Path] = {}
    for engine, source in backbone_onnx.items():
        backbone_graph = onnx.load(str(source))
        opsets = _matching_opsets(head_graph, backbone_graph)
        del head_graph.opset_import[:]
        head_graph.opset_import.extend(opsets)
        merged = compose.merge_models(backbone_graph, head_graph, io_map=[(ONNX_OUTPUT, "head/" + ONNX_OUTPUT)])
        onnx.checker.check_model(merged)
        path = directory / MODEL_FILES[engine]
        onnx.save(merged, str(path))
        written[engine] = path
    image_size = int(info["preprocess"]["image_size"])
    written["torchscript"] = directory / MODEL_FILES["torchscript"]
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is what C++ and older
        # mobile runtimes load; the traced model is checked against eager in the tests.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(DeployableModel(backbone, head).eval(), torch.zeros(1, 3, image_size, image_size))
        torch.jit.save(traced, str(written["torchscript"]))
    model_info = {
        **info,
        "input": {"name": ONNX_INPUT, "shape": ["batch", 3, image_size, image_size], "dtype": "float32"},
        "outputs": [LOGITS, PROBABILITIES],
        "files": {form: path.name for form, path in written.items()},
    }
    (directory / MODEL_INFO).write_text(json.dumps(model_info, indent=2) + "\n")
    return written


def _matching_opsets(head: Any, backbone: Any) -> list[Any]:
    """The head's opset imports with the backbone's version of each shared domain (the two
    graphs come from the same exporter; the quantizer may have raised the default opset)."""
    versions = {entry.domain: entry for entry in backbone.opset_import}
    return [versions.get(entry.domain, entry) for entry in head.opset_import]
