"""The golden check: does this device's engine compute what the server's fp32 backbone does?

With each backbone variant the server sends a golden batch (``GoldenBatch``: a few of its own
held-out images and its features for them). A node runs its engine on it once per variant
(the verdict is kept on disk, client/backbone_cache.py) before any embedding of that variant is
used. Below ``golden-min-cosine`` the node moves to the next safer engine (``EngineKind.safer``:
onnx-int8, then onnx, then torch where installed) and says why in its status; with no safer
engine left, its replies carry the failed check and the server refuses them.
"""

from __future__ import annotations

import logging

from client.backbone_cache import BackboneCache
from common.engines import EngineKind, GoldenCheckFailed, engine_kind
from common.protocol import BackboneStatus, Instructions

log = logging.getLogger(__name__)


class GoldenGate:
    """One device's golden checks against ``minimum`` (the run's golden-min-cosine)."""

    def __init__(self, backbones: BackboneCache, minimum: float, num_threads: int, who: str) -> None:
        self.backbones, self.minimum, self.num_threads, self.who = backbones, minimum, num_threads, who

    def status(self, wanted: EngineKind, fp: str, cut: int = 0) -> BackboneStatus:
        """The engine to run after any fallback, and the variant held for it (verified, with the
        golden batch; "" if not: the server then sends both)."""
        kind, fallback = self.engine_for(wanted, fp, cut)
        held = self.backbones.held(kind, fp, cut) if self.backbones.golden_path(fp, cut).is_file() else None
        cosine = self.cosine(kind, fp, cut) if held else None
        return BackboneStatus(
            engine=kind.name,
            held_fingerprint=held or "",
            golden_cosine=-1.0 if cosine is None else cosine,
            fallback=fallback,
        )

    def engine_for(self, wanted: EngineKind, fp: str, cut: int = 0) -> tuple[EngineKind, str]:
        """``wanted``, or the next safer engine (installed) while the variant held for it failed the
        golden check on this device; with why ("" if no fallback)."""
        kind, reasons = wanted, []
        while kind.safer is not None:
            cosine = self.cosine(kind, fp, cut)
            safer = engine_kind(kind.safer)
            if cosine is None or cosine >= self.minimum or not safer.available():
                break
            reasons.append(f"{kind.name} golden cosine {cosine:.4f} < golden-min-cosine {self.minimum:g}")
            kind = safer
        return kind, "; ".join(reasons) + (f"; runs {kind.name}" if reasons else "")

    def cosine(self, kind: EngineKind, fp: str, cut: int = 0) -> float | None:
        """The golden verdict of the variant held for ``kind`` (None: no variant or no batch)."""
        held = self.backbones.held(kind, fp, cut)
        return None if held is None else self.backbones.golden_cosine(kind, fp, held, self.num_threads, cut)

    def check(self, instructions: Instructions) -> float:
        """The instructed engine on the golden batch: the mean cosine to the server's features (-1:
        no batch to check with), or GoldenCheckFailed below the minimum, saying what follows."""
        kind, fp, cut = engine_kind(instructions.engine), instructions.fingerprint, instructions.cut
        cosine = self.backbones.golden_cosine(kind, fp, instructions.engine_fingerprint, self.num_threads, cut)
        if cosine is None or cosine >= self.minimum:
            return -1.0 if cosine is None else cosine
        safer = engine_kind(kind.safer) if kind.safer else None
        if safer is not None and safer.available():
            then = f"this node falls back to the {safer.name} engine"
        else:
            then = "no safer engine is installed on this node, so its replies are refused"
        message = (
            f"{self.who}: the {kind.name} engine computes the server's golden features at mean cosine "
            f"{cosine:.4f}, below golden-min-cosine={self.minimum:g}; {then}"
        )
        log.warning("%s", message)
        raise GoldenCheckFailed(message, cosine)
