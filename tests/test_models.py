"""The model zoo: every builder, its parameter counts with and without sharing, and the
dynamic models against the per-sample loop (outputs and gradients)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import adaptnet
import adaptnet.models as M
from adaptnet.errors import DynamicError, ModelError

INPUTS = {
    "branch_net": (10,), "two_input_net": (2, 10), "adaptive_mlp": (64,),
    "small_cnn": (1, 28, 28), "reused_layer": (8,), "shared_scale_net": (10,), "logreg": (40,),
    "mlp": (40,), "cnn1d": (40,), "gru_classifier": (40,), "siamese": (2, 64),
    "tied_autoencoder": (64,), "albert_encoder": (40,), "universal_transformer": (40,),
    "pondernet_gru": (8,), "early_exit_cnn": (40,), "moe_mlp": (64,), "adaptive_depth_mlp": (64,),
    "resnet18": (3, 32, 32), "sdn_resnet": (1, 28, 28),
}
ARGS = {"lstm_lm": {"vocab_size": 50, "embed_size": 8, "hidden": 8},
        "decoder": {"vocab_size": 50, "d_model": 8, "heads": 2, "capacity": 0.5}}


def _pred(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, adaptnet.dynamic.ExitResult | M.DecoderResult):
        return out.output
    return out.output


def _input(name: str, b: int) -> torch.Tensor:
    if name in ("lstm_lm", "decoder"):
        return torch.randint(0, 50, (b, 7))
    return torch.randn(b, *INPUTS[name])


def test_every_model_is_listed_and_builds():
    assert set(M.MODELS) == set(INPUTS) | set(ARGS)
    for name in M.MODELS:
        model = M.build(name, **ARGS.get(name, {}))
        for training in (True, False):
            model.train(training)
            pred = _pred(model(_input(name, 3)))
            assert pred.shape[0] == 3 and torch.isfinite(pred).all(), name
        assert M.describe(name), name


# Parameter counts (unique, per use), computed by hand from the layer shapes.
COUNTS = {
    "reused_layer": (72, 144),  # one Linear(8, 8) used twice
    "shared_scale_net": (481, 497),  # 10*16+16+16 + 16*16+16+16 + 17; the scale once
    "tied_autoencoder": (64 * 32 + 32 + 64, 2 * 64 * 32 + 32 + 64),
    "lstm_lm": (50 * 8 + 2 * 4 * (8 * 8 + 8 * 8 + 2 * 8) + 50,
                2 * 50 * 8 + 2 * 4 * (8 * 8 + 8 * 8 + 2 * 8) + 50),
}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts_with_sharing(name):
    s = adaptnet.summary(M.build(name, **ARGS.get(name, {})))
    assert (s.unique, s.per_use) == COUNTS[name]


def test_lstm_tying_removes_one_vocab_matrix():
    tied = adaptnet.summary(M.lstm_lm(vocab_size=1000, embed_size=64, hidden=64))
    untied = adaptnet.summary(M.lstm_lm(vocab_size=1000, embed_size=64, hidden=64, tied=False))
    assert untied.unique - tied.unique == 1000 * 64
    with pytest.raises(ModelError, match="embed_size == hidden"):
        M.lstm_lm(embed_size=32, hidden=64)


def test_albert_sharing_modes():
    counts = {m: adaptnet.summary(M.albert_encoder(sharing=m, layers=6)) for m in M.SHARING}
    layer = counts["none"].unique - counts["all"].unique
    assert layer > 0 and counts["none"].per_use == counts["all"].per_use
    assert counts["all"].unique < counts["attention"].unique < counts["none"].unique
    assert counts["all"].unique < counts["ffn"].unique < counts["none"].unique
    net = M.albert_encoder(sharing="all", layers=6, groups=3, strategy="sequence")
    assert net.layers[0] is net.layers[1] and net.layers[1] is not net.layers[2]
    net = M.albert_encoder(sharing="all", layers=6, groups=3, strategy="cycle")
    assert net.layers[0] is net.layers[3] and net.layers[0] is not net.layers[1]
    net = M.albert_encoder(sharing="attention", layers=4)
    assert net.layers[0].self_attn is net.layers[3].self_attn
    assert net.layers[0].linear1 is not net.layers[3].linear1
    with pytest.raises(ModelError, match="groups must divide"):
        M.albert_encoder(layers=6, groups=4)


def test_early_exit_cnn_sharing_and_plain_twin():
    shared = M.early_exit_cnn(share_stages=True)
    assert shared.exits.stages[0] is shared.exits.stages[2]
    plain = M.early_exit_cnn(exits=False)
    assert isinstance(plain(torch.randn(2, 40)), torch.Tensor)
    conv = 32 * 32 * 3 + 32
    assert adaptnet.summary(M.early_exit_cnn()).unique - \
        adaptnet.summary(shared).unique == 2 * conv
    assert M.early_exit_cnn(dims=2)(torch.randn(2, 1, 28, 28)).output.shape == (2, 10)


def test_ties_survive_training_and_save_load(tmp_path):
    net = M.lstm_lm(vocab_size=50, embed_size=8, hidden=8)
    x = torch.randint(0, 50, (16, 6))
    adaptnet.fit(net, (x, x), loss="cross_entropy", optimizer="adam", lr=0.01, epochs=2,
                 batch_size=8)
    assert net.decoder.weight is net.embedding.weight
    adaptnet.save(net, tmp_path / "lm.safetensors")
    fresh = adaptnet.load(M.lstm_lm(vocab_size=50, embed_size=8, hidden=8, tied=False),
                          tmp_path / "lm.safetensors")
    assert fresh.decoder.weight is fresh.embedding.weight
    torch.testing.assert_close(fresh.embedding.weight, net.embedding.weight)


def test_tied_autoencoder_untied_baseline_has_a_decoder_of_its_own():
    tied, untied = M.tied_autoencoder(6, 4), M.tied_autoencoder(6, 4, tied=False)
    assert adaptnet.summary(tied).unique == 6 * 4 + 4 + 6
    assert adaptnet.summary(untied).unique == 2 * 6 * 4 + 4 + 6
    assert untied.decoder.weight.shape == (6, 4)
    with torch.no_grad():
        untied.encoder.weight.zero_()
    assert untied.decoder.weight.abs().sum() > 0  # not a view of the encoder's


def test_sdn_resnet_is_resnet20_with_an_exit_after_every_block():
    plain = M.sdn_resnet(in_channels=3, exits=False)
    conv = 9 * 3 * 16 + 6 * (16 * 16 * 9) + (16 * 32 * 9 + 5 * 32 * 32 * 9) \
        + (32 * 64 * 9 + 5 * 64 * 64 * 9) + 16 * 32 + 32 * 64  # 3x3 convs, 1x1 shortcuts
    bn = 2 * (16 + 6 * 16 + 7 * 32 + 7 * 64)  # stem, two per block, one per shortcut
    assert adaptnet.summary(plain).unique == conv + bn + 64 * 10 + 10 == 272_474  # He et al.
    net = M.sdn_resnet(in_channels=3, pool=2)
    assert len(net.exits.heads) == 9 and net.exits.heads[0][2].in_features == 16 * 2 * 2
    assert net.exits.weights == pytest.approx([i / 9 for i in range(1, 10)])


def test_sdn_resnet_with_no_early_exit_taken_is_the_plain_network():
    torch.manual_seed(0)
    plain = M.sdn_resnet(exits=False).eval()
    net = M.sdn_resnet(threshold=1.0).eval()  # a softmax of random logits never reaches 1
    stages = list(plain)
    net.stem.load_state_dict(stages[0].state_dict())
    for mine, theirs in zip(net.exits.stages, stages[1:-1], strict=True):
        mine.load_state_dict(theirs.state_dict())
    net.exits.heads[-1].load_state_dict(stages[-1].state_dict())
    x = torch.randn(4, 1, 28, 28)
    out = net(x)
    assert (out.exit_index == 8).all()
    torch.testing.assert_close(out.output, plain(x))


def test_count_macs_through_a_transposed_tie_without_grad():
    net = M.tied_autoencoder(in_features=6, hidden=4)
    with torch.no_grad(), adaptnet.count_macs() as macs:
        net(torch.rand(3, 6))
    assert macs.total == 2 * 3 * 6 * 4
    assert net.decoder.weight.requires_grad  # with grad mode, the view still trains the owner


def test_build_errors():
    with pytest.raises(ModelError, match=r"unknown model 'lstm'. Did you mean 'lstm_lm'"):
        M.build("lstm")
    with pytest.raises(ModelError, match=r"unknown argument\(s\) hiden; it accepts .*hidden"):
        M.build("mlp", hiden=3)
    with pytest.raises(ModelError, match="sharing must be one of"):
        M.build("albert_encoder", sharing="some")
    with pytest.raises(ModelError, match=r"sdn_resnet: widths must be .* blocks=0"):
        M.build("sdn_resnet", blocks=0)
    with pytest.raises(ModelError, match="halting must be"):
        M.build("pondernet_gru", halting="fixed")


# -- the dynamic models against the per-sample loop ------------------------------------

def _oracle(model, x, *, fields=()):
    """Batched outputs and parameter gradients equal those of one sample at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    w = torch.randn_like(_pred(out))
    grads = torch.autograd.grad((_pred(out) * w).sum(), params, allow_unused=True)
    rows, loop_grads = [], [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        one = model(x[i:i + 1])
        rows.append(one)
        g = torch.autograd.grad((_pred(one) * w[i:i + 1]).sum(), params, allow_unused=True)
        for acc, gi in zip(loop_grads, g, strict=True):
            if gi is not None:
                acc += gi
    if len(x):
        torch.testing.assert_close(_pred(out), torch.cat([_pred(r) for r in rows]))
        for f in fields:
            assert torch.equal(getattr(out, f), torch.cat([getattr(r, f) for r in rows])), f
    for g, lg in zip(grads, loop_grads, strict=True):
        torch.testing.assert_close(torch.zeros_like(lg) if g is None else g, lg)
    return out


@pytest.mark.parametrize("b", [0, 1, 9])
def test_branch_net_matches_loop(b):
    net = M.branch_net()
    with torch.no_grad():
        net.hidden.bias[:25] = -3.0  # some samples have an all-zero hidden layer: else path
    x = torch.randn(b, 10) * torch.linspace(0.01, 3, max(b, 1))[:b, None]
    _oracle(net, x)


@pytest.mark.parametrize("b", [0, 1, 9])
def test_adaptive_mlp_matches_loop(b):
    _oracle(M.adaptive_mlp(hidden=16, tol=0.5), torch.randn(b, 64) * 2)


@pytest.mark.parametrize("where", ["first", "mixed", "last"])
def test_early_exit_cnn_with_shared_stages_matches_loop(where):
    net = M.early_exit_cnn(channels=8, num_classes=3, share_stages=True,
                           threshold=0.05 if where == "first" else 1.0).eval()
    x = torch.randn(12, 40) * 3
    if where == "mixed":  # half the samples are sure enough at exit 0, none on the threshold
        with torch.no_grad():
            first = net.exits.all_exits(net.stem(x))[0].softmax(1).amax(1).sort().values
        net.exits.set_thresholds(float(first[5:7].mean()))
    out = _oracle(net, x, fields=("exit_index",))
    taken = set(out.exit_index.tolist())
    if where == "mixed":
        assert 0 in taken and len(taken) > 1
    else:
        assert taken == ({0} if where == "first" else {2})


def test_early_exit_cnn_mixes_exits():
    net = M.early_exit_cnn(channels=8, num_classes=3).eval()
    x = torch.randn(40, 40) * 3
    with torch.no_grad():  # half the samples leave at exit 0; none sits on the threshold
        first = net.exits.all_exits(net.stem(x))[0].softmax(1).amax(1).sort().values
    net.exits.set_thresholds(float(first[19:21].mean()))
    out = _oracle(net, x, fields=("exit_index",))
    assert len(set(out.exit_index.tolist())) > 1


@pytest.mark.parametrize("name", ["adaptive_depth_mlp", "universal_transformer",
                                  "pondernet_gru", "moe_mlp"])
@pytest.mark.parametrize("b", [0, 1, 7])
def test_adaptive_models_match_loop_in_eval(name, b):
    net = M.build(name).eval()
    fields = ("steps",) if name != "moe_mlp" else ("experts",)
    out = _oracle(net, _input(name, b), fields=fields)
    if name != "moe_mlp" and b == 7:
        assert out.steps.min() >= 1


def test_pondernet_training_uses_the_expected_loss():
    torch.manual_seed(0)
    net = M.pondernet_gru(hidden=8, max_steps=5)
    x, y = torch.randn(6, 8), torch.randint(0, 2, (6,))
    out = net(x)  # training mode: halting distribution and a prediction per step
    per_step = torch.nn.functional.cross_entropy(out.step_states.flatten(0, 1),
                                                 y.repeat_interleave(5), reduction="none")
    expected = (out.halting * per_step.view(6, 5)).sum(1).mean() + out.aux_loss
    from adaptnet.train._losses import cross_entropy, unpack

    task, aux, pred, _ = unpack(out, y, cross_entropy, True)
    torch.testing.assert_close(task + aux, expected)
    assert pred is out.output


def test_contrastive_loss():
    e = torch.randn(4, 3)
    assert M.contrastive_loss(e, e, torch.ones(4)) < 1e-10
    far = M.contrastive_loss(e, e + 10, torch.zeros(4))
    assert far == 0
    assert abs(float(M.contrastive_loss(e, e, torch.zeros(4), margin=2.0)) - 4.0) < 1e-4


def test_docs_parameter_tables_match_the_builders():
    docs = (Path(__file__).parent.parent / "docs" / "models.md").read_text()
    first = docs.split("Some models reuse")[0]  # the first table only
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| ([\d,]+) \| ([\d,]+) \|$", first, flags=re.M)
    assert {r[0] for r in rows} == set(M.MODELS)
    for name, unique, per_use in rows:
        s = adaptnet.summary(M.build(name))
        assert (f"{s.unique:,}", f"{s.per_use:,}") == (unique, per_use), name
    shared = adaptnet.summary(M.early_exit_cnn(share_stages=True)).unique
    assert f"| {shared:,} | 13,374 |" in docs
    ut = M.universal_transformer()
    layer = sum(p.numel() for p in ut.depth.blocks[0].parameters())
    assert f"one encoder layer ({layer:,}) up to 6 steps | 38,539 | {38_539 + 5 * layer:,} |" \
        in docs


def test_pondernet_gru_without_halting_runs_every_sample_to_the_end():
    net = M.pondernet_gru(bits=4, hidden=8, max_steps=5, halting="none").eval()
    out = net(torch.randn(6, 4))
    assert out.steps.tolist() == [5] * 6 and net.depth.capacity == 1.0
    with pytest.raises(DynamicError, match="capacity must be a fraction in"):
        M.PonderGRU(4, 8, 2, 5, net.depth.halting, capacity=1.5)  # checked when built


def test_classifier_is_nn_linear_computed_the_other_way_round():
    """The zoo's few-class head: nn.Linear's parameters, state dict, values and gradients,
    the product taken as (W @ x.T).T; other input ranks go through nn.Linear."""
    from adaptnet.models._parts import Classifier
    torch.manual_seed(0)
    for bias in (True, False):
        head, ref = Classifier(96, 10, bias=bias), torch.nn.Linear(96, 10, bias=bias)
        ref.load_state_dict(head.state_dict())
        assert list(head.state_dict()) == list(ref.state_dict())
        for shape in ((7, 96), (1, 96), (0, 96), (3, 5, 96)):
            x = torch.randn(*shape, requires_grad=True)
            got, want = head(x), ref(x)
            torch.testing.assert_close(got, want)
            if x.numel():
                got.square().sum().backward()
                g = (x.grad.clone(), head.weight.grad.clone())
                x.grad = None
                want.square().sum().backward()
                torch.testing.assert_close(g[0], x.grad)
                torch.testing.assert_close(g[1], ref.weight.grad)
                head.zero_grad(), ref.zero_grad()
    net = M.early_exit_cnn(channels=8, stages=2)
    assert all(isinstance(h[-1], Classifier) for h in net.exits.heads)
    assert isinstance(M.early_exit_cnn(channels=8, exits=False)[-1][-1], Classifier)
