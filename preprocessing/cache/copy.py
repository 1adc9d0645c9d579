"""Copying complete cache entries to another cache root (a folder or s3://bucket/prefix): each entry's files and,
from its feature store, only the items it references. A subset of a large root travels alone that way: a few
datasets to another cluster's bucket, or the demo's caches to a machine without the data or the encoders.

Store items are content-addressed, so one already at the destination (another entry's, an earlier copy's) is not
copied again; the entry's manifest is written last, so an interrupted copy leaves an unfinished entry that the
next copy completes and `modrwkv cache gc` can clear. Bytes are copied as they are: every item is checked against
the digest in its name whenever training reads it."""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .. import storage
from .entry import MANIFEST, STORE_FOLDER, STORE_KEY_FILE, FeatureCache, entry_name, parse_item_file
from .inventory import referenced_items
from .lease import LEASE, lease, wait_out_sweep


@dataclass
class Copied:
    uri: str  # the entry at the destination
    entry_files: int
    items_copied: int
    items_present: int  # referenced items the destination's store already held
    bytes_copied: int


def same_folder(a: str, b: str) -> bool:
    if storage.is_remote(a) or storage.is_remote(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def copy_entry(uri: str, dest_root: str, threads: int = 8, progress: bool = True) -> Copied:
    cache = FeatureCache(uri)  # refuses an unfinished or old-format entry, with the reason
    if same_folder(storage.parent(cache.uri), dest_root):
        raise ValueError(f"{uri} is already in {dest_root}")
    dest = storage.join(dest_root, entry_name(uri))
    dest_store = storage.join(dest_root, STORE_FOLDER, cache.manifest["feature_store"])
    present = set(storage.list_tree(dest_store))
    items = sorted(referenced_items(cache))
    for name in items:  # from the entry's index, which no checksum covers: never a path out of either store
        parse_item_file(name)
    absent = [name for name in items if name not in present]
    store_files = absent + ([STORE_KEY_FILE] if STORE_KEY_FILE not in present
                            and storage.exists(storage.join(cache.store.uri, STORE_KEY_FILE)) else [])
    # not its lease: one left by a job killed after its manifest would replace the copy's own at the destination
    entry_files = [name for name in storage.list_files(cache.uri)
                   if name not in (MANIFEST, LEASE) and ".tmp-" not in name]
    pairs = ([(storage.join(cache.store.uri, n), storage.join(dest_store, n)) for n in store_files]
             + [(storage.join(cache.uri, n), storage.join(dest, n)) for n in entry_files])

    def copy(pair: tuple[str, str]) -> int:
        data = storage.read_bytes(pair[0])
        storage.write_atomic(pair[1], data)
        return len(data)

    # a lease, as an encode holds: a gc at the destination keeps the items copied (or found) before the manifest; an
    # encode or copy writing the entry there now fails this one (EntryBusy, naming it)
    with lease(dest, cache.manifest["feature_store"], wait=False), \
            ThreadPoolExecutor(threads, thread_name_prefix="cache-copy") as pool:
        copied = sum(tqdm(pool.map(copy, pairs), total=len(pairs), desc=f"copy {entry_name(uri)}", unit="file",
                          disable=not progress))
        if len(items) > len(absent):  # items found at the destination, which a sweep may have listed
            wait_out_sweep(dest_root)
        stats = storage.stat_files([storage.join(dest_store, name) for name in items])
        gone = [uri for uri, stat in stats.items() if stat is None]
        if gone:  # a gc that listed the destination before the lease: the manifest would name missing features
            raise RuntimeError(f"{len(gone)} of the {len(items)} store items copied or found at {dest_root} were "
                               f"removed meanwhile (a `modrwkv cache gc --apply`?), e.g. {gone[0]}; copy again")
        copied += copy((storage.join(cache.uri, MANIFEST), storage.join(dest, MANIFEST)))
    return Copied(dest, len(entry_files) + 1, len(absent), len(items) - len(absent), copied)
