"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, UCI, CC BY 4.0)."""

from __future__ import annotations

import numpy as np
import torch

from rollnet.data.base import DataSplits, Normalization, Split, stratified_split

__all__ = ["DIGITS_NORMALIZATION", "load_digits"]

# Mean and std of the default training split (1,197 images) in [0, 1] pixel units
# (the raw values 0..16 divided by 16).
DIGITS_NORMALIZATION = Normalization(mean=0.3060, std=0.3763)


def load_digits(
    *, normalize: bool = True, n_val: int = 300, n_test: int = 300, seed: int = 0
) -> DataSplits:
    """The 8x8 digits of scikit-learn, split 1,197 / 300 / 300 (train / validation / test).

    Pixel units are the raw counts 0..16 divided by 16, so in [0, 1].  The
    splits are stratified and seeded.  Needs scikit-learn (``pip install
    rollnet[data]``); its copy of the data ships inside the wheel.

    Args:
        normalize: ``True``: inputs ``(x - 0.3060) / 0.3763``; ``False``: [0, 1] pixel units.
        n_val, n_test: validation and test sizes (the rest is training).
        seed: seed of the split.

    Returns:
        :class:`DataSplits` with ``x`` ``[M, 1, 8, 8]`` float32, ``y`` ``[M]`` int64.

    >>> data = load_digits()
    >>> len(data.train), data.input_shape
    (1197, (1, 8, 8))
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("load_digits needs scikit-learn: pip install 'rollnet[data]'") from err
    bunch = sklearn_digits()
    x = torch.from_numpy((np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8))
    if normalize:
        x = DIGITS_NORMALIZATION.apply(x)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    val_idx, test_idx, train_idx = stratified_split(y, [n_val, n_test, None], seed=seed)
    return DataSplits(
        name="digits",
        train=Split(x[train_idx], y[train_idx]),
        val=Split(x[val_idx], y[val_idx]),
        test=Split(x[test_idx], y[test_idx]),
        input_shape=(1, 8, 8),
        num_classes=10,
        normalization=DIGITS_NORMALIZATION,
        normalized=normalize,
        classes=tuple(str(i) for i in range(10)),
        source=(
            "scikit-learn's 8x8 digits (UCI optical recognition of handwritten digits); stratified "
            f"seeded split (seed {seed}): {len(train_idx)} train / {len(val_idx)} validation / "
            f"{len(test_idx)} test"
        ),
    )
