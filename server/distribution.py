"""The backbone, once per node: which engine each node runs, which variant of the backbone it
holds, and the variant attached to a message only for a node that lacks it, with the golden
batch the node checks it on (client/golden.py). Each message gets its own content, so that the
megabytes go only where they are needed. A node that fell back to a safer engine after a failed
golden check says so when asked, and gets that engine's variant."""

from __future__ import annotations

import dataclasses
import logging

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import protocol
from common.engines import ENGINE_KINDS, EngineKind
from common.flower_glue import to_array_record, to_config_record, wire_bytes
from common.kinds import EventKind
from common.protocol import BackboneQuery, BackboneStatus, Instructions, ProtocolError
from server.ledger import RoundTally
from server.run_folder import RunLog
from server.variants import BackboneVariants

log = logging.getLogger(__name__)


class BackboneDistributor:
    """What the server knows of each node's backbone, and the messages that follow from it."""

    def __init__(
        self, run_log: RunLog, variants: BackboneVariants, default_engine: EngineKind, round_timeout: float
    ) -> None:
        self.run_log, self.variants, self.default_engine = run_log, variants, default_engine
        self.round_timeout = round_timeout
        self.holders: dict[int, str] = {}  # node -> the variant fingerprint it is known to hold
        self.engines: dict[int, EngineKind] = {}  # node -> the engine it runs (from its answer)
        self._records: dict[str, ArrayRecord] = {}  # engine -> the variant as it is sent
        self._golden: ArrayRecord | None = None
        self.fallbacks: dict[int, str] = {}  # node -> why it runs a safer engine (its latest answer)

    def forget(self, nodes: set[int]) -> None:
        """Nodes that failed: ask again next time (they may have lost their cache)."""
        for node in nodes:
            self.holders.pop(node, None)
            self.engines.pop(node, None)

    def prepare(self, messages: list[Message], grid: Grid, tally: RoundTally) -> list[tuple[Message, int]]:
        """Each message with its node's engine and variant in the instructions, and the variant
        itself where the node lacks it; with the bytes each message carries."""
        unknown = [m.metadata.dst_node_id for m in messages if not self.knows(m.metadata.dst_node_id)]
        if unknown:
            self.ask_status(unknown, grid, tally)
        prepared = []
        for message in messages:
            node = message.metadata.dst_node_id
            # A node that did not answer gets the server's engine; if that is wrong for it, its
            # round fails and it is asked again next round.
            kind = self.engines.get(node, self.default_engine)
            variant = self.variants.variant_fingerprint(kind)
            given = message.content.config_records[protocol.CONFIG]
            instructions = dataclasses.replace(
                Instructions.from_record(given), engine=kind.name, engine_fingerprint=variant
            )
            config = ConfigRecord({**dict(given.items()), **instructions.to_record()})
            content = RecordDict({**dict(message.content.items()), protocol.CONFIG: config})
            if self.holders.get(node) != variant:
                content[protocol.BACKBONE] = self._record(kind)
                content[protocol.GOLDEN] = self._golden_record()
                tally.record.backbones_sent += 1
                self.holders[node] = variant  # optimistic; a failed reply removes it again
                self.run_log.event(EventKind.BACKBONE_SENT, round=tally.record.round, node=node, engine=kind.name)
            outgoing = Message(content=content, dst_node_id=node, message_type=message.metadata.message_type)
            size = wire_bytes(outgoing)
            tally.record.bytes_down += size
            prepared.append((outgoing, size))
        return prepared

    def knows(self, node: int) -> bool:
        """Whether the node has said which engine it runs (or is known to hold a variant)."""
        return node in self.engines or node in self.holders

    def ask_status(self, nodes: list[int], grid: Grid, tally: RoundTally) -> int:
        """Ask ``nodes`` which engine they run and which variant they hold; returns how many answered."""
        question = to_config_record(BackboneQuery(fingerprint=self.variants.fingerprint, cut=self.variants.cut))
        queries = [
            Message(RecordDict({protocol.CONFIG: question}), dst_node_id=node, message_type=MessageType.QUERY)
            for node in nodes
        ]
        tally.record.bytes_down += sum(wire_bytes(q) for q in queries)
        answered = 0
        for reply in grid.send_and_receive(queries, timeout=self.round_timeout):
            if reply.has_error() or protocol.STATUS not in reply.content.config_records:
                continue  # it gets the server's engine; if it is dead, its round fails anyway
            tally.record.bytes_up += wire_bytes(reply)
            try:
                answer = BackboneStatus.from_record(reply.content.config_records[protocol.STATUS])
            except ProtocolError as error:
                log.warning("node %s: unreadable backbone status (%s)", reply.metadata.src_node_id, error)
                continue
            node = reply.metadata.src_node_id
            answered += 1
            self.engines[node] = ENGINE_KINDS.get(answer.engine, self.default_engine)
            if answer.fallback and self.fallbacks.get(node) != answer.fallback:
                log.warning("node %s runs a safer engine after a failed golden check: %s", node, answer.fallback)
                self.run_log.event(
                    EventKind.ENGINE_FALLBACK,
                    round=tally.record.round,
                    node=node,
                    engine=answer.engine,
                    golden_cosine=answer.golden_cosine,
                    reason=answer.fallback,
                )
            self.fallbacks[node] = answer.fallback
            if answer.held_fingerprint:
                self.holders[node] = answer.held_fingerprint
        return answered

    def _golden_record(self) -> ArrayRecord:
        if self._golden is None:
            self._golden = to_array_record(self.variants.golden().to_arrays())
        return self._golden

    def _record(self, kind: EngineKind) -> ArrayRecord:
        """The backbone as one engine's clients receive it (made once per engine)."""
        if kind.name not in self._records:
            self._records[kind.name] = to_array_record(kind.pack(self.variants.artifact(kind)))
        return self._records[kind.name]
