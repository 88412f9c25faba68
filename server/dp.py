"""Differential privacy on the head updates (opt-in: ``dp-clipping-norm`` > 0): each board clips
its update to the clipping norm C (``client/dp_clipping.py``), the server screens the updates
(an update over C is refused), averages the accepted ones and adds Gaussian noise once per round
(here), and Flower's RDP accountant says what the rounds so far cost: epsilon at ``dp-delta``.

The mechanism, per round: ``head = start + (sum of the accepted clipped updates + N(0, (z C)^2)) / n``
where n is the number of nodes the round's attempt was sent to, fixed before any reply is seen.
A node that failed or was refused adds nothing to the sum; with the fixed denominator, one node
more or less changes the sum by at most C, which is what the noise is calibrated to (Flower's
``compute_stdv``: z C / n on the mean). Dividing by the number of accepted replies instead would
make that count part of the released value (sensitivity up to 2 C / m).

Why not Flower's ``DifferentialPrivacyClientSideFixedClipping`` wrapper and ``fixedclipping_mod``
as they are (Flower 1.41): the mod refuses a message with more than one array record, and a
node that lacks the backbone gets it, and the golden batch, beside the head; the wrapper draws
its noise from NumPy's global generator and divides by the number of replies; and with an
accountant it skips any round in which a single reply is missing or refused. What is used from
Flower: the arithmetic of its clipping (common/clipping.py), its noise formula (``compute_stdv``)
and its accountant (``RdpAccountant``, over Google's ``dp-accounting``).

The noise comes from the operating system's entropy, never from the run's seed: a noise that the
seed reproduces could be subtracted by anyone who reads ``config.json``. So the sum before the
noise is as deterministic as without DP (content-ordered), and a DP run's heads are not
bit-for-bit reproducible.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

from common.clipping import clip_update
from common.flower_glue import gaussian_noise_std
from common.kinds import EventKind
from server.ledger import RoundRecord
from server.run_folder import RunLog

log = logging.getLogger(__name__)

# What the accountant assumes about who is in a round: nothing. Flower samples the round's nodes
# with Python's generator seeded by the run's seed (server/round_loop.py), so who was sampled is no
# secret and privacy amplification by sampling is not claimed: epsilon does not depend on
# fraction-train.
SAMPLING = SamplingMethod.NO_AMPLIFICATION
ACCOUNTANT = "rdp (flwr.serverapp.RdpAccountant over dp-accounting), no sampling amplification"
# The weight Flower's FedAvg gives each accepted update in a DP run: all equal, so that one
# node's update moves the sum by at most C whatever number of examples it claims.
WEIGHT_KEY = "dp-weight"


def epsilon_spent(noise_multipliers: Iterable[float], delta: float) -> float:
    """Epsilon at ``delta`` after one Gaussian release per round with these noise multipliers
    (client-level, add or remove one node), from Flower's RDP accountant. 0 before any release."""
    counts = Counter(float(z) for z in noise_multipliers)
    if not counts:
        return 0.0
    # Without amplification the accountant uses neither the sample nor the population size.
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=1,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SAMPLING,
        )
    )
    for z, count in sorted(counts.items()):
        accountant.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=1, population_size=1), count)
    return accountant.get_privacy_spent().epsilon


def fleet_epsilon(noise_multiplier: float, rounds: int, delta: float, fleet: int, sampled: int) -> float:
    """Epsilon if each round sampled each of ``fleet`` nodes independently with chance
    ``sampled / fleet``, secretly (Poisson sampling; amplification counted). edgesplit's sampler
    is not such a sampler: this is for the benchmark's what-if table only."""
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=fleet,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.POISSON,
        )
    )
    accountant.compose(GaussianPrivacyEvent(noise_multiplier, sampled, fleet), rounds)
    return accountant.get_privacy_spent().epsilon


def noise_std(noise_multiplier: float, clipping_norm: float, sampled: int) -> float:
    """The standard deviation of the noise on each coordinate of the round's mean update."""
    return gaussian_noise_std(noise_multiplier, clipping_norm, sampled)


def private_head(
    start: Mapping[str, np.ndarray],
    mean: Mapping[str, np.ndarray],
    accepted: int,
    sampled: int,
    noise_multiplier: float,
    clipping_norm: float,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """The round's released head: ``mean`` is the unweighted mean of the ``accepted`` clipped
    updates' heads (Flower's FedAvg with equal weights), turned into the sum over the ``sampled``
    nodes plus Gaussian noise, divided by ``sampled``. ``rng`` only for tests: by default fresh
    operating-system entropy."""
    if not 0 < accepted <= sampled:
        raise ValueError(f"accepted updates ({accepted}) must be between 1 and the nodes sampled ({sampled})")
    rng = np.random.default_rng() if rng is None else rng
    std = noise_std(noise_multiplier, clipping_norm, sampled)
    released = {}
    for name, begin in start.items():
        update = (np.asarray(mean[name], dtype=np.float64) - begin) * (accepted / sampled)
        noisy = begin + update + rng.normal(0.0, std, size=np.shape(begin))
        released[name] = noisy.astype(np.asarray(begin).dtype)
    return released


@dataclass(frozen=True)
class DpSettings:
    """The run's DP keys: the clipping norm C, the noise multiplier z, and the delta epsilon is
    reported at."""

    clipping_norm: float
    noise_multiplier: float
    delta: float


class PrivateRelease:
    """The server's part of the mechanism, one collaborator of the edgesplit strategy (as Flower's
    DP wrappers compose a strategy): each accepted update clipped before the inner strategy
    averages it with equal weights, then the noise on that average, once per round, over the fixed
    denominator; the budget all releases so far have spent, in the round's record and a
    ``dp-release`` event."""

    def __init__(self, settings: DpSettings, run_log: RunLog, releases: list[float]) -> None:
        """``releases``: the run's own list of the noise multiplier of every release so far, its
        earlier processes' included (``ServerRun.dp_releases``); each release is added to it here,
        so that the checkpoint and summary.json count what was released, not what was recorded."""
        self.settings, self.run_log = settings, run_log
        self.releases = releases

    def clipped(self, update: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """An accepted update clipped to C here too: the screen refused those over it, and this makes
        the bound exact whatever a board computed."""
        return clip_update(update, start, self.settings.clipping_norm)

    def released(
        self,
        server_round: int,
        start: Mapping[str, np.ndarray],
        mean: Mapping[str, np.ndarray],
        accepted: int,
        sampled: int,
        record: RoundRecord,
    ) -> dict[str, np.ndarray]:
        """The round's head (``private_head``) from the inner strategy's ``mean`` of the ``accepted``
        clipped updates; the round's noise and the epsilon spent so far go in its ``record``."""
        z, clipping_norm = self.settings.noise_multiplier, self.settings.clipping_norm
        head = private_head(start, mean, accepted, sampled, z, clipping_norm)
        self.releases.append(z)  # before the head leaves this method: whatever happens next, it is counted
        record.dp_noise_multiplier = z
        record.dp_epsilon = epsilon_spent(self.releases, self.settings.delta)
        self.run_log.event(
            EventKind.DP_RELEASE,
            round=server_round,
            accepted=accepted,
            sampled=sampled,
            noise_std=noise_std(z, clipping_norm, sampled),
            epsilon=record.dp_epsilon,
            delta=self.settings.delta,
        )
        return head
