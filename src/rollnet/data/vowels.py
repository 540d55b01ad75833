"""The UCI Japanese Vowels data set (UEA archive), bundled: 640 utterances of 9 speakers.

Nine Japanese male speakers said the vowels /ae/; a 12-degree linear
prediction analysis of each utterance gives 12 LPC cepstrum coefficients per
frame, for 7 to 29 frames.  The task is to name the speaker (labels 0..8 for
the archive's 1..9).  The official split is 270 training utterances (30 per
speaker) and 370 test utterances (24 to 88 per speaker).

The files ``files/JapaneseVowels_{TRAIN,TEST}.ts.gz`` are the UEA & UCR
archive's ``.ts`` files exactly as shipped in the sktime 1.2.0 wheel,
gzip-compressed (M. Kudo, J. Toyama, M. Shimbo; CC BY 4.0, see
``files/LICENSE-JapaneseVowels-CC-BY-4.0.txt``).  They are read with the small
``.ts`` parser of this module (:func:`parse_ts`); nothing is downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import math
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from torch import Tensor

from rollnet.data.base import DataSplits, Normalization, Split, stratified_split

__all__ = [
    "VOWELS_MAX_LENGTH",
    "TsData",
    "TsFormatError",
    "load_japanese_vowels",
    "pad_sequences",
    "parse_ts",
]

VOWELS_MAX_LENGTH = 29
_CHANNELS = 12
_CLASSES = tuple(str(i) for i in range(1, 10))


@dataclass(frozen=True)
class _Expected:
    cases: int
    min_length: int
    max_length: int
    sha256: str  # of the uncompressed .ts text


# The facts every bundled file is checked against while it is read.
_EXPECTED: dict[str, _Expected] = {
    "train": _Expected(
        270, 7, 26, "68a430eabd919cc77f40b1f5f3bc0dcafacc1486bca9260785aeb7d262cc78cd"
    ),
    "test": _Expected(
        370, 7, 29, "b3d41d6a0ca3bcad3afb9ca7d4365382aa51341e2e58bae2a574babdda5b9462"
    ),
}
_FILE_NAMES = {"train": "JapaneseVowels_TRAIN.ts.gz", "test": "JapaneseVowels_TEST.ts.gz"}


class TsFormatError(ValueError):
    """A ``.ts`` text that this reader cannot or will not read (the message names the file and line)."""


@dataclass(frozen=True)
class TsData:
    """The cases of a ``.ts`` file.

    Attributes:
        series: one float32 array ``[length, channels]`` per case (time first).
        labels: the class label of each case, as written in the file.
        class_labels: the labels declared by ``@classLabel`` (empty if none).
        header: the ``@`` header fields, lower-case keys, raw string values.
    """

    series: list[np.ndarray]
    labels: list[str]
    class_labels: tuple[str, ...]
    header: dict[str, str]

    @property
    def lengths(self) -> list[int]:
        """The number of time steps of each case."""
        return [int(s.shape[0]) for s in self.series]


def _flag(header: dict[str, str], key: str, name: str) -> bool | None:
    if key not in header:
        return None
    value = header[key].split()[0].lower() if header[key].split() else ""
    if value not in ("true", "false"):
        raise TsFormatError(f"{name}: @{key} must be true or false, got {header[key]!r}")
    return value == "true"


def parse_ts(text: str, *, name: str = "<string>") -> TsData:
    """Parse a classification problem in the sktime / UEA ``.ts`` text format.

    ``#`` lines are comments; ``@key value`` lines form the header, up to
    ``@data``; then each line is one case: the channels separated by ``:``,
    each a comma-separated series of numbers, and the class label last.  Cases
    may have different lengths, but the channels of a case must have the same
    length.  Time stamps (``@timeStamps true``) and missing values (``?``) are
    refused.

    Args:
        text: the file's contents.
        name: the file's name, for error messages.

    Returns:
        :class:`TsData`.

    Raises:
        TsFormatError: anything this reader does not accept; the message names
            ``name`` and the line.

    >>> ts = "@problemName toy\\n@dimensions 2\\n@classLabel true a b\\n@data\\n1,2,3:4,5,6:b\\n7:8:a\\n"
    >>> data = parse_ts(ts)
    >>> data.lengths, data.labels, data.series[0][:, 1].tolist()
    ([3, 1], ['b', 'a'], [4.0, 5.0, 6.0])
    """
    header: dict[str, str] = {}
    series: list[np.ndarray] = []
    labels: list[str] = []
    in_data = False
    class_labels: tuple[str, ...] = ()
    dims: int | None = None
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        where = f"{name}, line {number}"
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if not line.startswith("@"):
                raise TsFormatError(f"{where}: expected an @ header line before @data, got {line[:40]!r}")
            key, _, value = line[1:].partition(" ")
            key = key.lower()
            if key == "data":
                in_data = True
                if _flag(header, "timestamps", name):
                    raise TsFormatError(f"{name}: @timeStamps true is not supported")
                label_spec = header.get("classlabel", "").split()
                if not label_spec or label_spec[0].lower() != "true":
                    raise TsFormatError(f"{name}: not a classification problem (@classLabel true ...)")
                class_labels = tuple(label_spec[1:])
                if "dimensions" in header:
                    try:
                        dims = int(header["dimensions"])
                    except ValueError:
                        raise TsFormatError(
                            f"{name}: @dimensions must be an integer, got {header['dimensions']!r}"
                        ) from None
                continue
            header[key] = value.strip()
            continue
        if "?" in line:
            raise TsFormatError(f"{where}: missing values ('?') are not supported")
        parts = line.split(":")
        if len(parts) < 2:
            raise TsFormatError(f"{where}: a case needs at least one channel and a class label")
        label = parts[-1].strip()
        if class_labels and label not in class_labels:
            raise TsFormatError(f"{where}: class label {label!r} is not one of {list(class_labels)}")
        channels = parts[:-1]
        if dims is not None and len(channels) != dims:
            raise TsFormatError(f"{where}: {len(channels)} channels, but @dimensions is {dims}")
        try:
            values = [[float(v) for v in channel.split(",")] for channel in channels]
        except ValueError as err:
            raise TsFormatError(f"{where}: not a number ({err})") from None
        steps = {len(v) for v in values}
        if len(steps) != 1:
            raise TsFormatError(f"{where}: the channels of a case differ in length ({sorted(steps)})")
        array = np.asarray(values, dtype=np.float64).T
        if not np.isfinite(array).all():
            raise TsFormatError(f"{where}: non-finite values are not supported")
        if len(series) and array.shape[1] != series[0].shape[1]:
            raise TsFormatError(
                f"{where}: {array.shape[1]} channels, but the first case has {series[0].shape[1]}"
            )
        series.append(array.astype(np.float32))
        labels.append(label)
    if not in_data:
        raise TsFormatError(f"{name}: no @data line")
    if _flag(header, "equallength", name) and len(set(s.shape[0] for s in series)) > 1:
        raise TsFormatError(f"{name}: @equalLength true, but the cases differ in length")
    return TsData(series=series, labels=labels, class_labels=class_labels, header=header)


def pad_sequences(series: list[np.ndarray], length: int) -> tuple[Tensor, Tensor]:
    """Zero-pad ``[T_i, C]`` arrays at the end to ``[N, length, C]``.

    Returns:
        ``(x [N, length, C] float32, lengths [N] int64)``.

    Raises:
        ValueError: a series longer than ``length``, or differing channel counts.

    >>> x, n = pad_sequences([np.ones((2, 3)), np.ones((1, 3))], 4)
    >>> x.shape, n.tolist(), x[1].sum().item()
    (torch.Size([2, 4, 3]), [2, 1], 3.0)
    """
    channels = {int(s.shape[1]) for s in series}
    if len(channels) > 1:
        raise ValueError(f"the series have different channel counts {sorted(channels)}")
    c = channels.pop() if channels else 0
    x = torch.zeros(len(series), length, c, dtype=torch.float32)
    lengths = torch.tensor([int(s.shape[0]) for s in series], dtype=torch.int64)
    for i, s in enumerate(series):
        if s.shape[0] > length:
            raise ValueError(f"series {i} has {s.shape[0]} steps, more than {length}")
        x[i, : s.shape[0]] = torch.from_numpy(np.asarray(s, dtype=np.float32))
    return x, lengths


def _read_bytes(file_name: str) -> bytes:
    return resources.files("rollnet.data").joinpath("files", file_name).read_bytes()


def _read_split(part: str) -> tuple[Tensor, Tensor, Tensor]:
    """The bundled ``part`` (``"train"`` or ``"test"``) as ``(x, y, lengths)``, checked."""
    file_name, expected = _FILE_NAMES[part], _EXPECTED[part]
    damaged = f"rollnet's bundled {file_name} is damaged"
    try:
        text = gzip.decompress(_read_bytes(file_name)).decode("ascii")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise OSError(f"{damaged} ({err}); reinstall rollnet") from err
    try:
        data = parse_ts(text, name=file_name)
    except TsFormatError as err:
        raise OSError(f"{damaged}: {err}; reinstall rollnet") from err
    lengths = data.lengths
    problems = []
    if len(data.series) != expected.cases:
        problems.append(f"{len(data.series)} cases, expected {expected.cases}")
    if data.series and data.series[0].shape[1] != _CHANNELS:
        problems.append(f"{data.series[0].shape[1]} channels, expected {_CHANNELS}")
    if lengths and (min(lengths), max(lengths)) != (expected.min_length, expected.max_length):
        problems.append(
            f"lengths {min(lengths)} .. {max(lengths)}, expected "
            f"{expected.min_length} .. {expected.max_length}"
        )
    if sorted(set(data.labels)) != sorted(_CLASSES):
        problems.append(f"labels {sorted(set(data.labels))}, expected {list(_CLASSES)}")
    if not problems and hashlib.sha256(text.encode("ascii")).hexdigest() != expected.sha256:
        problems.append("its sha256 differs from the archive's file")
    if problems:
        raise OSError(f"{damaged}: {'; '.join(problems)}; reinstall rollnet")
    x, n = pad_sequences(data.series, VOWELS_MAX_LENGTH)
    y = torch.tensor([_CLASSES.index(label) for label in data.labels], dtype=torch.int64)
    return x, y, n


def _valid_mask(split: Split) -> Tensor:
    assert split.lengths is not None
    steps = torch.arange(split.x.shape[1])
    return steps.unsqueeze(0) < split.lengths.unsqueeze(1)  # [N, T]


def load_japanese_vowels(
    *, n_val: int = 54, seed: int = 0, normalize: bool = False
) -> DataSplits:
    """Japanese Vowels: 216 train / 54 validation / the official 370 test utterances.

    The validation part is a stratified seeded draw (6 utterances per speaker
    by default) from the official 270 training utterances; the test set is
    the official one and is never used for selection.  Each utterance is
    zero-padded at the end to 29 frames; ``lengths`` holds its true length
    (7 to 29), and a DataLoader over a split yields ``(x, y, lengths)``.

    Args:
        n_val: validation size, drawn from the official training set.
        seed: seed of the validation draw.
        normalize: ``False`` (default, as in Kudo et al. and the UEA archive):
            the raw LPC coefficients.  ``True``: ``(x - mean) / std`` with the
            scalar mean and std of the valid frames of the training part (not
            validation, not test); padding stays exactly zero.

    Returns:
        :class:`DataSplits` with ``x`` ``[M, 29, 12]`` float32, ``y`` ``[M]``
        int64 in 0..8 (speakers 1..9), ``lengths`` ``[M]`` int64.
        Without ``normalize``, ``normalization`` is ``None`` (raw units, as
        for the 2-D toys).

    Raises:
        OSError: a bundled file is damaged (the message names it).

    >>> data = load_japanese_vowels()
    >>> len(data.train), len(data.val), len(data.test), data.input_shape
    (216, 54, 370, (29, 12))
    >>> x, y, n = data.train[0]
    >>> bool((x[n:] == 0).all())
    True
    """
    x_all, y_all, n_all = _read_split("train")
    x_test, y_test, n_test = _read_split("test")
    official = Split(x_all, y_all, lengths=n_all)
    test = Split(x_test, y_test, lengths=n_test)
    val_idx, train_idx = stratified_split(y_all, [n_val, None], seed=seed)
    train, val = official.select(train_idx), official.select(val_idx)
    normalization: Normalization | None = None
    if normalize:
        frames = train.x[_valid_mask(train)].double()
        std = float(frames.std())
        std = std if math.isfinite(std) and std > 0 else 1.0
        normalization = Normalization(mean=float(frames.mean()), std=std)
        train, val, test = (
            Split(
                torch.where(_valid_mask(s).unsqueeze(-1), normalization.apply(s.x), 0.0),
                s.y,
                lengths=s.lengths,
            )
            for s in (train, val, test)
        )
    return DataSplits(
        name="japanese_vowels",
        train=train,
        val=val,
        test=test,
        input_shape=(VOWELS_MAX_LENGTH, _CHANNELS),
        num_classes=len(_CLASSES),
        normalization=normalization,
        normalized=normalize,
        classes=tuple(f"speaker {c}" for c in _CLASSES),
        source=(
            "UCI Japanese Vowels (Kudo, Toyama, Shimbo; UEA archive .ts files bundled with "
            f"rollnet, CC BY 4.0); stratified seeded validation draw (seed {seed}) from the "
            f"official training set: {len(train)} train / {len(val)} validation / "
            f"{len(test)} official test"
        ),
    )
