"""The one module that knows Flower beyond its public API, and where the protocol's plain messages
become Flower records and back.

Every other file imports only Flower's public modules (``flwr.app``, ``flwr.clientapp``,
``flwr.serverapp`` with their ``strategy`` and ``mod`` packages, and ``flwr.common``), and
tests/test_seams.py fails when one does not. What Flower offers no public API for is reached here,
each use with what it rests on, so that a Flower upgrade is checked in one file:

- the bytes a message costs on the wire (``wire_bytes``);
- the SuperLink's error codes for a lost reply, and re-addressing a re-sent instruction's reply to
  the first copy (``LOST_REPLY_CODES``, ``answer_to``);
- the types a grid declares (``NodeInfo``, ``Run``) and a grid that forwards to Flower's
  (``ForwardingGrid``), so that ``Grid``'s signatures are followed here alone;
- the FedOpt strategies' moments, for the checkpoint (``strategy_state``);
- the ClientApp mod types, Flower's noise formula, its ArrayRecord aggregation, its config-string
  parser and the FAB build's ignore rules;
- a SuperNode that declares a shorter node heartbeat (``run_supernode_with_heartbeat``), and one
  whose app processes may take longer to start (``allow_slow_app_start``, an emulated board);
- secure sums: Flower's SecAgg+ stages and primitives (``SecureBoard``, ``unmask_sum``), for sums
  of any arrays rather than the weighted average of one model its workflow and mod compute;
- what tests need to stand in for Flower's runtime (``act_as``, ``mark_pushed``, ...).

Written for Flower 1.42 (pyproject.toml pins it; README, "Flower versions").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.run import Run

from common.protocol import ConfigMessage

__all__ = [
    "LOST_REPLY_CODES",
    "ClientAppCallable",
    "ErrorCode",
    "ForwardingGrid",
    "Mod",
    "NodeInfo",
    "Run",
    "SecureKey",
    "SecureStage",
]

# --- records -----------------------------------------------------------------------------------


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    # np.ascontiguousarray makes a 0-d array 1-d; keep the shape (a torch state's
    # num_batches_tracked is 0-d, and the backbone fingerprint covers every shape).
    return ArrayRecord(
        {name: Array(np.ascontiguousarray(value).reshape(np.shape(value))) for name, value in arrays.items()}
    )


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def to_config_record(message: ConfigMessage) -> ConfigRecord:
    return ConfigRecord(message.to_record())


def wire_bytes(message: Message) -> int:
    """Bytes of the message's serialized objects (Flower sends each distinct object once).

    No public API says what a message costs on the wire; this walks Flower's internal
    ``flwr.supercore.inflatable`` object tree. On an upgrade, check that ``get_all_nested_objects``
    still exists and that ``deflate()`` is what is pushed: the byte counts in BENCHMARKS.md rest on it.
    """
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


# --- the ServerApp's grid ----------------------------------------------------------------------

# Replies the SuperLink reports lost (not a node that failed or died): worth sending again.
LOST_REPLY_CODES = frozenset({ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE})


def answer_to(reply: Message, message_id: str) -> None:
    """Make ``reply`` answer the message ``message_id``: a reply to a re-sent copy of an instruction
    answers the first copy, whose id the server matched the node by. ``Metadata`` has no setter for
    it; Flower itself sets ids through the same private attribute on push."""
    reply.metadata.__dict__["_reply_to_message_id"] = message_id


SendAndReceive = Callable[[list[Message], "float | None"], list[Message]]


class ForwardingGrid(Grid):
    """A grid that forwards everything to Flower's ``grid``, except what it is given: the node
    list (``nodes``, a fixed snapshot) and how a phase's messages are sent and their replies
    collected (``send_and_receive``). Flower's ``Grid`` is abstract and its method signatures
    change between releases; this class alone follows them."""

    def __init__(
        self, grid: Grid, send_and_receive: SendAndReceive | None = None, nodes: Iterable[int] | None = None
    ) -> None:
        self._grid = grid
        self._send_and_receive = send_and_receive
        self._nodes = None if nodes is None else list(nodes)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes) if self._nodes is not None else self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        nodes = self._grid.get_nodes()
        return nodes if self._nodes is None else [node for node in nodes if node.node_id in self._nodes]

    def set_run(self, run: Run) -> None:  # type: ignore[override]  # Flower declares it with its own Run
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        if self._send_and_receive is None:
            return self._grid.send_and_receive(messages, timeout=timeout)
        return self._send_and_receive(list(messages), timeout)


# --- strategies ----------------------------------------------------------------------------------

# Flower's FedOpt family (FedAdam, FedYogi, FedAdagrad) keeps its moments in the attributes ``m_t``
# and ``v_t`` and offers no API to save them. On an upgrade, check that these names still hold the
# whole state (``current_arrays`` is reset each round from the arrays the wrapper passes).
STRATEGY_STATE_ATTRIBUTES = ("m_t", "v_t")


def strategy_state(strategy: Strategy) -> dict[str, dict[str, np.ndarray]]:
    """What a Flower strategy carries from round to round, for the checkpoint."""
    return {
        name: dict(value) for name in STRATEGY_STATE_ATTRIBUTES if (value := getattr(strategy, name, None)) is not None
    }


def restore_strategy_state(strategy: Strategy, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    for name, value in state.items():
        if name in STRATEGY_STATE_ATTRIBUTES:
            setattr(strategy, name, dict(value))


def aggregate_array_records(replies: list[RecordDict], weight_key: str) -> ArrayRecord:
    """Flower's weighted average of the replies' array records (what FedAvg computes), for the
    in-process benchmarks that aggregate without a strategy."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    return aggregate_arrayrecords(replies, weight_key)


def gaussian_noise_std(noise_multiplier: float, clipping_norm: float, sampled: int) -> float:
    """Flower's standard deviation of the DP noise on each coordinate of a mean over ``sampled``
    clipped updates (``compute_stdv``: z C / n)."""
    from flwr.supercore.differential_privacy import compute_stdv

    return float(compute_stdv(noise_multiplier, clipping_norm, sampled))


# --- tooling -------------------------------------------------------------------------------------


def parse_config_args(text: str) -> dict[str, Any]:
    """Flower's parser of the "key=value key2='text'" syntax of ``--run-config``."""
    from flwr.common.config import parse_config_args as flower_parse

    return dict(flower_parse([text])) if text.strip() else {}


def fab_ignore_rules(gitignore: Path) -> Callable[[str], bool]:
    """Whether a path (relative, '/'-separated, a folder ending in '/') is left out of a FAB, by
    Flower's own rules for the app's .gitignore."""
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns

    return build_pathspec(tuple(load_gitignore_patterns(gitignore))).match_file


def build_fab(app: Path) -> Any:
    """The FAB ``flwr build`` makes of the app folder (its bytes and hash), for the tests."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app)


def accepts_public_key(path: Path) -> bool:
    """Whether ``flwr supernode register`` would accept this public key file."""
    from flwr.cli.supernode.register import try_load_public_key

    return bool(try_load_public_key(path))


def run_supernode_with_heartbeat(seconds: float, arguments: list[str]) -> None:
    """``flower-supernode <arguments>`` in this process, declaring a node heartbeat of ``seconds``.

    A SuperNode tells the SuperLink its heartbeat interval (``ActivateNode`` and each
    ``SendNodeHeartbeat`` carry it); the SuperLink counts it offline after two intervals without
    one, and a message waiting for it then gets a "Node Unavailable" reply. Flower (1.41 and 1.42) always sends
    its constant ``HEARTBEAT_DEFAULT_INTERVAL`` (30 s) and offers no flag or environment variable,
    so this sets the constant in the two internal modules of the SuperNode process that read it:
    the node connection, and the heartbeat thread (which sends every (interval - 5 s) x 0.7-0.9).
    ClientApps run in processes of their own and keep theirs. On a Flower upgrade, check that both
    modules still read it (a missing name fails here) and look for a real option.
    """
    import sys

    from flwr.common.constant import HEARTBEAT_MAX_INTERVAL, HEARTBEAT_MIN_INTERVAL
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection
    from flwr.supernode.cli import flower_supernode

    if not HEARTBEAT_MIN_INTERVAL <= seconds <= HEARTBEAT_MAX_INTERVAL:
        bounds = f"{HEARTBEAT_MIN_INTERVAL}-{HEARTBEAT_MAX_INTERVAL} s"
        raise ValueError(f"heartbeat interval {seconds:g} s: the SuperLink accepts {bounds}")
    for module in (fleet_http_connection, heartbeat):
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            raise RuntimeError(f"{module.__name__} no longer reads HEARTBEAT_DEFAULT_INTERVAL: see this function")
        setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", seconds)  # noqa: B010  (a module's constant, on purpose)
    sys.argv = ["flower-supernode", *arguments]  # what Flower's parser reads
    flower_supernode()


# --- secure sums: Flower's SecAgg+ -------------------------------------------------------------
#
# Flower's ``SecAggPlusWorkflow`` and ``secaggplus_mod`` compute one thing: the weighted average of a
# model in a legacy ``FitRes``, through a ``LegacyContext`` strategy, on train messages only, with
# the values clipped to +-8 and quantised to 2**22 levels. The statistics this project sums (a Gram
# matrix, class sums, counts) and its head updates need exact sums of fixed-point integers, asked
# in its own messages. So the protocol is run here on Flower's own parts: the mod's stage checks
# and its setup, key-sharing and unmasking stages as they are (the board's keys, Shamir shares and
# encrypted share exchange), and the masking and unmasking arithmetic rebuilt from Flower's
# primitives (key agreement, pseudo-random masks). On an upgrade, check that
# ``secaggplus_mod`` still has ``SecAggPlusState``, ``check_stage``, ``check_configs``, ``_setup``,
# ``_share_keys`` and ``_unmask`` with these signatures (tests/test_secure_sum.py runs them all).

# The stage's config record, the board's saved state, the stages in order and the records' keys.
SECURE_STAGE_RECORD, SECURE_STATE_RECORD = RECORD_KEY_CONFIGS, RECORD_KEY_STATE
SECURE_SHARES_SENT = "edgesplit_secure_shares_sent"  # a board's key-sharing reply, for a re-sent message
SecureStage, SecureKey = Stage, Key


def _mask_pair(state: Any, node: int, other: int, shapes: list[tuple[int, ...]], mod_range: int) -> list[np.ndarray]:
    """The pairwise mask ``node`` shares with ``other`` (Flower's key agreement and generator)."""
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    shared = generate_shared_key(bytes_to_private_key(state.sk1), bytes_to_public_key(state.public_keys_dict[other][0]))
    return pseudo_rand_gen(shared, mod_range, shapes)


def _add(a: list[np.ndarray], b: list[np.ndarray], mod_range: int, sign: int = 1) -> list[np.ndarray]:
    """``a + sign * b`` modulo ``mod_range``, element-wise; both below ``mod_range`` <= 2**62, so
    int64 never overflows before the modulo."""
    return [np.mod(x + sign * y, mod_range) for x, y in zip(a, b, strict=True)]


class SecureBoard:
    """One board's side of SecAgg+, its state kept in the node's Flower ``Context.state`` between
    messages (as Flower's mod keeps it). ``begin`` checks a stage's config record and says which
    stage it is; ``answer`` does the stage's work and returns the reply's config record."""

    def __init__(self, context_state: RecordDict, node_id: int) -> None:
        # the module, not the mod function its package exports under the same name
        flower: Any = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
        self._flower, self._context_state, self.node_id = flower, context_state, node_id
        self.repeat = False  # the stage asked is the one the board answered last (a re-sent message)
        if SECURE_STATE_RECORD not in context_state.config_records:
            context_state.config_records[SECURE_STATE_RECORD] = ConfigRecord({})
        self.state = flower.SecAggPlusState(**context_state.config_records[SECURE_STATE_RECORD])

    def begin(self, configs: ConfigRecord) -> str:
        """The stage ``configs`` asks for, after Flower's checks of the order and of the keys
        (ValueError, KeyError or TypeError naming what is wrong). The stage the board is at may
        come again: the server re-sends a message whose reply was lost or late (server/delivery.py),
        and the board must then answer as it did, not with new secrets."""
        stage = str(configs[SecureKey.STAGE])
        self.repeat = stage == self.state.current_stage
        if not self.repeat:
            self._flower.check_stage(self.state.current_stage, configs)
        without_stage = ConfigRecord({k: v for k, v in configs.items() if k != SecureKey.STAGE})
        self._flower.check_configs(stage, without_stage)
        return stage

    def answer(self, configs: ConfigRecord, integers: list[np.ndarray] | None = None) -> ConfigRecord:
        """Do the stage ``configs`` asks for (``integers``: this board's part, for the collect
        stage, each in [0, mod range)), save the state and return the reply's config record."""
        state, stage = self.state, str(configs[SecureKey.STAGE])
        body = ConfigRecord({k: v for k, v in configs.items() if k != SecureKey.STAGE})
        if stage == SecureStage.SETUP:
            state.nid = self.node_id
            keys = (state.sk1, state.pk1, state.sk2, state.pk2)
            reply = self._flower._setup(state, body)
            if self.repeat:  # the same keys again (the settings as sent now)
                state.sk1, state.pk1, state.sk2, state.pk2 = keys
                reply = {SecureKey.PUBLIC_KEY_1: state.pk1, SecureKey.PUBLIC_KEY_2: state.pk2}
        elif stage == SecureStage.SHARE_KEYS and self.repeat:  # the same shares again
            reply = dict(self._context_state.config_records[SECURE_SHARES_SENT].items())
        elif stage == SecureStage.SHARE_KEYS:
            reply = self._flower._share_keys(state, body)
            self._context_state.config_records[SECURE_SHARES_SENT] = ConfigRecord(dict(reply))
        elif stage == SecureStage.COLLECT_MASKED_VECTORS:
            if integers is None:
                raise ValueError("the collect stage needs this board's part")
            reply = self._masked(body, integers)
        else:
            reply = self._flower._unmask(state, body)
        state.current_stage = stage
        self._context_state.config_records[SECURE_STATE_RECORD] = ConfigRecord(state.to_dict())
        return ConfigRecord(reply, False)

    def _masked(self, configs: ConfigRecord, integers: list[np.ndarray]) -> dict[str, Any]:
        """Flower's collect stage without its weighting and quantisation: keep the neighbours'
        shares (decrypted, their sources checked), then add the private mask and the pairwise
        masks to ``integers`` modulo the mod range."""
        from flwr.common import ndarray_to_bytes
        from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt
        from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen, share_keys_plaintext_separate

        state = self.state
        ciphertexts = cast(list[bytes], configs[SecureKey.CIPHERTEXT_LIST])
        sources = cast(list[int], configs[SecureKey.SOURCE_LIST])
        if len(ciphertexts) + 1 < state.threshold:
            raise ValueError(f"{len(ciphertexts)} neighbours left, fewer than the threshold {state.threshold}")
        for source, ciphertext in zip(sources, ciphertexts, strict=True):
            if source not in state.ss2_dict:
                raise ValueError(f"shares from node {source}, which is not a neighbour of this board")
            sender, receiver, seed_share, key_share = share_keys_plaintext_separate(
                decrypt(state.ss2_dict[source], ciphertext)
            )
            if (sender, receiver) != (source, state.nid):
                raise ValueError(
                    f"shares said to come from node {source} for {state.nid} are from {sender} for {receiver}"
                )
            state.rd_seed_share_dict[source], state.sk1_share_dict[source] = seed_share, key_share
        shapes = [a.shape for a in integers]
        masked = _add(integers, pseudo_rand_gen(state.rd_seed, state.mod_range, shapes), state.mod_range)
        for other in sources:
            sign = 1 if state.nid > other else -1
            masked = _add(masked, _mask_pair(state, state.nid, other, shapes, state.mod_range), state.mod_range, sign)
        return {SecureKey.MASKED_PARAMETERS: [ndarray_to_bytes(a) for a in masked]}


def masked_arrays(reply: ConfigRecord) -> list[np.ndarray]:
    """The masked part a board's collect-stage reply carries."""
    from flwr.common import bytes_to_ndarray

    return [bytes_to_ndarray(b) for b in cast(list[bytes], reply[SecureKey.MASKED_PARAMETERS])]


def unmask_sum(
    masked_sum: list[np.ndarray],
    shares: Mapping[int, list[bytes]],
    in_sum: set[int],
    public_keys: Mapping[int, tuple[bytes, bytes]],
    neighbours: Mapping[int, set[int]],
    mod_range: int,
) -> list[np.ndarray]:
    """The sum of the parts of the boards ``in_sum`` from the sum of their masked parts: each
    board's private mask comes off with its seed rebuilt from its neighbours' shares; a board
    that shared keys but sent no part (a dropout, or a part the server refused) has its secret
    key rebuilt instead, and the pairwise masks it shares with boards in the sum come off.
    ``shares`` maps each board to the shares its neighbours returned (at least the threshold)."""
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    shapes = [a.shape for a in masked_sum]
    total = list(masked_sum)
    for node, node_shares in sorted(shares.items()):
        secret = combine_shares(node_shares)
        if node in in_sum:
            total = _add(total, pseudo_rand_gen(secret, mod_range, shapes), mod_range, -1)
            continue
        for other in sorted(neighbours[node] & in_sum):
            shared = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(public_keys[other][0]))
            # ``other`` added this mask if other > node, subtracted it otherwise
            sign = -1 if other > node else 1
            total = _add(total, pseudo_rand_gen(shared, mod_range, shapes), mod_range, sign)
    return total


# --- a SuperNode whose apps start slowly (an emulated board) -----------------------------------


def allow_slow_app_start(seconds: float) -> None:
    """Give each app process this SuperNode's SuperExec starts ``seconds`` to connect (Flower: 30 s).

    The SuperExec claims a task token, then starts a ClientApp process with it; if that process
    has not activated the token 30 s later (``HEARTBEAT_DEFAULT_INTERVAL``), the node state puts the
    task back to pending and the SuperExec starts another. An emulated board (qemu-aarch64 on a busy
    machine) takes longer than that to import Flower, so it would start ClientApps without end and
    none would answer. Flower has no option for it; this sets the constant in the node state's
    internal module, in this SuperNode process only: a running app then also counts as dead after
    two such windows without a heartbeat. On a Flower upgrade, check that the module still reads it.
    """
    from flwr.supercore.corestate import in_memory_corestate

    if not hasattr(in_memory_corestate, "HEARTBEAT_DEFAULT_INTERVAL"):
        raise RuntimeError("flwr.supercore.corestate.in_memory_corestate no longer reads HEARTBEAT_DEFAULT_INTERVAL")
    setattr(in_memory_corestate, "HEARTBEAT_DEFAULT_INTERVAL", seconds)  # noqa: B010  (a module's constant, on purpose)


def run_supernode(arguments: list[str]) -> None:
    """``flower-supernode <arguments>`` in this process."""
    import sys

    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *arguments]  # what Flower's parser reads
    flower_supernode()


# --- standing in for Flower's runtime, in tests --------------------------------------------------


def act_as(node_id: int, run_id: int = 1, task_id: int = 1) -> None:
    """Make this process Flower's task on node ``node_id`` (0: the ServerApp), as Flower's runtime
    does before it runs an app: a message made here is sent from that node."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, task_id, node_id


def mark_pushed(message: Message, message_id: str | None = None) -> str:
    """Give ``message`` the id Flower gives it on push (its object id unless told): what a grid
    that stands in for the SuperLink does."""
    message_id = message.object_id if message_id is None else message_id
    message.metadata.__dict__["_message_id"] = message_id
    return message_id


def set_source_node(message: Message, node_id: int) -> None:
    """Say that ``message`` comes from node ``node_id``, as the SuperLink does for an error reply
    it makes on a node's behalf."""
    message.metadata.__dict__["_src_node_id"] = node_id
