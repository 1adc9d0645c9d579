"""What a cache root holds, and what nothing uses: `modrwkv cache ls|du|gc`.

An entry is complete when its manifest exists; its samples reference item files in one store. Garbage is what
no complete entry of the current format references: store items, entries of an older format, unfinished entries,
series records of entries gone, and half-written files. A job may be writing right now (its entry has no manifest
yet, its new items are not referenced yet), so only files older than a grace period count as garbage. A root may
hold other things (a dataset beside its caches): only the files an entry writes count, and a folder without any is
no entry."""

import json
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .. import storage
from .entry import MANIFEST, READABLE_FORMATS, REJECTS, STORE_FOLDER, FeatureCache, entry_name
from .index import INDEX
from .key import FINGERPRINTS_FOLDER
from .lease import LEASE, RENEW_S, leased_store
from .resolved import RESOLVED_FOLDER, read_record

# the files an entry writes at its top, and their half-written forms (`storage.write_atomic`)
ENTRY_FILE = re.compile(rf"(shard-\d+\.(tar|json)|{re.escape(MANIFEST)}|{re.escape(REJECTS)}|{re.escape(INDEX)}|"
                        rf"{re.escape(LEASE)})(\.tmp-[0-9a-f]+)?")
# an entry's folder name (`key.entry_uri`): an unfinished entry is known by it (a finished one by its manifest too)
ENTRY_NAME = re.compile(r"(image|audio|series)-.+-[0-9a-f]{16}")


@dataclass
class Entry:
    name: str
    manifest: dict | None  # None: unfinished (or being written)
    files: dict[str, tuple[int, int]]  # relative name -> (size, mtime_ns)

    @property
    def bytes(self) -> int:
        return sum(size for size, _ in self.files.values())

    @property
    def current(self) -> bool:
        return self.manifest is not None and self.manifest.get("format_version") in READABLE_FORMATS


@dataclass
class Store:
    name: str
    files: dict[str, tuple[int, int]]
    referenced: dict[str, set[str]] = field(default_factory=dict)  # item file -> the entries that reference it

    @property
    def items(self) -> dict[str, tuple[int, int]]:
        return {name: stat for name, stat in self.files.items() if name.endswith(".npy")}


def inventory(root: str) -> tuple[list[Entry], list[Store]]:
    """Every entry and store under `root`, each store item with the complete entries that reference it (read
    from the entries' indexes; a format-2 entry's, from its shards). An entry's files are those it writes; other
    files under `root` are no part of any."""
    tree = storage.list_tree(root)
    by_top: dict[str, dict[str, tuple[int, int]]] = {}
    for path, stat in tree.items():
        top, _, rest = path.partition("/")
        if ENTRY_FILE.fullmatch(rest):
            by_top.setdefault(top, {})[rest] = stat
    stores = {}
    for path, stat in tree.items():
        parts = path.split("/", 2)
        if parts[0] == STORE_FOLDER and len(parts) == 3:
            stores.setdefault(parts[1], Store(parts[1], {})).files[parts[2]] = stat
    entries = []
    for name, files in sorted(by_top.items()):
        if name in (STORE_FOLDER, FINGERPRINTS_FOLDER):
            continue
        manifest = entry_manifest(storage.join(root, name)) if MANIFEST in files else None
        readable = manifest is not None and manifest.get("format_version") in READABLE_FORMATS
        if not ENTRY_NAME.fullmatch(name) and not readable:
            continue  # files named as an entry's in a folder no encode made (a WebDataset, a dataset's manifest)
        entry = Entry(name, manifest, files)
        entries.append(entry)
        if entry.current and entry.manifest["feature_store"] in stores:
            referenced = stores[entry.manifest["feature_store"]].referenced
            for item in referenced_items(FeatureCache(storage.join(root, name))):
                referenced.setdefault(item, set()).add(name)
    return entries, sorted(stores.values(), key=lambda s: s.name)


def entry_manifest(uri: str) -> dict | None:
    """The entry's manifest; None for a file of that name that is no entry's (not JSON, no format version)."""
    try:
        manifest = json.loads(storage.read_bytes(storage.join(uri, MANIFEST)))
    except ValueError:
        return None
    return manifest if isinstance(manifest, dict) and "format_version" in manifest else None


def referenced_items(cache: FeatureCache) -> set[str]:
    if cache.manifest["format_version"] == 2:  # its index holds no item files
        return {item for shard in range(len(cache.shards)) for s in cache.read_samples(shard) for item in s.item_files}
    return set(cache.index(["item_files"])["item_files"].combine_chunks().flatten().to_pylist())


def garbage(root: str, grace_s: float = 3600.0) -> list[str]:
    """The URIs `gc` removes: unreferenced store items, entries of an older format or never finished, series records
    of entries gone, and half-written files, when older than `grace_s` seconds. An entry an encode holds a fresh
    lease on (`lease.py`) is kept whole, and so is every file of the store it takes items from (a store unknown, as
    when the lease is being rewritten: every store's). Nothing reached through a link out of a local root is."""
    return collect(root, grace_s)[0]


def collect(root: str, grace_s: float) -> tuple[list[str], set[str]]:
    """`garbage`'s list, and the entries with a manifest it was made from: `sweep` keeps the items of any entry
    finished since."""
    entries, stores = inventory(root)
    old = time.time_ns() - int(grace_s * 1e9)
    leased, held = in_use(root, grace_s, {e.name: e.files[LEASE][1] for e in entries if LEASE in e.files})
    found = []
    for entry in entries:
        if not entry.current and entry.name not in leased and all(mtime < old for _, mtime in entry.files.values()):
            found += [storage.join(root, entry.name, f) for f in sorted(entry.files)]
    for store in stores:
        if store.name in held or None in held:  # its items being reused, its half-written ones being written
            continue
        for name, (_, mtime) in sorted(store.files.items()):
            unused = (name.endswith(".npy") and name not in store.referenced) or ".tmp-" in name
            if unused and mtime < old:
                found.append(storage.join(root, STORE_FOLDER, store.name, name))
    found = inside(root, found + stale_records(root, {e.name for e in entries if e.current}, old))
    return found, {e.name for e in entries if MANIFEST in e.files}


def finished_entries(root: str) -> set[str]:
    """The entries under `root` with a manifest now: one listing, then one a folder."""
    names = [name for name in storage.list_folders(root) if ENTRY_NAME.fullmatch(name)]
    stats = storage.stat_files([storage.join(root, name, MANIFEST) for name in names])
    return {name for name in names if stats[storage.join(root, name, MANIFEST)] is not None}


def items_in_use(root: str, names: set[str]) -> tuple[set[tuple[str, str]], set[str]]:
    """The (store, item) pairs the entries `names` reference, and the stores of those that cannot be read (their
    whole store kept)."""
    items, stores = set(), set()
    for name in names:
        try:
            cache = FeatureCache(storage.join(root, name))
            items |= {(cache.manifest["feature_store"], item) for item in referenced_items(cache)}
        except (OSError, ValueError, KeyError) as e:
            store = (entry_manifest(storage.join(root, name)) or {}).get("feature_store")
            print(f"note: {name} finished during the sweep but reads as no entry ({e}): "
                  f"{'its store' if store else 'every store'} kept", flush=True)
            stores.add(store)
    return items, stores


def in_use(root: str, grace_s: float, leases: dict[str, int] | None = None) -> tuple[set[str], set[str | None]]:
    """The entries encodes are writing now (a lease renewed within the grace, and at least 3 renewals, whatever the
    grace: 0 included), and the stores they take items from (None: a lease being rewritten, any store). `leases`:
    entry -> its lease's mtime (ns), when a listing has them; else looked up, one request an entry folder, 16 at a
    time."""
    fresh = time.time_ns() - int(max(grace_s, 3 * RENEW_S) * 1e9)
    if leases is None:
        names = [name for name in storage.list_folders(root) if ENTRY_NAME.fullmatch(name)]
        with ThreadPoolExecutor(16, thread_name_prefix="gc-leases") as pool:
            mtimes = pool.map(storage.file_mtime_ns, [storage.join(root, name, LEASE) for name in names])
        leases = {name: mtime for name, mtime in zip(names, mtimes) if mtime is not None}
    leased = {name for name, mtime in leases.items() if mtime >= fresh}
    return leased, {leased_store(storage.join(root, name)) for name in leased}


def inside(root: str, uris: list[str]) -> list[str]:
    """`uris` but those whose file lies out of a local `root` (a folder in it linked to another disk or root):
    deleting through the link would delete another root's files."""
    if storage.is_remote(root):
        return uris
    real_root = os.path.realpath(root)
    return [uri for uri in uris if os.path.realpath(uri).startswith(real_root + os.sep)]


RECHECK_S = 30.0  # how long a sweep deletes before it looks at the leases and manifests again


def sweep(root: str, found: list[str], grace_s: float, recheck_s: float = RECHECK_S,
          listed: set[str] | None = None, on_look: Callable[[], None] = lambda: None) -> list[str]:
    """Deletes `found` (`garbage`'s list, made from the entries with a manifest `listed`: `collect`'s), looking
    again every `recheck_s` seconds for what changed since it was made: an encode that took its lease since (its
    entry and its store kept), an unfinished entry finished since, and the items of any entry finished since (a
    short job's whole lease can fall between two looks). Without `listed`, the entries finished at its first look
    are taken for those; `on_look` is called as each look starts (`lease.SweepMark.look`). Returns what it deleted. A
    job that finishes an entry under a sweep first waits for a look that sees its lease (`lease.wait_out_sweep`), then
    checks what it reuses: a deletion before that look fails it, naming the file (`pipelines/encode.py`,
    `write_entry`; `cache cp`)."""
    prefix = storage.join(root, "_")[:-1]  # root and its separator, as `garbage` joined them
    tops = {uri[len(prefix):].split("/", 1)[0] for uri in found}
    entries = tops - {STORE_FOLDER, RESOLVED_FOLDER}
    unfinished = {top for top in entries if storage.join(root, top, MANIFEST) not in found}
    deleted, looked, reused, reused_stores = [], None, set(), set()
    for uri in found:
        if looked is None or time.monotonic() - looked > recheck_s:
            on_look()
            leased, held = in_use(root, grace_s)
            now = finished_entries(root)
            finished = unfinished & now
            listed = now if listed is None else listed
            items, stores = items_in_use(root, now - listed)
            reused, reused_stores, listed = reused | items, reused_stores | stores, listed | now
            looked = time.monotonic()
        top, _, rest = uri[len(prefix):].partition("/")
        store, _, item = rest.partition("/")
        if top == STORE_FOLDER and ({store, None} & (held | reused_stores) or (store, item) in reused):
            continue
        if top in leased or top in finished:
            continue
        storage.delete(uri)
        deleted.append(uri)
    return deleted


# a series record's name, and its half-written form
RECORD_FILE = re.compile(r"[0-9a-f]{32}\.json(\.tmp-[0-9a-f]+)?")


def stale_records(root: str, current: set[str], old: int) -> list[str]:
    """Series records (`resolved.py`) older than `old` (ns) that name no entry in `current`, or that cannot be read
    (half-written, damaged). A record of a description no run makes again (say from before a code change) names a
    current entry and is kept: a few hundred bytes. Files of other names are not the cache's."""
    folder, found = storage.join(root, RESOLVED_FOLDER), []
    for name, (_, mtime) in sorted(storage.list_tree(folder).items()):
        if mtime < old and RECORD_FILE.fullmatch(name):
            record = read_record(storage.join(folder, name))
            if record is None or entry_name(record["entry"]) not in current:
                found.append(storage.join(folder, name))
    return found


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def describe(root: str, sizes: bool) -> str:
    """`ls` (sizes False) or `du` (sizes True) as a table."""
    entries, stores = inventory(root)
    lines = [f"{'entry':<44} {'status':<10} {'samples':>8} {'rejected':>8}  store"
             + (f" {'samples':>10} {'features':>10}" if sizes else "")]
    by_name = {s.name: s for s in stores}
    for e in entries:
        status = "complete" if e.current else ("unfinished" if e.manifest is None else "old format")
        counts = (e.manifest or {}).get("counts", {})
        store = (e.manifest or {}).get("feature_store", "-")
        line = f"{e.name:<44} {status:<10} {counts.get('written', '-'):>8} {counts.get('rejected', '-'):>8}  {store}"
        if sizes:
            items = by_name[store].items if store in by_name else {}
            used = sum(size for n, (size, _) in items.items() if e.name in by_name[store].referenced.get(n, ()))
            line += f" {human(e.bytes):>10} {human(used):>10}"
        lines.append(line)
    lines.append("")
    lines.append(f"{'store':<44} {'items':>8} {'used':>8}" + (f" {'bytes':>10} {'unused':>10}" if sizes else ""))
    for s in stores:
        line = f"{s.name:<44} {len(s.items):>8} {len(s.referenced):>8}"
        if sizes:
            unused = sum(size for n, (size, _) in s.items.items() if n not in s.referenced)
            line += f" {human(sum(size for size, _ in s.items.values())):>10} {human(unused):>10}"
        lines.append(line)
    return "\n".join(lines)
