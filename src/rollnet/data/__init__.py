"""Offline data sets with fixed, seeded train / validation / test splits.

===================  ===========  ==========================  =======================  ==============
name                 input        default split               normalisation (pixel)    source
===================  ===========  ==========================  =======================  ==============
``mnist_subset``     1 x 28 x 28  4,000 / 500 / 500           mean 0.1307, std 0.3081  bundled file
``fashion_mnist``    1 x 28 x 28  55,000 / 5,000 / 10,000     mean 0.2860, std 0.3530  Debian package
``digits``           1 x 8 x 8    1,197 / 300 / 300           mean 0.3060, std 0.3763  scikit-learn
``moons`` ...        2            70% / 15% / 15%             none (raw coordinates)   generated
``japanese_vowels``  29 x 12 (*)  216 / 54 / 370 (official)   none (raw LPC values)    bundled file
===================  ===========  ==========================  =======================  ==============

(*) sequences: 29 frames of 12 LPC coefficients, zero-padded after each
utterance's true length (7 to 29, in the splits' ``lengths``); a DataLoader
over such a split yields ``(x, y, lengths)``.  Its test split is the official
one; validation is drawn from the official training set.

By default the image inputs are normalised, ``x = (pixel - mean) / std`` with
pixels in [0, 1]; radii certified on such inputs are in normalised units, and
``radius * std`` in pixel units (:meth:`DataSplits.to_pixel`).

>>> from rollnet.data import load_dataset
>>> data = load_dataset("moons", n=100)
>>> data.train.x.shape
torch.Size([70, 2])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rollnet.data.base import DataSplits, Normalization, Split, stratified_split
from rollnet.data.digits import DIGITS_NORMALIZATION, load_digits
from rollnet.data.fashion import (
    FASHION_MNIST_NORMALIZATION,
    DataSetMissingError,
    find_fashion_mnist,
    load_fashion_mnist,
)
from rollnet.data.mnist import MNIST_NORMALIZATION, load_mnist_subset
from rollnet.data.toy import TOYS, load_toy, make_moons, make_rings, make_spirals
from rollnet.data.vowels import TsFormatError, load_japanese_vowels, parse_ts

__all__ = [
    "DATASETS",
    "DIGITS_NORMALIZATION",
    "FASHION_MNIST_NORMALIZATION",
    "MNIST_NORMALIZATION",
    "DataSetMissingError",
    "DataSplits",
    "Normalization",
    "Split",
    "TsFormatError",
    "find_fashion_mnist",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_japanese_vowels",
    "load_mnist_subset",
    "load_toy",
    "make_moons",
    "make_rings",
    "make_spirals",
    "parse_ts",
    "stratified_split",
]


def _toy(name: str) -> Callable[..., DataSplits]:
    def load(**options: Any) -> DataSplits:
        return load_toy(name, **options)

    load.__name__ = f"load_{name}"
    return load


DATASETS: dict[str, Callable[..., DataSplits]] = {
    "mnist_subset": load_mnist_subset,
    "fashion_mnist": load_fashion_mnist,
    "digits": load_digits,
    "japanese_vowels": load_japanese_vowels,
    **{name: _toy(name) for name in TOYS},
}


def load_dataset(name: str, **options: Any) -> DataSplits:
    """Load a data set by name (see the table above); ``options`` go to its loader.

    Raises:
        ValueError: unknown name (the message lists the known ones).

    >>> load_dataset("digits").test.x.shape
    torch.Size([300, 1, 8, 8])
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](**options)
