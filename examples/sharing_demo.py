"""End-to-end weight sharing: tie, train, account, save, reload into an untied model.

Run with ``make demo`` (or ``python examples/sharing_demo.py --steps 300``).
Uses synthetic data, so it needs nothing beyond the package itself.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import safetensors.torch
import torch
from rich.console import Console
from torch import nn

import adaptnet


class Autoencoder(nn.Module):
    """64 -> 16 -> 64. Tied, the decoder is the encoder's transpose."""

    def __init__(self, dim: int = 64, code: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Linear(dim, code)
        self.decoder = nn.Linear(code, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 64) -> (B, 64)
        return self.decoder(torch.relu(self.encoder(x)))


class TinyLM(nn.Module):
    """Embedding -> tanh(Linear) -> vocabulary head. Tied, the head is the embedding."""

    def __init__(self, vocab: int = 1000, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        return self.head(torch.tanh(self.hidden(self.embed(tokens))))


def low_rank_data(n: int, dim: int = 64, rank: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, dim, generator=g) / rank**0.5
    return torch.relu(torch.randn(n, rank, generator=g)) @ basis + 0.01 * torch.randn(
        n, dim, generator=g)


def main(steps: int = 300, out: Path = Path("runs/demo"), console: Console | None = None) -> dict:
    console = console or Console()
    torch.manual_seed(0)
    console.rule("[bold]adaptnet: tied weights, end to end")

    # 1. Tie: the decoder *is* the encoder's transpose, one tensor trained through both uses.
    model = Autoencoder()
    adaptnet.tie(model, "decoder.weight", "encoder.weight", transform="transpose")
    console.print(adaptnet.summary(model))

    # 2. Train a few steps.
    data = low_rank_data(2048)
    opt = torch.optim.Adam(adaptnet.param_groups(model), lr=3e-3)
    first = last = float("nan")
    start = time.perf_counter()
    for step in range(steps):
        batch = data[(step * 128) % 2048:][:128]
        loss = nn.functional.mse_loss(model(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if step == 0 else first
        last = loss.item()
    console.print(f"trained {steps} steps in {time.perf_counter() - start:.1f}s: "
                  f"reconstruction MSE {first:.4f} -> {last:.4f}")
    adaptnet.assert_tied(model)  # still one tensor after optimizer steps

    # 3. Save: one copy per tensor, the tie in the manifest, written atomically.
    path = adaptnet.save(model, out / "autoencoder.safetensors")
    console.print(f"saved {path} ({path.stat().st_size:,} bytes)")

    # 4. Reload into a model built *without* the tie: the tie comes back.
    fresh = adaptnet.load(Autoencoder(), path)
    same = torch.equal(fresh(data[:256]), model(data[:256]))
    restored = fresh.decoder.parametrizations.weight.original is fresh.encoder.weight
    console.print(f"reloaded into an untied Autoencoder: tie restored = {restored}, "
                  f"outputs identical = {same}")

    # 5. What plain PyTorch does to the classic LM tie, and how adaptnet repairs it.
    lm = TinyLM()
    lm.head.weight = lm.embed.weight  # the usual way
    try:
        safetensors.torch.save_file(lm.state_dict(), str(out / "plain.safetensors"))
        refused = False
    except RuntimeError:
        refused = True
    lm2 = TinyLM()
    adaptnet.tie(lm2, "head.weight", "embed.weight")
    lm2.load_state_dict(lm.state_dict(), assign=True)
    broken = lm2.head.weight is not lm2.embed.weight
    repaired = adaptnet.retie(lm2)
    s = adaptnet.summary(lm2)
    console.print(
        f"LM tie: safetensors.save_file refuses shared tensors = {refused}; "
        f"load_state_dict(assign=True) broke the tie = {broken}; retie repaired {repaired}; "
        f"{s.unique:,} unique parameters ({s.per_use:,} per use)"
    )
    return {"first_loss": first, "last_loss": last, "restored": restored, "identical": same,
            "retied": repaired, "lm_unique": s.unique}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    args = parser.parse_args()
    result = main(args.steps, args.out)
    ok = result["restored"] and result["identical"] and result["last_loss"] < result["first_loss"]
    raise SystemExit(0 if ok else 1)
