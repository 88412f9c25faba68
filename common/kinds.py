"""The closed sets of names the run config and the event log use, as types: each is parsed once at
the config boundary (common/config.py), and the config error lists its choices from the type."""

from __future__ import annotations

from enum import StrEnum


class StrategyName(StrEnum):
    """Run-config ``strategy``: the aggregation rule (server/aggregation.py maps each to Flower's)."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"  # clients add the proximal term (the instructions carry proximal-mu)
    FEDADAM = "fedadam"  # server-side Adam on the averaged update
    FEDMEDIAN = "fedmedian"  # coordinate-wise median: robust to a minority of poisoned updates
    FEDTRIMMEDAVG = "fedtrimmedavg"  # coordinate-wise mean after cutting trim-beta from each end
    KRUM = "krum"  # the one update closest to its n - f - 2 nearest neighbours
    MULTIKRUM = "multikrum"  # all but the krum-malicious worst-scored updates, averaged


# Strategies that score each update against n - f - 2 others (the config checks min-clients).
KRUM_FAMILY = frozenset({StrategyName.KRUM, StrategyName.MULTIKRUM})
# Strategies whose aggregate is a plain average, the one the DP noise is calibrated to (server/dp.py).
DP_STRATEGIES = (StrategyName.FEDAVG, StrategyName.FEDPROX)


class EngineName(StrEnum):
    """A backbone engine (common/engines.py has what each runs), safest last."""

    TORCH = "torch"  # PyTorch eager: the reference
    ONNX = "onnx"  # ONNX Runtime, fp32
    ONNX_INT8 = "onnx-int8"  # ONNX Runtime, static int8


AUTO_ENGINE = "auto"  # run-config and node-config ``engine``: resolved on the device from what is installed
ENGINE_CHOICES = (AUTO_ENGINE, *(str(name) for name in EngineName))


class HeadKind(StrEnum):
    """Run-config ``head``: the trainable classifier on the features."""

    LINEAR = "linear"
    MLP = "mlp"
