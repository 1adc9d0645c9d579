"""Node-local copies of what a process must open as a local file or folder but the job names by an s3:// URI: a
backbone checkpoint, phase I's model folder, an encoder's weights, an evaluated model. A cluster then needs no
shared filesystem: each node fetches what its workers read once, into `MODRWKV_LOCAL_COPIES` (default
~/.cache/modrwkv/local-copies), and fetches it again only when the remote files' names, sizes or modification
times change. Workers of one node wait for one fetch (a file lock) instead of each fetching."""

import fcntl
import hashlib
import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from . import storage

ROOT_ENV = "MODRWKV_LOCAL_COPIES"
LISTING = "listing.json"  # what the copy was fetched from, written once the copy is complete


def copies_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or Path.home() / ".cache" / "modrwkv" / "local-copies")


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
    slot = copies_root() / hashlib.sha256(str(uri).encode()).hexdigest()[:24]
    target = slot / posixpath.basename(str(uri).rstrip("/"))
    slot.mkdir(parents=True, exist_ok=True)
    with node_lock(slot / ".lock"):
        record = slot / LISTING
        if record.is_file() and json.loads(record.read_text()) == listing and target.exists():
            return str(target)
        record.unlink(missing_ok=True)
        replace_whole(target, lambda incoming: storage.copy_tree(uri, str(incoming)))
        record.write_text(json.dumps(listing))
    return str(target)


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
        folder = copies_root().parent / "outputs" / hashlib.sha256(destination.encode()).hexdigest()[:24]
        remove(folder)  # only this run's files are published
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def publish(folder: Path, destination: str, names: tuple[str, ...]) -> None:
    """The named files or folders of a `working_dir` uploaded to its URI `destination`; nothing to do for a local
    destination, which is the folder itself."""
    if storage.is_remote(destination):
        for name in names:
            if (folder / name).exists():
                storage.copy_tree(str(folder / name), storage.join(destination, name))


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
