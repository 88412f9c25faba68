"""Datasets as lists of image files with labels: ELPV (embedded default) and user ImageFolders.

Images stay files on disk; a dataset here is a table of paths and labels, so partitioning and
splitting never decode a pixel. Decoding happens once, in the embedding step.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.kinds import DatasetKind, ElpvTask, Partitioner, kind_values

log = logging.getLogger(__name__)

# torchvision ImageFolder's list, so a folder that works there works here
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
ELPV_CLASS_NAMES = {
    ElpvTask.FOUR_LEVEL: ("p0", "p1/3", "p2/3", "p1"),
    ElpvTask.BINARY: ("functional", "defective"),
}


class DataError(ValueError):
    """Local data cannot be used as configured; the message says how to fix it."""


@dataclass(frozen=True)
class LabelledFiles:
    """Image files and their class indices into ``class_names``."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())  # problems found that did not stop loading
    skipped: tuple[tuple[str, str], ...] = field(default=())  # (path, reason): files found but not usable

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError("paths and labels differ in length")

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: np.ndarray | list[int]) -> LabelledFiles:
        return LabelledFiles(
            paths=tuple(self.paths[i] for i in indices),
            labels=tuple(self.labels[i] for i in indices),
            class_names=self.class_names,
            notes=self.notes,
            skipped=self.skipped,
        )

    def class_counts(self) -> list[int]:
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=len(self.class_names)).tolist()


# --- ELPV --------------------------------------------------------------------------------------


def elpv_root() -> Path:
    import elpv_dataset

    return Path(elpv_dataset.__file__).parent / "data"


@functools.lru_cache(maxsize=4)
def load_elpv(task: ElpvTask = ElpvTask.FOUR_LEVEL) -> LabelledFiles:
    """All 2,624 ELPV cells. ``task`` is "4-level" (p = 0, 1/3, 2/3, 1) or "binary" (p >= 0.5)."""
    if task not in ELPV_CLASS_NAMES:
        raise DataError(f"ELPV task must be one of {kind_values(ElpvTask)}, got {task!r}.")
    root = elpv_root()
    paths, labels = [], []
    for line in (root / "labels.csv").read_text().splitlines():
        if not line.strip():
            continue
        relative, probability, _cell_type = line.split()
        p = float(probability)
        paths.append(str(root / relative))
        labels.append(int(p >= 0.5) if task == ElpvTask.BINARY else round(p * 3))
    return LabelledFiles(tuple(paths), tuple(labels), ELPV_CLASS_NAMES[task])


def is_plain_name(name: str) -> bool:
    """Whether ``name`` can only name a folder directly inside another: not empty, not ``.`` or
    ``..``, no separator, drive, NUL or home prefix, no surrounding spaces."""
    return not (
        not name
        or name in (".", "..")
        or any(mark in name for mark in ("/", "\\", "\0", ":"))
        or name.startswith("~")
        or Path(name).is_absolute()
        or name != name.strip()
    )


def check_class_names(class_names: tuple[str, ...]) -> tuple[str, ...]:
    """``class_names`` if each is a plain folder name, else DataError. The names come from the
    run config, which the server sends: a board joins them to its data folder, so ``../x`` or
    an absolute name would train on (and report the presence of) folders outside it."""
    unsafe = [name for name in class_names if not is_plain_name(name)]
    if unsafe:
        raise DataError(
            f"Class names must be plain folder names (no '/', '\\', ':', '..', a leading '~' or surrounding "
            f"spaces, not empty), got {unsafe}: each class is a sub-folder of the data folder. Fix run-config "
            "'class-names'."
        )
    return class_names


def class_names_for(dataset: DatasetKind, elpv_task: ElpvTask, class_names: tuple[str, ...]) -> tuple[str, ...]:
    """The run's class list: ELPV's own, or the one the run config names for user folders."""
    if dataset == DatasetKind.ELPV:
        if elpv_task not in ELPV_CLASS_NAMES:
            raise DataError(f"ELPV task must be one of {kind_values(ElpvTask)}, got {elpv_task!r}.")
        return ELPV_CLASS_NAMES[elpv_task]
    return class_names


# --- user ImageFolders -------------------------------------------------------------------------


def scan_image_folder(root: str | Path, class_names: tuple[str, ...]) -> LabelledFiles:
    """Read an ImageFolder-style directory (``root/<class name>/<image>``).

    ``class_names`` comes from the run config so that every client maps a name to the same index.
    Class folders the run does not know, and known classes without images, are noted rather
    than fatal: the client can still train on what it has. Every file in a class folder is either
    listed for use or in ``skipped`` with the reason: not an image (by extension), empty, or a
    symbolic link that leads out of ``root`` (which could expose files the operator did not mean
    to share with training). Whether an image decodes is found out when it is embedded.
    """
    check_class_names(class_names)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"Data folder {str(root)!r} does not exist. Create it with one sub-folder per class "
            f"({', '.join(class_names)}) or point node-config 'data-dir' at the right place."
        )
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    notes = []  # they go to the server with every reply: counts and the run's class names, no folder of the board's
    unknown = [name for name in folders if name not in class_names]
    if unknown:
        log.warning("%s: ignored class folders not in the run's class list: %s", root, unknown)
        notes.append(f"ignored {len(unknown)} class folder(s) not in the run's class list")
    paths: list[str] = []
    labels: list[int] = []
    skipped: list[tuple[str, str]] = []
    empty = []
    real_root = root.resolve()
    for index, name in enumerate(class_names):
        folder = root / name
        entries = sorted(folder.iterdir()) if folder.is_dir() else []
        usable = 0
        for entry in entries:
            reason = _unusable(entry, real_root)
            if reason == "folder":
                continue  # a sub-folder (or another class, such as ELPV's p1/3 inside p1)
            if reason:
                skipped.append((str(entry), reason))
                continue
            paths.append(str(entry))
            labels.append(index)
            usable += 1
        if not usable:
            empty.append(name)
    if empty:
        notes.append(f"no images for classes: {empty}")
    if not paths:
        log.error("%s: class folders found: %s", root, folders)
        raise DataError(
            f"Data folder {str(root)!r} holds no images of the run's classes {list(class_names)} "
            f"(it has {len(folders)} sub-folder(s), listed in this board's log). Expected "
            f"{root}/<class name>/*.png|jpg|..."
        )
    return LabelledFiles(tuple(paths), tuple(labels), tuple(class_names), tuple(notes), tuple(skipped))


def _unusable(entry: Path, real_root: Path) -> str:
    """Why a class folder's entry is not an image to embed ("folder" for sub-folders), or ""."""
    try:
        if entry.is_symlink():
            target = entry.resolve()
            if not target.is_relative_to(real_root):
                return "symlink out of the data folder"
        if entry.is_dir():
            return "folder"
        if not entry.is_file():
            return "unreadable (broken link or not a regular file)"
        if entry.suffix.lower() not in IMAGE_EXTENSIONS:
            return "not an image file (extension)"
        if entry.stat().st_size == 0:
            return "empty file"
    except OSError as error:
        return f"unreadable ({type(error).__name__})"
    return ""


# --- splits and partitions ---------------------------------------------------------------------


def stratified_split(files: LabelledFiles, test_fraction: float, seed: int) -> tuple[LabelledFiles, LabelledFiles]:
    """Seeded split that keeps each class's share in both parts (rest, held-out test)."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(files))
    counts = np.bincount(np.asarray(files.labels))
    stratify = files.labels if counts[counts > 0].min() >= 2 else None
    rest, test = train_test_split(indices, test_size=test_fraction, random_state=seed, stratify=stratify)
    return files.subset(np.sort(rest)), files.subset(np.sort(test))


def stratified_subset(files: LabelledFiles, size: int, seed: int) -> LabelledFiles:
    """A seeded, class-balanced-by-share subset of ``size`` files (for quick runs and tests)."""
    if size <= 0 or size >= len(files):
        return files
    kept, _ = stratified_split(files, test_fraction=1 - size / len(files), seed=seed)
    return kept


def elpv_split(task: ElpvTask, subset: int, test_fraction: float, seed: int) -> tuple[LabelledFiles, LabelledFiles]:
    """ELPV as a run sees it: (the part shared out to clients, the server's held-out test split)."""
    files = stratified_subset(load_elpv(task), subset, seed)
    return stratified_split(files, test_fraction, seed)


DIRICHLET_AUTO_MIN = 0  # dirichlet-min-partition-size 0: dirichlet_floor() derives it from the data


def dirichlet_floor(num_samples: int, num_partitions: int, min_size: int = DIRICHLET_AUTO_MIN) -> int:
    """The fewest samples a Dirichlet split leaves on a client: ``min_size``, or for 0 (auto) a
    tenth of an even share, at least 1 and at most 10 (flwr-datasets' own default). A tenth keeps
    the skew the draw makes (a client may hold a tenth of the average) while refusing empty
    clients; 10 clients of ELPV's 1,968 training images get 10, as before the key existed."""
    if min_size != DIRICHLET_AUTO_MIN:
        return min_size
    return max(1, min(10, num_samples // (10 * max(num_partitions, 1))))


def partition(
    files: LabelledFiles,
    num_partitions: int,
    partition_id: int,
    method: Partitioner,
    seed: int,
    dirichlet_alpha: float = 0.3,
    classes_per_client: int = 2,
    *,
    dirichlet_min_size: int = DIRICHLET_AUTO_MIN,
    dirichlet_retries: int = 10,
) -> LabelledFiles:
    """One client's share, by a flwr-datasets partitioner over a local ``datasets.Dataset``."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside [0, {num_partitions}).")
    indices = _partition_indices(
        files.labels,
        num_partitions,
        method,
        seed,
        dirichlet_alpha,
        classes_per_client,
        dirichlet_min_size,
        dirichlet_retries,
    )[partition_id]
    if not indices:
        raise DataError(
            f"Partition {partition_id} of {num_partitions} is empty ({len(files)} samples, "
            f"partitioner '{method}'). Use fewer clients or more data."
        )
    return files.subset(indices)


@functools.lru_cache(maxsize=8)
def _partition_indices(
    labels: tuple[int, ...],
    num_partitions: int,
    method: Partitioner,
    seed: int,
    dirichlet_alpha: float,
    classes_per_client: int,
    dirichlet_min_size: int = DIRICHLET_AUTO_MIN,
    dirichlet_retries: int = 10,
) -> tuple[list[int], ...]:
    import datasets
    from flwr_datasets import partitioner as flwr_partitioner

    if num_partitions > len(labels):
        raise DataError(
            f"{num_partitions} clients but only {len(labels)} training samples: every client "
            "needs at least one. Use fewer clients (num-supernodes) or more data (subset=0)."
        )
    table = datasets.Dataset.from_dict({"index": list(range(len(labels))), "label": list(labels)})
    # IidPartitioner shards contiguously; shuffle so that file order (often by source) does not leak.
    table = table.shuffle(seed=seed)
    if method == Partitioner.DIRICHLET:
        floor = dirichlet_floor(len(labels), num_partitions, dirichlet_min_size)
        if floor * num_partitions > len(labels):
            raise DataError(
                f"Cannot split {len(labels)} samples over {num_partitions} clients with at least {floor} each "
                f"(dirichlet-min-partition-size={dirichlet_min_size}). Use fewer clients, more data (subset=0) "
                f"or 'dirichlet-min-partition-size' at most {len(labels) // num_partitions} (0: auto)."
            )
        parts = _dirichlet_parts(table, num_partitions, dirichlet_alpha, seed, floor, dirichlet_retries)
        return tuple(sorted(part) for part in parts)
    partitioner: flwr_partitioner.Partitioner
    if method == Partitioner.IID:
        partitioner = flwr_partitioner.IidPartitioner(num_partitions=num_partitions)
    elif method == Partitioner.PATHOLOGICAL:
        partitioner = flwr_partitioner.PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_client,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    else:
        raise DataError(f"Unknown partitioner {method!r}; use one of {kind_values(Partitioner)}.")
    partitioner.dataset = table
    try:
        return tuple(sorted(partitioner.load_partition(pid)["index"]) for pid in range(num_partitions))
    except ValueError as error:  # e.g. more classes per client than the data holds
        raise DataError(
            f"Cannot split {len(labels)} samples over {num_partitions} clients with the '{method}' "
            f"partitioner: {error} Use fewer clients or more data (subset=0)."
        ) from error


def _dirichlet_parts(
    table: Any, num_partitions: int, alpha: float, seed: int, floor: int, retries: int
) -> list[list[int]]:
    """Each client's indices from flwr-datasets' DirichletPartitioner: the first of ``retries + 1``
    draws that leaves every client ``floor`` samples, else the first draw topped up to it.

    Each draw is one partitioner (minimum 0, so it never redraws or gives up itself: its own
    limit is 10 redraws); draw 0 is seeded with ``seed`` as before these keys existed, so a split
    whose first draw met the minimum is unchanged, and draw k with a seed derived from (seed, k).
    At 1,000 clients of ELPV at alpha 0.3 about 29% of the clients of any draw are empty, so no
    number of redraws helps: the top-up then moves the few samples the short clients lack
    (295 of 1,968 there; ``_top_up``)."""
    from flwr_datasets.partitioner import DirichletPartitioner

    first: DirichletPartitioner | None = None
    for attempt in range(retries + 1):
        draw_seed = seed if attempt == 0 else int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0])
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=0,
            self_balancing=False,
            seed=draw_seed,
        )
        partitioner.dataset = table
        first = first or partitioner
        parts: list[list[int]] = []
        for pid in range(num_partitions):  # stop at the first client short of the floor
            parts.append(list(partitioner.load_partition(pid)["index"]))
            if len(parts[-1]) < floor:
                break
        else:
            return parts
    assert first is not None
    return _top_up([list(first.load_partition(pid)["index"]) for pid in range(num_partitions)], floor, seed)


def _top_up(parts: list[list[int]], floor: int, seed: int) -> list[list[int]]:
    """``parts`` with every one below ``floor`` filled, one sample at a time, from a client above it
    drawn with odds in proportion to its excess (seeded): donors shrink in proportion, none below
    the floor, so the draw's spread of sizes keeps its shape. A moved sample is the last of the
    donor's list, which flwr-datasets shuffled."""
    rng = np.random.default_rng(seed)
    excess = np.array([max(len(part) - floor, 0) for part in parts], dtype=np.float64)
    short = [pid for pid, part in enumerate(parts) if len(part) < floor]
    moved = 0
    for pid in short:
        while len(parts[pid]) < floor:
            donor = int(rng.choice(len(parts), p=excess / excess.sum()))
            parts[pid].append(parts[donor].pop())
            excess[donor] -= 1
            moved += 1
    log.info(
        "No Dirichlet draw gave each of %d clients %d samples: %d samples moved to the %d below from the others "
        "(dirichlet-min-partition-size, dirichlet-max-retries)",
        len(parts),
        floor,
        moved,
        len(short),
    )
    return parts
