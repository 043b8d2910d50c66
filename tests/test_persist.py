"""save / load: one copy per tensor, ties restored, every bad file refused clearly."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import adaptnet
from adaptnet.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
)
from conftest import AE, TinyLM, tied_ae, tied_lm


def stored_keys(path) -> set[str]:
    with safetensors.safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def test_file_stores_one_copy_per_tensor_with_manifest(tmp_path):
    path = adaptnet.save(tied_lm(), tmp_path / "lm.safetensors")
    assert stored_keys(path) == {"embed.weight", "hidden.weight", "hidden.bias"}
    with safetensors.safe_open(str(path), framework="pt") as f:
        manifest = json.loads(f.metadata()["adaptnet"])
    assert manifest == {"version": 1, "aliases": {"head.weight": ["embed.weight", None]},
                        "modules": {}}
    untied = adaptnet.save(TinyLM(), tmp_path / "untied.safetensors")
    assert os.path.getsize(path) < 0.55 * os.path.getsize(untied)


def test_transposed_tie_is_stored_once_and_restored(tmp_path):
    ae = tied_ae()
    path = adaptnet.save(ae, tmp_path / "ae.safetensors")
    assert stored_keys(path) == {"encoder.weight", "encoder.bias", "decoder.bias"}
    fresh = adaptnet.load(AE(), path)
    assert fresh.decoder.parametrizations.weight.original is fresh.encoder.weight
    x = torch.randn(3, 12)
    assert torch.equal(fresh(x), ae(x))


def test_plain_assignment_ties_are_saved_and_restored(tmp_path):
    m = TinyLM()
    m.head.weight = m.embed.weight  # not declared: found by identity
    fresh = adaptnet.load(TinyLM(), adaptnet.save(m, tmp_path / "m.safetensors"))
    assert fresh.head.weight is fresh.embed.weight
    assert [x.declared for x in adaptnet.ties(fresh)[0].members] == [True]  # now declared


def test_buffers_round_trip(tmp_path):
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    m.train()
    m(torch.randn(16, 3))  # updates running statistics
    fresh = adaptnet.load(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
                          adaptnet.save(m, tmp_path / "m.safetensors"))
    assert torch.equal(fresh[1].running_mean, m[1].running_mean)
    assert fresh[1].num_batches_tracked == 1


def test_meta_model_is_materialised_with_ties(tmp_path):
    src = tied_ae()
    path = adaptnet.save(src, tmp_path / "ae.safetensors")
    with torch.device("meta"):
        model = AE()
    adaptnet.load(model, path)
    assert model.encoder.weight.device.type == "cpu"
    assert model.decoder.parametrizations.weight.original is model.encoder.weight
    assert isinstance(model.encoder.weight, nn.Parameter) and model.encoder.weight.requires_grad
    x = torch.randn(2, 12)
    assert torch.equal(model(x), src(x))


def test_save_refuses_meta_tensors(tmp_path):
    with torch.device("meta"):
        model = TinyLM()
    with pytest.raises(CheckpointError, match=r"meta device.*materialise the model first"):
        adaptnet.save(model, tmp_path / "m.safetensors")


def test_plain_safetensors_files_load_too(tmp_path):
    src = tied_lm()
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_model(src, str(path))  # drops the alias, keeps embed.weight
    fresh = adaptnet.load(tied_lm(), path)
    assert torch.equal(fresh.head.weight, src.embed.weight)


def test_load_never_unpickles(tmp_path, monkeypatch):
    path = adaptnet.save(tied_lm(), tmp_path / "m.safetensors")

    def refuse(*a, **k):
        raise AssertionError("load() must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    adaptnet.load(TinyLM(), path)


# --------------------------------------------------------------------------- refusals


def test_missing_unexpected_and_shape_problems_are_reported_together(tmp_path):
    path = adaptnet.save(TinyLM(), tmp_path / "m.safetensors")
    other = nn.ModuleDict({"embed": nn.Embedding(1000, 8), "hidden": nn.Linear(16, 16),
                           "extra": nn.Linear(2, 2)})
    with pytest.raises(CheckpointMismatchError) as info:
        adaptnet.load(other, path)
    e = info.value
    assert set(e.missing) == {"extra.weight", "extra.bias"}
    assert e.unexpected == ("head.weight",)
    assert e.problems == ("embed.weight: the file has shape [1000, 16], the model [1000, 8]",)
    msg = str(e)
    assert "missing from the file (2): extra.weight, extra.bias" in msg
    assert "not in the model (1): head.weight" in msg
    assert "same architecture" in msg
    assert torch.count_nonzero(other["extra"].weight) > 0  # untouched: checked before loading


def test_values_that_a_tie_cannot_hold_are_refused(tmp_path):
    path = adaptnet.save(TinyLM(), tmp_path / "untied.safetensors")  # head != embed
    target = tied_lm()
    before = target.embed.weight.detach().clone()
    with pytest.raises(CheckpointMismatchError,
                       match=r"head.weight: the model ties it to 'embed.weight', but the file "
                             r"holds different values.*adaptnet.untie"):
        adaptnet.load(target, path)
    assert torch.equal(target.embed.weight, before)


def test_manifest_claiming_a_tie_over_different_values_is_refused(tmp_path):
    src = TinyLM()
    path = tmp_path / "forged.safetensors"
    manifest = {"version": 1, "aliases": {"head.weight": ["embed.weight", None]}, "modules": {}}
    tensors = {k: v.contiguous() for k, v in src.state_dict().items()}
    safetensors.torch.save_file(tensors, str(path), metadata={"adaptnet": json.dumps(manifest)})
    with pytest.raises(CheckpointMismatchError,
                       match=r"the manifest ties it to 'embed\.weight', but the file stores "
                             r"different values"):
        adaptnet.load(TinyLM(), path)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda b: b[: len(b) // 2], "not a readable safetensors file"),
        (lambda b: b"not a safetensors file at all", "not a readable safetensors file"),
        (lambda b: b"", "not a readable safetensors file"),
    ],
)
def test_truncated_or_corrupt_files_are_refused(tmp_path, damage, match):
    path = adaptnet.save(tied_lm(), tmp_path / "m.safetensors")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointCorruptError, match=match + ".*truncated or corrupt"):
        adaptnet.load(TinyLM(), path)


@pytest.mark.parametrize(
    ("manifest", "match"),
    [
        ("{not json", "malformed adaptnet tie manifest"),
        (json.dumps({"version": 1}), "malformed adaptnet tie manifest"),
        (json.dumps({"version": 1, "aliases": {"head.weight": ["embed.weight", "spin"]},
                     "modules": {}}), "unknown tie transform 'spin'"),
        (json.dumps({"version": 7, "aliases": {}, "modules": {}}),
         "manifest version 7; this adaptnet reads version 1.*Upgrade adaptnet"),
        (json.dumps({"version": 1, "aliases": {"head.weight": ["ghost", None]},
                     "modules": {}}), r"ties \['head.weight'\] to tensors the file does not"),
    ],
)
def test_bad_manifests_are_refused(tmp_path, manifest, match):
    path = tmp_path / "m.safetensors"
    tensors = {"embed.weight": torch.zeros(1000, 16), "hidden.weight": torch.zeros(16, 16),
               "hidden.bias": torch.zeros(16)}
    safetensors.torch.save_file(tensors, str(path), metadata={"adaptnet": manifest})
    with pytest.raises(CheckpointCorruptError, match=match):
        adaptnet.load(TinyLM(), path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint at .*nope\.safetensors"):
        adaptnet.load(TinyLM(), tmp_path / "nope.safetensors")
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = adaptnet.save(tied_lm(), tmp_path / "m.safetensors")
    good = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        adaptnet.save(TinyLM(), path)
    assert path.read_bytes() == good  # the previous file is intact
    assert os.listdir(tmp_path) == ["m.safetensors"]  # and no temporary file is left


def test_manifest_naming_modules_the_model_lacks_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    manifest = {"version": 1, "aliases": {}, "modules": {"layers.1": "layers.0"}}
    tensors = {k: v.contiguous() for k, v in TinyLM().state_dict().items()}
    safetensors.torch.save_file(tensors, str(path), metadata={"adaptnet": json.dumps(manifest)})
    with pytest.raises(CheckpointMismatchError,
                       match=r"modules 'layers\.1' and 'layers\.0': not both submodules"):
        adaptnet.load(TinyLM(), path)


def test_shared_modules_are_declared_after_load(tmp_path):
    layer = nn.Linear(4, 4)
    path = adaptnet.save(nn.Sequential(layer, nn.ReLU(), layer), tmp_path / "m.safetensors")
    fresh = adaptnet.load(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), path)
    assert fresh[2] is fresh[0]
    assert all(m.declared for g in adaptnet.ties(fresh) for m in g.members)


# ------------------------------------------------ dtypes, module claims, state dicts (issue 14)


def _relabel(path, name: str, old: str, new: str) -> None:
    """Rewrite one tensor's dtype in a safetensors header (same byte width: still valid)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert header[name]["dtype"] == old
    header[name]["dtype"] = new
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    path.write_bytes(raw[:8] + text + raw[8 + n:])


def test_float_bytes_relabelled_as_int32_are_refused(tmp_path):
    path = adaptnet.save(nn.Linear(3, 2), tmp_path / "m.safetensors")
    _relabel(path, "weight", "F32", "I32")
    with pytest.raises(CheckpointMismatchError, match=r"weight: the file has dtype int32, the "
                       r"model float32 \(pass cast=True to convert\)"):
        adaptnet.load(nn.Linear(3, 2), path)


def test_a_dtype_change_is_an_error_unless_asked_for(tmp_path):
    src = nn.Linear(3, 2).double()
    path = adaptnet.save(src, tmp_path / "m.safetensors")
    target = nn.Linear(3, 2)
    before = target.weight.detach().clone()
    with pytest.raises(CheckpointMismatchError, match=r"weight: the file has dtype float64"):
        adaptnet.load(target, path)
    assert torch.equal(target.weight, before)
    adaptnet.load(target, path, cast=True)
    assert target.weight.dtype == torch.float32 and torch.equal(target.weight,
                                                                 src.weight.float())


def test_manifest_claiming_one_module_over_different_values_is_refused(tmp_path):
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    tensors = {"0.weight": a.weight.detach(), "0.bias": a.bias.detach(),
               "2.weight": b.weight.detach(), "2.bias": b.bias.detach()}
    manifest = {"version": 1, "aliases": {}, "modules": {"2": "0"}}
    path = tmp_path / "claim.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"adaptnet": json.dumps(manifest)})
    with pytest.raises(CheckpointMismatchError, match=r"2.weight: the manifest says module '2' "
                       r"is '0', but the file holds different values for '2.weight' and "
                       r"'0.weight'"):
        adaptnet.load(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3)), path)


def test_state_dicts_get_the_same_checks(tmp_path):
    lm = tied_lm()
    state = {k: v.clone() for k, v in TinyLM().state_dict().items()}  # untied: values differ
    with pytest.raises(CheckpointMismatchError, match=r"head.weight: the model ties it to "
                       r"'embed.weight', but the file holds different values"):
        adaptnet.load(lm, state)
    same = {k: v.clone() for k, v in lm.state_dict().items()}
    loaded = adaptnet.load(tied_lm(), same)
    assert loaded.head.weight is loaded.embed.weight
