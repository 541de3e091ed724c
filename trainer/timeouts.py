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


# After the limit, how often `error` is raised again while the block still runs: code that catches it and goes on
# (a retry loop around `except Exception`, or a bare `except`) is interrupted again until it lets it through.
REPEAT_SECONDS = 0.05


@contextlib.contextmanager
def time_limit(seconds: float, error: type[BaseException]):
    """Raise `error` (an exception class) in the block once it has run `seconds`, and again every REPEAT_SECONDS
    until the block ends, through SIGALRM: it interrupts Python code and sleeps, not a C routine that never returns
    to the interpreter. Make `error` a BaseException (not an Exception) so that a broad `except Exception` does not
    catch it. Where SIGALRM is not usable (`alarm_usable`), the block runs unbounded."""
    if not alarm_usable():
        yield
        return
    ended = False

    def expire(signum, frame):
        if not ended:  # a signal between the block's end and the disarming below raises nothing
            raise error

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, REPEAT_SECONDS)
    try:
        yield
    finally:
        ended = True
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
