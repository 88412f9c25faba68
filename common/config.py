"""The one run-config schema. Flower hands us a flat dict of kebab-case keys; it is checked here,
once, into a typed, frozen object. Defaults live in pyproject.toml ([tool.flwr.app.config]) and
are repeated here so that code and tests can build a config without Flower.
"""

from __future__ import annotations

import dataclasses
import os
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from common.backbones import BackboneError, available_backbones
from common.cut import check_cut
from common.data import class_names_for, elpv_split, is_plain_name, partition
from common.kinds import (
    DP_STRATEGIES,
    KRUM_FAMILY,
    MIN_SECURE_BOARDS,
    SECURE_STRATEGIES,
    ClassBalance,
    DatasetKind,
    ElpvTask,
    EngineChoice,
    FaultKind,
    HeadInit,
    HeadKind,
    LrSchedule,
    Partitioner,
    StrategyName,
    kind_values,
)
from common.views import VIEW_SETS, ViewError, parse_views

Kind = TypeVar("Kind", bound=StrEnum)


class ConfigError(ValueError):
    """A config key is unknown, of the wrong type, or out of range."""


def parse_kind(kind: type[Kind], value: Any, where: str) -> Kind:
    """``value`` as a member of ``kind``, or a ConfigError that lists its choices (``where`` names the key)."""
    if isinstance(value, str) and value in kind_values(kind):
        return kind(value)
    raise ConfigError(f"{where} must be one of {kind_values(kind)}, got {value!r}.")


def _choice(*allowed: str) -> dict[str, Any]:
    return {"choices": tuple(str(choice) for choice in allowed)}


def _range(low: float | None = None, high: float | None = None) -> dict[str, Any]:
    return {"low": low, "high": high}


def _key(default: Any, help: str, **rules: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **rules})


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run; attribute ``snake_case`` is run-config key ``kebab-case``."""

    # Federation
    num_server_rounds: int = _key(
        30, "rounds of federated training (0: the initial head is the result, e.g. Fed3R alone)", **_range(0, 10_000)
    )
    strategy: StrategyName = _key(StrategyName.FEDAVG, "server aggregation (a name in server/aggregation.py)")
    fraction_train: float = _key(1.0, "share of connected clients sampled per round", **_range(0.0, 1.0))
    fraction_evaluate: float = _key(1.0, "share of clients asked to evaluate locally", **_range(0.0, 1.0))
    min_clients: int = _key(2, "clients needed before a round starts", **_range(1, 100_000))
    round_timeout: float = _key(600.0, "seconds to wait for replies in one round", **_range(1, 86_400))
    proximal_mu: float = _key(0.01, "FedProx proximal term weight", **_range(0.0, 100.0))
    server_learning_rate: float = _key(0.01, "FedAdam server step size (eta)", **_range(0.0, 10.0))
    trim_beta: float = _key(0.2, "fedtrimmedavg: share cut from each end per coordinate", **_range(0.0, 0.49))
    krum_malicious: int = _key(1, "krum, multikrum: how many malicious clients to tolerate", **_range(0, 10_000))
    round_retries: int = _key(2, "retries of a round with fewer than min-clients usable updates", **_range(0, 100))
    node_wait_timeout: float = _key(300.0, "seconds to wait for min-clients nodes to connect", **_range(1, 86_400))
    resume_from: str = _key("", "run folder to continue from its checkpoint (e.g. runs/<run-id>)")
    # Screening of client updates (server/validation.py)
    max_update_norm: float = _key(
        50.0, "reject an update whose L2 distance to the global head exceeds this (0: off)", **_range(0.0, 1e12)
    )
    max_update_ratio: float = _key(
        100.0, "reject an update more than this many times the round's median (0: off)", **_range(0.0, 1e12)
    )
    max_weight_norm: float = _key(
        1e4,
        "reject a reply with an array whose L2 norm exceeds the round's starting head's by more than this",
        **_range(1e-6, 1e12),
    )
    max_num_examples: int = _key(
        1_000_000, "reject a reply claiming more examples than this (train and evaluation)", **_range(1, 10**9)
    )
    # Differential privacy on the head updates (server/dp.py): boards clip, the server adds noise
    dp_clipping_norm: float = _key(
        0.0,
        "client-level DP: each board clips its update to this L2 norm, the server adds Gaussian noise (0: off)",
        **_range(0.0, 1e6),
    )
    dp_noise_multiplier: float = _key(
        1.0, "DP: the noise std on the summed updates, in units of dp-clipping-norm", **_range(0.0, 1e3)
    )
    dp_delta: float = _key(1e-5, "DP: the delta at which epsilon is reported", **_range(1e-12, 0.1))
    # Secure sums (server/secure_sum.py): the server learns the federation's sum, never one board's part
    secure_sums: bool = _key(
        False,
        "sum the one-shot statistics and the head updates with SecAgg+ (Flower's secure aggregation): the "
        "server learns only sums over at least min-clients boards, so it cannot screen one board's reply "
        "(needs a plain average: fedavg, fedprox or fedadam; min-clients >= 3)",
    )
    secure_shares: int = _key(
        15, "secure sums: boards each board shares its secrets with (all of them in a smaller sum)", **_range(3, 1001)
    )
    secure_group_size: int = _key(
        100, "secure sums: boards per sum; a larger federation is summed in groups of this size", **_range(3, 10**6)
    )
    min_sum_examples: int = _key(
        0, "secure sums: the fewest images a summed Gram may cover (0: the feature dimension)", **_range(0, 10**9)
    )
    # Backbone and head
    backbone: str = _key("efficientnet_lite0", "frozen backbone", **_choice(*available_backbones()))
    backbone_weights: str = _key("", "weights file for a backbone without embedded weights")
    image_size: int = _key(224, "backbone input size in pixels", **_range(32, 1024))
    crop_pct: float = _key(1.0, "centre-crop share (1.0 keeps the whole image)", **_range(0.1, 1.0))
    head: HeadKind = _key(HeadKind.LINEAR, "trainable head")
    mlp_hidden: int = _key(256, "hidden width of the mlp head", **_range(1, 65_536))
    cut: int = _key(0, "backbone stages that train with the head, counted from the end (0: head only)", **_range(0, 64))
    head_init: HeadInit = _key(
        HeadInit.RANDOM,
        "initial head: random, ncm (FedNCM: from the clients' class means), fed3r (Fed3R: the "
        "federation's ridge classifier, solved from the clients' feature sums) or lda (the federation's "
        "shrinkage LDA classifier, from the same sums)",
    )
    ncm_min_examples: int = _key(
        5,
        "ncm, fed3r, lda: a client shares a class's statistics only if it has at least this many images of it "
        "(a board's own node-config min-examples may raise it, never lower it)",
        **_range(2, 10**6),
    )
    fed3r_lambda: float = _key(
        30.0, "fed3r: ridge penalty on the classifier's weights (the bias is not penalised)", **_range(1e-6, 1e9)
    )
    lda_shrinkage: float = _key(
        0.1, "lda: weight of the identity in the shrunk within-class covariance", **_range(1e-6, 1.0)
    )
    class_balance: ClassBalance = _key(
        ClassBalance.NONE,
        "none; weighted (loss weights 1 / class prior); logit-adjusted (train on logits + tau log prior, "
        "predict on the plain logits). Priors are the federation's class counts (from the one-shot "
        "statistics, or a counts-only query)",
    )
    logit_adjust_tau: float = _key(1.0, "logit-adjusted: the prior's weight tau", **_range(0.0, 10.0))
    local_prior_correction: bool = _key(
        False,
        "each client trains on logits + log(its class shares / the federation's): label skew across clients "
        "no longer pulls the head toward each client's classes (needs the federation's class counts: one "
        "counts-only query when head-init is random)",
    )
    operating_precision: float = _key(
        0.9, "report the recall of a detector at this precision (ELPV: defective or not)", **_range(0.0, 1.0)
    )
    operating_classes: str = _key("", "comma-separated classes to report recall at operating-precision for too")
    views: str = _key(
        "auto",
        "views embedded and trained on: none, hflip, flips, dihedral or a comma list (auto: dihedral "
        "for ELPV's symmetric cells, none for folders)",
    )
    average_views: bool = _key(True, "evaluate by averaging predictions over the views (else the image as it is)")
    personal_epochs: int = _key(
        0, "epochs each client fine-tunes a personal head from the global one at evaluation (0: off)", **_range(0, 1000)
    )
    # Local training
    local_epochs: int = _key(5, "epochs over local embeddings per round", **_range(1, 1000))
    learning_rate: float = _key(0.01, "client SGD learning rate (round 1)", **_range(0.0, 10.0))
    lr_schedule: LrSchedule = _key(LrSchedule.COSINE, "learning rate over rounds")
    weight_decay: float = _key(1e-3, "client SGD weight decay", **_range(0.0, 1.0))
    batch_size: int = _key(32, "head training batch size", **_range(1, 65_536))
    # 8, not 32: on a 2-core CPU it is as fast and peaks ~400 MiB lower (BENCHMARKS.md, edge memory).
    embed_batch_size: int = _key(8, "images per backbone batch", **_range(1, 4096))
    engine: EngineChoice = _key(EngineChoice.AUTO, "backbone engine; a node's 'engine' overrides it")
    golden_min_cosine: float = _key(
        0.98,
        "a node's engine must compute the server's features of its golden batch to this mean cosine, "
        "else it falls back to a safer engine (onnx-int8, onnx, torch) or its replies are refused",
        **_range(0.0, 1.0),
    )
    num_threads: int = _key(0, "torch / ONNX Runtime threads per process (0: their default)", **_range(0, 1024))
    # Data
    dataset: DatasetKind = _key(DatasetKind.ELPV, "elpv (embedded) or folder (ImageFolder per client)")
    elpv_task: ElpvTask = _key(ElpvTask.FOUR_LEVEL, "ELPV labels")
    class_names: str = _key("", "comma-separated class list (folder dataset)")
    data_dir: str = _key("", "folder dataset: root holding client-<partition-id>/ (simulation)")
    server_test_dir: str = _key("", "folder dataset: the server's held-out labelled ImageFolder")
    subset: int = _key(0, "use only this many images, stratified (0: all)", **_range(0, 10_000_000))
    test_fraction: float = _key(0.25, "server's held-out share of ELPV", **_range(0.05, 0.9))
    client_test_fraction: float = _key(0.2, "each client's local test share", **_range(0.0, 0.9))
    partitioner: Partitioner = _key(Partitioner.DIRICHLET, "how ELPV is split over clients")
    dirichlet_alpha: float = _key(0.3, "Dirichlet concentration (lower: more skewed)", **_range(1e-3, 1e6))
    classes_per_client: int = _key(2, "pathological partitioner: classes per client", **_range(1, 10_000))
    dirichlet_min_partition_size: int = _key(0, "dirichlet: fewest images a client gets (0: auto)", **_range(0, 10**6))
    dirichlet_max_retries: int = _key(10, "dirichlet: redraws before a top-up to the minimum", **_range(0, 1000))
    seed: int = _key(42, "seed for splits, partitions, head init and sampling", **_range(0, 2**31 - 1))
    # Injected faults, for scenario runs and tests (simulated clients, by partition id)
    fault_clients: str = _key(
        "", f"partition:fault pairs, e.g. '3:nan-update,5:label-flip'; faults {kind_values(FaultKind)}"
    )
    fault_dropout: float = _key(0.0, "chance that a simulated client drops out of a round", **_range(0.0, 1.0))
    fault_delay: float = _key(30.0, "seconds a 'straggle' client sleeps before replying", **_range(0.0, 86_400))
    # Where things go
    export_model: bool = _key(True, "write the deployable model (ONNX, int8, TorchScript) after the last round")
    cache_dir: str = _key("", "backbone and embedding cache (default: ~/.cache/edgesplit)")
    runs_dir: str = _key("runs", "where runs/<run-id>/ folders are written")
    run_name: str = _key("", "name of the run folder (default: time stamp and Flower run id)")

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Validate a Flower run config (kebab-case keys); unknown keys are errors."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ConfigError(f"Unknown run-config key(s) {unknown}. Known keys: {sorted(known)}.")
        values = {known[k].name: _check(k, known[k], v) for k, v in run_config.items()}
        config = cls(**values)
        config.check_consistency()
        return config

    def to_flower(self) -> dict[str, Any]:
        """The config as Flower's flat dict, every kind as its plain string (as config.json holds it)."""
        return {f.name.replace("_", "-"): _plain(getattr(self, f.name)) for f in fields(self)}

    def check_consistency(self) -> None:
        """Rules that involve more than one key (``check_consistency``)."""
        check_consistency(self)

    @property
    def dp(self) -> bool:
        """Differential privacy on the head updates is on."""
        return self.dp_clipping_norm > 0

    def classes(self) -> tuple[str, ...]:
        """The run's class list, in label-index order."""
        return class_names_for(self.dataset, self.elpv_task, self.class_list())

    def view_names(self) -> tuple[str, ...]:
        """The views each image is embedded in (the identity first)."""
        if self.views == "auto":
            return VIEW_SETS["dihedral"] if self.dataset == DatasetKind.ELPV else VIEW_SETS["none"]
        try:
            return parse_views(self.views)
        except ViewError as error:
            raise ConfigError(f"Run-config key 'views': {error}") from None

    def evaluation_views(self) -> tuple[str, ...]:
        """The views predictions are averaged over when scoring (the identity alone if not)."""
        return self.view_names() if self.average_views else ("identity",)

    def operating_class_list(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.operating_classes.split(",") if name.strip())

    def class_list(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.class_names.split(",") if name.strip())

    def faults(self) -> dict[int, FaultKind]:
        """``fault-clients`` as {partition id: fault}."""
        faults: dict[int, FaultKind] = {}
        for item in filter(None, (part.strip() for part in self.fault_clients.split(","))):
            partition, _, kind = item.partition(":")
            if not partition.strip().isdigit() or kind.strip() not in set(FaultKind):
                raise ConfigError(
                    f"Run-config key 'fault-clients' must list partition:fault pairs such as '3:nan-update', with "
                    f"faults {kind_values(FaultKind)}; got {item!r}."
                )
            faults[int(partition)] = FaultKind(kind.strip())
        return faults

    def resolved_cache_dir(self) -> Path:
        raw = self.cache_dir or os.environ.get("EDGESPLIT_CACHE_DIR", "")
        return Path(raw).expanduser() if raw else Path.home() / ".cache" / "edgesplit"

    def learning_rate_at(self, server_round: int) -> float:
        """Client learning rate of a round: cosine decay to 0 over the run, or constant."""
        if self.lr_schedule == LrSchedule.CONSTANT:
            return self.learning_rate
        import math

        progress = (server_round - 1) / self.num_server_rounds
        return self.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def check_simulated_split(config: RunConfig, num_clients: int) -> None:
    """Raise the DataError now, once, if ELPV cannot be split over ``num_clients`` simulated
    clients as configured: otherwise every client raises it, in every round and retry."""
    if config.dataset != DatasetKind.ELPV:
        return
    client_share, _ = elpv_split(config.elpv_task, config.subset, config.test_fraction, config.seed)
    with warnings.catch_warnings():  # flwr-datasets warns on every Dirichlet re-draw: the error says it once
        warnings.simplefilter("ignore", UserWarning)
        for partition_id in range(num_clients):
            partition(
                client_share,
                num_clients,
                partition_id,
                config.partitioner,
                config.seed,
                config.dirichlet_alpha,
                config.classes_per_client,
                dirichlet_min_size=config.dirichlet_min_partition_size,
                dirichlet_retries=config.dirichlet_max_retries,
            )


def check_consistency(config: RunConfig) -> None:
    """Rules that involve more than one key."""
    if config.dataset == DatasetKind.FOLDER:
        if not config.class_list():
            raise ConfigError("dataset='folder' needs 'class-names', e.g. class-names='ok,crack,finger'.")
        _check_class_names(config)
        if not config.server_test_dir:
            raise ConfigError(
                "dataset='folder' needs 'server-test-dir': an ImageFolder the server holds for central evaluation."
            )
    config.faults()  # raises on a malformed list
    config.view_names()  # raises on an unknown view
    try:
        check_cut(config.backbone, config.cut)
    except BackboneError as error:
        raise ConfigError(str(error)) from None
    if config.head_init == HeadInit.NCM and config.head != HeadKind.LINEAR:
        raise ConfigError("head-init='ncm' sets a linear classifier from class means; it needs head='linear'.")
    if config.num_server_rounds == 0 and config.head_init == HeadInit.RANDOM:
        raise ConfigError("num-server-rounds=0 keeps the initial head: it needs head-init='fed3r', 'lda' or 'ncm'.")
    unknown = sorted(set(config.operating_class_list()) - set(config.classes()))
    if unknown:
        raise ConfigError(f"'operating-classes' names {unknown}, not among the classes {list(config.classes())}.")
    if config.strategy in KRUM_FAMILY and config.min_clients < 2 * config.krum_malicious + 3:
        raise ConfigError(
            f"strategy='{config.strategy}' with krum-malicious={config.krum_malicious} needs min-clients >= "
            f"{2 * config.krum_malicious + 3} (Krum scores each update against n - f - 2 others)."
        )
    if config.dp:
        _check_dp(config)
    if config.secure_sums:
        _check_secure_sums(config)
    if config.partitioner == Partitioner.PATHOLOGICAL and config.classes_per_client > len(config.classes()):
        raise ConfigError(
            f"'classes-per-client' ({config.classes_per_client}) exceeds the number of classes "
            f"({len(config.classes())})."
        )


def _check_class_names(config: RunConfig) -> None:
    """Class names are folder names on every board: plain, distinct, and at least two."""
    names = config.class_list()
    unsafe = [n for n in names if not is_plain_name(n)]  # a board joins each to its data folder
    if unsafe:
        raise ConfigError(
            f"'class-names' must be plain folder names (no '/', '\\', ':', '.', '..' or a leading '~'), got {unsafe}."
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"'class-names' lists {duplicates} more than once; each class needs one name.")
    if len(names) < 2:
        raise ConfigError(f"'class-names' needs at least two classes to classify, got {list(names)}.")


def _check_dp(config: RunConfig) -> None:
    """The rules of a DP run (dp-clipping-norm > 0)."""
    if config.dp_noise_multiplier <= 0:
        raise ConfigError(
            "dp-clipping-norm > 0 needs dp-noise-multiplier > 0: clipping without noise gives no privacy "
            "(to bound updates without DP, use max-update-norm)."
        )
    if config.strategy not in DP_STRATEGIES:
        raise ConfigError(
            f"dp-clipping-norm > 0 works with strategy {[str(name) for name in DP_STRATEGIES]}, not "
            f"'{config.strategy}': the noise is calibrated to what one node's clipped update can change in a "
            "plain average. A median, a trimmed mean or Krum's choice depends on the other updates in other "
            "ways, and FedAdam would have to be noised before its step."
        )
    if config.head_init != HeadInit.RANDOM:
        raise ConfigError(
            f"dp-clipping-norm > 0 cannot start from head-init='{config.head_init}': its one-shot class sums "
            "(and Fed3R's Gram matrix) would go to the server without noise. Use head-init='random'."
        )
    if config.class_balance != ClassBalance.NONE or config.local_prior_correction:
        raise ConfigError(
            f"dp-clipping-norm > 0 cannot use class-balance='{config.class_balance}' or local-prior-correction: "
            "both need every board's class counts, which would go to the server without noise. Use "
            "class-balance='none' and local-prior-correction=false with DP."
        )
    if 0 < config.max_update_norm < config.dp_clipping_norm:
        raise ConfigError(
            f"dp-clipping-norm ({config.dp_clipping_norm:g}) must not exceed max-update-norm "
            f"({config.max_update_norm:g}), or clipped updates would be rejected; lower the one or raise the other."
        )


def _check_secure_sums(config: RunConfig) -> None:
    """The rules of a run with secure sums: an average the server can take of masked replies, and
    enough boards in every sum."""
    if config.strategy not in SECURE_STRATEGIES:
        raise ConfigError(
            f"secure-sums=true cannot run with strategy='{config.strategy}': the server sees only the sum of the "
            "boards' masked updates, so it cannot screen, rank or trim one of them (a median, a trimmed mean, "
            f"Krum). Choose screened clear replies (secure-sums=false) or a strategy in "
            f"{[str(name) for name in SECURE_STRATEGIES]}."
        )
    if config.min_clients < MIN_SECURE_BOARDS:
        raise ConfigError(
            f"secure-sums=true needs min-clients >= {MIN_SECURE_BOARDS} (got {config.min_clients}): a sum over two "
            "boards tells each of them the other's part. Raise min-clients."
        )


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, StrEnum) else value


@cache
def _field_types() -> dict[str, Any]:
    """RunConfig's field types (the annotations are strings: ``from __future__ import annotations``)."""
    return typing.get_type_hints(RunConfig)


def _check(key: str, field: dataclasses.Field[Any], value: Any) -> Any:
    expected = _field_types()[field.name]
    if isinstance(expected, type) and issubclass(expected, StrEnum):  # a kind: parsed here, once, into its member
        return parse_kind(expected, value, f"Run-config key '{key}'")
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"Run-config key '{key}' must be true or false, got {type(value).__name__} {value!r}.")
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, expected) or isinstance(value, bool):
        raise ConfigError(f"Run-config key '{key}' must be {expected.__name__}, got {type(value).__name__} {value!r}.")
    rules = field.metadata
    choices = rules.get("choices")
    choices = choices() if callable(choices) else choices
    if choices is not None and value not in choices:
        raise ConfigError(f"Run-config key '{key}' must be one of {list(choices)}, got {value!r}.")
    low, high = rules.get("low"), rules.get("high")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"Run-config key '{key}' must be in [{low}, {high}], got {value!r}.")
    return value


# A simulated board's min-gram-examples: Flower's simulation gives its nodes no node config of the
# operator's, so the board's process environment says it instead.
MIN_GRAM_ENV = "EDGESPLIT_MIN_GRAM_EXAMPLES"

NODE_CONFIG_KEYS = {
    "partition-id": "this node's partition (simulation)",
    "num-partitions": "number of partitions (simulation)",
    "data-dir": "this board's ImageFolder of private images",
    "cache-dir": "where this board caches the backbone and embeddings",
    "engine": f"this board's backbone engine, overriding the run's: one of {kind_values(EngineChoice)}",
    "min-examples": "this board's privacy floor: it shares no class statistic over fewer images than this "
    "(at least 2; the server's ncm-min-examples can raise it, never lower it; default 5)",
    "min-gram-examples": "the fewest images this board shares a clear Gram matrix of (Fed3R, LDA); default: the "
    "feature dimension, below which the Gram is an exact membership test of an image (README, trust model); "
    f"a simulated board, whose node config Flower fixes, reads ${MIN_GRAM_ENV}",
    "min-secure-boards": "the fewest boards this board lets a secure sum of its part add up (SecAgg+: it refuses a "
    f"smaller sum at the first stage; at least {MIN_SECURE_BOARDS}, the default)",
}


@dataclass(frozen=True)
class NodeConfig:
    """Per-device settings (Flower node config)."""

    partition_id: int | None = None
    num_partitions: int | None = None
    data_dir: str | None = None
    cache_dir: str | None = None
    engine: EngineChoice | None = None
    min_examples: int | None = None  # None: the default floor (client/privacy_floor.py, example_floor)
    min_gram_examples: int | None = None  # None: the feature dimension (client/agreement.py, gram_floor)
    min_secure_boards: int = MIN_SECURE_BOARDS  # the fewest boards in a secure sum of its part

    @classmethod
    def from_flower(cls, node_config: Mapping[str, Any]) -> NodeConfig:
        unknown = sorted(set(node_config) - set(NODE_CONFIG_KEYS))
        if unknown:
            raise ConfigError(f"Unknown node-config key(s) {unknown}. Known keys: {sorted(NODE_CONFIG_KEYS)}.")
        values: dict[str, Any] = {}
        for key in ("partition-id", "num-partitions"):
            if key in node_config:
                value = node_config[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ConfigError(f"Node-config key '{key}' must be a non-negative int, got {value!r}.")
                values[key.replace("-", "_")] = value
        for key in ("data-dir", "cache-dir"):
            if key in node_config:
                if not isinstance(node_config[key], str):
                    raise ConfigError(f"Node-config key '{key}' must be a path string.")
                values[key.replace("-", "_")] = node_config[key]
        for key in ("min-examples", "min-gram-examples"):
            value = node_config.get(key)
            if key == "min-gram-examples" and value is None and os.environ.get(MIN_GRAM_ENV):
                text = os.environ[MIN_GRAM_ENV]
                value = int(text) if text.isdigit() else text
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 10**6:
                raise ConfigError(f"Node-config key {key!r} must be an int in [2, 1000000], got {value!r}.")
            values[key.replace("-", "_")] = value
        if "min-secure-boards" in node_config:
            value = node_config["min-secure-boards"]
            if isinstance(value, bool) or not isinstance(value, int) or not MIN_SECURE_BOARDS <= value <= 10**6:
                raise ConfigError(
                    f"Node-config key 'min-secure-boards' must be an int in [{MIN_SECURE_BOARDS}, 1000000], "
                    f"got {value!r}."
                )
            values["min_secure_boards"] = value
        if "engine" in node_config:
            values["engine"] = parse_kind(EngineChoice, node_config["engine"], "Node-config key 'engine'")
        node = cls(**values)
        if (
            node.partition_id is not None
            and node.num_partitions is not None
            and node.partition_id >= node.num_partitions
        ):
            raise ConfigError(f"partition-id {node.partition_id} must be below num-partitions {node.num_partitions}.")
        return node
