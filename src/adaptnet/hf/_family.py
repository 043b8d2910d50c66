"""What adaptnet needs to know of each Hugging Face model family it drives.

A family is read off an *unmodified* ``...ForCausalLM`` instance: where its
embedding, decoder layers, final norm and head are, how its layers are called,
and how a layer's key and value projections are applied alone (to write the
keys of a state to the cache without running the layer: per-token exit's
propagated keys). Nothing here imports transformers: the model brings its own
classes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaptnet.errors import ModelError

__all__ = ["FAMILIES", "Parts", "parts"]

#: The supported model types, each with the ``...ForCausalLM`` class it is tested with.
FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
            "gpt2": "GPT2LMHeadModel"}
ATTENTION = ("sdpa", "eager")


@dataclass(eq=False)
class Parts:
    """The pieces of one causal LM, as its own modules (nothing copied).

    Attributes:
        family: its ``config.model_type``.
        embed: the token embedding.
        positions: a learned position embedding added to it (GPT-2's), or None.
        drop: the dropout after the embedding, or None.
        layers: the decoder layers, first to last.
        norm, head: the final norm and the output layer (maybe tied to ``embed``).
        rotary: the module making rotary tables ``(cos, sin)`` of ``(x, positions)``,
            or None.
        d_model, kv_heads, head_dim: widths of the states and of the cache.
        context: the longest sequence the model takes.
        eager: the model's attention is the eager one, which adds a float mask
            (sdpa takes a bool one).
        keys: ``keys(layer, x, tables)``: the rotated keys and the values ``(b, H, n, dh)``
            the layer makes of states ``x``.
        cache_arg: the name its layers take the cache by (``cache`` in transformers
            5.25+, ``past_key_values`` before).
        window: the sliding window of its windowed layers, or None.
    """

    family: str
    embed: nn.Embedding
    positions: nn.Embedding | None
    drop: nn.Module | None
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Module
    rotary: nn.Module | None
    d_model: int
    kv_heads: int
    head_dim: int
    context: int
    eager: bool
    keys: Callable
    cache_arg: str
    window: int | None = None


def parts(model: nn.Module) -> Parts:
    """The :class:`Parts` of ``model``; a ModelError naming the supported families, or what
    this family's model has that adaptnet cannot run exactly, otherwise."""
    config = getattr(model, "config", None)  # transformers' API (probed: any object may come)
    family = getattr(config, "model_type", None)
    if not isinstance(model, nn.Module) or family not in FAMILIES:
        got = type(model).__name__ + (f" (model_type {family!r})" if family else "")
        raise ModelError(f"adaptnet.hf: {got} is not a supported causal LM; supported: "
                         f"{', '.join(FAMILIES.values())} (transformers, any size). Other "
                         "families: open an issue, or build the model from "
                         "adaptnet.dynamic.TokenBlock blocks.")
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in ATTENTION:
        raise ModelError(f"adaptnet.hf: the model's attention is {attention!r}; adaptnet runs "
                         "the model's own 'sdpa' or 'eager' attention with its own masks. Load "
                         "it with attn_implementation='sdpa'.")
    if family == "gpt2":
        body = model.transformer
        got = Parts(family, body.wte, body.wpe, body.drop, body.h, body.ln_f, model.lm_head,
                    None, config.hidden_size, config.num_attention_heads,
                    config.hidden_size // config.num_attention_heads, config.n_positions,
                    attention == "eager", _gpt2_keys, "")
    else:
        body = model.model
        heads = config.num_attention_heads
        # config fields some families (and transformers versions) lack: their defaults
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        got = Parts(family, body.embed_tokens, None, None, body.layers, body.norm,
                    model.lm_head, body.rotary_emb, config.hidden_size,
                    getattr(config, "num_key_value_heads", None) or heads, head_dim,
                    config.max_position_embeddings, attention == "eager", _llama_keys, "")
    for i, layer in enumerate(got.layers):
        attn = layer.attn if family == "gpt2" else layer.self_attn
        # transformers' attribute, read by its own attention functions
        if not getattr(attn, "is_causal", True) or getattr(attn, "is_cross_attention", False):
            raise ModelError(f"adaptnet.hf: layer {i} of the model does not attend causally "
                             "(its attention's is_causal is False); adaptnet runs causal "
                             "self-attention only.")
    got.window = _window(config, family)
    params = inspect.signature(type(got.layers[0]).forward).parameters
    got.cache_arg = "cache" if "cache" in params else "past_key_values"
    return got


def _window(config: object, family: str) -> int | None:
    """The sliding window some layers attend within, or None (full attention everywhere).
    Within a window as long as the context the two are the same; beyond it adaptnet's
    cache would hand those layers every key, so :class:`~adaptnet.hf.AdaptedLM` refuses a
    context longer than the window."""
    # transformers' config fields, absent in older versions or other families
    types = set(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None)
    windowed = types - {"full_attention"} or family == "mistral" or \
        getattr(config, "use_sliding_window", False)
    return window if windowed and window is not None else None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding as Llama applies it: ``x cos + rotate_half(x) sin``, tables
    ``(b, n, dh)``."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + turned * sin[:, None]


def _llama_keys(layer: nn.Module, x: torch.Tensor, tables: tuple | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    attn = layer.self_attn
    b, n, _ = x.shape
    h = layer.input_layernorm(x)
    k = attn.k_proj(h).view(b, n, -1, attn.head_dim)
    if hasattr(attn, "k_norm"):  # Qwen3 normalises each head's keys before rotating them
        k = attn.k_norm(k)
    v = attn.v_proj(h).view(b, n, -1, attn.head_dim).transpose(1, 2)
    return _rotate(k.transpose(1, 2), *tables), v


def _gpt2_keys(layer: nn.Module, x: torch.Tensor, tables: tuple | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    attn = layer.attn
    b, n, d = x.shape
    proj = attn.c_attn  # Conv1D: weight (d, 3d), the columns of q, k, v in turn
    kv = F.linear(layer.ln_1(x), proj.weight[:, d:].t(), proj.bias[d:])
    k, v = kv.view(b, n, 2, -1, attn.head_dim).permute(2, 0, 3, 1, 4)
    return k, v
