"""Ctrl-C during Ray Train's `fit` as during the rest of a job: KeyboardInterrupt, so the MLflow run ends KILLED.

Ray Train's `fit` (its v2 API, Ray 2.60 here) installs a SIGINT handler of its own: it aborts the run (controller and
workers) and the process goes on with a SystemExit (1, as measured here; 0 where the controller has gone first), and
the handler stays installed after `fit`. So a Ctrl-C ended the MLflow run FAILED and the process with 1, and a Ctrl-C
after `fit` (the model's export, the demo's next phase) called a finished run's controller instead of stopping.
"""

import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def ctrl_c_raises_keyboard_interrupt() -> Iterator[None]:
    """Lets the block's handlers (Ray's abort of the run) do their work, then raises KeyboardInterrupt where the
    block saw a SIGINT, from the block's own exception if it raised one; the SIGINT handler of before the block is
    back after it. A SIGINT is seen by the byte Python writes for it to a wakeup file, whichever handler runs."""
    if threading.current_thread() is not threading.main_thread():  # signals are handled in the main thread only
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    reader, writer = socket.socketpair()
    with reader, writer:
        reader.setblocking(False)
        writer.setblocking(False)
        wakeup_before = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        try:
            yield
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            if _received(reader, signal.SIGINT):
                raise KeyboardInterrupt from e
            raise
        else:
            if _received(reader, signal.SIGINT):  # the run ended as it came: stopped here, as Ctrl-C would stop
                raise KeyboardInterrupt
        finally:
            signal.set_wakeup_fd(wakeup_before)
            if previous is not None:  # None: a handler not installed from Python, which Python cannot put back
                signal.signal(signal.SIGINT, previous)


def _received(reader: socket.socket, signum: int) -> bool:
    """Whether the wakeup bytes written so far name `signum`."""
    data = b""
    try:
        while chunk := reader.recv(4096):
            data += chunk
    except BlockingIOError:
        pass
    return signum in data
