"""fit/evaluate on what PyTorch users train with: DataLoaders, iterables, dict batches, their
optimizers and schedulers, and weight decay as plain PyTorch applies it."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import adaptnet
from adaptnet.errors import ConfigError


def net(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(16, 3))


def data(n: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def hand(model: nn.Module, loader, opt, sched=None, epochs: int = 3) -> None:
    """The loop a PyTorch user writes."""
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if sched is not None:
                sched.step()


def same(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


def loader(batch: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(*data()), batch_size=batch)


@pytest.mark.parametrize("case", ["sgd", "adam", "class", "factory"])
def test_loader_with_decay_everywhere_equals_plain_pytorch(case):
    """Seed 003's optim.SGD(model.parameters(), weight_decay=...) and its Adam twin, exactly."""
    ours, theirs = net(), net()
    if case in ("sgd", "adam"):
        opts = {"optimizer": case, "weight_decay": 0.05}
        cls = torch.optim.SGD if case == "sgd" else torch.optim.Adam
        opt = cls(theirs.parameters(), lr=0.01, weight_decay=0.05)
    elif case == "class":
        opts = {"optimizer": torch.optim.SGD, "optimizer_args": {"momentum": 0.9,
                                                                 "weight_decay": 0.05}}
        opt = torch.optim.SGD(theirs.parameters(), lr=0.01, momentum=0.9, weight_decay=0.05)
    else:
        opts = {"optimizer": lambda groups: torch.optim.NAdam(groups, lr=0.01, weight_decay=0.05)}
        opt = torch.optim.NAdam(theirs.parameters(), lr=0.01, weight_decay=0.05)
    adaptnet.fit(ours, loader(), loss="cross_entropy", lr=0.01, epochs=3, no_decay=[], **opts)
    hand(theirs, loader(), opt)
    same(ours, theirs)


def test_default_rules_keep_biases_and_norms_undecayed_and_a_factory_keeps_its_decay():
    ours, theirs = net(), net()
    adaptnet.fit(ours, loader(), loss="cross_entropy", epochs=2,
                 optimizer=lambda groups: torch.optim.AdamW(groups, lr=0.01, weight_decay=0.3))
    decayed = [theirs[0].weight, theirs[4].weight]
    rest = [theirs[0].bias, theirs[1].weight, theirs[1].bias, theirs[4].bias]
    opt = torch.optim.AdamW([{"params": decayed}, {"params": rest, "weight_decay": 0.0}],
                            lr=0.01, weight_decay=0.3)
    hand(theirs, loader(), opt, epochs=2)
    same(ours, theirs)


def test_optimizer_and_scheduler_objects_are_used_as_given():
    ours, theirs = net(), net()
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    adaptnet.fit(ours, loader(), loss="cross_entropy", epochs=3, optimizer=opt, scheduler=sched)
    opt2 = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.5)
    hand(theirs, loader(), opt2, torch.optim.lr_scheduler.StepLR(opt2, step_size=4, gamma=0.5))
    same(ours, theirs)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** (24 // 4))


def test_scheduler_class_and_factory_equal_the_name():
    runs = []
    for scheduler in ("StepLR", torch.optim.lr_scheduler.StepLR,
                      lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)):
        model = net()
        args = {} if callable(scheduler) and not isinstance(scheduler, type) else \
            {"scheduler_args": {"step_size": 3, "gamma": 0.5}}
        history = adaptnet.fit(model, loader(), loss="cross_entropy", lr=0.1, epochs=2,
                               scheduler=scheduler, **args).history
        runs.append((model, [row["lr"] for row in history]))
    for model, lrs in runs[1:]:
        same(model, runs[0][0])
        assert lrs == runs[0][1]


class Stream(IterableDataset):
    def __iter__(self):
        x, y = data()
        yield from zip(x, y, strict=True)


def test_iterable_dataset_list_of_batches_and_generator():
    reference = net()
    adaptnet.fit(reference, loader(10), loss="cross_entropy", epochs=2)
    x, y = data()
    batches = [(x[i:i + 10], y[i:i + 10]) for i in range(0, 60, 10)]
    for train in (Stream(), batches):
        model = net()
        adaptnet.fit(model, train, loss="cross_entropy", epochs=2, batch_size=10)
        same(model, reference)
    once = net()
    adaptnet.fit(once, (b for b in batches), loss="cross_entropy", epochs=1)
    with pytest.raises(ConfigError, match=r"train is a one-shot iterator \(generator\), and it "
                       r"would be read 2 times"):
        adaptnet.fit(net(), (b for b in batches), loss="cross_entropy", epochs=2)


def test_dict_batches_read_through_batch_keys():
    x, y = data()
    dicts = [{"image": x[i:i + 10], "label": y[i:i + 10], "id": i} for i in range(0, 60, 10)]
    ours, theirs = net(), net()
    adaptnet.fit(ours, dicts, loss="cross_entropy", epochs=2, batch_keys=("image", "label"))
    adaptnet.fit(theirs, loader(10), loss="cross_entropy", epochs=2)
    same(ours, theirs)
    values = adaptnet.evaluate(ours, dicts, loss="cross_entropy", batch_keys=("image", "label"))
    assert values["loss"] == pytest.approx(
        adaptnet.evaluate(ours, (x, y), loss="cross_entropy")["loss"], rel=1e-6)
    with pytest.raises(ConfigError, match=r"train batch 0 is a mapping with keys 'image', "
                       r"'label', 'id'; name the inputs and targets with batch_keys"):
        adaptnet.fit(net(), dicts, loss="cross_entropy")
    with pytest.raises(ConfigError, match=r"train batch 0 has no key 'target' \(batch_keys="
                       r"\('image', 'target'\)\); it has 'image', 'label', 'id'"):
        adaptnet.fit(net(), dicts, loss="cross_entropy", batch_keys=("image", "target"))


def test_batches_of_the_wrong_structure_name_the_batch():
    x, y = data()
    bad = [(x[:10], y[:10]), (x[10:20], y[10:20], y[10:20])]
    with pytest.raises(ConfigError, match=r"train batch 1 is a tuple of 3; each batch must be "
                       r"\(inputs, targets\)"):
        adaptnet.fit(net(), bad, loss="cross_entropy")
    with pytest.raises(ConfigError, match=r"val batch 0: the targets must be a tensor with one "
                       r"row per sample, got 'no'"):
        adaptnet.fit(net(), loader(), val=[(x, "no")], loss="cross_entropy")
    with pytest.raises(ConfigError, match=r"train yielded no batch in epoch 1"):
        adaptnet.fit(net(), [], loss="cross_entropy")
    with pytest.raises(ConfigError, match=r"must be \(inputs, targets\) tensors, a Dataset, a "
                       r"DataLoader, or an iterable of \(inputs, targets\) batches, got int"):
        adaptnet.fit(net(), 3)


def test_evaluate_on_a_loader_equals_tensors():
    model = net()
    x, y = data()
    a = adaptnet.evaluate(model, loader(7), loss="cross_entropy", metrics=("loss", "accuracy"))
    b = adaptnet.evaluate(model, (x, y), loss="cross_entropy", metrics=("loss", "accuracy"))
    assert a["accuracy"] == b["accuracy"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)


@pytest.mark.parametrize("shuffle", ["global", "generator"])
@pytest.mark.parametrize("cut", [3, 9])  # mid-epoch 1; mid-epoch 2
def test_resume_mid_epoch_from_a_shuffling_loader_is_bit_identical(tmp_path, shuffle, cut):
    def shuffled() -> DataLoader:
        g = torch.Generator().manual_seed(5) if shuffle == "generator" else None
        return DataLoader(TensorDataset(*data(56)), batch_size=8, shuffle=True, generator=g)

    opts = {"loss": "cross_entropy", "optimizer": "adam", "epochs": 3, "checkpoint_every": 1,
            "keep_checkpoints": 100}
    whole = net(dropout=0.3)
    adaptnet.fit(whole, shuffled(), run_dir=tmp_path / "whole", **opts)
    cut_dir = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut_dir)
    for ckpt in (cut_dir / "checkpoints").iterdir():
        if int(ckpt.name.removeprefix("step-")) > cut:
            shutil.rmtree(ckpt)
    resumed = net(dropout=0.3)
    torch.manual_seed(123)  # the state a fresh process would have: not the run's
    result = adaptnet.fit(resumed, shuffled(), run_dir=cut_dir, resume=True, **opts)
    assert result.resumed_from.name == f"step-{cut:09d}"
    same(resumed, whole)


def test_resume_refuses_a_loader_that_draws_from_other_generators(tmp_path):
    x, y = data(56)
    opts = {"loss": "cross_entropy", "epochs": 2, "checkpoint_every": 3, "run_dir": tmp_path}
    adaptnet.fit(net(), DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True,
                                   generator=torch.Generator().manual_seed(1)), **opts)
    shutil.rmtree(tmp_path / "checkpoints" / "step-000000014")  # keep step 12: mid-epoch 2
    with pytest.raises(ConfigError, match=r"cannot resume: train draws its order from 0 "
                       r"generator\(s\), the checkpoint recorded 1"):
        adaptnet.fit(net(), DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True),
                     resume=True, **opts)


def test_under_torchrun_a_loader_needs_a_distributed_sampler(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=r"train is a DataLoader without a DistributedSampler, "
                       r"so every rank would train on the same batches"):
        adaptnet.fit(net(), loader(), loss="cross_entropy")


@pytest.mark.parametrize(("options", "message"), [
    ({"optimizer": 3}, r"optimizer: expected a name \(sgd, adam, adamw, rmsprop\), a torch.optim "
                       r"class, a factory"),
    ({"optimizer": lambda groups: "adam"}, r"the optimizer factory returned str"),
    ({"optimizer": torch.optim.SGD, "optimizer_args": {"nope": 1}},
     r"optimizer: <class 'torch.optim.sgd.SGD'> could not be built: TypeError"),
    ({"optimizer": lambda g: torch.optim.SGD(g, lr=0.1), "optimizer_args": {"momentum": 0.9}},
     r"optimizer_args go to an optimizer name or class"),
    ({"optimizer": lambda g: torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)},
     r"the optimizer holds 2 tensor\(s\) that are not the model's parameters"),
    ({"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau},
     r"ReduceLROnPlateau steps on a metric"),
    ({"scheduler": lambda o: 5}, r"the scheduler factory returned int"),
    ({"scheduler": torch.optim.lr_scheduler.StepLR(torch.optim.SGD(
        [nn.Parameter(torch.zeros(1))], lr=0.1), 2)},
     r"a scheduler object belongs to an optimizer; pass that optimizer too"),
    ({"no_decay": ["nothing.*"]}, r"no_decay=...\): pattern\(s\) 'nothing.\*' match no parameter"),
    ({"batch_keys": ("a",)}, r"batch_keys"),
])
def test_bad_optimizers_schedulers_and_rules_are_config_errors(options, message):
    with pytest.raises(adaptnet.errors.AdaptnetError, match=message):
        adaptnet.fit(net(), loader(), loss="cross_entropy", **options)
