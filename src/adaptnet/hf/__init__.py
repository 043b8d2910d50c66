"""Per-token adaptivity on unmodified Hugging Face causal LMs (the ``hf`` extra).

``import adaptnet`` never imports this package, nor transformers. See docs/hf.md.

Example:
    >>> import torch, adaptnet.hf
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> torch.manual_seed(0) and None
    >>> config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
    ...                      num_hidden_layers=4, num_attention_heads=4,
    ...                      num_key_value_heads=2, max_position_embeddings=64)
    >>> model = LlamaForCausalLM(config).eval()
    >>> lm = adaptnet.hf.mixture_of_depths(model, capacity=1.0)  # the model itself
    >>> ids = torch.randint(0, 50, (2, 6))
    >>> torch.allclose(lm(ids).output, model(ids).logits, atol=1e-5)
    True
"""

from adaptnet.hf._family import FAMILIES
from adaptnet.hf._layer import HFLayer
from adaptnet.hf._model import (
    AdaptedLM,
    ExitCalibration,
    calibrate_exit,
    early_exit,
    fingerprint,
    load,
    mixture_of_depths,
    recursive,
    wrap,
)

__all__ = [
    "FAMILIES",
    "AdaptedLM",
    "ExitCalibration",
    "HFLayer",
    "calibrate_exit",
    "early_exit",
    "fingerprint",
    "load",
    "mixture_of_depths",
    "recursive",
    "wrap",
]
