"""Old names of renamed arguments and attributes: they work for one release, with a warning.

Each warning reads ``adaptnet.<old> is now adaptnet.<new>``, which the test suite
turns into an error, so nothing in the project uses an old name.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

GOES = "the old name goes in adaptnet 0.2."


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``adaptnet.<old>`` is now ``adaptnet.<new>`` (by default at the caller's
    caller: the user's line that used the old name)."""
    warnings.warn(f"adaptnet.{old} is now adaptnet.{new}; {GOES}", DeprecationWarning,
                  stacklevel=stacklevel)


def renamed_arguments(owner: str, **new_of: str) -> Callable:
    """Accept each old keyword in ``new_of`` (old → new) for ``owner``, with a warning.

    Giving both the old and the new keyword is a TypeError, as for any argument
    given twice.
    """
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            for old, new in new_of.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{owner}() got {new}= and {old}=, its old name; give "
                                        f"{new}= only.")
                    warn_renamed(f"{owner}({old}=)", f"{owner}({new}=)")
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return inner
    return wrap


def renamed_attribute(owner: str, old: str, new: str) -> property:
    """A read-only property ``old`` that returns ``new``, with a warning."""
    def get(self: Any) -> Any:
        warn_renamed(f"{owner}.{old}", f"{owner}.{new}")
        return getattr(self, new)
    return property(get, doc=f"Deprecated: use ``{new}``.")
