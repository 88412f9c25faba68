"""The ClientApp's handlers end to end in process, behind both mods: typed replies, the backbone
kept and reported, the same embedding counts in every reply that used one embedding, and crafted
instructions refused before they touch the disk."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client import app as client_app
from client.privacy import BoardError
from common.backbones import build_backbone, fingerprint, load_backbone_weights, preprocess_for
from common.clipping import update_norm
from common.engines import ENGINE_KINDS, TorchEngine
from common.flower_glue import act_as, from_array_record, to_array_record
from common.kinds import HeadKind
from common.numpy_head import NumpyHead
from common.protocol import (
    ACTION,
    ARRAYS,
    BACKBONE,
    BACKBONE_RECEIVED,
    CLASS_COUNTS,
    CLASS_STATS,
    CONFIG,
    EMBEDDING_METRICS,
    GOLDEN,
    METRICS,
    NUM_EXAMPLES,
    REFUSAL_CODE,
    SETUP_ERROR_CODE,
    STATUS,
    BackboneQuery,
    BackboneStatus,
    ClassCounts,
    ClassStats,
    Instructions,
    Phase,
    ProtocolError,
    ReplyStatus,
)
from tests.conftest import write_image_folder
from tests.protocol_samples import instructions

NAME = "efficientnet_lite0"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Context, Instructions, dict[str, np.ndarray], dict]:
    act_as(1)
    tmp = tmp_path_factory.mktemp("client-app")
    data = write_image_folder(tmp / "board", {"ok": 4, "crack": 4}, seed=0)
    preprocess = preprocess_for(NAME, 64, 1.0)
    state = load_backbone_weights(NAME)
    fp = fingerprint(NAME, state, preprocess)
    # the run the board agreed to: what the sample instructions say (client/agreement.py)
    run = {
        "dataset": "folder",
        "class-names": "ok,crack",
        "server-test-dir": str(data),
        "engine": "torch",
        "mlp-hidden": 8,
        "ncm-min-examples": 2,
        "seed": 0,
    }
    node = {"data-dir": str(data), "cache-dir": str(tmp / "cache")}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=run)
    sent = instructions(fingerprint=fp, engine_fingerprint=fp, preprocess=preprocess, personal_epochs=1)
    head = NumpyHead.initial(HeadKind.LINEAR, 1280, 2, 8, seed=0).arrays()  # the run's initial head
    # the server's golden batch: its images in float16 and its fp32 features of exactly those
    images = np.random.default_rng(0).normal(0, 1, (2, 3, 64, 64)).astype(np.float16)
    features = TorchEngine(build_backbone(NAME, state), channels_last=False)(images.astype(np.float32))
    backbone = {BACKBONE: ENGINE_KINDS["torch"].pack(state), GOLDEN: {"images": images, "features": features}}
    return context, sent, head, backbone


def _answer(kind: str, config: dict, context: Context, **arrays: dict[str, np.ndarray]) -> Message:
    content = RecordDict({CONFIG: ConfigRecord(config)})
    for name, values in arrays.items():
        content[name] = to_array_record(values)
    msg = Message(content=content, dst_node_id=1, message_type=kind)
    handler = {"train": client_app.train, "evaluate": client_app.evaluate, "query": client_app.query}[kind]
    return client_app.inject_faults(msg, context, lambda m, c: client_app.privacy_guard(m, c, handler))


def _send(kind: str, config: dict, context: Context, **arrays: dict[str, np.ndarray]) -> Message:
    reply = _answer(kind, config, context, **arrays)
    assert not reply.has_error(), reply.error
    return reply


def _run(context: Context, **keys: object) -> Context:
    """The same board in a run with other run-config keys."""
    return Context(
        run_id=1,
        node_id=1,
        node_config=context.node_config,
        state=RecordDict(),
        run_config={**context.run_config, **keys},
    )


def test_a_round_through_the_handlers(setup: tuple[Context, Instructions, dict[str, np.ndarray], dict]) -> None:
    context, sent, head, backbone = setup
    client_app.state.clear()  # a fresh process
    asked = BackboneQuery(fingerprint=sent.fingerprint, cut=0).to_record()
    status = BackboneStatus.from_record(_send(MessageType.QUERY, asked, context).content[STATUS])
    assert status == BackboneStatus(engine="torch", held_fingerprint="")

    first = _send(MessageType.TRAIN, sent.to_record(), context, **{ARRAYS: head, **backbone})
    assert ReplyStatus.from_record(first.content[STATUS]).fingerprint == sent.fingerprint
    assert ReplyStatus.from_record(first.content[STATUS]).golden_cosine > 0.999  # its engine checked out
    assert set(from_array_record(first.content.array_records[ARRAYS])) == set(head)
    assert first.content[METRICS][BACKBONE_RECEIVED] == 1

    again = _send(MessageType.TRAIN, sent.to_record(), context, **{ARRAYS: head})
    scored = _send(MessageType.EVALUATE, sent.to_record(), context, **{ARRAYS: head})
    assert again.content[METRICS][BACKBONE_RECEIVED] == 0
    for reply in (again, scored):  # every reply carries the embedding it used, unchanged
        for key in EMBEDDING_METRICS:
            assert reply.content[METRICS][key] == first.content[METRICS][key], key

    # Each one-shot query in a run that asks it (the board refuses it in any other run)
    ncm, lda, balanced = (
        _run(context, **keys) for keys in ({"head-init": "ncm"}, {"head-init": "lda"}, {"class-balance": "weighted"})
    )
    stats = _send(MessageType.QUERY, {**sent.to_record(), ACTION: Phase.CLASS_SUMS.value}, ncm, **{ARRAYS: head})
    assert ClassStats.from_arrays(from_array_record(stats.content.array_records[CLASS_STATS])).sums.shape == (2, 1280)
    # Fed3R's sums: the server asked a floor of 2, the board keeps its own 5, and 3 or 4 training
    # images per class are fewer: every class would be left out, and a Gram matrix of no image is
    # refused in a few bytes rather than sent as zeros
    ridge = _answer(MessageType.QUERY, {**sent.to_record(), ACTION: Phase.RIDGE_SUMS.value}, lda, **{ARRAYS: head})
    assert ridge.has_error() and ridge.error.code == REFUSAL_CODE and "fewer than its floor" in ridge.error.reason
    counted = _send(MessageType.QUERY, {**sent.to_record(), ACTION: Phase.CLASS_COUNTS.value}, balanced)
    counts = ClassCounts.from_arrays(from_array_record(counted.content.array_records[CLASS_COUNTS])).counts
    assert counts.sum() == counted.content[METRICS][NUM_EXAMPLES] == stats.content[METRICS][NUM_EXAMPLES] > 0
    refused = _answer(MessageType.QUERY, {**sent.to_record(), ACTION: Phase.CLASS_COUNTS.value}, context)
    assert refused.has_error() and refused.error.code == REFUSAL_CODE and "asks no class-counts" in refused.error.reason

    status = BackboneStatus.from_record(_send(MessageType.QUERY, asked, context).content[STATUS])
    assert status.held_fingerprint == sent.fingerprint and status.golden_cosine > 0.999


def test_a_node_without_its_data_folder_answers_with_one_coded_reason_not_a_traceback(
    setup: tuple[Context, Instructions, dict[str, np.ndarray], dict], tmp_path
) -> None:
    context, sent, head, _ = setup
    client_app.state.clear()
    missing = Context(
        run_id=1,
        node_id=1,
        node_config={"data-dir": str(tmp_path / "nowhere"), "cache-dir": str(tmp_path / "cache")},
        state=RecordDict(),
        run_config=context.run_config,
    )
    msg = Message(
        content=RecordDict({CONFIG: ConfigRecord(sent.to_record()), ARRAYS: to_array_record(head)}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    reply = client_app.inject_faults(msg, missing, lambda m, c: client_app.privacy_guard(m, c, client_app.train))

    assert reply.has_error() and reply.error.code == SETUP_ERROR_CODE
    assert "does not exist" in reply.error.reason and "nowhere" not in reply.error.reason  # the board's own path


def test_no_reply_carries_the_boards_paths_or_folder_names(
    setup: tuple[Context, Instructions, dict[str, np.ndarray], dict], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A board at a site whose folders name a customer: its replies, its status notes, a setup
    error and an exception that quotes a file all reach the server without them; its log keeps them."""
    # Prepare
    context, sent, head, backbone = setup
    client_app.state.clear()
    data = write_image_folder(tmp_path / "acme-site" / "images", {"ok": 4, "crack": 4}, seed=1)
    (data / "customer-john-doe").mkdir()  # a folder the run does not know: noted, not named
    site = Context(
        run_id=1,
        node_id=1,
        node_config={"data-dir": str(data), "cache-dir": str(tmp_path / "cache")},
        state=RecordDict(),
        run_config=context.run_config,
    )
    gone = Context(
        run_id=1,
        node_id=1,
        node_config={**site.node_config, "data-dir": str(tmp_path / "acme-site" / "gone")},
        state=RecordDict(),
        run_config=context.run_config,
    )
    train = Message(
        content=RecordDict({CONFIG: ConfigRecord(sent.to_record()), ARRAYS: to_array_record(head)}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )

    def crashes(msg: Message, context: Context) -> Message:
        raise FileNotFoundError(2, "No such file or directory", str(data / "ok" / "customer-john-doe.png"))

    # Execute
    with caplog.at_level("WARNING"):
        trained = _send(MessageType.TRAIN, sent.to_record(), site, **{ARRAYS: head, **backbone})
        scored = _send(MessageType.EVALUATE, sent.to_record(), site, **{ARRAYS: head})
        refused = client_app.privacy_guard(train, gone, client_app.train)
        with pytest.raises(BoardError) as raised:
            client_app.privacy_guard(train, site, crashes)

    # Assert
    notes = ReplyStatus.from_record(trained.content[STATUS]).data_notes
    assert "ignored 1 class folder(s)" in notes
    assert refused.has_error() and "does not exist" in str(refused.error.reason)
    assert str(raised.value).startswith("FileNotFoundError: [Errno 2] No such file or directory")
    sent_back = [*map(str, trained.content[STATUS].values()), *map(str, scored.content[STATUS].values())]
    for text in [*sent_back, str(refused.error.reason), str(raised.value)]:
        assert "acme-site" not in text and "john-doe" not in text, text
    assert "customer-john-doe" in caplog.text and "acme-site" in caplog.text  # the board's own log has them


def test_crafted_instructions_are_refused_and_the_board_goes_on(
    setup: tuple[Context, Instructions, dict[str, np.ndarray], dict], tmp_path: Path
) -> None:
    """A fingerprint that walks out of the cache, or a class name that walks out of the data
    folder, is refused with a reason (an error reply: Flower's runner makes one of the exception); the
    file it aimed at is untouched, and the next honest message is answered."""
    context, sent, head, backbone = setup
    victim = tmp_path / "victim.pt"
    victim.write_bytes(b"the user's own file")
    escape = os.path.relpath(victim.with_suffix(""), Path(context.node_config["cache-dir"]) / "backbones")
    crafted = {**sent.to_record(), "fingerprint": escape, "engine-fingerprint": escape}
    for kind, config, arrays in (
        (MessageType.TRAIN, crafted, {ARRAYS: head, **backbone}),
        (
            MessageType.QUERY,
            BackboneQuery(fingerprint=sent.fingerprint, cut=0).to_record() | {"fingerprint": escape},
            {},
        ),
    ):
        content = RecordDict({CONFIG: ConfigRecord(config)})
        for name, values in arrays.items():
            content[name] = to_array_record(values)
        handler = {"train": client_app.train, "query": client_app.query}[kind]
        with pytest.raises(ProtocolError, match="64 lowercase hex"):
            handler(Message(content=content, dst_node_id=1, message_type=kind), context)
    assert victim.read_bytes() == b"the user's own file"
    assert not list(tmp_path.glob("*.onnx"))
    asked = BackboneQuery(fingerprint=sent.fingerprint, cut=0).to_record()
    run_config = {**context.run_config, "class-names": "ok,../../etc"}
    traversing = Context(
        run_id=1, node_id=1, node_config=context.node_config, state=RecordDict(), run_config=run_config
    )
    refused = client_app.query(
        Message(RecordDict({CONFIG: ConfigRecord(asked)}), dst_node_id=1, message_type="query"), traversing
    )
    assert refused.has_error() and refused.error.code == SETUP_ERROR_CODE
    assert "plain folder name" in refused.error.reason
    assert BackboneStatus.from_record(_send(MessageType.QUERY, asked, context).content[STATUS]).engine == "torch"


def test_a_message_is_decoded_once_by_everything_that_reads_it(
    setup: tuple[Context, Instructions, dict[str, np.ndarray], dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault injector, the privacy guard, DP clipping and the handler all read the train
    message's instructions and arrays: through the real ClientApp, they are decoded once."""
    context, sent, head, backbone = setup
    decode = Instructions.from_record.__func__  # type: ignore[attr-defined]
    decoded: list[int] = []
    monkeypatch.setattr(Instructions, "from_record", classmethod(lambda cls, r: decoded.append(1) or decode(cls, r)))
    clipped = dataclasses.replace(sent, dp_clipping_norm=1e-3)
    content = RecordDict({CONFIG: ConfigRecord(clipped.to_record()), ARRAYS: to_array_record(head)})
    for name, values in backbone.items():
        content[name] = to_array_record(values)
    dp_run = _run(context, **{"dp-clipping-norm": 1e-3})
    reply = client_app.app(Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN), dp_run)
    assert not reply.has_error(), reply.error
    trained = from_array_record(reply.content.array_records[ARRAYS])
    assert update_norm(trained, head) <= 1e-3 * (1 + 1e-5)  # the DP mod read the same request
    assert decoded == [1]
