"""Files a board keeps about its data and its engine (embeddings of its images, backbone variants,
golden verdicts, personal heads), readable by the user that runs it only: files 0600, folders 0700,
whatever the umask. Embeddings and personal heads are derived from the board's private images;
another account on the board has no business reading them, nor swapping the model it runs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

PRIVATE_FILE = 0o600
PRIVATE_FOLDER = 0o700


def private_folder(path: Path) -> Path:
    """``path`` as a folder only its owner may enter: created (with any missing parents) 0700, or
    made 0700 if it is there already (a folder of this cache, perhaps from an older version)."""
    missing = [folder for folder in (path, *path.parents) if not folder.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=PRIVATE_FOLDER, exist_ok=True)  # the umask can only take bits away
    os.chmod(path, PRIVATE_FOLDER)
    return path


def private_file(path: Path) -> Path:
    """``path`` as a file only its owner may read: created empty 0600 if absent, made 0600 if not."""
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, PRIVATE_FILE))
    os.chmod(path, PRIVATE_FILE)
    return path


def write_private(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` through ``write`` (given a temporary path to write to) atomically, as a 0600
    file in a 0700 folder: the temporary file exists, 0600, before ``write`` opens it, so its
    content is never readable by others, and a crash never leaves half a file."""
    private_folder(path.parent)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    temporary.unlink(missing_ok=True)  # left by a crashed process with this pid
    os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE_FILE))
    write(temporary)
    os.chmod(temporary, PRIVATE_FILE)  # in case ``write`` made the file anew
    temporary.replace(path)
