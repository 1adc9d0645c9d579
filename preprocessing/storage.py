"""Local paths and s3:// URIs behind one small API (pyarrow.fs). S3 endpoint and credentials come from the
environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), never from configs or logs."""

import errno
import functools
import hashlib
import json
import os
import posixpath
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.fs as pafs

# What the S3 client is built from, by name (values never printed); Ray's workers are given the same.
ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
       "AWS_REGION")
# and how MLflow's client authenticates and reaches its artifacts, which a worker on another node that logs (rank 0)
# or downloads a model needs; not its certificate paths, files of the driver's machine that a node's own settings name
TRACKING_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_AUTH",
                "MLFLOW_TRACKING_AWS_SIGV4", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_S3_ENDPOINT_URL")


def environment() -> dict[str, str]:
    """This process's S3 and MLflow client settings (`ENV`, `TRACKING_ENV`; those set)."""
    return {name: os.environ[name] for name in ENV + TRACKING_ENV if name in os.environ}


class Settings:
    """This process's S3 settings and MLflow client credentials (`environment`), for the Ray workers a job starts
    (a driver given them in its shell passes them on; otherwise workers have only their node's, e.g. an instance
    profile's). They travel as an argument (a
    constructor's, a function's, the train loop config) and are applied first thing in the worker; not in a runtime
    env, whose variables Ray's dashboard and state API show to anyone who can reach them. The repr names the
    variables, never their values (Ray Train shows its loop config as text). Evaluation's actors get the tracking URI,
    which may hold credentials, this way too."""

    def __init__(self, values: dict[str, str]):
        self._values = dict(values)

    def __repr__(self) -> str:
        return f"WorkerSettings({', '.join(sorted(self._values))})"

    def apply(self) -> None:
        """Sets them in this process's environment; S3 and MLflow clients built after it use them."""
        os.environ.update(self._values)


def settings() -> Settings:
    return Settings(environment())


def is_remote(uri: str) -> bool:
    return "://" in str(uri)


def join(base: str, *parts: str) -> str:
    """`parts` under `base`. Under a URI, a part that is absolute or climbs (`..`) is refused: posixpath would turn
    the first into a local path and keep the second in the key, another object than a folder's."""
    if not is_remote(base):
        return str(Path(base, *parts))
    for part in parts:
        if str(part).startswith("/") or ".." in str(part).split("/"):
            raise ValueError(f"{part!r} is not a path under {base}")
    return posixpath.join(str(base), *parts)


def resolve(base_dir: str, path: str) -> str:
    """`path` as given when absolute or a URI, else relative to `base_dir` (a manifest's folder): under a URI,
    climbing (`..`) within its bucket (S3 keys know no `..`: it stayed in the key, another object's name)."""
    if is_remote(path) or Path(path).is_absolute():
        return str(path)
    if is_remote(base_dir):
        scheme, prefix = str(base_dir).rstrip("/").split("://", 1)
        joined = posixpath.normpath(posixpath.join(prefix, path))
        if joined.split("/", 1)[0] != prefix.split("/", 1)[0] or joined.startswith(".."):
            raise ValueError(f"{path!r} climbs out of the bucket of {base_dir}")
        return f"{scheme}://{joined}"
    return join(base_dir, path)


def media_path(root: str, path: str, allow_outside: bool = False) -> str:
    """A dataset's media path resolved against its `root`, refused (ValueError, with the reason) before anything
    is opened when it is absolute or another URI, climbs out of the root with `..`, or (locally) resolves through
    a symlink to a place outside it. `allow_outside` accepts such paths, as `resolve` does."""
    if posixpath.normpath(str(path)) == ".":  # "", ".", "a/..": the root, not a file
        raise ValueError(f"media path {path!r} names the media root {root} itself, not a file in it")
    if allow_outside:
        return resolve(root, path)
    if is_remote(path) or Path(path).is_absolute() or posixpath.isabs(path):
        raise ValueError(f"media path {path!r} is absolute; it must be relative to the media root {root}")
    if is_remote(root):
        try:
            joined = resolve(root, path)
        except ValueError:
            joined = ""
        if not joined.startswith(root.rstrip("/") + "/"):
            raise ValueError(f"media path {path!r} leaves the media root {root}")
        return joined
    try:
        base = Path(root).resolve()
        target = (base / path).resolve()  # follows symlinks
    except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError before Python 3.13), a name too long
        raise ValueError(f"media path {path!r} does not resolve: {e}") from None
    if not target.is_relative_to(base):
        raise ValueError(f"media path {path!r} resolves to {target}, outside the media root {base}")
    return str(Path(root) / path)


def parent(uri: str) -> str:
    """The folder holding `uri`; a folder named with a trailing slash (`s3://b/cache/entry/`) is itself the child."""
    return posixpath.dirname(str(uri).rstrip("/")) if is_remote(uri) else str(Path(uri).parent)


def _fs(uri: str):
    if is_remote(uri):
        scheme, path = str(uri).split("://", 1)
        bucket = path.split("/", 1)[0]
        settings = tuple(os.environ.get(name) for name in ENV)
        return remote_filesystem(f"{scheme}://{bucket}", settings), path
    return pafs.LocalFileSystem(), str(Path(uri).absolute())


def for_ray(uri: str) -> tuple[str, pafs.FileSystem]:
    """(path, filesystem) for Ray Train's storage and checkpoints: the filesystem is built here with this process's
    S3 settings spelled out, so that they travel with it (pickled) to Ray's train controller and workers, which may
    start where none are set; settings this process lacks (an instance profile's credentials) stay each node's."""
    fs, path = _fs(uri)
    if not is_remote(uri):
        return path, fs
    env, options = environment(), {"region": fs.region}  # the bucket's, as this process's client resolved it
    if "AWS_ENDPOINT_URL" in env:
        endpoint = urllib.parse.urlparse(env["AWS_ENDPOINT_URL"])
        options.update(endpoint_override=endpoint.netloc, scheme=endpoint.scheme)
    if "AWS_ACCESS_KEY_ID" in env:
        options.update(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env.get("AWS_SECRET_ACCESS_KEY"),
                       session_token=env.get("AWS_SESSION_TOKEN"))
    return path, pafs.S3FileSystem(**options)


@functools.lru_cache(maxsize=None)
def remote_filesystem(bucket_uri: str, settings: tuple) -> pafs.FileSystem:
    """One client per bucket and settings, per process: building one costs about 9 ms of CPU and does not run in
    parallel across threads, which capped a training worker at about 90 items/s from S3
    (`benchmarks/feature_reader.py`). `settings`: the environment it was built under (a changed endpoint or key
    gets a new client)."""
    return pafs.FileSystem.from_uri(bucket_uri)[0]


def read_bytes(uri: str) -> bytes:
    fs, path = _fs(uri)
    with fs.open_input_file(path) as f:  # on S3 one size lookup and one read (a stream takes a request more)
        return f.read()


def read_json(uri: str):
    """The JSON document at `uri`; a ValueError naming it when its bytes are none (a write a crash cut short)."""
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{uri}: not JSON ({e})") from None


def open_for_reading(uri: str):
    """A seekable file: readers of columnar files fetch only the parts they need (ranged reads on S3)."""
    fs, path = _fs(uri)
    return fs.open_input_file(path)


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def file_mtime_ns(uri: str) -> int | None:
    """A file's modification time in ns (one request: HEAD on S3), None when there is none."""
    fs, path = _fs(uri)
    info = fs.get_file_info(path)
    return info.mtime_ns if info.type == pafs.FileType.File else None


def listing(uri: str, recursive: bool = False) -> tuple[str, list[pafs.FileInfo]]:
    """A folder's path in its filesystem and what is in it (recursively: everything under it); nothing when the
    folder does not exist. On S3, one listing (of its prefixes, not recursive)."""
    fs, path = _fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return path, []
    if recursive and not is_remote(uri):  # pyarrow's enters every linked folder, a loop's without end
        return path, local_listing(path, recursive)
    found = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    try:
        for info in found:
            info.path  # noqa: B018 - decoded on reading
        return path, found
    except UnicodeDecodeError:  # a local name that is not UTF-8 (an old zip's): pyarrow names none of the others
        return path, local_listing(path, recursive)


def local_listing(path: str, recursive: bool) -> list[pafs.FileInfo]:
    """A local folder's `listing` from the operating system's own: each name that is not UTF-8 (no record or
    transcript can name it) is left out and said so, where pyarrow's listing failed for the whole folder. Recursive,
    each folder is entered once, and a folder linked into the tree from inside it not at all: its files are listed
    where they are (pyarrow's listed an aliased dataset folder twice, and a loop's without end)."""
    root = os.path.realpath(path)
    entered = {root}

    def folder(current: str) -> list[pafs.FileInfo]:
        found = []
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)  # which of two links is entered: the first
        except (FileNotFoundError, NotADirectoryError):  # gone since it was listed
            return found
        for entry in entries:
            try:
                entry.name.encode("utf-8")
            except UnicodeEncodeError:
                print(f"{os.fsencode(entry.path)!r}: its name is not UTF-8; left out of the listing", flush=True)
                continue
            try:
                if entry.is_dir():
                    found.append(pafs.FileInfo(entry.path, pafs.FileType.Directory))
                    real = os.path.realpath(entry.path)
                    alias = entry.is_symlink() and (real + os.sep).startswith(root + os.sep)
                    if recursive and not alias and real not in entered:
                        entered.add(real)
                        found += folder(entry.path)
                elif entry.is_file():
                    stat = entry.stat()
                    found.append(pafs.FileInfo(entry.path, pafs.FileType.File, size=stat.st_size,
                                               mtime_ns=stat.st_mtime_ns))
            # as pyarrow's: left out, a file renamed or removed since the folder was read (a writer's temporary
            # file), or a link that leads to itself
            except OSError as e:
                if not isinstance(e, (FileNotFoundError, NotADirectoryError)) and e.errno != errno.ELOOP:
                    raise
        return found

    return folder(path)


def list_files(uri: str) -> list[str]:
    """Names of the files directly inside a folder (empty when the folder does not exist)."""
    return sorted(posixpath.basename(i.path) for i in listing(uri)[1] if i.type == pafs.FileType.File)


def is_folder(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_folders(uri: str) -> list[str]:
    """Names of the folders directly inside a folder (empty when the folder does not exist)."""
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in listing(uri)[1] if i.type == pafs.FileType.Directory)


def write_atomic(uri: str, data: bytes) -> None:
    """A reader never sees a half-written file. An S3 object appears whole when its upload completes, so it is
    written in place, one request (a temporary name and a move add a copy and a delete: 1.7x the time an item on the
    local endpoint, and S3 needs no folders); a local file is written under a temporary name, then renamed."""
    fs, path = _fs(uri)
    if is_remote(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def copy_tree(source: str, destination: str) -> None:
    """A file, or a folder with everything under it, copied between local paths and URIs (large files in parallel
    parts); what was at `destination` under the same names is replaced."""
    source_fs, source_path = _fs(source)
    destination_fs, destination_path = _fs(destination)
    kind = source_fs.get_file_info(source_path).type
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{source}: no such file or folder")
    if kind == pafs.FileType.Directory:  # copy_files makes only the subfolders it lists
        destination_fs.create_dir(destination_path, recursive=True)
    pafs.copy_files(source_path, destination_path, source_filesystem=source_fs,
                    destination_filesystem=destination_fs)


def delete(uri: str) -> None:
    fs, path = _fs(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def walk(uri: str, suffix: str | tuple[str, ...]) -> list[str]:
    """Every file under a folder, recursively, whose name ends with `suffix` (or one of them), as paths relative to
    the folder (what `media_path` takes), sorted."""
    if not is_folder(uri):
        raise FileNotFoundError(f"{uri}: not a folder")
    return sorted(name for name in list_tree(uri) if name.endswith(suffix))


def stat_files(uris: list[str]) -> dict[str, tuple[int, int] | None]:
    """(size, modification time in ns) of each file, None where there is none. One listing per folder (on S3,
    one request per 1,000 files) instead of one request per file."""
    by_folder: dict[str, list[str]] = {}
    for uri in uris:
        by_folder.setdefault(parent(uri), []).append(uri)
    stats = {}
    for folder, members in by_folder.items():
        listed = {posixpath.basename(i.path): (i.size, i.mtime_ns) for i in listing(folder)[1]
                  if i.type == pafs.FileType.File}
        stats.update({uri: listed.get(posixpath.basename(str(uri))) for uri in members})
    return stats


def list_tree(uri: str) -> dict[str, tuple[int, int]]:
    """Every file under a folder, recursively: its path relative to the folder -> (size, modification time in ns);
    empty when the folder does not exist."""
    path, found = listing(uri, recursive=True)
    base = path.rstrip("/") + "/"
    return {i.path[len(base):]: (i.size, i.mtime_ns) for i in found if i.type == pafs.FileType.File}


def file_sha256(uri: str) -> str | None:
    try:
        return hashlib.sha256(read_bytes(uri)).hexdigest()
    except FileNotFoundError:  # gone since it was listed; any other error (storage failing) is raised, not a reject
        return None


class Fingerprints:
    """sha256 of files, each read again only when it changes: for each folder, its files' (size, modification
    time, sha256) are recorded in `<records>/<hash of the folder's URI>.json`, and a file whose size and
    modification time match its record is not read. (Like make and git, this trusts that a rewrite changes the
    modification time or the size.) Unchanged data costs a listing per folder: on S3, a request per 1,000 files.
    A first pass over a big folder (LLaVA's 558K images sit in one) shows its progress and saves its record every
    `save_every_s` and when interrupted, so a killed job's next run reads only the files not hashed yet."""

    progress_from = 1000  # files to hash in one folder from which a progress bar shows

    def __init__(self, records: str, save_every_s: float = 60.0):
        self.root, self.save_every_s = records, save_every_s
        self.files_read = 0  # how many files the last calls had to hash (a benchmark and test reading)

    def record_uri(self, folder: str) -> str:
        return join(self.root, hashlib.sha256(str(folder).encode()).hexdigest()[:32] + ".json")

    def sha256s(self, uris: list[str]) -> dict[str, str | None]:
        """uri -> the sha256 of its bytes, or None when there is no such file."""
        stats = stat_files(sorted(set(uris)))
        by_folder: dict[str, list[str]] = {}
        for uri in stats:
            by_folder.setdefault(parent(uri), []).append(uri)
        digests = {}
        for folder, members in by_folder.items():
            record_uri = self.record_uri(folder)
            try:  # a damaged record (a crash during its write) is none: its files are hashed again
                record = read_json(record_uri) if exists(record_uri) else {}
            except ValueError:
                record = {}
            changed = []
            for uri in members:
                name, stat = posixpath.basename(str(uri)), stats[uri]
                known = record.get(name)
                if stat is None:
                    digests[uri] = None
                elif known and (known[0], known[1]) == stat:
                    digests[uri] = known[2]
                else:
                    changed.append(uri)
            if changed:
                self.hash_changed(folder, changed, stats, record, digests)
        return digests

    def forget(self, uris: list[str]) -> None:
        """Drops these files' records: each is hashed again the next time, whatever its size and modification time
        (a file rewritten keeping both, whose recorded sha256 is no longer its bytes')."""
        by_folder: dict[str, list[str]] = {}
        for uri in uris:
            by_folder.setdefault(parent(uri), []).append(posixpath.basename(str(uri)))
        for folder, names in by_folder.items():
            record_uri = self.record_uri(folder)
            try:
                record = read_json(record_uri) if exists(record_uri) else {}
            except ValueError:  # damaged: its files are hashed again anyway
                continue
            if any(name in record for name in names):
                write_atomic(record_uri, json.dumps({k: v for k, v in record.items() if k not in names},
                                                    sort_keys=True).encode())

    def hash_changed(self, folder: str, changed: list[str], stats: dict, record: dict, digests: dict) -> None:
        """Reads and hashes `changed` (8 at a time), adding each to `record` and `digests`; the record is saved
        every `save_every_s`, at the end, and on the way out of an interruption."""
        from tqdm import tqdm  # here: only a folder with new or changed files needs it

        def save():
            write_atomic(self.record_uri(folder), json.dumps(record, sort_keys=True).encode())

        saved_at, pool = time.monotonic(), ThreadPoolExecutor(8)
        bar = tqdm(total=len(changed), desc=f"sha256 of {folder}", unit="file",
                   disable=len(changed) < self.progress_from)
        try:
            for uri, digest in zip(changed, pool.map(file_sha256, changed)):
                digests[uri] = digest
                if digest is not None:
                    record[posixpath.basename(str(uri))] = [*stats[uri], digest]
                self.files_read += 1
                bar.update()
                if time.monotonic() - saved_at >= self.save_every_s:
                    save()
                    saved_at = time.monotonic()
        finally:
            pool.shutdown(cancel_futures=True)  # interrupted: the reads not started yet are dropped, not waited for
            bar.close()
            save()
