"""tie / retie / assert_tied / ties: identity must survive everything PyTorch does."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaptnet
from adaptnet.errors import TieBrokenError, TieError
from conftest import AE, TinyLM, tied_ae, tied_lm


def lm_tied(m: TinyLM) -> bool:
    return m.head.weight is m.embed.weight


def ae_tied(m: AE) -> bool:
    return m.decoder.parametrizations.weight.original is m.encoder.weight


def train_steps(model: nn.Module, x: torch.Tensor, opt_cls=torch.optim.Adam, n: int = 3) -> None:
    opt = opt_cls(model.parameters(), lr=0.01)
    for _ in range(n):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


# --------------------------------------------------------------------------- identity


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop])
def test_identity_after_optimizer_steps(opt_cls):
    lm, ae = tied_lm(), tied_ae()
    before = lm.embed.weight.detach().clone()
    train_steps(lm, torch.randint(0, 1000, (4, 3)), opt_cls)
    train_steps(ae, torch.randn(8, 12), opt_cls)
    assert lm_tied(lm) and ae_tied(ae)
    assert not torch.equal(before, lm.embed.weight)  # it did train
    assert torch.equal(ae.decoder.weight, ae.encoder.weight.T)


def test_identity_after_deepcopy_and_pickle():
    for clone in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        lm, ae = clone(tied_lm()), clone(tied_ae())
        assert lm_tied(lm) and ae_tied(ae)
        adaptnet.assert_tied(lm)
        adaptnet.assert_tied(ae)
        x = torch.randn(3, 12)
        ae(x).sum().backward()  # the clone trains one tensor through both uses
        assert ae.encoder.weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_identity_after_dtype_cast(dtype):
    lm, ae = tied_lm().to(dtype), tied_ae().to(dtype)
    assert lm_tied(lm) and ae_tied(ae)
    assert lm.embed.weight.dtype == dtype and ae.decoder.weight.dtype == dtype


def test_to_empty_breaks_plain_ties_and_retie_restores_them():
    with torch.device("meta"):
        lm, ae = tied_lm(), tied_ae()
    lm.to_empty(device="cpu")
    ae.to_empty(device="cpu")
    # PyTorch made new Parameter objects per slot: the ties are broken...
    assert not lm_tied(lm) and not ae_tied(ae)
    with pytest.raises(TieBrokenError,
                       match=r"(?s)'head.weight' is not 'embed.weight'.*adaptnet.retie"):
        adaptnet.assert_tied(lm)
    # ...and retie puts them back.
    assert adaptnet.retie(lm) == ["head.weight"]
    assert adaptnet.retie(ae) == ["decoder.weight"]
    assert lm_tied(lm) and ae_tied(ae)
    assert adaptnet.retie(lm) == []  # idempotent
    adaptnet.assert_tied(lm)


def test_load_state_dict_assign_breaks_ties_and_retie_restores_them():
    src, lm = tied_lm(), tied_lm()
    lm.load_state_dict(src.state_dict(), assign=True)
    assert not lm_tied(lm)
    with pytest.raises(TieBrokenError, match="1 declared tie"):
        adaptnet.assert_tied(lm)
    adaptnet.retie(lm)
    assert lm_tied(lm) and torch.equal(lm.embed.weight, src.embed.weight)

    ae_src, ae = tied_ae(), tied_ae()
    ae.load_state_dict(ae_src.state_dict(), assign=True)
    assert not ae_tied(ae)
    with pytest.raises(TieBrokenError, match=r"transpose of 'encoder\.weight'"):
        adaptnet.assert_tied(ae)
    adaptnet.retie(ae)
    assert ae_tied(ae) and torch.equal(ae.decoder.weight, ae_src.encoder.weight.T)


def test_save_load_into_tied_and_untied_models(tmp_path):
    lm, ae = tied_lm(), tied_ae()
    train_steps(lm, torch.randint(0, 1000, (4, 3)))
    adaptnet.save(lm, tmp_path / "lm.safetensors")
    adaptnet.save(ae, tmp_path / "ae.safetensors")
    for target_lm, target_ae in ((tied_lm(), tied_ae()), (TinyLM(), AE())):
        adaptnet.load(target_lm, tmp_path / "lm.safetensors")
        adaptnet.load(target_ae, tmp_path / "ae.safetensors")
        assert lm_tied(target_lm) and ae_tied(target_ae)
        assert torch.equal(target_lm.embed.weight, lm.embed.weight)
        x = torch.randn(2, 12)
        torch.testing.assert_close(target_ae(x), ae(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- transposed tie


def test_transposed_tie_gradients_equal_hand_written_reference():
    model = tied_ae()
    W, b_enc, b_dec = (model.encoder.weight.detach().clone().requires_grad_(),
                       model.encoder.bias.detach().clone().requires_grad_(),
                       model.decoder.bias.detach().clone().requires_grad_())
    x = torch.randn(7, 12)
    out = model(x)
    ref = F.linear(torch.relu(F.linear(x, W, b_enc)), W.t(), b_dec)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    # One tensor, gradient from both uses (encoder and transposed decoder).
    torch.testing.assert_close(model.encoder.weight.grad, W.grad)
    assert model.decoder.parametrizations.weight.original.grad is model.encoder.weight.grad
    assert len(list(model.parameters())) == 3  # W, b_enc, b_dec: no copy


def test_transposed_view_tracks_in_place_updates():
    model = tied_ae()
    with torch.no_grad():
        model.encoder.weight[0, 3] = 42.0
    assert model.decoder.weight[3, 0] == 42.0


@pytest.mark.slow
def test_tie_under_torch_compile_matches_eager():
    model = tied_ae()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 12)
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    g = model.encoder.weight.grad.clone()
    model.zero_grad()
    model(x).sum().backward()
    torch.testing.assert_close(g, model.encoder.weight.grad)


def test_tied_model_trains_exactly_like_hand_tied_model():
    torch.manual_seed(1)
    ours = tied_lm()
    hand = TinyLM()
    hand.load_state_dict(ours.state_dict())
    hand.head.weight = hand.embed.weight  # the plain-PyTorch way
    x = torch.randint(0, 1000, (4, 5))
    train_steps(ours, x, n=4)
    train_steps(hand, x, n=4)
    for a, b in zip(ours.parameters(), hand.parameters(), strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- chains


def test_chains_resolve_to_one_owner():
    net = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))
    adaptnet.tie(net, "1.weight", "0.weight")
    adaptnet.tie(net, "2.weight", "1.weight")  # owner is a member: resolves to 0
    adaptnet.tie(net, "0.weight", "3.weight")  # 0 and its members now follow 3
    assert all(net[i].weight is net[3].weight for i in range(3))
    [group] = [g for g in adaptnet.ties(net) if g.owner.endswith("weight")]
    assert group.owner == "3.weight"
    assert {m.name for m in group.members} == {"0.weight", "1.weight", "2.weight"}
    adaptnet.tie(net, "2.weight", "0.weight")  # already implied: a no-op
    assert adaptnet.retie(net) == []


def test_transposes_compose():
    net = nn.ModuleDict({"a": nn.Linear(3, 5), "b": nn.Linear(5, 3), "c": nn.Linear(3, 5)})
    adaptnet.tie(net, "b.weight", "a.weight", "transpose")
    adaptnet.tie(net, "c.weight", "b.weight", "transpose")  # (aᵀ)ᵀ = a
    assert net["c"].weight is net["a"].weight
    adaptnet.tie(net, "a.weight", "b.weight", "transpose")  # a = bᵀ is already implied
    assert adaptnet.retie(net) == []


def test_contradictory_tie_is_refused():
    net = nn.ModuleDict({"d": nn.Linear(4, 4), "e": nn.Linear(4, 4)})
    adaptnet.tie(net, "e.weight", "d.weight", "transpose")
    with pytest.raises(TieError, match="tied to itself without a transpose"):
        adaptnet.tie(net, "d.weight", "e.weight")  # d = e = dᵀ


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("member", "owner", "transform", "match"),
    [
        ("head.wieght", "embed.weight", None,
         r"member 'head.wieght' is not a parameter of TinyLM\. Did you mean 'head.weight'"),
        ("head.weight", "nope", None, r"owner 'nope' is not a parameter"),
        ("head.weight", "head.weight", None, "the same parameter 'head.weight'"),
        ("hidden.weight", "embed.weight", None,
         r"cannot tie 'hidden.weight' of shape \[16, 16\] to 'embed.weight': the owner has "
         r"shape \[1000, 16\]"),
        ("head.weight", "embed.weight", "rotate", "unknown tie transform 'rotate'"),
        ("hidden.bias", "embed.weight", "transpose", "needs 2-D parameters"),
    ],
)
def test_tie_errors_name_paths_shapes_and_fix(member, owner, transform, match):
    with pytest.raises(TieError, match=match):
        adaptnet.tie(TinyLM(), member, owner, transform)


def test_tie_suggests_transpose_for_transposed_shapes():
    with pytest.raises(TieError, match=r"Did you mean transform='transpose'\?"):
        adaptnet.tie(AE(), "decoder.weight", "encoder.weight")


def test_tie_refuses_dtype_mismatch_and_leaves_model_untouched():
    m = TinyLM()
    m.head.double()
    with pytest.raises(TieError, match=r"torch.float64 on cpu but 'embed.weight' is "
                                       r"torch.float32.*model.to\(dtype\)"):
        adaptnet.tie(m, "head.weight", "embed.weight")
    assert m.head.weight is not m.embed.weight and adaptnet.ties(m) == []


def test_tie_refuses_buffers():
    m = nn.ModuleDict({"bn": nn.BatchNorm1d(4), "lin": nn.Linear(4, 4)})
    with pytest.raises(TieError, match=r"'bn\.running_mean' is not a parameter"):
        adaptnet.tie(m, "bn.running_mean", "lin.bias")


# --------------------------------------------------------------------------- discovery


def test_ties_discovers_plain_assignment_and_storage_aliases():
    m = TinyLM()
    m.head.weight = m.embed.weight  # plain PyTorch tie: found, not declared
    # A row of another tensor shares its memory but is not the same tensor: no tie.
    m.hidden.bias = nn.Parameter(m.hidden.weight.detach()[0])
    groups = adaptnet.ties(m)
    assert [(g.owner, [x.name for x in g.members], g.kind) for g in groups] == [
        ("embed.weight", ["head.weight"], "identity")]
    assert groups[0].members[0].declared is False

    m2 = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
    m2["b"].weight = nn.Parameter(m2["a"].weight.detach())  # two objects, one memory
    [g] = adaptnet.ties(m2)
    assert (g.owner, g.members[0].name, g.kind) == ("a.weight", "b.weight", "storage")


def test_ties_reports_declared_transposed_members():
    [g] = adaptnet.ties(tied_ae())
    assert g.owner == "encoder.weight" and g.shape == (5, 12) and g.numel == 60
    assert g.members == (adaptnet.sharing.TieMember("decoder.weight", "transpose", True),)


def test_untie_gives_own_copy_and_keeps_other_members_tied():
    net = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    adaptnet.tie(net, "1.weight", "0.weight")
    adaptnet.tie(net, "2.weight", "0.weight")
    assert adaptnet.untie(net, "0.weight") == ["0.weight"]
    assert net[0].weight is not net[1].weight and net[1].weight is net[2].weight
    assert torch.equal(net[0].weight, net[1].weight)  # same value, own tensor
    adaptnet.assert_tied(net)  # 2 -> 1 is still declared and holds
    assert adaptnet.untie(net, "0.weight") == []  # nothing left to untie


def test_untie_transposed_member_and_owner():
    ae = tied_ae()
    adaptnet.untie(ae, "decoder.weight")
    assert isinstance(ae.decoder.weight, nn.Parameter) and ae.decoder.weight.shape == (12, 5)
    assert adaptnet.ties(ae) == []
    assert torch.equal(ae.decoder.weight, ae.encoder.weight.T)

    ae = tied_ae()
    before = ae.encoder.weight.detach().clone()
    adaptnet.untie(ae, "encoder.weight")  # the owner leaves; the member gets a plain tensor
    assert adaptnet.ties(ae) == [] and torch.equal(ae.encoder.weight, before)
    assert torch.equal(ae.decoder.weight, before.T)


# --------------------------------------------------------------------------- documented claims


def _with_future(flag: str, fn):
    def run(m):
        getattr(torch.__future__, f"set_{flag}")(True)
        try:
            return fn(m)
        finally:
            getattr(torch.__future__, f"set_{flag}")(False)
    return run


@pytest.mark.parametrize(
    ("op", "survives"),
    [
        (lambda m: m.half(), True),
        (lambda m: m.share_memory(), True),
        (_with_future("swap_module_params_on_conversion", lambda m: m.double()), True),
        (_with_future("overwrite_module_params_on_conversion", lambda m: m.double()), False),
    ],
    ids=["half", "share_memory", "swap_on_conversion", "overwrite_on_conversion"],
)
def test_retie_docstring_claims(op, survives):
    """retie's docstring lists which operations break ties; keep it true."""
    lm, ae = op(tied_lm()), op(tied_ae())
    assert (lm_tied(lm), ae_tied(ae)) == (survives, survives)
    adaptnet.retie(lm)
    adaptnet.retie(ae)
    assert lm_tied(lm) and ae_tied(ae)


def test_untie_unknown_name():
    with pytest.raises(TieError, match=r"'hed\.weight' is neither a parameter nor a submodule\. "
                                       r"Did you mean 'head\.weight'"):
        adaptnet.untie(tied_lm(), "hed.weight")


def test_retie_explains_an_owner_that_is_gone():
    lm = tied_lm()
    lm.embed = nn.Identity()  # the owner's module was replaced by one without the parameter
    with pytest.raises(TieBrokenError, match=r"owner 'embed\.weight' is not a parameter any more"):
        adaptnet.retie(lm)
