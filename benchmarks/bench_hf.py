"""Benchmark: per-token depth on an unmodified Hugging Face Llama, adaptnet against economize.

One ``LlamaForCausalLM`` of SmolLM-135M's shape (d=576, 30 layers, 9 heads,
3 KV heads, MLP 1536, vocabulary 49,152; transformers' random initialisation,
seed 0, but embeddings of std 1 and an untied head of std 0.05, so that the
greedy stream wanders and tokens differ), greedy decoding of a 16-token prompt then 48 tokens
(same-length prompts, no padding), batch 1 and 8, 1 and 2 threads, every
variant interleaved in the same rounds, medians:

- *HF generate*: the unmodified model, ``model.generate(do_sample=False)`` with
  its own cache: the baseline every speed-up is over;
- *adaptnet dense*: ``adaptnet.hf.wrap`` (nothing skipped): adaptnet's own
  cost of driving the layers; *economize dense*: economize 0.3.2's decoder
  with CALM at threshold 1 (nothing exits), its own cost;
- *adaptnet MoD* / *economize MoD*: Mixture-of-Depths on every second layer
  (15 routed layers). adaptnet's causal predictors and economize's routers
  (``r = w.x``, ``router_init_std`` 0.02) get biases at the median of their
  logits on the decoded stream, so about half the tokens run each routed
  layer; adaptnet's skipped tokens write no keys there (the paper's MoD),
  economize fills them (its ``kv="fill"``: the paper's variant is refused);
- *adaptnet exit* / *economize CALM*: per-token early exit by a learned exit
  classifier on the token's state (adaptnet: one per exit, PyTorch's default
  initialisation, seed 0; economize: its one classifier for every layer,
  weights of std 0.05), each threshold set so that decoding runs about 60% of
  the layers; neither reads the logits out at an exit the token does not take.
  The softmax-confidence rule reads the logits out after every layer: at this
  vocabulary a readout (576 x 49,152 multiply-adds per token) costs eight
  layers, so it cannot pay here, for either library.

Executed layers: the share of (token, layer) pairs of the decoding steps
that ran the layer (adaptnet: the depth its recompute reports, which cached
decoding equals; economize: its ``cost_summary``'s decode phase). MAC
reduction: adaptnet dense's executed multiply-adds (``count_macs``) over the
variant's. Clock efficiency: speed-up over HF
generate ÷ MAC reduction (target ≥ 0.7). Agreement: the share of generated
tokens equal to HF generate's at the same place. Random weights make flat
softmaxes and near-constant greedy streams; the timing measures the machinery
at a given skip share, not a trained model's quality.

    python benchmarks/bench_hf.py           # full (about 20 minutes on 2 cores)
    python benchmarks/bench_hf.py --quick   # smoke test
"""

from __future__ import annotations

import torch
from _common import medians, parse_args, publish, table, time_calls, verdict

import adaptnet
import adaptnet.hf as ahf
from adaptnet.dynamic import MixtureOfDepths

PROMPT, NEW = 16, 48
SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
             tie_word_embeddings=False, rope_theta=10000.0)
QUICK = dict(SHAPE, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2)
EXIT_SHARE = 0.6  # of the layers, per decoded token


def build(shape: dict) -> torch.nn.Module:
    """transformers' initialisation, but embeddings of std 1 and an untied head of std 0.05:
    tokens' states differ, so greedy decoding wanders instead of repeating one token and
    exits and routes differ between tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, bos_token_id=0, eos_token_id=None, pad_token_id=0,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.model.embed_tokens.weight, std=1.0)
        torch.nn.init.normal_(model.lm_head.weight, std=0.05)
    return model


def hf_generate(model: torch.nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt),
                              max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                              pad_token_id=0)


def economize_generate(eco: object, prompt: torch.Tensor) -> torch.Tensor:
    results = eco.decode_batch(prompt, NEW)
    return torch.stack([torch.cat([p, r.tokens.to(p.device)]) for p, r in
                        zip(prompt, results, strict=True)])


def economize_share(eco: object, name: str, prompt: torch.Tensor) -> float:
    """The share of (token, layer) pairs run while decoding (its cost log's decode phase)."""
    results = eco.decode_batch(prompt, NEW)
    costs = [eco.techniques[name].cost_summary(r)["phases"]["decode"] for r in results]
    return sum(c["ran"] for c in costs) / sum(c["entered"] for c in costs)


def adaptnet_share(lm: torch.nn.Module, stream: torch.Tensor) -> float:
    """The share of (token, layer) pairs run while decoding ``stream`` (prompt, generated):
    the tokens fed one at a time, as the whole stream's recompute routes them."""
    with torch.no_grad():
        depth = lm.eval()(stream).depth[:, PROMPT:-1]
    return float(depth.float().mean()) / lm.base.config.num_hidden_layers


def set_mod(lm: torch.nn.Module, eco: object, stream: torch.Tensor) -> None:
    """Predictor (adaptnet) and router (economize) biases at the median of their logits on
    ``stream``, layer by layer."""
    with torch.no_grad():
        for block in lm.blocks:
            if isinstance(block, MixtureOfDepths):
                seen = []
                hook = block.predictor.register_forward_hook(
                    lambda m, a, out, seen=seen: seen.append(out[..., 0]))
                lm(stream)
                hook.remove()
                block.predictor[2].bias -= torch.cat([s.flatten() for s in seen]).median()
        routers = eco.techniques["mod"].routers
        for router in routers.values() if hasattr(routers, "values") else routers:
            seen = []
            hook = router.register_forward_hook(lambda m, a, out, seen=seen: seen.append(out))
            eco.decode_batch(stream, 1)
            hook.remove()
            bias = next(p for n, p in router.named_parameters() if n.endswith("bias"))
            bias -= torch.cat([s.flatten() for s in seen]).median()


def set_exit(lm: torch.nn.Module, prompt: torch.Tensor) -> float:
    """adaptnet's threshold (bisection, 8 steps) whose decoding runs the share of the layers
    nearest EXIT_SHARE."""
    exits = lm.blocks[0]
    low, high, best = 0.0, 1.0, None
    for _ in range(8):
        exits.threshold = (low + high) / 2
        got = adaptnet_share(lm, adaptnet.generate(lm, prompt, NEW))
        if best is None or abs(got - EXIT_SHARE) < abs(best[1] - EXIT_SHARE):
            best = (exits.threshold, got)
        low, high = (low, exits.threshold) if got > EXIT_SHARE else (exits.threshold, high)
    exits.threshold = best[0]
    return best[0]


def economize_calm(model: torch.nn.Module, prompt: torch.Tensor, share: float
                   ) -> tuple[object, float]:
    """economize's CALM with its exit classifier (one for every layer, ``sigmoid(w.rms(h) +
    b)``, weights normal with std 0.05, seed 2) at the threshold (bisection, 8 steps) whose
    decoding runs the share of the layers nearest ``share``."""
    import economize
    from economize.techniques.dynamic_depth import CalmConfig

    low, high, best = 0.0, 1.0, None
    for _ in range(8):
        mid = (low + high) / 2
        eco = economize.apply(model, CalmConfig(confidence="classifier", threshold=mid))
        torch.manual_seed(2)
        with torch.no_grad():
            eco.techniques["calm"].classifier.proj.weight.normal_(0.0, 0.05)
        got = economize_share(eco, "calm", prompt)
        if best is None or abs(got - share) < abs(best[2] - share):
            best = (eco, mid, got)
        low, high = (low, mid) if got > share else (mid, high)  # lower: more exits
    return best[0], best[1]


def run(shape: dict, rounds: int, batches: tuple[int, ...]) -> dict:
    import economize
    from economize.techniques.dynamic_depth import CalmConfig, MoDConfig

    model = build(shape)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, shape["vocab_size"], (max(batches), PROMPT), generator=g)
    reference = hf_generate(model, prompt)
    stream = reference  # the decoded stream the MoD rates are set on
    before = _signature(model)
    context = PROMPT + NEW
    layers = shape["num_hidden_layers"]
    lms = {"adaptnet dense": ahf.wrap(model, context=context),
           "adaptnet MoD": ahf.mixture_of_depths(model, 0.5, every=2, context=context),
           "adaptnet exit": ahf.early_exit(model, 0.5, rule="learned", context=context)}
    ecos = {"economize dense": (economize.apply(model, CalmConfig(threshold=1.0)), "calm"),
            "economize MoD": (economize.apply(model, MoDConfig(router_init_std=0.02,
                                                               router_bias=0.0)), "mod")}
    set_mod(lms["adaptnet MoD"], ecos["economize MoD"][0], stream)
    threshold = set_exit(lms["adaptnet exit"], prompt)
    target = adaptnet_share(lms["adaptnet exit"], adaptnet.generate(lms["adaptnet exit"],
                                                                    prompt, NEW))
    calm, eco_threshold = economize_calm(model, prompt, target)
    ecos["economize CALM"] = (calm, "calm")
    assert _signature(model) == before, "economize changed the model it was given"
    share, agree, macs = {}, {}, {}
    for name, lm in lms.items():
        out = adaptnet.generate(lm, prompt, NEW)
        share[name] = adaptnet_share(lm, out)
        agree[name] = float((out[:, PROMPT:] == reference[:, PROMPT:]).float().mean())
        with adaptnet.count_macs() as count:
            adaptnet.generate(lm, prompt, NEW)
        macs[name] = count.total
    for name, (eco, technique) in ecos.items():
        share[name] = economize_share(eco, technique, prompt)
        out = economize_generate(eco, prompt)
        agree[name] = float((out[:, PROMPT:] == reference[:, PROMPT:]).float().mean())
    assert agree["adaptnet dense"] == 1.0, "adaptnet's dense decoding left the model's tokens"
    result = {"shape": shape, "threshold": threshold, "economize_threshold": eco_threshold,
              "layers": layers, "share": share, "agreement": agree, "macs": macs,
              "timing": {}, "rounds": rounds, "prompt": PROMPT, "new_tokens": NEW}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for b in batches:
            p = prompt[:b]
            fns = {"HF generate": lambda p=p: hf_generate(model, p)}
            fns |= {name: (lambda lm=lm, p=p: adaptnet.generate(lm, p, NEW))
                    for name, lm in lms.items()}
            fns |= {name: (lambda eco=eco, p=p: eco.decode_batch(p, NEW))
                    for name, (eco, _) in ecos.items()}
            ms = medians(time_calls(fns, rounds, 1))
            result["timing"][f"{threads}@{b}"] = {k: b * NEW / v for k, v in ms.items()}
    return result


def _signature(model: torch.nn.Module) -> tuple:
    """The model's module classes and hooks: what a library that patched it would change."""
    return ([type(m).__name__ for m in model.modules()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))


PAIRS = {"dense": ("adaptnet dense", "economize dense"), "MoD": ("adaptnet MoD", "economize MoD"),
         "exit": ("adaptnet exit", "economize CALM")}


def markdown(r: dict) -> str:
    rows, peers = [], []
    dense_macs = r["macs"]["adaptnet dense"]
    for key, tps in r["timing"].items():
        threads, b = key.split("@")
        base = tps["HF generate"]
        rows.append([threads, b, "HF generate", "1.00", "", f"{base:.0f}", "1.00×", "", "", ""])
        for name in ("adaptnet dense", "economize dense", "adaptnet MoD", "economize MoD",
                     "adaptnet exit", "economize CALM"):
            speed = tps[name] / base
            if name in r["macs"]:
                reduction = dense_macs / r["macs"][name]
                eff = speed / reduction
                red, effs = f"{reduction:.2f}×", f"{eff:.2f}"
                met = verdict(eff >= 0.7) if "dense" not in name else ""
            else:
                red = effs = met = ""
            rows.append([threads, b, name, f"{r['share'][name]:.2f}", red, f"{tps[name]:.0f}",
                         f"{speed:.2f}×", effs, met, f"{r['agreement'][name]:.2f}"])
        for what, (ours, theirs) in PAIRS.items():
            ratio = tps[ours] / tps[theirs]
            target = ratio > 1.0 if b != "1" else ratio >= 0.97
            peers.append([threads, b, what, f"{tps[ours]:.0f}", f"{tps[theirs]:.0f}",
                          f"{ratio:.2f}×", verdict(target) if what != "dense" else ""])
    s = r["shape"]
    return "\n".join([
        f"A LlamaForCausalLM of d={s['hidden_size']}, {s['num_hidden_layers']} layers, "
        f"{s['num_attention_heads']} heads ({s['num_key_value_heads']} KV), vocabulary "
        f"{s['vocab_size']}, random weights; greedy decoding of a {r['prompt']}-token prompt "
        f"then {r['new_tokens']} tokens, median of {r['rounds']} interleaved rounds. Tokens/s "
        "counts the generated tokens of every row. Executed layers: share of the (token, "
        "layer) pairs of the decoding steps that ran. Exits: learned classifiers, thresholds "
        f"adaptnet {r['threshold']:.3g}, economize {r['economize_threshold']:.3g}, each set "
        "for about the same executed share. Agreement: share of generated tokens equal to HF "
        "generate's at the same place (random weights: any change of path changes the "
        "greedy stream).", "",
        *table(["threads", "batch", "variant", "executed layers", "MAC reduction",
                "tokens/s", "speed-up over HF", "clock efficiency (≥ 0.7)", "target",
                "agreement with HF"], rows), "",
        "adaptnet against economize 0.3.2 at the same settings (target: ahead at batch 8, "
        "level or ahead at batch 1, i.e. ≥ 0.97×):", "",
        *table(["threads", "batch", "construct", "adaptnet tokens/s", "economize tokens/s",
                "adaptnet / economize", "target"], peers)]) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    shape, rounds, batches = (QUICK, 1, (1, 2)) if args.quick else (SHAPE, args.rounds or 3,
                                                                      (1, 8))
    publish("hf", args, run(shape, rounds, batches), markdown)


if __name__ == "__main__":
    main()
