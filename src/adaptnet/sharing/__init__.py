"""Weight sharing as checked, persistent data: tie, share, account, freeze, save.

See :func:`tie` for the entry point and docs/sharing.md for a tour.
"""

from adaptnet.sharing._discover import TieGroup, TieMember, ties
from adaptnet.sharing._freeze import FreezeReport, freeze, unfreeze
from adaptnet.sharing._groups import param_groups
from adaptnet.sharing._persist import load, save
from adaptnet.sharing._share import share
from adaptnet.sharing._slots import Slot, group_by_tensor, iter_slots
from adaptnet.sharing._summary import ModuleRow, Summary, summary
from adaptnet.sharing._tie import assert_tied, retie, tie, untie

__all__ = [
    "FreezeReport",
    "ModuleRow",
    "Slot",
    "Summary",
    "TieGroup",
    "TieMember",
    "assert_tied",
    "freeze",
    "group_by_tensor",
    "iter_slots",
    "load",
    "param_groups",
    "retie",
    "save",
    "share",
    "summary",
    "tie",
    "ties",
    "unfreeze",
    "untie",
]
