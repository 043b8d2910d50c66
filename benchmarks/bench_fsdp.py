"""Benchmark: FSDP2 (adaptnet.shard) vs DDP step time, 2 CPU processes (gloo), one run.

The same MLP (784→512→512→10, 670k parameters) is trained with AdamW by both
strategies in one ``torchrun`` job, on the same batches; rounds alternate which strategy runs first,
and each figure is the median seconds per step over rounds. FSDP2 all-gathers every
parameter before the forward pass and reduce-scatters gradients; DDP all-reduces
gradients once. On 2 CPU processes over loopback, the memory FSDP2 saves costs time.

    python benchmarks/bench_fsdp.py            # full (about 3 minutes on 2 cores)
    python benchmarks/bench_fsdp.py --quick    # smoke test
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


def worker(out: Path, rounds: int, steps: int, width: int) -> None:
    import torch.distributed as dist

    import adaptnet

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width),
                             nn.ReLU(), nn.Linear(width, 10))

    ddp = nn.parallel.DistributedDataParallel(net())
    fsdp = net()
    adaptnet.shard(fsdp, ["0", "2"])
    opts = {"ddp": torch.optim.AdamW(ddp.parameters(), lr=1e-3),
            "fsdp": torch.optim.AdamW(fsdp.parameters(), lr=1e-3)}
    models = {"ddp": ddp, "fsdp": fsdp}
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)
    times: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    for r in range(rounds + 1):
        for k in names[r % 2:] + names[:r % 2]:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                opts[k].zero_grad(set_to_none=True)
                nn.functional.cross_entropy(models[k](x), y).backward()
                opts[k].step()
            dist.barrier()
            if r:  # the first round warms up
                times[k].append((time.perf_counter() - start) / steps)
    if rank == 0:
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        params = sum(p.numel() for p in net().parameters())
        out.write_text(json.dumps({"ms": med, "rounds": rounds, "steps": steps,
                                   "params": params, "batch_per_rank": 64}))
    dist.destroy_process_group()


def main() -> None:
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        worker(Path(sys.argv[i + 1]), int(sys.argv[i + 2]), int(sys.argv[i + 3]),
               int(sys.argv[i + 4]))
        return
    sys.path.insert(0, str(HERE))
    from _common import parse_args, publish, table

    args = parse_args(__doc__)
    rounds, steps, width = (3, 2, 32) if args.quick else (args.rounds or 15, 20, 512)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fsdp.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(HERE.parent / "src") + os.pathsep + os.environ.get(
                   "PYTHONPATH", "")}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", __file__, "--worker", str(out), str(rounds),
                        str(steps), str(width)], env=env, check=True, timeout=1800)
        result = json.loads(out.read_text())

    def markdown(r: dict) -> str:
        ms = r["ms"]
        return "\n".join([
            f"2 processes (gloo, 1 thread each), {r['params']:,} parameters, batch "
            f"{r['batch_per_rank']} per rank, AdamW; median ms per step over {r['rounds']} "
            f"rounds of {r['steps']} steps, the strategies alternating.", "",
            *table(["strategy", "ms / step", "vs DDP"],
                   [["DDP", f"{ms['ddp']:.2f}", "1.00×"],
                    ["FSDP2 (adaptnet.shard, 2 units + root)", f"{ms['fsdp']:.2f}",
                     f"{ms['fsdp'] / ms['ddp']:.2f}×"]])]) + "\n"

    publish("fsdp", args, result, markdown)


if __name__ == "__main__":
    main()
