"""Finding and replacing a classifier head."""

from __future__ import annotations

from torch import nn

from adaptnet._tree import get_module, set_module, walk
from adaptnet.dynamic import EarlyExit
from adaptnet.errors import ModelError
from adaptnet.sharing import ties
from adaptnet.transfer._blocks import body_prefix

__all__ = ["find_head", "replace_head"]

HEAD_NAMES = ("fc", "classifier", "head", "heads")  # torchvision, timm and the zoo's names


def find_head(model: nn.Module) -> str:
    """The path of the model's final ``nn.Linear`` classifier.

    Looked for, in order: a child named ``fc`` (ResNet), ``classifier`` (VGG,
    MobileNet, EfficientNet: its last ``Linear``), ``head`` or ``heads``
    (the zoo's readouts, ViT), through lone wrappers; else the last
    ``nn.Linear`` the model registers (the zoo's ``nn.Sequential`` models).

    Raises:
        ModelError: no ``nn.Linear``, or a model with several heads (early exits).

    Example:
        >>> import torch.nn as nn, adaptnet.transfer as T
        >>> T.find_head(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 10)))
        '2'
    """
    modules = list(walk(model))
    exits = [p for p, m in modules if isinstance(m, EarlyExit)]
    if exits:
        heads = [p for p, m in modules if isinstance(m, nn.Linear) and
                 any(p.startswith(e + ".") for e in exits)]
        raise ModelError(f"find_head(): {type(model).__name__} has several heads (early exits "
                         f"at {', '.join(exits)}): {', '.join(heads)}. Replace each with "
                         "replace_head(model, num_classes, path=...).")
    paths = dict(modules)
    for prefix in dict.fromkeys(("", body_prefix(model))):
        for name in HEAD_NAMES:
            found = paths.get(prefix + name)
            if isinstance(found, nn.Linear):
                return prefix + name
            if found is not None:
                inside = [p for p, m in walk(found, prefix + name) if isinstance(m, nn.Linear)]
                if inside:
                    return inside[-1]
    linear = [p for p, m in modules if isinstance(m, nn.Linear)]
    if not linear:
        raise ModelError(f"find_head(): {type(model).__name__} has no nn.Linear layer to treat "
                         "as its classifier; give the head's path: replace_head(model, "
                         "num_classes, path='...').")
    return linear[-1]


def replace_head(model: nn.Module, num_classes: int, *, path: str | None = None) -> nn.Linear:
    """Put a new ``nn.Linear(in_features, num_classes)`` where the classifier was.

    The new layer keeps the old one's input width, bias, dtype and device, is
    initialised as PyTorch initialises ``nn.Linear`` (from the global seed),
    and is trainable whatever the rest of the model is: the textbook "freeze
    everything, then replace ``fc``" works unchanged.

    Args:
        num_classes: outputs of the new head.
        path: the head's module path; found by :func:`find_head` when left out.

    Returns:
        The new head (also reachable at ``path``).

    Raises:
        ModelError: ``path`` is not an ``nn.Linear``, no head was found, or the
            head's weight is tied to another parameter (an LM's output layer
            tied to its embedding: untie it first, knowingly).

    Example:
        >>> import torch.nn as nn, adaptnet.transfer as T
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 10))
        >>> T.replace_head(net, 3)
        Linear(in_features=8, out_features=3, bias=True)
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"replace_head(): num_classes={num_classes!r}; expected a positive "
                         "integer.")
    if path is None:
        path = find_head(model)
    try:
        old = get_module(model, path)
    except AttributeError:
        linear = [p for p, m in walk(model) if isinstance(m, nn.Linear)]
        raise ModelError(f"replace_head(): {type(model).__name__} has no module {path!r}; its "
                         f"nn.Linear layers are {', '.join(linear) or 'none'}.") from None
    if not isinstance(old, nn.Linear):
        raise ModelError(f"replace_head(): {path!r} is a {type(old).__name__}, not an "
                         "nn.Linear; give the path of the final Linear layer.")
    tied = [n for g in ties(model) if any(n.startswith(path + ".") for n in g.names)
            for n in g.names if not n.startswith(path + ".")]
    if tied:
        raise ModelError(f"replace_head(): {path}.weight is tied to {', '.join(tied)}; a new "
                         "head would silently end that tie. Untie it first "
                         f"(adaptnet.untie(model, '{path}.weight')) if that is what you want.")
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    set_module(model, path, new)
    return new
