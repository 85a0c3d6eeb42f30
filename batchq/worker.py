"""A run on an event loop of its own, in a worker thread, while the calling thread waits
for it: so ``batchq.run`` works where a loop is running already (Jupyter), and the
calling thread stays free for the signals that stop the run (the main thread is the one
that receives them)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio

from batchq.engine.runner import loop_options
from batchq.engine.stop import StopSwitch
from batchq.errors import BatchqError, Interrupted

__all__ = ["in_worker"]

T = TypeVar("T")
#: How long a KeyboardInterrupt may wait to be seen by the thread waiting on a run.
WAIT_SLICE_S = 0.1


@contextmanager
def _signals_press(stop: StopSwitch) -> Iterator[None]:
    """On the main thread, SIGINT and SIGTERM press ``stop`` while the run goes on (its
    handlers put back after): whatever else handles them there (Jupyter's kernel, or
    asyncio.run's handler, which would only cancel a task that is waiting on this
    thread), an interrupt reaches the run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kinds = (signal.SIGINT, signal.SIGTERM)
    before = {kind: signal.getsignal(kind) for kind in kinds}
    for kind in kinds:
        signal.signal(kind, lambda *_: stop.press())
    try:
        yield
    finally:
        for kind, handler in before.items():
            signal.signal(kind, handler)


def in_worker(work: Callable[[StopSwitch], Awaitable[T]]) -> T:
    """Run ``work`` on an event loop of its own in a worker thread, and wait. A
    SIGINT or SIGTERM (or a KeyboardInterrupt) while waiting presses the stop switch
    (twice: at once) and the run stops; then Interrupted is raised."""
    stop = StopSwitch()
    outcome: list[tuple[bool, Any]] = []
    finished = threading.Event()

    def main() -> None:
        try:
            outcome.append((True, anyio.run(work, stop, backend_options=loop_options())))
        except BaseException as e:  # handed to the waiting thread, raised there
            outcome.append((False, e))
        finally:
            finished.set()

    threading.Thread(target=main, name="batchq-run", daemon=True).start()
    with _signals_press(stop):
        while not finished.is_set():
            try:
                # In slices: a signal's handler runs only between the main thread's
                # bytecodes. (Not Thread.join: a Ctrl-C there was held back until the run
                # had finished, and one that broke into it could leave the thread dead.)
                finished.wait(WAIT_SLICE_S)
            except KeyboardInterrupt:  # off the main thread, or a handler of the caller's
                stop.press()
    ok, value = outcome[0]
    if isinstance(value, BatchqError):  # its message says it all: not the worker's frames
        raise value.with_traceback(None) from None
    if not ok:
        raise value
    if stop.presses:
        raise Interrupted(
            "interrupted as the run finished: its answers are saved; run the "
            "same call again to get them at once"
        )
    return value  # type: ignore[no-any-return]
