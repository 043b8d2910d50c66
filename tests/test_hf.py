"""adaptnet.hf: per-token constructs on unmodified transformers causal LMs.

Every reference here is transformers' own code: the unmodified model's
``forward`` and ``generate``, and a per-token loop that calls the model's own
decoder layers and attention modules one token at a time, each with exactly
the keys the rule allows (held in a list, handed over through the layer's
``cache.update``). Models are built from small configs with random weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
import transformers

import adaptnet
import adaptnet.hf as ahf
from adaptnet.errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    DynamicError,
    ModelError,
)
from conftest import spread_adapters

V, D, L, CONTEXT = 61, 32, 4, 64
FAMILIES = ["llama", "qwen2", "gpt2", "qwen3", "mistral"]


def build(family: str, attention: str = "sdpa", layers: int = L, seed: int = 0,
          spread: bool = True, **extra) -> nn.Module:
    """A small random model of ``family``; ``spread``: embeddings of std 1 (a random
    model's 0.02 makes every token's state alike, so no rule would tell them apart)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=V, attn_implementation=attention, bos_token_id=0,
                  eos_token_id=None, pad_token_id=0)
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=D, n_layer=layers, n_head=4,
                                         n_positions=CONTEXT, **common, **extra)
        model = transformers.GPT2LMHeadModel(config)
    else:
        cls = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}[family]
        extra.setdefault("head_dim", D // 4)
        if family == "mistral":
            extra.setdefault("sliding_window", None)
        config = getattr(transformers, f"{cls}Config")(
            hidden_size=D, intermediate_size=2 * D, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
            **common, **extra)
        model = getattr(transformers, f"{cls}ForCausalLM")(config)
    if spread:  # and an output layer whose softmax is confident for some tokens
        with torch.no_grad():
            nn.init.normal_(model.get_input_embeddings().weight, std=1.0)
            if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
                nn.init.normal_(model.get_output_embeddings().weight, std=0.3)
    return model.eval()


def spread(lm: nn.Module) -> nn.Module:
    """Adapter weights under which tokens route, recur and leave differently."""
    torch.manual_seed(1)
    return spread_adapters(lm).eval()


def padded(batch: int = 3, t: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts: row 0 full, the others 3 and 1 tokens shorter."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (batch, t), generator=g)
    mask = torch.ones(batch, t, dtype=torch.bool)
    for b, cut in zip(range(1, batch), (3, 1, 5, 2), strict=False):
        mask[b, :cut] = False
        ids[b, :cut] = 0
    return ids, mask


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """The positions transformers' generate gives left-padded rows."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def base_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
    with torch.no_grad():
        if mask is None:
            return model(ids).logits
        return model(ids, attention_mask=mask.long(), position_ids=hf_positions(mask)).logits


# -- the optional extra ----------------------------------------------------------------

@pytest.mark.slow
def test_import_adaptnet_imports_neither_transformers_nor_adaptnet_hf():
    code = ("import sys, adaptnet, adaptnet.models, adaptnet.recipes; "
            "bad = [m for m in ('transformers', 'adaptnet.hf') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# -- against the unmodified model -------------------------------------------------------

def adapted(kind: str, model: nn.Module) -> nn.Module:
    """The construct at the setting where it is the model itself."""
    if kind == "wrap":
        return ahf.wrap(model)
    if kind == "mod":
        return ahf.mixture_of_depths(model, 1.0, every=1)
    return ahf.early_exit(model, math.inf)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["wrap", "mod", "exit"])
def test_at_full_capacity_the_adapted_model_is_the_model(family, kind):
    """Capacity 1 / threshold infinite: the model's own logits and its own greedy tokens, with
    left-padded prompts at batch 3, every token through every layer."""
    model = build(family)
    lm = adapted(kind, model).eval()
    ids, mask = padded()
    with torch.no_grad():
        out = lm(ids[:1])  # no padding: the model's plain forward
        torch.testing.assert_close(out.output, model(ids[:1]).logits, rtol=1e-5, atol=1e-5)
        out = lm(ids, mask=mask)
    torch.testing.assert_close(out.output[mask], base_logits(model, ids, mask)[mask],
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(out.depth, mask.long() * L)  # nothing skipped, nothing left early
    want = model.generate(ids, attention_mask=mask.long(), max_new_tokens=12,
                          do_sample=False, pad_token_id=0)
    assert torch.equal(adaptnet.generate(lm, ids, 12, prompt_mask=mask), want)


def test_eager_attention_runs_with_adaptnet_masks():
    """eager attention adds a float mask and masks nothing itself: the model's own
    generate, with padding, under eager as under sdpa."""
    for family in ("llama", "gpt2"):
        model = build(family, attention="eager")
        ids, mask = padded()
        want = model.generate(ids, attention_mask=mask.long(), max_new_tokens=10,
                              do_sample=False, pad_token_id=0)
        lm = ahf.mixture_of_depths(model, 1.0)
        assert torch.equal(adaptnet.generate(lm, ids, 10, prompt_mask=mask), want)
        lm = spread(ahf.mixture_of_depths(model, 0.5, every=1))
        got = adaptnet.generate(lm, ids, 10, prompt_mask=mask)
        assert torch.equal(got, adaptnet.generate(lm, ids, 10, prompt_mask=mask,
                                                  use_cache=False))


# -- every construct: cached == recompute, batched == alone, the path taken -------------

def middling(model: nn.Module) -> float:
    """A threshold some tokens reach at the first exit and some do not: the median
    confidence there (random models range from flat to peaked softmaxes)."""
    lm = ahf.wrap(model)
    ids, mask = padded()
    with torch.no_grad():
        h = lm.blocks[0](lm.embed_ids(ids, hf_positions(mask)))
        return float(torch.softmax(lm.readout(h), -1).amax(-1)[mask].median())


CONSTRUCTS = {
    "mod": lambda m: ahf.mixture_of_depths(m, 0.5, every=1),
    "exit-confidence": lambda m: ahf.early_exit(m, middling(m)),
    "exit-learned": lambda m: ahf.early_exit(m, 0.5, rule="learned"),
    "recursion-expert": lambda m: ahf.recursive(m, 2),
    "recursion-token-share": lambda m: ahf.recursive(m, 2, router="token", kv="share",
                                                     share="sequence", init="first"),
}


def assert_adapted(kind: str, depth: torch.Tensor, real: torch.Tensor) -> None:
    """The adaptive path was taken: real tokens went to different depths."""
    d = depth[real]
    assert int(d.min()) < int(d.max()), f"{kind}: every token went {int(d.min())} layers deep"
    assert int(d.max()) <= L and bool((depth[~real] == 0).all())


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("kind", list(CONSTRUCTS))
def test_cached_equals_recompute_and_batched_equals_alone(family, kind):
    lm = spread(CONSTRUCTS[kind](build(family)))
    ids, mask = padded()
    got = adaptnet.generate(lm, ids, 16, prompt_mask=mask)
    assert torch.equal(got, adaptnet.generate(lm, ids, 16, prompt_mask=mask, use_cache=False))
    for b in range(ids.shape[0]):
        alone = adaptnet.generate(lm, ids[b:b + 1, mask[b]], 16)
        assert torch.equal(alone[0], got[b, int((~mask[b]).sum()):])
    full = torch.cat([mask, torch.ones(3, 16, dtype=torch.bool)], 1)
    with torch.no_grad():
        out = lm(got, mask=full)
    assert_adapted(kind, out.depth, full)
    cache = lm.new_cache(3)  # the logits step by step equal the whole sequence's
    with torch.no_grad():
        steps = [lm(got[:, :9], mask=mask, cache=cache).output]
        steps += [lm(got[:, i:i + 1], cache=cache).output for i in range(9, got.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1)[full], out.output[full], rtol=1e-4,
                               atol=1e-4)


# -- the per-token loop, on the model's own layers --------------------------------------

class Keys:
    """A cache for one layer of one row, as the loop keeps it: a list of (k, v)."""

    def __init__(self) -> None:
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def update(self, k, v, *args, **kwargs):
        self.k.append(k)
        self.v.append(v)
        return torch.cat(self.k, 2), torch.cat(self.v, 2)


class Capture:
    """Takes the keys and values an attention module makes, for a layer a token skips."""

    def update(self, k, v, *args, **kwargs):
        self.kv = (k, v)
        return k, v


def one_token(model: nn.Module, layer: nn.Module, h: torch.Tensor, position: int,
              keys: Keys) -> torch.Tensor:
    """The model's own layer on one token ``h`` ``(1, 1, d)``, attending to ``keys``."""
    kwargs = {"cache": keys}
    if model.config.model_type != "gpt2":
        kwargs["position_embeddings"] = model.model.rotary_emb(h, torch.tensor([[position]]))
    return layer(h, **kwargs)


def keys_of(model: nn.Module, layer: nn.Module, h: torch.Tensor, position: int, keys: Keys
            ) -> None:
    """The model's own attention module makes the keys of state ``h``; appended to ``keys``."""
    grab = Capture()
    if model.config.model_type == "gpt2":
        layer.attn(layer.ln_1(h), cache=grab)
    else:
        tables = model.model.rotary_emb(h, torch.tensor([[position]]))
        layer.self_attn(layer.input_layernorm(h), position_embeddings=tables,
                        attention_mask=None, cache=grab)
    keys.update(*grab.kv)


def embed(model: nn.Module, token: torch.Tensor, position: int) -> torch.Tensor:
    h = model.get_input_embeddings()(token.view(1, 1))
    if model.config.model_type == "gpt2":
        h = h + model.transformer.wpe(torch.tensor([[position]]))
    return h


def readout(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    norm = model.transformer.ln_f if model.config.model_type == "gpt2" else model.model.norm
    return model.lm_head(norm(h))


def loop(lm: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Logits of every real token, one token at a time, and each token's depth."""
    model, kind = lm.base, lm.spec["kind"]
    layers = list(model.model.layers if model.config.model_type != "gpt2"
                  else model.transformer.h)
    logits, depths = [], []
    for b in range(ids.shape[0]):
        real = mask[b].nonzero().squeeze(1).tolist()
        caches = [Keys() for _ in range(L)]
        if kind == "recursion":
            mor = lm.blocks[0]
            caches = [Keys() for _ in range(mor.recursions * len(mor.blocks))]
        for position, i in enumerate(real):
            h = embed(model, ids[b, i], position)
            depth = 0
            if kind == "mod":
                for j, (layer, block) in enumerate(zip(layers, lm.blocks, strict=True)):
                    if isinstance(block, adaptnet.dynamic.MixtureOfDepths):
                        if float(block.predictor(h).squeeze()) <= 0:
                            continue
                        w = torch.sigmoid(block.router(h))
                        done = one_token(model, layer, h, position, caches[j])
                        h = h + (w - w.detach() + 1) * (done - h)
                    else:
                        h = one_token(model, layer, h, position, caches[j])
                    depth += 1
                out = readout(model, h)
            elif kind == "exit":
                exits = lm.blocks[0]
                for j, layer in enumerate(layers):
                    h = one_token(model, layer, h, position, caches[j])
                    depth += 1
                    out = readout(model, h)
                    if j == L - 1:
                        break
                    conf = exits.confidence(j, h, out)
                    if float(conf) >= exits.threshold:  # leaves: later layers get its keys
                        for k in range(j + 1, L):
                            keys_of(model, layers[k], h, position, caches[k])
                        break
            else:  # recursion with expert routing: step 0 for all, then the predictors
                mor = lm.blocks[0]
                n = len(mor.blocks)
                for r in range(mor.recursions):
                    if r and float(mor.predictors[r - 1](h).squeeze()) <= 0:
                        break
                    x = h
                    for j, which in enumerate(mor.schedule[r]):
                        x = one_token(model, mor.blocks[which].layer, x, position,
                                      caches[r * n + j])
                    w = torch.sigmoid(mor.routers[r](h))
                    h = h + w * (x - h)
                    depth += n
                out = readout(model, h)
            logits.append(out[0, 0])
            depths.append(depth)
    return torch.stack(logits), depths


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
@pytest.mark.parametrize("kind", ["mod", "exit-confidence", "recursion-expert"])
def test_the_adapted_model_equals_the_per_token_loop(family, kind):
    """Outputs and gradients (the base weights', the embedding's, the adapters'), with
    padding, each token to its own depth."""
    lm = spread(CONSTRUCTS[kind](build(family, seed=3)))
    ids, mask = padded(seed=4)
    out = lm(ids, mask=mask)
    want, depths = loop(lm, ids, mask)
    assert out.depth[mask].tolist() == depths
    assert_adapted(kind, out.depth, mask)
    torch.testing.assert_close(out.output[mask], want, rtol=1e-4, atol=1e-4)
    weights = torch.linspace(-1, 1, want.numel()).view_as(want)
    params = [p for p in lm.parameters() if p.requires_grad]
    got = torch.autograd.grad((out.output[mask] * weights).sum(), params, allow_unused=True)
    ref = torch.autograd.grad((want * weights).sum(), params, allow_unused=True)
    reached = 0
    for g, r in zip(got, ref, strict=True):
        assert (g is None) == (r is None) or float((g if r is None else r).abs().max()) == 0
        if g is not None and r is not None:
            scale = max(1.0, float(r.abs().max()))
            torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4 * scale)
            reached += 1
    assert reached > 10


# -- adapters saved apart ---------------------------------------------------------------

@pytest.mark.parametrize("kind", list(CONSTRUCTS))
def test_adapters_load_onto_a_fresh_copy_of_the_base_with_identical_outputs(tmp_path, kind):
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lm = spread(CONSTRUCTS[kind](model))
    with torch.no_grad():  # trained adapters differ from fresh ones
        for t in lm.adapter_state().values():
            if t.is_floating_point():
                t.add_(0.01 * torch.randn_like(t))
    assert set(model.state_dict()) == set(before)  # the base keeps its keys and weights
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert not any(k.startswith("base.") for k in lm.adapter_state())
    path = lm.save_adapters(tmp_path / "adapters.safetensors")
    again = ahf.load(build("llama"), path).eval()
    ids, mask = padded()
    with torch.no_grad():
        assert torch.equal(again(ids, mask=mask).output, lm(ids, mask=mask).output)
    assert again.spec == lm.spec
    if not lm.adapter_state():
        return  # the confidence rule adds no weights
    fresh = CONSTRUCTS[kind](build("llama")).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(ids, mask=mask).output, lm(ids, mask=mask).output)


def test_adapters_from_another_base_or_damaged_files_are_refused(tmp_path):
    lm = ahf.mixture_of_depths(build("llama"), 0.5)
    path = lm.save_adapters(tmp_path / "a.safetensors")
    other = build("llama", seed=7)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="another base model"):
        ahf.load(other, path)
    with pytest.raises(CheckpointMismatchError, match="another base model"):
        ahf.load(build("llama", layers=6), path)
    assert all(torch.equal(other.state_dict()[k], before[k]) for k in before)
    with pytest.raises(CheckpointNotFoundError):
        ahf.load(other, tmp_path / "missing.safetensors")
    data = path.read_bytes()
    for cut in (0, 7, 100, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(CheckpointCorruptError):
            ahf.load(other, tmp_path / "cut.safetensors")


def test_fuzzed_adapter_files_give_typed_errors_only(tmp_path):
    """Bytes flipped anywhere (header, metadata, tensors): a typed error, or a model that
    loads (a flipped tensor byte is still a tensor); never anything else."""
    model = build("llama")
    path = ahf.early_exit(model, 0.5, rule="learned").save_adapters(tmp_path / "a.st")
    data = bytearray(path.read_bytes())
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        bad = bytearray(data)
        for at in torch.randint(0, len(bad), (3,), generator=g).tolist():
            bad[at] = int(torch.randint(0, 256, (1,), generator=g))
        (tmp_path / "b.st").write_bytes(bytes(bad))
        with contextlib.suppress(CheckpointCorruptError, CheckpointMismatchError, ConfigError):
            ahf.load(model, tmp_path / "b.st")


def test_a_recorded_construct_is_data_checked_before_anything_is_built(tmp_path):
    from safetensors.torch import save_file
    model = build("llama")
    good = ahf.fingerprint(model)
    for spec in ('{"kind": "os.system"}', '{"kind": "mod", "capacity": 0.5}', "[]", "{",
                 '{"kind": "mod", "capacity": 7, "layers": [1]}'):
        save_file({}, str(tmp_path / "s.st"), metadata={"format": "adaptnet.hf/1",
                                                         "spec": spec, "base": good})
        with pytest.raises((CheckpointCorruptError, ConfigError)):
            ahf.load(model, tmp_path / "s.st")


# -- training the adapters --------------------------------------------------------------

def test_routers_train_with_the_base_frozen():
    model = build("llama")
    lm = ahf.mixture_of_depths(model, 0.5).train()
    adaptnet.freeze(lm, "base.*")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = {k: v.clone() for k, v in lm.adapter_state().items()}
    opt = torch.optim.Adam([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, V, (4, 12))
    out = lm(ids)
    assert out.aux_loss is not None
    assert int(out.depth.min()) < int(out.depth.max())  # top-k: half the tokens skip
    loss = out.task_loss(ids[:, 1:], lambda z, y: torch.nn.functional.cross_entropy(
        z[:, :-1].flatten(0, 1), y.flatten()))
    (loss + out.aux_loss).backward()
    opt.step()
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    moved = [k for k, v in lm.adapter_state().items() if not torch.equal(v, adapters[k])]
    assert any("router" in k for k in moved) and any("predictor" in k for k in moved)


def test_calibration_reaches_the_agreement_asked_for():
    model = build("llama")
    lm = ahf.early_exit(model, math.inf)
    ids, mask = padded(batch=4, t=16)
    found = ahf.calibrate_exit(lm, ids, 0.8, mask=mask)
    assert 0.0 < found.threshold < 1.0 and found.agreement >= 0.8
    assert found.depth < L  # tokens do leave early
    assert lm.blocks[0].threshold == found.threshold == lm.spec["threshold"]
    want = base_logits(model, ids, mask).argmax(-1)
    with torch.no_grad():
        got = lm(ids, mask=mask).output.argmax(-1)
    assert float((got == want)[mask].float().mean()) == pytest.approx(found.agreement)


# -- bad input --------------------------------------------------------------------------

def test_an_unsupported_family_names_the_supported_ones():
    config = transformers.GPTNeoXConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64)
    model = transformers.GPTNeoXForCausalLM(config)
    with pytest.raises(ModelError, match=r"LlamaForCausalLM.*GPT2LMHeadModel"):
        ahf.wrap(model)
    with pytest.raises(ModelError, match="not a supported"):
        ahf.wrap(nn.Linear(2, 2))


@pytest.mark.parametrize("call, error, match", [
    (lambda m: ahf.mixture_of_depths(m, 0.5, layers=[4]), ConfigError, "0 to 3; \\[4\\]"),
    (lambda m: ahf.mixture_of_depths(m, 0.5, layers=[1, 1]), ConfigError, "distinct"),
    (lambda m: ahf.mixture_of_depths(m, 0.5, layers=[]), ConfigError, "non-empty"),
    (lambda m: ahf.mixture_of_depths(m, 0.0), ConfigError, "in \\(0, 1\\]"),
    (lambda m: ahf.mixture_of_depths(m, 1.5), ConfigError, "in \\(0, 1\\]"),
    (lambda m: ahf.mixture_of_depths(m, 0.5, every=0), ConfigError, "every"),
    (lambda m: ahf.early_exit(m, 1.5), ConfigError, "in \\(0, 1\\]"),
    (lambda m: ahf.early_exit(m, 0.0), ConfigError, "in \\(0, 1\\]"),
    (lambda m: ahf.early_exit(m, 0.5, rule="entropy"), ConfigError, "rule"),
    (lambda m: ahf.recursive(m, 3), ConfigError, "divides the model's 4 layers"),
    (lambda m: ahf.recursive(m, 2, init="last"), ConfigError, "init"),
    (lambda m: ahf.recursive(m, 2, router="random"), DynamicError, "router"),
    (lambda m: ahf.wrap(m, context=CONTEXT + 1), ConfigError, "context"),
])
def test_bad_arguments_are_typed_errors_and_change_nothing(call, error, match):
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(error, match=match):
        call(model)
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_sliding_windows_are_refused_beyond_the_window():
    model = build("mistral", sliding_window=16)
    with pytest.raises(ModelError, match="sliding window of 16"):
        ahf.wrap(model)
    lm = ahf.wrap(model, context=16)  # within the window the two agree
    ids = torch.randint(1, V, (2, 16))
    torch.testing.assert_close(lm(ids).output, base_logits(model, ids), rtol=1e-5, atol=1e-5)
    qwen = build("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2)
    with pytest.raises(ModelError, match="sliding window of 8"):
        ahf.wrap(qwen)


def test_another_attention_implementation_is_refused():
    model = build("llama")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ModelError, match="attn_implementation='sdpa'"):
        ahf.wrap(model)


def test_a_cache_is_the_model_s_and_sized_for_its_batch():
    lm = ahf.wrap(build("gpt2"))
    with pytest.raises(ConfigError, match="batch of 2"):
        lm(torch.zeros(3, 2, dtype=torch.long), cache=lm.eval().new_cache(2))
    with pytest.raises(ConfigError, match="token ids must lie in \\[0, 61\\)"):
        lm(torch.full((1, 2), V))
    copy.deepcopy(lm)  # a plain module: copies, as any other
