"""Which cuts a backbone allows, and the embedding space a cut names: registry data only, no torch
(a head-only board checks its run config and names its embedding cache with these).
common/split.py does the splitting itself, with torch."""

from __future__ import annotations

import hashlib

from common.backbones import BackboneError, get_spec


def max_cut(backbone: str) -> int:
    """The most stages a run of this backbone may train (all but the first)."""
    return max(get_spec(backbone).num_stages - 1, 0)


def check_cut(backbone: str, cut: int) -> None:
    if not 0 <= cut <= max_cut(backbone):
        raise BackboneError(
            f"cut={cut} is not possible for backbone {backbone!r}: it has {max_cut(backbone)} stages that can "
            "train (run-config 'cut' counts them from the end; 0 trains the head only)."
        )


def embedding_space(variant_fingerprint: str, cut: int) -> str:
    """The id of the features one backbone variant gives at one cut: names the embedding cache.
    (Views are keyed per image inside it, so changing the view set keeps what was computed.)"""
    return variant_fingerprint if cut == 0 else hashlib.sha256(f"{variant_fingerprint}|cut={cut}".encode()).hexdigest()
