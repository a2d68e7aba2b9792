"""The main thread's waits hear a signal that another thread caught (`flows.entry.wait`).

Linux hands a process-wide signal (a terminal's Ctrl-C) to any thread that does not
block it; here another thread is made to catch it with ``pthread_kill``.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest

from flows import entry


def _caught_elsewhere(after: float) -> threading.Thread:
    """A thread that, ``after`` seconds, catches a SIGINT itself."""

    def catch() -> None:
        time.sleep(after)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    thread = threading.Thread(target=catch, daemon=True)
    thread.start()
    return thread


def test_a_plain_wait_hears_a_signal_another_thread_caught_only_when_it_ends() -> None:
    """The failure `entry.wait` avoids: the wait's whole second passes first."""
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        _caught_elsewhere(0.1)
        threading.Event().wait(1.0)
    assert time.monotonic() - t0 >= 1.0


def test_a_wait_hears_a_signal_another_thread_caught_within_a_step() -> None:
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        _caught_elsewhere(0.1)
        entry.wait(threading.Event())  # no timeout: without steps it would never end
    assert time.monotonic() - t0 < 0.1 + entry.STEP + 1.0


def test_a_wait_says_whether_its_event_came_in_time() -> None:
    done = threading.Event()
    threading.Timer(0.05, done.set).start()
    assert entry.wait(done, timeout=5.0)
    assert not entry.wait(threading.Event(), timeout=0.3)
