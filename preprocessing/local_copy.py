"""Node-local copies of what a process must open as a local file or folder but the job names by a URI: a backbone
checkpoint, phase I's model folder, an encoder's weights, an evaluated model on S3, a logged model (`models:/...`,
`pipelines/logged_models.py`). A cluster then needs no shared filesystem: each node fetches what its workers read
once, into `MODRWKV_LOCAL_COPIES` (default ~/.cache/modrwkv/local-copies), and fetches it again only when the remote
version changes (an S3 folder: its files' names, sizes or modification times), into a folder of its own: a process
still reading the version it was handed keeps it whole. Workers of one node wait for one fetch (a file lock) instead
of each fetching.

Nothing here is removed by itself but a source's other versions no process holds (at its next use): `node_folders`
lists this node's copies (with their source and last use) and the outputs staged for upload beside them, `prune`
removes those unused for a while (`modrwkv cache local`), never a staged output that was not uploaded, and never a
copy a living process was handed: each process holds a shared lock on every copy it got until it exits (or calls
`release_copies`), however long ago it opened it."""

import fcntl
import hashlib
import json
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from . import storage

ROOT_ENV = "MODRWKV_LOCAL_COPIES"
LISTING = "listing.json"  # what the copy was fetched from, written once the copy is complete; touched at each use
SOURCE = "source.txt"  # the URI the copy is of
LOCK = ".lock"  # the copy's fetch lock (`node_lock`), kept when the copy is pruned: a worker may be waiting on it
IN_USE = ".in-use"  # shared-locked by each process handed the copy (`hold`), also kept when the copy is pruned
UPLOADED = "uploaded.txt"  # in a staged output: the URI `publish` uploaded it to, written once it has


def copies_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or Path.home() / ".cache" / "modrwkv" / "local-copies")


def outputs_root() -> Path:
    """Where `working_dir` stages what goes to a remote destination."""
    return copies_root().parent / "outputs"


def remote_listing(uri: str) -> dict[str, list[int]]:
    """A file's (size, modification time) under the name "", or each file's under a folder by relative path;
    empty when there is nothing at `uri`."""
    if storage.exists(uri):
        return {"": list(storage.stat_files([uri])[uri])}
    return {name: list(stat) for name, stat in storage.list_tree(uri).items()}


def local_copy(uri: str) -> str:
    """`uri` itself when it is a local path; for a remote file or folder, the path of its local copy, fetched now
    unless an up-to-date one is there."""
    if not storage.is_remote(uri):
        return str(uri)
    listing = remote_listing(uri)
    if not listing:
        raise FileNotFoundError(f"{uri}: no such file or folder")
    name = posixpath.basename(str(uri).rstrip("/"))
    return str(node_copy(uri, name, listing, lambda incoming: storage.copy_tree(uri, str(incoming))))


def local_configs(uri: str) -> str:
    """A model folder's top-level JSON files (its config and its processor's settings: all an encoder's host half
    reads): `uri` itself when it is a local path, else this node's copy of those files alone, without the weights."""
    if not storage.is_remote(uri):
        return str(uri)
    listing = {name: list(stat) for name, stat in storage.list_tree(uri).items()
               if "/" not in name and name.endswith(".json")}
    if not listing:
        raise FileNotFoundError(f"{uri}: no config files (*.json) at the top of that folder")

    def fetch(incoming: Path) -> None:
        incoming.mkdir()
        for name in listing:
            storage.copy_tree(storage.join(uri, name), str(incoming / name))

    return str(node_copy(f"{uri} (configs)", posixpath.basename(uri.rstrip("/")), listing, fetch))


def node_copy(source: str, name: str, listing: dict, fetch: Callable[[Path], None]) -> Path:
    """This node's copy of the version of `source` (a URI: s3://..., models:/...) that `listing` identifies, the
    path `<slot>/<name>`, a slot per version: `fetch(path)` writes it unless the slot holds a complete copy.
    Processes of the node wait for one fetch; each use counts as the copy's last use, for `prune`; this process
    holds the copy (`hold`) until it exits. The source's other versions are removed unless a process holds one."""
    version = json.dumps([str(source), listing], sort_keys=True)
    slot = copies_root() / hashlib.sha256(version.encode()).hexdigest()[:24]
    # a remote file named like the slot's own records goes one folder down, never over them
    target = slot / "copy" / name if name in (LISTING, SOURCE, LOCK, IN_USE) else slot / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with node_lock(slot / LOCK):
        record = slot / LISTING
        if record.is_file() and target.exists():
            os.utime(record)
        else:
            record.unlink(missing_ok=True)
            replace_whole(target, fetch)
            (slot / SOURCE).write_text(str(source))
            record.write_text(json.dumps(listing))
        hold(slot)
    # after this slot's lock is released: a process holding one lock never waits for another
    for other in copies_root().iterdir():
        if other != slot and read_if_there(other / SOURCE) == str(source):
            empty_slot(other)
    return target


def read_if_there(path: Path) -> str | None:
    """A slot's record, or None when there is none: another process may be emptying the slot as this one looks."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


_held: dict[Path, IO] = {}  # slot -> its open IN_USE file, shared-locked while this process lives


def hold(slot: Path) -> None:
    """This process uses the copy in `slot`: a shared lock on its IN_USE file, which `prune` cannot take
    exclusively until every holder has exited (the kernel drops a dead process's locks) or released it."""
    if slot not in _held:
        in_use = open(slot / IN_USE, "a")
        fcntl.flock(in_use, fcntl.LOCK_SH)
        _held[slot] = in_use


def release_copies() -> None:
    """This process no longer reads the copies it was handed (it loaded them, say): `prune` may remove them."""
    while _held:
        _held.popitem()[1].close()


def in_use(slot: Path) -> bool:
    """Whether a living process (this one included) holds the copy in `slot`."""
    if not (slot / IN_USE).is_file():
        return False
    with open(slot / IN_USE, "a") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def empty_slot(slot: Path, still_unused: Callable[[], bool] = lambda: True) -> bool:
    """Removes the copy in `slot`, under its fetch lock, unless a living process holds it, it is incomplete, or
    `still_unused()` says it was used meanwhile; its LOCK and IN_USE files stay (a worker may be waiting on them)."""
    with node_lock(slot / LOCK):
        if not (slot / LISTING).is_file() or in_use(slot) or not still_unused():
            return False
        (slot / LISTING).unlink()  # first: a removal cut short leaves a copy `node_copy` fetches again, not reuses
        for entry in slot.iterdir():
            if entry.name not in (LOCK, IN_USE):
                remove(entry)
    return True


@contextmanager
def node_lock(path: Path):
    """One process of the node at a time inside (an exclusive file lock at `path`, released when the file closes,
    also when its process dies): the others wait, then find the fetch done."""
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def replace_whole(target: Path, fetch: Callable[[Path], None]) -> None:
    """`fetch(path)` writes a new file or folder at a fresh path beside `target`, which then takes its place: a fetch
    cut short leaves no partial `target`."""
    incoming = target.parent / f"incoming-{uuid.uuid4().hex[:8]}"
    try:
        fetch(incoming)
        remove(target)
        incoming.rename(target)
    finally:
        remove(incoming)


def working_dir(destination: str) -> Path:
    """The local folder (created) to write what goes to `destination` in: the destination itself when it is a
    local path; for a URI, an emptied folder beside the node's local copies, for `publish` to upload."""
    if not storage.is_remote(destination):
        folder = Path(destination)
    else:
        folder = outputs_root() / hashlib.sha256(destination.encode()).hexdigest()[:24]
        remove(folder)  # only this run's files are published
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def publish(folder: Path, destination: str, names: tuple[str, ...]) -> None:
    """The named files or folders of a `working_dir` uploaded to its URI `destination`, a folder there left as this
    one is; nothing to do for a local destination, which is the folder itself."""
    if storage.is_remote(destination):
        for name in names:
            local, remote = folder / name, storage.join(destination, name)
            if local.is_dir():  # the folder replaced, not merged: an earlier save's file would be read with these
                kept = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
                for stale in set(storage.list_tree(remote)) - kept:
                    storage.delete(storage.join(remote, stale))
            if local.exists():
                storage.copy_tree(str(local), remote)
        (folder / UPLOADED).write_text(destination)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@dataclass
class NodeFolder:
    """A local copy (`source`: the URI it copies) or a staged output (`source` None) on this node's disk."""

    path: Path
    source: str | None
    bytes: int
    last_used: float  # seconds since the epoch: a copy's last fetch or use, an output's last write
    uploaded: bool = True  # False: a staged output never uploaded (a failed run's), maybe the only copy of its files
    in_use: bool = False  # a copy a living process was handed (`hold`): never pruned


def node_folders() -> list[NodeFolder]:
    """This node's local copies and staged outputs, least recently used first."""
    found = []
    for slot in sorted(copies_root().glob("*")) if copies_root().is_dir() else []:
        try:  # a slot being fetched, or emptied (by this node's other processes, now too): only its lock is left
            last_used = (slot / LISTING).stat().st_mtime
        except FileNotFoundError:
            continue
        source = read_if_there(slot / SOURCE)  # None: a copy from before SOURCE, or one emptied since the look
        found.append(NodeFolder(slot, source or "(remote not recorded)", tree_stats(slot)[0], last_used,
                                in_use=in_use(slot)))
    for folder in sorted(outputs_root().glob("*")) if outputs_root().is_dir() else []:
        found.append(NodeFolder(folder, None, *tree_stats(folder), (folder / UPLOADED).is_file()))
    return sorted(found, key=lambda f: f.last_used)


def prune(unused_for_s: float, apply: bool = False) -> list[NodeFolder]:
    """The node folders unused for `unused_for_s`, a staged output only once uploaded, a copy only when no living
    process holds it; with `apply`, those removed (a copy under its fetch lock, so a worker fetching it waits, then
    fetches it again; one used or held since it was listed stays)."""
    stale = [f for f in node_folders()
             if f.uploaded and not f.in_use and time.time() - f.last_used >= unused_for_s]
    if not apply:
        return stale
    removed = []
    for folder in stale:
        if folder.source is None:
            remove(folder.path)
            removed.append(folder)
            continue
        if empty_slot(folder.path, lambda: time.time() - (folder.path / LISTING).stat().st_mtime >= unused_for_s):
            removed.append(folder)
    return removed


def tree_stats(folder: Path) -> tuple[int, float]:
    """The bytes of a folder's files and the latest modification time of it and everything under it; what vanishes
    while it is walked (a job writing its outputs) is left out."""
    size, latest = 0, 0.0
    for root, _, files in os.walk(folder):  # os.walk skips a folder that vanished
        for path in [root, *(os.path.join(root, name) for name in files)]:
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue
            size += stat.st_size if path != root else 0
            latest = max(latest, stat.st_mtime)
    return size, latest
