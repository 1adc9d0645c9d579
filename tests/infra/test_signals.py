"""`signals_unwind`: SIGTERM and SIGHUP as exceptions that unwind the job (the CLI's, in a process of its own, in
tests/test_cli.py)."""

import signal

import pytest

from infra.signals import StoppedBySignal, signals_unwind, stop_received
from tests.conftest import signal_self

DEFAULTS = {signal.SIGTERM: signal.SIG_DFL, signal.SIGHUP: signal.SIG_DFL}  # `stop_signals_at_defaults`


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_unwinds_with_its_exit_status_and_a_second_one_waits(stop_signals_at_defaults, signum):
    unwound = []
    with pytest.raises(StoppedBySignal) as raised, signals_unwind():
        try:
            signal_self(signum)
        finally:
            signal_self(signal.SIGTERM)  # ignored while the first unwinds
            unwound.append(True)
    assert raised.value.code == 128 + signum and unwound == [True]
    assert {s: signal.getsignal(s) for s in DEFAULTS} == DEFAULTS


def test_an_exit_put_in_the_stops_place_is_still_the_stop(stop_signals_at_defaults):
    """Ray's `ray.get` raises SystemExit(1) when a signal handler raises in its wait: the job would exit 1, not 143."""
    with pytest.raises(StoppedBySignal) as raised, signals_unwind():
        try:
            signal_self(signal.SIGTERM)
        except StoppedBySignal:
            raise SystemExit(1)
    assert raised.value.code == 128 + signal.SIGTERM and raised.value.__cause__.code == 1


def test_a_stop_caught_on_the_way_still_stops_the_job(stop_signals_at_defaults):
    received = []
    with pytest.raises(StoppedBySignal) as raised, signals_unwind():
        try:
            signal_self(signal.SIGHUP)
        except BaseException:  # as a library's catch-all may
            pass
        received.append(stop_received())  # asserted after: an assertion's error would leave as the stop too
    assert raised.value.code == 128 + signal.SIGHUP and raised.value.__cause__ is None
    assert received == [True] and not stop_received()


def test_without_a_signal_the_block_ends_as_it_would(stop_signals_at_defaults):
    with pytest.raises(SystemExit) as raised, signals_unwind():
        raise SystemExit(1)
    assert type(raised.value) is SystemExit and raised.value.code == 1 and not stop_received()
    assert {s: signal.getsignal(s) for s in DEFAULTS} == DEFAULTS


def test_a_signal_ignored_on_entry_stays_ignored(stop_signals_at_defaults):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
    with signals_unwind():
        signal_self(signal.SIGHUP)
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
