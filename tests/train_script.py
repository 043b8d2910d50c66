"""A small training run for the subprocess tests (resume after SIGKILL, DDP under torchrun).

    python tests/train_script.py RUN_DIR OUT.safetensors [--resume] [--ddp-model] [--batch N]
        [--loader]

``--loader``: the data comes from a DataLoader: under torchrun with a shuffling
``DistributedSampler``; in one process with a batch sampler that yields, per
step, the union of what the two ranks' samplers yield (fit calls ``set_epoch``).
"""

from __future__ import annotations

import atexit
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import adaptnet


class Net(nn.Module):
    """Dropout (so RNG state matters), a layer used twice, a tie."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.mid = nn.Linear(16, 16)
        self.mid2 = nn.Linear(16, 16)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(16, 3)
        adaptnet.tie(self, "mid2.weight", "mid.weight")

    def forward(self, x):
        h = self.drop(torch.relu(self.mid(torch.relu(self.inp(x)))))
        return self.out(torch.relu(self.mid2(torch.relu(self.mid(h)))))


class Branchy(nn.Module):
    """A rare per-sample path: on many steps a rank's shard never takes it (unused in DDP)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.common = nn.Linear(16, 3)
        self.rare = nn.Linear(16, 3)
        self.back = nn.Linear(16, 8)
        adaptnet.tie(self, "back.weight", "inp.weight", transform="transpose")

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.relu(self.inp(x + 0.1 * self.back(h)))
        return adaptnet.branch(x[:, 0] > 1.5, self.rare, self.common, h)


class Union:
    """The global batches of a 2-rank ``DistributedSampler`` (batch ``b`` per rank)."""

    def __init__(self, n: int, b: int, seed: int) -> None:
        self.n, self.b, self.seed, self.epoch = n, b, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // (2 * self.b)

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(
            self.seed + self.epoch)).tolist()
        ranks = perm[0::2], perm[1::2]
        for i in range(len(self)):
            yield [j for r in ranks for j in r[i * self.b:(i + 1) * self.b]]


def loader(x: torch.Tensor, y: torch.Tensor, batch: int) -> DataLoader:
    data = TensorDataset(x, y)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:  # before the process group exists: name the replicas and the rank
        return DataLoader(data, batch_size=batch, sampler=DistributedSampler(
            data, num_replicas=world, rank=rank, seed=7))
    return DataLoader(data, batch_sampler=Union(len(x), batch // 2, seed=7))


def group_left_behind() -> None:
    """Registered before fit, so it runs after fit's exit handler: the group must be gone."""
    if dist.is_initialized():
        print("the process group fit made is still alive at exit", file=sys.stderr)
        os._exit(3)


def main() -> None:
    atexit.register(group_left_behind)
    run_dir, out = sys.argv[1], sys.argv[2]
    batch = int(sys.argv[sys.argv.index("--batch") + 1]) if "--batch" in sys.argv else 16
    ddp_model = "--ddp-model" in sys.argv
    torch.manual_seed(0)
    x, y = torch.randn(512, 8), torch.randint(0, 3, (512,))
    model = Branchy() if ddp_model else Net(dropout=0.2)
    data = loader(x, y, batch) if "--loader" in sys.argv else (x, y)
    adaptnet.fit(model, data, loss="cross_entropy", optimizer="adamw", lr=3e-3,
                 weight_decay=0.01, l1=1e-5, clip_grad_norm=1.0, scheduler="StepLR",
                 scheduler_args={"step_size": 40, "gamma": 0.5}, warmup_steps=5,
                 epochs=4 if ddp_model else 12, batch_size=batch, run_dir=run_dir,
                 checkpoint_every=None if ddp_model else 5, resume="--resume" in sys.argv,
                 seed=1)
    if int(os.environ.get("RANK", "0")) == 0:
        adaptnet.save(model, out)


if __name__ == "__main__":
    main()
