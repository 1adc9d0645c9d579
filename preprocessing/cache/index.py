"""An entry's per-sample index (`index.parquet`): one row per sample, in shard order, with what is needed before
any shard is read: its shard, key, text tokens, the feature vectors of each item and the item files it
references. Columnar, so a million-sample entry opens in a fraction of a second, without its sample lists in
the manifest (which `json.loads` would parse on every start, in every worker): counting the samples over a
context length reads two columns; finding which store items are in use (`modrwkv cache ls|gc`) reads one.

Entries of format 2 kept the keys and lengths in the manifest, item files only in the shards; `from_manifest`
reads them the same way (without item files)."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import storage

INDEX = "index.parquet"
SCHEMA = pa.schema([("shard", pa.int32()), ("key", pa.string()), ("text_tokens", pa.int32()),
                    ("item_tokens", pa.list_(pa.int32())), ("item_files", pa.list_(pa.string()))])


def index_table(receipts: list[dict]) -> pa.Table:
    """From the shards' receipts (`CacheEntry.write_shard`), in shard order."""
    columns = {"shard": [], "key": [], "text_tokens": [], "item_tokens": [], "item_files": []}
    for receipt in receipts:
        columns["shard"] += [receipt["index"]] * receipt["count"]
        columns["key"] += receipt["keys"]
        columns["text_tokens"] += [text for text, _ in receipt["lengths"]]
        columns["item_tokens"] += [items for _, items in receipt["lengths"]]
        columns["item_files"] += receipt["item_files"]
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def write_index(entry_uri: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_atomic(storage.join(entry_uri, INDEX), buffer.getvalue())


def read_index(entry_uri: str, columns: list[str] | None = None) -> pa.Table:
    with storage.open_for_reading(storage.join(entry_uri, INDEX)) as f:  # only these columns' bytes are read
        return pq.read_table(f, columns=columns)


def from_manifest(manifest: dict) -> pa.Table:
    """A format-2 entry's index, from its manifest's per-shard lists (it records no item files here)."""
    receipts = [{"index": i, "count": s["count"], "keys": s["keys"], "lengths": s["lengths"],
                 "item_files": [None] * s["count"]} for i, s in enumerate(manifest["shards"])]
    return index_table(receipts)


def total_tokens(table: pa.Table, compressed=lambda n: n) -> np.ndarray:
    """Each sample's text tokens plus its items' `compressed` feature lengths, [samples]."""
    return table["text_tokens"].to_numpy().astype(np.int64) + item_sums(table, compressed)


def item_sums(table: pa.Table, per_item) -> np.ndarray:
    """Each sample's sum of `per_item(n)` (an int) over its items' feature lengths n, [samples]."""
    items = table["item_tokens"].combine_chunks()
    lengths = pc.list_flatten(items).to_numpy(zero_copy_only=False).astype(np.int64)
    owners = pc.list_parent_indices(items).to_numpy(zero_copy_only=False)
    distinct = np.unique(lengths)  # a handful of lengths: `per_item` is called once each
    mapped = np.array([per_item(int(n)) for n in distinct], dtype=np.int64)
    values = mapped[np.searchsorted(distinct, lengths)] if len(lengths) else lengths
    return np.bincount(owners, weights=values, minlength=table.num_rows).astype(np.int64)
