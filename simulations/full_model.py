"""The peer edgesplit is compared against: full-model FedAvg as Flower's quickstart examples train,
and a centralised full fine-tuning reference.

Every client trains the WHOLE EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``, ImageNet
weights, new classifier) on its raw images each round; the server averages every float tensor of
the state dict, BatchNorm running statistics included, weighted by the clients' training examples.
The data is the split an edgesplit run uses (the same held-out test split, Dirichlet partition and
local test share held back by each client); training draws one of the eight dihedral views per
image per step, as edgesplit's ``views='dihedral'`` does for ELPV.

This is a benchmark comparator, not a federation: plain PyTorch in one process with no Flower
runtime, clients trained one after another. The bytes reported are the sizes of exactly the
arrays Flower's quickstart puts in its ArrayRecord (``ArrayRecord(model.state_dict())``) each
way: float32 weights and BatchNorm statistics plus the int64 ``num_batches_tracked`` counters.
They leave out the .npy headers (128 B per array, 0.3% of Lite0) and message framing, which
edgesplit's own figures (whole serialized messages) include.

    python -m simulations.full_model      # the defaults: about 10 + 5 minutes on one core
    python -m simulations.full_model --rounds 2 --image-size 96 --subset 200 --clients 3 --central-epochs 1
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from client.local_data import local_split
from common.backbones import StateDict, load_backbone_weights, preprocess_for
from common.data import LabelledFiles, elpv_split, partition
from common.kinds import ElpvTask, Partitioner
from common.metrics import ClassificationReport, classification_report
from common.preprocess import PreprocessSpec, decode_image

log = logging.getLogger(__name__)

BACKBONE = "efficientnet_lite0"  # edgesplit's registry name, for its weights and preprocessing
TIMM_MODEL = "tf_efficientnet_lite0"
AVERAGE_VIEWS = ("never", "final", "every")
CENTRAL_EPOCHS = 5  # the command's default for centralised_finetune


@dataclass(frozen=True)
class PeerConfig:
    """One comparison run. Data keys mean what the edgesplit run-config keys of the same name mean."""

    task: ElpvTask = ElpvTask.FOUR_LEVEL
    subset: int = 0
    test_fraction: float = 0.25
    client_test_fraction: float = 0.2
    num_clients: int = 10
    dirichlet_alpha: float = 0.3
    seed: int = 42
    # 128 px and 12 rounds fit the comparison's budget: on one core of a 2-core machine Lite0
    # trains at ~38 img/s at 128 px (66 at 96, 24 at 160, 11 at 224), so a round over ELPV's
    # 1,578 client training images plus the held-out evaluation takes ~47 s, 12 rounds ~10 min.
    image_size: int = 128
    rounds: int = 12
    local_epochs: int = 1
    learning_rate: float = 0.01
    # 1e-4, not edgesplit's 1e-3: that value regularises a small head on fixed features; on the
    # whole pretrained network 1e-4 is the usual fine-tuning value, and over a few SGD epochs it
    # hardly moves the ImageNet weights either way.
    weight_decay: float = 1e-4
    batch_size: int = 32
    eval_batch_size: int = 64
    # When to also score the global model with probabilities averaged over the eight views, as
    # edgesplit does by default: "final" (the last round or epoch only, one 8x evaluation),
    # "every" round, or "never". The identity-view score is always taken.
    average_views: str = "final"

    def __post_init__(self) -> None:
        if self.average_views not in AVERAGE_VIEWS:
            raise ValueError(f"average_views must be one of {AVERAGE_VIEWS}, got {self.average_views!r}")
        if self.rounds < 1 or self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError("rounds, local_epochs and batch_size must be at least 1")

    def views_averaged(self, step: int, last: int) -> bool:
        """Whether round (or epoch) ``step`` of ``last`` is also scored over the averaged views."""
        return self.average_views == "every" or (self.average_views == "final" and step == last)


# --- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSet:
    """Preprocessed images (N, 3, S, S) in float16 and their labels, held in memory."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class FederatedData:
    """Each client's training images, the server's held-out test images, and the class count."""

    clients: list[ImageSet]
    test: ImageSet
    num_classes: int
    seconds: float  # decoding and preprocessing, counted apart from any client's training time


def load_images(files: LabelledFiles, preprocess: PreprocessSpec) -> ImageSet:
    """Decode and preprocess every file once.

    This favours the peer: a real quickstart client decodes and resizes its images again in
    every epoch through its DataLoader; here that work is done once and not counted. float16 is
    exact to well under one grey level for inputs normalised to [-1, 1] and halves the memory.
    """
    size = preprocess.image_size
    images = np.empty((len(files), 3, size, size), dtype=np.float16)
    for index, path in enumerate(files.paths):
        images[index] = preprocess(decode_image(Path(path).read_bytes()))
    return ImageSet(images, np.asarray(files.labels, dtype=np.int64))


def client_files(config: PeerConfig) -> tuple[list[LabelledFiles], LabelledFiles]:
    """Each client's training files and the server's held-out test files, as an edgesplit run splits them."""
    client_share, test = elpv_split(config.task, config.subset, config.test_fraction, config.seed)
    train = []
    for k in range(config.num_clients):
        files = partition(
            client_share, config.num_clients, k, Partitioner.DIRICHLET, config.seed, config.dirichlet_alpha
        )
        local_train, _local_test = local_split(files, config.client_test_fraction, config.seed + 7919 * k)
        train.append(local_train)
    return train, test


def load_federated_data(config: PeerConfig) -> FederatedData:
    """Every client's training images and the held-out images, decoded once, at ``image_size``."""
    started = time.perf_counter()
    preprocess = preprocess_for(BACKBONE, config.image_size, 1.0)
    train, test = client_files(config)
    return FederatedData(
        clients=[load_images(files, preprocess) for files in train],
        test=load_images(test, preprocess),
        num_classes=len(test.class_names),
        seconds=time.perf_counter() - started,
    )


# --- model, augmentation, training -------------------------------------------------------------


@functools.cache
def imagenet_weights() -> StateDict:
    """The embedded Lite0 ImageNet weights, read once per process (loading copies them)."""
    return load_backbone_weights(BACKBONE)


def build_model(num_classes: int, seed: int, weights: StateDict | None = None) -> nn.Module:
    """Lite0 with ImageNet weights and a new, seeded classifier, in channels_last (faster on CPU)."""
    import timm

    weights = imagenet_weights() if weights is None else weights
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = timm.create_model(TIMM_MODEL, pretrained=False, num_classes=num_classes)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or not all(key.startswith("classifier.") for key in missing):
        raise ValueError(f"Lite0 weights do not fit: missing {missing}, unexpected {unexpected}")
    return model.to(memory_format=torch.channels_last)


def dihedral(images: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th (0-7) symmetry of the square: k % 4 quarter turns, then a mirror if k >= 4."""
    turned = torch.rot90(images, k % 4, dims=(-2, -1))
    return turned.flip(-1) if k >= 4 else turned


def random_dihedral(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random dihedral transform per image: solar cells look alike under all eight."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"dihedral augmentation needs square images, got {tuple(images.shape[-2:])}")
    choice = torch.randint(0, 8, (len(images),), generator=generator)
    out = torch.empty_like(images)
    for k in range(8):
        index = (choice == k).nonzero().flatten()
        if len(index):
            out[index] = dihedral(images[index], k)
    return out


@dataclass(frozen=True)
class TrainStats:
    seconds: float
    loss: float  # mean training cross-entropy of the last epoch
    examples: int


def make_optimizer(model: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with momentum over every parameter in one group, as the quickstart examples do."""
    return torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9, weight_decay=weight_decay)


def run_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: ImageSet,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    """One shuffled pass with dihedral augmentation, BatchNorm in train mode; mean loss."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    order = torch.randperm(len(data), generator=generator).numpy()
    total = 0.0
    for start in range(0, len(order), batch_size):
        index = np.sort(order[start : start + batch_size])
        x = random_dihedral(torch.from_numpy(data.images[index]).float(), generator)
        y = torch.from_numpy(data.labels[index])
        loss = loss_fn(model(x.contiguous(memory_format=torch.channels_last)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(index)
    return total / max(len(order), 1)


def train_locally(
    model: nn.Module,
    data: ImageSet,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
) -> TrainStats:
    """A quickstart client's fit: a fresh optimizer, ``epochs`` passes over its own images."""
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    optimizer = make_optimizer(model, learning_rate, weight_decay)
    loss = float("nan")
    for _ in range(epochs):
        loss = run_epoch(model, optimizer, data, batch_size, generator)
    return TrainStats(time.perf_counter() - started, loss, len(data))


def evaluate(
    model: nn.Module, data: ImageSet, num_classes: int, batch_size: int = 64, average_views: bool = False
) -> ClassificationReport:
    """Accuracy, macro-F1 and mean cross-entropy on ``data``, BatchNorm in eval mode.

    With ``average_views`` the class probabilities are averaged over the eight dihedral views
    (test-time augmentation), as edgesplit evaluates by default (run-config ``average-views``);
    that costs eight forward passes per image.
    """
    model.eval()
    views = range(8) if average_views else range(1)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            x = torch.from_numpy(data.images[start : start + batch_size]).float()
            probabilities = sum(
                model(dihedral(x, k).contiguous(memory_format=torch.channels_last)).softmax(-1) for k in views
            )
            rows.append(torch.as_tensor(probabilities) / len(views))
    if not rows:
        return classification_report(np.zeros(0), np.zeros(0), num_classes)
    probabilities = torch.cat(rows)
    picked = probabilities[torch.arange(len(data)), torch.from_numpy(data.labels)]
    loss = float(-torch.log(picked.clamp_min(1e-12)).mean())
    return classification_report(data.labels, probabilities.argmax(1).numpy(), num_classes, loss)


# --- federated averaging and accounting --------------------------------------------------------


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the arrays an ArrayRecord of this state dict holds (float32: 4 per element)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> StateDict:
    """Weighted mean of every floating tensor (in float64, then cast back); other tensors, such as
    BatchNorm's ``num_batches_tracked`` which nothing reads in train or eval, are taken from the first."""
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} states and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    keys = set(states[0])
    if any(set(state) != keys for state in states[1:]):
        raise ValueError("states do not have the same keys")
    averaged: StateDict = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            mean = sum(w / total * state[key].double() for state, w in zip(states, weights, strict=True))
            averaged[key] = torch.as_tensor(mean).to(first.dtype)
        else:
            averaged[key] = first.clone()
    return averaged


def cosine_lr(base: float, server_round: int, rounds: int) -> float:
    """edgesplit's schedule: cosine from ``base`` in round 1 towards 0 after the last round."""
    return base * 0.5 * (1 + math.cos(math.pi * (server_round - 1) / rounds))


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (all of it: data, model, every client's state)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


@dataclass(frozen=True)
class RoundRecord:
    round: int
    learning_rate: float
    accuracy: float  # server held-out split, the images as they are
    macro_f1: float
    loss: float
    accuracy_views: float  # the same, probabilities averaged over the 8 views; NaN when not scored
    macro_f1_views: float
    clients: int
    train_examples: int
    bytes_down_per_client: int
    bytes_up_per_client: int  # the largest reply of the round (all are the same size here)
    client_seconds_mean: float
    client_seconds_max: float
    round_seconds: float  # all clients one after another, averaging and the server's evaluation
    peak_rss_mib: float


@dataclass(frozen=True)
class PeerResult:
    config: PeerConfig
    rounds: list[RoundRecord]
    data_seconds: float
    bytes_down_total: int = field(init=False)  # all clients, all rounds
    bytes_up_total: int = field(init=False)
    client_seconds_total: float = field(init=False)  # summed over clients and rounds
    wall_seconds: float = field(init=False)  # rounds only, data preparation apart
    peak_rss_mib: float = field(init=False)

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        put("bytes_down_total", sum(r.bytes_down_per_client * r.clients for r in self.rounds))
        put("bytes_up_total", sum(r.bytes_up_per_client * r.clients for r in self.rounds))
        put("client_seconds_total", sum(r.client_seconds_mean * r.clients for r in self.rounds))
        put("wall_seconds", sum(r.round_seconds for r in self.rounds))
        put("peak_rss_mib", max((r.peak_rss_mib for r in self.rounds), default=peak_rss_mib()))

    @property
    def final(self) -> RoundRecord:
        return self.rounds[-1]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def score(
    model: nn.Module, data: FederatedData, config: PeerConfig, step: int, last: int
) -> tuple[ClassificationReport, ClassificationReport | None]:
    """The held-out report of the images as they are, and the view-averaged one when due."""
    plain = evaluate(model, data.test, data.num_classes, config.eval_batch_size)
    if not config.views_averaged(step, last):
        return plain, None
    return plain, evaluate(model, data.test, data.num_classes, config.eval_batch_size, average_views=True)


def fedavg_round(
    model: nn.Module,
    global_state: StateDict,
    clients: Sequence[ImageSet],
    config: PeerConfig,
    server_round: int,
) -> tuple[StateDict, list[TrainStats], int, int]:
    """Every client loads the global state, trains the whole model, returns its state; FedAvg.

    Returns the new global state, each client's training stats, and the largest number of bytes
    sent down to and up from one client.
    """
    learning_rate = cosine_lr(config.learning_rate, server_round, config.rounds)
    states, stats, bytes_up = [], [], 0
    for k, data in enumerate(clients):
        model.load_state_dict(global_state)
        stats.append(
            train_locally(
                model,
                data,
                epochs=config.local_epochs,
                learning_rate=learning_rate,
                batch_size=config.batch_size,
                weight_decay=config.weight_decay,
                seed=config.seed + 7919 * k + 104729 * server_round,
            )
        )
        reply = {key: value.detach().clone() for key, value in model.state_dict().items()}
        bytes_up = max(bytes_up, state_nbytes(reply))
        states.append(reply)
    new_state = fedavg(states, [s.examples for s in stats])
    return new_state, stats, state_nbytes(global_state), bytes_up


def run_full_model_fedavg(config: PeerConfig, data: FederatedData | None = None) -> PeerResult:
    """The peer's whole run: ``config.rounds`` rounds of full-model FedAvg, scored each round."""
    data = load_federated_data(config) if data is None else data
    model = build_model(data.num_classes, config.seed)
    global_state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    log.info(
        "full-model FedAvg: %d clients, %d train images, %d test, %d px, %.1f MB each way per client",
        len(data.clients),
        sum(len(c) for c in data.clients),
        len(data.test),
        config.image_size,
        state_nbytes(global_state) / 1e6,
    )
    records = []
    for server_round in range(1, config.rounds + 1):
        started = time.perf_counter()
        global_state, stats, bytes_down, bytes_up = fedavg_round(
            model, global_state, data.clients, config, server_round
        )
        model.load_state_dict(global_state)
        plain, views = score(model, data, config, server_round, config.rounds)
        seconds = [s.seconds for s in stats]
        record = RoundRecord(
            round=server_round,
            learning_rate=cosine_lr(config.learning_rate, server_round, config.rounds),
            accuracy=plain.accuracy,
            macro_f1=plain.macro_f1,
            loss=plain.loss,
            accuracy_views=views.accuracy if views else math.nan,
            macro_f1_views=views.macro_f1 if views else math.nan,
            clients=len(stats),
            train_examples=sum(s.examples for s in stats),
            bytes_down_per_client=bytes_down,
            bytes_up_per_client=bytes_up,
            client_seconds_mean=float(np.mean(seconds)),
            client_seconds_max=float(np.max(seconds)),
            round_seconds=time.perf_counter() - started,
            peak_rss_mib=peak_rss_mib(),
        )
        records.append(record)
        log.info(
            "round %d/%d  acc %.4f  macro-F1 %.4f%s  down/up %.1f/%.1f MB per client  "
            "client s mean %.1f max %.1f  round %.1f s  peak RSS %.0f MiB",
            server_round,
            config.rounds,
            record.accuracy,
            record.macro_f1,
            f"  (8 views: acc {views.accuracy:.4f} macro-F1 {views.macro_f1:.4f})" if views else "",
            bytes_down / 1e6,
            bytes_up / 1e6,
            record.client_seconds_mean,
            record.client_seconds_max,
            record.round_seconds,
            record.peak_rss_mib,
        )
    return PeerResult(config, records, data.seconds)


# --- centralised reference ---------------------------------------------------------------------


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    learning_rate: float
    accuracy: float
    macro_f1: float
    accuracy_views: float  # NaN when not scored over the averaged views
    macro_f1_views: float
    seconds: float  # training only


@dataclass(frozen=True)
class CentralResult:
    epochs: list[EpochRecord]
    train_examples: int
    peak_rss_mib: float

    @property
    def final(self) -> EpochRecord:
        return self.epochs[-1]


def pooled(sets: Sequence[ImageSet]) -> ImageSet:
    """The union of the clients' training images, which no party of a federation could hold."""
    return ImageSet(np.concatenate([s.images for s in sets]), np.concatenate([s.labels for s in sets]))


def centralised_finetune(config: PeerConfig, epochs: int, data: FederatedData | None = None) -> CentralResult:
    """The same model, augmentation and optimizer on all clients' training images pooled, for
    ``epochs`` epochs (one optimizer, cosine learning rate over the epochs), scored each epoch."""
    data = load_federated_data(config) if data is None else data
    train = pooled(data.clients)
    model = build_model(data.num_classes, config.seed)
    optimizer = make_optimizer(model, config.learning_rate, config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    records = []
    for epoch in range(1, epochs + 1):
        learning_rate = cosine_lr(config.learning_rate, epoch, epochs)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        started = time.perf_counter()
        run_epoch(model, optimizer, train, config.batch_size, generator)
        seconds = time.perf_counter() - started
        plain, views = score(model, data, config, epoch, epochs)
        records.append(
            EpochRecord(
                epoch,
                learning_rate,
                plain.accuracy,
                plain.macro_f1,
                views.accuracy if views else math.nan,
                views.macro_f1 if views else math.nan,
                seconds,
            )
        )
        log.info(
            "centralised epoch %d/%d  acc %.4f  macro-F1 %.4f%s  %.1f s",
            epoch,
            epochs,
            plain.accuracy,
            plain.macro_f1,
            f"  (8 views: acc {views.accuracy:.4f} macro-F1 {views.macro_f1:.4f})" if views else "",
            seconds,
        )
    return CentralResult(records, len(train), peak_rss_mib())


# --- throughput and command line ---------------------------------------------------------------


def training_throughput(image_sizes: Sequence[int], num_images: int = 64, batch_size: int = 32) -> dict[int, float]:
    """Training images/s of the whole Lite0 (one epoch, after one warm-up batch) on real ELPV images."""
    from common.data import load_elpv

    files = load_elpv().subset(list(range(num_images)))
    weights = imagenet_weights()
    speeds = {}
    for size in image_sizes:
        data = load_images(files, preprocess_for(BACKBONE, size, 1.0))
        model = build_model(4, 0, weights)
        warm_up = ImageSet(data.images[:batch_size], data.labels[:batch_size])
        train_locally(model, warm_up, epochs=1, learning_rate=0.01, batch_size=batch_size, weight_decay=0, seed=0)
        stats = train_locally(model, data, epochs=1, learning_rate=0.01, batch_size=batch_size, weight_decay=0, seed=0)
        speeds[size] = num_images / stats.seconds
        log.info("%d px: %.1f training img/s", size, speeds[size])
    return speeds


ROUND_COLUMNS = (
    "full-model FedAvg",
    "accuracy",
    "macro-F1",
    "8 views: acc / F1",
    "MB down / up per client",
    "client s mean / max",
    "round s",
    "peak RSS MiB",
)
EPOCH_COLUMNS = ("centralised fine-tuning", "accuracy", "macro-F1", "8 views: acc / F1", "train s")


def _pair(first: float, second: float) -> str:
    return "-" if math.isnan(first) else f"{first:.4f} / {second:.4f}"


def main(argv: list[str] | None = None) -> int:
    defaults = PeerConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--subset", type=int, default=defaults.subset, help="stratified subset of ELPV (0: all)")
    parser.add_argument("--clients", type=int, default=defaults.num_clients)
    parser.add_argument("--dirichlet-alpha", type=float, default=defaults.dirichlet_alpha)
    parser.add_argument("--local-epochs", type=int, default=defaults.local_epochs)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--average-views", choices=AVERAGE_VIEWS, default=defaults.average_views)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--central-epochs", type=int, default=CENTRAL_EPOCHS, help="centralised fine-tuning epochs (0: skip)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default, every core). 1 keeps the time predictable: with "
        "another process busy on one of 2 cores, 2 threads trained 10x slower than 1",
    )
    parser.add_argument(
        "--throughput", type=int, nargs="*", metavar="PX", help="only time one training epoch at these sizes"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.throughput is not None:
        training_throughput(args.throughput or [96, 128, 160])
        return 0

    from simulations.benchmark import markdown_table

    config = PeerConfig(
        subset=args.subset,
        num_clients=args.clients,
        dirichlet_alpha=args.dirichlet_alpha,
        seed=args.seed,
        image_size=args.image_size,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        average_views=args.average_views,
    )
    data = load_federated_data(config)
    log.info("decoded %d images in %.1f s", sum(map(len, data.clients)) + len(data.test), data.seconds)
    peer = run_full_model_fedavg(config, data)
    rows = [
        (
            f"round {r.round}",
            f"{r.accuracy:.4f}",
            f"{r.macro_f1:.4f}",
            _pair(r.accuracy_views, r.macro_f1_views),
            f"{r.bytes_down_per_client / 1e6:.2f} / {r.bytes_up_per_client / 1e6:.2f}",
            f"{r.client_seconds_mean:.1f} / {r.client_seconds_max:.1f}",
            f"{r.round_seconds:.1f}",
            f"{r.peak_rss_mib:.0f}",
        )
        for r in peer.rounds
    ]
    print()
    print(markdown_table(rows, ROUND_COLUMNS))
    print(
        f"\ntotal: {peer.bytes_down_total / 1e6:.1f} MB down, {peer.bytes_up_total / 1e6:.1f} MB up, "
        f"{peer.client_seconds_total:.0f} client-s, {peer.wall_seconds:.0f} s of rounds "
        f"(+{peer.data_seconds:.0f} s decoding)"
    )
    if args.central_epochs:
        central = centralised_finetune(config, args.central_epochs, data)
        epochs = [
            (
                f"epoch {e.epoch}",
                f"{e.accuracy:.4f}",
                f"{e.macro_f1:.4f}",
                _pair(e.accuracy_views, e.macro_f1_views),
                f"{e.seconds:.1f}",
            )
            for e in central.epochs
        ]
        print()
        print(markdown_table(epochs, EPOCH_COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
