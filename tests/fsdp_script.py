"""FSDP2 training for the torchrun test: a dynamic model with ties, sharded by adaptnet.shard.

    torchrun --nproc_per_node=2 tests/fsdp_script.py OUT_DIR        # 2 ranks, batch 8 each
    python tests/fsdp_script.py OUT_DIR                             # 1 process, batch 16
        [--epochs N] [--resume]

Checkpoints go to ``OUT_DIR/run`` every 5 steps (12 steps an epoch), all kept;
``--resume`` continues from the newest one there. Writes ``OUT_DIR/weights.safetensors``
(adaptnet.save of the trained model: rank 0, the shards gathered) and, under torchrun,
``OUT_DIR/reloaded.safetensors`` (a fresh sharded model loaded from the first file and
saved again) and ``OUT_DIR/plan.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn

import adaptnet


class Net(nn.Module):
    """An embedding tied to the head, a transposed tie, a block shared by two layers, and a
    rare per-sample branch that some ranks never take in a step (unused parameters). The
    branch is not a unit of its own: a unit must run on every rank at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.inp = nn.Linear(8, 8)
        self.back = nn.Linear(8, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh())
                                     for _ in range(2)])
        self.mid = nn.Linear(8, 8)  # used by every sample: a unit of its own
        self.rare = nn.Linear(8, 8)
        self.head = nn.Linear(8, 12, bias=False)
        adaptnet.tie(self, "head.weight", "embed.weight")
        adaptnet.tie(self, "back.weight", "inp.weight", transform="transpose")
        adaptnet.share(self, "blocks")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, 12)
        h = torch.tanh(self.inp(self.embed(tokens)))
        h = h + 0.1 * self.back(h)
        for block in self.blocks:
            h = block(h)
        h = torch.tanh(self.mid(h))
        h = adaptnet.branch(tokens == 11, self.rare, lambda t: t, h)  # 1 in 12 samples
        return self.head(h)


def main() -> None:
    out = Path(sys.argv[1])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    x = torch.randint(0, 12, (192,))
    y = (x * 5 + 3) % 12
    model = Net()
    if world > 1:
        dist.init_process_group("gloo")
        plan = adaptnet.shard(model, ["blocks.0", "mid"])
        if dist.get_rank() == 0:
            (out / "plan.json").write_text(json.dumps({"units": plan.units,
                                                       "merged": plan.merged}))
    adaptnet.fit(model, (x, y), loss="cross_entropy", optimizer="adamw", lr=0.01,
                 weight_decay=0.01, l1=1e-5, batch_size=16 // world, seed=1, strategy="fsdp",
                 epochs=int(sys.argv[sys.argv.index("--epochs") + 1])
                 if "--epochs" in sys.argv else 3,
                 run_dir=out / "run", checkpoint_every=5, keep_checkpoints=10,
                 resume="--resume" in sys.argv)
    if world > 1 and dist.get_rank() == 0:  # a slow disk on rank 0: no rank may go on early
        write = safetensors.torch.save_file
        safetensors.torch.save_file = lambda *a, **k: (time.sleep(1), write(*a, **k))[1]
    adaptnet.save(model, out / "weights.safetensors")  # every rank gathers; rank 0 writes
    assert (out / "weights.safetensors").is_file(), "save() returned before the file was written"
    if world > 1 and "--resume" not in sys.argv:
        fresh = Net()
        adaptnet.shard(fresh, ["blocks.0", "mid"])
        adaptnet.load(fresh, out / "weights.safetensors")
        adaptnet.assert_tied(fresh)
        adaptnet.save(fresh, out / "reloaded.safetensors")
    if world > 1:
        dist.barrier()  # gloo: a rank torn down while its peer is still in the last
        dist.destroy_process_group()  # collective aborts at exit (1 run in ~20 without)


if __name__ == "__main__":
    main()
