"""The full-model FedAvg peer (simulations/full_model.py): averaging, byte counts, augmentation,
the data it trains on, and one tiny round of the real Lite0."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from common.backbones import preprocess_for
from common.data import LabelledFiles
from simulations.full_model import (
    BACKBONE,
    FederatedData,
    ImageSet,
    PeerConfig,
    build_model,
    centralised_finetune,
    client_files,
    cosine_lr,
    dihedral,
    evaluate,
    fedavg,
    load_images,
    random_dihedral,
    run_full_model_fedavg,
    state_nbytes,
    train_locally,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: the suite runs two test files at a time on two cores, and a second
    thread waiting for a busy core made the Lite0 round ten times slower (12 s against 1.1 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def random_images(count: int, size: int, seed: int) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 1, (count, 3, size, size)).astype(np.float16)
    return ImageSet(images, (np.arange(count) % 2).astype(np.int64))


# --- FedAvg and bytes ---------------------------------------------------------------------------


def test_fedavg_is_the_example_weighted_mean_and_keeps_counters_and_dtypes() -> None:
    states = [
        {
            "w": torch.tensor([1.0, -2.0]),
            "bn.running_var": torch.tensor([4.0]),
            "bn.num_batches_tracked": torch.tensor(3),
        },
        {
            "w": torch.tensor([3.0, 6.0]),
            "bn.running_var": torch.tensor([8.0]),
            "bn.num_batches_tracked": torch.tensor(9),
        },
    ]
    averaged = fedavg(states, [1, 3])
    assert torch.equal(averaged["w"], torch.tensor([2.5, 4.0]))  # (1*1 + 3*3)/4, (1*-2 + 3*6)/4
    assert torch.equal(averaged["bn.running_var"], torch.tensor([7.0]))
    assert averaged["w"].dtype == torch.float32
    assert averaged["bn.num_batches_tracked"].dtype == torch.int64
    assert int(averaged["bn.num_batches_tracked"]) == 3
    # Weights are relative: scaling them changes nothing; equal weights give the plain mean.
    assert torch.equal(fedavg(states, [10, 30])["w"], averaged["w"])
    assert torch.equal(fedavg(states, [5, 5])["w"], torch.tensor([2.0, 2.0]))


def test_fedavg_rejects_mismatched_states_and_weights() -> None:
    a, b = {"w": torch.zeros(2)}, {"v": torch.zeros(2)}
    with pytest.raises(ValueError, match="same keys"):
        fedavg([a, b], [1, 1])
    with pytest.raises(ValueError, match="one weight per state"):
        fedavg([a, a], [1])
    with pytest.raises(ValueError, match="positive sum"):
        fedavg([a, a], [0, 0])


def test_state_nbytes_is_four_bytes_per_float_element_plus_the_int64_counters() -> None:
    floats = {"a": torch.zeros(3, 5), "b": torch.zeros(7)}
    assert state_nbytes(floats) == 4 * 22
    state = tiny_model().state_dict()
    float_elements = sum(t.numel() for t in state.values() if t.is_floating_point())
    assert float_elements == 3 * 4 * 9 + 4 + 4 * 4 + 4 * 2 + 2  # conv, BN weight/bias/mean/var, linear
    assert state_nbytes(state) == 4 * float_elements + 8  # one BN num_batches_tracked
    assert state_nbytes(state) == sum(t.numpy().nbytes for t in state.values())  # what an ArrayRecord stores


# --- augmentation and schedule ------------------------------------------------------------------


def test_dihedral_gives_the_eight_distinct_views_edgesplit_trains_on() -> None:
    from common.views import VIEW_SETS, apply_view

    image = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(1, 2, 3, 3)
    ours = {dihedral(image, k)[0].numpy().tobytes() for k in range(8)}
    assert len(ours) == 8
    theirs = {apply_view(name, image[0].numpy()).tobytes() for name in VIEW_SETS["dihedral"]}
    assert ours == theirs


def test_random_dihedral_draws_every_view_and_only_views() -> None:
    image = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    batch = image.repeat(400, 1, 1, 1)
    out = random_dihedral(batch, torch.Generator().manual_seed(0))
    views = [dihedral(image, k)[0] for k in range(8)]
    drawn = [next(k for k, view in enumerate(views) if torch.equal(o, view)) for o in out]
    assert sorted(set(drawn)) == list(range(8))
    with pytest.raises(ValueError, match="square"):
        random_dihedral(torch.zeros(2, 3, 4, 5), torch.Generator())


def test_cosine_lr_is_edgesplits_schedule() -> None:
    from common.config import RunConfig

    config = RunConfig(num_server_rounds=7, learning_rate=0.02)
    for server_round in range(1, 8):
        assert cosine_lr(0.02, server_round, 7) == pytest.approx(config.learning_rate_at(server_round))
    assert cosine_lr(0.02, 1, 7) == 0.02


# --- data ---------------------------------------------------------------------------------------


def test_clients_train_on_the_files_an_edgesplit_client_trains_on() -> None:
    from client.local_data import load_local_data
    from common.config import NodeConfig, RunConfig

    config = PeerConfig(subset=300, num_clients=3)
    train, test = client_files(config)
    run = RunConfig(subset=300)
    for k, files in enumerate(train):
        theirs = load_local_data(run, NodeConfig(partition_id=k, num_partitions=3)).train
        assert files.paths == theirs.paths and files.labels == theirs.labels
    every = [p for files in train for p in files.paths]
    assert len(set(every)) == len(every) and not set(every) & set(test.paths)


def write_cells(folder: Path, count: int, seed: int) -> LabelledFiles:
    """Greyscale-ish PNGs of two tones (class 0 dark, class 1 light), 40x48 so the crop matters."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    for index in range(count):
        label = index % 2
        pixels = np.clip(rng.normal(70 + 110 * label, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{index}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
        labels.append(label)
    return LabelledFiles(tuple(paths), tuple(labels), ("dark", "light"))


def test_load_images_is_the_backbone_preprocessing_in_float16(tmp_path: Path) -> None:
    files = write_cells(tmp_path, 3, seed=1)
    spec = preprocess_for(BACKBONE, 32, 1.0)
    loaded = load_images(files, spec)
    assert loaded.images.shape == (3, 3, 32, 32) and loaded.images.dtype == np.float16
    assert loaded.labels.tolist() == [0, 1, 0]
    direct = spec(Image.open(files.paths[1]))
    assert np.abs(loaded.images[1].astype(np.float32) - direct).max() < 2e-3


# --- training and evaluation --------------------------------------------------------------------


def test_train_locally_moves_weights_and_batchnorm_stats_and_evaluate_does_not() -> None:
    model, data = tiny_model(), random_images(10, 8, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train_locally(model, data, epochs=2, learning_rate=0.1, batch_size=4, weight_decay=1e-4, seed=0)
    assert stats.examples == 10 and stats.seconds > 0 and math.isfinite(stats.loss)
    after = model.state_dict()
    assert not torch.equal(before["0.weight"], after["0.weight"])
    assert not torch.equal(before["1.running_mean"], after["1.running_mean"])  # BatchNorm trained in train mode
    assert int(after["1.num_batches_tracked"]) == 2 * 3  # 2 epochs of batches 4, 4, 2
    snapshot = {k: v.clone() for k, v in after.items()}
    report = evaluate(model, data, 2, batch_size=3)
    assert report.num_examples == 10 and 0 <= report.accuracy <= 1
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())


def test_view_averaging_changes_nothing_for_an_invariant_model_and_something_otherwise() -> None:
    data = random_images(12, 6, seed=3)
    invariant = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    plain, views = evaluate(invariant, data, 2), evaluate(invariant, data, 2, average_views=True)
    assert plain.confusion_matrix == views.confusion_matrix and plain.loss == pytest.approx(views.loss, abs=1e-5)
    torch.manual_seed(1)
    oriented = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 2))
    assert evaluate(oriented, data, 2).loss != pytest.approx(evaluate(oriented, data, 2, average_views=True).loss)


def test_one_round_of_full_lite0_fedavg_and_one_centralised_epoch(tmp_path: Path) -> None:
    spec = preprocess_for(BACKBONE, 32, 1.0)
    data = FederatedData(
        clients=[load_images(write_cells(tmp_path / f"c{k}", n, seed=k), spec) for k, n in enumerate((4, 6))],
        test=load_images(write_cells(tmp_path / "test", 4, seed=9), spec),
        num_classes=2,
        seconds=0.0,
    )
    config = PeerConfig(image_size=32, rounds=1, batch_size=4, eval_batch_size=4)
    result = run_full_model_fedavg(config, data)
    (record,) = result.rounds
    state = build_model(2, 0).state_dict()
    expected_bytes = 4 * sum(t.numel() for t in state.values() if t.is_floating_point()) + 8 * sum(
        1 for t in state.values() if not t.is_floating_point()
    )
    assert 13_000_000 < expected_bytes < 14_000_000  # Lite0 with a 2-class head, float32
    assert record.bytes_down_per_client == record.bytes_up_per_client == expected_bytes
    assert result.bytes_down_total == result.bytes_up_total == 2 * expected_bytes
    assert record.clients == 2 and record.train_examples == 10
    assert 0 < record.client_seconds_mean <= record.client_seconds_max <= record.round_seconds
    assert 0 <= record.accuracy <= 1 and 0 <= record.accuracy_views <= 1  # "final": the last round is averaged
    assert record.learning_rate == config.learning_rate and record.peak_rss_mib > 100
    central = centralised_finetune(config, 1, data)
    assert central.train_examples == 10 and len(central.epochs) == 1
    assert 0 <= central.final.accuracy <= 1 and central.final.seconds > 0
