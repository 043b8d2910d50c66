"""Per-sample dynamic execution: each sample pays only for the path it takes.

Partition, don't mask: see docs/dynamic.md.
"""

from adaptnet.dynamic._depth import (
    ACTHalting,
    AdaptiveDepth,
    DepthResult,
    PonderNetHalting,
    ThresholdHalting,
)
from adaptnet.dynamic._exit import Calibration, EarlyExit, ExitResult, calibrate_exits
from adaptnet.dynamic._ledger import MacCount, count_macs
from adaptnet.dynamic._moe import MoE, MoEResult
from adaptnet.dynamic._per_sample import per_sample
from adaptnet.dynamic._route import branch, switch

__all__ = [
    "ACTHalting",
    "AdaptiveDepth",
    "Calibration",
    "DepthResult",
    "EarlyExit",
    "ExitResult",
    "MacCount",
    "MoE",
    "MoEResult",
    "PonderNetHalting",
    "ThresholdHalting",
    "branch",
    "calibrate_exits",
    "count_macs",
    "per_sample",
    "switch",
]
