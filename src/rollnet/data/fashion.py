"""Fashion-MNIST (Zalando, MIT licence): 70,000 28x28 grayscale images of 10 kinds of clothing.

Read from the four ``*-idx?-ubyte.gz`` files of the original release, as
installed by Debian's ``dataset-fashion-mnist`` package under
``/usr/share/datasets/fashion-mnist``.  Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from rollnet.data.base import DataSplits, Normalization, Split, stratified_split

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_NORMALIZATION",
    "DataSetMissingError",
    "find_fashion_mnist",
    "load_fashion_mnist",
]

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "ROLLNET_FASHION_MNIST"
# Mean and std of the 60,000 official training images in [0, 1] pixel units.
FASHION_MNIST_NORMALIZATION = Normalization(mean=0.2860, std=0.3530)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
INSTALL_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; `make data` does "
    "this), or download the four *-ubyte.gz files from "
    "https://github.com/zalandoresearch/fashion-mnist into a directory and set "
    f"{ENV_VAR}=/that/directory (or pass path=...)"
)


class DataSetMissingError(FileNotFoundError):
    """A data set's files are not on this machine; the message says how to get them."""


def find_fashion_mnist(path: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding Fashion-MNIST: ``path``, else ``$ROLLNET_FASHION_MNIST``, else Debian's.

    Raises:
        DataSetMissingError: when the chosen directory lacks one of the four files.

    >>> find_fashion_mnist()  # doctest: +SKIP
    PosixPath('/usr/share/datasets/fashion-mnist')
    """
    if path is not None:
        where, why = Path(path), "the path given"
    elif os.environ.get(ENV_VAR):
        where, why = Path(os.environ[ENV_VAR]), f"${ENV_VAR}"
    else:
        where, why = DEFAULT_FASHION_MNIST_DIR, "the default location"
    missing = [name for name in _FILES.values() if not (where / name).is_file()]
    if missing:
        raise DataSetMissingError(
            f"Fashion-MNIST not found in {where} ({why}): missing {', '.join(missing)}; {INSTALL_HINT}"
        )
    return where


def _read_idx(path: Path, expect_dims: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expect_dims:
        raise OSError(f"{path} is not an idx file of unsigned bytes with {expect_dims} dimensions")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(expect_dims)]
    offset = 4 + 4 * expect_dims
    if len(raw) - offset != int(np.prod(dims)):
        raise OSError(f"{path} is truncated or damaged: header says {dims}, got {len(raw) - offset} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(
    path: str | os.PathLike[str] | None = None, *, normalize: bool = True, n_val: int = 5000,
    train_size: int | None = None, seed: int = 0,
) -> DataSplits:
    """Fashion-MNIST: 55,000 train / 5,000 validation / the official 10,000 test images.

    The validation split is a stratified seeded draw from the official
    60,000 training images; the test split is the official test set.

    Args:
        path: directory of the four ``.gz`` files (default:
            ``$ROLLNET_FASHION_MNIST``, then ``/usr/share/datasets/fashion-mnist``).
        normalize: ``True``: inputs are ``(x - 0.2860) / 0.3530`` with x in [0, 1]
            pixel units; ``False``: inputs in [0, 1] pixel units.
        n_val: validation size, drawn from the official training set.
        train_size: keep only a stratified subset of this many training images
            (for quick runs on a CPU); validation and test are unchanged.
        seed: seed of the split.

    Returns:
        :class:`DataSplits` with ``x`` ``[M, 1, 28, 28]`` float32, ``y`` ``[M]`` int64.

    Raises:
        DataSetMissingError: the files are not there (the message says how to install them).

    >>> data = load_fashion_mnist()  # doctest: +SKIP
    >>> len(data.train), len(data.val), len(data.test)  # doctest: +SKIP
    (55000, 5000, 10000)
    """
    where = find_fashion_mnist(path)
    parts = {}
    for key, name in _FILES.items():
        parts[key] = _read_idx(where / name, 3 if key.endswith("images") else 1)
    if parts["train_images"].shape[0] != parts["train_labels"].shape[0] or \
            parts["test_images"].shape[0] != parts["test_labels"].shape[0]:
        raise OSError(f"Fashion-MNIST files in {where} disagree on the number of images and labels")

    def tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
        if normalize:
            x = FASHION_MNIST_NORMALIZATION.apply(x)
        return x, torch.from_numpy(labels.astype(np.int64))

    x_all, y_all = tensors(parts["train_images"], parts["train_labels"])
    x_test, y_test = tensors(parts["test_images"], parts["test_labels"])
    val_idx, train_idx = stratified_split(y_all, [n_val, None], seed=seed)
    if train_size is not None:
        (keep,) = stratified_split(y_all[train_idx], [train_size], seed=seed + 1)
        train_idx = train_idx[keep]
    return DataSplits(
        name="fashion_mnist",
        train=Split(x_all[train_idx], y_all[train_idx]),
        val=Split(x_all[val_idx], y_all[val_idx]),
        test=Split(x_test, y_test),
        input_shape=(1, 28, 28),
        num_classes=10,
        normalization=FASHION_MNIST_NORMALIZATION,
        normalized=normalize,
        classes=FASHION_MNIST_CLASSES,
        source=(
            f"Fashion-MNIST from {where}; validation drawn stratified from the official training set "
            f"(seed {seed}): {len(train_idx)} train / {len(val_idx)} validation / "
            f"{len(y_test)} official test"
        ),
    )
