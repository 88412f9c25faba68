"""The golden check (issue 15): a node runs each engine variant on the server's golden batch once,
falls back to a safer engine when it disagrees with the server, and is refused when none agrees.

Tiny hand-made ONNX "backbones" (mean colour per channel) stand in for EfficientNet, so that a
disagreeing variant is one line: the int8 file of a broken board computes other features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from client.edge_client import EdgeClient
from client.golden import GoldenGate
from client.privacy import violations
from common.config import NodeConfig, RunConfig
from common.engines import ENGINE_KINDS, X64_QUANT_PRECISION, GoldenCheckFailed, OnnxKind
from common.protocol import BackboneStatus, GoldenBatch, ProtocolError, ReplyStatus
from server.screening import ScreeningBounds, golden_reason
from tests.protocol_samples import instructions

FP = "cd" * 32
INT8, FP32, TORCH = ENGINE_KINDS["onnx-int8"], ENGINE_KINDS["onnx"], ENGINE_KINDS["torch"]


def _mean_colour_model(weights: tuple[float, float, float]) -> bytes:
    """images (n, 3, h, w) -> features (n, 3): the mean of each channel, times ``weights``."""
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [1, 3], list(weights))
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["images"], ["mean"], axes=[2, 3], keepdims=0),
            helper.make_node("Mul", ["mean", "scale"], ["features"]),
        ],
        "mean-colour",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 3])],
        initializer=[scale],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


GOOD = _mean_colour_model((1.0, 1.0, 1.0))
BAD = _mean_colour_model((1.0, -1.0, 0.2))  # a board whose engine computes something else


@pytest.fixture
def golden() -> GoldenBatch:
    images = np.random.default_rng(0).uniform(-1, 1, (4, 3, 8, 8)).astype(np.float16)
    images[:, 0] += 0.5  # channels with different means, so that a wrong sign shows
    return GoldenBatch(images=images, features=images.astype(np.float32).mean(axis=(2, 3)))


def _client(tmp_path: Path, engine: str = "onnx-int8") -> EdgeClient:
    config = RunConfig(golden_min_cosine=0.98)
    return EdgeClient(config, NodeConfig(cache_dir=str(tmp_path / "node"), engine=engine))


def _send(client: EdgeClient, kind: OnnxKind, model: bytes, golden: GoldenBatch) -> object:
    """The server's message with this variant (and the golden batch), as the node receives it."""
    sent = instructions(fingerprint=FP, engine=kind.name, engine_fingerprint=kind.variant_fingerprint(FP, model))
    client.receive_backbone(kind.pack(model), sent, golden)
    return sent


def test_a_golden_batch_travels_checked_and_scores_by_mean_cosine(golden: GoldenBatch) -> None:
    again = GoldenBatch.from_arrays(golden.to_arrays())
    assert again.cosine(golden.features) == pytest.approx(1.0)
    assert again.cosine(-golden.features) == pytest.approx(-1.0)
    with pytest.raises(ProtocolError, match="exactly"):
        GoldenBatch.from_arrays({"images": golden.images})
    with pytest.raises(ProtocolError, match="pair up"):
        GoldenBatch.from_arrays({"images": golden.images, "features": golden.features[:2]})


def test_a_node_whose_int8_disagrees_falls_back_to_fp32_and_says_why(tmp_path: Path, golden: GoldenBatch) -> None:
    client = _client(tmp_path)
    bad = _send(client, INT8, BAD, golden)
    with pytest.raises(GoldenCheckFailed, match="falls back to the onnx engine") as failed:
        client.embedded(bad)  # nothing is embedded with a variant that failed
    assert failed.value.cosine < 0.98

    status = client.backbone_status(FP)  # what the server hears when it asks again
    assert status.engine == "onnx" and status.held_fingerprint == ""  # so it sends the fp32 variant
    assert "onnx-int8 golden cosine" in status.fallback and "runs onnx" in status.fallback

    good = _send(client, FP32, GOOD, golden)
    assert client.golden_gate.check(good) == pytest.approx(1.0)
    status = client.backbone_status(FP)
    assert (status.engine, status.held_fingerprint) == ("onnx", good.engine_fingerprint)
    assert status.golden_cosine == pytest.approx(1.0) and status.fallback


def test_the_verdict_is_kept_beside_the_variant_for_the_next_process(
    tmp_path: Path, golden: GoldenBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = _client(tmp_path)
    sent = _send(client, INT8, GOOD, golden)
    assert client.golden_gate.check(sent) == pytest.approx(1.0)
    verdict = client.backbones.path(INT8, FP).with_name(f"{FP}.onnx-int8.onnx.golden.json")
    assert verdict.is_file()
    # a new process (a deployed SuperNode starts one per message) reads it instead of running the engine
    monkeypatch.setattr(type(INT8), "load", lambda *a: pytest.fail("the golden check ran again"))
    assert _client(tmp_path).golden_gate.check(sent) == pytest.approx(1.0)


def test_a_node_that_no_engine_brings_to_the_server_is_refused(
    tmp_path: Path, golden: GoldenBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(type(TORCH), "available", lambda self: False)  # a torch-free board
    client = _client(tmp_path)
    _send(client, INT8, BAD, golden)
    sent = _send(client, FP32, BAD, golden)
    with pytest.raises(GoldenCheckFailed, match="no safer engine is installed"):
        client.golden_gate.check(sent)
    status = client.backbone_status(FP)
    assert status.engine == "onnx" and status.golden_cosine < 0.98

    minimum = ScreeningBounds.from_config(RunConfig()).golden_min_cosine
    reason = golden_reason(
        ReplyStatus(FP, "onnx", sent.engine_fingerprint, golden_cosine=status.golden_cosine, fallback="refused"),
        minimum,
    )
    assert reason is not None and "golden check failed" in reason and "golden-min-cosine 0.98" in reason
    assert golden_reason(ReplyStatus(FP, "onnx", "x", golden_cosine=0.999), minimum) is None
    assert golden_reason(ReplyStatus(FP, "onnx", "x"), minimum) is None  # unchecked (an older node)


def test_without_a_golden_batch_a_held_variant_is_sent_again_with_one(tmp_path: Path, golden: GoldenBatch) -> None:
    client = _client(tmp_path, engine="onnx")
    sent = instructions(fingerprint=FP, engine="onnx", engine_fingerprint=FP32.variant_fingerprint(FP, GOOD))
    client.receive_backbone(FP32.pack(GOOD), sent)  # an older server: no golden batch
    assert client.backbone_status(FP) == BackboneStatus(engine="onnx", held_fingerprint="")
    assert GoldenGate(client.backbones, 0.98, 0, "node").check(sent) == -1.0  # nothing to check with


def test_the_cosine_may_leave_the_device_in_the_status() -> None:
    status = {"status": ReplyStatus(FP, "onnx", "x", golden_cosine=0.5, fallback="why").to_record()}
    assert violations({"configs": status}, {}, None) == []


def test_golden_min_cosine_is_checked_once_in_the_schema() -> None:
    from common.config import ConfigError

    assert RunConfig().golden_min_cosine == 0.98
    with pytest.raises(ConfigError, match="golden-min-cosine"):
        RunConfig.from_flower({"golden-min-cosine": 1.5})


def exact_kernels_asked(engine: object) -> bool:
    options = engine.session.get_session_options()  # type: ignore[attr-defined]
    try:
        return bool(options.get_session_config_entry(X64_QUANT_PRECISION) == "1")
    except RuntimeError:  # ONNX Runtime's answer for an entry never set
        return False


def test_onnx_sessions_ask_for_exact_int8_kernels_exactly_where_the_fast_ones_saturate(monkeypatch) -> None:
    from common import engines
    from common.engines import OnnxEngine, int8_kernels_saturate

    assert exact_kernels_asked(OnnxEngine(GOOD)) == int8_kernels_saturate()
    assert exact_kernels_asked(OnnxEngine(GOOD, exact_int8=True)) and not exact_kernels_asked(
        OnnxEngine(GOOD, exact_int8=False)
    )
    # the rule, per CPU class: x86 saturates unless it has AVX-512 VNNI; ARM never does
    from numpy._core import _multiarray_umath

    for machine, features, saturates in [
        ("x86_64", {"AVX2": True, "AVX512F": False, "AVX512VNNI": False}, True),  # AVX2 (Haswell .. Zen 3)
        ("x86_64", {"AVX2": True, "AVX512F": True, "AVX512VNNI": False}, True),  # Skylake-SP
        ("AMD64", {"AVX2": True, "AVX512F": True, "AVX512VNNI": True}, False),  # Cascade Lake, Zen 4
        ("aarch64", {"ASIMDDP": True}, False),  # a Raspberry Pi 5, a Jetson
    ]:
        monkeypatch.setattr(engines.platform, "machine", lambda m=machine: m)
        monkeypatch.setattr(_multiarray_umath, "__cpu_features__", features)
        assert int8_kernels_saturate() is saturates, (machine, features)
    assert onnx.load_from_string(GOOD).graph.output[0].name == "features"
