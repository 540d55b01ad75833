"""Turn the first Ctrl-C (SIGINT) or SIGTERM into a request to stop at the next step boundary.

Clusters preempt jobs with SIGTERM (and torchrun forwards it to every worker),
so SIGTERM is handled exactly like the first Ctrl-C: the trainer finishes the
current step, saves a checkpoint at it and returns.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["STOP_SIGNALS", "StopRequest", "graceful_interrupt"]

#: the signals that ask a run to stop (first one: stop at the next step boundary; second: abort)
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set by the first stop signal; the trainer polls :attr:`requested` between steps.

    Attributes:
        signum: the number of the first signal received (``signal.SIGINT`` or
            ``signal.SIGTERM``), or ``None`` while none arrived.

    >>> r = StopRequest(); r.requested
    False
    >>> r.signum = 15; r.requested, r.name
    (True, 'SIGTERM')
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.signum is not None

    @property
    def name(self) -> str | None:
        """``"SIGINT"`` or ``"SIGTERM"`` (``None`` while no signal arrived)."""
        return None if self.signum is None else signal.Signals(self.signum).name


@contextmanager
def graceful_interrupt(notice: str, signals: Sequence[signal.Signals] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """While active, the first of ``signals`` sets the request (printing ``"SIGTERM: <notice>"``, or
    ``"Ctrl-C: <notice>"`` for SIGINT);
    a second one raises :class:`KeyboardInterrupt` at once.  The previous handlers are restored on exit.

    Outside the main thread (where handlers cannot be installed) the signals keep
    their normal behaviour.

    Args:
        notice: what the run does now, printed after the signal's name.
        signals: the signals handled (default SIGINT and SIGTERM).

    Returns:
        A context manager yielding the :class:`StopRequest` to poll.

    >>> with graceful_interrupt("stopping") as stop:
    ...     signal.raise_signal(signal.SIGTERM)
    ...     stop.name
    SIGTERM: stopping
    'SIGTERM'
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous: dict[signal.Signals, Any] = {s: signal.getsignal(s) for s in signals}

    def handler(signum: int, frame: FrameType | None) -> None:
        if request.requested:
            for s in signals:
                signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
            raise KeyboardInterrupt
        request.signum = signum
        label = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"{label}: {notice}", flush=True)

    for s in signals:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
