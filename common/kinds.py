"""The closed sets of names the run config, the node config and the event log use, as types: each
run-config kind is parsed once at the config boundary (common/config.py), and the config error
lists its choices from the type. Every member is a ``str`` (StrEnum), so a config or an event
written as JSON holds the plain value."""

from __future__ import annotations

from enum import StrEnum


def kind_values(kind: type[StrEnum]) -> list[str]:
    """A kind's choices as the plain strings a config or a message holds (for error messages)."""
    return [member.value for member in kind]


class StrategyName(StrEnum):
    """Run-config ``strategy``: the aggregation rule (server/aggregation.py maps each to Flower's)."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"  # clients add the proximal term (the instructions carry proximal-mu)
    FEDADAM = "fedadam"  # server-side Adam on the averaged update
    FEDMEDIAN = "fedmedian"  # coordinate-wise median: robust to a minority of poisoned updates
    FEDTRIMMEDAVG = "fedtrimmedavg"  # coordinate-wise mean after cutting trim-beta from each end
    KRUM = "krum"  # the one update closest to its n - f - 2 nearest neighbours
    MULTIKRUM = "multikrum"  # all but the krum-malicious worst-scored updates, averaged


# Strategies that score each update against n - f - 2 others (the config checks min-clients).
KRUM_FAMILY = frozenset({StrategyName.KRUM, StrategyName.MULTIKRUM})
# Strategies whose aggregate is a plain average, the one the DP noise is calibrated to (server/dp.py).
DP_STRATEGIES = (StrategyName.FEDAVG, StrategyName.FEDPROX)
# Strategies that need only the average of the updates, which a secure sum gives (server/secure_sum.py).
SECURE_STRATEGIES = (StrategyName.FEDAVG, StrategyName.FEDPROX, StrategyName.FEDADAM)
# The fewest boards a secure sum may add up: with two, each learns the other's part from the sum.
MIN_SECURE_BOARDS = 3


class EngineName(StrEnum):
    """A backbone engine (common/engines.py has what each runs), safest first; what the server
    tells a node to run (the instructions' ``engine``)."""

    TORCH = "torch"  # PyTorch eager: the reference
    ONNX = "onnx"  # ONNX Runtime, fp32
    ONNX_INT8 = "onnx-int8"  # ONNX Runtime, static int8


class EngineChoice(StrEnum):
    """Run-config and node-config ``engine``: an engine by name, or ``auto``."""

    AUTO = "auto"  # resolved on the device from what is installed (common/engines.py, resolve_engine)
    TORCH = EngineName.TORCH.value
    ONNX = EngineName.ONNX.value
    ONNX_INT8 = EngineName.ONNX_INT8.value


class HeadKind(StrEnum):
    """Run-config ``head``: the trainable classifier on the features."""

    LINEAR = "linear"
    MLP = "mlp"  # one hidden ReLU layer of mlp-hidden units


class HeadInit(StrEnum):
    """Run-config ``head-init``: how the head starts before round 1 (server/head_init.py)."""

    RANDOM = "random"  # seeded random weights
    NCM = "ncm"  # FedNCM: the classifier from the federation's class means (a linear head only)
    FED3R = "fed3r"  # Fed3R: the federation's ridge classifier, solved from the clients' feature sums
    LDA = "lda"  # the federation's shrinkage LDA classifier, from the same sums


# Head initialisations solved from Fed3R's one-shot statistics (the ridge-sums query).
FROM_RIDGE_SUMS = frozenset({HeadInit.FED3R, HeadInit.LDA})


class ClassBalance(StrEnum):
    """Run-config ``class-balance``: how training corrects for the federation's class prior (common/balance.py)."""

    NONE = "none"
    WEIGHTED = "weighted"  # loss weights 1 / class prior
    LOGIT_ADJUSTED = "logit-adjusted"  # train on logits + tau log prior, predict on the plain logits


class LrSchedule(StrEnum):
    """Run-config ``lr-schedule``: the clients' learning rate over rounds."""

    COSINE = "cosine"  # cosine decay from learning-rate to 0 over the run
    CONSTANT = "constant"


class DatasetKind(StrEnum):
    """Run-config ``dataset``: where the clients' and the server's images come from (common/data.py)."""

    ELPV = "elpv"  # the embedded ELPV solar-cell set, split by the partitioner
    FOLDER = "folder"  # an ImageFolder per client, with the server's held-out one


class Partitioner(StrEnum):
    """Run-config ``partitioner``: how ELPV is split over simulated clients (common/data.py, partition)."""

    IID = "iid"
    DIRICHLET = "dirichlet"  # label shares per client drawn from Dirichlet(dirichlet-alpha)
    PATHOLOGICAL = "pathological"  # classes-per-client classes each


class ElpvTask(StrEnum):
    """Run-config ``elpv-task``: ELPV's labels."""

    FOUR_LEVEL = "4-level"  # defect probability 0, 1/3, 2/3, 1
    BINARY = "binary"  # functional (p < 0.5) or defective


class FaultKind(StrEnum):
    """Faults a simulated client commits on purpose (run-config ``fault-clients``; client/faults.py)."""

    NAN_UPDATE = "nan-update"  # sends NaN arrays
    SCALED_UPDATE = "scaled-update"  # sends global + 1000 x its honest update
    LABEL_FLIP = "label-flip"  # trains on class C - 1 - y
    CRASH = "crash"  # raises instead of answering
    STRAGGLE = "straggle"  # sleeps fault-delay seconds first
    DROPOUT = "dropout"  # raises, drawn per round with chance fault-dropout (or always, if listed)
    # Replies a mixed or faulty fleet sends (their metrics, not their arrays):
    HOT_BOARD = "hot-board"  # reports a CPU temperature, as a board with a thermal zone does
    EXTRA_METRIC = "extra-metric"  # reports a metric no other node does
    INF_COUNTS = "inf-counts"  # claims an infinite number of embedded images
    # Dropping out of a secure sum at one of its four stages (an error reply instead of the stage's):
    DROP_AT_SETUP = "drop-at-setup"
    DROP_AT_SHARE_KEYS = "drop-at-share-keys"
    DROP_AT_COLLECT = "drop-at-collect"
    DROP_AT_UNMASK = "drop-at-unmask"


class EventKind(StrEnum):
    """The ``event`` of a line of a run folder's events.jsonl (server/run_folder.py writes them;
    server/run_folder_view.py, the simulations and the tests read them)."""

    # The run
    RUN_START = "run-start"  # backbone, fingerprint and engine of a new run
    RUN_RESUMED = "run-resumed"  # a run continued from its checkpoint (from_round)
    SECURE_SUM = "secure-sum"  # a secure sum's stages: boards asked, answering, dropped, bytes, seconds
    NODES_MET = "nodes-met"  # before round 1: how many nodes were asked which engine they run, and answered
    HEAD_INITIALISED = "head-initialised"  # a one-shot initialisation (or counts query): method, nodes, bytes
    INITIAL_EVALUATION = "initial-evaluation"  # the server's scores of the head before round 1
    RUN_END = "run-end"  # final scores, and why the run stopped early (if it did)
    # A round
    ROUND_SKIPPED = "round-skipped"  # an attempt with fewer than min-clients usable updates: the head stays
    ROUND_RETRY = "round-retry"  # the round's next attempt after a skipped one
    DP_RELEASE = "dp-release"  # DP: the noised aggregate released, with the accountant's numbers
    ROUND_END = "round-end"  # the round's record and scores (mirrored to TensorBoard)
    CHECKPOINT = "checkpoint"  # the round's checkpoint written (a resume starts after it)
    # A node
    BACKBONE_SENT = "backbone-sent"  # a node got the frozen backbone as its engine runs it
    ENGINE_FALLBACK = "engine-fallback"  # a node runs a safer engine than it was set to
    MESSAGE_RESENT = "message-resent"  # an instruction sent again to a node that did not answer
    REPLY_RECOVERED = "reply-recovered"  # a reply that arrived through a resent copy
    CLIENT_REPLY = "client-reply"  # an accepted reply, with its metrics (per phase)
    CLIENT_FAILED = "client-failed"  # a node that did not answer usefully (an error, a timeout)
    CLIENT_REJECTED = "client-rejected"  # a reply screening refused, with the reason
    # The deployable model
    MODEL_EXPORTED = "model-exported"  # the files written
    EXPORT_FAILED = "export-failed"  # why they were not
    EXPORT_CHECKED = "export-checked"  # the exported model's scores against the server's
