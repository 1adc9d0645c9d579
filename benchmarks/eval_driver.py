"""What scoring a forecast test set costs the eval driver: peak memory and time per window while the predicted
shards arrive (256 windows each, the rows the prediction actors return: lookback 720 and horizon 96 as the paper's
Table 4), at several window counts, each in a fresh process. `streamed` is `modrwkv eval`'s driver
(`write_and_score`: each shard written and added to running sums); `held` keeps every row and scores them at the
end, as the driver did before. The slope between the smallest and the largest count is the cost of one window more
(counts above the MLflow table's 10,000 rows, which the streamed driver keeps):
ECL's test set has 1.66M windows (321 series), Traffic's 2.94M (862).

    python benchmarks/eval_driver.py [--windows 12000 24000 48000] [--out benchmarks/out]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # run as a script: import the project's packages, not this folder's files

from benchmarks.report import write_report  # noqa: E402

LOOKBACK, HORIZON, SHARD = 720, 96, 256  # configs/paper/eval_ecl.yaml's windows, the encode's default shard size

# one driver in a process of its own: its peak resident memory is the scoring's alone
CHILD = """
import json, resource, sys, tempfile, time
from pathlib import Path
import numpy as np
from pipelines.eval_tasks import Forecast, shortest_float32
from pipelines.evaluate import write_and_score

mode, windows, lookback, horizon, shard = sys.argv[1], *map(int, sys.argv[2:6])
rng, making = np.random.default_rng(0), 0.0

def actor_rows(start, stop):  # one shard's rows as a prediction actor returns them: JSON text
    walk = np.cumsum(rng.normal(size=(stop - start, lookback + horizon)), axis=1).astype(np.float32)
    return [json.dumps({"key": f"w{start + i:08d}", "language": None,
                        "prediction": shortest_float32(w[-horizon:] + 0.1),
                        "reference": shortest_float32(w[-horizon:]), "lookback": w[:lookback].tolist(), "mean": 0.0,
                        "std": 1.0, "train_std": 1.0}) for i, w in enumerate(walk)]

def shards():  # what `predicted_shards` yields: each shard's rows, parsed
    global making
    for start in range(0, windows, shard):
        began = time.perf_counter()
        text = actor_rows(start, min(start + shard, windows))
        making += time.perf_counter() - began
        yield [json.loads(r) for r in text]

task, before, started = Forecast(season=24), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
with tempfile.TemporaryDirectory() as folder:
    if mode == "streamed":
        metrics, _ = write_and_score(shards(), task, Path(folder) / "predictions.jsonl", 10_000).tally.result()
    else:
        rows = [row for rows in shards() for row in rows]
        Path(folder, "predictions.jsonl").write_text("".join(json.dumps(task.saved(r)) + "\\n" for r in rows))
        metrics, _ = task.score(rows)
print(json.dumps({"mode": mode, "windows": windows, "seconds": time.perf_counter() - started - making,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "before_mib": before / 1024,
                  "mse": metrics["mse"]}))
"""


def measure(mode: str, windows: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, *map(str, (windows, LOOKBACK, HORIZON, SHARD))],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[12000, 24000, 48000])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    args = parser.parse_args()
    from benchmarks.quality import machine_description

    rows, slopes = [], []
    for mode in ("held", "streamed"):
        mine = []
        for windows in sorted(args.windows):
            mine.append(measure(mode, windows))
            print(f"{mode} {windows} windows: peak {mine[-1]['peak_mib']:.0f} MiB, {mine[-1]['seconds']:.1f} s",
                  flush=True)
        first, last = mine[0], mine[-1]
        added = last["windows"] - first["windows"]
        slopes.append({"mode": mode, "kib_per_window": (last["peak_mib"] - first["peak_mib"]) * 1024 / added,
                       "ms_per_window": (last["seconds"] - first["seconds"]) * 1000 / added})
        rows += mine
    held, streamed = slopes
    lines = [f"Forecast scoring in the eval driver, lookback {LOOKBACK}, horizon {HORIZON}, shards of {SHARD} "
             "windows (seconds: parsing, writing and scoring, not making the rows):", "",
             "| driver | windows | peak RSS (MiB) | seconds | MSE |", "|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['windows']} | {r['peak_mib']:.0f} | {r['seconds']:.1f} | {r['mse']:.6g} |"
              for r in rows]
    lines += ["", "| driver | KiB per window more | ms per window | ECL's 1.66M windows (GiB) |", "|---|---|---|---|"]
    lines += [f"| {s['mode']} | {s['kib_per_window']:.2f} | {s['ms_per_window']:.3f} | "
              f"{s['kib_per_window'] * 1.66e6 / 2**20:.1f} |" for s in slopes]
    lines += ["", f"Streamed / held memory per window: {streamed['kib_per_window'] / held['kib_per_window']:.3f}."]
    write_report(args.out, "eval_driver", machine_description(), [*rows, *slopes], lines)


if __name__ == "__main__":
    main()
