"""adaptnet: dynamic neural networks with shared and tied weights, on PyTorch.

Importing adaptnet changes nothing: no environment variables, thread
settings, global seeds or downloads.
"""

from adaptnet import dynamic, errors, sharing
from adaptnet.dynamic import (
    ACTHalting,
    AdaptiveDepth,
    DepthResult,
    MoE,
    MoEResult,
    ThresholdHalting,
    branch,
    switch,
)
from adaptnet.errors import (
    AdaptnetError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    DynamicError,
    RoutingError,
    SelectionError,
    ShareError,
    TieBrokenError,
    TieError,
)
from adaptnet.sharing import (
    FreezeReport,
    ModuleRow,
    Summary,
    TieGroup,
    TieMember,
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

__version__ = "0.1.0"

__all__ = [
    "ACTHalting",
    "AdaptiveDepth",
    "AdaptnetError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "DepthResult",
    "DynamicError",
    "FreezeReport",
    "MoE",
    "MoEResult",
    "ModuleRow",
    "RoutingError",
    "SelectionError",
    "ShareError",
    "Summary",
    "ThresholdHalting",
    "TieBrokenError",
    "TieError",
    "TieGroup",
    "TieMember",
    "__version__",
    "assert_tied",
    "branch",
    "dynamic",
    "errors",
    "freeze",
    "load",
    "param_groups",
    "retie",
    "save",
    "share",
    "sharing",
    "summary",
    "switch",
    "tie",
    "ties",
    "unfreeze",
    "untie",
]
