"""`ctrl_c_raises_keyboard_interrupt` around a block that, as Ray Train's `fit` does, installs a SIGINT handler of its
own; the real `fit` interrupted is in test_train.py."""

import os
import signal
import socket
import time

import pytest

from pipelines.ctrl_c import ctrl_c_raises_keyboard_interrupt


def ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)  # the main thread's handler runs here


def installed_handler(on_sigint) -> None:
    signal.signal(signal.SIGINT, lambda signum, frame: on_sigint())


def exit_1():
    raise SystemExit(1)  # Ray's handler, once it has aborted the run


@pytest.fixture
def handler_before():
    before = signal.getsignal(signal.SIGINT)
    yield before
    signal.signal(signal.SIGINT, before)


def wakeup_fd() -> int:
    current = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(current)
    return current


def test_a_ctrl_c_that_the_blocks_handler_turns_into_an_exit_is_a_keyboard_interrupt(handler_before):
    wakeup = wakeup_fd()
    with pytest.raises(KeyboardInterrupt) as raised:
        with ctrl_c_raises_keyboard_interrupt():
            installed_handler(exit_1)
            ctrl_c()
    assert isinstance(raised.value.__cause__, SystemExit)
    assert signal.getsignal(signal.SIGINT) is handler_before and wakeup_fd() == wakeup


def test_a_ctrl_c_that_the_blocks_handler_swallows_stops_the_job_when_the_block_ends(handler_before):
    handled = []
    reader, writer = socket.socketpair()  # a wakeup file of before, an event loop's: it still hears of the signal
    with reader, writer:
        writer.setblocking(False)
        reader.settimeout(5)
        before = signal.set_wakeup_fd(writer.fileno())
        try:
            with pytest.raises(KeyboardInterrupt):
                with ctrl_c_raises_keyboard_interrupt():
                    installed_handler(lambda: handled.append(True))  # Ray's, when the run had already ended
                    ctrl_c()
            assert wakeup_fd() == writer.fileno()
        finally:
            signal.set_wakeup_fd(before)
        assert reader.recv(16) == bytes([signal.SIGINT])
    assert handled == [True] and signal.getsignal(signal.SIGINT) is handler_before


def test_without_a_ctrl_c_the_block_ends_as_it_would_and_the_handler_is_put_back(handler_before):
    with pytest.raises(RuntimeError, match="worker died"):
        with ctrl_c_raises_keyboard_interrupt():
            installed_handler(exit_1)
            raise RuntimeError("worker died")
    with ctrl_c_raises_keyboard_interrupt():
        installed_handler(exit_1)
    assert signal.getsignal(signal.SIGINT) is handler_before
    with pytest.raises(SystemExit):  # a SIGTERM's unwinding (`signals_unwind`) stays what it is
        with ctrl_c_raises_keyboard_interrupt():
            raise SystemExit(143)


def test_a_ctrl_c_before_the_blocks_handler_is_the_keyboard_interrupt_it_always_was(handler_before):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt) as raised:
        with ctrl_c_raises_keyboard_interrupt():
            ctrl_c()
    assert raised.value.__cause__ is None and signal.getsignal(signal.SIGINT) is signal.default_int_handler
