"""Recipes over Hugging Face causal LMs: the ``hf_causal_lm`` model and its decoding figures.

transformers and ``adaptnet.hf`` are imported only when such a recipe builds its
model (the ``hf`` extra). A local model directory is read with safetensors
weights only and no remote code: reading it runs nothing.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptnet.errors import RecipeError

__all__ = ["RECIPE_MODELS", "decode_figures", "hf_causal_lm", "is_adapted"]

CONSTRUCTS = ("none", "mod", "exit", "recursion")
SIZES = {"d_model": 128, "layers": 4, "heads": 4, "kv_heads": None}


def hf_causal_lm(vocab_size: int, *, model_type: str = "llama", directory: str | None = None,
                 d_model: int | None = None, layers: int | None = None,
                 heads: int | None = None, kv_heads: int | None = None, context: int = 256,
                 adapt: str = "mod", capacity: float = 0.5, every: int = 2,
                 threshold: float = 0.9, rule: str = "confidence", recursions: int = 2,
                 router: str = "expert", init: str = "mean", freeze_base: bool = False
                 ) -> nn.Module:
    """A transformers causal LM adapted by ``adaptnet.hf``: read from the local
    ``directory`` (what ``save_pretrained`` writes; safetensors weights, no remote code),
    or built from a config of ``model_type`` (``llama``, ``qwen2``, ``qwen3``,
    ``mistral``, ``gpt2``) with the sizes given and random weights.

    ``adapt``: ``"mod"`` (:func:`adaptnet.hf.mixture_of_depths` with ``capacity``
    and ``every``), ``"exit"`` (:func:`adaptnet.hf.early_exit` with ``threshold`` and
    ``rule``), ``"recursion"`` (:func:`adaptnet.hf.recursive` with ``recursions``,
    ``router`` and ``init``) or ``"none"`` (the model itself, through adaptnet).
    ``freeze_base``: train only what adaptnet adds (routers, predictors, exit
    classifiers; a recursive stack is new weights and trains too).
    """
    try:
        import transformers

        import adaptnet.hf as ahf
    except ImportError:
        raise RecipeError("model hf_causal_lm needs transformers: pip install "
                          "'adaptnet[hf]'.") from None
    if adapt not in CONSTRUCTS:
        raise RecipeError(f"model.adapt must be one of {', '.join(CONSTRUCTS)}, got "
                          f"{adapt!r}.")
    if directory is not None:
        model = _read(transformers, directory, vocab_size, d_model, layers, heads, kv_heads)
    else:
        model = _new(transformers, model_type, vocab_size, context, d_model, layers, heads,
                     kv_heads)
    context = min(context, ahf.wrap(model).context)
    if adapt == "mod":
        lm = ahf.mixture_of_depths(model, capacity, every=every, context=context)
    elif adapt == "exit":
        lm = ahf.early_exit(model, threshold, rule=rule, context=context)
    elif adapt == "recursion":
        lm = ahf.recursive(model, recursions, router=router, init=init, context=context)
    else:
        lm = ahf.wrap(model, context=context)
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    return lm.train()


def _read(transformers: Any, path: str, vocab_size: int, *sizes: int | None) -> nn.Module:
    if any(s is not None for s in sizes):
        raise RecipeError(f"model.directory {path!r} brings its own sizes; leave out d_model, "
                          "layers, heads and kv_heads.")
    if not Path(path).is_dir():
        raise RecipeError(f"model.directory {path!r} is not a directory; give a local model "
                          "directory (what save_pretrained writes: config.json and "
                          "model.safetensors).")
    auto = transformers.AutoModelForCausalLM
    try:
        if torch.empty(()).device.type == "meta":  # sizing the model: its config is enough
            model = auto.from_config(transformers.AutoConfig.from_pretrained(
                path, local_files_only=True, trust_remote_code=False))
        else:
            model = auto.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                         trust_remote_code=False)
    except Exception as e:  # transformers' own errors on a directory it cannot read
        raise RecipeError(f"model.directory {path!r}: transformers cannot read it "
                          f"({type(e).__name__}: {str(e)[:200]}); it needs config.json and "
                          "safetensors weights.") from None
    if model.get_input_embeddings().num_embeddings < vocab_size:
        raise RecipeError(f"model.directory {path!r}: its vocabulary of "
                          f"{model.get_input_embeddings().num_embeddings} tokens is smaller "
                          f"than the data's {vocab_size}.")
    return model


def _new(transformers: Any, model_type: str, vocab_size: int, context: int,
         d_model: int | None, layers: int | None, heads: int | None, kv_heads: int | None
         ) -> nn.Module:
    d, n, h = (v if v is not None else SIZES[k] for k, v in
               (("d_model", d_model), ("layers", layers), ("heads", heads)))
    if model_type == "gpt2":
        if kv_heads is not None:
            raise RecipeError("model.kv_heads: GPT-2 has no grouped keys; leave it out.")
        config = transformers.GPT2Config(vocab_size=vocab_size, n_embd=d, n_layer=n, n_head=h,
                                         n_positions=context, bos_token_id=0, eos_token_id=None)
    else:
        try:
            config = transformers.AutoConfig.for_model(
                model_type, vocab_size=vocab_size, hidden_size=d, intermediate_size=4 * d,
                num_hidden_layers=n, num_attention_heads=h,
                num_key_value_heads=kv_heads or h, max_position_embeddings=context,
                head_dim=d // h, bos_token_id=0, eos_token_id=None, sliding_window=None)
        except ValueError:
            raise RecipeError(f"model.model_type {model_type!r}: transformers knows no such "
                              "model type; e.g. llama, qwen2, gpt2.") from None
    config._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config)


def is_adapted(model: nn.Module) -> bool:
    """Whether ``model`` is an ``adaptnet.hf`` adapted model (without importing it)."""
    hf = sys.modules.get("adaptnet.hf")
    return hf is not None and isinstance(model, hf.AdaptedLM)


def decode_figures(model: nn.Module, ids: torch.Tensor, new: int = 32, rounds: int = 5
                   ) -> dict[str, float]:
    """Greedy decoding of the prompts ``ids`` ``(B, T)``: the adapted model's tokens/s with
    adaptnet's cache, the base model's with transformers' ``generate`` and its own cache
    (median of ``rounds`` interleaved rounds), and the share of generated tokens equal to
    the base model's at the same place."""
    import adaptnet

    base = model.base
    new = max(1, min(new, model.context - ids.shape[1]))

    def ours() -> torch.Tensor:
        return adaptnet.generate(model, ids, new)

    def theirs() -> torch.Tensor:
        with torch.no_grad():
            return base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=0)

    was = model.training
    model.eval()
    try:
        stream = ours()
        same = (stream[:, -new:] == theirs()[:, -new:]).float().mean()
        with torch.no_grad():
            depth = model(stream[:, :-1]).depth[:, ids.shape[1] - 1:].float().mean()
        times: dict[str, list[float]] = {"ours": [], "theirs": []}
        for r in range(rounds):
            for name, fn in (("ours", ours), ("theirs", theirs))[::1 if r % 2 else -1]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    finally:
        model.train(was)
    count = ids.shape[0] * new
    return {"tokens_per_s": count / statistics.median(times["ours"]),
            "base_tokens_per_s": count / statistics.median(times["theirs"]),
            "agreement": float(same), "new_tokens": new, "batch": ids.shape[0],
            "layers_per_token": float(depth), "layers": model.base.config.num_hidden_layers}


# Models a recipe names that live here rather than in the zoo (the zoo never imports
# transformers); looked up beside adaptnet.models.MODELS.
RECIPE_MODELS = {"hf_causal_lm": hf_causal_lm}
