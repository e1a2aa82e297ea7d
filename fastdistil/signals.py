"""Ctrl-C (SIGINT) and SIGTERM over a whole training run.

Outside the training loop (loading, tokenisation, the first evaluation) a signal stops the run at once; the job
then leaves nothing that blocks the same command (fastdistil.job). Inside the loop (`deferred()`) a signal stops
the run at the next step boundary with a checkpoint (exit 130) rather than in the middle of an optimizer update,
and a second signal stops at once (still with the last boundary's checkpoint)."""

from __future__ import annotations

import contextlib
import signal
import sys


class StopOnSignal:
    """Installable from the main thread only; elsewhere the default behaviour stays."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received = None
        self.previous = {}
        self._defer = 0
        try:
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread
            self.previous = {}

    def _handler(self, signum, frame):
        if self.received is not None or not self._defer:
            self.received = self.received or signal.Signals(signum).name
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received}: stopping after this step (send it again to stop now)", file=sys.stderr)

    @contextlib.contextmanager
    def deferred(self):
        """Within the block the first signal is only recorded; check() acts on it at a safe point."""
        self._defer += 1
        try:
            yield self
        finally:
            self._defer -= 1

    def check(self, world=None, device="cpu"):
        """At a step boundary: stop when any process received a signal (so all stop at the same step)."""
        received = self.received is not None
        if world.any(received, device) if world is not None else received:
            raise KeyboardInterrupt

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
