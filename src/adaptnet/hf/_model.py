"""Per-token adaptivity on an unmodified Hugging Face causal LM.

:class:`AdaptedLM` drives the model's own modules (embedding, decoder layers,
final norm, head) with adaptnet's token engine: each layer becomes an
:class:`~adaptnet.hf.HFLayer`, wrapped by the construct asked for (Mixture-of-
Depths on chosen layers, per-token early exit over the stack, or a recursive
stack made from the layers with Mixture-of-Recursions routing). The model's
classes, weights and ``state_dict`` are untouched; what adaptnet adds (routers,
predictors, exit classifiers, the recursive stack) is saved apart, in a
safetensors file that records the construct and a fingerprint of the base.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from adaptnet._io import atomic_path
from adaptnet.dynamic import (
    MixtureOfDepths,
    MixtureOfRecursions,
    TokenEarlyExit,
    TokenModel,
)
from adaptnet.errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    ModelError,
)
from adaptnet.hf._family import Parts, parts
from adaptnet.hf._layer import HFLayer

__all__ = ["AdaptedLM", "ExitCalibration", "calibrate_exit", "early_exit", "load",
           "mixture_of_depths", "recursive", "wrap"]

FORMAT = "adaptnet.hf/1"


class AdaptedLM(TokenModel):
    """A transformers causal LM run by adaptnet's token engine (a
    :class:`~adaptnet.dynamic.TokenModel`): ``lm(ids, mask=, cache=)`` returns a
    :class:`~adaptnet.dynamic.DecoderResult`; ``adaptnet.generate(lm, ...)`` decodes it
    with a KV cache at any batch size. Made by :func:`wrap`, :func:`mixture_of_depths`,
    :func:`early_exit`, :func:`recursive` or :func:`load`.

    Attributes:
        base: the model, unchanged (its weights are this module's too).
        spec: the construct and its arguments, as saved with the adapters.

    Example:
        >>> import torch, adaptnet.hf
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> _ = torch.manual_seed(0)
        >>> config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        ...     max_position_embeddings=64)
        >>> model = LlamaForCausalLM(config).eval()
        >>> ids = torch.randint(0, 50, (2, 6))
        >>> lm = adaptnet.hf.mixture_of_depths(model, capacity=0.5)  # built by the constructors
        >>> isinstance(lm, adaptnet.hf.AdaptedLM), lm.base is model
        (True, True)
    """

    def __init__(self, model: nn.Module, found: Parts, blocks: list[nn.Module], spec: dict,
                 context: int | None, rule: str | None = None) -> None:
        super().__init__()
        self.base, self._parts, self.spec = model, found, spec
        self.vocab_size, self.exits = found.embed.num_embeddings, rule is not None
        self.context = _context(context, found.context)
        if found.window is not None and self.context > found.window:
            raise ModelError(f"adaptnet.hf: this {found.family} model's layers attend within a "
                             f"sliding window of {found.window} tokens, and adaptnet runs full "
                             f"causal attention; give context <= {found.window} (the two agree "
                             "there), or build the model with sliding_window=None.")
        if self.exits:  # one stack whose every exit is the model's own readout
            blocks = [TokenEarlyExit(blocks, self.readout, spec["threshold"], rule,
                                     found.d_model)]
        self.blocks = nn.ModuleList(blocks)
        ours = {id(p) for p in model.parameters()}
        w = next(model.parameters())
        for p in self.parameters():  # what adaptnet added: the base model's device and dtype
            if id(p) not in ours:
                p.data = p.data.to(device=w.device, dtype=w.dtype)
        self.train(model.training)  # in the base model's mode, as it was given

    def embed_ids(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The model's token embedding (plus its learned position embedding, GPT-2's)."""
        p = self._parts
        h = p.embed(ids)
        if p.positions is not None:
            h = h + p.positions(positions)
        return h if p.drop is None else p.drop(h)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """The model's final norm and output layer."""
        return self._parts.head(self._parts.norm(h))

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """What adaptnet added to the model (routers, predictors, exit classifiers, the
        recursive stack), by name: what :meth:`save_adapters` writes."""
        ours = {id(t) for t in self.base.state_dict(keep_vars=True).values()}
        return {name: t for name, t in self.state_dict(keep_vars=True).items()
                if not name.startswith("base.") and id(t) not in ours}

    def save_adapters(self, path: str | Path) -> Path:
        """Write :meth:`adapter_state` to a safetensors file (atomically), with the construct
        (:attr:`spec`) and the base model's fingerprint; :func:`load` puts it on a copy of
        the same base model."""
        state = {name: t.detach().contiguous().cpu() for name, t in self.adapter_state().items()}
        meta = {"format": FORMAT, "spec": json.dumps(self.spec, sort_keys=True),
                "base": fingerprint(self.base)}
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=meta)
        return path


def _context(context: object, longest: int) -> int:
    if context is None:
        return int(longest)
    if isinstance(context, bool) or not isinstance(context, int) or not 1 <= context <= longest:
        raise ConfigError(f"adaptnet.hf: context is the longest sequence the cache holds, a "
                          f"whole number in [1, {longest}] (the model's), got {context!r}.")
    return context


def fingerprint(model: nn.Module) -> str:
    """sha256 of the model's family and every tensor of its ``state_dict`` (names, shapes,
    dtypes, values): adapters saved from one base load only onto the same one.

    Example:
        >>> import torch, adaptnet.hf
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> _ = torch.manual_seed(0)
        >>> config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        ...     max_position_embeddings=64)
        >>> model = LlamaForCausalLM(config).eval()
        >>> ids = torch.randint(0, 50, (2, 6))
        >>> a = adaptnet.hf.fingerprint(model)
        >>> len(a), a == adaptnet.hf.fingerprint(model)
        (64, True)
    """
    digest = hashlib.sha256(str(getattr(model.config, "model_type", "")).encode())
    for name, t in model.state_dict().items():
        t = t.detach().contiguous().cpu()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def wrap(model: nn.Module, *, context: int | None = None) -> AdaptedLM:
    """``model``'s layers run by adaptnet, nothing adaptive: the model itself (its logits
    and greedy tokens), batched with padding and cached in adaptnet's KV cache.

    Args:
        model: a ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``,
            ``MistralForCausalLM`` (no sliding window) or ``GPT2LMHeadModel``.
        context: the longest sequence decoded (the cache's slots per row); default the
            model's ``max_position_embeddings`` (GPT-2: ``n_positions``).

    Raises:
        ModelError: another family, an attention implementation other than ``sdpa`` or
            ``eager``, sliding-window or non-causal attention.
        ConfigError: a context out of range.

    Example:
        >>> import torch, adaptnet.hf
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> _ = torch.manual_seed(0)
        >>> config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        ...     max_position_embeddings=64)
        >>> model = LlamaForCausalLM(config).eval()
        >>> ids = torch.randint(0, 50, (2, 6))
        >>> lm = adaptnet.hf.wrap(model)  # the model's own layers, adaptnet's cache
        >>> torch.allclose(lm(ids).output, model(ids).logits, atol=1e-5)
        True
    """
    found = parts(model)
    return AdaptedLM(model, found, [HFLayer(layer, found) for layer in found.layers],
                     {"kind": "wrap"}, context)


def mixture_of_depths(model: nn.Module, capacity: float, *, every: int = 2,
                      layers: list[int] | None = None, context: int | None = None) -> AdaptedLM:
    """Mixture-of-Depths on ``model``'s layers ``every - 1, 2 * every - 1, ...`` (or the
    ``layers`` given): each processes ``capacity`` of each sequence's tokens in training
    (top-k by a new router) and the tokens its causal predictor picks in evaluation and
    decoding; the others pass by the residual and write no key there.

    A processed token's update is the layer's own (the router weight is 1 going forward,
    straight-through going back): at ``capacity=1`` the model is the base model, and a
    trained router decides which tokens may skip. Routers and predictors are new
    modules (:meth:`AdaptedLM.adapter_state`); train them with the base frozen
    (``adaptnet.freeze(lm.base)``) or not.

    Raises:
        ConfigError: a capacity outside (0, 1], ``every < 1``, a layer index out of
            range or repeated; plus :func:`wrap`'s.

    Example:
        >>> import torch, adaptnet.hf
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> _ = torch.manual_seed(0)
        >>> config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        ...     max_position_embeddings=64)
        >>> model = LlamaForCausalLM(config).eval()
        >>> ids = torch.randint(0, 50, (2, 6))
        >>> # layers 1 and 3 routed
        >>> lm = adaptnet.hf.mixture_of_depths(model, capacity=0.5, every=2)
        >>> out = lm.train()(ids)
        >>> # layers 0, 2 and the routed it took
        >>> out.output.shape, sorted(set(out.depth.flatten().tolist()))
        (torch.Size([2, 6, 50]), [2, 3, 4])
    """
    found = parts(model)
    n = len(found.layers)
    if isinstance(capacity, bool) or not isinstance(capacity, int | float) or \
            not 0.0 < float(capacity) <= 1.0:
        raise ConfigError(f"adaptnet.hf.mixture_of_depths: capacity is the share of each "
                          f"sequence's tokens a routed layer processes, in (0, 1]; got "
                          f"{capacity!r}. E.g. 0.5.")
    if layers is None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"adaptnet.hf.mixture_of_depths: every must be a whole number "
                              f">= 1 (route every k-th layer), got {every!r}.")
        layers = list(range(every - 1, n, every))
    chosen = _layer_indices(layers, n, "mixture_of_depths")
    blocks = [MixtureOfDepths(HFLayer(layer, found), float(capacity), found.d_model,
                              weight="straight") if i in chosen else HFLayer(layer, found)
              for i, layer in enumerate(found.layers)]
    return AdaptedLM(model, found, blocks, {"kind": "mod", "capacity": float(capacity),
                                            "layers": sorted(chosen)}, context)


def _layer_indices(layers: object, n: int, what: str) -> set[int]:
    if not isinstance(layers, list | tuple) or not layers or any(
            isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise ConfigError(f"adaptnet.hf.{what}: layers must be a non-empty list of layer "
                          f"indices, got {layers!r}.")
    bad = [i for i in layers if not 0 <= i < n]
    if bad or len(set(layers)) != len(layers):
        raise ConfigError(f"adaptnet.hf.{what}: layers {list(layers)} must be distinct indices "
                          f"of the model's {n} layers, 0 to {n - 1}"
                          f"{f'; {bad} are not' if bad else ''}.")
    return set(layers)


def early_exit(model: nn.Module, threshold: float, *, rule: str = "confidence",
               context: int | None = None) -> AdaptedLM:
    """Per-token early exit (CALM) over ``model``'s layers, read out through the model's
    own final norm and (tied) head after every layer: a token leaves once ``rule``'s
    confidence reaches ``threshold`` (``math.inf``: never, the model itself); the later
    layers get its keys from the state it left with. ``rule``: ``"confidence"`` (top
    softmax probability, nothing to train) or
    ``"learned"`` (a classifier per exit, trained on the model's own agreement:
    ``lm.train()`` and the result's ``aux_loss``). :func:`calibrate_exit` picks the
    threshold for a target agreement with the model.

    Raises:
        ConfigError: a threshold outside (0, 1], an unknown rule; plus :func:`wrap`'s.

    Example:
        >>> import torch, adaptnet.hf
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> _ = torch.manual_seed(0)
        >>> config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        ...     max_position_embeddings=64)
        >>> model = LlamaForCausalLM(config).eval()
        >>> ids = torch.randint(0, 50, (2, 6))
        >>> # random weights: ~1/50 confident
        >>> lm = adaptnet.hf.early_exit(model, threshold=0.02).eval()
        >>> out = lm(ids)
        >>> out.output.shape, int(out.depth.max())  # every token left after the first of 4 layers
        (torch.Size([2, 6, 50]), 1)
    """
    found = parts(model)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or \
            not (0.0 < float(threshold) <= 1.0 or threshold == math.inf):
        raise ConfigError(f"adaptnet.hf.early_exit: threshold is the confidence a token "
                          f"leaves at, in (0, 1], or math.inf for never (the model itself: "
                          f"a softmax can round to exactly 1.0); got {threshold!r}. E.g. 0.9.")
    if rule not in ("confidence", "learned"):
        raise ConfigError(f"adaptnet.hf.early_exit: rule must be 'confidence' or 'learned', "
                          f"got {rule!r}.")
    return AdaptedLM(model, found, [HFLayer(layer, found) for layer in found.layers],
                     {"kind": "exit", "threshold": float(threshold), "rule": rule}, context,
                     rule=rule)


INITS = ("mean", "first")


def recursive(model: nn.Module, recursions: int, *, router: str = "expert",
              share: str = "cycle", init: str = "mean", kv: str = "cache",
              context: int | None = None) -> AdaptedLM:
    """``model``'s ``L`` layers made a shared stack of ``L / recursions`` layers applied up
    to ``recursions`` times per token, with Mixture-of-Recursions routing
    (:class:`~adaptnet.dynamic.MixtureOfRecursions`: ``router``, ``kv``).

    Layer ``i`` of the model becomes stack layer ``order[i]`` by ``adaptnet.share``'s
    strategy ``share`` (``"cycle"``: recursion ``r`` runs stack layers ``0..k-1`` in
    place of the model's ``r*k .. r*k+k-1``, the Relaxed Recursive Transformers and
    MoR layout). Each stack layer is a copy of the model's layers it stands for,
    initialised from their mean (``init="mean"``) or from the first of them
    (``"first"``). The stack is new (the base model keeps its layers); it is saved
    with the adapters, beside the routers.

    Raises:
        ConfigError: ``recursions`` that does not divide the layers, an unknown init;
            MixtureOfRecursions' errors for ``router``, ``share``, ``kv``; plus
            :func:`wrap`'s.

    Example:
        >>> import torch, adaptnet.hf
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> _ = torch.manual_seed(0)
        >>> config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        ...     max_position_embeddings=64)
        >>> model = LlamaForCausalLM(config).eval()
        >>> ids = torch.randint(0, 50, (2, 6))
        >>> # 4 layers -> 2 shared, applied up to twice
        >>> lm = adaptnet.hf.recursive(model, recursions=2)
        >>> lm(ids).output.shape, len(lm.blocks[0].blocks)
        (torch.Size([2, 6, 50]), 2)
    """
    found = parts(model)
    n = len(found.layers)
    if isinstance(recursions, bool) or not isinstance(recursions, int) or recursions < 1 or \
            n % recursions:
        raise ConfigError(f"adaptnet.hf.recursive: recursions must be a whole number >= 1 that "
                          f"divides the model's {n} layers, got {recursions!r}.")
    if init not in INITS:
        raise ConfigError(f"adaptnet.hf.recursive: init must be 'mean' (the mean of the layers "
                          f"a stack layer stands for) or 'first', got {init!r}.")
    k = n // recursions
    stack = [HFLayer(copy.deepcopy(found.layers[j]), found) for j in range(k)]
    mor = MixtureOfRecursions(stack, recursions, found.d_model, router, share=share, kv=kv)
    order = [j for step in mor.schedule for j in step]  # model layer i -> stack layer
    with torch.no_grad():
        for j, block in enumerate(mor.blocks):
            sources = [found.layers[i] for i in range(n) if order[i] == j]
            if init == "first":
                sources = sources[:1]
            mine = dict(block.layer.named_parameters())
            for name, p in mine.items():
                p.copy_(torch.stack([dict(s.named_parameters())[name] for s in sources]
                                    ).mean(0))
    return AdaptedLM(model, found, [mor], {"kind": "recursion", "recursions": recursions,
                                           "router": router, "share": share, "init": init,
                                           "kv": kv}, context)


BUILDERS = {"wrap": (wrap, ()), "mod": (mixture_of_depths, ("capacity", "layers")),
            "exit": (early_exit, ("threshold", "rule")),
            "recursion": (recursive, ("recursions", "router", "share", "init", "kv"))}


def load(model: nn.Module, path: str | Path, *, context: int | None = None) -> AdaptedLM:
    """The adapted model saved by :meth:`AdaptedLM.save_adapters`, rebuilt on ``model`` (a
    copy of the same base model) with the saved weights. Reading the file runs no code:
    its construct is checked data, its tensors are checked by name, shape and dtype.

    Raises:
        CheckpointNotFoundError: no such file.
        CheckpointCorruptError: not an adaptnet.hf adapter file, or damaged.
        CheckpointMismatchError: saved from another base model (its fingerprint or the
            tensors' shapes differ).

    Example:
        >>> import torch, adaptnet.hf
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> _ = torch.manual_seed(0)
        >>> config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        ...     max_position_embeddings=64)
        >>> model = LlamaForCausalLM(config).eval()
        >>> ids = torch.randint(0, 50, (2, 6))
        >>> import tempfile
        >>> lm = adaptnet.hf.mixture_of_depths(model, capacity=0.5)
        >>> path = lm.save_adapters(tempfile.mkdtemp() + "/mod.safetensors")
        >>> again = adaptnet.hf.load(model, path).eval()
        >>> torch.equal(again(ids).output, lm.eval()(ids).output)
        True
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"adaptnet.hf.load: no adapter file at {path}; give the "
                                      "path AdaptedLM.save_adapters wrote.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own errors on damage
        raise CheckpointCorruptError(f"adaptnet.hf.load: {path} is not a readable safetensors "
                                     f"file ({type(err).__name__}: {str(err)[:120]}).") from None
    spec = _spec(meta, path)
    base = fingerprint(model)
    if meta.get("base") != base:
        raise CheckpointMismatchError(
            f"adaptnet.hf.load: {path} was saved from another base model (its fingerprint "
            f"{str(meta.get('base'))[:12]}… is not this model's {base[:12]}…); load it onto "
            "the model it was trained with. The base model is unchanged.")
    build, names = BUILDERS[spec["kind"]]
    lm = build(model, **{k: spec[k] for k in names}, context=context)
    want = lm.adapter_state()
    if set(want) != set(tensors) or any(
            tensors[k].shape != want[k].shape or tensors[k].dtype != want[k].dtype
            for k in want):
        extra, missing = sorted(set(tensors) - set(want)), sorted(set(want) - set(tensors))
        raise CheckpointMismatchError(f"adaptnet.hf.load: {path} does not fit this model: "
                                      f"{len(missing)} tensors missing {missing[:3]}, "
                                      f"{len(extra)} unexpected {extra[:3]}, or shapes/dtypes "
                                      "differ. The base model is unchanged.")
    with torch.no_grad():
        for k, t in want.items():
            t.copy_(tensors[k])
    return lm


def _spec(meta: dict, path: Path) -> dict:
    """The saved construct, checked as data."""
    if meta.get("format") != FORMAT:
        raise CheckpointCorruptError(f"adaptnet.hf.load: {path} is not an adaptnet.hf adapter "
                                     f"file (format {str(meta.get('format'))[:40]!r}, expected "
                                     f"{FORMAT!r}).")
    try:
        spec = json.loads(meta.get("spec", ""))
    except ValueError:
        spec = None
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in BUILDERS or set(spec) != {"kind", *BUILDERS[kind][1]}:
        raise CheckpointCorruptError(f"adaptnet.hf.load: {path} records no construct adaptnet "
                                     f"knows ({str(meta.get('spec'))[:80]!r}).")
    return spec


@dataclass(frozen=True)
class ExitCalibration:
    """What :func:`calibrate_exit` found.

    Attributes:
        threshold: the lowest confidence threshold (most exits) found whose agreement
            reached the target (1.0 when none did).
        agreement: the share of real tokens whose next-token argmax equals the model's.
        depth: the mean layers per real token at that threshold.
    """

    threshold: float
    agreement: float
    depth: float


def calibrate_exit(lm: AdaptedLM, ids: torch.Tensor, agreement: float, *,
                   mask: torch.Tensor | None = None, steps: int = 10) -> ExitCalibration:
    """Set ``lm``'s exit threshold to the lowest one at which at least ``agreement`` of the
    real tokens of ``ids`` keep the model's own next-token argmax, found by bisection
    over ``steps`` runs of ``lm`` (each exact, keys propagated as in decoding). The
    model's own prediction is ``lm.base``'s forward at the same positions.

    Raises:
        ConfigError: ``lm`` without exits, an agreement outside (0, 1].

    Example:
        >>> import torch, adaptnet.hf
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> _ = torch.manual_seed(0)
        >>> config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        ...     max_position_embeddings=64)
        >>> model = LlamaForCausalLM(config).eval()
        >>> ids = torch.randint(0, 50, (2, 6))
        >>> lm = adaptnet.hf.early_exit(model, threshold=0.9)
        >>> cal = adaptnet.hf.calibrate_exit(lm, ids, agreement=1.0, steps=4)
        >>> isinstance(cal, adaptnet.hf.ExitCalibration), cal.agreement
        (True, 1.0)
    """
    if not isinstance(lm, AdaptedLM) or not lm.exits:
        raise ConfigError("calibrate_exit: give the model adaptnet.hf.early_exit made.")
    if isinstance(agreement, bool) or not isinstance(agreement, int | float) or \
            not 0.0 < agreement <= 1.0:
        raise ConfigError(f"calibrate_exit: agreement is a share of tokens in (0, 1], got "
                          f"{agreement!r}.")
    was = lm.training
    lm.eval()
    exits = lm.blocks[0]
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
    with torch.no_grad():
        positions = (real.long().cumsum(1) - 1).clamp(min=0)
        want = lm.base(ids, attention_mask=real.long(), position_ids=positions).logits.argmax(-1)

        def measure(threshold: float) -> tuple[float, float]:
            exits.threshold = threshold
            out = lm(ids, mask=mask)
            same = (out.output.argmax(-1) == want)[real].float().mean()
            return float(same), float(out.depth[real].float().mean())

        low, high = 0.0, 1.0
        best = (1.0, *measure(1.0))
        for _ in range(steps):
            mid = (low + high) / 2
            got, depth = measure(mid)
            if got >= agreement:
                best, high = (mid, got, depth), mid
            else:
                low = mid
        exits.threshold = best[0]
    lm.train(was)
    lm.spec["threshold"] = best[0]
    return ExitCalibration(*best)
