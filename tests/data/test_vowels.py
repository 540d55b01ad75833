"""Japanese Vowels: bundled files, seeded stratified validation, padding, lengths; the .ts parser;
Split with lengths."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import rollnet.data.vowels as vowels_module
from rollnet.data import (
    Split,
    TsFormatError,
    load_dataset,
    load_japanese_vowels,
    parse_ts,
    stratified_split,
)
from rollnet.data.vowels import pad_sequences


@pytest.fixture(scope="module")
def vowels():
    return load_japanese_vowels()


def _rows(split: Split) -> set[bytes]:
    return {hashlib.sha1(r.numpy().tobytes()).digest() for r in split.x.flatten(1)}


def _valid(split: Split) -> torch.Tensor:
    assert split.lengths is not None
    return torch.arange(split.x.shape[1]).unsqueeze(0) < split.lengths.unsqueeze(1)


# -- the data set ----------------------------------------------------------------


def test_counts_shapes_and_dtypes(vowels):
    assert (len(vowels.train), len(vowels.val), len(vowels.test)) == (216, 54, 370)
    assert len(vowels.train) + len(vowels.val) == 270
    assert vowels.input_shape == (29, 12) and vowels.num_classes == 9
    for s in (vowels.train, vowels.val, vowels.test):
        assert s.x.shape == (len(s), 29, 12) and s.x.dtype == torch.float32
        assert s.y.dtype == torch.int64 and s.lengths is not None
        assert s.lengths.shape == (len(s),) and s.lengths.dtype == torch.int64
    assert load_dataset("japanese_vowels").test.x.shape == (370, 29, 12)


def test_lengths_and_padding(vowels):
    lengths = torch.cat([vowels.train.lengths, vowels.val.lengths, vowels.test.lengths])
    assert int(lengths.min()) == 7 and int(lengths.max()) == 29
    # the official training set is 7..26 frames long, the test set 7..29
    assert int(torch.cat([vowels.train.lengths, vowels.val.lengths]).max()) == 26
    assert int(vowels.test.lengths.max()) == 29
    for s in (vowels.train, vowels.val, vowels.test):
        valid = _valid(s)
        assert torch.equal(s.x[~valid], torch.zeros_like(s.x[~valid]))  # padding exactly zero
        assert bool((s.x[valid] != 0).any(dim=-1).all())  # every valid frame carries data
        assert bool(torch.isfinite(s.x).all())


def test_first_case_matches_the_file(vowels):
    raw = (Path(vowels_module.__file__).parent / "files" / "JapaneseVowels_TEST.ts.gz").read_bytes()
    first = gzip.decompress(raw).decode("ascii").split("@data")[1].strip().splitlines()[0]
    *channels, label = first.split(":")
    values = torch.tensor([[float(v) for v in c.split(",")] for c in channels]).T
    assert vowels.test.y[0].item() == int(label) - 1 and vowels.test.lengths[0].item() == len(values)
    assert torch.allclose(vowels.test.x[0, : len(values)], values)


def test_labels_and_stratification(vowels):
    for s in (vowels.train, vowels.val, vowels.test):
        assert set(s.y.tolist()) == set(range(9))
    assert torch.equal(vowels.val.y.bincount(minlength=9), torch.full((9,), 6))
    assert torch.equal(vowels.train.y.bincount(minlength=9), torch.full((9,), 24))
    test_counts = vowels.test.y.bincount(minlength=9).tolist()
    assert test_counts == [31, 35, 88, 44, 29, 24, 40, 50, 29]
    assert vowels.classes[0] == "speaker 1" and len(vowels.classes) == 9


def test_train_and_validation_are_disjoint_and_the_test_set_is_official(vowels):
    assert not (_rows(vowels.train) & _rows(vowels.val))
    assert not ((_rows(vowels.train) | _rows(vowels.val)) & _rows(vowels.test))
    other = load_japanese_vowels(seed=1)
    assert torch.equal(other.test.x, vowels.test.x) and torch.equal(other.test.y, vowels.test.y)
    # a different seed draws another validation part from the same 270 utterances
    assert _rows(other.val) != _rows(vowels.val)
    assert _rows(other.train) | _rows(other.val) == _rows(vowels.train) | _rows(vowels.val)


def test_seed_determinism(vowels):
    again = load_japanese_vowels()
    for a, b in ((again.train, vowels.train), (again.val, vowels.val), (again.test, vowels.test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.lengths, b.lengths)


def test_validation_size_option():
    data = load_japanese_vowels(n_val=27, seed=3)
    assert (len(data.train), len(data.val)) == (243, 27)
    assert torch.equal(data.val.y.bincount(minlength=9), torch.full((9,), 3))


def test_not_normalised_by_default_and_opt_in_normalisation(vowels):
    assert vowels.normalization is None and not vowels.normalized and vowels.input_units == "raw"
    normed = load_japanese_vowels(normalize=True)
    assert normed.normalization is not None and normed.input_units == "normalized"
    frames = normed.train.x[_valid(normed.train)].double()
    assert abs(float(frames.mean())) < 1e-5 and abs(float(frames.std()) - 1.0) < 1e-4
    for s, raw in ((normed.val, vowels.val), (normed.test, vowels.test)):
        valid = _valid(s)
        assert bool((s.x[~valid] == 0).all())
        assert torch.allclose(normed.normalization.invert(s.x[valid]), raw.x[valid], atol=1e-5)


def test_damaged_file_is_refused_naming_it(monkeypatch):
    good = vowels_module._read_bytes

    def truncated(name: str) -> bytes:
        text = gzip.decompress(good(name)).decode("ascii")
        return gzip.compress(text[: len(text) * 2 // 3].rsplit("\n", 1)[0].encode("ascii"))

    monkeypatch.setattr(vowels_module, "_read_bytes", truncated)
    with pytest.raises(OSError, match=r"JapaneseVowels_TRAIN\.ts\.gz is damaged: \d+ cases, expected 270"):
        load_japanese_vowels()

    def not_gzip(name: str) -> bytes:
        return b"not a gzip file"

    monkeypatch.setattr(vowels_module, "_read_bytes", not_gzip)
    with pytest.raises(OSError, match=r"JapaneseVowels_TRAIN\.ts\.gz is damaged"):
        load_japanese_vowels()

    def one_value_changed(name: str) -> bytes:
        text = gzip.decompress(good(name)).decode("ascii")
        return gzip.compress(text.replace("1.860936", "1.860937", 1).encode("ascii"))

    monkeypatch.setattr(vowels_module, "_read_bytes", one_value_changed)
    with pytest.raises(OSError, match=r"JapaneseVowels_TRAIN\.ts\.gz is damaged: its sha256"):
        load_japanese_vowels()


def test_files_and_licence_are_shipped():
    files = Path(vowels_module.__file__).parent / "files"
    for name in ("JapaneseVowels_TRAIN.ts.gz", "JapaneseVowels_TEST.ts.gz"):
        assert (files / name).stat().st_size < 300_000
    licence = (files / "LICENSE-JapaneseVowels-CC-BY-4.0.txt").read_text()
    assert "CC BY 4.0" in licence and "Kudo" in licence and "Shimbo" in licence


# -- the .ts parser ---------------------------------------------------------------

_TINY = """# a comment
@problemName Tiny
@timeStamps false
@missing false
@univariate false
@dimensions 2
@equalLength false
@classLabel true x y

@data
1.5,2,3:-1,0,1e-3:y
4:5:x
"""


def test_parser_on_a_tiny_file():
    data = parse_ts(_TINY, name="tiny.ts")
    assert data.labels == ["y", "x"] and data.class_labels == ("x", "y")
    assert data.lengths == [3, 1] and data.header["problemname"] == "Tiny"
    np.testing.assert_array_equal(data.series[0], np.array([[1.5, -1], [2, 0], [3, 1e-3]], np.float32))
    assert data.series[0].dtype == np.float32 and data.series[1].shape == (1, 2)
    x, lengths = pad_sequences(data.series, 4)
    assert x.shape == (2, 4, 2) and lengths.tolist() == [3, 1]
    assert torch.equal(x[1], torch.tensor([[4.0, 5.0], [0, 0], [0, 0], [0, 0]]))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("1,?,3:4,5,6:x\n", r"tiny\.ts, line 11: missing values"),
        ("1,2,3:4,5:x\n", r"line 11: the channels of a case differ in length"),
        ("1,2,3:x\n", r"line 11: 1 channels, but @dimensions is 2"),
        ("1,2:3,4:z\n", r"line 11: class label 'z'"),
        ("1,a:3,4:x\n", r"line 11: not a number"),
        ("1,nan:3,4:x\n", r"line 11: non-finite"),
    ],
)
def test_parser_refuses_bad_cases(body, message):
    text = _TINY.split("@data")[0] + "@data\n" + body
    with pytest.raises(TsFormatError, match=message):
        parse_ts(text, name="tiny.ts")


def test_parser_refuses_bad_headers():
    with pytest.raises(TsFormatError, match="no @data"):
        parse_ts("@problemName x\n", name="f.ts")
    with pytest.raises(TsFormatError, match="timeStamps"):
        parse_ts("@timeStamps true\n@classLabel true a\n@data\n1:a\n", name="f.ts")
    with pytest.raises(TsFormatError, match="not a classification problem"):
        parse_ts("@classLabel false\n@data\n1\n", name="f.ts")
    with pytest.raises(TsFormatError, match="equalLength"):
        parse_ts("@equalLength true\n@classLabel true a\n@data\n1,2:a\n1:a\n", name="f.ts")
    with pytest.raises(TsFormatError, match=r"f\.ts, line 1: expected an @ header"):
        parse_ts("1,2:a\n", name="f.ts")


# -- Split with lengths -------------------------------------------------------------


def _seq_split() -> Split:
    x = torch.zeros(5, 4, 3)
    lengths = torch.tensor([4, 1, 2, 3, 4])
    for i, n in enumerate(lengths.tolist()):
        x[i, :n] = i + 1
    return Split(x, torch.tensor([0, 1, 0, 1, 1]), lengths=lengths)


def test_split_with_lengths_getitem_and_dataloader():
    s = _seq_split()
    x, y, n = s[2]
    assert x.shape == (4, 3) and y.item() == 0 and n.item() == 2
    batch = next(iter(DataLoader(s, batch_size=3, shuffle=False)))
    assert len(batch) == 3
    bx, by, bn = batch
    assert bx.shape == (3, 4, 3) and by.tolist() == [0, 1, 0] and bn.tolist() == [4, 1, 2]
    assert "lengths" in repr(s)


def test_split_without_lengths_is_unchanged():
    s = Split(torch.zeros(3, 2), torch.tensor([0, 1, 0]))
    assert s.lengths is None and len(s[0]) == 2
    assert len(next(iter(DataLoader(s, batch_size=3)))) == 2
    assert len(s.head(2)[0]) == 2 and s.head(2).lengths is None


def test_split_head_and_select_carry_lengths():
    s = _seq_split()
    assert s.head(2).lengths.tolist() == [4, 1]
    val_idx, rest_idx = stratified_split(s.y, [2, None], seed=0)
    val, rest = s.select(val_idx), s.select(rest_idx)
    assert sorted(val.lengths.tolist() + rest.lengths.tolist()) == sorted(s.lengths.tolist())
    for part, idx in ((val, val_idx), (rest, rest_idx)):
        assert torch.equal(part.lengths, s.lengths[idx]) and torch.equal(part.x, s.x[idx])
        assert torch.equal(part.x[:, :, 0].count_nonzero(dim=1), part.lengths)


@pytest.mark.parametrize(
    ("lengths", "message"),
    [
        (torch.tensor([1, 2, 3], dtype=torch.int32), "int64"),
        (torch.tensor([[1, 2, 3]]), "1-D int64"),
        (torch.tensor([1, 2]), "lengths has 2"),
        (torch.tensor([0, 2, 3]), r"1 \.\. 4"),
        (torch.tensor([1, 5, 3]), r"1 \.\. 4"),
    ],
)
def test_split_refuses_bad_lengths(lengths, message):
    with pytest.raises(ValueError, match=message):
        Split(torch.zeros(3, 4, 2), torch.tensor([0, 1, 0]), lengths=lengths)


def test_split_lengths_need_a_time_dimension():
    with pytest.raises(ValueError, match="time on dimension 1"):
        Split(torch.zeros(3), torch.tensor([0, 1, 0]), lengths=torch.tensor([1, 1, 1]))
