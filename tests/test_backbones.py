"""Backbone registry: Lite0 key map, the embedded weights (real ImageNet predictions), torchvision
backbones from a file, error messages, and the fingerprint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from common.backbones import (
    BackboneError,
    available_backbones,
    build_backbone,
    fingerprint,
    get_spec,
    load_backbone_weights,
    lukemelas_to_timm_key,
    read_weights_file,
)
from common.preprocess import PreprocessSpec

# --- lukemelas -> timm key map --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lukemelas", "timm_key"),
    [
        ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),  # stage 0: depthwise-separable
        ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
        ("_blocks.0._bn2.running_var", "blocks.0.0.bn2.running_var"),
        ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),  # first inverted residual
        ("_blocks.2._bn0.bias", "blocks.1.1.bn1.bias"),
        ("_blocks.7._bn1.weight", "blocks.3.2.bn2.weight"),  # flat 7 = stage 3 (starts at 5), index 2
        ("_blocks.14._project_conv.weight", "blocks.5.3.conv_pwl.weight"),
        ("_blocks.15._project_conv.weight", "blocks.6.0.conv_pwl.weight"),  # last block
        ("_bn0.running_mean", "bn1.running_mean"),
        ("_bn1.weight", "bn2.weight"),
        ("_conv_stem.weight", "conv_stem.weight"),
        ("_conv_head.weight", "conv_head.weight"),
        ("_fc.bias", "classifier.bias"),
    ],
)
def test_lukemelas_to_timm_key(lukemelas, timm_key):
    assert lukemelas_to_timm_key(lukemelas) == timm_key


@pytest.mark.parametrize(
    "key",
    [
        "_blocks.16._project_conv.weight",  # Lite0 has 16 blocks: 0..15
        "_blocks.0._expand_conv.weight",  # stage 0 has no expansion
        "_blocks.3._se_reduce.weight",  # Lite has no squeeze-excitation
        "features.0.weight",
    ],
)
def test_lukemelas_to_timm_key_rejects_foreign_keys(key):
    with pytest.raises(BackboneError):
        lukemelas_to_timm_key(key)


def test_unknown_backbone_lists_the_available_names():
    # Execute
    with pytest.raises(BackboneError) as caught:
        get_spec("vgg16")

    # Assert
    message = str(caught.value)
    assert "'vgg16'" in message
    for name in available_backbones():
        assert name in message
    assert available_backbones() == ["efficientnet_lite0", "mobilenet_v3_large", "resnet18"]


# --- the embedded EfficientNet-Lite0 weights ------------------------------------------------------


def test_embedded_lite0_weights_classify_imagenet_photos():
    """Loads the full converted weights (classifier included) into timm's classifier and checks
    real predictions: a wrong key map or preprocessing would not give these classes."""
    import skimage.data
    import timm

    # Prepare
    spec = get_spec("efficientnet_lite0")
    state = spec.convert_weights(read_weights_file(spec.embedded_weights()))
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(state, strict=True)
    model.eval()
    preprocess = PreprocessSpec(crop_pct=0.875, mean=spec.preprocess.mean, std=spec.preprocess.std)
    batch = torch.from_numpy(
        np.stack(
            [preprocess(Image.fromarray(skimage.data.chelsea())), preprocess(Image.fromarray(skimage.data.coffee()))]
        )
    )

    # Execute
    with torch.no_grad():
        top3 = model(batch).topk(3, dim=1).indices.tolist()

    # Assert
    cats = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert cats & set(top3[0]), f"chelsea top-3 {top3[0]} has no cat class"
    assert 967 in top3[1], f"coffee top-3 {top3[1]} lacks espresso (967)"


def test_embedded_lite0_backbone_gives_1280_features_without_classifier():
    # Prepare
    state = load_backbone_weights("efficientnet_lite0")

    # Execute
    model = build_backbone("efficientnet_lite0", state)
    with torch.no_grad():
        features = model(torch.zeros(1, 3, 64, 64))

    # Assert
    assert not any(key.startswith("classifier.") for key in state)
    assert features.shape == (1, get_spec("efficientnet_lite0").feature_dim) == (1, 1280)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


# --- torchvision backbones from a weights file ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "factory", "dropped", "dim"),
    [
        ("resnet18", torchvision.models.resnet18, "fc.", 512),
        ("mobilenet_v3_large", torchvision.models.mobilenet_v3_large, "classifier.", 960),
    ],
)
def test_torchvision_backbone_from_file(tmp_path, name, factory, dropped, dim):
    # Prepare
    torch.manual_seed(0)
    path = tmp_path / f"{name}.pth"
    torch.save(factory(weights=None).state_dict(), path)

    # Execute
    state = load_backbone_weights(name, path)
    model = build_backbone(name, state)
    with torch.no_grad():
        features = model(torch.rand(1, 3, 64, 64))

    # Assert
    assert set(state) == set(get_spec(name).build_architecture().state_dict())
    assert not any(key.startswith(dropped) for key in state)
    assert features.shape == (1, dim)
    assert get_spec(name).feature_dim == dim


def test_weights_file_wrapped_in_state_dict_key_is_read(tmp_path):
    # Prepare
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": torchvision.models.resnet18(weights=None).state_dict()}, path)

    # Execute
    state = load_backbone_weights("resnet18", path)

    # Assert
    assert "conv1.weight" in state


def test_missing_weights_file_says_how_to_provide_it(tmp_path):
    # Execute
    with pytest.raises(BackboneError) as caught:
        load_backbone_weights("resnet18", tmp_path / "nope.pth")

    # Assert
    message = str(caught.value)
    assert "nope.pth" in message
    assert "backbone-weights" in message


def test_torchvision_backbone_without_weights_has_a_hint():
    with pytest.raises(BackboneError) as caught:
        load_backbone_weights("resnet18")

    message = str(caught.value)
    assert "no embedded weights" in message
    assert "backbone-weights" in message
    assert "torchvision.models.resnet18" in message


def test_unreadable_weights_file_is_a_backbone_error(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a torch file")

    with pytest.raises(BackboneError) as caught:
        load_backbone_weights("resnet18", path)

    assert "torch.save" in str(caught.value)


def test_file_that_is_not_a_state_dict_is_a_backbone_error(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)

    with pytest.raises(BackboneError) as caught:
        load_backbone_weights("resnet18", path)

    assert "state dict" in str(caught.value)


def test_weights_of_another_architecture_are_a_backbone_error(tmp_path):
    # Prepare: MobileNetV3 weights named as the resnet18 file
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.mobilenet_v3_large(weights=None).state_dict(), path)

    # Execute
    with pytest.raises(BackboneError) as caught:
        load_backbone_weights("resnet18", path)

    # Assert
    message = str(caught.value)
    assert "lack" in message
    assert "backbone-weights" in message


def test_weights_with_the_same_names_but_other_shapes_are_a_backbone_error(tmp_path):
    """ResNet-50 weights hold every ResNet-18 key name (with other shapes). Picking the wrong
    file must fail in load_backbone_weights with a BackboneError and the hint, not later as a
    RuntimeError from load_state_dict inside build_backbone (server and every client)."""
    # Prepare
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)

    # Execute
    with pytest.raises(BackboneError) as caught:
        load_backbone_weights("resnet18", path)

    # Assert
    assert "backbone-weights" in str(caught.value)


# --- fingerprint ----------------------------------------------------------------------------------


def _small_state() -> dict[str, torch.Tensor]:
    return {
        "a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a.bias": torch.tensor([0.5, -0.5]),
        "bn.num_batches_tracked": torch.tensor(7),  # 0-d tensor
    }


def test_fingerprint_is_deterministic_and_hex():
    # Execute
    first = fingerprint("resnet18", _small_state(), PreprocessSpec())
    second = fingerprint("resnet18", dict(reversed(list(_small_state().items()))), PreprocessSpec())

    # Assert
    assert first == second
    assert len(first) == 64
    int(first, 16)


def test_fingerprint_changes_with_one_weight_element():
    # Prepare
    state = _small_state()
    changed = _small_state()
    changed["a.weight"][1, 2] = 5.0001

    # Execute / Assert
    assert fingerprint("x", state, PreprocessSpec()) != fingerprint("x", changed, PreprocessSpec())


def test_fingerprint_changes_with_a_zero_d_tensor():
    changed = _small_state()
    changed["bn.num_batches_tracked"] = torch.tensor(8)

    assert fingerprint("x", _small_state(), PreprocessSpec()) != fingerprint("x", changed, PreprocessSpec())


def test_fingerprint_changes_with_preprocessing_name_and_dtype():
    # Prepare
    base = fingerprint("x", _small_state(), PreprocessSpec())
    as_double = {k: (v.double() if v.is_floating_point() else v) for k, v in _small_state().items()}

    # Execute
    variants = [
        fingerprint("x", _small_state(), PreprocessSpec(image_size=256)),
        fingerprint("x", _small_state(), PreprocessSpec(crop_pct=0.875)),
        fingerprint("x", _small_state(), PreprocessSpec(interpolation="bilinear")),
        fingerprint("x", _small_state(), PreprocessSpec(mean=(0.485, 0.456, 0.406))),
        fingerprint("y", _small_state(), PreprocessSpec()),
        fingerprint("x", as_double, PreprocessSpec()),
    ]

    # Assert
    assert base not in variants
    assert len(set(variants)) == len(variants)


@pytest.mark.parametrize("name", available_backbones())
def test_stage_counts_in_the_registry_match_the_architecture(name: str) -> None:
    """``num_stages`` is data so that a board without torch can check a cut; it must be the
    number of stages ``stages`` cuts the built architecture into."""
    spec = get_spec(name)
    assert spec.stages is not None
    assert spec.num_stages == len(spec.stages(spec.build_architecture()))
