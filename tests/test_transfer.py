"""Transfer learning: backbones, heads, freezing by depth, BatchNorm, schedules, recipes."""

from __future__ import annotations

import sys
import types
from enum import Enum
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import adaptnet
from adaptnet.errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    ConfigError,
    ModelError,
    RecipeError,
    RunDirError,
    SelectionError,
)
from adaptnet.models import build
from adaptnet.recipes import evaluate_run, load_model, load_recipe, prepare, train_recipe
from adaptnet.train import TrainConfig
from adaptnet.train._optim import build_optimizer
from adaptnet.transfer import (
    FrozenBatchNorm,
    GradualUnfreeze,
    InputAdapter,
    adapt_input,
    blocks,
    find_head,
    freeze_blocks,
    load_backbone,
    replace_head,
)


class ResNetLike(nn.Module):
    """The names torchvision's ResNet uses (conv1, bn1, layer1.., fc), at toy size."""

    def __init__(self, num_classes: int = 1000, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(width), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(width), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, classes)
        h = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(self.avgpool(h).flatten(1))


def _data(n: int = 64, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- the textbook


def test_textbook_snippet_has_an_equivalent():
    """Freeze all, replace ``fc``, list names and sizes: by hand and with adaptnet, the same."""
    torch.manual_seed(0)
    textbook = ResNetLike()
    for p in textbook.parameters():
        p.requires_grad = False
    textbook.fc = nn.Linear(8, 10)

    torch.manual_seed(0)
    ours = ResNetLike()
    adaptnet.freeze(ours, "*")
    head = replace_head(ours, 10)

    def listing(m: nn.Module) -> list[tuple[str, tuple[int, ...], bool]]:
        return [(n, tuple(p.size()), p.requires_grad) for n, p in m.named_parameters()]

    assert listing(ours) == listing(textbook)
    assert ours.fc is head and [n for n, _, g in listing(ours) if g] == ["fc.weight", "fc.bias"]
    s = adaptnet.summary(ours)
    assert s.trainable == 8 * 10 + 10 and s.frozen == s.unique - s.trainable
    rows = {r.name: r for r in s.rows}
    assert rows["fc"].frozen == 0 and rows["layer1.0"].frozen == 8 * 8 * 9
    def header(summary: adaptnet.sharing.Summary) -> str:
        return next(line for line in str(summary).splitlines() if line.startswith("module"))

    assert "frozen" in header(s)  # the column appears once something is frozen
    assert "frozen" not in header(adaptnet.summary(ResNetLike()))


def test_torchvision_resnet18_from_a_weights_file_frozen_with_a_new_head(tmp_path):
    """Seed 002 with the real torchvision ResNet-18: weights from a file, freeze, new head."""
    import torchvision

    torch.manual_seed(0)
    pretrained = torchvision.models.resnet18(weights=None)
    torch.save(pretrained.state_dict(), tmp_path / "resnet18.pt")
    model = load_backbone("resnet18", weights=tmp_path / "resnet18.pt")
    assert torch.equal(model.conv1.weight, pretrained.conv1.weight)
    assert find_head(model) == "fc" and blocks(model)[-1] == "fc"
    freeze_blocks(model, 1)  # everything but the head (the last block)
    head = replace_head(model, 10)
    assert head.in_features == 512 and model(torch.rand(2, 3, 64, 64)).shape == (2, 10)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    before = model.layer4[1].conv2.weight.clone()
    adaptnet.fit(model, (torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))),
                 loss="cross_entropy", optimizer="sgd", lr=0.1, epochs=1, batch_size=4)
    assert torch.equal(model.layer4[1].conv2.weight, before)  # the backbone stayed frozen


def test_seed_printout_on_the_real_resnet18():
    """Seed 002's listing — names, sizes, requires_grad after freezing and replacing ``fc`` —
    on torchvision's ResNet-18: by hand and with adaptnet, the same."""
    import torchvision

    torch.manual_seed(0)
    textbook = torchvision.models.resnet18(weights=None)
    for p in textbook.parameters():
        p.requires_grad = False
    textbook.fc = nn.Linear(textbook.fc.in_features, 10)
    torch.manual_seed(0)
    ours = load_backbone("resnet18")
    adaptnet.freeze(ours, "*")
    replace_head(ours, 10)

    def listing(m: nn.Module) -> list[str]:
        return [f"{n} {tuple(p.size())} {p.requires_grad}" for n, p in m.named_parameters()]

    assert listing(ours) == listing(textbook)
    assert listing(ours)[0] == "conv1.weight (64, 3, 7, 7) False"
    assert listing(ours)[-2:] == ["fc.weight (10, 512) True", "fc.bias (10,) True"]
    assert len(listing(ours)) == 62
    for a, b in zip(ours.state_dict().values(), textbook.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # same seed, same weights: the same network


@pytest.mark.parametrize(("name", "head", "first", "last"), [
    ("mobilenet_v3_small", "classifier.3", "features", "classifier"),
    ("vit_b_16", "heads.head", "class_token", "heads"),
    ("resnet18", "fc", "conv1", "fc"),
])
def test_torchvision_classes_heads_and_freezing(name, head, first, last):
    """Head finding and freezing on torchvision's own classes, not look-alikes."""
    model = load_backbone(name)
    assert find_head(model) == head
    names = blocks(model)
    assert names[0] == first and names[-1] == last
    freeze_blocks(model, 1)
    new = replace_head(model, 7)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.startswith(last + ".") for n in trainable)  # the last block alone trains
    assert trainable[-2:] == [f"{head}.weight", f"{head}.bias"] and new.out_features == 7
    if name == "mobilenet_v3_small":  # its last block is the whole classifier: 2 Linears
        assert trainable[:2] == ["classifier.0.weight", "classifier.0.bias"]
    if name != "vit_b_16":  # ViT-B/16 wants 224x224 inputs: 17 GFLOPs, left out
        assert model.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 7)


def test_zoo_resnet18_takes_28x28_single_channel_images():
    net = build("resnet18", num_classes=5, in_channels=1, small_input=True, seed=0)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net.conv1.in_channels == 1 and net.fc.out_features == 5
    assert net.eval()(torch.rand(3, 1, 28, 28)).shape == (3, 5)
    with adaptnet.count_macs() as counted:
        net(torch.rand(1, 1, 28, 28))
    assert 1.0e8 < counted.total < 1.5e8  # layer1 at 14x14: about 122M multiply-adds
    with pytest.raises(ModelError, match=r"in_channels must be a positive int"):
        build("resnet18", in_channels=0)


# ----------------------------------------------------------------------------- heads and blocks


def test_find_head_on_common_layouts_and_the_zoo():
    vgg_like = nn.Module()
    vgg_like.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    vgg_like.classifier = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(8, 1000))
    assert find_head(ResNetLike()) == "fc"
    assert find_head(vgg_like) == "classifier.3"
    assert find_head(build("small_cnn")) == "11"
    assert find_head(build("mlp")) == "4"
    assert find_head(build("moe_mlp")) == "head"
    assert find_head(build("gru_classifier")) == "linear"
    assert find_head(adapt_input(ResNetLike(), 3, 8)) == "model.fc"


def test_find_head_refuses_what_it_cannot_decide():
    with pytest.raises(ModelError, match=r"several heads .*exits.* path="):
        find_head(build("early_exit_cnn"))
    with pytest.raises(ModelError, match=r"no nn.Linear layer"):
        find_head(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_replace_head_keeps_width_bias_dtype_and_is_trainable():
    model = ResNetLike().double()
    adaptnet.freeze(model, "*")
    head = replace_head(model, 4)
    assert (head.in_features, head.out_features, head.weight.dtype) == (8, 4, torch.float64)
    assert head.weight.requires_grad and model.fc is head
    no_bias = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2, bias=False))
    assert replace_head(no_bias, 7).bias is None


def test_replace_head_errors_name_the_fix():
    with pytest.raises(ModelError, match=r"no module 'fcc'; its nn.Linear layers are fc"):
        replace_head(ResNetLike(), 3, path="fcc")
    with pytest.raises(ModelError, match=r"'bn1' is a BatchNorm2d, not an nn.Linear"):
        replace_head(ResNetLike(), 3, path="bn1")
    with pytest.raises(ModelError, match="positive integer"):
        replace_head(ResNetLike(), 0)
    lm = nn.ModuleDict({"embed": nn.Embedding(10, 4), "head": nn.Linear(4, 10)})
    adaptnet.tie(lm, "head.weight", "embed.weight")
    with pytest.raises(ModelError, match=r"head.weight is tied to embed.weight.*adaptnet.untie"):
        replace_head(lm, 3, path="head")
    assert lm.head.weight is lm.embed.weight  # nothing changed


def test_blocks_look_through_wrappers_and_list_direct_parameters():
    assert blocks(ResNetLike()) == ["conv1", "bn1", "layer1", "layer2", "fc"]
    assert blocks(adapt_input(build("small_cnn"), 1, 28)) == [
        "model.0", "model.3", "model.7", "model.9", "model.11"]
    vit_like = nn.Module()
    vit_like.class_token = nn.Parameter(torch.zeros(1, 4))
    vit_like.encoder = nn.Linear(4, 4)
    vit_like.heads = nn.Linear(4, 2)
    assert blocks(vit_like) == ["class_token", "encoder", "heads"]
    freeze_blocks(vit_like, 1)
    assert not vit_like.class_token.requires_grad and vit_like.heads.weight.requires_grad


# ----------------------------------------------------------------------------- freezing


@pytest.mark.parametrize("batchnorm", ["frozen", "train"])
def test_frozen_blocks_stay_bit_identical_while_the_head_trains(batchnorm):
    torch.manual_seed(0)
    model = ResNetLike(num_classes=3)
    report = freeze_blocks(model, 1, batchnorm=batchnorm)
    assert report.changed[0] == "conv1.weight" and not report.collateral
    before = _state(model)
    adaptnet.fit(model, _data(), loss="cross_entropy", optimizer="adam", lr=0.05, epochs=3,
                 batch_size=16, weight_decay=0.1, l1=1e-3)
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    stats = ["bn1.num_batches_tracked", "bn1.running_mean", "bn1.running_var",
             "layer1.1.num_batches_tracked", "layer1.1.running_mean", "layer1.1.running_var",
             "layer2.1.num_batches_tracked", "layer2.1.running_mean", "layer2.1.running_var"]
    # "frozen": FrozenBatchNorm keeps the statistics too; "train": they move, as in PyTorch.
    assert changed == sorted(["fc.bias", "fc.weight"] + ([] if batchnorm == "frozen" else stats))
    assert isinstance(model.bn1, FrozenBatchNorm if batchnorm == "frozen" else nn.BatchNorm2d)


def test_frozen_batchnorm_matches_eval_batchnorm_and_round_trips():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    bn.train()
    bn(torch.randn(8, 4, 5, 5) * 3 + 1)  # non-trivial running statistics
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    frozen = FrozenBatchNorm(bn).train()
    x = torch.randn(6, 4, 5, 5)
    assert torch.equal(frozen(x), bn.eval()(x))
    assert list(frozen.state_dict()) == list(bn.state_dict())
    assert frozen.weight is bn.weight and frozen.running_mean is bn.running_mean
    back = frozen.unfrozen()
    assert type(back) is nn.BatchNorm2d and back.weight is bn.weight
    assert back.running_var is bn.running_var and back.momentum == bn.momentum
    with pytest.raises(ModelError, match="track_running_stats=False"):
        FrozenBatchNorm(nn.BatchNorm1d(3, track_running_stats=False))


def test_unfreezing_gives_batchnorm_back_and_shared_modules_stay_shared():
    shared = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.Linear(4, 4), shared, nn.Linear(4, 2))
    freeze_blocks(model, 1)
    assert isinstance(model[1], FrozenBatchNorm) and model[1] is model[3]
    report = freeze_blocks(model, 2)  # block 3 trains, but it is block 1, which is frozen
    assert isinstance(model[3], FrozenBatchNorm) and model[1] is model[3]
    assert report.collateral == ("3.weight", "3.bias")
    freeze_blocks(model, 5)
    assert type(model[1]) is nn.BatchNorm1d and model[1] is model[3]
    assert model[1].weight is shared.weight and all(p.requires_grad for p in model.parameters())


def test_freeze_blocks_reports_collateral_freezes_through_ties():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    adaptnet.tie(model, "1.weight", "0.weight")
    report = freeze_blocks(model, 2)  # block 1 should train, but its weight is block 0's
    assert report.collateral == ("1.weight",)
    assert "also froze through ties: 1.weight" in str(report)
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad


def test_freeze_blocks_validates_its_arguments():
    with pytest.raises(ModelError, match="batchnorm='eval'; expected 'frozen'"):
        freeze_blocks(ResNetLike(), 1, batchnorm="eval")
    with pytest.raises(ModelError, match="trainable=-1"):
        freeze_blocks(ResNetLike(), -1)
    model = ResNetLike()
    freeze_blocks(model, 0)
    assert not any(p.requires_grad for p in model.parameters())


def test_gradual_unfreezing_trains_one_more_block_per_epoch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 3))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    schedule = GradualUnfreeze(model, start=1, every=1)
    assert [schedule.trainable(e) for e in range(3)] == [1, 2, 3]
    freeze_blocks(model, 1)  # as before training starts: the optimizer must still hold block 1
    before = _state(model)
    # Epoch 0 trains the head, epoch 1 the last two blocks: block 0 never moves.
    adaptnet.fit(model, (x, y), loss="cross_entropy", optimizer="adamw", lr=0.05, epochs=2,
                 batch_size=8, weight_decay=0.1, l1=1e-3, epoch_start=schedule)
    after = model.state_dict()
    assert torch.equal(after["0.weight"], before["0.weight"])
    assert not torch.equal(after["2.weight"], before["2.weight"])
    assert model[2].weight.requires_grad and not model[0].weight.requires_grad
    with pytest.raises(ModelError, match="every=0"):
        GradualUnfreeze(model, every=0)


def test_gradual_unfreezing_resumes_to_the_same_weights(tmp_path):
    def run(epochs: int, run_dir: str, resume: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        data = (torch.randn(40, 6, generator=torch.Generator().manual_seed(1)),
                torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(2)))
        adaptnet.fit(model, data, loss="cross_entropy", optimizer="adam", lr=0.05,
                     epochs=epochs, batch_size=8, run_dir=tmp_path / run_dir,
                     resume=resume, epoch_start=GradualUnfreeze(model, every=2))
        return model.state_dict()

    straight = run(4, "straight", False)
    run(1, "stopped", False)  # a run stopped after its first epoch (block 0 still frozen)
    resumed = run(4, "stopped", True)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_epoch_start_is_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="not supported under torchrun"):
        adaptnet.fit(nn.Linear(2, 2), (torch.randn(4, 2), torch.randn(4, 2)),
                     epoch_start=lambda e: None)


# ----------------------------------------------------------------------------- learning rates


def test_lr_scale_gives_the_backbone_its_own_learning_rate():
    model = ResNetLike(num_classes=3)
    opt = build_optimizer(model, TrainConfig(lr=0.1, lr_scale={"layer*": 0.1, "conv1": 0.5}))
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    assert lrs["layer1.0.weight"] == pytest.approx(0.01)
    assert lrs["conv1.weight"] == pytest.approx(0.05) and lrs["fc.weight"] == 0.1
    with pytest.raises(SelectionError, match="'backbone' match no parameter"):
        build_optimizer(model, TrainConfig(lr_scale={"backbone": 0.1}))
    with pytest.raises(ValueError, match="learning-rate factors must be positive"):
        TrainConfig(lr_scale={"fc": 0.0})


def test_param_groups_can_hold_frozen_tensors_for_a_schedule():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    adaptnet.freeze(model, "0")
    assert sum(len(g["params"]) for g in adaptnet.param_groups(model)) == 2
    assert sum(len(g["params"]) for g in adaptnet.param_groups(model, frozen=True)) == 4


# ----------------------------------------------------------------------------- loading


def _fake_run(tmp_path: Path, model: nn.Module, spec: dict) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"recipe": "r", "data": {"name": "digits"},
                                                     "model": spec}))
    adaptnet.save(model, run / "model.safetensors")
    return run


def test_a_run_s_model_comes_from_recipes_and_a_module_s_weights_from_a_file(tmp_path):
    torch.manual_seed(0)
    trained = build("mlp", in_features=6, num_classes=4, hidden=5)
    run = _fake_run(tmp_path, trained, {"name": "mlp", "in_features": 6, "num_classes": 4,
                                        "hidden": 5})
    x = torch.randn(3, 6)
    for loaded in (
        load_model(run),
        load_backbone(build("mlp", in_features=6, num_classes=4, hidden=5),
                      weights=run / "model.safetensors"),
    ):
        assert torch.equal(loaded(x), trained.eval()(x)) and not loaded.training
    with pytest.raises(ModelError, match=r"is a directory; for the model an `adaptnet train` "
                                         r"run trained, use adaptnet.recipes.load_model\("):
        load_backbone(run)
    torch.save(trained.state_dict(), tmp_path / "sd.pt")
    fresh = build("mlp", in_features=6, num_classes=4, hidden=5)
    assert torch.equal(load_backbone(fresh, weights=tmp_path / "sd.pt")(x), trained(x))


def test_load_backbone_with_mismatched_keys_lists_them(tmp_path):
    trained = build("mlp", in_features=6, num_classes=4, hidden=5)
    adaptnet.save(trained, tmp_path / "m.safetensors")
    torch.save(trained.state_dict(), tmp_path / "m.pt")
    other = build("mlp", in_features=6, num_classes=4, hidden=5, layers=2)
    for f in ("m.safetensors", "m.pt"):
        with pytest.raises(CheckpointMismatchError) as e:
            load_backbone(other, weights=tmp_path / f)
        assert e.value.unexpected == ("4.bias", "4.weight")
        assert "2.weight: the file has shape [5, 5], the model [4, 5]" in str(e.value)
        assert "not in the model (2): 4.bias, 4.weight" in str(e.value)


def test_load_backbone_errors_name_the_fix(tmp_path):
    with pytest.raises(RunDirError, match=r"no config.yaml"):
        load_model(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": {"name": "digits"},
                                                          "model": {"name": "mlp"}}))
    with pytest.raises(RunDirError, match=r"no model.safetensors"):
        load_model(tmp_path)
    with pytest.raises(ModelError, match="is a weights file; it needs its architecture"):
        load_backbone(tmp_path / "w.safetensors")
    np.save(tmp_path / "junk.npy", np.zeros(3))
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointCorruptError, match="weights_only=True"):
        load_backbone(nn.Linear(2, 2), weights=tmp_path / "junk.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointCorruptError, match="holds a list, not a state dict"):
        load_backbone(nn.Linear(2, 2), weights=tmp_path / "list.pt")


def test_torchvision_names_without_torchvision_say_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision: ImportError
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(ModelError, match=r"pip install 'adaptnet\[vision\]'"):
        load_backbone("resnet18")


@pytest.fixture
def fake_torchvision(monkeypatch, tmp_path):
    """A stand-in for torchvision.models: records whether a download was attempted."""
    calls = []

    class Weights(Enum):
        IMAGENET1K_V1 = "https://example.invalid/models/tiny-1234.pth"

        @property
        def url(self) -> str:
            return self.value

    def tiny(*, weights=None, progress=True):
        calls.append(weights)
        if weights is not None:
            raise OSError("network unreachable")
        return ResNetLike()

    models = types.ModuleType("torchvision.models")
    models.list_models = lambda: ["tiny"]
    models.get_model_builder = lambda name: {"tiny": tiny}[name] if name == "tiny" else \
        (_ for _ in ()).throw(ValueError(name))
    models.get_model_weights = lambda name: Weights
    package = types.ModuleType("torchvision")
    package.models = models
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return calls


def test_named_weights_are_never_downloaded_unless_asked(fake_torchvision, tmp_path):
    assert isinstance(load_backbone("tiny"), ResNetLike) and fake_torchvision == [None]
    with pytest.raises(ModelError, match=r"not in torchvision's cache .*tiny-1234.pth.*"
                                         r"download=True"):
        load_backbone("tiny", weights="IMAGENET1K_V1")
    assert fake_torchvision == [None]  # the builder was not asked for the weights
    with pytest.raises(ModelError, match="could not get the tiny weights IMAGENET1K_V1"):
        load_backbone("tiny", weights="IMAGENET1K_V1", download=True)
    with pytest.raises(ModelError, match="no weights 'V9'; it has IMAGENET1K_V1"):
        load_backbone("tiny", weights="V9")
    with pytest.raises(ModelError, match="did you mean tiny"):
        load_backbone("tinyy")
    adaptnet.save(ResNetLike(), tmp_path / "local.safetensors")
    assert isinstance(load_backbone("tiny", weights=tmp_path / "local.safetensors"), ResNetLike)


# ----------------------------------------------------------------------------- other inputs


def test_input_adapter_resizes_and_converts_channels():
    x = torch.rand(2, 1, 8, 8)
    out = InputAdapter(3, (16, 16))(x)
    assert out.shape == (2, 3, 16, 16) and torch.equal(out[:, 0], out[:, 2])
    expected = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear")
    assert torch.allclose(out[:, :1], expected)
    assert torch.allclose(InputAdapter(1, (8, 8))(torch.rand(2, 3, 8, 8) * 0 + 0.5),
                          torch.full((2, 1, 8, 8), 0.5))
    with pytest.raises(ModelError, match="cannot turn 2 channels into 3"):
        InputAdapter(3, (8, 8))(torch.rand(1, 2, 8, 8))
    with pytest.raises(ModelError, match=r"expected images \(B, C, H, W\)"):
        InputAdapter(3, (8, 8))(torch.rand(2, 8, 8))
    net = adapt_input(build("small_cnn", num_classes=5), channels=1, size=28)
    assert net(torch.rand(4, 3, 32, 32)).shape == (4, 5)


# ----------------------------------------------------------------------------- recipes


def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def image_recipes(tmp_path):
    """A backbone recipe on 1x28x28 images and a transfer recipe on 3x16x16 images."""
    rng = np.random.default_rng(0)

    def images(n: int, shape: tuple[int, ...], classes: int) -> dict[str, np.ndarray]:
        y = rng.integers(0, classes, n)
        x = rng.normal(size=(n, *shape)).astype(np.float32) + y[:, None, None, None]
        return {"x": x, "y": y}

    np.savez(tmp_path / "source.npz", **images(96, (1, 28, 28), 4))
    np.savez(tmp_path / "target.npz", **images(96, (3, 16, 16), 3))
    source = _write(tmp_path / "source.yaml", {
        "data": {"name": str(tmp_path / "source.npz")}, "model": {"name": "small_cnn"},
        "train": {"optimizer": "adam", "lr": 0.01, "epochs": 2, "batch_size": 32}})
    target = _write(tmp_path / "target.yaml", {
        "data": {"name": str(tmp_path / "target.npz")}, "model": {"name": "small_cnn"},
        "transfer": {"backbone": str(source), "backbone_lr": 0.1},
        "train": {"optimizer": "adam", "lr": 0.01, "epochs": 2, "batch_size": 32}})
    return tmp_path, target


def test_transfer_recipe_keeps_the_backbone_and_adapts_the_images(image_recipes):
    root, target = image_recipes
    name, recipe = load_recipe(target)
    res = train_recipe(name, recipe, root / "runs" / "frozen")
    [backbone] = (root / "runs" / "backbones").iterdir()
    assert res.results.backbone == str(backbone.resolve())
    pretrained = load_model(backbone).state_dict()
    tuned = adaptnet.load(prepare(load_recipe(target)[1])[1],
                          res.run_dir / "model.safetensors").state_dict()
    for key, value in pretrained.items():
        same = torch.equal(tuned["model." + key], value)
        assert same == (not key.startswith("11.")), key  # all but the new head, bit for bit
    assert tuned["model.11.weight"].shape == (3, 84)
    assert res.results.params["trainable"] == 84 * 3 + 3
    assert evaluate_run(res.run_dir)["accuracy"] == res.results.test["accuracy"]
    config = yaml.safe_load((res.run_dir / "config.yaml").read_text())
    assert config["model"]["in_channels"] == 1 and config["model"]["num_classes"] == 3


def test_transfer_modes_and_the_shared_pretraining(image_recipes):
    root, target = image_recipes
    from adaptnet.recipes import compare_variants

    rows = compare_variants(str(target), {m: {"transfer.mode": m} for m in ("finetune", "scratch")},
                   ["transfer.unfreeze_every=1"], root / "cmp")
    assert len(list((root / "cmp" / "backbones").iterdir())) == 1  # trained once
    assert [r["trainable_params"] for r in rows] == [rows[0]["unique_params"]] * 2
    finetune = yaml.safe_load((root / "cmp" / "0-finetune" / "config.yaml").read_text())
    assert finetune["transfer"]["backbone"].startswith(str(root / "cmp" / "backbones"))
    scratch = yaml.safe_load((root / "cmp" / "1-scratch" / "config.yaml").read_text())
    assert scratch["transfer"]["backbone"] == str(root / "source.yaml")  # nothing pretrained
    lrs = [json_line["lr"] for json_line in map(yaml.safe_load, (
        root / "cmp" / "0-finetune" / "metrics.jsonl").read_text().splitlines())]
    assert lrs == [0.01, 0.01]  # the head's rate; the backbone's is 0.001


def test_transfer_recipe_errors(image_recipes, tmp_path):
    _, target = image_recipes
    with pytest.raises(RecipeError, match=r"transfer.backbone: 'nowhere' is neither"):
        load_recipe(target, ["transfer.backbone=nowhere"])
    with pytest.raises(RecipeError, match=r"transfer.mode: Input should be 'frozen'"):
        load_recipe(target, ["transfer.mode=linear"])
    with pytest.raises(RecipeError, match=r"is a small_cnn, but model.name is 'mlp'"):
        prepare(load_recipe(target, ["model.name=mlp"])[1])
    with pytest.raises(RecipeError, match=r"model.image_size=32 \(the backbone has 28\)"):
        prepare(load_recipe(target, ["model.image_size=32"])[1])


def test_pt_weights_get_the_safetensors_checks(tmp_path):
    """A .pt state dict: tie conflicts and dtype changes refused, as for safetensors (issue 14)."""
    from conftest import TinyLM, tied_lm

    torch.save(TinyLM().state_dict(), tmp_path / "untied.pt")  # embed != head
    with pytest.raises(CheckpointMismatchError, match=r"untied\.pt.*\n.*head.weight: the model "
                       r"ties it to 'embed.weight', but the file holds different values"):
        load_backbone(tied_lm(), weights=tmp_path / "untied.pt")
    ints = {k: (v * 100).long() for k, v in nn.Linear(4, 2).state_dict().items()}
    torch.save(ints, tmp_path / "ints.pt")
    with pytest.raises(CheckpointMismatchError, match=r"weight: the file has dtype int64, the "
                       r"model float32 \(pass cast=True to convert\)"):
        load_backbone(nn.Linear(4, 2), weights=tmp_path / "ints.pt")
    net = load_backbone(nn.Linear(4, 2), weights=tmp_path / "ints.pt", cast=True)
    assert torch.equal(net.weight, ints["weight"].float())
