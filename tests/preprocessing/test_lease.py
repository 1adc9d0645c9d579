"""An entry's lease is exclusive: one job writes an entry at a time, the next waits for it (or fails naming it), and
a dead job's lease is taken over."""

import json
import os
import threading
import time

import pytest

from preprocessing.cache import lease as lease_module
from preprocessing.cache.lease import LEASE, EntryBusy, lease


def test_a_live_lease_of_another_job_is_waited_for_or_names_its_holder(tmp_path):
    entry = str(tmp_path / "entry")
    released, order = threading.Event(), []

    def holder() -> None:
        with lease(entry, "store-a"):
            order.append("first holds")
            released.wait(5)
            order.append("first lets go")

    first = threading.Thread(target=holder)
    first.start()
    deadline = time.monotonic() + 10
    while not order and time.monotonic() < deadline:  # the holder's lease taken (a failing holder ends the wait)
        time.sleep(0.01)
    assert order == ["first holds"]
    with pytest.raises(EntryBusy, match=rf"{entry} is being written by another job \(.*pid {os.getpid()}; its lease"):
        with lease(entry, "store-b", wait=False):
            pass
    threading.Timer(0.3, released.set).start()
    with lease(entry, "store-b", poll_s=0.02):
        order.append("second holds")
        assert json.loads((tmp_path / "entry" / LEASE).read_text())["store"] == "store-b"
    first.join()
    assert order == ["first holds", "first lets go", "second holds"]
    assert not (tmp_path / "entry" / LEASE).exists()


def test_a_stale_lease_is_taken_over_and_its_late_holder_leaves_the_new_one(tmp_path):
    """A job three renewals late is dead (or as good as): its lease is taken; if it comes back and ends, it removes
    no lease that is no longer its own."""
    entry = tmp_path / "entry"
    with lease(str(entry), "store-a", renew_s=3600):  # renewed next in an hour: made late below
        long_ago = time.time() - 3 * 3600 - 1
        os.utime(entry / LEASE, (long_ago, long_ago))
        with lease(str(entry), "store-b", wait=False):
            assert json.loads((entry / LEASE).read_text())["store"] == "store-b"
            inner = (entry / LEASE).read_text()
        assert not (entry / LEASE).exists()
        (entry / LEASE).write_text(inner)  # as if the taker still held it when the late job ended
    assert (entry / LEASE).read_text() == inner


def test_two_jobs_that_find_the_entry_free_at_once_take_turns(tmp_path, monkeypatch):
    """Both look before either writes (the race a shared store allows): the one whose record is read back holds the
    entry, the other waits for it."""
    entry, holding, overlaps = str(tmp_path / "entry"), [], []
    looked = threading.Barrier(2)
    real_holder = lease_module._holder

    def look_together(path):
        found = real_holder(path)
        if not hasattr(looked_once, threading.current_thread().name):
            setattr(looked_once, threading.current_thread().name, True)
            looked.wait(5)  # each job's first look: both find the entry free
        return found

    looked_once = type("Looks", (), {})()
    monkeypatch.setattr(lease_module, "_holder", look_together)
    # the second write lands within the first's settle: 50 ms on local disk, which a loaded CI can overrun
    monkeypatch.setitem(lease_module.SETTLE_S, False, 1.0)

    def job(name: str) -> None:
        with lease(entry, name, poll_s=0.02):
            overlaps.append(len(holding))
            holding.append(name)
            time.sleep(0.2)
            holding.remove(name)

    jobs = [threading.Thread(target=job, args=(n,), name=n) for n in ("a", "b")]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    assert overlaps == [0, 0] and not (tmp_path / "entry" / LEASE).exists()


def test_the_fresh_lease_of_a_killed_job_of_this_host_is_taken_at_once_another_hosts_is_not(tmp_path):
    """A job killed outright (SIGKILL, out of memory) leaves a fresh lease: its rerun on the same host goes on at
    once; a lease from another host may be a living job's, and is waited for."""
    import socket
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    entry = tmp_path / "entry"
    entry.mkdir()
    here = {"store": "s", "host": socket.gethostname(), "pid": gone.pid, "renew_s": 300,
            "pid_namespace": lease_module._pid_namespace()}
    (entry / LEASE).write_text(json.dumps({**here, "token": "killed"}))
    with lease(str(entry), "s", wait=False):
        assert json.loads((entry / LEASE).read_text())["token"] != "killed"
    # a container sharing the host's name (host networking) but not its PIDs: its job may live on
    (entry / LEASE).write_text(json.dumps({**here, "pid_namespace": "pid:[1]", "token": "a container's"}))
    with pytest.raises(EntryBusy, match="if that job is dead, remove"):
        with lease(str(entry), "s", wait=False):
            pass
    (entry / LEASE).write_text(json.dumps({"store": "s", "host": "another-node", "pid": gone.pid, "renew_s": 300,
                                           "token": "elsewhere"}))
    with pytest.raises(EntryBusy, match=rf"another-node, pid {gone.pid}; its lease renewed \d+ s ago, taken over "
                                        rf"once 900 s late; if that job is dead, remove {entry / LEASE}\)"):
        with lease(str(entry), "s", wait=False):
            pass


def test_a_holder_keeps_its_lease_through_a_storage_hiccup_and_a_lost_file(tmp_path, monkeypatch, capsys):
    """A read that failed once (an S3 503), or a lease file gone (a late holder's delete of a lease it took for its
    own), made the holder give its lease up for the rest of its job: gc and a second job then took its entry."""
    from preprocessing import storage

    entry = tmp_path / "entry"
    real_read, failures = storage.read_bytes, [OSError("S3 503")]

    def flaky(uri):
        if uri.endswith(LEASE) and failures:
            raise failures.pop()
        return real_read(uri)

    monkeypatch.setattr(storage, "read_bytes", flaky)  # the taker's read-back fails first
    monkeypatch.setattr(lease_module, "STALE_RENEWALS", 1000)  # a renewal a loaded CI runs late is not a dead holder
    with lease(str(entry), "s", renew_s=0.05, wait=False):
        token = json.loads((entry / LEASE).read_text())["token"]
        failures.append(OSError("S3 503"))  # and a renewal's
        time.sleep(0.3)  # renewals through the failed read
        (entry / LEASE).unlink()
        time.sleep(0.3)  # written again
        assert json.loads((entry / LEASE).read_text())["token"] == token
        with pytest.raises(EntryBusy):
            with lease(str(entry), "s", wait=False):
                pass
    out = capsys.readouterr().out
    assert "lease not renewed (S3 503)" in out and "taken by another job" not in out


def test_a_lease_renewed_faster_than_it_settles_is_still_taken(tmp_path):
    """Read back older than 3 of its renewals (a skewed clock, a tiny renew_s), its own record looked stale and the
    taker wrote it again for ever."""
    with lease(str(tmp_path / "entry"), "s", renew_s=0.001):
        pass
