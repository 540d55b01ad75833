"""Turn the first Ctrl-C into a request to stop at the next step boundary."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["StopRequest", "graceful_interrupt"]


class StopRequest:
    """Set by the first SIGINT; the trainer polls :attr:`requested` between steps."""

    def __init__(self) -> None:
        self.requested = False


@contextmanager
def graceful_interrupt(notice: str) -> Iterator[StopRequest]:
    """While active, the first SIGINT sets ``requested`` (printing ``notice``); a second raises
    :class:`KeyboardInterrupt` at once.  The previous handler is restored on exit.

    Outside the main thread (where handlers cannot be installed) SIGINT keeps
    its normal behaviour.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous: Any = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: FrameType | None) -> None:
        if request.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        request.requested = True
        print(notice, flush=True)

    signal.signal(signal.SIGINT, handler)
    try:
        yield request
    finally:
        signal.signal(signal.SIGINT, previous)
