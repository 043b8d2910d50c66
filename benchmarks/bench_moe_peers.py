"""Benchmark: adaptnet.MoE against transformers' experts backends and a hand grouped GEMM.

The peers run a Mixtral sparse-MoE block of transformers 5.x (8 SwiGLU experts,
top-2, its own router) with the same weights:

- adaptnet:      ``adaptnet.MoE`` over ``adaptnet.dynamic.StackedExperts`` holding the
                 block's own expert weights (the same tensors), its router a ``Linear``
                 on the block's router weight
- adaptnet loop: ``adaptnet.MoE`` over eight expert modules, one call per expert (the
                 general path, for experts of mixed kinds), reading the same weights
- hf eager:      the block with ``experts_implementation="eager"`` (a loop over the
                 experts hit)
- hf grouped_mm: the block with ``"grouped_mm"`` (sort, then ``grouped_mm``; the
                 default of transformers' Mixtral models)
- hand grouped:  the same logic written by hand: top-k, a sort by expert, two
                 ``torch.nn.functional.grouped_mm`` calls, one ``index_add_``

Outputs are checked equal first. Sizes: 512, 2,048 and 8,192 tokens; experts
64 -> 256 -> 64 and 256 -> 1024 -> 256; forward (no grad) and forward+backward
(loss ``out.square().mean()``); 1 and 2 threads. Interleaved rounds, medians.
Target (issue 39): no peer faster than adaptnet at any size.

    python benchmarks/bench_moe_peers.py           # full (part of `make bench-long`)
    python benchmarks/bench_moe_peers.py --quick   # smoke test, tiny sizes
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _common import medians, parse_args, publish, table, time_calls, verdict
from torch import nn
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

import adaptnet

EXPERTS, K = 8, 2
PEERS = ("hf eager", "hf grouped_mm", "hand grouped")


def contestants(d: int, hidden: int) -> tuple[dict, list[torch.Tensor]]:
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=d, intermediate_size=hidden,
                           num_local_experts=EXPERTS, num_experts_per_tok=K)
    block = MixtralSparseMoeBlock(config)
    for p in block.parameters():
        nn.init.normal_(p, std=d ** -0.5)
    router = nn.Linear(d, EXPERTS, bias=False)
    router.weight = block.gate.weight  # the same tensor
    stack = block.experts
    stacked = adaptnet.dynamic.StackedExperts(EXPERTS, d, hidden, activation="silu",
                                              gated=True, bias=False)
    stacked.w1, stacked.w2 = stack.gate_up_proj, stack.down_proj  # the same tensors
    moe = adaptnet.MoE(stacked, router, k=K)
    loop = adaptnet.MoE([stacked[e] for e in range(EXPERTS)], router, k=K)  # w[e] views

    def hf(implementation: str):
        def run(x: torch.Tensor) -> torch.Tensor:
            stack.config._experts_implementation = implementation
            return block(x[None])[0]
        return run

    def hand(x: torch.Tensor) -> torch.Tensor:
        top_logits, top = F.linear(x, block.gate.weight).topk(K, dim=-1)
        gates = torch.softmax(top_logits, dim=-1).reshape(-1)
        flat = top.reshape(-1)
        order = flat.argsort(stable=True)
        offsets = torch.bincount(flat, minlength=EXPERTS).cumsum(0).to(torch.int32)
        token = order // K
        h = F.grouped_mm(x[token], stack.gate_up_proj.transpose(-2, -1), offs=offsets)
        gate, up = h.chunk(2, dim=-1)
        y = F.grouped_mm(F.silu(gate) * up, stack.down_proj.transpose(-2, -1), offs=offsets)
        return torch.zeros_like(x).index_add_(0, token, y * gates[order, None])

    fns = {"adaptnet": lambda x: moe(x).output, "adaptnet loop": lambda x: loop(x).output,
           "hf eager": hf("eager"),
           "hf grouped_mm": hf("grouped_mm"), "hand grouped": hand}
    return fns, list(block.parameters())


def measure(tokens: int, d: int, hidden: int, rounds: int, iters: int) -> dict:
    fns, params = contestants(d, hidden)
    x = torch.randn(tokens, d)
    want = fns["adaptnet"](x).detach()
    for name in (*PEERS, "adaptnet loop"):
        torch.testing.assert_close(fns[name](x).detach(), want, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{n} differs from adaptnet: {m}")

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(x)
        return run

    def step(fn):
        def run():
            for p in params:
                p.grad = None
            fn(x).square().mean().backward()
        return run

    out = {}
    for mode, wrap in (("forward", forward), ("forward+backward", step)):
        ms = medians(time_calls({k: wrap(f) for k, f in fns.items()}, rounds, iters))
        out[mode] = {k: v * 1e3 for k, v in ms.items()}
    return out


def run(sizes: list[tuple[int, int, int]], rounds: int, iters: int) -> dict:
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for tokens, d, hidden in sizes:
            rows.append({"threads": threads, "tokens": tokens, "dim": d, "hidden": hidden,
                         **measure(tokens, d, hidden, rounds, iters)})
    return {"rows": rows, "rounds": rounds, "iters": iters, "experts": EXPERTS, "k": K}


def markdown(result: dict) -> str:
    lines, worst = [], {}
    for mode in ("forward", "forward+backward"):
        body = []
        for r in result["rows"]:
            ms = r[mode]
            ratios = {p: ms[p] / ms["adaptnet"] for p in PEERS}
            key = (mode, r["threads"])
            worst[key] = min(worst.get(key, float("inf")), *ratios.values())
            body.append([r["threads"], r["tokens"], f"{r['dim']}→{r['hidden']}",
                         f"{ms['adaptnet']:.2f}",
                         *(f"{ms[p]:.2f} ({ms[p] / ms['adaptnet']:.2f}×)"
                           for p in ("adaptnet loop", *PEERS))])
        lines += [f"**{mode}** (ms per call; in brackets the peer's time ÷ adaptnet's: "
                  "below 1 means the peer is faster)", "",
                  *table(["threads", "tokens", "expert", "adaptnet", "adaptnet loop", *PEERS],
                         body), ""]
    met = all(v >= 1.0 for v in worst.values())
    lines += [f"{result['experts']} experts, top-{result['k']}, SwiGLU experts (Mixtral's); "
              f"median of {result['rounds']} interleaved rounds of {result['iters']} calls; "
              "outputs checked equal (rtol 1e-4) before timing.", "",
              "Slowest peer ratio per mode and thread count: "
              + ", ".join(f"{m} at {t} thread{'s' * (t > 1)}: {v:.2f}×"
                          for (m, t), v in worst.items())
              + f". Target, no peer faster at any size: {verdict(met)}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    if args.quick:
        result = run([(32, 8, 16)], args.rounds or 2, 1)
    else:
        result = run([(n, d, h) for d, h in ((64, 256), (256, 1024)) for n in (512, 2048, 8192)],
                     args.rounds or 7, 3)
    publish("moe_peers", args, result, markdown)


if __name__ == "__main__":
    main()
