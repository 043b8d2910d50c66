"""Refusing ``torch.jit.trace``: a trace would freeze one batch's data-dependent paths."""

from __future__ import annotations

import torch

from adaptnet.errors import DynamicError


def refuse_tracing(what: str) -> None:
    """Raise when called under ``torch.jit.trace`` (also how ONNX export traces by default).

    A trace records the operations one example batch ran, so the paths, exits
    or depths that batch took would be replayed for every later input.
    """
    if torch.jit.is_tracing():
        raise DynamicError(
            f"{what} is being traced (torch.jit.trace, or torch.onnx.export by tracing). A "
            "trace records the paths the example batch took and would replay them for every "
            "input. Deploy the eager model or torch.compile it; docs/dynamic.md lists the "
            "deployment paths that work.")
