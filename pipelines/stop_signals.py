"""Ctrl-C, `kill` or `ray job stop` during Ray Train's `fit` as during the rest of a job: Ray's run is aborted, then
the job stops as it would outside `fit`, so its MLflow run ends KILLED.

Ray Train's `fit` (its v2 API, Ray 2.60 here) installs a SIGINT handler of its own: it aborts the run (controller and
workers) and the process goes on with a SystemExit (1, as measured here; 0 where the controller has gone first), and
the handler stays installed after `fit`. So a Ctrl-C ended the MLflow run FAILED and the process with 1, and a Ctrl-C
after `fit` (the model's export, the demo's next phase) called a finished run's controller instead of stopping. A
SIGTERM, whose handler is the job's (`signals_unwind`; `init_ray` keeps it from `ray.init`'s), raised the job's exit
inside `fit`: where it landed in Ray's wait for the run, Ray put SystemExit(1) in its place (measured), and the run
was not aborted, its controller killed with the last reference to it.
"""

import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

FROM_OUTSIDE = (signal.SIGTERM, signal.SIGHUP)  # `kill`, `ray job stop`, a closed terminal
# their handlers put back in this order: a SIGTERM between two is not passed to the caller's SIGINT handler
STOP_SIGNALS = (*FROM_OUTSIDE, signal.SIGINT)


@contextmanager
def stop_signals_abort_ray_train() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP in the block go to the block's SIGINT handler (Ray's abort of the run); once it has
    done its work, they stop the job as outside the block: KeyboardInterrupt for Ctrl-C, the handler of before for
    the others (`signals_unwind`'s exit), raised from the block's own exception where it raised one. The handlers of
    before are back after the block; a signal ignored on entry (nohup) stays ignored. A signal is seen by the byte
    Python writes for it to a wakeup file, whichever handler runs (the bytes are passed on to the wakeup file of
    before, where one was set: an event loop's)."""
    if threading.current_thread() is not threading.main_thread():  # signals are handled in the main thread only
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    reader, writer = socket.socketpair()
    with reader, writer:
        reader.setblocking(False)
        writer.setblocking(False)
        wakeup_before, raised = None, None
        try:
            wakeup_before = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            for s in FROM_OUTSIDE:
                if previous[s] not in (None, signal.SIG_IGN):
                    signal.signal(s, _abort_as_on_ctrl_c)
            yield
        except BaseException as e:
            raised = e
        finally:  # the handlers first: a signal from here on is the caller's again
            try:
                for s, handler in previous.items():
                    if handler is not None:  # None: a handler not installed from Python, which it cannot put back
                        signal.signal(s, handler)
            finally:  # whatever a handler raises meanwhile: the wakeup file is not left on one closed below
                if wakeup_before is not None:
                    signal.set_wakeup_fd(wakeup_before)
        received = _drained(reader)
    stop = next((s for s in received if s in STOP_SIGNALS), None)
    if stop in FROM_OUTSIDE:  # raised again below, which writes its byte again
        received = received.replace(bytes([stop]), b"", 1)
    if wakeup_before not in (None, -1) and received:  # a wakeup file of before (an event loop's) gets its bytes
        try:
            os.write(wakeup_before, received)
        except OSError:
            pass
    if stop == signal.SIGINT and not isinstance(raised, KeyboardInterrupt):
        raise KeyboardInterrupt from raised  # after a run that ended as the Ctrl-C came too: stopped, as Ctrl-C stops
    if stop in FROM_OUTSIDE:
        try:
            signal.raise_signal(stop)  # to the handler of before, which runs before this returns (the main thread)
        except BaseException as e:
            raise e from raised
    if raised is not None:
        raise raised


def _abort_as_on_ctrl_c(signum, frame) -> None:
    """SIGTERM or SIGHUP in the block, once: what Ctrl-C does there (Ray's abort of the run; KeyboardInterrupt where
    `fit` has not installed its handler yet, or has removed it)."""
    for s in FROM_OUTSIDE:
        if signal.getsignal(s) is _abort_as_on_ctrl_c:
            signal.signal(s, signal.SIG_IGN)  # a second one must not cut the abort short
    on_ctrl_c = signal.getsignal(signal.SIGINT)
    (on_ctrl_c if callable(on_ctrl_c) else signal.default_int_handler)(signal.SIGINT, frame)


def _drained(reader: socket.socket) -> bytes:
    """The wakeup bytes written so far: a byte a signal, its number."""
    data = b""
    try:
        while chunk := reader.recv(4096):
            data += chunk
    except BlockingIOError:
        pass
    return data
