"""The main thread's waits hear a signal that another thread caught (`flows.entry.wait`).

Linux hands a process-wide signal (a terminal's Ctrl-C) to any thread that does not
block it; here another thread is made to catch one with ``pthread_kill``. The signal
is SIGUSR1 with a handler of the test's own, as the SIGINT handler depends on what
the test session imported before.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import pytest

from flows import entry


class HeardError(Exception):
    """What the test's handler raises in the main thread."""


@pytest.fixture(autouse=True)
def handler() -> Iterator[None]:
    def raise_heard(signum: int, frame: object) -> None:
        raise HeardError

    previous = signal.signal(signal.SIGUSR1, raise_heard)
    yield
    signal.signal(signal.SIGUSR1, previous)


def _caught_elsewhere(after: float) -> threading.Thread:
    """A thread that, ``after`` seconds, catches a SIGUSR1 itself."""

    def catch() -> None:
        time.sleep(after)
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)

    thread = threading.Thread(target=catch, daemon=True)
    thread.start()
    return thread


def test_a_plain_wait_hears_a_signal_another_thread_caught_only_when_it_ends() -> None:
    """The failure `entry.wait` avoids: the wait's whole second passes first."""
    t0 = time.monotonic()
    with pytest.raises(HeardError):
        _caught_elsewhere(0.1)
        threading.Event().wait(1.0)
    assert time.monotonic() - t0 >= 1.0


def test_a_wait_hears_a_signal_another_thread_caught_within_a_step() -> None:
    t0 = time.monotonic()
    with pytest.raises(HeardError):
        _caught_elsewhere(0.1)
        entry.wait(threading.Event())  # no timeout: without steps it would never end
    assert time.monotonic() - t0 < 0.1 + entry.STEP + 1.0


def test_a_wait_says_whether_its_event_came_in_time() -> None:
    done = threading.Event()
    threading.Timer(0.05, done.set).start()
    assert entry.wait(done, timeout=5.0)
    assert not entry.wait(threading.Event(), timeout=0.3)
