"""What a series encode costs the driver, which holds every window until the entry is written: peak memory and
time per window of a raw (WaveNet input) encode in the driver, lookback 720, horizon 96 and stride 816 as the
paper's series recipe (windows that share no value, where the series' own values cost the most), at several window
counts, each in a fresh process; the slope between the smallest and the largest is the cost of one window more
(what decides how many windows one encode job can take: dataset.max_windows). Then the same config again: found from
its record (one listing of its files) and, the record deleted, by its key (every window read and cut again).
`--stride 1`: a test split's windows, which share their values.

    python benchmarks/series_encode.py [--windows 1000 4000 16000] [--stride 816] [--out benchmarks/out]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # run as a script: import the project's packages, not this folder's files

from benchmarks.report import write_report  # noqa: E402

LOOKBACK, HORIZON, STRIDE, COLUMNS = 720, 96, 816, 4  # configs/paper/encode_gifteval_pretrain.yaml's windows

# one encode in a process of its own: its peak resident memory is the encode's alone
CHILD = """
import json, resource, shutil, sys, time
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from pipelines.config import from_dict
from pipelines.encode import EncodeConfig, run_encode

folder, windows, (lookback, horizon, stride, columns) = sys.argv[1], int(sys.argv[2]), map(int, sys.argv[3:7])
rows = lookback + horizon + stride * (windows // columns - 1)
walks = np.cumsum(np.random.default_rng(0).normal(size=(rows, columns)), axis=0)
pq.write_table(pa.table({f"s{i}": walks[:, i] for i in range(columns)}), f"{folder}/series.parquet")
config = from_dict(EncodeConfig, {
    "dataset": {"format": "series", "path": f"{folder}/series.parquet", "lookback": lookback, "horizon": horizon,
                "stride": stride, "fractions": [1.0, 0.0, 0.0]},
    "encoder": {"kind": "raw"}, "cache": {"root": f"{folder}/cache"}, "run": {"in_process_max_items": 10**9}})
before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
result = run_encode(config)
seconds, peak = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
from pathlib import Path
store_files = sum(1 for f in Path(folder, "cache", "features").rglob("*") if f.is_file())
started = time.perf_counter()
assert run_encode(config).reused  # found from its record: one listing
found_s, started = time.perf_counter() - started, time.perf_counter()
shutil.rmtree(f"{folder}/cache/resolved")
assert run_encode(config).reused  # without its record: read and cut again, the entry found by its key
print(json.dumps({"windows": result.manifest["counts"]["written"], "seconds": seconds, "peak_mib": peak,
                  "before_mib": before / 1024, "store_files": store_files, "found_again_s": found_s,
                  "found_by_key_s": time.perf_counter() - started}))
"""


def measure(windows: int, stride: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run([sys.executable, "-c", CHILD, folder, str(windows), *map(str, (LOOKBACK, HORIZON,
                                                                                          stride, COLUMNS))],
                             cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--stride", type=int, default=STRIDE, help="1: a test split's windows, sharing values")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    args = parser.parse_args()
    from benchmarks.quality import machine_description

    rows = []
    for windows in sorted(args.windows):
        rows.append(measure(windows, args.stride))
        print(f"{rows[-1]['windows']} windows: peak {rows[-1]['peak_mib']:.0f} MiB, {rows[-1]['seconds']:.1f} s",
              flush=True)
    first, last = rows[0], rows[-1]
    added = last["windows"] - first["windows"]
    slope = {"kib_per_window": (last["peak_mib"] - first["peak_mib"]) * 1024 / added,
             "ms_per_window": (last["seconds"] - first["seconds"]) * 1000 / added}
    lines = [f"Raw series encode in the driver, lookback {LOOKBACK}, horizon {HORIZON}, stride {args.stride}, "
             f"{COLUMNS} random-walk columns:", "",
             "| windows | peak RSS (MiB) | seconds | store files | found again: by its record (s) | by its key (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['windows']} | {r['peak_mib']:.0f} | {r['seconds']:.1f} | {r['store_files']} | "
              f"{r['found_again_s']:.3f} | {r['found_by_key_s']:.1f} |" for r in rows]
    lines += ["", f"One window more: {slope['kib_per_window']:.1f} KiB of driver memory, "
                  f"{slope['ms_per_window']:.2f} ms."]
    write_report(args.out, f"series_encode_stride{args.stride}", machine_description(), [*rows, slope], lines)


if __name__ == "__main__":
    main()
