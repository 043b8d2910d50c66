"""Per-sample dynamic execution: each sample pays only for the path it takes.

Partition, don't mask: see docs/dynamic.md.
"""

from adaptnet.dynamic._depth import (
    ACTHalting,
    AdaptiveDepth,
    Decision,
    DepthResult,
    HaltingPolicy,
    PonderNetHalting,
    Step,
    ThresholdHalting,
)
from adaptnet.dynamic._exit import (
    AllExits,
    Calibration,
    EarlyExit,
    ExitResult,
    calibrate_exits,
    calibrate_temperatures,
)
from adaptnet.dynamic._ledger import MacCount, count_macs
from adaptnet.dynamic._moe import MoE, MoEResult
from adaptnet.dynamic._per_sample import per_sample
from adaptnet.dynamic._result import DynamicResult
from adaptnet.dynamic._route import branch, route_topk, switch

__all__ = [
    "ACTHalting",
    "AdaptiveDepth",
    "AllExits",
    "Calibration",
    "Decision",
    "DepthResult",
    "DynamicResult",
    "EarlyExit",
    "ExitResult",
    "HaltingPolicy",
    "MacCount",
    "MoE",
    "MoEResult",
    "PonderNetHalting",
    "Step",
    "ThresholdHalting",
    "branch",
    "calibrate_exits",
    "calibrate_temperatures",
    "count_macs",
    "per_sample",
    "route_topk",
    "switch",
]
