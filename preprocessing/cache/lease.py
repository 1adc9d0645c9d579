"""A running encode's claim on its entry and its store: `gc` keeps what a fresh lease names.

An encode job lists the store's items, reuses those it finds and writes its entry's shards over minutes to hours;
until its manifest exists, nothing else says that those files are in use. The job rewrites `lease.json` in its
entry folder every `RENEW_S` seconds while it works and removes it when it ends; `gc` keeps the files of an entry
whose lease was renewed within its grace (and at least 3 renewals), and every unreferenced item of that store. A
job killed outright leaves a lease that goes stale, and its files are garbage once older than the grace. A gc that
listed the root before a job took its lease may still remove an item the job reuses: the job checks its reused
items before it writes its manifest, and fails naming them (a rerun encodes them again)."""

import json
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .. import storage

LEASE = "lease.json"
RENEW_S = 300.0  # well inside gc's default grace of an hour


@contextmanager
def lease(entry_uri: str, store: str, renew_s: float = RENEW_S) -> Iterator[None]:
    """Holds the lease on `entry_uri` (naming the store it takes items from) while the block runs."""
    path = storage.join(entry_uri, LEASE)
    record = json.dumps({"store": store, "host": socket.gethostname(), "pid": os.getpid()}).encode()
    storage.write_atomic(path, record)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(renew_s):
            try:
                storage.write_atomic(path, record)
            except OSError as e:  # a storage hiccup: the next renewal tries again, long before gc's grace
                print(f"{path}: lease not renewed ({e}); trying again in {renew_s:g} s", flush=True)

    renewing = threading.Thread(target=renew, name="entry-lease", daemon=True)
    renewing.start()
    try:
        yield
    finally:
        stop.set()
        renewing.join()
        storage.delete(path)


def leased_store(entry_uri: str) -> str | None:
    """The store a lease names; None when it is unreadable (half-written: a renewal under way)."""
    try:
        return json.loads(storage.read_bytes(storage.join(entry_uri, LEASE)))["store"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
