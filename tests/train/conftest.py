"""Trainer tests run tiny models: one thread is faster for them, and immune to busy machines."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.threads import intra_op_threads


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with intra_op_threads(1):
        yield
