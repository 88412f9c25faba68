"""The typed wire protocol: every message survives its record, and a record that lacks a key or
holds a value of the wrong type is refused by name."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from common.flower_glue import to_config_record
from common.kinds import ClassBalance, EngineName, HeadKind
from common.protocol import (
    ACTION,
    QUERIES,
    BackboneQuery,
    BackboneStatus,
    ClassStats,
    ConfigMessage,
    Instructions,
    Phase,
    ProtocolError,
    ReplyStatus,
    query_action,
)
from tests.protocol_samples import INSTRUCTIONS

MESSAGES: list[ConfigMessage] = [
    INSTRUCTIONS,
    BackboneQuery(fingerprint="ab" * 32, cut=1),
    BackboneStatus(engine="onnx-int8", held_fingerprint=""),
    ReplyStatus(fingerprint="ab" * 32, engine="torch", engine_fingerprint="ab" * 32, data_notes="2 images skipped"),
    dataclasses.replace(INSTRUCTIONS, class_balance="logit-adjusted", class_prior=(0.75, 0.25)),  # a float list
    dataclasses.replace(INSTRUCTIONS, local_prior_correction=True, class_prior=(0.75, 0.25)),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_a_message_survives_its_record(message: ConfigMessage) -> None:
    record = message.to_record()
    assert set(record) == set(type(message).keys())
    assert all(isinstance(v, bool | int | float | str | list) for v in record.values())  # what a ConfigRecord holds
    assert type(message).from_record({**record, "server-round-extra": 1}) == message  # other keys are ignored
    assert type(message).from_record(to_config_record(message)) == message  # and through Flower's record


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_a_missing_key_is_refused_by_name(message: ConfigMessage) -> None:
    record = message.to_record()
    required = next(f for f in record if f not in ("proximal-mu", "action", "data-notes"))
    del record[required]
    with pytest.raises(ProtocolError, match=repr(required)):
        type(message).from_record(record)


@pytest.mark.parametrize(
    ("message", "key", "value"),
    [
        (INSTRUCTIONS, "server-round", "1"),
        (INSTRUCTIONS, "num-classes", True),  # a bool is not an int
        (INSTRUCTIONS, "learning-rate", "0.1"),
        (INSTRUCTIONS, "views", "identity,hflip"),  # a list of strings, not a comma list
        (INSTRUCTIONS, "average-views", 1),
        (INSTRUCTIONS, "class-prior", ["0.5", "0.5"]),  # a list of floats
        (MESSAGES[1], "cut", 1.5),
        (MESSAGES[2], "held-fingerprint", None),
        (MESSAGES[3], "engine", 3),
    ],
)
def test_a_value_of_the_wrong_type_is_refused(message: ConfigMessage, key: str, value: object) -> None:
    with pytest.raises(ProtocolError, match=repr(key)):
        type(message).from_record({**message.to_record(), key: value})


def test_defaults_fill_keys_an_older_sender_leaves_out() -> None:
    record = INSTRUCTIONS.to_record()
    del record["proximal-mu"]
    assert type(INSTRUCTIONS).from_record(record).proximal_mu == 0.0
    assert BackboneQuery.from_record({"fingerprint": "ab" * 32, "cut": 0}).action == Phase.BACKBONE_STATUS


def test_query_actions() -> None:
    assert query_action(BackboneQuery(fingerprint="ab", cut=0).to_record()) is Phase.BACKBONE_STATUS
    assert query_action({**INSTRUCTIONS.to_record(), ACTION: "class-sums"}) is Phase.CLASS_SUMS
    for bad in ({}, {ACTION: "delete-everything"}, {ACTION: 3}, {ACTION: "train"}):  # train is no query
        with pytest.raises(ProtocolError, match="Unknown query action"):
            query_action(bad)
    # the wire keeps its action values
    assert [ask.value for ask in QUERIES] == ["backbone-status", "class-sums", "ridge-sums", "class-counts"]
    assert BackboneQuery(fingerprint="ab", cut=0).to_record()[ACTION] == "backbone-status"
    with pytest.raises(ProtocolError, match="backbone-status"):
        BackboneQuery.from_record({"fingerprint": "ab" * 32, "cut": 0, ACTION: "class-sums"})


@pytest.mark.parametrize(("key", "kind"), [("engine", EngineName), ("head", HeadKind), ("class-balance", ClassBalance)])
def test_instruction_kinds_are_decoded_into_their_enums_and_unknown_ones_refused(key: str, kind: type) -> None:
    record = INSTRUCTIONS.to_record()
    assert type(record[key]) is str  # a plain string on the wire
    for member in kind:
        decoded = getattr(Instructions.from_record({**record, key: member.value}), key.replace("-", "_"))
        assert decoded is member
    for bad in ("no-such-kind", 3, None):
        with pytest.raises(ProtocolError) as caught:
            Instructions.from_record({**record, key: bad})
        message = str(caught.value)
        assert repr(key) in message and repr(bad) in message
        assert str([member.value for member in kind]) in message  # names the choices


def test_class_stats_survive_their_arrays_and_refuse_others() -> None:
    stats = ClassStats(sums=np.ones((3, 4), np.float32), counts=np.array([2, 0, 5], np.float32))
    again = ClassStats.from_arrays(stats.to_arrays())
    np.testing.assert_array_equal(again.sums, stats.sums)
    np.testing.assert_array_equal(again.counts, stats.counts)
    assert {name: a.shape for name, a in stats.to_arrays().items()} == ClassStats.shapes(3, 4)
    with pytest.raises(ProtocolError, match="ClassStats must hold exactly the arrays"):
        ClassStats.from_arrays({**stats.to_arrays(), "embeddings": np.zeros((10, 4))})
    with pytest.raises(ProtocolError):
        ClassStats.from_arrays({"sums": stats.sums})


# --- a board checks what it is told (issue 19) -----------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("fingerprint", "../../home/pi/.ssh/id_ecdsa", "64 lowercase hex"),
        ("fingerprint", "ab" * 32 + "/../x", "64 lowercase hex"),
        ("engine-fingerprint", "AB" * 32, "64 lowercase hex"),
        ("engine", "../onnx", "must be one of"),
        ("engine", "auto", "must be one of"),  # the server names a concrete engine
        ("backbone-name", "../../model", "must be one of"),
        ("head", "shell", "must be one of"),
        ("views", ["identity", "../x"], "unknown views"),
        ("ncm-min-examples", 1, "'ncm-min-examples' must be in [2"),  # below the schema's floor
        ("local-epochs", 10**9, "'local-epochs' must be in"),
        ("learning-rate", 1e9, "'learning-rate' must be in"),
        ("learning-rate", float("nan"), "'learning-rate' must be in"),
        ("batch-size", 0, "'batch-size' must be in"),
        ("mlp-hidden", 10**8, "'mlp-hidden' must be in"),
        ("server-round", -1, "'server-round' must be in"),
        ("num-classes", 0, "'num-classes' must be in"),
        ("preprocess", '{"image_size": 100000}', "preprocessing spec"),
    ],
)
def test_instructions_the_boards_schema_refuses_are_refused(key: str, value: object, says: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(says)):
        Instructions.from_record({**INSTRUCTIONS.to_record(), key: value})


@pytest.mark.parametrize("fingerprint", ["ab", "../" * 20 + "x", "/etc/passwd", "ab" * 32 + "\n", ""])
def test_a_backbone_query_names_only_a_sha256(fingerprint: str) -> None:
    with pytest.raises(ProtocolError, match="64 lowercase hex"):
        BackboneQuery.from_record({"fingerprint": fingerprint, "cut": 0})
    with pytest.raises(ProtocolError, match="'cut' must be in"):
        BackboneQuery.from_record({"fingerprint": "ab" * 32, "cut": 10**6})
