"""ELPV loading, stratified splits, flwr-datasets partitions, ImageFolder scanning, local splits."""

from __future__ import annotations

import numpy as np
import pytest

from client.local_data import local_split
from common.config import RunConfig
from common.data import (
    DataError,
    LabelledFiles,
    elpv_split,
    load_elpv,
    partition,
    scan_image_folder,
    stratified_split,
    stratified_subset,
)
from tests.conftest import write_image_folder, write_png

# --- ELPV -----------------------------------------------------------------------------------------


def test_load_elpv_four_level():
    # Execute
    files = load_elpv("4-level")

    # Assert
    assert len(files) == 2624
    assert files.class_names == ("p0", "p1/3", "p2/3", "p1")
    assert files.class_counts() == [1508, 295, 106, 715]
    assert all(path.endswith(".png") for path in files.paths[:20])


def test_load_elpv_binary_merges_by_probability():
    # Execute
    files = load_elpv("binary")

    # Assert: p >= 0.5 means p2/3 and p1 -> defective
    assert files.class_names == ("functional", "defective")
    assert files.class_counts() == [1508 + 295, 106 + 715]
    assert sum(files.class_counts()) == 2624


def test_load_elpv_unknown_task():
    with pytest.raises(DataError) as caught:
        load_elpv("3-level")

    assert "binary" in str(caught.value)


def test_stratified_split_is_seeded_and_keeps_class_shares():
    # Prepare
    files = load_elpv("4-level")
    shares = np.asarray(files.class_counts()) / len(files)

    # Execute
    rest, test = stratified_split(files, test_fraction=0.25, seed=42)
    rest_again, test_again = stratified_split(files, test_fraction=0.25, seed=42)
    _, test_other_seed = stratified_split(files, test_fraction=0.25, seed=43)

    # Assert
    assert test.paths == test_again.paths and rest.paths == rest_again.paths
    assert test.paths != test_other_seed.paths
    assert len(test) == 656  # ceil(0.25 * 2624)
    assert len(rest) + len(test) == 2624
    assert set(rest.paths).isdisjoint(test.paths)
    for part in (rest, test):
        part_shares = np.asarray(part.class_counts()) / len(part)
        assert np.all(np.abs(part_shares - shares) < 0.02)


def test_stratified_subset_size_and_passthrough():
    files = load_elpv("4-level")

    small = stratified_subset(files, 400, seed=1)

    assert len(small) == 400
    assert small.class_counts()[0] == pytest.approx(400 * 1508 / 2624, abs=2)
    assert stratified_subset(files, 0, seed=1) is files
    assert stratified_subset(files, 5000, seed=1) is files


def test_elpv_split_is_deterministic():
    # Execute
    first = elpv_split("4-level", subset=0, test_fraction=0.25, seed=7)
    second = elpv_split("4-level", subset=0, test_fraction=0.25, seed=7)

    # Assert
    assert first[0].paths == second[0].paths
    assert first[1].paths == second[1].paths
    assert len(first[0]) + len(first[1]) == 2624


def test_elpv_split_with_subset():
    share, test = elpv_split("binary", subset=400, test_fraction=0.25, seed=7)

    assert len(share) + len(test) == 400
    assert len(test) == 100


# --- partitions -----------------------------------------------------------------------------------


def _synthetic(num: int = 400, num_classes: int = 4, seed: int = 0) -> LabelledFiles:
    labels = np.random.default_rng(seed).integers(0, num_classes, num)
    return LabelledFiles(
        tuple(f"img{i:04d}.png" for i in range(num)),
        tuple(int(x) for x in labels),
        tuple(f"c{k}" for k in range(num_classes)),
    )


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [("iid", {}), ("dirichlet", {"dirichlet_alpha": 0.3}), ("pathological", {"classes_per_client": 2})],
)
def test_partitions_are_disjoint_and_cover_the_input(method, kwargs):
    # Prepare
    files = _synthetic()

    # Execute (seed 7: flwr-datasets' Dirichlet sampling meets its minimum size at the first draw)
    parts = [partition(files, 10, pid, method, seed=7, **kwargs) for pid in range(10)]

    # Assert
    all_paths = [p for part in parts for p in part.paths]
    assert len(all_paths) == len(set(all_paths)) == len(files)
    assert set(all_paths) == set(files.paths)
    label_of = dict(zip(files.paths, files.labels, strict=True))
    for part in parts:
        assert len(part) > 0
        assert all(label_of[p] == y for p, y in zip(part.paths, part.labels, strict=True))
        assert part.class_names == files.class_names


def test_partitions_are_seeded():
    files = _synthetic()

    first = partition(files, 5, 2, "dirichlet", seed=11)
    again = partition(files, 5, 2, "dirichlet", seed=11)
    other = partition(files, 5, 2, "dirichlet", seed=12)

    assert first.paths == again.paths
    assert first.paths != other.paths


def test_a_dirichlet_draw_flwr_datasets_alone_refuses_still_splits():
    """400 samples, 10 clients, alpha 0.3, seed 1: flwr-datasets, asked for 10 per client, gave up
    after 10 redraws (a DataError before dirichlet-min-partition-size existed). Now the floor is
    met by a redraw or by moving samples, and the partition is valid."""
    files = _synthetic()

    parts = [partition(files, 10, pid, "dirichlet", seed=1, dirichlet_min_size=10) for pid in range(10)]

    assert sorted(p for part in parts for p in part.paths) == sorted(files.paths)
    assert min(len(part) for part in parts) >= 10


# sha256 of the 10-client Dirichlet(0.3) split of ELPV's 1,968 training images at seed 42, as every
# benchmark since the first measured it (before dirichlet-min-partition-size existed)
DEFAULT_SPLIT_SHA256 = "2298810586cda1a94ad41f03fcaaf55b630563964fb6753e69ae0e8df20c82c9"


def _elpv_dirichlet_split(clients: int, **kwargs: int) -> list[LabelledFiles]:
    client_share, _ = elpv_split("4-level", 0, 0.25, 42)
    return [partition(client_share, clients, pid, "dirichlet", 42, 0.3, **kwargs) for pid in range(clients)]


def test_the_default_ten_client_dirichlet_split_of_elpv_is_unchanged():
    import hashlib
    import json

    client_share, _ = elpv_split("4-level", 0, 0.25, 42)
    index = {path: i for i, path in enumerate(client_share.paths)}
    parts = [[index[path] for path in part.paths] for part in _elpv_dirichlet_split(10)]

    assert [len(part) for part in parts] == [268, 472, 25, 402, 31, 24, 139, 111, 225, 271]
    assert hashlib.sha256(json.dumps(parts).encode()).hexdigest() == DEFAULT_SPLIT_SHA256


@pytest.mark.parametrize("clients", [100, 1000])
def test_a_dirichlet_split_of_elpv_over_100_and_1000_clients_leaves_no_client_empty(clients):
    """flwr-datasets alone refuses these (100: no draw in 11 gives every client 10 images; 1,000:
    about 29% of the clients of any draw are empty); the auto floor (1) and the top-up split them."""
    parts = _elpv_dirichlet_split(clients)

    paths = [path for part in parts for path in part.paths]
    assert min(len(part) for part in parts) >= 1
    assert len(paths) == len(set(paths)) == 1968
    majority = [max(part.class_counts()) / len(part) for part in parts]
    assert sum(majority) / clients > 0.7  # still label-skewed: ELPV's largest class is 57% of it


def test_a_dirichlet_floor_is_met_by_a_redraw_or_by_moving_samples():
    files = _synthetic()  # 400 samples; at seed 1 the first draw leaves a client below 10

    def split(**kwargs: int) -> list[LabelledFiles]:
        return [partition(files, 10, pid, "dirichlet", seed=1, dirichlet_min_size=10, **kwargs) for pid in range(10)]

    topped_up, redrawn = split(dirichlet_retries=0), split(dirichlet_retries=20)
    high = [partition(files, 10, pid, "dirichlet", seed=1, dirichlet_min_size=40) for pid in range(10)]

    for parts, floor in ((topped_up, 10), (redrawn, 10), (high, 40)):
        assert min(len(part) for part in parts) >= floor
        assert sorted(path for part in parts for path in part.paths) == sorted(files.paths)
    assert [part.paths for part in topped_up] != [part.paths for part in redrawn]
    assert sorted(len(part) for part in high) == [40] * 10  # 400 over 10 with at least 40 each: even


def test_a_dirichlet_floor_the_data_cannot_meet_names_the_key():
    with pytest.raises(DataError) as caught:
        partition(_synthetic(), 10, 0, "dirichlet", seed=1, dirichlet_min_size=41)
    assert "dirichlet-min-partition-size" in str(caught.value) and "at most 40" in str(caught.value)


def test_iid_partition_sizes_are_balanced():
    files = _synthetic()

    sizes = [len(partition(files, 10, pid, "iid", seed=3)) for pid in range(10)]

    assert sizes == [40] * 10


def test_pathological_partitions_hold_at_most_two_classes():
    files = _synthetic()

    parts = [partition(files, 10, pid, "pathological", seed=3, classes_per_client=2) for pid in range(10)]

    for part in parts:
        assert len(set(part.labels)) in (1, 2)


def test_more_clients_than_samples_is_a_data_error():
    files = _synthetic(num=5)

    with pytest.raises(DataError) as caught:
        partition(files, 6, 0, "iid", seed=0)

    assert "fewer clients" in str(caught.value)


@pytest.mark.parametrize("partition_id", [-1, 4, 10])
def test_partition_id_out_of_range_is_a_data_error(partition_id):
    with pytest.raises(DataError) as caught:
        partition(_synthetic(), 4, partition_id, "iid", seed=0)

    assert str(partition_id) in str(caught.value)


def test_unknown_partitioner_is_a_data_error():
    with pytest.raises(DataError) as caught:
        partition(_synthetic(), 4, 0, "shards", seed=0)

    assert "'shards'" in str(caught.value)


# --- ImageFolder ----------------------------------------------------------------------------------


def test_scan_image_folder_labels_follow_the_run_class_order(tmp_path):
    # Prepare: folders sort as crack < finger < ok, the run's order is ok, crack, finger
    write_png(tmp_path / "ok" / "a.png", 1)
    write_png(tmp_path / "ok" / "b.PNG", 2)
    write_png(tmp_path / "crack" / "c.png", 3)
    write_png(tmp_path / "finger" / "d.png", 4)
    (tmp_path / "ok" / "notes.txt").write_text("not an image")

    # Execute
    files = scan_image_folder(tmp_path, ("ok", "crack", "finger"))

    # Assert
    names = [p.split("/")[-2] + "/" + p.split("/")[-1] for p in files.paths]
    assert names == ["ok/a.png", "ok/b.PNG", "crack/c.png", "finger/d.png"]
    assert files.labels == (0, 0, 1, 2)
    assert files.class_names == ("ok", "crack", "finger")
    assert files.class_counts() == [2, 1, 1]
    assert files.notes == ()


def test_scan_image_folder_notes_unknown_and_missing_classes(tmp_path, caplog):
    # Prepare
    write_png(tmp_path / "ok" / "a.png", 1)
    write_png(tmp_path / "dirt" / "b.png", 2)

    # Execute
    with caplog.at_level("WARNING"):
        files = scan_image_folder(tmp_path, ("ok", "crack"))

    # Assert: the notes (which go to the server) count the board's own folders, its log names them
    assert files.labels == (0,)
    assert len(files.notes) == 2
    assert "ignored 1 class folder(s) not in the run's class list" in files.notes
    assert not any("dirt" in note for note in files.notes) and "dirt" in caplog.text
    assert any("crack" in note and "no images" in note for note in files.notes)


def test_scan_image_folder_missing_root_is_a_data_error(tmp_path):
    missing = tmp_path / "nowhere"

    with pytest.raises(DataError) as caught:
        scan_image_folder(missing, ("ok", "crack"))

    assert str(missing) in str(caught.value)
    assert "data-dir" in str(caught.value)


def test_scan_image_folder_without_known_images_is_a_data_error(tmp_path, caplog):
    # Prepare: images only in an unknown class, and an empty known class folder
    write_png(tmp_path / "dirt" / "a.png", 1)
    (tmp_path / "ok").mkdir()

    # Execute
    with caplog.at_level("WARNING"), pytest.raises(DataError) as caught:
        scan_image_folder(tmp_path, ("ok", "crack"))

    # Assert: the message counts the folders (it becomes the node's reply), the board's log names them
    message = str(caught.value)
    assert "no images" in message
    assert "2 sub-folder(s)" in message and "dirt" not in message and "dirt" in caplog.text


# --- client-side local split ----------------------------------------------------------------------


@pytest.mark.parametrize(("num", "fraction", "num_test"), [(1, 0.5, 0), (2, 0.9, 1), (10, 0.2, 2), (10, 0.0, 0)])
def test_local_split_keeps_a_training_example(num, fraction, num_test):
    # Prepare
    files = _synthetic(num=num)

    # Execute
    train, test = local_split(files, fraction, seed=5)

    # Assert
    assert len(test) == num_test
    assert len(train) == num - num_test >= 1
    assert set(train.paths).isdisjoint(test.paths)
    assert set(train.paths) | set(test.paths) == set(files.paths)


def test_local_split_is_seeded():
    files = _synthetic(num=50)

    first = local_split(files, 0.2, seed=5)
    again = local_split(files, 0.2, seed=5)
    other = local_split(files, 0.2, seed=6)

    assert first[1].paths == again[1].paths
    assert first[1].paths != other[1].paths
    assert list(first[0].paths) == sorted(first[0].paths)  # order kept within each part


def test_an_impossible_simulated_split_stops_the_main_job_once_before_flower_starts(capsys, monkeypatch):
    from deploy import simulate as main_job

    monkeypatch.setattr(main_job, "flwr_run", lambda *a, **k: pytest.fail("Flower must not start"))
    # 45 training images cannot give 30 clients 2 each
    run_config = "subset=60 dirichlet-min-partition-size=2"
    code = main_job.main(["--clients", "30", "--run-config", run_config, "--no-reference"])
    error = capsys.readouterr().err
    assert code == 2 and error.count("Cannot split") == 1 and "Use fewer clients" in error


def test_the_server_finds_an_impossible_split_or_missing_client_folders_before_round_1(tmp_path):
    from server.nodes import RunStopped
    from server.round_loop import check_start

    elpv = RunConfig.from_flower({"subset": 60, "dirichlet-min-partition-size": 2})
    check_start(elpv, 3)  # three clients can share 60 images
    with pytest.raises(RunStopped) as stopped:
        check_start(elpv, 30)
    assert str(stopped.value).count("Cannot split") == 1 and "Use fewer clients" in str(stopped.value)

    for partition_id in (0, 1):
        (tmp_path / f"client-{partition_id}").mkdir()
    folders = RunConfig.from_flower(
        {
            "dataset": "folder",
            "class-names": "ok,crack",
            "server-test-dir": "/srv/test",
            "data-dir": str(tmp_path),
            "min-clients": 2,
        }
    )
    check_start(folders, 3)  # client-2 has no folder: it says so itself, the two others can run
    with pytest.raises(RunStopped) as stopped:
        check_start(RunConfig.from_flower({**folders.to_flower(), "min-clients": 3}), 4)
    assert "no folder for 2 of the 4 simulated clients (client-2, client-3)" in str(stopped.value)
    assert "fewer than min-clients=3" in str(stopped.value)


def test_the_servers_held_out_folder_must_hold_every_class(tmp_path):
    from server.server_run import server_test_files

    held_out = write_image_folder(tmp_path / "server-test", {"ok": 2, "crack": 0}, seed=0)
    config = RunConfig.from_flower({"dataset": "folder", "class-names": "ok,crack", "server-test-dir": str(held_out)})
    with pytest.raises(DataError) as caught:
        server_test_files(config)
    assert "no usable images of ['crack']" in str(caught.value)
