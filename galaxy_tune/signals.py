"""Stop signals: the ones Slurm and Kubernetes send before they kill a job, and a caller's handlers kept across
code that replaces them (Ray Tune's run)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


@contextmanager
def handlers_kept(signums: Iterable[int], install: Callable | None = None) -> Iterator[None]:
    """Put this process's handlers of `signums` back after the block; `install`, if given, handles them during it.

    Only the main thread sets handlers: elsewhere this does nothing. A handler set outside Python (None) stays."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {signum: signal.getsignal(signum) for signum in signums}
    if install is not None:
        for signum in kept:
            signal.signal(signum, install)
    try:
        yield
    finally:
        for signum, handler in kept.items():
            if handler is not None:
                signal.signal(signum, handler)
