"""The ClientApp's handlers end to end in process, behind both mods: typed replies, the backbone
kept and reported, and the same embedding counts in every reply that used one embedding."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import app as client_app
from common.backbones import build_backbone, fingerprint, load_backbone_weights, preprocess_for
from common.engines import ENGINE_KINDS, TorchEngine
from common.flower_glue import from_array_record, to_array_record
from common.heads import head_arrays
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
    RIDGE_STATS,
    STATUS,
    BackboneQuery,
    BackboneStatus,
    ClassCounts,
    ClassStats,
    Instructions,
    QueryAction,
    ReplyStatus,
    RidgeStats,
)
from common.split import build_head
from tests.conftest import write_image_folder
from tests.protocol_samples import instructions

NAME = "efficientnet_lite0"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Context, Instructions, dict[str, np.ndarray], dict]:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    tmp = tmp_path_factory.mktemp("client-app")
    data = write_image_folder(tmp / "board", {"ok": 4, "crack": 4}, seed=0)
    preprocess = preprocess_for(NAME, 64, 1.0)
    state = load_backbone_weights(NAME)
    fp = fingerprint(NAME, state, preprocess)
    run = {"dataset": "folder", "class-names": "ok,crack", "server-test-dir": str(data), "engine": "torch"}
    node = {"data-dir": str(data), "cache-dir": str(tmp / "cache")}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=run)
    sent = instructions(fingerprint=fp, engine_fingerprint=fp, preprocess=preprocess, personal_epochs=1)
    head = head_arrays(build_head(NAME, 0, "linear", 2, model=build_backbone(NAME, state)))
    # the server's golden batch: its images in float16 and its fp32 features of exactly those
    images = np.random.default_rng(0).normal(0, 1, (2, 3, 64, 64)).astype(np.float16)
    features = TorchEngine(build_backbone(NAME, state), channels_last=False)(images.astype(np.float32))
    backbone = {BACKBONE: ENGINE_KINDS["torch"].pack(state), GOLDEN: {"images": images, "features": features}}
    return context, sent, head, backbone


def _send(kind: str, config: dict, context: Context, **arrays: dict[str, np.ndarray]) -> Message:
    content = RecordDict({CONFIG: ConfigRecord(config)})
    for name, values in arrays.items():
        content[name] = to_array_record(values)
    msg = Message(content=content, dst_node_id=1, message_type=kind)
    handler = {"train": client_app.train, "evaluate": client_app.evaluate, "query": client_app.query}[kind]
    reply = client_app.privacy_guard(msg, context, lambda m, c: client_app.inject_faults(m, c, handler))
    assert not reply.has_error(), reply.error
    return reply


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
    stats = _send(
        MessageType.QUERY, {**sent.to_record(), ACTION: QueryAction.CLASS_SUMS.value}, context, **{ARRAYS: head}
    )
    ridge = _send(
        MessageType.QUERY, {**sent.to_record(), ACTION: QueryAction.RIDGE_SUMS.value}, context, **{ARRAYS: head}
    )
    assert again.content[METRICS][BACKBONE_RECEIVED] == 0
    for reply in (again, scored, stats, ridge):  # every reply carries the embedding it used, unchanged
        for key in EMBEDDING_METRICS:
            assert reply.content[METRICS][key] == first.content[METRICS][key], key
    assert ClassStats.from_arrays(from_array_record(stats.content.array_records[CLASS_STATS])).sums.shape == (2, 1280)
    # Fed3R's sums: the server asked a floor of 2, the board keeps its own 5, and 3 or 4 training
    # images per class are fewer: every class is left out
    sums = RidgeStats.from_arrays(from_array_record(ridge.content.array_records[RIDGE_STATS]))
    assert sums.gram.shape == (1280 * 1281 // 2,) and not sums.counts.any() and not sums.gram.any()
    counted = _send(MessageType.QUERY, {**sent.to_record(), ACTION: QueryAction.CLASS_COUNTS.value}, context)
    counts = ClassCounts.from_arrays(from_array_record(counted.content.array_records[CLASS_COUNTS])).counts
    assert counts.sum() == counted.content[METRICS][NUM_EXAMPLES] == stats.content[METRICS][NUM_EXAMPLES] > 0

    status = BackboneStatus.from_record(_send(MessageType.QUERY, asked, context).content[STATUS])
    assert status.held_fingerprint == sent.fingerprint and status.golden_cosine > 0.999
