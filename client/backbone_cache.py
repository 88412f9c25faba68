"""The backbone variants a device holds on disk, verified before use, and the engines built from them.

Each engine kind (``common/engines.py``) says which file a variant lives in, how a received one is
checked and kept, and how a kept one is checked again and loaded; this module only decides when.
A copy that fails its check is not held (the kind deletes or overwrites it), so the server sends
it again.

Beside the variants: the server's golden batch per backbone and cut (``GoldenBatch``), and per
variant file the verdict of running it on that batch (``<file>.golden.json``: the mean cosine to
the server's features), measured once per variant, batch and runtime, so that a process started
per message (a deployed SuperNode) does not measure it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from client.lru import LruCache
from common.engines import Engine, EngineKind, FingerprintMismatch, runtime_tag
from common.private_files import write_private
from common.protocol import GoldenBatch, Instructions, ProtocolError, check_fingerprint

log = logging.getLogger(__name__)

# What a process remembers about backbones (client/state.py owns the caches):
VerifiedFiles = LruCache[Path, str]  # file -> the variant fingerprint its bytes were checked to have
BuiltEngines = LruCache[tuple[str, int], Engine]  # (variant fingerprint, cut) -> runnable engine


class BackboneCache:
    """One device's backbone folder (``<cache>/backbones``) with the process's memory of it.

    Parameters
    ----------
    directory
        The device's cache directory; variants are kept in its ``backbones`` sub-folder.
    verified
        Files already checked by this process (hashing megabytes per message is not free).
    engines
        Engines already built by this process, shared by every node it serves.
    """

    def __init__(self, directory: Path, verified: VerifiedFiles, engines: BuiltEngines) -> None:
        self.directory = directory / "backbones"
        self._verified = verified
        self._engines = engines

    def path(self, kind: EngineKind, fp: str, cut: int = 0) -> Path:
        """Where this kind keeps backbone ``fp``; a fingerprint that is not a sha256 in hex is a
        ProtocolError here too, whatever path it came by: this cache deletes files that fail
        their check, so no name from a message may reach outside it."""
        return self.directory / kind.file_name(check_fingerprint(fp), cut)

    def held(self, kind: EngineKind, fp: str, cut: int = 0) -> str | None:
        """The variant fingerprint of this kind's verified copy of backbone ``fp``, if any."""
        try:
            return self._check(kind, fp, cut)
        except FingerprintMismatch as error:
            log.warning("%s; it will be downloaded again.", error)
            return None
        except FileNotFoundError:
            return None

    def holds(self, kind: EngineKind, fp: str, variant: str, cut: int = 0) -> bool:
        """True if a verified copy of exactly this variant is on disk."""
        return self.held(kind, fp, cut) == variant

    def keep(self, kind: EngineKind, arrays: Mapping[str, np.ndarray], instructions: Instructions) -> str:
        """Verify a received variant against the instructions and keep it; returns its variant
        fingerprint. Raises FingerprintMismatch (keeping nothing) for a corrupted transfer."""
        path = self.path(kind, instructions.fingerprint, instructions.cut)
        with self._verified.lock:
            self._verified.pop(path)  # whatever was there is being replaced
            variant = kind.keep(path, arrays, instructions)
            self._verified.put(path, variant)
        return variant

    def engine(self, kind: EngineKind, fp: str, variant: str, num_threads: int = 0, cut: int = 0) -> Engine:
        """The runnable backbone up to the cut for this variant, built once per process. This
        device must hold a verified copy even when another simulated node already built it."""
        if self._check(kind, fp, cut) != variant:
            raise FingerprintMismatch(
                f"This device holds no {kind.name} backbone {variant[:12]}; the server must send it."
            )
        return self._engines.get_or_make((variant, cut), lambda: kind.load(self.path(kind, fp, cut), cut, num_threads))

    def _check(self, kind: EngineKind, fp: str, cut: int) -> str:
        """The variant fingerprint of this device's copy, checked once per process."""
        path = self.path(kind, fp, cut)
        return self._verified.get_or_make(path, lambda: kind.check(path, fp))

    # --- the golden batch and each variant's verdict on it -----------------------------------------

    def golden_path(self, fp: str, cut: int = 0) -> Path:
        check_fingerprint(fp)
        return self.directory / (f"{fp}.golden.npz" if cut == 0 else f"{fp}.cut{cut}.golden.npz")

    def keep_golden(self, batch: GoldenBatch, fp: str, cut: int = 0) -> None:
        """Keep the server's golden batch for backbone ``fp`` at ``cut`` (replacing an older one)."""

        def save(target: Path) -> None:
            with target.open("wb") as handle:
                np.savez(handle, images=batch.images, features=batch.features)

        path = self.golden_path(fp, cut)
        with self._verified.lock:
            self._verified.pop(path)
            write_private(path, save)

    def golden(self, fp: str, cut: int = 0) -> GoldenBatch | None:
        """The golden batch held for backbone ``fp`` at ``cut``; None if none (or unreadable: removed)."""
        path = self.golden_path(fp, cut)
        if not path.is_file():
            return None
        try:
            with np.load(path) as stored:
                return GoldenBatch.from_arrays({name: stored[name] for name in stored.files})
        except (OSError, ValueError, ProtocolError) as error:
            log.warning("Golden batch %s is unreadable (%s); it will be sent again.", path, error)
            path.unlink(missing_ok=True)
            return None

    def golden_cosine(
        self, kind: EngineKind, fp: str, variant: str, num_threads: int = 0, cut: int = 0
    ) -> float | None:
        """The variant's mean cosine to the server's features on the golden batch, measured once per
        variant, batch and runtime and kept beside the variant file; None without a golden batch."""
        golden = self.golden_path(fp, cut)
        if not golden.is_file():
            return None
        digest = self._verified.get_or_make(golden, lambda: hashlib.sha256(golden.read_bytes()).hexdigest())
        key = {"variant": variant, "golden": digest, "runtime": runtime_tag(kind)}
        verdict = self.path(kind, fp, cut).with_name(self.path(kind, fp, cut).name + ".golden.json")
        try:
            saved = json.loads(verdict.read_text())
            if saved["key"] == key:
                return float(saved["cosine"])
        except (OSError, ValueError, TypeError, KeyError):
            pass  # none yet, or for another variant, batch or runtime: measure
        batch = self.golden(fp, cut)
        if batch is None:
            return None
        engine = self.engine(kind, fp, variant, num_threads, cut)
        cosine = batch.cosine(engine(batch.images.astype(np.float32)))
        write_private(verdict, lambda target: target.write_text(json.dumps({"key": key, "cosine": cosine})))
        return cosine
