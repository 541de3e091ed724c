"""Time limits on a call that may run away (a chat template a tokenizer carries, a user's tool), through SIGALRM.

    with time_limit(10.0, MyTimeout):   # raises MyTimeout in the block once it has run 10 s
        render()

SIGALRM interrupts Python code and sleeps, not a C routine that never returns to the interpreter, and it is
usable only on the main thread when no other timer is set (`alarm_usable`): elsewhere the block runs unbounded,
and a caller that must bound it anyway runs it in a thread of its own (rl.tools does).
"""

from __future__ import annotations

import contextlib
import signal
import threading


def alarm_usable() -> bool:
    """SIGALRM can bound a call here: on the main thread, with no other timer set."""
    return threading.current_thread() is threading.main_thread() and signal.getitimer(signal.ITIMER_REAL)[0] == 0


@contextlib.contextmanager
def time_limit(seconds: float, error: type[BaseException]):
    """Raise `error` (an exception class) in the block once it has run `seconds`, through SIGALRM: it interrupts
    Python code and sleeps, not a C routine that never returns to the interpreter. Where SIGALRM is not usable
    (`alarm_usable`), the block runs unbounded."""
    if not alarm_usable():
        yield
        return

    def expire(signum, frame):
        raise error

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
