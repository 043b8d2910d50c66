"""Renamed arguments and attributes: the old names still work for one release, with a warning
naming the new one (one meaning per name: capacity, rule, threshold, mask, output, aux_loss)."""

import pytest
import torch
from torch import nn

import adaptnet
from adaptnet.dynamic import Span
from adaptnet.errors import DynamicError
from adaptnet.models import Decoder, decoder
from adaptnet.transfer import attach_exits


def renamed(old: str, new: str):
    return pytest.warns(DeprecationWarning, match=rf"^adaptnet\.{old} is now adaptnet\.{new};")


def exits(**kw) -> adaptnet.EarlyExit:
    torch.manual_seed(0)
    return adaptnet.EarlyExit([nn.Linear(4, 4), nn.Linear(4, 4)],
                              [nn.Linear(4, 3), nn.Linear(4, 3)], **kw).eval()


def test_early_exit_takes_rule_and_threshold_and_its_old_names_with_a_warning():
    new = exits(rule="entropy", threshold=0.7)
    with renamed(r"EarlyExit\(criterion=\)", r"EarlyExit\(rule=\)"), \
            renamed(r"EarlyExit\(thresholds=\)", r"EarlyExit\(threshold=\)"):
        old = exits(criterion="entropy", thresholds=0.7)
    assert (old.rule, old.thresholds) == (new.rule, new.thresholds) == ("entropy", (0.7,))
    with renamed(r"EarlyExit\.criterion", r"EarlyExit\.rule"):
        assert old.criterion == "entropy"
    with pytest.raises(TypeError, match="got rule= and criterion=, its old name"):
        exits(rule="entropy", criterion="entropy")
    x = torch.randn(5, 1, 16)
    backbone = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool1d(1),
                             nn.Flatten(), nn.Linear(4, 3))
    with renamed(r"transfer\.attach_exits\(thresholds=\)", r"transfer\.attach_exits\(threshold=\)"):
        net = attach_exits(backbone, ["1"], example=x, thresholds=0.8)
    assert net.thresholds == (0.8,)


def test_every_result_names_its_output_output_and_its_old_names_read_it_with_a_warning():
    x = torch.randn(6, 4)
    depth = adaptnet.AdaptiveDepth(nn.Linear(4, 4), adaptnet.dynamic.ACTHalting(nn.Linear(4, 1)),
                                   3)
    moe = adaptnet.MoE([nn.Linear(4, 4)] * 2, nn.Linear(4, 2), k=1)
    lm = decoder(vocab_size=11, d_model=8, heads=2, layers=2, capacity=0.5, every=1).train()
    ids = torch.randint(0, 11, (2, 5))
    results = {"ExitResult": exits()(x), "DepthResult": depth(x), "MoEResult": moe(x),
               "DecoderResult": lm(ids)}
    results["TokenResult"] = results["DecoderResult"].layers[0]
    results["TokenExits"] = decoder(vocab_size=11, d_model=8, heads=2, layers=2,
                                    threshold=0.5).eval()(ids).layers[0]
    old_names = {"ExitResult": ["logits", "prediction"], "DepthResult": ["prediction"],
                 "MoEResult": ["prediction"], "DecoderResult": ["logits", "prediction"],
                 "TokenResult": ["hidden", "prediction"], "TokenExits": ["logits", "prediction"]}
    for name, result in results.items():
        assert isinstance(result, adaptnet.dynamic.DynamicResult), name
        for old in old_names[name]:
            with renamed(rf"(dynamic\.)?{name}\.{old}", rf"(dynamic\.)?{name}\.output"):
                assert getattr(result, old) is result.output
    out = results["DecoderResult"]
    assert out.aux_loss is not None  # training: the MoD predictors' loss
    with renamed(r"dynamic\.DecoderResult\.aux", r"dynamic\.DecoderResult\.aux_loss"):
        assert out.aux is out.aux_loss


def test_moe_has_slots_not_a_capacity_and_its_old_capacity_is_the_same_fixed_slots():
    def moe(**kw) -> adaptnet.MoE:
        torch.manual_seed(0)
        return adaptnet.MoE([nn.Linear(4, 4) for _ in range(4)], nn.Linear(4, 4), k=2, **kw)

    x = torch.randn(9, 4)
    new = moe(capacity_factor=0.5, fixed_slots=True)
    with renamed(r"MoE\(capacity=0\.25\)",
                 r"MoE\(capacity_factor=0\.5, fixed_slots=True\)"):
        old = moe(capacity=0.25)
    assert (old.capacity_factor, old.fixed_slots) == (0.5, True)
    a, b = old(x), new(x)
    assert torch.equal(a.output, b.output) and torch.equal(a.dropped, b.dropped)
    assert a.dropped.any()  # the slots did bind: some assignments were dropped
    with pytest.raises(DynamicError, match="give capacity_factor \\(with fixed_slots=True\\)"):
        moe(capacity=0.25, capacity_factor=1.0)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        moe(capactiy=0.25)


def test_the_decoder_builder_takes_the_names_of_the_constructs_it_builds():
    with renamed(r"models\.decoder\(mod_capacity=\)", r"models\.decoder\(capacity=\)"), \
            renamed(r"models\.decoder\(mod_every=\)", r"models\.decoder\(every=\)"):
        old = decoder(vocab_size=11, d_model=8, heads=2, layers=2, mod_capacity=0.5, mod_every=1)
    new = decoder(vocab_size=11, d_model=8, heads=2, layers=2, capacity=0.5, every=1)
    assert [type(b).__name__ for b in old.blocks] == [type(b).__name__ for b in new.blocks] \
        == ["MixtureOfDepths", "MixtureOfDepths"]
    assert old.blocks[0].capacity == 0.5
    with renamed(r"models\.decoder\(exit_threshold=\)", r"models\.decoder\(threshold=\)"), \
            renamed(r"models\.decoder\(exit_rule=\)", r"models\.decoder\(rule=\)"):
        lm = decoder(vocab_size=11, d_model=8, heads=2, layers=2, exit_threshold=0.5,
                     exit_rule="learned")
    assert (lm.blocks[0].threshold, lm.blocks[0].rule) == (0.5, "learned")
    with renamed(r"models\.Decoder\(exit_threshold=\)", r"models\.Decoder\(threshold=\)"):
        Decoder(11, 8, [adaptnet.dynamic.CausalBlock(8, 2)], 16, exit_threshold=0.5)


def test_a_span_names_its_real_tokens_mask_as_the_models_do():
    x, mask = torch.randn(2, 3, 8), torch.tensor([[False, True, True], [True, True, True]])
    span = Span.of(x, mask=mask)
    assert span.mask is mask
    assert span.call_mask()[0, 0, 2, 0].item() is False  # a real query never reads padding


def test_a_run_result_carries_typed_results_and_its_old_dict_with_a_warning(tmp_path):
    from adaptnet._rundir import RunResults
    from adaptnet.recipes import RunResult

    results = RunResults(recipe="r", model="mlp", dataset="digits", samples={"test": 4},
                         train_seconds=1.0, epochs=1, history=[], test={"loss": 0.5},
                         params={"unique": 1, "per_use": 1, "trainable": 1},
                         infer_ms_per_1k=1.0, counts={}, metric=("loss", 0.5))
    run = RunResult(tmp_path, results)
    with renamed(r"recipes\.RunResult\.values", r"recipes\.RunResult\.results"):
        assert run.values == {**results.model_dump(exclude_none=True)} and \
            run.values["test"] == {"loss": 0.5}


def test_load_means_weights_into_a_model_and_compare_means_models_side_by_side():
    import adaptnet.data
    import adaptnet.recipes

    with renamed(r"data\.load", r"data\.load_dataset"):
        assert adaptnet.data.load is adaptnet.data.load_dataset
    with renamed(r"recipes\.compare", r"recipes\.compare_variants"):
        assert adaptnet.recipes.compare is adaptnet.recipes.compare_variants
    assert adaptnet.compare is adaptnet.study.compare_models
