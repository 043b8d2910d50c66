"""Early exits on an unmodified backbone: cut its traced graph at named modules.

``attach_exits(resnet, at=["layer1", "layer2", "layer3"], example=x)`` traces
the backbone with ``torch.fx``, cuts the graph right after each named module,
and returns an :class:`adaptnet.EarlyExit` whose stages are the pieces (they
hold the backbone's own modules: no weight is copied) and whose early heads
pool and classify each cut's features. The last stage ends with the
backbone's own classifier, so with no early exit taken the network computes
exactly what the backbone does. Routing is EarlyExit's: exact per sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module

from adaptnet._renamed import renamed_arguments
from adaptnet.dynamic import EarlyExit
from adaptnet.errors import ModelError

__all__ = ["attach_exits"]


@renamed_arguments("transfer.attach_exits", thresholds="threshold")
def attach_exits(backbone: nn.Module, at: Sequence[str], *, example: torch.Tensor,
                 heads: Sequence[nn.Module] | None = None,
                 threshold: float | Sequence[float] | None = None,
                 weights: Sequence[float] | None = None) -> EarlyExit:
    """An early-exit network made of ``backbone``, with an exit after each module in ``at``.

    Args:
        backbone: any module ``torch.fx`` can trace (torchvision's ResNets,
            MobileNets, a model of your own), returning logits.
        at: module paths, in the order the forward pass calls them; an exit
            reads each one's output. Between two cuts exactly one tensor may
            flow (true between ResNet stages; not inside a residual block).
        example: an input batch, to size the default heads.
        heads: one classifier per path in ``at``; default: global average
            pooling, flatten and ``nn.Linear(channels, classes)``, ``classes``
            read from the backbone's output on ``example``.
        threshold, weights: as :class:`adaptnet.EarlyExit` takes them.

    Returns:
        An :class:`adaptnet.EarlyExit`; ``stages`` hold the backbone's modules
        (shared, not copied), ``heads[-1]`` is an identity (the backbone's own
        classifier ends the last stage).

    Raises:
        ModelError: a path that is not a submodule, called more than once or
            out of order; a backbone ``torch.fx`` cannot trace; a cut that more
            than one tensor crosses, or whose output is not one tensor; heads of
            the wrong number; an example the backbone does not take; a backbone
            that does not return ``(B, classes)`` logits.

    Example:
        >>> import torch, torch.nn as nn
        >>> from adaptnet.transfer import attach_exits
        >>> backbone = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Conv1d(4, 8, 3),
        ...                          nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        ...                          nn.Linear(8, 3))
        >>> net = attach_exits(backbone, ["1", "3"], example=torch.randn(2, 1, 16),
        ...                    threshold=0.9)
        >>> len(net.heads), net(torch.randn(5, 1, 16)).output.shape
        (3, torch.Size([5, 3]))
    """
    at = [at] if isinstance(at, str) else list(at) if isinstance(at, list | tuple) else at
    if not isinstance(at, list) or not at or not all(isinstance(p, str) and p for p in at):
        raise ModelError(f"attach_exits(): at must name one or more submodules, e.g. "
                         f"['layer1', 'layer2'], got {at!r}.")
    modules = dict(backbone.named_modules())
    missing = [p for p in at if p not in modules]
    if missing:
        children = ", ".join(n for n, _ in backbone.named_children())
        raise ModelError(f"attach_exits(): {type(backbone).__name__} has no submodule "
                         f"{', '.join(map(repr, missing))}; its children are {children}.")
    if heads is not None and len(heads) != len(at):
        raise ModelError(f"attach_exits(): {len(at)} exit point(s) need {len(at)} head(s), "
                         f"got {len(heads)}.")
    try:
        graph = fx.GraphModule(backbone, _Tracer(at).trace(backbone))
    except Exception as e:  # fx raises many types for code it cannot trace
        raise ModelError(f"attach_exits(): torch.fx cannot trace {type(backbone).__name__} "
                         f"({type(e).__name__}: {str(e)[:200]}); give exits on a module "
                         "whose forward has no data-dependent Python control flow, or build "
                         "an adaptnet.EarlyExit from its stages.") from None
    segment = _segments(graph, at)
    split = split_module(graph, backbone, lambda node: segment[node.name])
    stages = _stages(split, len(at) + 1, backbone)
    features = _features(stages, example, at)
    if heads is None:
        heads = _default_heads(features)
    return EarlyExit(stages, [*heads, nn.Identity()], threshold=threshold, weights=weights)


def _features(stages: list[nn.Module], example: object, at: list[str]) -> list[torch.Tensor]:
    """Each stage's output on ``example`` (eval mode, no gradients; modes put back after):
    tensors, batched, ending in ``(B, classes)`` logits.

    Raises:
        ModelError: an example that is not a batch the backbone takes (naming what
            the backbone raised), a cut whose output is not one tensor, or a
            backbone that does not return ``(B, classes)`` logits.
    """
    if not isinstance(example, torch.Tensor) or example.dim() < 2:
        got = f"shape {tuple(example.shape)}" if isinstance(example, torch.Tensor) else \
            type(example).__name__
        raise ModelError(f"attach_exits(): example must be an input batch the backbone takes, "
                         f"e.g. a few training samples; got {got}.")
    was = [s.training for s in stages]
    features, h = [], example
    try:
        with torch.no_grad():
            for s in stages:
                s.eval()
            for i, s in enumerate(stages):
                try:
                    h = s(h)
                except (RuntimeError, ValueError, TypeError, IndexError) as e:
                    where = "the backbone's start" if i == 0 else f"{at[i - 1]!r}"
                    raise ModelError(
                        f"attach_exits(): the example ({tuple(example.shape)}, "
                        f"{example.dtype}) does not run through the backbone from {where}: "
                        f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}. Give "
                        "an input batch of the shape and dtype the backbone takes.") from None
                if not isinstance(h, torch.Tensor):
                    what = f"the exit at {at[i]!r}" if i < len(at) else "the backbone"
                    raise ModelError(f"attach_exits(): {what} returns a {type(h).__name__}, "
                                     "not one tensor; cut where one tensor flows (an LSTM "
                                     "returns (output, state): cut after it, or wrap it).")
                features.append(h)
    finally:
        for s, w in zip(stages, was, strict=True):
            s.train(w)
    if features[-1].dim() != 2 or features[-1].shape[0] != example.shape[0]:
        raise ModelError(f"attach_exits(): the backbone returns {tuple(features[-1].shape)}, "
                         f"not (B, classes) logits for a batch of {example.shape[0]}; every "
                         "exit must predict what the backbone predicts.")
    return features


class _Tracer(fx.Tracer):
    """Traces into every module but the cut points, which stay whole (one call each)."""

    def __init__(self, cuts: list[str]) -> None:
        super().__init__()
        self.cuts = set(cuts)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.cuts or super().is_leaf_module(m, qualname)


def _segments(graph: fx.GraphModule, at: list[str]) -> dict[str, int]:
    """Each node's stage: the number of cut modules called before it (itself included)."""
    calls = [n for n in graph.graph.nodes if n.op == "call_module" and n.target in at]
    order = [n.target for n in calls]
    if order != at:
        again = sorted({t for t in order if order.count(t) > 1})
        why = f"{', '.join(again)} called more than once" if again else \
            f"the forward pass calls them in the order {order}"
        raise ModelError(f"attach_exits(): cannot cut at {at}: {why}. Name modules called "
                         "once each, in the order they run.")
    segment, stage = {}, 0
    for node in graph.graph.nodes:
        if node.op in ("placeholder", "output"):
            segment[node.name] = 0 if node.op == "placeholder" else stage
            continue
        segment[node.name] = stage
        if node.op == "call_module" and node.target in at:
            stage += 1
    return segment


def _stages(split: fx.GraphModule, count: int, backbone: nn.Module) -> list[nn.Module]:
    """The split's pieces in order, once each is checked to pass one tensor on.

    A piece that also reads the backbone's own parameters or tensors (a ViT's
    class token and position embedding, root-level ``nn.Parameter``s) gets them
    bound (:class:`_Bound`): the same objects, so training the early-exit
    network trains the backbone's.
    """
    calls = [n for n in split.graph.nodes if n.op == "call_module"]
    if len(calls) != count:
        raise ModelError(f"attach_exits(): the cuts made {len(calls)} pieces, not {count}; "
                         "an exit point's output may not reach the classifier.")
    stages, flowing = [], next(n for n in split.graph.nodes if n.op == "placeholder")
    for node in calls:
        data = [a for a in node.args if not (isinstance(a, fx.Node) and a.op == "get_attr")]
        if data != [flowing] or node.kwargs:
            raise ModelError(
                f"attach_exits(): more than one value crosses the cut before {node.target} "
                "(a skip connection around the exit point); cut where one tensor flows, e.g. "
                "between a ResNet's layer1..layer4.")
        piece = getattr(split, node.target)
        if len(node.args) > 1:
            piece = _Bound(piece, [None if a is flowing else
                                   _attr(backbone, a.target) for a in node.args])
        stages.append(piece)
        flowing = node
    return stages


def _attr(root: nn.Module, qualname: str) -> torch.Tensor:
    *path, name = qualname.split(".")
    return getattr(root.get_submodule(".".join(path)), name)


class _Bound(nn.Module):
    """A piece of the backbone with the parameters and tensors it reads bound to it."""

    def __init__(self, piece: nn.Module, args: list[torch.Tensor | None]) -> None:
        super().__init__()
        self.piece, self.slots = piece, []
        for i, value in enumerate(args):
            name = None if value is None else f"bound_{i}"
            if isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            elif value is not None:
                self.register_buffer(name, value, persistent=False)
            self.slots.append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.piece(*(x if name is None else getattr(self, name) for name in self.slots))


def _default_heads(features: list[torch.Tensor]) -> list[nn.Module]:
    """Pool, flatten, classify: sized from each cut's output on the example."""
    classes, heads = features[-1].shape[-1], []
    for f in features[:-1]:
        if f.dim() not in (3, 4):
            raise ModelError(f"attach_exits(): the default head pools (B, C, L) or "
                             f"(B, C, H, W) features, got {tuple(f.shape)}; give heads=.")
        pool = nn.AdaptiveAvgPool2d(1) if f.dim() == 4 else nn.AdaptiveAvgPool1d(1)
        heads.append(nn.Sequential(pool, nn.Flatten(), nn.Linear(f.shape[1], classes)))
    return heads
