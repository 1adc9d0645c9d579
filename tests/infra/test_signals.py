"""`signals_unwind`: SIGTERM and SIGHUP as exceptions that unwind the job (the CLI's, in a process of its own, in
tests/test_cli.py)."""

import os
import signal
import time

import pytest

from infra.signals import StoppedBySignal, signals_unwind, stop_received


@pytest.fixture
def handlers_before():
    """SIGTERM and SIGHUP at their defaults, as in a terminal (under nohup the tests inherit SIGHUP ignored)."""
    saved = {s: signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGHUP)}
    yield {s: signal.SIG_DFL for s in saved}
    for s, handler in saved.items():
        signal.signal(s, handler)


def kill_self(signum) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.5)  # the main thread's handler runs here


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_unwinds_with_its_exit_status_and_a_second_one_waits(handlers_before, signum):
    unwound = []
    with pytest.raises(StoppedBySignal) as raised, signals_unwind():
        try:
            kill_self(signum)
        finally:
            kill_self(signal.SIGTERM)  # ignored while the first unwinds
            unwound.append(True)
    assert raised.value.code == 128 + signum and unwound == [True]
    assert {s: signal.getsignal(s) for s in handlers_before} == handlers_before


def test_an_exit_put_in_the_stops_place_is_still_the_stop(handlers_before):
    """Ray's `ray.get` raises SystemExit(1) when a signal handler raises in its wait: the job would exit 1, not 143."""
    with pytest.raises(StoppedBySignal) as raised, signals_unwind():
        try:
            kill_self(signal.SIGTERM)
        except StoppedBySignal:
            raise SystemExit(1)
    assert raised.value.code == 128 + signal.SIGTERM and raised.value.__cause__.code == 1


def test_a_stop_caught_on_the_way_still_stops_the_job(handlers_before):
    received = []
    with pytest.raises(StoppedBySignal) as raised, signals_unwind():
        try:
            kill_self(signal.SIGHUP)
        except BaseException:  # as a library's catch-all may
            pass
        received.append(stop_received())  # asserted after: an assertion's error would leave as the stop too
    assert raised.value.code == 128 + signal.SIGHUP and raised.value.__cause__ is None
    assert received == [True] and not stop_received()


def test_without_a_signal_the_block_ends_as_it_would(handlers_before):
    with pytest.raises(SystemExit) as raised, signals_unwind():
        raise SystemExit(1)
    assert type(raised.value) is SystemExit and raised.value.code == 1 and not stop_received()
    assert {s: signal.getsignal(s) for s in handlers_before} == handlers_before


def test_a_signal_ignored_on_entry_stays_ignored(handlers_before):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
    with signals_unwind():
        kill_self(signal.SIGHUP)
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
