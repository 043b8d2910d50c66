"""Benchmark: adaptnet's EarlyExit against earlyon 0.3.0 on one trained 14-layer ResNet.

The peer, ``earlyon`` (PyPI, in the ``bench`` extra), attaches exit heads to a
backbone with forward hooks. Its batched API, ``forward_inference_batched``,
leaves a batch at an exit only when every sample in it is confident there;
its batch-1 API leaves per sample. adaptnet's :class:`~adaptnet.EarlyExit`
(here built by :func:`adaptnet.transfer.attach_exits` on the unmodified
backbone) lets each sample of a batch leave at its own exit.

One network serves all three: earlyon's CIFAR ResNet-14 (3 stages of 2 basic
blocks, 16/32/64 channels; its stem takes 1 channel here), with earlyon's
exit heads after each stage and its default exit rule (softmax confidence ≥
0.9, 0.85, 0.8; temperature 1). It is trained once, jointly on every exit
(earlyon's loss weights 0.15, 0.2, 0.25, 0.4), with ``adaptnet.fit`` on
Fashion-MNIST (54,000 training images), and the same weights are loaded into
earlyon's wrapper. Then, over all 10,000 test images, at batch 32 and 256, at 1
and 2 threads, interleaved rounds time:

- *plain*: the backbone alone (no exits);
- *earlyon batched*: ``EarlyExitWrapper.forward_inference_batched``;
- *adaptnet EarlyExit*: per-sample exits inside the batch.

Each sample's exit under adaptnet is checked against earlyon's batch-1 API on
all 10,000 images.

    python benchmarks/bench_earlyon.py           # full (about 25 minutes on 2 cores)
    python benchmarks/bench_earlyon.py --quick   # smoke test: 256 images, 1 epoch
"""

from __future__ import annotations

import copy
import warnings

import torch
from _common import medians, parse_args, publish, table, time_calls
from earlyon import EarlyExitConfig, EarlyExitHead, EarlyExitWrapper, ExitPoint
from earlyon.models.cifar_resnet_ee import CifarResNet
from torch import nn

import adaptnet
from adaptnet import sharing
from adaptnet.data import fashion_mnist
from adaptnet.transfer import attach_exits

STAGES = ("stage1", "stage2", "stage3")
CHANNELS = (16, 32, 64)
THRESHOLDS = [0.9, 0.85, 0.8]  # earlyon's cifar_resnet_ee defaults
WEIGHTS = [0.15, 0.2, 0.25, 0.4]
BATCHES = (32, 256)


def build(seed: int) -> tuple[nn.Module, EarlyExitWrapper, adaptnet.EarlyExit]:
    """The plain backbone, earlyon's wrapper of a copy of it, and adaptnet's exits on it.

    adaptnet's stages and heads share the plain backbone's modules; earlyon's
    wrapper hooks a copy (loaded with the same weights after training).
    """
    torch.manual_seed(seed)
    plain = CifarResNet(n=2, num_classes=10)
    plain.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)  # grayscale 28×28
    points = [ExitPoint(f"e{i}", s, c) for i, (s, c) in enumerate(zip(STAGES, CHANNELS,
                                                                        strict=True))]
    heads = {p.name: EarlyExitHead(p.in_channels, 10, hidden_dim=64) for p in points}
    config = EarlyExitConfig(backbone="cifar_resnet14", num_classes=10, exit_points=points,
                             confidence_thresholds=list(THRESHOLDS), loss_weights=WEIGHTS)
    peer = EarlyExitWrapper(copy.deepcopy(plain), copy.deepcopy(heads), lambda f: f, config,
                            input_shape=(1, 1, 28, 28))
    ours = attach_exits(plain, list(STAGES), example=torch.zeros(2, 1, 28, 28),
                        heads=[heads[p.name] for p in points], threshold=THRESHOLDS,
                        weights=WEIGHTS)
    return plain, peer, ours


def load_peer(peer: EarlyExitWrapper, plain: nn.Module, ours: adaptnet.EarlyExit) -> None:
    peer.backbone.load_state_dict(plain.state_dict())
    for i, name in enumerate(f"e{i}" for i in range(len(STAGES))):
        peer.exit_heads[name].load_state_dict(ours.heads[i].state_dict())


def batch1(peer: EarlyExitWrapper, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """earlyon's per-sample API over ``x``: predictions and exits (the final one as 3)."""
    preds, exits = [], []
    for i in range(len(x)):
        r = peer(x[i:i + 1])
        preds.append(r.prediction.argmax(-1))
        exits.append(r.exit_taken if r.exit_taken >= 0 else len(STAGES))
    return torch.cat(preds), torch.tensor(exits)


def run(limit: int | None, epochs: int, rounds: int) -> dict:
    data = fashion_mnist(valid=0.1, seed=0)
    x, y = data.test.tensors
    train = data.train
    if limit is not None:
        x, y = x[:limit], y[:limit]
        train = torch.utils.data.TensorDataset(*(t[:limit] for t in train.tensors))
    plain, peer, ours = build(seed=0)
    fit = adaptnet.fit(ours, train, loss="cross_entropy", optimizer="adam", lr=2e-3,
                       epochs=epochs, batch_size=128, seed=0, scheduler="CosineAnnealingLR",
                       scheduler_args={"T_max": epochs * -(-len(train) // 128)})
    load_peer(peer, plain, ours)
    for m in (plain, peer, ours):
        m.eval()
    with torch.no_grad():
        base = torch.cat([plain(c) for c in x.split(256)]).argmax(-1)
        result = [ours(c) for c in x.split(256)]
        ours_pred = torch.cat([r.output for r in result]).argmax(-1)
        ours_exit = torch.cat([r.exit_index for r in result])
        peer_pred, peer_exit = batch1(peer, x)
        batched = {}
        for b in BATCHES:
            outs = [peer.forward_inference_batched(c) for c in x.split(b)]
            hits = torch.cat([o.predictions for o in outs]).argmax(-1) == y
            batched[str(b)] = {"accuracy": float(hits.float().mean()),
                          "batches": len(outs),
                          "left_early": sum(o.exit_taken >= 0 for o in outs)}
    exits = len(STAGES) + 1
    row = {"plain_accuracy": float((base == y).float().mean()),
           "adaptnet_accuracy": float((ours_pred == y).float().mean()),
           "earlyon_batch1_accuracy": float((peer_pred == y).float().mean()),
           "earlyon_batched": batched,
           "adaptnet_exits": torch.bincount(ours_exit, minlength=exits).tolist(),
           "earlyon_batch1_exits": torch.bincount(peer_exit, minlength=exits).tolist(),
           "same_exit": float((ours_exit == peer_exit).float().mean()),
           "same_prediction": float((ours_pred == peer_pred).float().mean()),
           "train_loss": fit.history[-1]["train/loss"]}

    def over(fn, b: int):
        def call() -> None:
            with torch.no_grad():
                for chunk in x.split(b):
                    fn(chunk)
        return call

    timing = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        fns = {}
        for b in BATCHES:
            fns |= {f"plain@{b}": over(plain, b),
                    f"earlyon@{b}": over(peer.forward_inference_batched, b),
                    f"adaptnet@{b}": over(ours, b)}
        ms = {k: v * 1e3 for k, v in medians(time_calls(fns, rounds, 1)).items()}
        timing[str(threads)] = {str(b): {"plain_ms": ms[f"plain@{b}"],
                                    "earlyon_ms": ms[f"earlyon@{b}"],
                                    "adaptnet_ms": ms[f"adaptnet@{b}"]} for b in BATCHES}
    return {"images": len(x), "train_images": len(train), "epochs": epochs, "rounds": rounds,
            "unique_params": sharing.summary(ours).unique, **row, "timing": timing}


def markdown(r: dict) -> str:
    rows = []
    for threads, by_batch in r["timing"].items():
        for b, t in by_batch.items():
            eo = r["earlyon_batched"][b]
            rows.append([threads, b, f"{t['plain_ms']:.0f}", f"{t['earlyon_ms']:.0f}",
                         f"{t['plain_ms'] / t['earlyon_ms']:.2f}×",
                         f"{eo['left_early']} of {eo['batches']}", f"{t['adaptnet_ms']:.0f}",
                         f"{t['plain_ms'] / t['adaptnet_ms']:.2f}×"])
    share = ", ".join(f"{n / r['images']:.1%}" for n in r["adaptnet_exits"])
    peer_share = ", ".join(f"{n / r['images']:.1%}" for n in r["earlyon_batch1_exits"])
    accuracy = [["plain (no exits)", f"{r['plain_accuracy']:.2%}"],
                ["adaptnet EarlyExit (any batch)", f"{r['adaptnet_accuracy']:.2%}"],
                ["earlyon batch-1 API", f"{r['earlyon_batch1_accuracy']:.2%}"]]
    accuracy += [[f"earlyon batched, B={b}", f"{e['accuracy']:.2%}"]
                 for b, e in r["earlyon_batched"].items()]
    return "\n".join([
        f"earlyon's CIFAR ResNet-14 (1-channel stem, {r['unique_params']:,} parameters with "
        "its three exit heads), trained once jointly on every exit with `adaptnet.fit` "
        f"({r['train_images']:,} Fashion-MNIST images, {r['epochs']} epochs, Adam, cosine "
        "schedule); exits leave at softmax confidence ≥ 0.9, 0.85, 0.8 (earlyon's "
        f"defaults). Over the {r['images']:,} test images: whole-test-set ms, median of "
        f"{r['rounds']} interleaved rounds; speed-up = plain ms / variant ms.", "",
        *table(["threads", "batch", "plain ms", "earlyon batched ms", "earlyon speed-up",
                "earlyon batches leaving early", "adaptnet ms", "adaptnet speed-up"], rows),
        "",
        *table(["variant", "test accuracy"], accuracy), "",
        f"Each sample's exit (exits 1–3, then the final one): adaptnet {share}; earlyon's "
        f"batch-1 API {peer_share}; the same exit for {r['same_exit']:.2%} of the images and "
        f"the same prediction for {r['same_prediction']:.2%}."]) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    warnings.filterwarnings("ignore", module="earlyon")  # its FLOPs estimate's notes
    limit, epochs, rounds = (256, 1, args.rounds or 1) if args.quick else \
        (None, 5, args.rounds or 3)
    publish("earlyon", args, run(limit, epochs, rounds), markdown)


if __name__ == "__main__":
    main()
