"""Per-sample and per-token dynamic execution: each pays only for the path it takes.

Partition, don't mask: see docs/dynamic.md.
"""

from adaptnet.dynamic._attention import KVCache, Span, TokenBlock, attend
from adaptnet.dynamic._block import CausalBlock, rope
from adaptnet.dynamic._decode import CachedModel, generate
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
from adaptnet.dynamic._moe import MoE, MoEResult, StackedExperts
from adaptnet.dynamic._per_sample import per_sample
from adaptnet.dynamic._recursion import MixtureOfRecursions
from adaptnet.dynamic._result import DynamicResult
from adaptnet.dynamic._route import branch, route_topk, switch
from adaptnet.dynamic._stack import DecoderCache, DecoderResult, TokenModel
from adaptnet.dynamic._token_exit import TokenEarlyExit, TokenExits
from adaptnet.dynamic._tokens import MixtureOfDepths, TokenResult

__all__ = [
    "ACTHalting",
    "AdaptiveDepth",
    "AllExits",
    "CachedModel",
    "Calibration",
    "CausalBlock",
    "Decision",
    "DecoderCache",
    "DecoderResult",
    "DepthResult",
    "DynamicResult",
    "EarlyExit",
    "ExitResult",
    "HaltingPolicy",
    "KVCache",
    "MacCount",
    "MixtureOfDepths",
    "MixtureOfRecursions",
    "MoE",
    "MoEResult",
    "PonderNetHalting",
    "Span",
    "StackedExperts",
    "Step",
    "ThresholdHalting",
    "TokenBlock",
    "TokenEarlyExit",
    "TokenExits",
    "TokenModel",
    "TokenResult",
    "attend",
    "branch",
    "calibrate_exits",
    "calibrate_temperatures",
    "count_macs",
    "generate",
    "per_sample",
    "rope",
    "route_topk",
    "switch",
]
