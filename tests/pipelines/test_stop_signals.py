"""`stop_signals_abort_ray_train` around a block that, as Ray Train's `fit` does, installs a SIGINT handler of its
own; the real `fit` stopped is in test_train.py."""

import signal
import socket

import pytest

from infra.signals import StoppedBySignal, signals_unwind
from pipelines.stop_signals import stop_signals_abort_ray_train
from tests.conftest import signal_self


def installed_handler(on_sigint) -> None:
    signal.signal(signal.SIGINT, lambda signum, frame: on_sigint())


def exit_1():
    raise SystemExit(1)  # Ray's handler, once it has aborted the run


@pytest.fixture
def handler_before(stop_signals_at_defaults):
    return stop_signals_at_defaults[signal.SIGINT]


def wakeup_fd() -> int:
    current = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(current)
    return current


def test_a_ctrl_c_that_the_blocks_handler_turns_into_an_exit_is_a_keyboard_interrupt(handler_before):
    wakeup = wakeup_fd()
    with pytest.raises(KeyboardInterrupt) as raised:
        with stop_signals_abort_ray_train():
            installed_handler(exit_1)
            signal_self()
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
                with stop_signals_abort_ray_train():
                    installed_handler(lambda: handled.append(True))  # Ray's, when the run had already ended
                    signal_self()
            assert wakeup_fd() == writer.fileno()
        finally:
            signal.set_wakeup_fd(before)
        assert reader.recv(16) == bytes([signal.SIGINT])
    assert handled == [True] and signal.getsignal(signal.SIGINT) is handler_before


def test_without_a_ctrl_c_the_block_ends_as_it_would_and_the_handler_is_put_back(handler_before):
    with pytest.raises(RuntimeError, match="worker died"):
        with stop_signals_abort_ray_train():
            installed_handler(exit_1)
            raise RuntimeError("worker died")
    with stop_signals_abort_ray_train():
        installed_handler(exit_1)
    assert signal.getsignal(signal.SIGINT) is handler_before
    with pytest.raises(SystemExit):  # a SIGTERM's unwinding (`signals_unwind`) stays what it is
        with stop_signals_abort_ray_train():
            raise SystemExit(143)


def test_a_ctrl_c_before_the_blocks_handler_is_the_keyboard_interrupt_it_always_was(handler_before):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt) as raised:
        with stop_signals_abort_ray_train():
            signal_self()
    assert raised.value.__cause__ is None and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_kill_in_the_block_aborts_as_ctrl_c_does_then_stops_the_job_as_outside_it(handler_before):
    """SIGTERM (`kill`, `ray job stop`) in `fit`: Ray's handler aborts the run, and once `fit` is left the job's own
    handler (`signals_unwind`) raises its exit, so the run ends KILLED; Ray's handler alone sees a second signal."""
    aborts, after = [], {}
    with pytest.raises(StoppedBySignal) as raised, signals_unwind():
        try:
            with stop_signals_abort_ray_train():
                installed_handler(lambda: aborts.append(True))
                signal_self(signal.SIGTERM)
                signal_self(signal.SIGHUP)  # ignored: the abort under way is not cut short
                exit_1()
        finally:
            after = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert aborts == [True]
    assert raised.value.code == 128 + signal.SIGTERM and isinstance(raised.value.__cause__, SystemExit)
    # the SIGINT handler of before back; the unwinding's SIGTERM one got it: it ignores a second one
    assert after == {signal.SIGINT: handler_before, signal.SIGTERM: signal.SIG_IGN}


def test_a_kill_before_the_blocks_handler_stops_the_block_as_ctrl_c_would(handler_before):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(StoppedBySignal) as raised, signals_unwind():
        with stop_signals_abort_ray_train():
            signal_self(signal.SIGHUP)
            raise AssertionError("the block went on")
    assert raised.value.code == 128 + signal.SIGHUP and isinstance(raised.value.__cause__, KeyboardInterrupt)


def test_a_signal_ignored_on_entry_stays_ignored(handler_before):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
    with stop_signals_abort_ray_train():
        installed_handler(exit_1)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signal_self(signal.SIGHUP)
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is handler_before
