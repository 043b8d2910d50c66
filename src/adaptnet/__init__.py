"""adaptnet: dynamic neural networks with shared and tied weights, on PyTorch.

Importing adaptnet changes nothing: no environment variables, thread
settings, global seeds or downloads. The layers above the core (``models``,
``data``, ``transfer``, ``recipes``, ``report``) are imported on first use, so
``import adaptnet`` stays cheap and ``adaptnet.models.build(...)`` still works.
"""

import importlib

from adaptnet import dynamic, errors, init, sharing, train
from adaptnet.dynamic import (
    ACTHalting,
    AdaptiveDepth,
    Calibration,
    DepthResult,
    DynamicResult,
    EarlyExit,
    ExitResult,
    HaltingPolicy,
    MacCount,
    MoE,
    MoEResult,
    PonderNetHalting,
    ThresholdHalting,
    branch,
    calibrate_exits,
    calibrate_temperatures,
    count_macs,
    generate,
    per_sample,
    route_topk,
    switch,
)
from adaptnet.errors import (
    AdaptnetError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    DynamicError,
    InitError,
    NonFiniteError,
    PerSampleError,
    ResumeError,
    RoutingError,
    RunLockedError,
    SelectionError,
    ShareError,
    TieBrokenError,
    TieError,
)
from adaptnet.init import InitReport, InitRow, Scheme, init_report, initialize, parse_scheme
from adaptnet.sharing import (
    FreezeReport,
    ModuleRow,
    Slot,
    Summary,
    TieGroup,
    TieMember,
    assert_tied,
    freeze,
    group_by_tensor,
    iter_slots,
    load,
    param_groups,
    retie,
    save,
    share,
    summary,
    tie,
    ties,
    unfreeze,
    untie,
)
from adaptnet.train import FitResult, ShardPlan, TrainConfig, evaluate, fit, shard

__version__ = "0.1.0"

_LAZY = ("data", "hf", "models", "recipes", "report", "transfer")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"adaptnet.{name}")  # also binds adaptnet.<name>
    if name == "compare":  # adaptnet.recipes.compare_models, imported on first use
        return importlib.import_module("adaptnet.recipes").compare_models
    raise AttributeError(f"module 'adaptnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"compare"})


__all__ = [
    "ACTHalting",
    "AdaptiveDepth",
    "AdaptnetError",
    "Calibration",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "ConfigError",
    "DepthResult",
    "DynamicError",
    "DynamicResult",
    "EarlyExit",
    "ExitResult",
    "FitResult",
    "FreezeReport",
    "HaltingPolicy",
    "InitError",
    "InitReport",
    "InitRow",
    "MacCount",
    "MoE",
    "MoEResult",
    "ModuleRow",
    "NonFiniteError",
    "PerSampleError",
    "PonderNetHalting",
    "ResumeError",
    "RoutingError",
    "RunLockedError",
    "Scheme",
    "SelectionError",
    "ShardPlan",
    "ShareError",
    "Slot",
    "Summary",
    "ThresholdHalting",
    "TieBrokenError",
    "TieError",
    "TieGroup",
    "TieMember",
    "TrainConfig",
    "__version__",
    "assert_tied",
    "branch",
    "calibrate_exits",
    "calibrate_temperatures",
    "compare",
    "count_macs",
    "data",
    "dynamic",
    "errors",
    "evaluate",
    "fit",
    "freeze",
    "generate",
    "group_by_tensor",
    "hf",
    "init",
    "init_report",
    "initialize",
    "iter_slots",
    "load",
    "models",
    "param_groups",
    "parse_scheme",
    "per_sample",
    "recipes",
    "report",
    "retie",
    "route_topk",
    "save",
    "shard",
    "share",
    "sharing",
    "summary",
    "switch",
    "tie",
    "ties",
    "train",
    "transfer",
    "unfreeze",
    "untie",
]
