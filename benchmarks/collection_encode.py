"""A collection's encode (`dataset.each_folder`) one folder after another in the driver (`run.folder_jobs: 1`)
against `--jobs` folders at once as Ray tasks (a local Ray of that many CPUs, its start counted): `--folders` folders
of `--windows` raw windows each, lookback 720, horizon 96 and stride 816 as configs/paper/encode_gifteval_pretrain.yaml,
4 float32 random-walk columns a folder. Each run in a fresh process with a fresh cache root, the two ways alternated
`--repeats` times; the entries each way makes must be the same.

    python benchmarks/collection_encode.py [--folders 4] [--windows 20000] [--jobs 2] [--repeats 2]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # run as a script: import the project's packages, not this folder's files

from benchmarks.report import write_report  # noqa: E402

LOOKBACK, HORIZON, STRIDE, COLUMNS = 720, 96, 816, 4

# one collection encode in a process of its own, timed from before Ray (when it starts one) to the last entry
CHILD = """
import json, sys, time
from pipelines.config import from_dict
from pipelines.encode import EncodeConfig, run_encodes

collection, root, jobs, lookback, horizon, stride = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
config = from_dict(EncodeConfig, {
    "dataset": {"format": "series", "path": collection, "each_folder": True, "lookback": lookback,
                "horizon": horizon, "stride": stride, "fractions": [1.0, 0.0, 0.0]},
    "encoder": {"kind": "raw"}, "cache": {"root": root}, "run": {"folder_jobs": jobs, "actors": 1}})
started = time.perf_counter()
results = run_encodes(config)
print(json.dumps({"jobs": jobs, "seconds": time.perf_counter() - started, "entries": [r.uri.rsplit("/", 1)[-1]
                  for r in results], "windows": sum(r.manifest["counts"]["written"] for r in results)}))
"""


def build_collection(folder: Path, folders: int, windows: int) -> None:
    rows = LOOKBACK + HORIZON + STRIDE * (windows // COLUMNS - 1)
    rng = np.random.default_rng(0)
    for f in range(folders):
        walks = np.cumsum(rng.normal(size=(rows, COLUMNS)), axis=0).astype(np.float32)
        (folder / f"dataset{f}").mkdir(parents=True)
        pq.write_table(pa.table({f"s{i}": walks[:, i] for i in range(COLUMNS)}), folder / f"dataset{f}" / "s.parquet")


def encode(collection: Path, jobs: int) -> dict:
    with tempfile.TemporaryDirectory() as root:
        out = subprocess.run([sys.executable, "-c", CHILD, str(collection), root,
                              *map(str, (jobs, LOOKBACK, HORIZON, STRIDE))],
                             cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folders", type=int, default=4)
    parser.add_argument("--windows", type=int, default=20000, help="per folder")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    args = parser.parse_args()
    from benchmarks.quality import machine_description

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        build_collection(Path(folder), args.folders, args.windows)
        for _ in range(args.repeats):
            for jobs in (1, args.jobs):
                rows.append(encode(Path(folder), jobs))
                print(f"folder_jobs {jobs}: {rows[-1]['windows']} windows in {rows[-1]['seconds']:.1f} s", flush=True)
    if len({tuple(r["entries"]) for r in rows}) != 1:
        raise AssertionError(f"the entries differ between the ways: {[r['entries'] for r in rows]}")
    seconds = {jobs: [r["seconds"] for r in rows if r["jobs"] == jobs] for jobs in (1, args.jobs)}
    speedup = [one / many for one, many in zip(seconds[1], seconds[args.jobs])]
    lines = [f"A collection of {args.folders} folders of {rows[0]['windows'] // args.folders:,} raw windows each "
             f"(lookback {LOOKBACK}, horizon {HORIZON}, stride {STRIDE}), encoded one folder after another and "
             f"{args.jobs} at a time as Ray tasks (a local Ray's start included), alternated:", "",
             "| folder_jobs | seconds, each run | windows a second |", "|---|---|---|"]
    lines += [f"| {jobs} | {' / '.join(f'{s:.1f}' for s in seconds[jobs])} | "
              f"{rows[0]['windows'] / np.mean(seconds[jobs]):,.0f} |" for jobs in seconds]
    lines += ["", f"{args.jobs} at a time against one after another: {' / '.join(f'{s:.2f}x' for s in speedup)}; "
                  "the same entries."]
    write_report(args.out, "collection_encode", machine_description(), [*rows, {"speedup": speedup}], lines)


if __name__ == "__main__":
    main()
