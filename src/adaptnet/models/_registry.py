"""The zoo's index: every builder by name, and ``build`` with checked arguments."""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from adaptnet.errors import ModelError
from adaptnet.models import (
    _adaptive,
    _baselines,
    _decoder,
    _shared,
    _textbook,
    _transformer,
    _vision,
)

__all__ = ["MODELS", "build", "describe"]

#: The zoo's builders by name (``model.name`` in a recipe).
MODELS: dict[str, Callable[..., nn.Module]] = {
    # the textbook examples
    "branch_net": _textbook.branch_net,
    "two_input_net": _textbook.two_input_net,
    "adaptive_mlp": _textbook.adaptive_mlp,
    "small_cnn": _textbook.small_cnn,
    "reused_layer": _textbook.reused_layer,
    "shared_scale_net": _textbook.shared_scale_net,
    # MNIST-1D baselines
    "logreg": _baselines.logreg,
    "mlp": _baselines.mlp,
    "cnn1d": _baselines.cnn1d,
    "gru_classifier": _baselines.gru_classifier,
    # shared weights
    "siamese": _shared.siamese,
    "tied_autoencoder": _shared.tied_autoencoder,
    "lstm_lm": _shared.lstm_lm,
    "albert_encoder": _transformer.albert_encoder,
    # adaptive computation
    "universal_transformer": _transformer.universal_transformer,
    "pondernet_gru": _adaptive.pondernet_gru,
    "early_exit_cnn": _adaptive.early_exit_cnn,
    "sdn_resnet": _adaptive.sdn_resnet,
    "moe_mlp": _adaptive.moe_mlp,
    # per-token adaptive depth
    "decoder": _decoder.decoder,
    "adaptive_depth_mlp": _adaptive.adaptive_depth_mlp,
    # torchvision's (the vision extra)
    "resnet18": _vision.resnet18,
}


def describe(name: str) -> str:
    """The builder's one-line description, as plain text (no reST markup).

    Example:
        >>> from adaptnet.models import describe
        >>> describe("mlp")
        'A ReLU MLP with layers linear layers (the MNIST-1D baseline: 3 layers of width 100).'
    """
    line = (inspect.getdoc(_builder(name)) or "").splitlines()[0]
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", line).replace("``", "")


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ModelError(f"unknown model {name!r}.{hint} The zoo has: {', '.join(MODELS)}; "
                         "`adaptnet models` lists them.")
    return MODELS[name]


def build(name: str, *, seed: int | None = None, **kwargs: Any) -> nn.Module:
    """Build zoo model ``name`` with keyword arguments ``kwargs``.

    ``seed`` draws the initial weights from ``torch.manual_seed(seed)`` inside
    a forked random state, so the same seed gives the same weights and the
    caller's random state is left as it was; without it the weights come from
    the global random state.

    Raises:
        ModelError: unknown model, unknown argument (with the accepted ones), or
            an argument the builder rejects.

    Example:
        >>> import adaptnet.models
        >>> net = adaptnet.models.build("lstm_lm", vocab_size=100, embed_size=16, hidden=16)
        >>> adaptnet.summary(net).unique < adaptnet.summary(net).per_use
        True
    """
    fn = _builder(name)
    params = inspect.signature(fn).parameters
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise ModelError(f"model {name!r}: unknown argument(s) {', '.join(unknown)}; it accepts "
                         f"{', '.join(params)}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or
                             not 0 <= seed < 2**63):
        raise ModelError(f"model {name!r}: seed must be a non-negative int, got {seed!r}.")
    try:
        if seed is None:
            return fn(**kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return fn(**kwargs)
    except ModelError:
        raise
    except (TypeError, ValueError, RuntimeError, ArithmeticError, IndexError) as e:
        shown = {k: (v if len(repr(v)) <= 40 else f"{repr(v)[:37]}...") for k, v in kwargs.items()}
        raise ModelError(f"model {name!r} with {shown}: {type(e).__name__}: "
                         f"{str(e)[:300]}") from None
