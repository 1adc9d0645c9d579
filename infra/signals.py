"""SIGTERM and SIGHUP (`kill`, `ray job stop`, a closed terminal, a supervisor) unwinding a job as Ctrl-C does."""

import contextlib
import signal

UNWIND_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []  # those received in the `signals_unwind` blocks now open


class StoppedBySignal(SystemExit):
    """A job stopped from outside (exit status 128 + the signal's number): a run it was tracking ends KILLED, as on
    Ctrl-C, not FAILED."""


def stop_received() -> bool:
    """Whether the job is unwinding from a SIGTERM or SIGHUP, whatever exception carries it so far."""
    return bool(_received)


@contextlib.contextmanager
def signals_unwind():
    """SIGTERM and SIGHUP raise StoppedBySignal here as Ctrl-C raises KeyboardInterrupt, so what was started is
    stopped on the way out; by default they end the process on the spot and leave the services running,
    unrecorded. A signal ignored on entry (nohup) stays ignored. The block leaves by StoppedBySignal after one,
    whatever exception carries it (Ray puts its own SystemExit(1) in place of one raised while it waits, in
    `ray.get`), or none where one caught it on the way."""
    def unwind(signum, frame):
        for s in UNWIND_SIGNALS:
            signal.signal(s, signal.SIG_IGN)  # a second one must not cut the stopping short
        _received.append(signum)
        raise StoppedBySignal(128 + signum)

    start = len(_received)
    previous = {s: signal.signal(s, unwind) for s in UNWIND_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    except BaseException as e:
        if len(_received) > start and not isinstance(e, StoppedBySignal):
            raise StoppedBySignal(128 + _received[start]) from e
        raise
    else:
        if len(_received) > start:
            raise StoppedBySignal(128 + _received[start])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        del _received[start:]
