"""The README's tour runs as written."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_tour_runs() -> None:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no Python example"
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["r2"].shape == (64,)  # type: ignore[attr-defined]


def test_readme_sequence_example_runs() -> None:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    sequence = [b for b in blocks if "japanese_vowels" in b]
    assert sequence, "the README has no sequence example"
    namespace: dict[str, object] = {}
    exec(compile("import torch, rollnet\n" + sequence[0], "README.md", "exec"), namespace)
    assert namespace["r2"].shape == (8,)  # type: ignore[attr-defined]
    assert namespace["lower"].shape == (8, 29, 12)  # type: ignore[attr-defined]
