"""A running encode's claim on its entry and its store: one writer an entry, and `gc` keeps what a fresh lease names.

An encode job lists the store's items, reuses those it finds and writes its entry's shards over minutes to hours;
until its manifest exists, nothing else says that those files are in use. The job rewrites `lease.json` in its
entry folder every `RENEW_S` seconds while it works and removes it when it ends; `gc` keeps the files of an entry
whose lease was renewed within its grace (and at least 3 renewals), and every unreferenced item of that store. A
job killed outright leaves a lease that goes stale, and its files are garbage once older than the grace. A gc that
listed the root before a job took its lease may still remove an item the job reuses, until its next look at the
leases: under a sweep (`sweeping`: a mark at the root) the job waits for such a look before it checks its reused items
(`wait_out_sweep`), then writes its manifest or fails naming them (a rerun encodes them again); and the sweep keeps
the items of any entry finished since its listing (`inventory.sweep`).

A lease is exclusive: a job that finds another's lease renewed within 3 of its holder's renewals waits for it (or,
asked not to, fails naming the holder); a lease of a process of this host that is gone is a killed job's, taken over
at once. Neither a local disk nor S3 gives every writer an atomic create, so a taker
writes its record, waits `SETTLE_S` for a rival's write to land, and reads it back: of two jobs that both found the
entry free, the one whose record is read back goes on, the other waits. Two takers collide only if one took longer
than the settling time between finding the entry free and writing."""

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .. import storage

LEASE = "lease.json"
RENEW_S = 300.0  # well inside gc's default grace of an hour
SETTLE_S = {False: 0.05, True: 2.0}  # local disk, S3: well past the time between a check and a write
STALE_RENEWALS = 3  # a holder this many renewals late is taken to be dead


class EntryBusy(OSError):
    """Another job holds the entry's lease (an OSError, as a file another holds is: the CLI's one-line error)."""


class _Unread(Exception):
    """A record could not be read (a storage error, or a half-written file): who holds the lease is not known."""


def _record(path: str) -> dict | None:
    """The JSON record at `path` (a lease, a sweep's mark); None when there is none; _Unread when it cannot be read."""
    try:
        record = storage.read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise _Unread(str(e)) from e
    if not isinstance(record, dict):
        raise _Unread(f"{path}: not a JSON object")
    return record


def _record_and_age(path: str) -> tuple[dict, float] | None:
    """The record at `path` and the seconds since it was written; None when there is none (let go since the look);
    {} while it cannot be read (half-written: a renewal under way)."""
    mtime_ns = storage.file_mtime_ns(path)
    if mtime_ns is None:
        return None
    try:
        record = _record(path)
    except _Unread:
        record = {}
    return None if record is None else (record, time.time() - mtime_ns / 1e9)


def _holder(path: str) -> tuple[dict, float] | None:
    """The live lease at `path` (its record, seconds since renewed); None when there is none, or a stale one."""
    found = _record_and_age(path)
    if found is None:
        return None
    record, age_s = found  # a half-written one is held: a renewal under way
    if age_s >= STALE_RENEWALS * float(record.get("renew_s", RENEW_S)) or _died_here(record):
        return None
    return record, age_s


def _pid_namespace() -> str | None:
    """This process's PID namespace ("pid:[4026531836]"); None where /proc has none (not Linux)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _died_here(record: dict) -> bool:
    """Whether the lease is a process's of this host that is gone (a job killed outright: its rerun goes on at
    once, rather than wait out the renewals). Containers sharing the host's name (host networking) do not share
    its PIDs: only a lease of this PID namespace is looked up."""
    if (record.get("host") != socket.gethostname() or record.get("pid_namespace", False) != _pid_namespace()
            or not isinstance(record.get("pid"), int)):
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's, alive
        pass
    return False


def _describe(path: str, record: dict, age_s: float) -> str:
    renew_s = float(record.get("renew_s", RENEW_S))
    return (f"{storage.parent(path)} is being written by another job ({record.get('host', '?')}, pid "
            f"{record.get('pid', '?')}; its lease renewed {age_s:.0f} s ago, taken over once "
            f"{STALE_RENEWALS * renew_s:.0f} s late; if that job is dead, remove {path})")


def _take(path: str, record: dict, wait: bool, poll_s: float) -> None:
    """Writes `record` as the lease once no live holder has one: waits for the holder, or raises EntryBusy."""
    waiting, settle_s = False, SETTLE_S[storage.is_remote(path)]
    while True:
        found = _holder(path)
        if found is not None and found[0].get("token") == record["token"]:  # ours, read back on a later look
            return
        if found is None:
            storage.write_atomic(path, json.dumps(record).encode())
            time.sleep(settle_s)
            try:
                if _token(path) == record["token"]:  # ours read back, however old its time looks (a skewed clock)
                    return
            except _Unread:  # a storage hiccup: look again
                time.sleep(settle_s)
                continue
            found = _holder(path)
        if found is None:  # a rival let go meanwhile: try again
            continue
        if not wait:
            raise EntryBusy(_describe(path, *found) + "; run again when it ends")
        if not waiting:
            print(_describe(path, *found) + "; waiting for it to end", flush=True)
            waiting = True
        time.sleep(poll_s)


def _token(path: str) -> str | None:
    """The token of the lease at `path`; None when there is none; _Unread when it cannot be read."""
    return (_record(path) or {}).get("token")


@contextmanager
def _repeating(every_s: float, step: Callable[[], bool], name: str) -> Iterator[None]:
    """Runs `step` every `every_s` seconds in a thread of its own while the block runs, until it returns False."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every_s) and step():
            pass

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def lease(entry_uri: str, store: str, renew_s: float = RENEW_S, wait: bool = True,
          poll_s: float = 10.0) -> Iterator[None]:
    """Holds the lease on `entry_uri` (naming the store it takes items from) while the block runs; a live lease of
    another job's is waited for (`wait`) or raises EntryBusy."""
    path = storage.join(entry_uri, LEASE)
    record = {"store": store, "host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace(),
              "renew_s": renew_s, "token": uuid.uuid4().hex}
    _take(path, record, wait, poll_s)
    data = json.dumps(record).encode()

    def renew() -> bool:
        try:
            token = _token(path)
            if token not in (None, record["token"]):  # another job's: it took this one's for dead
                print(f"{path}: this job's lease was taken by another job (this one was {STALE_RENEWALS} "
                      "renewals late); both now write this entry", flush=True)
                return False
            storage.write_atomic(path, data)  # renewed, or written again where it went missing
        except (OSError, _Unread) as e:  # a storage hiccup: the next renewal tries again, long before gc's grace
            print(f"{path}: lease not renewed ({e}); trying again in {renew_s:g} s", flush=True)
        return True

    try:
        with _repeating(renew_s, renew, "entry-lease"):
            yield
    finally:
        try:
            if _token(path) == record["token"]:  # never a lease another job has taken since
                storage.delete(path)
        except _Unread:
            pass  # left to go stale: gc and the next job treat it as any dead job's


def leased_store(entry_uri: str) -> str | None:
    """The store a lease names; None when it is unreadable (half-written: a renewal under way)."""
    try:
        return (_record(storage.join(entry_uri, LEASE)) or {}).get("store")
    except _Unread:
        return None


SWEEP = "gc-sweep.json"  # at a cache root while `modrwkv cache gc --apply` lists and deletes there


class SweepMark:
    """The mark a sweep keeps at its root: alive (rewritten every `recheck_s`) and counting the sweep's looks at the
    leases, each counted as it starts (`look`)."""

    def __init__(self, root: str, recheck_s: float):
        self.path, self.recheck_s, self.looks = storage.join(root, SWEEP), recheck_s, 0

    def write(self) -> None:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "recheck_s": self.recheck_s, "looks": self.looks}
        storage.write_atomic(self.path, json.dumps(record).encode())

    def look(self) -> None:
        """A look at the leases starts: a job whose lease was written before it is seen by it."""
        self.looks += 1
        self.write()


@contextmanager
def sweeping(root: str, recheck_s: float) -> Iterator[SweepMark]:
    """Marks `root` as swept by a gc (its listing, then its deletions, which look at the leases again every
    `recheck_s`) while the block runs: a job that finishes an entry there meanwhile waits for one of those looks to
    start before its last check of the files it reuses (`wait_out_sweep`)."""
    mark = SweepMark(root, recheck_s)
    mark.write()

    def renew() -> bool:
        try:
            mark.write()
        except OSError as e:  # a storage hiccup: the next renewal tries again
            print(f"{mark.path}: not renewed ({e})", flush=True)
        return True

    try:
        with _repeating(recheck_s, renew, "gc-sweep"):
            yield mark
    finally:
        storage.delete(mark.path)


def _sweep_looks(path: str) -> tuple[int, float] | None:
    """(looks, recheck_s) of a live sweep's mark; None without one (or a killed gc's, 3 renewals late)."""
    found = _record_and_age(path)
    if found is None:
        return None
    record, age_s = found
    try:
        looks, recheck_s = int(record["looks"]), float(record["recheck_s"])
    except (KeyError, TypeError, ValueError):  # half-written: a renewal under way, look again
        return -1, 1.0
    return None if age_s > 3 * recheck_s else (looks, recheck_s)


def wait_out_sweep(root: str) -> None:
    """Called by a job, under its lease, just before its last check of the files it reuses (then its manifest). A gc
    that listed the root before the lease deletes on until its next look at the leases: while a gc sweeps `root`, the
    job waits until a look has started since this call (so after the lease), by which time every deletion made
    without seeing the lease has happened, and the check names it. A gc that starts later finds the lease, or the
    manifest; one killed leaves a mark that goes stale."""
    path = storage.join(root, SWEEP)
    found = _sweep_looks(path)
    if found is None:
        return
    print(f"{root} is being swept by `modrwkv cache gc --apply`: waiting for it to see this job's lease", flush=True)
    first = found[0]
    while found is not None and (first < 0 or found[0] <= first):
        time.sleep(min(5.0, found[1]))
        found = _sweep_looks(path)
        if first < 0 and found is not None:
            first = found[0]
