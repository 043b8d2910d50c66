"""Benchmark: per-token depth on character-level Shakespeare, at equal training compute.

Four decoders from the zoo's ``decoder`` (width 128, 4 heads, rotary
positions, output tied to the embedding; 64-character windows):

- *vanilla*: 4 blocks;
- *MoD*: 4 blocks, blocks 2 and 4 Mixture-of-Depths at capacity 12.5%
  (the paper's setting);
- *MoR*: 2 shared blocks applied up to 2 times per token (expert choice,
  recursion-wise KV caching);
- *early exit*: 4 blocks, each token leaving at the first block whose
  shared readout reaches confidence ``EXIT``.

Equal compute: each variant's training forward multiply-adds per token
(``adaptnet.count_macs`` on a training batch) set its number of steps, so
that every variant spends vanilla's ``BUDGET`` steps' worth: a cheaper
model takes more steps. AdamW (lr 2e-3, 100 warm-up steps, cosine decay over
the run), batches of 32 windows drawn at random from the 1M-character
training split; validation perplexity (evaluation mode: MoD/MoR decide by
their causal predictors, as when decoding) after each of ``POINTS`` equal
parts of the run; seeds 0, 1, 2 (initialisation and batches). The budget is
long enough for the curves to flatten or turn: the table of curves gives the
change over the last part, where each run was lowest and its training
perplexity there (fitting less vs overfitting more); the table reports
perplexity at the end (equal compute) and at the lowest validation point
(early stopping at those points). Then, for each seed's four models, with nothing else
running: the causal predictors' agreement with top-k membership and what routing
by them instead of top-k over the window costs in perplexity, the median ms
per training step (2 threads) and greedy decoding throughput with the KV cache
(``adaptnet.generate``, a 16-character prompt, 64 new tokens) at batch 1 and
8, 1 and 2 threads, the variants interleaved, each a ratio to the same seed's
vanilla model.

Runs go to ``runs/bench/tokens/`` (one directory per variant, setting and
seed, checkpointed every ``CHECKPOINT`` steps): the benchmark can be cut and
run again; a finished run is read back, a cut one resumes where it stopped.
A seed is done when its four runs are trained and timed: its figures are kept
in ``benchmarks/results/runs/tokens/<setting>/seed-<S>.json`` (committed) and
never trained or timed again, so the seeds can be spread over sessions even
when ``runs/`` (the weights, which git ignores) is lost between them.
``--train-only`` trains (or resumes) and stops before timing, so that the
timing can run later with nothing else on the machine; it skips a run that
another process is training, so two ``--train-only`` processes, one per core,
share the runs between them.

    python benchmarks/bench_tokens.py               # full (hours on 2 cores)
    python benchmarks/bench_tokens.py --train-only  # the training part only
    python benchmarks/bench_tokens.py --quick       # smoke test
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from pathlib import Path

import torch
from _common import (
    RESULTS,
    medians,
    parse_args,
    publish,
    runs_root,
    show,
    spread,
    table,
    time_calls,
    time_steps,
    write_whole,
)
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import adaptnet
from adaptnet import sharing
from adaptnet.data import shakespeare
from adaptnet.dynamic import MixtureOfDepths, MixtureOfRecursions
from adaptnet.errors import RunLockedError
from adaptnet.models import decoder

EXIT = 0.8
BATCH = 32
BUDGET, POINTS, CHECKPOINT = 8000, 8, 500  # vanilla steps; validation points per run
OPTIM = {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.01, "clip_grad_norm": 1.0,
         "scheduler": "CosineAnnealingLR", "eta_min": 2e-4, "warmup_steps": 100}
VARIANTS = {"vanilla": {}, "MoD": {"capacity": 0.125, "every": 2},
            "MoR": {"layers": 2, "recursions": 2, "router": "expert"},
            "early exit": {"threshold": EXIT}}


def build(name: str, vocab: int, seed: int, width: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return decoder(vocab_size=vocab, d_model=width, **({"layers": 4} | VARIANTS[name]))


def macs_per_token(model: torch.nn.Module, x: torch.Tensor, training: bool) -> float:
    model.train(training)
    with torch.no_grad(), adaptnet.count_macs() as macs:
        model(x)
    return macs.total / x.numel()


def predictor_accuracy(model: torch.nn.Module, x: torch.Tensor) -> float | None:
    """How often the causal predictors (MoD's, and MoR's for its later steps) agree with
    top-k membership, on ``x`` in training mode (None for a model without them)."""
    guesses: dict[torch.nn.Module, torch.Tensor] = {}
    hooks = [p.register_forward_hook(lambda p, a, out: guesses.__setitem__(p, out[..., 0] > 0))
             for m in model.modules() if isinstance(m, MixtureOfDepths | MixtureOfRecursions)
             for p in ([m.predictor] if isinstance(m, MixtureOfDepths) else m.predictors)]
    if not hooks:
        return None
    hits = total = 0
    with torch.no_grad():
        out = model.train()(x)
        routers = [m for m in model.blocks if isinstance(m, MixtureOfDepths | MixtureOfRecursions)]
        for m, result in zip(routers, out.layers, strict=True):
            if isinstance(m, MixtureOfDepths):
                pairs = [(guesses[m.predictor], result.selected)]
            else:  # step r + 1's: "ran more than r + 1 steps"
                steps = result.depth // len(m.blocks)
                pairs = [(guesses[p], steps > r + 1) for r, p in enumerate(m.predictors)]
            for guess, truth in pairs:
                hits += int((guess == truth).sum())
                total += guess.numel()
    for hook in hooks:
        hook.remove()
    model.eval()
    return hits / total


def routing_perplexity(model: torch.nn.Module, xv: torch.Tensor, yv: torch.Tensor
                       ) -> dict[str, float] | None:
    """Validation perplexity routed by the causal predictors (evaluation mode, as reported
    and as decoding routes) and by top-k over each whole window (training mode, which sees
    later tokens' router scores): what routing causally costs. None without routers."""
    if not any(isinstance(m, MixtureOfDepths | MixtureOfRecursions) for m in model.modules()):
        return None
    ppl = {}
    for mode, training in (("causal", False), ("top_k", True)):
        model.train(training)
        total = 0.0
        with torch.no_grad():
            for i in range(0, len(xv), 256):
                logits = model(xv[i:i + 256]).output
                total += float(torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), yv[i:i + 256].flatten(), reduction="sum"))
        ppl[mode] = math.exp(total / yv.numel())
    model.eval()
    return ppl


def train(model: torch.nn.Module, train_set: TensorDataset, val: tuple, steps: int,
          seed: int, where: Path) -> dict:
    """``steps`` AdamW steps on random batches, validated ``POINTS`` times, checkpointed in
    ``where``: a finished run is read back, a cut one resumes."""
    per = steps // POINTS
    sampler = RandomSampler(train_set, num_samples=per * BATCH,
                            generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(train_set, batch_size=BATCH, sampler=sampler, drop_last=True)
    optim = {k: v for k, v in OPTIM.items() if k != "eta_min"}
    fit = adaptnet.fit(model, loader, val=val, loss="cross_entropy", epochs=POINTS, seed=seed,
                       **optim | {"warmup_steps": min(OPTIM["warmup_steps"], per)},
                       scheduler_args={"T_max": per * POINTS, "eta_min": OPTIM["eta_min"]},
                       metrics=("loss", "steps"), progress=False, run_dir=where,
                       resume=True, checkpoint_every=CHECKPOINT)
    curve = [math.exp(row["val/loss"]) for row in fit.history]
    return {"steps": fit.steps, "curve": curve, "valid_perplexity": curve[-1],
            "train_curve": [math.exp(row["train/loss"]) for row in fit.history],
            "mean_depth": fit.history[-1]["val/steps"]}


def directory(root: Path, name: str, steps: int, max_tokens: int, width: int, seed: int
              ) -> Path:
    """Where a run lives, named by everything that sets it but the seed."""
    setting = [name, VARIANTS[name], steps, POINTS, BATCH, OPTIM, max_tokens, width, EXIT]
    key = hashlib.sha1(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:10]
    return root / f"{name.replace(' ', '_')}-{key}" / f"seed-{seed}"


def run(budget: int, max_tokens: int, width: int, rounds: int, new_tokens: int,
        seeds: list[int], root: Path, keep: Path, train_only: bool) -> dict | None:
    data = shakespeare(level="char", seq_len=64, max_tokens=max_tokens)
    x, y = data.train.tensors
    xv, yv = data.valid.tensors
    vocab = data.num_classes
    xb, yb = x[:BATCH], y[:BATCH]
    probe = {name: build(name, vocab, 0, width) for name in VARIANTS}
    macs = {name: {"train": macs_per_token(m, xb, True), "eval": macs_per_token(m, xb, False)}
            for name, m in probe.items()}
    steps = {name: POINTS * round(budget * macs["vanilla"]["train"] / m["train"] / POINTS)
             for name, m in macs.items()}
    setting = [VARIANTS, steps, POINTS, BATCH, OPTIM, max_tokens, width, EXIT, rounds,
               new_tokens]
    keep = keep / hashlib.sha1(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:10]
    measured = []
    for seed in seeds:
        kept = keep / f"seed-{seed}.json"
        if kept.is_file():
            measured.append(json.loads(kept.read_text()))
            continue
        runs, models = {}, {}
        for name in VARIANTS:
            model = build(name, vocab, seed, width)
            where = directory(root, name, steps[name], max_tokens, width, seed)
            try:
                runs[name] = {"seed": seed, "run_dir": str(where), **train(
                    model, TensorDataset(x, y), (xv, yv), steps[name], seed, where)}
            except RunLockedError:
                if not train_only:
                    raise
                print(f"{name} {seed}: another process is training it; skipped", flush=True)
                continue
            print(name, seed, runs[name], flush=True)
            models[name] = model
        if train_only:
            continue
        seed_result = {"seed": seed, "runs": runs, **measure(
            models, xb, yb, (xv, yv), rounds, new_tokens, 10 if budget > 100 else 1)}
        keep.mkdir(parents=True, exist_ok=True)
        write_whole(kept, (json.dumps(seed_result, indent=2) + "\n").encode())
        measured.append(seed_result)
    if train_only:
        return None
    rows = {}
    for name in VARIANTS:
        ppl = [m["runs"][name]["valid_perplexity"] for m in measured]
        best = [min(m["runs"][name]["curve"]) for m in measured]
        accuracy = [m["predictor_accuracy"][name] for m in measured]
        routed = [m["routing_perplexity"][name] for m in measured]
        rows[name] = {"unique_params": sharing.summary(probe[name]).unique,
                      "train_macs_per_token": macs[name]["train"],
                      "eval_macs_per_token": macs[name]["eval"],
                      "train_steps": steps[name],
                      "valid_perplexity": spread(ppl),
                      "vs_vanilla": spread([p / m["runs"]["vanilla"]["valid_perplexity"] - 1
                                            for p, m in zip(ppl, measured, strict=True)]),
                      "best_valid_perplexity": spread(best),
                      "best_vs_vanilla": spread([p / min(m["runs"]["vanilla"]["curve"]) - 1
                                                 for p, m in zip(best, measured, strict=True)]),
                      "mean_depth": statistics.median(m["runs"][name]["mean_depth"]
                                                      for m in measured),
                      "predictor_accuracy": None if accuracy[0] is None else spread(accuracy),
                      "causal_routing_cost": None if routed[0] is None else spread(
                          [r["causal"] / r["top_k"] - 1 for r in routed]),
                      "train_ms_per_step": spread([m["train_ms_per_step"][name]
                                                   for m in measured]),
                      "step_speedup": spread([m["train_ms_per_step"]["vanilla"]
                                              / m["train_ms_per_step"][name]
                                              for m in measured])}
    decode = {threads: {key: {"tokens_per_s": spread([m["decode"][threads][key]["tokens_per_s"]
                                                      for m in measured]),
                              "vs_vanilla": spread([m["decode"][threads][key]["vs_vanilla"]
                                                    for m in measured])}
                        for key in measured[0]["decode"][threads]}
              for threads in measured[0]["decode"]}
    return {"rows": rows, "runs": {name: [m["runs"][name] for m in measured]
                                   for name in VARIANTS},
            "decode": decode, "budget": budget, "seeds": seeds, "max_tokens": max_tokens,
            "width": width, "rounds": rounds, "new_tokens": new_tokens,
            "train_windows": len(x), "valid_windows": len(xv)}


def measure(models: dict[str, torch.nn.Module], xb: torch.Tensor, yb: torch.Tensor,
            val: tuple[torch.Tensor, torch.Tensor], rounds: int, new_tokens: int,
            steps_per_round: int) -> dict:
    """One seed's trained models, timed with nothing else running: the causal predictors'
    agreement and what causal routing costs in perplexity, ms per training step (2
    threads) and greedy decoding (1 and 2 threads, batches of 1 and 8), the variants
    interleaved in every round."""
    xv = val[0]
    accuracy = {name: predictor_accuracy(m, xv[:256]) for name, m in models.items()}
    routed = {name: routing_perplexity(m, *val) for name, m in models.items()}

    def loss(model: torch.nn.Module):
        def step() -> torch.Tensor:
            out = model.train()(xb)
            value = torch.nn.functional.cross_entropy(out.output.flatten(0, 1), yb.flatten())
            return value if out.aux_loss is None else value + out.aux_loss
        return step

    params = [p for m in models.values() for p in m.parameters()]
    torch.set_num_threads(2)
    step_ms = medians(time_steps({k: loss(m) for k, m in models.items()}, params, rounds,
                                 steps_per_round, loss=lambda v: v))
    for m in models.values():
        m.eval()
    prompt = xv[:8, :16]
    decode: dict[str, dict] = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        fns = {f"{name}@{b}": (lambda m=m, b=b: adaptnet.generate(m, prompt[:b], new_tokens))
               for name, m in models.items() for b in (1, 8)}
        ms = medians(time_calls(fns, rounds, 1))
        decode[str(threads)] = {
            key: {"tokens_per_s": int(key.split("@")[1]) * new_tokens / ms[key],
                  "vs_vanilla": ms[f"vanilla@{key.split('@')[1]}"] / ms[key]}
            for key in fns}
    return {"predictor_accuracy": accuracy, "routing_perplexity": routed,
            "train_ms_per_step": {k: v * 1e3 for k, v in step_ms.items()}, "decode": decode}


def markdown(r: dict) -> str:
    base = r["rows"]["vanilla"]
    rows, curves = [], []
    for name, row in r["rows"].items():
        acc, cost = row["predictor_accuracy"], row["causal_routing_cost"]
        rows.append([name, f"{row['unique_params']:,}",
                     f"{row['unique_params'] / base['unique_params']:.2f}",
                     f"{row['train_macs_per_token'] / base['train_macs_per_token']:.2f}",
                     f"{row['train_steps']:,}", show(row["valid_perplexity"], ".2f"),
                     show(row["vs_vanilla"], "+.1%"), show(row["best_valid_perplexity"], ".2f"),
                     show(row["best_vs_vanilla"], "+.1%"), show(row["train_ms_per_step"], ".0f"),
                     f"{show(row['step_speedup'], '.2f')}×",
                     f"{row['mean_depth']:.2f}", "" if acc is None else show(acc, ".1%"),
                     "" if cost is None else show(cost, "+.1%")])
        for run in r["runs"][name]:
            low = run["curve"].index(min(run["curve"]))
            curves.append([name, str(run["seed"]), *(f"{p:.3f}" for p in run["curve"]),
                           f"{run['curve'][-1] / run['curve'][-2] - 1:+.2%}",
                           f"{low + 1}/{POINTS}", f"{run['train_curve'][low]:.3f}",
                           f"{run['curve'][low] / run['train_curve'][low]:.2f}",
                           f"{run['train_curve'][-1]:.3f}"])
    speed = []
    for threads, by in r["decode"].items():
        for b in (1, 8):
            speed.append([threads, str(b)] + [
                f"{show(by[f'{n}@{b}']['tokens_per_s'], '.0f')} "
                f"({show(by[f'{n}@{b}']['vs_vanilla'], '.2f')}×)" for n in r["rows"]])
    points = [f"after {i + 1}/{POINTS}" for i in range(POINTS)]
    return "\n".join([
        f"Equal training compute: every variant spends the forward multiply-adds of "
        f"{base['train_steps']:,} vanilla steps (batches of {BATCH} windows of 64 characters "
        f"drawn from {r['train_windows']:,} training windows); seeds "
        f"{', '.join(map(str, r['seeds']))}, median (min–max). Perplexity on the "
        f"{r['valid_windows']:,} validation windows in evaluation mode; \"vs vanilla\" pairs "
        "each seed with vanilla's. Train ms/step: one forward and backward on 32 windows "
        f"(2 threads), each seed's median of {r['rounds']} interleaved rounds after "
        "training, and the ratio to the same seed's vanilla. \"Lowest\": the lowest of the "
        f"{POINTS} validation points of each run (early stopping at those points; the timed "
        "models are the end-of-run weights). Causal routing's cost: the end-of-run "
        "validation perplexity routed by the causal predictors over the same routed by "
        "top-k over each whole window (which sees later tokens).", "",
        *table(["model", "unique params", "vs vanilla", "train MACs/token vs vanilla",
                "steps", "valid perplexity at the end", "vs vanilla", "lowest valid perplexity",
                "vs vanilla", "train ms/step", "step speed-up",
                "blocks per token (eval)", "causal predictors agree with top-k",
                "causal routing's perplexity cost"], rows), "",
        "Validation perplexity through each run, the change over the last part, the point "
        "where it was lowest, the training perplexity over the part that ends there (training "
        "mode, the mean over its batches; early exit's is the mean loss of its four exits, "
        "so not comparable), validation over training there, and the training perplexity "
        "over the last part:", "",
        *table(["model", "seed", *points, "last part", "lowest at", "train perplexity there",
                "valid / train there", "train perplexity at the end"], curves), "",
        f"Greedy decoding with the KV cache (`adaptnet.generate`, 16-character prompt, "
        f"{r['new_tokens']} new tokens), every seed's models, tokens/s and the ratio to the "
        f"same seed's vanilla, median (min–max) over seeds of the median of {r['rounds']} "
        "interleaved rounds:", "",
        *table(["threads", "batch", *r["rows"]], speed)]) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    budget, tokens, width, rounds, new, seeds = (8, 4_000, 32, 1, 4, [0]) if args.quick \
        else (BUDGET, 1_000_000, 128, args.rounds or 3, 64, [0, 1, 2])
    keep = args.out / "tokens-quick-kept" if args.quick else RESULTS / "runs" / "tokens"
    result = run(budget, tokens, width, rounds, new, seeds, runs_root("tokens", args), keep,
                 args.train_only)
    publish("tokens", args, result, markdown)


if __name__ == "__main__":
    main()
