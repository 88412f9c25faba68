"""ELPV's split over ``deploy-local``'s boards, written out as the ImageFolders real boards hold.

A simulated x86 board reads its ELPV partition through the server's splitter (scikit-learn,
flwr-datasets: the server extra). An emulated ARM board has only ``edgesplit[edge]``, as a real
one does, so ``deploy-local --arm-boards`` gives every board its partition as a folder
(``client-<i>/<class>/``, ``/`` in class names written as ``_``) and the server its held-out split
(``server-test/``), and runs with ``dataset='folder'``: the same images each board would get.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.data import LabelledFiles, elpv_split, partition


def folder_name(class_name: str) -> str:
    return class_name.replace("/", "_")


def _write(files: LabelledFiles, folder: Path) -> None:
    for name in files.class_names:
        (folder / folder_name(name)).mkdir(parents=True, exist_ok=True)
    for path, label in zip(files.paths, files.labels, strict=True):
        target = folder / folder_name(files.class_names[label]) / Path(path).name
        if not target.exists():
            shutil.copyfile(path, target)  # a copy: a board skips links that lead out of its folder


def write_elpv_folders(root: Path, boards: int, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Write ELPV as the run config ``overrides`` split it over ``boards`` boards; returns the run
    config that makes the same run read those folders."""
    config = RunConfig.from_flower(dict(overrides))
    client_share, server_test = elpv_split(config.elpv_task, config.subset, config.test_fraction, config.seed)
    shutil.rmtree(root, ignore_errors=True)
    for index in range(boards):
        files = partition(
            client_share,
            boards,
            index,
            config.partitioner,
            config.seed,
            config.dirichlet_alpha,
            config.classes_per_client,
        )
        _write(files, root / f"client-{index}")
    _write(server_test, root / "server-test")
    names = ",".join(folder_name(name) for name in client_share.class_names)
    return {**overrides, "dataset": "folder", "class-names": names, "server-test-dir": str(root / "server-test")}
