"""adaptnet: dynamic neural networks with shared and tied weights, on PyTorch.

Importing adaptnet changes nothing: no environment variables, thread
settings, global seeds or downloads. Every subpackage, and every name exported
here, is imported on first use (``adaptnet.fit`` imports ``adaptnet.train``), so
``import adaptnet`` stays cheap (it does not import torch) and
``adaptnet.models.build(...)`` still works.
"""

import importlib
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time __getattr__ imports them
    from adaptnet import (
        data,
        dynamic,
        errors,
        hf,
        init,
        models,
        recipes,
        report,
        sharing,
        study,
        train,
        transfer,
    )
    from adaptnet.dynamic import (
        AdaptiveDepth,
        EarlyExit,
        MixtureOfDepths,
        MixtureOfRecursions,
        MoE,
        TokenEarlyExit,
        branch,
        calibrate_exits,
        count_macs,
        generate,
        per_sample,
        route_topk,
        switch,
    )
    from adaptnet.init import init_report, initialize
    from adaptnet.sharing import (
        assert_tied,
        freeze,
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
    from adaptnet.study import compare_models as compare
    from adaptnet.train import TrainConfig, evaluate, fit, shard

# The everyday verbs and classes, each imported from its subpackage on first use, so that
# `import adaptnet` (and the command line's --help) does not pay for importing torch.
_FROM = {
    "dynamic": ("AdaptiveDepth", "EarlyExit", "MixtureOfDepths", "MixtureOfRecursions", "MoE",
        "TokenEarlyExit", "branch", "calibrate_exits", "count_macs", "generate", "per_sample",
        "route_topk", "switch"),
    "init": ("init_report", "initialize"),
    "sharing": ("assert_tied", "freeze", "load", "param_groups", "retie", "save", "share",
        "summary", "tie", "ties", "unfreeze", "untie"),
    "train": ("TrainConfig", "evaluate", "fit", "shard"),
}
_OWNER = {name: module for module, names in _FROM.items() for name in names}
# Top-level names until 0.1, now only in their subpackage: they still resolve, with a
# DeprecationWarning naming the new place (removed in 0.2).
_MOVED = {
    "dynamic": ("ACTHalting", "Calibration", "DepthResult", "DynamicResult", "ExitResult",
        "HaltingPolicy", "MacCount", "MoEResult", "PonderNetHalting", "ThresholdHalting",
        "calibrate_temperatures"),
    "errors": ("AdaptnetError", "CheckpointCorruptError", "CheckpointError",
        "CheckpointMismatchError", "CheckpointNotFoundError", "ConfigError", "DynamicError",
        "InitError", "NonFiniteError", "PerSampleError", "ResumeError", "RoutingError",
        "RunLockedError", "SelectionError", "ShareError", "TieBrokenError", "TieError"),
    "init": ("InitReport", "InitRow", "Scheme", "parse_scheme"),
    "sharing": ("FreezeReport", "ModuleRow", "Slot", "Summary", "TieGroup", "TieMember",
        "group_by_tensor", "iter_slots"),
    "train": ("FitResult", "ShardPlan"),
}
_WAS = {name: module for module, names in _MOVED.items() for name in names}

__version__ = "0.1.0"

_LAZY = ("data", "dynamic", "errors", "hf", "init", "models", "recipes", "report", "sharing",
         "study", "train", "transfer")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"adaptnet.{name}")  # also binds adaptnet.<name>
    if name in _OWNER:
        value = getattr(importlib.import_module(f"adaptnet.{_OWNER[name]}"), name)
        globals()[name] = value  # looked up once
        return value
    if name in _WAS:
        warnings.warn(f"adaptnet.{name} is now adaptnet.{_WAS[name]}.{name}; the top-level name "
                      "goes in adaptnet 0.2.", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(f"adaptnet.{_WAS[name]}"), name)
    if name == "compare":  # adaptnet.study.compare_models, imported on first use
        return importlib.import_module("adaptnet.study").compare_models
    raise AttributeError(f"module 'adaptnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_OWNER) | {"compare"})


__all__ = ["__version__", "compare", *_OWNER]  # the subpackages: adaptnet.<name>
