"""SIGTERM and SIGHUP (`kill`, `ray job stop`, a closed terminal, a supervisor) unwinding a job as Ctrl-C does."""

import contextlib
import signal

UNWIND_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class StoppedBySignal(SystemExit):
    """A job stopped from outside (exit status 128 + the signal's number): a run it was tracking ends KILLED, as on
    Ctrl-C, not FAILED."""


@contextlib.contextmanager
def signals_unwind():
    """SIGTERM and SIGHUP raise StoppedBySignal here as Ctrl-C raises KeyboardInterrupt, so what was started is
    stopped on the way out; by default they end the process on the spot and leave the services running,
    unrecorded. A signal ignored on entry (nohup) stays ignored. Whatever exception leaves the block after one is
    the stop: Ray puts its own SystemExit(1) in place of one raised while it waits (`ray.get`)."""
    received = []

    def unwind(signum, frame):
        for s in UNWIND_SIGNALS:
            signal.signal(s, signal.SIG_IGN)  # a second one must not cut the stopping short
        received.append(signum)
        raise StoppedBySignal(128 + signum)

    previous = {s: signal.signal(s, unwind) for s in UNWIND_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    except BaseException as e:
        if received and not isinstance(e, StoppedBySignal):
            raise StoppedBySignal(128 + received[0]) from e
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
