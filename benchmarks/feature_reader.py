"""Reading paper-sized features from S3: the samples/s and MB/s training workers reach through the feature cache's
reader, beside the rate one GPU consumes at the vision recipe's phase II.

The entry is synthetic and written once by the encode job's own writers (`FeatureStore.write` for each item,
`CacheEntry.write_shard`, `finish`) to the local S3 endpoint (moto's server, started here on 127.0.0.1 and stopped
by its pid) and, for comparison, to local disk (just written, so read from the page cache). Per sample one
SigLIP2-sized item, fp16 [252, 768] (378 KiB: siglip2-base-patch16-naflex on a 4:3 image), a short question and
answer; shards of 64 samples. The sample count is rounded up to whole shards that every process count divides, so
every sample is read exactly once in each configuration.

A configuration is N fresh processes, rank r of world N, each reading its own shards as a training worker does:
`FeatureCache(uri).iter_samples(r, N, prefetch=P)`, one shuffled epoch, with the default window (P shard threads;
each shard's items on the cache's own `item_reader` pool of 8 threads, or a pool of `--item-threads`). They open
the entry, wait for each other, then each times its epoch; the total is every sample over the time from the first
start to the last end. MB/s counts the bytes read, items and shards: samples/s x the entry's bytes per sample.
CPU columns, in cores: the readers' CPU seconds (all threads) and the S3 server's over the configuration's time, and
the whole machine's busy time over the readers' lifetime: on a shared machine, what is left after the two is other
work's (readers, server and other work share this machine's `os.cpu_count()` cores).

One GPU's demand (an estimate for the paper's 0.4B shape, from `benchmarks/RESULTS.md`, third and fourth GPU runs:
phase II ran 38,900 tokens/s on an H200 in packed rows of 16,384 tokens):

    samples/s = tokens/s / (image tokens + text tokens) = 38,900 / (252 + 100) ~ 110
    MB/s      = samples/s x bytes per sample (the 378 KiB item + its share of a shard: 379 KiB) ~ 43

At the recipe's phase II (`configs/paper/train_vision.yaml`: micro_batch 8, global_batch 128 on 8 workers, so 2
micro-batches a step) that is a micro-batch every 8 / 110 ~ 73 ms. The paper's 1.5B backbone would consume about
4x fewer samples/s. The issue's target: each worker reads at least 3x that ("x GPU" column: the slowest process).

    python benchmarks/feature_reader.py [--samples 1024] [--processes 4 8] [--prefetch 4 1 8] [--out DIR]
"""

import argparse
import dataclasses
import hashlib
import math
import multiprocessing
import os
import queue
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # run as a script: import the project's packages, not this folder's modules

from benchmarks.report import write_report  # noqa: E402
from infra.s3_server import start_s3  # noqa: E402
from modrwkv.conversation import Sample, Turn  # noqa: E402
from pipelines.environment import cpu_description  # noqa: E402
from preprocessing import storage  # noqa: E402
from preprocessing.cache.entry import CacheEntry, FeatureCache, FeatureStore, pack_shard  # noqa: E402

BUCKET = "modrwkv-bench"
FEATURE_DIM = 768  # SigLIP2 base
IMAGE_TOKENS = 252  # siglip2-base-patch16-naflex on a 4:3 image (640 x 480: 18 x 14 patches in its 256 budget)
TEXT_TOKENS = 100  # a LLaVA-665K turn pair, roughly
GPU_TOKENS_PER_S = 38_900  # phase II, 0.4B shape, H200 (benchmarks/RESULTS.md)
MB = 1e6


def write_entry(root: str, n_samples: int, shard_size: int, item_tokens: int) -> str:
    """A complete entry of `n_samples` under `root`, each with one random fp16 item; returns its URI."""
    key = {"modality": "image", "kind": "siglip2", "synthetic": [item_tokens, FEATURE_DIM]}
    store, entry = FeatureStore.for_key(root, key), CacheEntry(storage.join(root, "image-siglip2-synthetic"))
    turns = [Turn("user", "<image>\nWhat is in the picture? Answer in one sentence."),
             Turn("assistant", "A synthetic picture of random patch features, written for the reader benchmark.")]

    def write_item(i: int) -> str:  # distinct bytes per sample: the store is content-addressed
        features = np.random.default_rng(i).standard_normal((item_tokens, FEATURE_DIM), np.float32)
        return store.write(hashlib.sha256(f"sample-{i}".encode()).hexdigest(), features.astype(np.float16))

    with ThreadPoolExecutor(8) as pool:  # one S3 write is a round trip or three: overlap them
        for index, first in enumerate(range(0, n_samples, shard_size)):
            keys = [f"sample-{i:07d}" for i in range(first, min(first + shard_size, n_samples))]
            files = list(pool.map(write_item, range(first, first + len(keys))))
            samples = [Sample(k, "image", turns, [f]) for k, f in zip(keys, files)]
            entry.write_shard(index, pack_shard(samples), keys, [], [[TEXT_TOKENS, [item_tokens]]] * len(keys),
                              [[f] for f in files])
    entry.finish({"modality": "image", "store": key}, math.ceil(n_samples / shard_size), [], n_samples,
                 extra={"feature_store": store.name})
    return entry.uri


def entry_bytes(uri: str) -> int:
    """What reading the whole entry fetches: its shards and its store's items (the store holds this entry's alone)."""
    cache = FeatureCache(uri)
    items = [size for name, (size, _) in storage.list_tree(cache.store.uri).items() if name.endswith(".npy")]
    return sum(s["bytes"] for s in cache.shards) + sum(items)


def read_rank(uri: str, rank: int, world: int, prefetch: int, item_threads: int | None, start_together, results):
    """One training worker's epoch (a spawned process): its sample keys and when it started and ended."""
    cache = FeatureCache(uri)
    if item_threads:
        cache.item_reader = ThreadPoolExecutor(item_threads, thread_name_prefix="item-reader")
    start_together.wait(timeout=300)  # a reader that died before it must not hold the others forever
    # monotonic is one system-wide clock on Linux: the parent compares these across processes
    started, cpu = time.monotonic(), time.process_time()
    keys = [sample.key for sample in cache.iter_samples(rank, world, prefetch=prefetch)]
    results.put({"rank": rank, "keys": keys, "started": started, "ended": time.monotonic(),
                 "cpu_s": time.process_time() - cpu})


def busy_seconds() -> float:
    """CPU seconds every core of this machine has spent busy since boot (neither idle nor waiting for I/O)."""
    cpu = psutil.cpu_times()
    return sum(cpu) - cpu.idle - cpu.iowait


@dataclasses.dataclass
class Setting:
    storage: str
    processes: int
    prefetch: int
    item_threads: int | None = None  # None: the reader's own pool


def measure(uri: str, setting: Setting, n_samples: int, bytes_per_sample: float, gpu_samples_per_s: float,
            server=None) -> dict:
    """One configuration's row: per-process and total rates, CPU, and whether every sample came once."""
    spawn = multiprocessing.get_context("spawn")  # fresh processes, as Ray's workers are; no forked S3 client
    start_together, results = spawn.Barrier(setting.processes), spawn.Queue()
    workers = [spawn.Process(target=read_rank, args=(uri, rank, setting.processes, setting.prefetch,
                                                     setting.item_threads, start_together, results))
               for rank in range(setting.processes)]
    server_cpu = server.process().cpu_times() if server else None
    machine_cpu, since = busy_seconds(), time.monotonic()
    for worker in workers:
        worker.start()
    ranks = []
    while len(ranks) < len(workers):  # drained before the joins: a process exits only once its result is sent
        try:
            ranks.append(results.get(timeout=1))
        except queue.Empty:
            if any(w.exitcode for w in workers):  # a crash (its traceback is above) must not hang the benchmark
                raise RuntimeError(f"{setting}: a reader failed (exit codes {[w.exitcode for w in workers]})")
    for worker in workers:
        worker.join()
    ranks.sort(key=lambda r: r["rank"])
    wall = max(r["ended"] for r in ranks) - min(r["started"] for r in ranks)
    # the whole machine over the readers' lifetime (start-up included): beside the readers' and the server's
    # share, it shows what other work on this shared machine took from them
    machine_cpu = (busy_seconds() - machine_cpu) / (time.monotonic() - since)
    if server:
        now = server.process().cpu_times()
        server_cpu = (now.user + now.system - server_cpu.user - server_cpu.system) / wall
    per_process = [len(r["keys"]) / (r["ended"] - r["started"]) for r in ranks]
    keys = [k for r in ranks for k in r["keys"]]
    return {**dataclasses.asdict(setting), "samples": n_samples, "samples_read": len(keys),
            "every_sample_once": len(keys) == len(set(keys)) == n_samples,
            "samples_per_process": [len(r["keys"]) for r in ranks],
            "seconds": wall, "samples_per_s_per_process": per_process,
            "mb_per_s_per_process": [s * bytes_per_sample / MB for s in per_process],
            "samples_per_s": len(keys) / wall, "mb_per_s": len(keys) * bytes_per_sample / MB / wall,
            "gpu_samples_per_s": gpu_samples_per_s, "gpu_mb_per_s": gpu_samples_per_s * bytes_per_sample / MB,
            "slowest_process_x_gpu": min(per_process) / gpu_samples_per_s,
            "total_x_gpu": len(keys) / wall / gpu_samples_per_s,
            "reader_cpu_cores": sum(r["cpu_s"] for r in ranks) / wall, "server_cpu_cores": server_cpu,
            "machine_cpu_cores": machine_cpu}


def table(rows: list[dict], gpu: dict) -> list[str]:
    lines = [f"One GPU's demand (estimate, 0.4B shape): {gpu['tokens_per_s']:,} tokens/s / ({gpu['image_tokens']} "
             f"image + {gpu['text_tokens']} text tokens) = {gpu['samples_per_s']:.1f} samples/s x "
             f"{gpu['bytes_per_sample'] / 1024:.0f} KiB = {gpu['mb_per_s']:.1f} MB/s", "",
             "| storage | processes | prefetch | item threads | s | samples/s per process (min-max) | "
             "MB/s per process (min-max) | total samples/s | total MB/s | x GPU: slowest process / total | "
             "reader CPU (cores) | S3 server CPU (cores) | machine busy (cores) | every sample once |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate, mb = r["samples_per_s_per_process"], r["mb_per_s_per_process"]
        server = "-" if r["server_cpu_cores"] is None else f"{r['server_cpu_cores']:.2f}"
        lines.append(f"| {r['storage']} | {r['processes']} | {r['prefetch']} | {r['item_threads'] or '8 (default)'} | "
                     f"{r['seconds']:.1f} | {min(rate):.1f}-{max(rate):.1f} | {min(mb):.1f}-{max(mb):.1f} | "
                     f"{r['samples_per_s']:.1f} | {r['mb_per_s']:.1f} | {r['slowest_process_x_gpu']:.2f}x / "
                     f"{r['total_x_gpu']:.2f}x | {r['reader_cpu_cores']:.2f} | {server} | "
                     f"{r['machine_cpu_cores']:.2f} | {r['every_sample_once']} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024, help="rounded up to whole shards for every world")
    parser.add_argument("--processes", type=int, nargs="+", default=[4, 8], help="reader processes run together")
    parser.add_argument("--prefetch", type=int, nargs="+", default=[4, 1, 8],
                        help="shard threads of one process; the first also serves the other rows (4: training's)")
    parser.add_argument("--item-threads", type=int, nargs="*", default=[16],
                        help="item-reader pools to try in one process beside the reader's own 8")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--item-tokens", type=int, default=IMAGE_TOKENS, help="feature vectors per item (768 wide)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args()
    worlds = math.lcm(*args.processes)
    n_samples = math.ceil(args.samples / (args.shard_size * worlds)) * args.shard_size * worlds
    default = args.prefetch[0]
    on_s3 = ([Setting("s3", 1, p) for p in args.prefetch] + [Setting("s3", 1, default, t) for t in args.item_threads]
             + [Setting("s3", n, default) for n in args.processes])

    with tempfile.TemporaryDirectory(prefix="feature-reader-") as tmp, start_s3(Path(tmp, "s3")) as server:
        server.create_bucket(BUCKET)
        os.environ.update(server.env())  # the spawned readers inherit the endpoint
        began = time.perf_counter()
        uris = {"s3": write_entry(f"s3://{BUCKET}/cache", n_samples, args.shard_size, args.item_tokens),
                "local disk": write_entry(str(Path(tmp, "cache")), n_samples, args.shard_size, args.item_tokens)}
        print(f"[{time.perf_counter() - began:.0f}s] wrote {n_samples} samples to S3 and to local disk",
              file=sys.stderr, flush=True)
        bytes_per_sample = entry_bytes(uris["s3"]) / n_samples
        gpu = {"tokens_per_s": GPU_TOKENS_PER_S, "image_tokens": args.item_tokens, "text_tokens": TEXT_TOKENS,
               "samples_per_s": GPU_TOKENS_PER_S / (args.item_tokens + TEXT_TOKENS),
               "bytes_per_sample": bytes_per_sample}
        gpu["mb_per_s"] = gpu["samples_per_s"] * bytes_per_sample / MB
        rows = []
        for setting in on_s3 + [Setting("local disk", 1, default)]:
            rows.append(measure(uris[setting.storage], setting, n_samples, bytes_per_sample, gpu["samples_per_s"],
                                server if setting.storage == "s3" else None))
            print(f"[{time.perf_counter() - began:.0f}s] {setting}: {rows[-1]['mb_per_s']:.1f} MB/s",
                  file=sys.stderr, flush=True)

    machine = (f"{cpu_description()}, {os.cpu_count()} cores; local S3 endpoint (moto's server, one process); "
               f"{n_samples} samples of one fp16 [{args.item_tokens}, {FEATURE_DIM}] item, {args.shard_size} a shard, "
               f"{bytes_per_sample / 1024:.1f} KiB a sample")
    write_report(args.out, "feature_reader", machine, rows, table(rows, gpu))


if __name__ == "__main__":
    main()
