"""Opening a paper-sized cache entry: the per-sample index (`index.parquet`, format 3) against the per-sample lists
in the manifest (format 2), for LLaVA's 558K + 665K samples as one 1.2M-sample entry.

The entry is synthetic: records and lengths only (no shards, no features: opening reads neither). Per sample a key,
40-80 text tokens, one SigLIP2 item of 192-256 vectors and its store file name, in shards of 1,024 samples (the
paper recipes' `cache.shard_size`). Format 3 is written by the encode job's own `CacheEntry.finish` from one
receipt per shard; format 2 is the manifest that code wrote before, the same samples.

Each measurement runs in a fresh Python (peak memory is the process's): opening the entry for training
(`FeatureCache`, its sample count and the over-length count at 2,048 tokens: what a training driver and each worker
read at start-up), and the store items it uses (what `modrwkv cache ls|gc` read; a format-2 entry reads every
shard for them, which this synthetic entry has not: not measured).

    python benchmarks/cache_index.py [--samples 1200000] [--out benchmarks/out]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # run as a script: import the project's packages, not this folder's modules

from benchmarks.report import write_report  # noqa: E402
from pipelines.environment import cpu_description  # noqa: E402
from preprocessing.cache.entry import MANIFEST, CacheEntry  # noqa: E402

SHARD_SIZE = 1024
MAX_LENGTH = 2048

MEASURE = {  # what each fresh process does with the entry at argv[1]
    "open for training": "cache = FeatureCache(uri); n = len(cache); over = len(cache.over_length({max_length}))",
    "store items in use": "items = len(referenced_items(FeatureCache(uri)))",
}
PROCESS = """
import re, sys, time
sys.path[0] = {root!r}
from preprocessing.cache.entry import FeatureCache
from preprocessing.cache.inventory import referenced_items

def peak_kib():  # this program's high-water mark (ru_maxrss would count the parent's, from before the exec)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

uri = sys.argv[1]
base = peak_kib()
start = time.perf_counter()
{code}
print(time.perf_counter() - start, base, peak_kib())
"""


def receipts(n_samples: int, seed: int = 0):
    """One receipt per shard, as `CacheEntry.write_shard` writes them."""
    rng = np.random.default_rng(seed)
    for index, start in enumerate(range(0, n_samples, SHARD_SIZE)):
        count = min(SHARD_SIZE, n_samples - start)
        vectors = rng.integers(192, 257, count)
        digests = [os.urandom(48).hex() for _ in range(count)]
        yield {"index": index, "name": f"shard-{index:05d}.tar", "count": count, "sha256": os.urandom(32).hex(),
               "bytes": 1 << 20, "rejects": [], "keys": [f"llava-{start + i:07d}" for i in range(count)],
               "lengths": [[int(t), [int(v)]] for t, v in zip(rng.integers(40, 81, count), vectors)],
               "item_files": [[f"{d[:2]}/{d[:64]}_{v}_{d[64:]}.npy"] for d, v in zip(digests, vectors)]}


def write_both(folder: Path, n_samples: int) -> dict:
    """Format 3 through the encode job's finish; format 2 as its manifest was. Returns the seconds each took."""
    new, old = CacheEntry(str(folder / "format3")), folder / "format2"
    old.mkdir(parents=True)
    shards = []
    for receipt in receipts(n_samples):
        (folder / "format3").mkdir(exist_ok=True)
        (folder / "format3" / f"shard-{receipt['index']:05d}.json").write_text(json.dumps(receipt))
        shards.append({k: receipt[k] for k in ("name", "count", "sha256", "bytes", "keys", "lengths")})
    spec = {"modality": "image", "feature_store": "image-siglip2-0000000000000000"}
    start = time.perf_counter()
    manifest = new.finish(spec, len(shards), [], n_samples, extra={})
    finish_seconds = time.perf_counter() - start
    start = time.perf_counter()
    (old / MANIFEST).write_text(json.dumps({**manifest, "format_version": 2, "shards": shards}, indent=1,
                                           sort_keys=True))
    return {"format 3": finish_seconds, "format 2": time.perf_counter() - start}


def measure(uri: Path, code: str) -> dict:
    script = PROCESS.format(root=str(ROOT), code=code.format(max_length=MAX_LENGTH))
    out = subprocess.run([sys.executable, "-c", script, str(uri)], capture_output=True, text=True, check=True)
    seconds, base_kib, peak_kib = map(float, out.stdout.split()[-3:])
    return {"seconds": seconds, "peak_mib": peak_kib / 1024, "added_mib": (peak_kib - base_kib) / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_200_000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        written = write_both(folder, args.samples)
        for fmt, name in (("format 2", "format2"), ("format 3", "format3")):
            files = {"manifest": (folder / name / MANIFEST).stat().st_size}
            if (folder / name / "index.parquet").exists():
                files["index"] = (folder / name / "index.parquet").stat().st_size
            for what, code in MEASURE.items():
                if what == "store items in use" and fmt == "format 2":
                    continue  # reads every shard, which the synthetic entry lacks
                rows.append({"format": fmt, "measure": what, **measure(folder / name, code),
                             "write_seconds": written[fmt], **{f"{k}_mib": v / 2**20 for k, v in files.items()}})
                print(rows[-1], file=sys.stderr, flush=True)
    machine = (f"{platform.machine()}, {cpu_description()}, {os.cpu_count()} CPUs; {args.samples:,} samples in "
               f"shards of {SHARD_SIZE}; peak = the process's maximum resident memory, added = above Python with the "
               f"modules loaded")
    lines = ["| entry | what | seconds | peak MiB | added MiB | manifest MiB | index MiB | written in s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['measure']} | {r['seconds']:.2f} | {r['peak_mib']:.0f} | {r['added_mib']:.0f} | "
              f"{r['manifest_mib']:.1f} | {r.get('index_mib', 0):.1f} | {r['write_seconds']:.1f} |" for r in rows]
    write_report(args.out, "cache_index", machine, rows, lines)


if __name__ == "__main__":
    main()
