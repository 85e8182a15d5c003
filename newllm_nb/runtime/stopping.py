"""Stopping a run on purpose keeps its work: Ctrl-C and the notebook's Stop button (both SIGINT, seen as
``KeyboardInterrupt``) and SIGTERM (what Colab sends when it recycles a runtime, as do ``docker stop`` and
Slurm preemption).

While the training loop runs, ``StopSignals`` turns the first SIGINT or SIGTERM into a request that the loop
reads after each step: the step finishes, a checkpoint of exactly that step is written, and the loop raises
``Interrupted`` naming it. A step is never cut in half, so the checkpoint holds the state an uninterrupted
run had there and the resumed run continues bit for bit. A second Ctrl-C interrupts at once (for a step
that hangs); the work since the last checkpoint is then lost, and the message names the checkpoint kept.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal. ``checkpoint`` is the file to resume from (None: nothing was saved);
    ``saved`` says whether it was written at the stop or is an older one; ``result`` is what the caller
    had when it stopped (``run_experiment`` attaches its partial ``RunResult``)."""

    def __init__(self, signum: int, where: str, checkpoint: Optional[Path] = None, saved: bool = False) -> None:
        super().__init__(signum, where, checkpoint, saved)
        self.signum, self.where, self.checkpoint, self.saved = int(signum), where, checkpoint, saved
        self.result = None

    @property
    def exit_code(self) -> int:
        """128 + the signal number, the shell's convention: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum

    def message(self, resume_hint: str = "run again with the same settings to resume") -> str:
        """One line: which signal, where, what was saved and how to go on."""
        head = f"stopped by {signal.Signals(self.signum).name} {self.where}"
        if self.checkpoint is None:
            return f"{head}: no checkpoint to resume from (no run folder, or none written yet)"
        if self.saved:
            return f"{head}: saved {self.checkpoint}; {resume_hint}"
        return f"{head} before the step ended: the work since {self.checkpoint} was written is lost; {resume_hint}"

    def __str__(self) -> str:
        return self.message()


class StopSignals:
    """While inside: the first SIGINT / SIGTERM sets ``signum`` (the loop stops after the step); a second
    SIGINT raises ``KeyboardInterrupt`` at once. Signal handlers can only be set from the main thread; in
    another thread this does nothing and the signals keep their own handlers."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.getsignal(s)
                signal.signal(s, self._request)
        return self

    def _request(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:  # asked again: stop now, mid-step
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        self._old = {}


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop (reading data, generating): ends the command like Ctrl-C does."""

    signum = signal.SIGTERM


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises ``Terminated`` (a ``KeyboardInterrupt``) in the main thread, so an entry
    point ends with one line and code 143 instead of dying silently; ``StopSignals`` takes over inside the
    training loop. The previous handler is restored on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)
