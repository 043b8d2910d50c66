"""adaptnet: dynamic neural networks with shared and tied weights, on PyTorch.

Importing adaptnet changes nothing: no environment variables, thread
settings, global seeds or downloads.
"""

from adaptnet import errors, sharing
from adaptnet.errors import (
    AdaptnetError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
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
    "AdaptnetError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "FreezeReport",
    "ModuleRow",
    "SelectionError",
    "ShareError",
    "Summary",
    "TieBrokenError",
    "TieError",
    "TieGroup",
    "TieMember",
    "__version__",
    "assert_tied",
    "errors",
    "freeze",
    "load",
    "param_groups",
    "retie",
    "save",
    "share",
    "sharing",
    "summary",
    "tie",
    "ties",
    "unfreeze",
    "untie",
]
