"""Ctrl-C during Ray Train's `fit` as during the rest of a job: KeyboardInterrupt, so the MLflow run ends KILLED.

Ray Train's `fit` (its v2 API, Ray 2.60 here) installs a SIGINT handler of its own: it aborts the run (controller and
workers) and the process goes on with a SystemExit (1, as measured here; 0 where the controller has gone first), and
the handler stays installed after `fit`. So a Ctrl-C ended the MLflow run FAILED and the process with 1, and a Ctrl-C
after `fit` (the model's export, the demo's next phase) called a finished run's controller instead of stopping.
"""

import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def ctrl_c_raises_keyboard_interrupt() -> Iterator[None]:
    """Lets the block's handlers (Ray's abort of the run) do their work, then raises KeyboardInterrupt where the
    block saw a SIGINT, from the block's own exception if it raised one; the SIGINT handler of before the block is
    back after it. A SIGINT is seen by the byte Python writes for it to a wakeup file, whichever handler runs (the
    bytes are passed on to the wakeup file of before, where one was set: an event loop's)."""
    if threading.current_thread() is not threading.main_thread():  # signals are handled in the main thread only
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    reader, writer = socket.socketpair()
    with reader, writer:
        reader.setblocking(False)
        writer.setblocking(False)
        wakeup_before, raised = None, None
        try:
            wakeup_before = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            yield
        except BaseException as e:
            raised = e
        finally:  # the handler first: a Ctrl-C from here on is the caller's again
            if previous is not None:  # None: a handler not installed from Python, which Python cannot put back
                signal.signal(signal.SIGINT, previous)
            if wakeup_before is not None:
                signal.set_wakeup_fd(wakeup_before)
        received = _drained(reader)
    if wakeup_before not in (None, -1) and received:  # a wakeup file of before (an event loop's) gets its bytes
        try:
            os.write(wakeup_before, received)
        except OSError:
            pass
    if signal.SIGINT in received and not isinstance(raised, KeyboardInterrupt):
        raise KeyboardInterrupt from raised  # after a run that ended as the Ctrl-C came too: stopped, as Ctrl-C stops
    if raised is not None:
        raise raised


def _drained(reader: socket.socket) -> bytes:
    """The wakeup bytes written so far: a byte a signal, its number."""
    data = b""
    try:
        while chunk := reader.recv(4096):
            data += chunk
    except BlockingIOError:
        pass
    return data
