"""The board's own floors on how many images a shared statistic may sum over: per class (the
server's request can raise it, never lower it), and for a clear Gram matrix as a whole. Plain
Python: the edge client applies them while it sums, and the privacy guard (client/privacy.py)
checks every reply against them before it leaves."""

from __future__ import annotations

from typing import Any

import numpy as np

from common.config import NodeConfig


class Refusal(RuntimeError):
    """A request this board did not agree to, or statistics below its floor; the message says which
    (the board answers with an error reply of code ``REFUSAL_CODE``)."""


DEFAULT_MIN_EXAMPLES = 5  # a board's floor when its node config sets none
LEAST_EXAMPLES = 2  # below this a "sum" is one image's features, whatever anyone set


def example_floor(requested: int, node_floor: int | None) -> int:
    """How many images a class (or any group) needs before the board shares a statistic of it:
    the server's request can raise the board's own floor (node config ``min-examples``, 5 if
    unset), never lower it, and nothing goes below 2."""
    return max(requested, node_floor or DEFAULT_MIN_EXAMPLES, LEAST_EXAMPLES)


def floor_violations(counts: Any, floor: int) -> list[str]:
    """Classes whose statistics a reply would share from fewer than ``floor`` images."""
    few = [index for index, count in enumerate(np.asarray(counts).ravel()) if 0 < count < floor]
    return [f"statistics of class(es) {few} come from fewer than {floor} images"] if few else []


def gram_floor(node: NodeConfig, dim: int) -> int:
    """How many images a board's clear Gram matrix must sum over. Below ``dim`` images the Gram
    spans exactly their features, so whoever holds it can test a candidate image for membership
    exactly (is its feature vector in that span?); from ``dim`` on it has full rank and that test
    says nothing. A board's own node config (``min-gram-examples``) may lower it, knowingly."""
    return dim if node.min_gram_examples is None else node.min_gram_examples


def below_gram_floor(board: str, images: int, floor: int) -> Refusal:
    """The refusal of a board whose clear Gram matrix would sum fewer images than its floor."""
    return Refusal(
        f"{board} would share a Gram matrix of {images} images, fewer than its floor of {floor} (the feature "
        "dimension unless its node config sets min-gram-examples): below it the matrix is an exact membership "
        "test of its images, so it shares no ridge statistics"
    )
