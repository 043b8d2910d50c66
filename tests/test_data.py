"""Built-in datasets and user data: shapes, determinism, offline behaviour, clear errors."""

from __future__ import annotations

import gzip
import random
import struct

import numpy as np
import pytest
import torch

import adaptnet.data as D
from adaptnet.errors import DataError, DatasetNotFoundError, RecipeError


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors, strict=True))


def test_digits_split_is_deterministic_and_disjoint():
    a, b, c = D.digits(seed=0), D.digits(seed=0), D.digits(seed=1)
    assert a.sizes() == {"train": 1294, "valid": 144, "test": 359}
    assert _same(a.train, b.train) and _same(a.test, b.test)
    assert not _same(a.test, c.test)
    rows = lambda s: {tuple(r.tolist()) for r in s.tensors[0]}  # noqa: E731
    assert len(rows(a.train) & rows(a.test)) < 5  # digits has a few duplicate images
    assert a.train.tensors[0].max() <= 1.0 and D.digits(image=True).input_shape == (1, 8, 8)


def test_mnist1d_is_generated_locally_and_leaves_global_rng_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # get_dataset would write a pickle here
    np.random.seed(123)
    random.seed(123)
    before = np.random.get_state()[1].copy(), random.getstate()
    d = D.mnist1d()
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]
    assert d.sizes() == {"train": 4000, "valid": 0, "test": 1000}
    assert d.input_shape == (40,) and d.num_classes == 10 and d.valid is None
    assert list(tmp_path.iterdir()) == []
    assert D.mnist1d(valid=0.1).sizes() == {"train": 3600, "valid": 400, "test": 1000}


def _idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path):
    g = np.random.default_rng(0)
    for split, n in (("train", 200), ("t10k", 50)):
        _idx(tmp_path / f"{split}-images-idx3-ubyte.gz", g.integers(0, 256, (n, 28, 28)))
        _idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_fashion_mnist_reads_idx_files(fake_fashion):
    d = D.fashion_mnist(data_dir=fake_fashion, valid=0.1)
    assert d.sizes() == {"train": 180, "valid": 20, "test": 50}
    assert d.input_shape == (1, 28, 28) and d.classes[0] == "T-shirt/top"
    x = d.test.tensors[0]
    assert x.shape == (50, 1, 28, 28) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_fashion_mnist_class_subset_and_budget(fake_fashion):
    d = D.fashion_mnist(data_dir=fake_fashion, valid=0.0, classes=[5, 6, 7, 8, 9],
                        train_per_class=4)
    y = d.train.tensors[1]
    assert d.num_classes == 5 and d.classes[0] == "Sandal"
    assert torch.bincount(y).tolist() == [4] * 5
    assert set(d.test.tensors[1].tolist()) == set(range(5))
    with pytest.raises(DataError, match="only 20 training"):
        D.fashion_mnist(data_dir=fake_fashion, valid=0.0, classes=[0, 1], train_per_class=50)
    with pytest.raises(DataError, match=r"distinct labels in 0..9"):
        D.fashion_mnist(data_dir=fake_fashion, classes=[3, 3])


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
        D.fashion_mnist(data_dir=tmp_path)
    assert str(tmp_path) in str(e.value) and "data_dir" in str(e.value)


def test_truncated_idx_file_is_named(fake_fashion):
    path = fake_fashion / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "rb") as f:
        raw = f.read()
    with gzip.open(path, "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(DataError, match="truncated"):
        D.fashion_mnist(data_dir=fake_fashion)


def test_shakespeare_splits_by_play_and_shifts_targets():
    d = D.shakespeare(level="char", seq_len=16, max_tokens=2000)
    x, y = d.train.tensors
    assert x.shape[1] == 16 and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1:, 0], y[:-1, -1])
    assert d.task == "language_model" and d.num_classes == len(d.classes)
    text = "".join(d.classes[i] for i in d.test.tensors[0][0].tolist())
    assert text.startswith("Who's there?")  # Hamlet, a test play, opens the test split
    w = D.shakespeare(level="word", seq_len=8, max_vocab=50, max_tokens=500)
    assert w.num_classes == 50 and w.classes[0] == "<unk>"
    assert (w.train.tensors[0] == 0).any()  # rare words map to <unk>
    with pytest.raises(DataError, match="level must be"):
        D.shakespeare(level="byte")


def test_parity_targets_are_the_parity_of_plus_ones():
    d = D.parity(bits=6, train_size=300, test_size=50, valid=0.0)
    x, y = d.train.tensors
    assert set(x.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert ((x != 0).sum(1) >= 1).all()
    assert torch.equal(y, (x == 1).sum(1) % 2)
    assert 0.3 < y.float().mean() < 0.7


def test_regression_is_seeded():
    a, b = D.regression(seed=3), D.regression(seed=3)
    assert _same(a.train, b.train) and a.train.tensors[1].shape[1] == 1 and a.loss == "mse"


def test_csv_with_string_labels(tmp_path):
    p = tmp_path / "iris.csv"
    p.write_text("a,b,species\n" + "".join(f"{i},{i * 2},{'xy'[i % 2]}\n" for i in range(20)))
    d = D.load_dataset(p, target="species", valid=0.0, test=0.25)
    assert d.classes == ("x", "y") and d.sizes()["test"] == 5 and d.input_shape == (2,)
    x, y = d.train.tensors
    assert torch.equal(y, (x[:, 0] % 2).long())


def test_csv_errors_name_line_and_column(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("a,b,label\n1,2,0\n3,oops,1\n")
    with pytest.raises(DataError, match=r"line 3, column 'b': 'oops' is not a number"):
        D.csv(p)
    with pytest.raises(DataError, match="'target' is not in"):
        D.csv(p, target="target")
    p.write_text("a,b,label\n1,2,0\n3,4\n")
    with pytest.raises(DataError, match="line 3 has 2 fields"):
        D.csv(p)


def test_npz_with_test_arrays_and_refused_pickles(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.random.rand(30, 3), y=np.random.rand(30), x_test=np.zeros((5, 3)),
             y_test=np.zeros(5))
    d = D.load_dataset(p, task="regression", valid=0.0)
    assert d.sizes() == {"train": 30, "valid": 0, "test": 5}
    assert d.train.tensors[1].shape == (30, 1)
    with pytest.raises(DataError, match="no array 'features'"):
        D.npz(p, x="features")
    bad = tmp_path / "obj.npz"
    np.savez(bad, x=np.array([{"a": 1}] * 3, dtype=object), y=np.zeros(3))
    with pytest.raises(DataError, match="cannot read"):
        D.npz(bad)


def test_image_folder(tmp_path):
    from PIL import Image

    for label, value in (("cat", 0), ("dog", 255)):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.new("RGB", (10, 12), (value, value, value)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    d = D.load_dataset(tmp_path, size=(8, 8), valid=0.0, test=0.2)
    assert d.classes == ("cat", "dog") and d.input_shape == (1, 8, 8)
    x, y = d.train.tensors
    assert torch.equal(x.flatten(1).mean(1).round(), y.float())
    assert D.image_folder(tmp_path, channels=3).input_shape == (3, 28, 28)


def test_load_errors():
    with pytest.raises(DataError, match=r"unknown dataset 'mnist1'. Did you mean 'mnist1d'"):
        D.load_dataset("mnist1")
    with pytest.raises(DataError, match=r"unknown option\(s\) vaild; it accepts .*valid"):
        D.load_dataset("regression", vaild=0.1)
    with pytest.raises(DataError, match="unknown transform"):
        D.load_dataset("regression", transform="flip")
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        D.load_dataset("/no/such/file.csv")
    with pytest.raises(DataError, match="fraction must lie in"):
        D.digits(valid=1.5)


def test_pairs_and_autoencode():
    d = D.load_dataset("digits", transform="pairs")
    x, y = d.train.tensors
    assert x.shape[1:] == (2, 64) and d.input_shape == (2, 64)
    assert 0.45 < y.float().mean() < 0.55
    base = D.digits()
    labels = {tuple(r.tolist()): int(c) for r, c in zip(*base.train.tensors, strict=True)}
    same = [labels[tuple(a.tolist())] == labels[tuple(b.tolist())] for a, b in x[:50]]
    assert same == [bool(v) for v in y[:50]]
    ae = D.load_dataset("digits", transform="autoencode")
    assert ae.task == "autoencode" and ae.loss == "mse"
    assert torch.equal(ae.train.tensors[0], ae.train.tensors[1])
    with pytest.raises(DataError, match="needs a classification dataset"):
        D.load_dataset("regression", transform="pairs")


def _write_csv(path, targets) -> None:
    g = np.random.default_rng(0)
    rows = [f"{a:.3f},{b:.3f},{t}" for (a, b), t in zip(g.normal(size=(len(targets), 2)),
                                                       targets, strict=True)]
    path.write_text("a,b,y\n" + "\n".join(rows) + "\n")


def test_csv_task_is_inferred_from_the_target(tmp_path):
    """A float target was read as hundreds of classes (issue 14, item 12)."""
    g = np.random.default_rng(1)
    _write_csv(tmp_path / "float.csv", [f"{v:.4f}" for v in g.normal(size=600)])
    data = D.csv(tmp_path / "float.csv")
    assert data.task == "regression" and data.num_classes is None and data.loss == "mse"
    assert data.train.tensors[1].dtype == torch.float32
    _write_csv(tmp_path / "ints.csv", [i % 3 for i in range(60)])
    assert D.csv(tmp_path / "ints.csv").num_classes == 3
    _write_csv(tmp_path / "counts.csv", list(range(600)))
    with pytest.raises(DataError, match=r"600 distinct whole numbers: classes or a quantity\? "
                       r"Say which with task='classification' or task='regression'"):
        D.csv(tmp_path / "counts.csv")
    assert D.csv(tmp_path / "counts.csv", task="regression").task == "regression"
    _write_csv(tmp_path / "nan.csv", ["nan", *range(59)])
    with pytest.raises(DataError, match="non-finite values"):
        D.csv(tmp_path / "nan.csv")


def test_a_zoo_model_on_regression_csv_gets_one_output_and_trains(tmp_path):
    from adaptnet.recipes import load_recipe, train_recipe

    g = np.random.default_rng(2)
    _write_csv(tmp_path / "r.csv", [f"{v:.4f}" for v in g.normal(size=200)])
    recipe = {"data": {"name": str(tmp_path / "r.csv")}, "model": {"name": "mlp"},
              "train": {"epochs": 1}}
    (tmp_path / "r.yaml").write_text(__import__("yaml").safe_dump(recipe))
    name, parsed = load_recipe(tmp_path / "r.yaml")
    result = train_recipe(name, parsed, tmp_path / "run")
    assert result.results.metric[0] == "loss"
    with pytest.raises(RecipeError, match=r"model.hidden: must be a positive "
                       r"int \(a size or count\) up to 2\*\*31, got -3"):
        load_recipe(tmp_path / "r.yaml", ["model.hidden=-3"])
