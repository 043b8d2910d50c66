"""Pretrained backbones: any module with a weights file, or torchvision (run directories are
``adaptnet.recipes.load_model``'s: transfer takes modules and files)."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from adaptnet import sharing
from adaptnet.errors import CheckpointCorruptError, CheckpointNotFoundError, ModelError

__all__ = ["load_backbone", "load_weights"]

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def load_backbone(source: nn.Module | str | os.PathLike, *, weights: Any = None,
                  download: bool = False, cast: bool = False) -> nn.Module:
    """A pretrained model to transfer from, with its original head.

    Args:
        source: one of
            - any ``nn.Module`` (with ``weights``, a file is loaded into it:
              e.g. ``adaptnet.models.build("small_cnn")`` plus a file from
              :func:`adaptnet.save`);
            - a torchvision model name (``"resnet18"``), when the optional
              ``vision`` extra is installed.
        weights: for a module or a torchvision name: a file (``.safetensors``
            from :func:`adaptnet.save` or elsewhere; a ``.pt``/``.pth``
            state dict, read with ``weights_only=True`` so nothing is
            unpickled), or for torchvision a weights enum or its name
            (``"IMAGENET1K_V1"``). ``None``: the module as it is (torchvision:
            random initialisation).
        download: allow torchvision to download weights missing from its
            cache (``torch.hub.get_dir()``). Off by default: nothing is
            fetched unless asked.
        cast: accept a weights file whose dtypes differ from the model's
            (converted on load); otherwise that is a ``CheckpointMismatchError``.

    Returns:
        The model, in eval mode, ready for :func:`replace_head` and
        :func:`freeze_blocks`.

    Raises:
        CheckpointMismatchError: the weights do not fit the model; every
            missing, unexpected and mis-shaped name is listed.
        CheckpointNotFoundError: no weights file there.
        ModelError: a directory (a run: :func:`adaptnet.recipes.load_model`
            builds its model), or anything else (unknown name, torchvision not installed,
            weights not downloaded and ``download=False``, a failed download).

    Example:
        >>> import tempfile, adaptnet
        >>> from adaptnet.models import build
        >>> from adaptnet.transfer import load_backbone
        >>> path = adaptnet.save(build("mlp", in_features=4), tempfile.mkdtemp() + "/m.safetensors")
        >>> load_backbone(build("mlp", in_features=4), weights=path)[0]
        Linear(in_features=4, out_features=100, bias=True)
    """
    if isinstance(source, nn.Module):
        if weights is not None:
            load_weights(source, weights, cast=cast)
        return source.eval()
    if not isinstance(source, str | os.PathLike):
        raise ModelError(f"load_backbone(): source must be a module or a torchvision name, "
                         f"got {type(source).__name__}.")
    path = Path(source)
    if path.is_dir():  # transfer reads modules and files; runs are the recipes' business
        raise ModelError(f"load_backbone(): {str(source)!r} is a directory; for the model an "
                         f"`adaptnet train` run trained, use adaptnet.recipes.load_model("
                         f"{str(source)!r}) and pass the module.")
    if path.suffix in WEIGHT_SUFFIXES or path.is_file():
        raise ModelError(f"load_backbone(): {str(source)!r} is a weights file; it needs its "
                         "architecture: load_backbone(adaptnet.models.build('<name>', ...), "
                         f"weights={str(source)!r}).")
    return _torchvision(str(source), weights, download, cast).eval()


def load_weights(model: nn.Module, weights: str | os.PathLike, *, cast: bool = False
                 ) -> nn.Module:
    """Load a weights file into ``model``: safetensors (ties restored) or a ``.pt`` state dict.

    Both go through :func:`adaptnet.load`'s checks (names, shapes, dtypes unless
    ``cast``, values of tensors the model ties).

    Raises:
        CheckpointNotFoundError: no such file.
        CheckpointCorruptError: not a state dict of tensors.
        CheckpointMismatchError: names, shapes or dtypes do not fit, or tied
            tensors get different values; all listed.

    Example:
        >>> import tempfile, torch, torch.nn as nn
        >>> from adaptnet.transfer import load_weights
        >>> path = tempfile.mkdtemp() + "/w.pt"
        >>> torch.save(nn.Linear(3, 2).state_dict(), path)  # a plain state dict (read weights_only)
        >>> load_weights(nn.Linear(3, 2), path)
        Linear(in_features=3, out_features=2, bias=True)
    """
    path = Path(weights)
    if not path.is_file():
        raise CheckpointNotFoundError(f"load_backbone(): no weights file at {str(path)!r}.")
    if path.suffix == ".safetensors":
        return sharing.load(model, path, cast=cast)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointCorruptError(
            f"load_backbone(): cannot read {str(path)!r} as a PyTorch state dict with "
            f"weights_only=True ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}). "
            "Save it with torch.save(model.state_dict(), path), or as safetensors.") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):
        raise CheckpointCorruptError(
            f"load_backbone(): {str(path)!r} holds a {type(state).__name__}, not a state dict "
            "of tensors; save it with torch.save(model.state_dict(), path).")
    odd = [f"{k} ({'meta' if v.is_meta else v.layout})" for k, v in state.items()
           if v.is_meta or v.layout != torch.strided]
    if odd:
        raise CheckpointCorruptError(
            f"load_backbone(): {str(path)!r} holds tensors without dense values: "
            f"{', '.join(odd[:4])}{' ...' if len(odd) > 4 else ''}; save the weights "
            "themselves (dense tensors: .to_dense(), or a model materialised off the meta "
            "device).")
    return sharing.load(model, state, cast=cast, source=path)


def _torchvision(name: str, weights: Any, download: bool, cast: bool) -> nn.Module:
    try:
        import torchvision.models as tvm
    except Exception as e:
        raise ModelError(
            f"load_backbone(): {name!r} is not a run directory, and torchvision, which "
            f"builds named models, is not usable here ({type(e).__name__}: {e}). Install the "
            "vision extra (pip install 'adaptnet[vision]', a torchvision matching your torch), "
            "or pass an nn.Module.") from None
    try:
        builder = tvm.get_model_builder(name)
    except ValueError:
        close = difflib.get_close_matches(name, tvm.list_models(), n=3)
        raise ModelError(f"load_backbone(): {name!r} is neither a run directory nor a "
                         "torchvision model" + (f"; did you mean {', '.join(close)}?" if close
                                                else "; torchvision.models.list_models() lists "
                                                "them.")) from None
    if weights is None:
        return builder(weights=None)
    if isinstance(weights, (str, os.PathLike)) and Path(weights).suffix in WEIGHT_SUFFIXES:
        return load_weights(builder(weights=None), weights, cast=cast)
    try:
        enum = tvm.get_model_weights(name)
        chosen = enum[weights] if isinstance(weights, str) else enum(weights)
    except (KeyError, ValueError):
        options = ", ".join(w.name for w in tvm.get_model_weights(name))
        raise ModelError(f"load_backbone(): {name} has no weights {weights!r}; it has "
                         f"{options}, or give a local file.") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(chosen.url).path).name
    if not cached.is_file() and not download:
        raise ModelError(f"load_backbone(): the {name} weights {chosen.name} are not in "
                         f"torchvision's cache ({cached}), and nothing is downloaded unless you "
                         "ask: pass download=True, or fetch the file elsewhere and pass "
                         "weights=<the file>.")
    try:
        return builder(weights=chosen, progress=False)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise ModelError(f"load_backbone(): could not get the {name} weights {chosen.name} "
                         f"from {chosen.url} ({type(e).__name__}: {e}). Fetch the file "
                         f"elsewhere, put it at {cached} or pass weights=<the file>.") from None
