"""Early exits on an unmodified backbone (``adaptnet.transfer.attach_exits``): torchvision's
ResNet-18 and MobileNetV3 cut by torch.fx, equal to the backbone and to the per-sample loop."""

from __future__ import annotations

import time

import pytest
import torch
import torchvision
from torch import nn

import adaptnet
from adaptnet.errors import ModelError
from adaptnet.models import build
from adaptnet.transfer import attach_exits, blocks, freeze_blocks

CUTS = ["layer1", "layer2", "layer3"]


def resnet() -> nn.Module:
    return build("resnet18", num_classes=5, in_channels=1, small_input=True, seed=0).eval()


def images(n: int = 12) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_without_early_exits_it_is_the_backbone_and_shares_its_modules():
    net, x = resnet(), images()
    ee = attach_exits(net, CUTS, example=x, threshold=1.0).eval()
    with torch.no_grad():
        out = ee(x)
        assert torch.equal(out.output, net(x)) and (out.exit_index == 3).all()
    assert ee.stages[1].layer2 is net.layer2 and ee.stages[3].fc is net.fc  # no copy
    heads = 64 * 5 + 5 + 128 * 5 + 5 + 256 * 5 + 5
    assert adaptnet.summary(ee).unique == adaptnet.summary(net).unique + heads


def test_each_sample_leaves_where_the_per_sample_loop_says():
    net, x = resnet(), images(16)
    ee = attach_exits(net, CUTS, example=x).eval()
    with torch.no_grad():  # a threshold that splits the batch at the first exit
        first = ee.heads[0](ee.stages[0](x)).softmax(-1).amax(-1)
        ee.set_thresholds(float(first.median()))
        out = ee(x)
        for i in range(len(x)):  # the oracle: one sample at a time, stage by stage
            h = x[i:i + 1]
            for j, (stage, head) in enumerate(zip(ee.stages, ee.heads, strict=True)):
                h = stage(h)
                logits = head(h)
                if j == len(ee.stages) - 1 or logits.softmax(-1).amax() >= ee.thresholds[j]:
                    break
            assert int(out.exit_index[i]) == j
            torch.testing.assert_close(out.output[i], logits[0], rtol=1e-5, atol=1e-5)
    assert 0 < int((out.exit_index == 0).sum()) < len(x)


def test_two_stage_training_trains_the_exits_alone():
    """Shallow-Deep Networks' internal-classifier mode: the backbone frozen (BatchNorm too),
    the exits trained on the joint loss."""
    net, x = resnet(), images(32)
    y = torch.randint(0, 5, (32,), generator=torch.Generator().manual_seed(2))
    ee = attach_exits(net, CUTS, example=x)
    assert blocks(ee) == ["stages", "heads"]
    freeze_blocks(ee, 1)  # everything but the heads; BatchNorm statistics fixed
    before = {k: v.clone() for k, v in net.state_dict().items()}
    heads_before = [p.clone() for p in ee.heads.parameters()]
    adaptnet.fit(ee, (x, y), loss="cross_entropy", optimizer="adam", lr=1e-2, epochs=2,
                 batch_size=8)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and statistics
    assert all(not torch.equal(a, b) for a, b in zip(heads_before, ee.heads.parameters(),
                                                     strict=True))


def test_mobilenet_v3_gets_exits_too():
    net = torchvision.models.mobilenet_v3_small(num_classes=4).eval()
    x = torch.rand(2, 3, 64, 64)
    ee = attach_exits(net, ["features.3", "features.8"], example=x, threshold=1.0).eval()
    with torch.no_grad():
        assert torch.equal(ee(x).output, net(x))


@pytest.mark.parametrize(("at", "message"), [
    (["layer9"], r"has no submodule 'layer9'; its children are conv1, bn1"),
    (["layer2", "layer1"], r"calls them in the order \['layer1', 'layer2'\]"),
    (["layer1.0.conv1"], r"more than one value crosses the cut"),
    ([], r"at must name one or more submodules"),
])
def test_cuts_it_cannot_make_are_model_errors(at, message):
    with pytest.raises(ModelError, match=message):
        attach_exits(resnet(), at, example=images(2))
    with pytest.raises(ModelError, match=r"3 exit point\(s\) need 3 head\(s\), got 1"):
        attach_exits(resnet(), CUTS, example=images(2), heads=[nn.Identity()])


def small_backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_temperatures_are_fitted_per_exit_and_steer_the_decisions():
    net = small_backbone()
    x = torch.rand(64, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    ee = attach_exits(net, ["1", "3"], example=x).eval()
    with torch.no_grad():
        ee.heads[0][2].weight.mul_(20.0)  # an over-confident first exit
        exits = ee.all_exits(x)
    g = torch.Generator().manual_seed(4)  # labels the first exit gets right 70% of the time
    y = torch.where(torch.rand(64, generator=g) < 0.7, exits[0].argmax(-1),
                    torch.randint(0, 4, (64,), generator=g))
    temps = adaptnet.dynamic.calibrate_temperatures(ee, x, y)
    assert len(temps) == 2 and ee.temperatures == temps
    for z, t in zip(exits[:-1], temps, strict=True):  # no worse than T = 1 at any exit
        assert nn.functional.cross_entropy(z / t, y) <= nn.functional.cross_entropy(z, y)
    z, t = exits[0], temps[0]  # where the fit has a minimum inside, T is that minimum
    nll = [float(nn.functional.cross_entropy(z / (t * f), y)) for f in (0.95, 1.0, 1.05)]
    assert nll[1] <= min(nll[0], nll[2]) + 1e-6
    assert temps[0] > 2.0  # the over-confident exit is cooled
    ee.set_thresholds(0.6)
    with torch.no_grad():
        out = ee(x)
        scaled = (exits[0] / temps[0]).softmax(-1).amax(-1) >= 0.6
    assert torch.equal(out.exit_index == 0, scaled)  # the decision reads logits / T
    with pytest.raises(adaptnet.errors.DynamicError, match=r"temperatures needs one positive"):
        ee.set_temperatures([1.0, -2.0])


@pytest.mark.slow
def test_the_all_exits_graph_exports_to_onnx(tmp_path):
    import onnxruntime

    net = small_backbone()
    x = torch.rand(5, 1, 12, 12)
    ee = attach_exits(net, ["1", "3"], example=x).eval()
    graph = adaptnet.dynamic.AllExits(ee).eval()
    path = tmp_path / "exits.onnx"
    torch.onnx.export(graph, (x,), str(path), dynamo=True,
                      dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
    session = onnxruntime.InferenceSession(str(path))
    outs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = ee.all_exits(x)
    assert len(outs) == 3
    for got, want in zip(outs, expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- bad input and a ViT


def test_bad_backbones_examples_and_labels_are_typed_errors():
    from adaptnet.errors import DynamicError

    net = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 3), nn.Flatten(),
                        nn.Linear(16, 3))
    x = torch.randn(4, 1, 8)
    with pytest.raises(ModelError, match=r"at must name one or more submodules.*got None"):
        attach_exits(net, None, example=x)
    with pytest.raises(ModelError, match=r"the example \(\(4, 2, 8\), torch.float32\) does not "
                       r"run through the backbone from the backbone's start: RuntimeError"):
        attach_exits(net, ["1"], example=torch.randn(4, 2, 8))
    with pytest.raises(ModelError, match=r"example must be an input batch"):
        attach_exits(net, ["1"], example=[1, 2])

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 3)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(out[:, -1])

    with pytest.raises(ModelError, match=r"the exit at 'rnn' returns a tuple, not one tensor"):
        attach_exits(Recurrent(), ["rnn"], example=torch.randn(2, 5, 8))

    class Scalar(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 1)

        def forward(self, x):
            return self.a(x).sum()

    with pytest.raises(ModelError, match=r"returns \(\), not \(B, classes\) logits"):
        attach_exits(Scalar(), ["a"], example=torch.randn(4, 8))
    model = attach_exits(net, ["1"], example=x).train()
    y = torch.randint(0, 3, (4,))
    for kw, match in ((dict(y=y[:, None]), r"got torch.int64 \(4, 1\)"),
                      (dict(y=y[:3]), r"got torch.int64 \(3,\)"),
                      (dict(y=y[:1]), r"got torch.int64 \(1,\)"),
                      (dict(candidates=0), r"candidates is how many thresholds to try"),
                      (dict(x=torch.randn(0, 1, 8), y=y[:0]), r"x holds no sample")):
        args = {"x": x, "y": y, "target_accuracy": 0.5} | kw
        with pytest.raises(DynamicError, match=match):
            adaptnet.calibrate_exits(model, args.pop("x"), args.pop("y"), **args)
        assert model.training  # put back after the error
    start = time.perf_counter()
    adaptnet.calibrate_exits(model, x, y, target_compute=1.0, candidates=10**7)
    assert time.perf_counter() - start < 5  # more candidates than scores find nothing more


def test_a_vision_transformer_with_a_root_level_class_token_gets_exits():
    """torchvision's ViT reads its class token (a root-level nn.Parameter) and the encoder's
    position embedding after the cut: bound to the first piece, shared, trained."""
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=4,
                                               num_heads=2, hidden_dim=32, mlp_dim=64,
                                               num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    net = attach_exits(vit, ["encoder.layers.encoder_layer_1"], example=x, threshold=1.0)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x).output, vit(x), rtol=1e-5, atol=1e-5)
    params = {id(p) for p in net.parameters()}
    assert id(vit.class_token) in params and id(vit.encoder.pos_embedding) in params
    out = net.train()(x)
    out.joint_loss(torch.randint(0, 10, (3,))).backward()
    assert vit.class_token.grad is not None and vit.class_token.grad.abs().sum() > 0
