"""SIGINT and SIGTERM as a flag the loop checks after each step, so a stopped run saves a
resumable checkpoint at a batch boundary (exit 128 + the signal)."""
from __future__ import annotations

import signal
from contextlib import contextmanager


@contextmanager
def catch_stop_signals():
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step."""
    caught: list[int] = []
    handlers = {}

    def handler(signum, frame):
        caught.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            handlers[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. inside a tuner worker thread)
            pass
    try:
        yield caught
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)
