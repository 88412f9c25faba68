"""Which tensors of an ONNX model keep their data outside the model, read from the protobuf wire
format itself: a board has ONNX Runtime and NumPy, not the ``onnx`` package.

A tensor may say that its data lies elsewhere (``data_location = EXTERNAL`` with ``external_data``
entries): in a file beside the model, or, with ONNX Runtime's in-memory tag, at an address in the
loading process. A backbone the server sends must be whole: one that points elsewhere would make
the board's engine read files or memory that are not the model. So a board lists such tensors
here, before ONNX Runtime sees the bytes, and refuses the model if there is any.

Only the fields that can lead to a tensor are followed (numbers from onnx.proto):

- ModelProto: ``graph`` 7, ``training_info`` 20, ``functions`` 25
- TrainingInfoProto: ``initialization`` 1, ``algorithm`` 2 (graphs)
- FunctionProto: ``node`` 7, ``attribute_proto`` 11
- GraphProto: ``node`` 1, ``initializer`` 5, ``sparse_initializer`` 15
- NodeProto: ``attribute`` 5
- AttributeProto: ``t`` 5, ``g`` 6, ``tensors`` 10, ``graphs`` 11, ``sparse_tensor`` 22, ``sparse_tensors`` 23
- SparseTensorProto: ``values`` 1, ``indices`` 2
- TensorProto: ``name`` 8, ``external_data`` 13, ``data_location`` 14

Every other field is skipped by its wire type. Bytes that are not a well-formed protobuf (a
truncated field, a group, a varint over 10 bytes, a followed field of the wrong wire type, nesting
deeper than any real model) are MalformedModel: what cannot be read cannot be vouched for.
"""

from __future__ import annotations

from collections.abc import Iterator

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5
MAX_NESTING = 64  # messages inside messages: a real model's subgraphs nest a few levels deep

# Per message kind: the fields that hold a message which can lead to a tensor (field -> its kind).
FOLLOWED: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 8, 13, 14


class MalformedModel(ValueError):
    """The bytes are not a well-formed ONNX protobuf."""


def external_data_tensors(model: bytes) -> list[str]:
    """The names of every tensor in ``model`` (initializers, sparse initializers, attribute tensors,
    in the main graph, its subgraphs, training graphs and functions) whose data is kept outside
    the model; [] for a self-contained model. Raises MalformedModel for bytes it cannot read."""
    found: list[str] = []
    pending: list[tuple[str, memoryview, int]] = [("model", memoryview(model), 0)]
    while pending:
        kind, data, depth = pending.pop()
        if depth > MAX_NESTING:
            raise MalformedModel(f"messages nest deeper than {MAX_NESTING} levels")
        if kind == "tensor":
            name, external = _tensor_facts(data)
            if external:
                found.append(name or "(unnamed)")
            continue
        followed = FOLLOWED[kind]
        for number, wire, value in _fields(data):
            if number in followed:
                if not isinstance(value, memoryview):
                    raise MalformedModel(f"field {number} of a {kind} message has wire type {wire}, not a message")
                pending.append((followed[number], value, depth + 1))
    return found


def _tensor_facts(data: memoryview) -> tuple[str, bool]:
    """A TensorProto's name and whether its data lies outside the model."""
    name, external = "", False
    for number, wire, value in _fields(data):
        if number == TENSOR_NAME and isinstance(value, memoryview):
            name = bytes(value).decode("utf-8", errors="replace")
        elif number == TENSOR_EXTERNAL_DATA:
            external = True  # any entry at all: a whole tensor has none
        elif number == TENSOR_DATA_LOCATION:
            if wire != VARINT:
                raise MalformedModel(f"a tensor's data_location has wire type {wire}, not a varint")
            external = external or value != 0  # 0 is DEFAULT: the data is in the tensor itself
    return name, external


def _fields(data: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field of one message: a varint's value, a
    length-delimited field's bytes, 0 for a fixed-width field."""
    position, end = 0, len(data)
    while position < end:
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise MalformedModel(f"field number 0 at byte {position}")
        value: int | memoryview = 0
        if wire == VARINT:
            value, position = _varint(data, position)
        elif wire == LENGTH_DELIMITED:
            length, position = _varint(data, position)
            if length > end - position:
                raise MalformedModel(f"field {number} runs past the end of its message")
            value, position = data[position : position + length], position + length
        elif wire in (FIXED64, FIXED32):
            position += 8 if wire == FIXED64 else 4
            if position > end:
                raise MalformedModel(f"field {number} runs past the end of its message")
        else:  # groups (3, 4) are not used by ONNX; 6 and 7 do not exist
            raise MalformedModel(f"field {number} has wire type {wire}, which ONNX does not use")
        yield number, wire, value


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    """The varint at ``position`` and the position after it."""
    value = 0
    for shift in range(0, 70, 7):
        if position >= len(data):
            raise MalformedModel("a varint runs past the end of its message")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
    raise MalformedModel("a varint longer than 10 bytes")
