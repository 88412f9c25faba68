"""The aggregation rules: one table from a run-config ``strategy`` name to a Flower strategy.

Flower's own strategies sample and aggregate; ``server/edgesplit_strategy.py`` wraps whichever one is
chosen. Adding a Flower strategy is a name in ``common/kinds.py`` (``StrategyName``, what the run config
accepts) and its line in ``STRATEGIES`` (a test holds the two to the same names).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, MultiKrum, Strategy

from common.kinds import StrategyName
from server.dp import WEIGHT_KEY as DP_WEIGHT_KEY

if TYPE_CHECKING:
    from common.config import RunConfig


class MultiKrumOfWhatArrived(MultiKrum):
    """Multi-Krum: drop the ``krum-malicious`` updates with the worst Krum scores each round, then
    average the rest weighted by examples, as FedAvg does. Flower's Multi-Krum keeps a fixed
    number of updates; this keeps all but ``num_malicious_nodes`` of those that arrived and
    passed screening (the wrapper screens before this runs)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.num_nodes_to_select = max(1, len(replies) - self.num_malicious_nodes)
        return super().aggregate_train(server_round, replies)


# name -> (config, the arguments every strategy takes) -> the Flower strategy
StrategyFactory = Callable[["RunConfig", dict[str, Any]], Strategy]

STRATEGIES: dict[StrategyName, StrategyFactory] = {
    StrategyName.FEDAVG: lambda config, common: FedAvg(**common),
    StrategyName.FEDPROX: lambda config, common: FedProx(proximal_mu=config.proximal_mu, **common),
    StrategyName.FEDADAM: lambda config, common: FedAdam(
        eta=config.server_learning_rate, eta_l=config.learning_rate, **common
    ),
    StrategyName.FEDMEDIAN: lambda config, common: FedMedian(**common),
    StrategyName.FEDTRIMMEDAVG: lambda config, common: FedTrimmedAvg(beta=config.trim_beta, **common),
    StrategyName.KRUM: lambda config, common: Krum(num_malicious_nodes=config.krum_malicious, **common),
    StrategyName.MULTIKRUM: lambda config, common: MultiKrumOfWhatArrived(
        num_malicious_nodes=config.krum_malicious, **common
    ),
}


def make_inner_strategy(config: RunConfig) -> Strategy:
    """The Flower strategy the run config names, with the run's sampling settings."""
    common: dict[str, Any] = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": config.min_clients,
        "min_evaluate_nodes": config.min_clients if config.fraction_evaluate > 0 else 0,
        "min_available_nodes": config.min_clients,
    }
    if config.dp:  # equal weights: one node's update must move the average by its clipped norm at most
        common["weighted_by_key"] = DP_WEIGHT_KEY
    return STRATEGIES[StrategyName(config.strategy)](config, common)
