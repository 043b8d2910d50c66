"""adaptnet: dynamic neural networks with shared and tied weights, on PyTorch.

Importing adaptnet changes nothing: no environment variables, thread
settings, global seeds or downloads. Every subpackage, and every name exported
here, is imported on first use (``adaptnet.fit`` imports ``adaptnet.train``), so
``import adaptnet`` stays cheap (it does not import torch) and
``adaptnet.models.build(...)`` still works.
"""

import importlib

# Every name below lives in a subpackage and is imported from it on first use, so that
# `import adaptnet` (and the command line's --help) does not pay for importing torch.
_FROM = {
    "dynamic": ("ACTHalting", "AdaptiveDepth", "Calibration", "DepthResult", "DynamicResult",
        "EarlyExit", "ExitResult", "HaltingPolicy", "MacCount", "MoE", "MoEResult",
        "PonderNetHalting", "ThresholdHalting", "branch", "calibrate_exits",
        "calibrate_temperatures", "count_macs", "generate", "per_sample", "route_topk", "switch"),
    "errors": ("AdaptnetError", "CheckpointCorruptError", "CheckpointError",
        "CheckpointMismatchError", "CheckpointNotFoundError", "ConfigError", "DynamicError",
        "InitError", "NonFiniteError", "PerSampleError", "ResumeError", "RoutingError",
        "RunLockedError", "SelectionError", "ShareError", "TieBrokenError", "TieError"),
    "init": ("InitReport", "InitRow", "Scheme", "init_report", "initialize", "parse_scheme"),
    "sharing": ("FreezeReport", "ModuleRow", "Slot", "Summary", "TieGroup", "TieMember",
        "assert_tied", "freeze", "group_by_tensor", "iter_slots", "load", "param_groups",
        "retie", "save", "share", "summary", "tie", "ties", "unfreeze", "untie"),
    "train": ("FitResult", "ShardPlan", "TrainConfig", "evaluate", "fit", "shard"),
}
_OWNER = {name: module for module, names in _FROM.items() for name in names}

__version__ = "0.1.0"

_LAZY = ("data", "dynamic", "errors", "hf", "init", "models", "recipes", "report", "sharing",
         "train", "transfer")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"adaptnet.{name}")  # also binds adaptnet.<name>
    if name in _OWNER:
        value = getattr(importlib.import_module(f"adaptnet.{_OWNER[name]}"), name)
        globals()[name] = value  # looked up once
        return value
    if name == "compare":  # adaptnet.recipes.compare_models, imported on first use
        return importlib.import_module("adaptnet.recipes").compare_models
    raise AttributeError(f"module 'adaptnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_OWNER) | {"compare"})


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
