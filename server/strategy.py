"""Flower strategies that federate the trainable part (the head, and the backbone's tail at a
later cut), ship the backbone once per node, and screen replies. Flower's own strategies do the
sampling and aggregation; the mixin wraps their hooks
(``configure_*``, ``aggregate_*``) and calls ``super()``.

The round loop is ours (``run_rounds``), not Flower's ``start()``: it is the same few calls, plus
what ``start()`` cannot do: begin at a checkpointed round, retry a round that got too few usable
updates, checkpoint after every round, and stop with a clear message instead of waiting forever.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, MultiKrum

from common import wire
from common.config import RunConfig
from common.engines import ENGINES
from common.heads import ncm_head_arrays
from server.checkpoint import Checkpoint, random_state_from_json, random_state_to_json
from server.core import RoundRecord, ServerRun
from server.validation import class_stats_reject_reason, reject_reason, update_bounds, update_norm

log = logging.getLogger(__name__)


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _number(value: object) -> float:
    """A metric value as a float; anything that is not a single number counts as 0."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def wire_bytes(message: Message) -> int:
    """Bytes of the message's serialized objects (Flower sends each distinct object once)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


class RunStopped(RuntimeError):
    """The run cannot go on (too few nodes or usable updates); the message says what to do."""


class _NodeSnapshot:
    """A Grid whose node list is fixed, so that Flower's sampling (which waits, without limit,
    until enough nodes are connected) never waits: ``run_rounds`` has already waited, boundedly."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, nodes

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


# Strategy attributes that carry state from round to round (FedAdam's moments); checkpointed.
STATE_ATTRIBUTES = ("m_t", "v_t")


class EdgeSplitMixin:
    """Split federation around any Flower message strategy (put it first in the bases)."""

    run: ServerRun
    min_available_nodes: int
    min_evaluate_nodes: int

    def attach(self, run: ServerRun) -> None:
        self.run = run
        self._backbone_records: dict[str, ArrayRecord] = {}  # engine -> the variant as it is sent
        self._holders: dict[int, str] = {}  # node -> the variant fingerprint it is known to hold
        self._engines: dict[int, str] = {}  # node -> the engine it runs (from its answer)
        self._embedding_counted: set[int] = set()  # nodes whose embedding counts are in the totals
        self._awaiting: dict[str, list[Message]] = {}  # phase -> messages sent this round
        self._sent_bytes: dict[str, dict[int, int]] = {}  # phase -> node -> bytes sent to it this round
        self._expected_shapes = run.head_shapes()
        self._round = RoundRecord(round=0)
        self._round_started = time.perf_counter()
        self._global: dict[str, np.ndarray] | None = None  # the head this round's updates start from
        self._first_examples: dict[int, int] = {}  # node -> num-examples of its first accepted update
        self.global_head = run.start_head  # the latest global head, whatever happens next

    # --- the round loop ---------------------------------------------------------------------------

    def run_rounds(self, grid: Grid) -> dict[str, np.ndarray]:
        """Rounds after the checkpointed one (if any) up to ``num-server-rounds``; returns the
        final head. Raises RunStopped when too few nodes connect or a round fails too often."""
        config = self.run.config
        if self.run.checkpoint is not None:
            self._restore(self.run.checkpoint)
        else:
            random.seed(config.seed)  # Flower samples nodes with Python's global RNG
            if config.head_init == "ncm":
                self.global_head = self._ncm_head(grid)
            self.end_round(0, to_record(self.global_head))
        arrays = to_record(self.global_head)
        for server_round in range(self.run.start_round + 1, config.num_server_rounds + 1):
            self._round = RoundRecord(round=server_round)
            self._round_started = time.perf_counter()
            for attempt in range(config.round_retries + 1):
                self._round.attempts = attempt + 1
                messages = self.configure_train(server_round, arrays, ConfigRecord(self.run.instructions()), grid)
                replies = grid.send_and_receive(messages, timeout=config.round_timeout)
                aggregated, _ = self.aggregate_train(server_round, replies)
                if aggregated is not None:
                    arrays = aggregated
                    break
                if attempt < config.round_retries:
                    self.run.run_log.event("round-retry", round=server_round, attempt=attempt + 2)
                    log.warning(
                        "round %d: retrying (attempt %d of %d)", server_round, attempt + 2, 1 + config.round_retries
                    )
            else:
                raise RunStopped(
                    f"Round {server_round} got fewer than min-clients={config.min_clients} usable updates in "
                    f"{config.round_retries + 1} attempts; the run stops at round {server_round - 1}. The reasons "
                    "are in events.jsonl and on the dashboard (failed and rejected clients). Fix them, then "
                    f"continue with resume-from='{self.run.run_log.run_dir}'."
                )
            self.global_head = from_record(arrays)
            if self.fraction_evaluate > 0:  # type: ignore[attr-defined]
                messages = self.configure_evaluate(server_round, arrays, ConfigRecord(self.run.instructions()), grid)
                self.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=config.round_timeout))
            self.end_round(server_round, arrays)
        return self.global_head

    def _ncm_head(self, grid: Grid) -> dict[str, np.ndarray]:
        """FedNCM: one message to every connected node for its class statistics under the
        initial model (embedding its images on the way, as round 1 would), then the classifier
        from the federation's class means. Nodes that fail or send malformed statistics are
        left out; with none usable the head stays random."""
        self._round = RoundRecord(round=0)
        started = time.perf_counter()
        nodes = self._connected(grid, self.min_available_nodes).get_node_ids()
        question = ConfigRecord(
            {**self.run.instructions(), wire.SERVER_ROUND: 0, wire.QUERY_ACTION: wire.ACTION_CLASS_SUMS}
        )
        arrays = to_record(self.global_head)
        messages = [
            Message(
                RecordDict({wire.ARRAYS: arrays, wire.CONFIG: question}), dst_node_id=n, message_type=MessageType.QUERY
            )
            for n in nodes
        ]
        prepared = self._with_backbone(messages, grid, phase="ncm")
        accepted = self._screen(list(grid.send_and_receive(prepared, timeout=self.run.config.round_timeout)), "ncm")
        stats = [from_record(reply.content.array_records[wire.CLASS_STATS]) for reply in accepted]
        head, counts = self.global_head, np.zeros(len(self.run.classes))
        known: list[int] = []
        if stats:
            counts = np.sum([s[wire.CLASS_COUNTS] for s in stats], axis=0)
            sums = np.sum([s[wire.CLASS_SUMS] for s in stats], axis=0)
            head, known = ncm_head_arrays(self.global_head, sums, counts)
        else:
            log.warning("FedNCM: no usable class statistics arrived; the head starts random")
        self.run.record_initialisation(
            method="ncm",
            nodes=len(accepted),
            classes_set=known,
            class_counts=counts.astype(int).tolist(),
            bytes_down=self._round.bytes_down,
            bytes_up=self._round.bytes_up,
            backbones_sent=self._round.backbones_sent,
            seconds=round(time.perf_counter() - started, 3),
        )
        return head

    def _connected(self, grid: Grid, minimum: int) -> Grid:
        """The grid with its node list fixed, once at least ``minimum`` nodes are connected;
        waits at most ``node-wait-timeout`` seconds for them."""
        timeout = self.run.config.node_wait_timeout
        deadline = time.monotonic() + timeout
        while len(nodes := list(grid.get_node_ids())) < minimum:
            if time.monotonic() > deadline:
                raise RunStopped(
                    f"Only {len(nodes)} node(s) connected within node-wait-timeout={timeout:g}s; this run needs "
                    f"min-clients={self.run.config.min_clients}. Start more SuperNodes (README: Deploy on real "
                    "devices), check that they reach the SuperLink, or lower min-clients."
                )
            log.info("waiting for nodes: %d connected, %d needed", len(nodes), minimum)
            time.sleep(1.0)
        return _NodeSnapshot(grid, nodes)  # type: ignore[return-value]

    def _checkpoint(self, server_round: int, arrays: dict[str, np.ndarray]) -> None:
        run = self.run
        state = {name: dict(getattr(self, name)) for name in STATE_ATTRIBUTES if getattr(self, name, None) is not None}
        Checkpoint(
            round=server_round,
            head=arrays,
            fingerprint=run.fingerprint,
            classes=run.classes,
            strategy=run.config.strategy,
            strategy_state=state,
            random_state=random_state_to_json(random.getstate()),
            rounds=[asdict(r) for r in run.rounds],
            totals=run.totals(),
        ).save(run.run_log.run_dir)
        run.run_log.event("checkpoint", round=server_round)

    def _restore(self, checkpoint: Checkpoint) -> None:
        for name, state in checkpoint.strategy_state.items():
            if name in STATE_ATTRIBUTES:
                setattr(self, name, state)
        if checkpoint.random_state is not None:
            random.setstate(random_state_from_json(checkpoint.random_state))

    # --- train ----------------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self._round.round != server_round:  # a retry adds to the round's record
            self._round = RoundRecord(round=server_round)
            self._round_started = time.perf_counter()
        self._global = from_record(arrays)
        config[wire.LEARNING_RATE] = self.run.config.learning_rate_at(server_round)
        sampled = self._connected(grid, self.min_available_nodes)
        messages = super().configure_train(server_round, arrays, config, sampled)  # type: ignore[misc]
        return self._with_backbone(list(messages), grid, phase="train")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self._screen(list(replies), phase="train")
        self._round.clients_ok = len(accepted)
        minimum = self.run.config.min_clients
        if len(accepted) < minimum:
            # Too few answered in time (failed, rejected or past the deadline): an average over
            # fewer than the operator's minimum is not trusted; the global head stays as it was.
            log.warning(
                "round %d: %d usable update(s), fewer than min-clients=%d; keeping the previous head",
                server_round,
                len(accepted),
                minimum,
            )
            self.run.run_log.event("round-skipped", round=server_round, usable=len(accepted), minimum=minimum)
            return None, None
        return super().aggregate_train(server_round, accepted)  # type: ignore[misc, no-any-return]

    # --- evaluate -------------------------------------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        sampled = self._connected(grid, self.min_evaluate_nodes)
        messages = super().configure_evaluate(server_round, arrays, config, sampled)  # type: ignore[misc]
        return self._with_backbone(list(messages), grid, phase="evaluate")

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        accepted = self._screen(list(replies), phase="evaluate")
        # A client without a local test share has nothing to weigh in with.
        scored = [m for m in accepted if _number(m.content.metric_records[wire.METRICS].get(wire.NUM_EXAMPLES)) > 0]
        metrics = super().aggregate_evaluate(server_round, scored) if scored else None  # type: ignore[misc]
        if metrics is not None and wire.ACCURACY in metrics:
            self._round.client_accuracy = _number(metrics[wire.ACCURACY])
        if metrics is not None and wire.PERSONAL_ACCURACY in metrics:
            self._round.client_personal_accuracy = _number(metrics[wire.PERSONAL_ACCURACY])
        return metrics  # type: ignore[no-any-return]

    # --- end of round: central evaluation (Flower calls this after each round, and for round 0) -

    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        report = self.run.evaluate(from_record(arrays))
        if server_round == 0:
            self.run.run_log.event(
                "initial-evaluation", accuracy=report.accuracy, macro_f1=report.macro_f1, loss=report.loss
            )
        else:
            self._round.seconds = time.perf_counter() - self._round_started
            self.run.record_round(self._round, report)
            # After the round-end event: a crash between the two redoes this round on resume,
            # and the event log shows both attempts (readers keep the last).
            self._checkpoint(server_round, from_record(arrays))
        return MetricRecord({"accuracy": report.accuracy, "macro-f1": report.macro_f1, "loss": report.loss})

    # --- the backbone, once per node -------------------------------------------------------------

    def _with_backbone(self, messages: list[Message], grid: Grid, phase: str) -> list[Message]:
        """Ask nodes we have not heard from which engine they run and which variant they hold;
        tell each node its engine and variant, and attach that variant for nodes that lack it.
        Each message gets its own content so that the megabytes go only where they are needed."""
        unknown = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in self._holders]
        if unknown:
            self._ask_backbone_status(unknown, grid)
        prepared, sent_bytes = [], {}
        for message in messages:
            node = message.metadata.dst_node_id
            # A node that did not answer gets the server's engine; if that is wrong for it, its
            # round fails and it is asked again next round.
            engine = self._engines.get(node, self.run.engine)
            variant = self.run.variants.variant_fingerprint(engine)
            instructions = ConfigRecord(dict(message.content.config_records[wire.CONFIG].items()))
            instructions[wire.ENGINE], instructions[wire.ENGINE_FINGERPRINT] = engine, variant
            content = RecordDict({**dict(message.content.items()), wire.CONFIG: instructions})
            if self._holders.get(node) != variant:
                content[wire.BACKBONE] = self._backbone(engine)
                self._round.backbones_sent += 1
                self._holders[node] = variant  # optimistic; a failed reply removes it again
                self.run.run_log.event("backbone-sent", round=self._round.round, node=node, engine=engine)
            prepared_message = Message(content=content, dst_node_id=node, message_type=message.metadata.message_type)
            size = wire_bytes(prepared_message)
            self._round.bytes_down += size
            sent_bytes[node] = size
            prepared.append(prepared_message)
        self._awaiting[phase] = prepared
        self._sent_bytes[phase] = sent_bytes
        return prepared

    def _ask_backbone_status(self, nodes: list[int], grid: Grid) -> None:
        question = ConfigRecord(
            {
                wire.QUERY_ACTION: wire.ACTION_BACKBONE_STATUS,
                wire.FINGERPRINT: self.run.fingerprint,
                wire.CUT: self.run.config.cut,
            }
        )
        queries = [
            Message(content=RecordDict({wire.CONFIG: question}), dst_node_id=node, message_type=MessageType.QUERY)
            for node in nodes
        ]
        self._round.bytes_down += sum(wire_bytes(q) for q in queries)
        for reply in grid.send_and_receive(queries, timeout=self.run.config.round_timeout):
            if reply.has_error() or wire.STATUS not in reply.content.config_records:
                continue  # it gets the server's engine; if it is dead, its round fails anyway
            self._round.bytes_up += wire_bytes(reply)
            node, answer = reply.metadata.src_node_id, reply.content.config_records[wire.STATUS]
            if answer.get(wire.ENGINE) in ENGINES:
                self._engines[node] = str(answer[wire.ENGINE])
            held = str(answer.get(wire.HELD_FINGERPRINT, ""))
            if held:
                self._holders[node] = held

    def _backbone(self, engine: str) -> ArrayRecord:
        """The backbone as one engine's clients receive it: weights, or the ONNX file's bytes."""
        if engine not in self._backbone_records:
            if engine == "torch":
                self._backbone_records[engine] = ArrayRecord(self.run.backbone_state)
            else:
                model = np.frombuffer(self.run.variants.artifact(engine), dtype=np.uint8)
                self._backbone_records[engine] = ArrayRecord({wire.ONNX_MODEL: Array(model)})
        return self._backbone_records[engine]

    # --- screening replies ------------------------------------------------------------------------

    def _screen(self, replies: list[Message], phase: str) -> list[Message]:
        """Keep replies that are well-formed; count and log failures, silences and rejections."""
        sent = self._awaiting.pop(phase, [])
        # The SuperLink answers for a dead node itself (src_node_id is then its own id), so
        # replies are matched to nodes by the message they answer; Flower sets ids when it sends.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
        origins = [sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id) for reply in replies]
        silent = {m.metadata.dst_node_id for m in sent} - set(origins)
        for node in sorted(silent):
            self._holders.pop(node, None)
            if phase == "train":
                self._round.clients_failed += 1
            silence = f"no reply within round-timeout={self.run.config.round_timeout:g}s"
            self.run.run_log.event("client-failed", round=self._round.round, phase=phase, node=node, reason=silence)
            log.warning("node %s failed in %s: %s", node, phase, silence)
        candidates: list[tuple[Message, int, int]] = []  # (reply, node, bytes) that passed the checks
        for reply, node in zip(replies, origins, strict=True):
            if reply.has_error():
                self._holders.pop(node, None)  # ask again next time: it may have lost its cache
                if phase == "train":
                    self._round.clients_failed += 1
                self.run.run_log.event(
                    "client-failed", round=self._round.round, phase=phase, node=node, reason=reply.error.reason
                )
                log.warning("node %s failed in %s: %s", node, phase, reply.error.reason)
                continue
            size = wire_bytes(reply)
            self._round.bytes_up += size
            if phase == "train":
                self._round.max_bytes_up_per_client = max(self._round.max_bytes_up_per_client, size)
            reason = self._reject_reason(reply, phase, node)
            if reason is None:
                candidates.append((reply, node, size))
            else:
                self._reject(node, phase, reason)
        norms: dict[int, float] = {}  # how far each update moved the head: what the bounds are chosen from
        if phase == "train" and self._global is not None:
            norms = {
                node: update_norm(from_record(r.content.array_records[wire.ARRAYS]), self._global)
                for r, node, _ in candidates
            }
            flagged = update_bounds(norms, self.run.config.max_update_norm, self.run.config.max_update_ratio)
            for node, reason in flagged.items():
                self._reject(node, phase, reason)
            candidates = [c for c in candidates if c[1] not in flagged]
        for reply, node, size in candidates:
            self._accept(reply, node, size, phase, norms.get(node))
        return [reply for reply, _, _ in candidates]

    def _reject(self, node: int, phase: str, reason: str) -> None:
        if phase == "train":
            self._round.clients_rejected += 1
        self.run.run_log.event("client-rejected", round=self._round.round, phase=phase, node=node, reason=reason)
        log.warning("node %s: %s reply rejected: %s", node, phase, reason)

    def _accept(self, reply: Message, node: int, size: int, phase: str, norm: float | None) -> None:
        metrics = dict(reply.content[wire.METRICS].items())
        status = reply.content.config_records.get(wire.STATUS)
        notes = str(status.get(wire.DATA_NOTES, "")) if status is not None else ""
        self.run.run_log.event(
            "client-reply",
            round=self._round.round,
            phase=phase,
            node=node,
            bytes=size,
            bytes_down=self._sent_bytes.get(phase, {}).get(node, 0),
            engine=str(status.get(wire.ENGINE, "")) if status is not None else "",
            metrics=metrics,
            **({"update_norm": round(norm, 6)} if norm is not None else {}),
            **({"notes": notes} if notes else {}),
        )
        if phase == "train":
            self._first_examples.setdefault(node, int(_number(metrics.get(wire.NUM_EXAMPLES))))
        if phase in ("train", "ncm") and node not in self._embedding_counted:
            # First train reply per node only: a deployed ClientApp is a new process each
            # round and reports its cache loads again; those are telemetry, not new work.
            self._embedding_counted.add(node)
            self.run.embedding_computed += int(_number(metrics.get(wire.EMBEDDINGS_COMPUTED)))
            self.run.embedding_cached += int(_number(metrics.get(wire.EMBEDDINGS_CACHED)))
            self.run.images_skipped += int(_number(metrics.get(wire.IMAGES_SKIPPED)))

    def _reject_reason(self, reply: Message, phase: str, node: int) -> str | None:
        content = reply.content
        if wire.METRICS not in content.metric_records:
            return "reply carries no metrics"
        status = content.config_records.get(wire.STATUS)
        arrays = None
        if phase == "ncm":
            if set(content.array_records) != {wire.CLASS_STATS}:
                return f"a FedNCM reply must carry exactly the class statistics, got {sorted(content.array_records)}"
            reason = class_stats_reject_reason(
                from_record(content.array_records[wire.CLASS_STATS]), len(self.run.classes), self.run.spec.feature_dim
            )
            if reason is not None:
                return reason
        elif phase == "train":
            if set(content.array_records) != {wire.ARRAYS}:
                return f"reply must carry exactly the head arrays, got records {sorted(content.array_records)}"
            arrays = from_record(content.array_records[wire.ARRAYS])
        elif content.array_records:
            return "an evaluation reply must not carry arrays"
        return reject_reason(
            arrays=arrays,
            metrics=dict(content.metric_records[wire.METRICS].items()),
            reply_fingerprint=status.get(wire.FINGERPRINT) if status is not None else None,
            expected_shapes=self._expected_shapes if phase == "train" else None,
            expected_fingerprint=self.run.fingerprint,
            max_norm=self.run.config.max_weight_norm,
            examples_before=self._first_examples.get(node),
        )


class EdgeFedAvg(EdgeSplitMixin, FedAvg):
    """FedAvg over the head."""


class EdgeFedProx(EdgeSplitMixin, FedProx):  # FedProx and FedAdam subclass FedAvg
    """FedProx over the head (clients add the proximal term)."""


class EdgeFedAdam(EdgeSplitMixin, FedAdam):
    """FedAdam over the head (server-side Adam on the averaged update)."""


class EdgeFedMedian(EdgeSplitMixin, FedMedian):
    """Coordinate-wise median of the heads: robust to a minority of poisoned updates."""


class EdgeFedTrimmedAvg(EdgeSplitMixin, FedTrimmedAvg):
    """Coordinate-wise mean after cutting the ``trim-beta`` share from each end."""


class EdgeKrum(EdgeSplitMixin, Krum):
    """Krum: the one update closest to its n - f - 2 nearest neighbours."""


class _MultiKrumOfWhatArrived(MultiKrum):
    """Flower's Multi-Krum keeps a fixed number of updates; keep all but ``num_malicious_nodes``
    of those that arrived and passed screening (the mixin screens before this runs)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.num_nodes_to_select = max(1, len(replies) - self.num_malicious_nodes)
        return super().aggregate_train(server_round, replies)


class EdgeMultiKrum(EdgeSplitMixin, _MultiKrumOfWhatArrived):
    """Multi-Krum: drop the ``krum-malicious`` updates with the worst Krum scores each round,
    then average the rest weighted by examples, as FedAvg does. Keeps FedAvg's use of every
    honest client's data where Krum keeps one update and the median ignores the weights."""


EdgeStrategy = EdgeFedAvg | EdgeFedProx | EdgeFedAdam | EdgeFedMedian | EdgeFedTrimmedAvg | EdgeKrum | EdgeMultiKrum


def make_strategy(config: RunConfig, run: ServerRun) -> EdgeStrategy:
    common: dict[str, Any] = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": config.min_clients,
        "min_evaluate_nodes": config.min_clients if config.fraction_evaluate > 0 else 0,
        "min_available_nodes": config.min_clients,
    }
    strategy: EdgeStrategy
    if config.strategy == "fedavg":
        strategy = EdgeFedAvg(**common)
    elif config.strategy == "fedprox":
        strategy = EdgeFedProx(proximal_mu=config.proximal_mu, **common)
    elif config.strategy == "fedadam":
        strategy = EdgeFedAdam(eta=config.server_learning_rate, eta_l=config.learning_rate, **common)
    elif config.strategy == "fedmedian":
        strategy = EdgeFedMedian(**common)
    elif config.strategy == "fedtrimmedavg":
        strategy = EdgeFedTrimmedAvg(beta=config.trim_beta, **common)
    elif config.strategy == "krum":
        strategy = EdgeKrum(num_malicious_nodes=config.krum_malicious, **common)
    else:
        strategy = EdgeMultiKrum(num_malicious_nodes=config.krum_malicious, **common)
    strategy.attach(run)
    return strategy
