"""Shared checks of the figure tests."""

from __future__ import annotations

import struct
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` in pixels from a PNG's header; fails on anything that is not a PNG."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


def distinct_colours(path: Path) -> int:
    """Number of distinct RGB colours in a PNG (a blank picture has one or two)."""
    import matplotlib.image
    import numpy as np

    img = (matplotlib.image.imread(str(path))[..., :3].reshape(-1, 3) * 255).round().astype(np.int64)
    return int(np.unique(img[:, 0] * 65536 + img[:, 1] * 256 + img[:, 2]).size)
