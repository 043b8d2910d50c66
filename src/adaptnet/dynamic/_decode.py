"""Greedy decoding with a KV cache, at any batch size, each token at its own depth."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from adaptnet.dynamic._result import DynamicResult
from adaptnet.errors import ConfigError

__all__ = ["CachedModel", "generate"]


@runtime_checkable
class CachedModel(Protocol):
    """What :func:`generate` asks of a model to decode with a KV cache.

    ``model(ids, cache=cache)`` (and ``mask=`` for a padded prompt) extends the
    cache by ``ids`` ``(B, t)`` and returns logits ``(B, t, V)`` or a result whose
    ``prediction`` they are; after a call with padding the cache continues each
    row's positions. ``new_cache(batch)`` makes an empty cache; ``context`` is the
    longest sequence. ``adaptnet.models.decoder`` builds one from
    :class:`~adaptnet.dynamic.TokenBlock` blocks.
    """

    context: int

    def new_cache(self, batch: int) -> Any: ...


def generate(model: nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int, *,
             use_cache: bool = True, prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Extend each row of ``prompt_ids`` ``(B, T)`` by ``max_new_tokens`` greedy tokens.

    Prompts of different lengths are padded on the left and marked by
    ``prompt_mask`` ``(B, T)`` bool (True at real tokens), which the model
    takes as ``mask=`` (the tokens after the prompt are all real).

    With the cache (a :class:`CachedModel`) the prompt runs once and each
    step feeds one token; with ``use_cache=False`` every step runs the whole
    sequence again: the reference the cache must equal. The model runs in
    eval mode (its training mode is put back after).

    Raises:
        ConfigError: a prompt that is not ``(B, T)`` integer ids; a
            ``prompt_mask`` not shaped like it or not padding on the left; a
            prompt and ``max_new_tokens`` longer than the model's context; a
            model that is not a :class:`CachedModel` (the message names what it
            lacks).

    Example:
        >>> import torch, adaptnet
        >>> from adaptnet.models import decoder
        >>> model = decoder(vocab_size=11, d_model=16, layers=2, heads=2, context=32)
        >>> adaptnet.generate(model, torch.zeros(3, 4, dtype=torch.long), 5).shape
        torch.Size([3, 9])
    """
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or \
            prompt_ids.dtype not in (torch.int64, torch.int32) or not prompt_ids.shape[1]:
        shape = tuple(prompt_ids.shape) if isinstance(prompt_ids, torch.Tensor) else \
            type(prompt_ids).__name__
        raise ConfigError(f"generate(): prompt_ids must be (batch, tokens) integer ids with at "
                          f"least one token, got {shape}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
            max_new_tokens < 0:
        raise ConfigError(f"generate(): max_new_tokens must be a whole number >= 0, got "
                          f"{max_new_tokens!r}.")
    if prompt_mask is not None:
        _check_prompt_mask(prompt_mask, prompt_ids)
    cached = isinstance(model, CachedModel)
    if use_cache and not cached:
        # a user's model: name what it lacks
        missing = "new_cache(batch)" if not callable(getattr(model, "new_cache", None)) \
            else "context (its longest sequence)"
        raise ConfigError(f"generate(): {type(model).__name__} has no {missing}, so it cannot "
                          "decode with a KV cache (adaptnet.dynamic.CachedModel); build it "
                          "from TokenBlocks (adaptnet.models.decoder), or pass "
                          "use_cache=False.")
    total = prompt_ids.shape[1] + max_new_tokens
    if cached and total > model.context:
        raise ConfigError(f"generate(): a prompt of {prompt_ids.shape[1]} tokens plus "
                          f"max_new_tokens={max_new_tokens} makes {total}, longer than the "
                          f"model's context of {model.context}; shorten the prompt or "
                          "generate fewer tokens.")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ids = prompt_ids.long()
            cache = model.new_cache(ids.shape[0]) if use_cache else None
            step, mask = ids, prompt_mask
            for _ in range(max_new_tokens):
                masked = {} if mask is None else {"mask": mask}
                out = model(step, cache=cache, **masked) if use_cache else model(ids, **masked)
                logits = out.output if isinstance(out, DynamicResult) else out
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], dim=1)
                if use_cache:  # the cache continues each row's positions
                    step, mask = nxt, None
                elif mask is not None:  # every token after the prompt is real
                    mask = torch.cat([mask, torch.ones_like(nxt, dtype=torch.bool)], dim=1)
            return ids
    finally:
        model.train(was_training)


def _check_prompt_mask(mask: object, ids: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or \
            mask.shape != ids.shape:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else \
            type(mask).__name__
        raise ConfigError(f"generate(): prompt_mask must be a bool tensor shaped like "
                          f"prompt_ids {tuple(ids.shape)} (True at real tokens), got {got}.")
    if ids.shape[0] and (not bool(mask[:, -1].all()) or
                         bool((mask[:, :-1] & ~mask[:, 1:]).any())):
        raise ConfigError("generate(): prompt_mask must pad on the left: each row False "
                          "before its prompt and True from its first token to the end (the "
                          "next token follows the last column); pad your prompts on the left.")
