"""Typed exceptions raised for user input.

Every message says what was given, what was expected, and how to fix it. Each
class also derives from the closest built-in exception, so code that catches
``ValueError`` or ``FileNotFoundError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "AdaptnetError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "ConfigError",
    "DataError",
    "DatasetNotFoundError",
    "DynamicError",
    "InitError",
    "ModelError",
    "NonFiniteError",
    "PerSampleError",
    "RecipeError",
    "ResumeError",
    "RoutingError",
    "RunDirError",
    "RunLockedError",
    "SelectionError",
    "ShareError",
    "TieBrokenError",
    "TieError",
]


class AdaptnetError(Exception):
    """Base class of every error adaptnet raises on purpose."""


class TieError(AdaptnetError, ValueError):
    """A tie cannot be made: unknown path, shape/dtype/device mismatch, bad transform."""


class TieBrokenError(AdaptnetError, RuntimeError):
    """A declared tie no longer holds (the tensors are not one object any more)."""


class ShareError(AdaptnetError, ValueError):
    """Modules cannot be shared: unknown path, different structure, bad strategy."""


class DynamicError(AdaptnetError, ValueError):
    """A dynamic construct got a bad argument (max_steps, threshold, order, shapes)."""


class RoutingError(DynamicError):
    """A per-sample routing call got a bad decision tensor, inputs, or path outputs."""


class ConfigError(AdaptnetError, ValueError):
    """A training configuration is invalid: every problem is listed, one per line."""


class NonFiniteError(AdaptnetError, FloatingPointError):
    """Training produced a NaN or infinite loss or gradient; the weights were not updated.

    Attributes:
        step: the optimizer step that failed (0-based).
        parameters: names of the parameters whose gradient was not finite.
        checkpoint: the last good checkpoint, if one was written.
    """

    def __init__(self, message: str, *, step: int, parameters: tuple[str, ...],
                 checkpoint: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.parameters = parameters
        self.checkpoint = checkpoint


class InitError(AdaptnetError, ValueError):
    """An initialisation rule is malformed, does not fit a tensor, or conflicts on a tie."""


class PerSampleError(DynamicError):
    """``@per_sample`` cannot run a function: unsupported code, or a per-sample value it
    cannot batch (a tensor used as a Python bool, paths that disagree in shape).

    Attributes:
        filename: the user's file.
        lineno: the line in it.
    """

    def __init__(self, message: str, *, filename: str = "", lineno: int = 0) -> None:
        super().__init__(message)
        self.filename = filename
        self.lineno = lineno


class SelectionError(AdaptnetError, ValueError):
    """A name pattern (freeze, param_groups) matched nothing or was malformed."""


class CheckpointError(AdaptnetError):
    """Base class of the errors raised by :func:`adaptnet.save` and :func:`adaptnet.load`."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


class CheckpointCorruptError(CheckpointError, ValueError):
    """The file is truncated, is not safetensors, or has a malformed tie manifest."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The file does not fit the model: missing/unexpected keys, shapes, tied values.

    Attributes:
        missing: names the model has and the file lacks.
        unexpected: names the file has and the model lacks.
        problems: every other mismatch, one line each (shapes, tied values).
    """

    def __init__(
        self,
        message: str,
        *,
        missing: tuple[str, ...] = (),
        unexpected: tuple[str, ...] = (),
        problems: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.problems = problems


class DataError(AdaptnetError, ValueError):
    """A dataset cannot be built: unknown name, bad option, unreadable or malformed file."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A built-in dataset's files are not on disk; the message says how to get them."""


class ModelError(AdaptnetError, ValueError):
    """A model cannot be built: unknown builder or bad builder arguments."""


class RecipeError(ConfigError):
    """A recipe is invalid: every problem is listed with its path in the recipe."""


class RunDirError(AdaptnetError, FileNotFoundError):
    """A directory is not an adaptnet run directory (no ``config.yaml``/checkpoint)."""


class RunLockedError(AdaptnetError, RuntimeError):
    """Another process is training into the run directory (it holds the directory's lock)."""


class ResumeError(AdaptnetError, ValueError):
    """A run cannot be resumed: its recipe or model differs, or no checkpoint can be read.

    Nothing in the run directory was changed.
    """
