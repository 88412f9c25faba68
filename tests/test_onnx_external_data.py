"""A board refuses an ONNX model that keeps tensor data outside itself (a file beside it, or ONNX
Runtime's in-memory address tag), wherever the tensor is, before ONNX Runtime sees the bytes: the
wire-format reader (common/onnx_wire.py) checked against models the ``onnx`` package makes, and
the engine kinds that keep and load a backbone."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper
from packaging.requirements import Requirement

from common.engines import ENGINE_KINDS, OnnxEngine, UnsafeModel, checked_onnx
from common.onnx_wire import MalformedModel, external_data_tensors
from common.protocol import ONNX_MODEL
from tests.conftest import REPO_ROOT
from tests.protocol_samples import instructions

MEMORY_TAG = "*/_ORT_MEM_ADDR_/*"  # ONNX Runtime's tag: the data is at the address in "offset"


def _externalise(tensor: TensorProto, location: str = "weights.bin") -> None:
    """Point ``tensor``'s data outside the model, as the onnx package writes it."""
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(4 * 2))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _weight(name: str) -> TensorProto:
    return numpy_helper.from_array(np.ones(2, np.float32), name)


def _io(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [2])


def _model(mark: str = "") -> onnx.ModelProto:
    """y = x + w + c + (if cond: then-constant else else-constant) + relu(x) through a function;
    the tensor named ``mark`` (if any) keeps its data outside the model."""
    tensors = {name: _weight(name) for name in ("w", "c", "then_c", "else_c", "f_c")}
    sparse = helper.make_sparse_tensor(_weight("s_values"), numpy_helper.from_array(np.array([0, 1]), "s_idx"), [2])
    for name, tensor in [*tensors.items(), ("s_values", sparse.values), ("s_idx", sparse.indices)]:
        if name == mark:
            _externalise(tensor, MEMORY_TAG if name in ("c", "then_c") else "weights.bin")
    branch = {
        side: helper.make_graph(
            [helper.make_node("Constant", [], [f"{side}_out"], value=tensors[f"{side}_c"])],
            side,
            [],
            [_io(f"{side}_out")],
        )
        for side in ("then", "else")
    }
    function = helper.make_function(
        "local",
        "AddConstant",
        ["a"],
        ["b"],
        [helper.make_node("Constant", [], ["k"], value=tensors["f_c"]), helper.make_node("Add", ["a", "k"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    nodes = [
        helper.make_node("Constant", [], ["c"], value=tensors["c"]),
        helper.make_node("If", ["cond"], ["branch"], then_branch=branch["then"], else_branch=branch["else"]),
        helper.make_node("AddConstant", ["x"], ["f"], domain="local"),
        helper.make_node("Sum", ["x", "w", "c", "branch", "f", "s_values"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [_io("x"), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [_io("y")],
        [tensors["w"]],
        sparse_initializer=[sparse],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=[function])


PLACES = ["w", "c", "then_c", "else_c", "f_c", "s_values", "s_idx"]
SEEN_BY_ONNX = ("w", "c", "then_c", "else_c")


def test_a_self_contained_model_has_no_external_tensor_and_runs() -> None:
    model = _model().SerializeToString()
    assert external_data_tensors(model) == []
    engine = OnnxEngine(checked_onnx(model))
    x = np.zeros(2, np.float32)
    (y,) = engine.session.run(None, {"x": x, "cond": np.array(True)})
    np.testing.assert_allclose(y, [5.0, 5.0])  # w + c + then + f's constant + the sparse ones


@pytest.mark.parametrize("place", PLACES)
def test_the_reader_finds_an_external_tensor_wherever_it_is(place: str) -> None:
    """An initializer, a Constant's attribute, a tensor in either branch of an If (a subgraph), in a
    model-local function, and either half of a sparse initializer; as the onnx package sees it."""
    model = _model(mark=place)
    assert external_data_tensors(model.SerializeToString()) == [place]
    if place in SEEN_BY_ONNX:  # the onnx package's own walk agrees (it skips functions and sparse tensors)
        tensors = external_data_helper._get_all_tensors(model)
        assert [t.name for t in tensors if external_data_helper.uses_external_data(t)] == [place]


def test_a_model_saved_by_onnx_with_external_data_is_refused_by_keep_and_load(tmp_path: Path) -> None:
    # Prepare: the onnx package writes the weights beside the model, as for a model over 2 GB
    onnx.save_model(
        _model(), tmp_path / "model.onnx", save_as_external_data=True, location="weights.data", size_threshold=0
    )
    model = (tmp_path / "model.onnx").read_bytes()
    assert (tmp_path / "weights.data").is_file()
    kind = ENGINE_KINDS["onnx"]
    announced = instructions(engine="onnx", engine_fingerprint=kind.variant_fingerprint("ab" * 32, model))
    kept = tmp_path / "cache" / "backbone.onnx"

    # Execute / Assert: the board keeps nothing, and a copy on disk does not load either
    with pytest.raises(UnsafeModel, match="outside itself"):
        kind.keep(kept, {ONNX_MODEL: np.frombuffer(model, np.uint8)}, announced)
    assert not kept.exists()
    with pytest.raises(UnsafeModel, match="external data"):
        kind.load(tmp_path / "model.onnx", 0, 1)


@pytest.mark.parametrize("place", ["c", "then_c"])
def test_onnx_runtime_never_sees_a_model_with_the_in_memory_tag(place: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    seen: list[object] = []
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *args, **kwargs: seen.append(args))
    with pytest.raises(UnsafeModel, match=repr(place)):
        OnnxEngine(_model(mark=place).SerializeToString())
    assert seen == []


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda t: setattr(t, "data_location", TensorProto.EXTERNAL), "data_location alone"),
        (lambda t: t.external_data.add(key="location", value="x.bin"), "external_data alone"),
    ],
)
def test_either_half_of_the_external_marking_counts(change: Callable[[TensorProto], object], why: str) -> None:
    model = _model()
    change(model.graph.initializer[0])
    assert external_data_tensors(model.SerializeToString()) == ["w"], why


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda b: b[:-3], "past the end"),  # truncated
        (lambda b: b + b"\x0b", "wire type 3"),  # a group
        (lambda b: b + b"\x08" + b"\xff" * 11, "longer than 10 bytes"),
        (lambda b: b"\x38\x01" + b, "field 7 of a model message has wire type 0"),  # graph as a varint
    ],
)
def test_bytes_that_are_not_a_well_formed_protobuf_are_refused(damage: Callable[[bytes], bytes], words: str) -> None:
    model = damage(_model().SerializeToString())
    with pytest.raises(MalformedModel, match=words):
        external_data_tensors(model)
    with pytest.raises(UnsafeModel, match="not a readable ONNX protobuf"):
        checked_onnx(model)


def test_the_onnx_runtime_floor_refuses_in_memory_references_itself() -> None:
    """Defence in depth: ONNX Runtime 1.24.1 is the first release that rejects "arbitrary in-memory
    references" in a model's initializers itself (1.20 to 1.23 fail such a model only by chance)."""
    extra = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["edge"]
    requirement = next(Requirement(r) for r in extra if r.startswith("onnxruntime"))
    assert not requirement.specifier.contains("1.23.2") and requirement.specifier.contains("1.24.1")


def test_onnx_runtimes_own_format_is_refused() -> None:
    with pytest.raises(UnsafeModel, match="ONNX Runtime's own format"):
        checked_onnx(b"\x00\x00\x00\x00ORTM" + bytes(64))
