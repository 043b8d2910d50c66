"""Benchmarks for adaptnet.sharing, measured side by side in one run.

1. Overhead: forward+backward of a model tied with ``adaptnet.tie`` vs the
   same model tied by hand (plain assignment; ``F.linear(x, W.t())`` for the
   transposed tie). Target: ratio within 1.02.
2. Persistence: ``adaptnet.save``/``load`` vs ``torch.save``/``torch.load``
   (``weights_only=True``) of the state_dict, and safetensors'
   ``save_model``/``load_model``, on a model with 10M unique parameters.
3. Counting: ``adaptnet.summary`` vs ``torchinfo.summary`` on the zoo's tied
   models, against the bytes actually held (parameters counted once per
   storage), with the time each takes.

Variants are interleaved within each round; each figure is the median over
rounds. Writes JSON and a Markdown table to ``benchmarks/results/``.

    python benchmarks/bench_sharing.py            # full (about 3 minutes on 2 cores)
    python benchmarks/bench_sharing.py --quick    # smoke test, tiny sizes
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
import torchinfo
from _common import medians, parse_args, publish, table, time_calls, time_steps, verdict
from torch import nn

import adaptnet
from adaptnet import models


class LM(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        h = self.embed(tokens)
        for block in self.blocks:
            h = torch.tanh(block(h))
        return self.head(h)


class AE(nn.Module):
    def __init__(self, dim: int, code: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(dim, code)
        self.decoder = nn.Linear(code, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.relu(self.encoder(x)))


class HandTiedAE(nn.Module):
    """The hand-written reference: one weight, used transposed in the decoder."""

    def __init__(self, dim: int, code: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(dim, code)
        self.decoder_bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(self.encoder(x)), self.encoder.weight.t(), self.decoder_bias)


def overhead(rounds: int, iters: int, quick: bool) -> list[dict]:
    torch.manual_seed(0)
    vocab, dim, layers, batch, seq = (200, 16, 1, 4, 8) if quick else (8000, 256, 2, 32, 32)
    ours_lm = LM(vocab, dim, layers)
    adaptnet.tie(ours_lm, "head.weight", "embed.weight")
    hand_lm = LM(vocab, dim, layers)
    hand_lm.load_state_dict(ours_lm.state_dict())
    hand_lm.head.weight = hand_lm.embed.weight
    tokens = torch.randint(0, vocab, (batch, seq))

    d, c, n = (32, 8, 16) if quick else (784, 256, 512)
    ours_ae = AE(d, c)
    adaptnet.tie(ours_ae, "decoder.weight", "encoder.weight", transform="transpose")
    hand_ae = HandTiedAE(d, c)
    hand_ae.encoder.load_state_dict(ours_ae.encoder.state_dict())
    with torch.no_grad():
        hand_ae.decoder_bias.copy_(ours_ae.decoder.bias)
    x = torch.randn(n, d)

    cases = [
        ("LM, embedding/head tie (identity)", ours_lm, hand_lm, tokens,
         lambda out: out.logsumexp(-1).mean(), f"V={vocab}, d={dim}, batch {batch}x{seq}"),
        ("Autoencoder, decoder = encoderᵀ", ours_ae, hand_ae, x,
         lambda out: out.square().mean(), f"{d}->{c}->{d}, batch {n}"),
    ]
    rows = []
    for name, ours, hand, inp, loss_fn, shape in cases:
        torch.testing.assert_close(ours(inp), hand(inp))  # same function before timing
        times = time_steps({"adaptnet": lambda m=ours, i=inp: m(i),
                            "hand": lambda m=hand, i=inp: m(i)},
                           [*ours.parameters(), *hand.parameters()], rounds, iters, loss_fn)
        a, h = statistics.median(times["adaptnet"]), statistics.median(times["hand"])
        ratios = [x / y for x, y in zip(times["adaptnet"], times["hand"], strict=True)]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if rounds > 1 else (ratios * 3)
        rows.append({"case": name, "shape": shape, "adaptnet_ms": a * 1e3, "hand_ms": h * 1e3,
                     "ratio": a / h, "round_ratio_q1": q1, "round_ratio_q3": q3,
                     "rounds": rounds, "iters_per_round": iters})
    return rows


def persistence(rounds: int, quick: bool) -> dict:
    torch.manual_seed(0)
    vocab, dim, layers = (500, 32, 2) if quick else (36_000, 256, 12)  # 10,005,504 unique
    model = LM(vocab, dim, layers)
    adaptnet.tie(model, "head.weight", "embed.weight")
    unique = adaptnet.summary(model).unique
    tmp = Path(tempfile.mkdtemp(prefix="adaptnet-bench-"))
    paths = {"adaptnet": tmp / "a.safetensors",
             "adaptnet, fsync disabled": tmp / "n.safetensors",
             "torch": tmp / "t.pt",
             "safetensors.save_model": tmp / "s.safetensors"}

    def save(kind: str) -> None:
        if kind == "adaptnet":
            adaptnet.save(model, paths[kind])
        elif kind == "adaptnet, fsync disabled":  # isolates the cost of durability
            fsync = os.fsync
            os.fsync = lambda fd: None
            try:
                adaptnet.save(model, paths[kind])
            finally:
                os.fsync = fsync
        elif kind == "torch":
            torch.save(model.state_dict(), paths[kind])
        else:
            safetensors.torch.save_model(model, str(paths[kind]))

    def load(kind: str) -> None:
        target = LM(vocab, dim, layers)
        if kind.startswith("adaptnet"):
            adaptnet.load(target, paths[kind])
        elif kind == "torch":
            target.head.weight = target.embed.weight
            target.load_state_dict(torch.load(paths[kind], weights_only=True))
        else:
            target.head.weight = target.embed.weight
            safetensors.torch.load_model(target, str(paths[kind]))
        assert target.head.weight is target.embed.weight

    kinds = list(paths)
    save_t = {k: [] for k in kinds}
    load_t = {k: [] for k in kinds}
    for r in range(rounds):
        for k in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:  # rotate the order
            start = time.perf_counter()
            save(k)
            save_t[k].append(time.perf_counter() - start)
            start = time.perf_counter()
            load(k)
            load_t[k].append(time.perf_counter() - start)
    out = {"unique_params": unique, "rounds": rounds, "formats": {}}
    for k in kinds:
        out["formats"][k] = {"save_ms": statistics.median(save_t[k]) * 1e3,
                             "load_ms": statistics.median(load_t[k]) * 1e3,
                             "bytes": paths[k].stat().st_size}
        paths[k].unlink()
    tmp.rmdir()
    return out


def held(model: nn.Module) -> int:
    """Parameter elements actually stored: one count per distinct storage."""
    storages = {p.untyped_storage().data_ptr(): p.numel()
                for _, p in model.named_parameters(remove_duplicate=False)}
    return sum(storages.values())


def counting(rounds: int) -> list[dict]:
    """adaptnet.summary vs torchinfo.summary (total_params) on tied zoo models."""
    torch.manual_seed(0)
    cases = {
        "LSTM LM, embedding = output (lstm_lm)": (models.lstm_lm(1000, 64, 64, tied=True),
                                                  torch.zeros(2, 5, dtype=torch.long)),
        "autoencoder, decoder = encoderᵀ (tied_autoencoder)": (models.tied_autoencoder(64, 32),
                                                                torch.zeros(2, 64)),
        "ALBERT, 6 layers share one (albert_encoder)": (models.albert_encoder(sharing="all"),
                                                        torch.zeros(2, 40)),
        "Siamese, one encoder for both inputs (siamese)": (models.siamese(),
                                                           torch.zeros(2, 2, 64)),
    }
    out = []
    for case, (model, x) in cases.items():
        model.eval()
        ours = adaptnet.summary(model)
        theirs = torchinfo.summary(model, input_data=x, verbose=0)
        ms = medians(time_calls({"adaptnet": lambda m=model: adaptnet.summary(m),
                                 "torchinfo": lambda m=model, x=x: torchinfo.summary(
                                     m, input_data=x, verbose=0)}, rounds, 1))
        out.append({"case": case, "held": held(model), "adaptnet_unique": ours.unique,
                    "adaptnet_per_use": ours.per_use, "torchinfo_total": theirs.total_params,
                    "adaptnet_ms": ms["adaptnet"] * 1e3, "torchinfo_ms": ms["torchinfo"] * 1e3})
    return out


def markdown(result: dict) -> str:
    rows = [[r["case"], r["shape"], f"{r['adaptnet_ms']:.3f}", f"{r['hand_ms']:.3f}",
             f"{r['ratio']:.3f} ({verdict(r['ratio'] <= 1.02)})",
             f"{r['round_ratio_q1']:.3f} – {r['round_ratio_q3']:.3f}"]
            for r in result["overhead"]]
    r0 = result["overhead"][0]
    lines = ["**Overhead of a tied model vs the same model tied by hand.**", "",
             *table(["case", "shape", "adaptnet (ms/step)", "by hand (ms/step)",
                     "ratio (≤ 1.02)", "per-round ratio, IQR"], rows), "",
             f"Ratio = median of {r0['rounds']} interleaved rounds (adaptnet) / median "
             f"(by hand); each round times {r0['iters_per_round']} forward+backward steps.", ""]
    p = result["persistence"]
    ref = p["formats"]["torch"]
    rows = [[k, f"{f['save_ms']:.0f}", f"{f['load_ms']:.0f}", f"{f['bytes'] / 1e6:.2f}",
             f"{f['save_ms'] / ref['save_ms']:.2f}", f"{f['load_ms'] / ref['load_ms']:.2f}"]
            for k, f in p["formats"].items()]
    lines += [f"**Save and load**, tied LM with {p['unique_params']:,} unique parameters "
              f"(median of {p['rounds']} rounds, formats rotated, page cache warm):", "",
              *table(["format", "save (ms)", "load (ms)", "file (MB)", "save vs torch",
                      "load vs torch"], rows), ""]
    rows = [[c["case"], f"{c['held']:,}", f"{c['adaptnet_unique']:,}",
             "yes" if c["adaptnet_unique"] == c["held"] else "**no**",
             f"{c['adaptnet_per_use']:,}", f"{c['torchinfo_total']:,}",
             "yes" if c["torchinfo_total"] == c["held"] else "**no**",
             f"{c['adaptnet_ms']:.2f}", f"{c['torchinfo_ms']:.2f}"]
            for c in result["counting"]]
    lines += ["**Counting parameters of tied models**: `adaptnet.summary` vs "
              "`torchinfo.summary` (1.8.0, `total_params`), against the elements actually "
              "stored (one count per distinct storage).", "",
              *table(["model", "stored", "adaptnet unique", "right?", "adaptnet per use",
                      "torchinfo total", "right?", "adaptnet ms", "torchinfo ms"], rows), "",
              f"Times: median of {result['counting_rounds']} interleaved calls; torchinfo "
              "runs a forward pass, adaptnet does not."]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    rounds = args.rounds or (3 if args.quick else 31)
    publish("sharing", args, {
        "overhead": overhead(rounds, 5 if args.quick else 10, args.quick),
        "persistence": persistence(rounds if args.quick else 9, args.quick),
        "counting": counting(rounds), "counting_rounds": rounds,
    }, markdown)


if __name__ == "__main__":
    main()
