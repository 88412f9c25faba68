"""A device's private images: which files it trains and tests on (never sent anywhere)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import NodeConfig, RunConfig
from common.data import DataError, LabelledFiles, elpv_split, partition, scan_image_folder
from common.kinds import DatasetKind


@dataclass(frozen=True)
class LocalData:
    """The local train and test shares, and notes on what was found wrong with the data."""

    train: LabelledFiles
    test: LabelledFiles
    notes: tuple[str, ...] = ()

    def with_train_labels(self, labels: tuple[int, ...]) -> LocalData:
        """The same files with other training labels (the test share is unchanged)."""
        return dataclasses.replace(self, train=dataclasses.replace(self.train, labels=labels))


def local_split(files: LabelledFiles, test_fraction: float, seed: int) -> tuple[LabelledFiles, LabelledFiles]:
    """Seeded local train/test split that always keeps at least one training example."""
    order = np.random.default_rng(seed).permutation(len(files))
    num_test = min(int(len(files) * test_fraction), len(files) - 1)
    return files.subset(np.sort(order[num_test:])), files.subset(np.sort(order[:num_test]))


def load_local_data(config: RunConfig, node: NodeConfig) -> LocalData:
    """This node's private files: an ELPV partition in simulation, or its own ImageFolder."""
    node_seed = config.seed + 7919 * (node.partition_id or 0)
    if node.data_dir or config.dataset == DatasetKind.FOLDER:
        folder = node.data_dir or _simulated_folder(config, node)
        files = scan_image_folder(folder, config.classes())
    else:
        if node.partition_id is None or node.num_partitions is None:
            raise DataError(
                "dataset='elpv' splits ELPV over simulated clients and needs node-config "
                "'partition-id' and 'num-partitions'. On a real device set node-config 'data-dir'."
            )
        client_share, _ = elpv_split(config.elpv_task, config.subset, config.test_fraction, config.seed)
        files = partition(
            client_share,
            node.num_partitions,
            node.partition_id,
            config.partitioner,
            config.seed,
            config.dirichlet_alpha,
            config.classes_per_client,
            dirichlet_min_size=config.dirichlet_min_partition_size,
            dirichlet_retries=config.dirichlet_max_retries,
        )
    train, test = local_split(files, config.client_test_fraction, node_seed)
    return LocalData(train, test, files.notes)


def _simulated_folder(config: RunConfig, node: NodeConfig) -> Path:
    if not config.data_dir or node.partition_id is None:
        raise DataError(
            "dataset='folder' needs node-config 'data-dir' on each device, or run-config 'data-dir' "
            "holding client-<partition-id>/ folders in simulation."
        )
    return Path(config.data_dir).expanduser() / f"client-{node.partition_id}"
