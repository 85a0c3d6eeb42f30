"""Asking a run to stop, from any thread: a signal handler in the CLI, or the thread of a
notebook that waits on a run in its worker thread (``batchq.api``).

The first press stops sending: no request more starts, those in flight get the grace
period. The second stops at once. Waiting is on an event, woken by the press, never a
polling loop.
"""

from __future__ import annotations

import contextlib
import threading

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.lowlevel import EventLoopToken

__all__ = ["StopSwitch"]


class StopSwitch:
    """Presses counted from any thread; a run's tasks wait for the count they stop at."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._presses = 0
        #: (presses awaited, its event, the waiting loop's token, that loop's thread)
        self._waiting: list[tuple[int, anyio.Event, EventLoopToken, int]] = []

    @property
    def presses(self) -> int:
        return self._presses

    def press(self) -> None:
        """Ask once more. Thread-safe; wakes whoever waits for this many presses."""
        with self._lock:
            self._presses += 1
            woken = [w for w in self._waiting if w[0] <= self._presses]
            self._waiting = [w for w in self._waiting if w[0] > self._presses]
        for _, event, token, thread in woken:
            if thread == threading.get_ident():
                event.set()
                continue
            with contextlib.suppress(RuntimeError):  # that loop has ended: nobody waits
                anyio.from_thread.run_sync(event.set, token=token)

    async def pressed(self, times: int = 1) -> None:
        """Return once the switch has been pressed ``times`` times in all."""
        event = anyio.Event()
        with self._lock:
            if self._presses >= times:
                return
            token = anyio.lowlevel.current_token()
            self._waiting.append((times, event, token, threading.get_ident()))
        await event.wait()
