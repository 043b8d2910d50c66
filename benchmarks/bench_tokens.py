"""Benchmark: per-token depth on character-level Shakespeare: perplexity, parameters, time.

Four decoders from the zoo's ``decoder`` (width 128, 4 heads, rotary
positions, output tied to the embedding), trained the same way (AdamW,
the same seed, batches and number of steps; 64-character windows):

- *vanilla*: 4 blocks;
- *MoD*: 4 blocks, blocks 2 and 4 Mixture-of-Depths at capacity 12.5%
  (the paper's setting);
- *MoR*: 2 shared blocks applied up to 2 times per token (expert choice);
- *early exit*: 4 blocks, each token leaving at the first block whose
  shared readout reaches confidence ``EXIT``.

For each: unique parameters, median milliseconds per training step, the
validation perplexity in evaluation mode (MoD/MoR decide by their causal
predictors there, as when decoding), the MoD predictors' accuracy at telling
top-k membership, and greedy decoding throughput with the KV cache
(``adaptnet.generate``, a 16-character prompt, 64 new tokens) at batch 1
and 8, 1 and 2 threads, medians of interleaved rounds. This is a short,
equal-steps run, not a converged or equal-compute comparison.

    python benchmarks/bench_tokens.py           # full (about 15 minutes on 2 cores)
    python benchmarks/bench_tokens.py --quick   # smoke test
"""

from __future__ import annotations

import math
import time

import torch
from _common import medians, parse_args, publish, table, time_calls, time_steps

import adaptnet
from adaptnet import sharing
from adaptnet.data import shakespeare
from adaptnet.dynamic import MixtureOfDepths
from adaptnet.models import decoder

EXIT = 0.8
VARIANTS = {"vanilla": {}, "MoD": {"mod_capacity": 0.125, "mod_every": 2},
            "MoR": {"layers": 2, "recursions": 2, "router": "expert"},
            "early exit": {"exit_threshold": EXIT}}


def predictor_accuracy(model: torch.nn.Module, x: torch.Tensor) -> float | None:
    """How often MoD's causal predictors agree with top-k membership, on ``x`` in training
    mode (None for a model without MoD blocks)."""
    seen: list[tuple[torch.nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append((m, a[0])))
             for m in model.modules() if isinstance(m, MixtureOfDepths)]
    if not hooks:
        return None
    with torch.no_grad():
        model.train()(x)
        hits = total = 0
        for m, h in seen:
            guess = m.predictor(h).squeeze(-1) > 0
            hits += int((guess == m.last.selected).sum())
            total += guess.numel()
    for h in hooks:
        h.remove()
    model.eval()
    return hits / total


def run(steps: int, max_tokens: int, rounds: int, new_tokens: int) -> dict:
    data = shakespeare(level="char", seq_len=64, max_tokens=max_tokens)
    x, y = data.train.tensors
    xv, yv = data.valid.tensors
    rows, models = {}, {}
    batch = 32
    adaptnet.fit(decoder(vocab_size=data.num_classes), (x[:64], y[:64]), loss="cross_entropy",
                 batch_size=batch, epochs=1, progress=False)  # warm-up: the first fit pays it
    for name, args in VARIANTS.items():
        torch.manual_seed(0)
        model = decoder(vocab_size=data.num_classes, **({"layers": 4} | args))
        n = min(len(x), steps * batch)
        start = time.perf_counter()
        fit = adaptnet.fit(model, (x[:n], y[:n]), loss="cross_entropy", optimizer="adamw",
                           lr=2e-3, weight_decay=0.01, batch_size=batch, epochs=1, seed=0,
                           warmup_steps=min(50, steps // 4), clip_grad_norm=1.0,
                           metrics=("loss",), progress=False)
        seconds = time.perf_counter() - start
        model.eval()
        values = adaptnet.evaluate(model, (xv, yv), loss="cross_entropy",
                                   metrics=("loss", "steps"), batch_size=64)
        rows[name] = {"unique_params": sharing.summary(model).unique,
                      "fit_ms_per_step": seconds / fit.steps * 1e3,
                      "train_steps": fit.steps,
                      "valid_perplexity": math.exp(values["loss"]),
                      "mean_depth": values.get("steps"),
                      "predictor_accuracy": predictor_accuracy(model, xv[:64])}
        models[name] = model.eval()
    xb, yb = x[:batch], y[:batch]

    def loss(model: torch.nn.Module):
        def step() -> torch.Tensor:
            out = model.train()(xb)
            value = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), yb.flatten())
            return value if out.aux is None else value + out.aux
        return step

    params = [p for m in models.values() for p in m.parameters()]
    torch.set_num_threads(2)
    step_ms = medians(time_steps({k: loss(m) for k, m in models.items()}, params, rounds,
                                 max(1, steps // 60), loss=lambda v: v))
    for name in models:
        rows[name]["train_ms_per_step"] = step_ms[name] * 1e3
        models[name].eval()
    prompt = xv[:8, :16]
    decode: dict[str, dict] = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        fns = {f"{name}@{b}": (lambda m=m, b=b: adaptnet.generate(m, prompt[:b], new_tokens))
               for name, m in models.items() for b in (1, 8)}
        ms = medians(time_calls(fns, rounds, 1))
        decode[str(threads)] = {k: {"tokens_per_s": int(k.split("@")[1]) * new_tokens / v}
                                for k, v in ms.items()}
    return {"rows": rows, "decode": decode, "steps": steps, "max_tokens": max_tokens,
            "rounds": rounds, "new_tokens": new_tokens, "train_windows": len(x)}


def markdown(r: dict) -> str:
    base = r["rows"]["vanilla"]
    rows = []
    for name, row in r["rows"].items():
        acc = row["predictor_accuracy"]
        rows.append([name, f"{row['unique_params']:,}",
                     f"{row['unique_params'] / base['unique_params']:.2f}",
                     f"{row['valid_perplexity']:.2f}",
                     f"{row['valid_perplexity'] / base['valid_perplexity'] - 1:+.1%}",
                     f"{row['train_ms_per_step']:.0f}",
                     f"{base['train_ms_per_step'] / row['train_ms_per_step']:.2f}×",
                     f"{row['mean_depth']:.2f}", "" if acc is None else f"{acc:.1%}"])
    speed = []
    for threads, by in r["decode"].items():
        for b in (1, 8):
            v = by[f"vanilla@{b}"]["tokens_per_s"]
            speed.append([threads, str(b)] + [
                f"{by[f'{n}@{b}']['tokens_per_s']:.0f} ({by[f'{n}@{b}']['tokens_per_s'] / v:.2f}×)"
                for n in r["rows"]])
    return "\n".join([
        f"Each decoder trained {base['train_steps']} steps of 32 windows of 64 characters "
        f"(AdamW, seed 0; {r['train_windows']:,} training windows, one epoch); perplexity on "
        "the validation plays in evaluation mode. A short run, equal in steps, not in "
        "compute, and not converged. "
        "Train ms/step: one forward and backward on 32 windows (2 threads), median of "
        f"{r['rounds']} interleaved rounds after training.", "",
        *table(["model", "unique params", "vs vanilla", "valid perplexity", "vs vanilla",
                "train ms/step", "step speed-up", "blocks per token (eval)",
                "MoD predictor agrees with top-k"], rows), "",
        f"Greedy decoding with the KV cache (`adaptnet.generate`, 16-character prompt, "
        f"{r['new_tokens']} new tokens), tokens/s, median of {r['rounds']} interleaved rounds "
        "(vs vanilla):", "",
        *table(["threads", "batch", *r["rows"]], speed)]) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    steps, tokens, rounds, new = (4, 20_000, 1, 4) if args.quick else \
        (600, 400_000, args.rounds or 3, 64)
    publish("tokens", args, run(steps, tokens, rounds, new), markdown)


if __name__ == "__main__":
    main()
