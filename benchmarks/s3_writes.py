"""How the feature store writes to S3: in place, one upload per item (`storage.write_atomic`, shipped: an S3
object appears whole when its upload completes), against the way every write went before, a temporary name then a
move (on S3 a copy and a delete) after creating the folder (a marker object). Items of `--kib` KiB to the local S3
endpoint (moto's server, started here on 127.0.0.1 and stopped by its pid), one thread, the two ways alternated
`--rounds` times in one run.

    python benchmarks/s3_writes.py [--items 200] [--kib 50] [--rounds 2] [--out benchmarks/out]
"""

import argparse
import os
import platform
import posixpath
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script: import the project's packages, not this folder's modules
    sys.path[0] = str(ROOT)

BUCKET = "s3-writes-bench"


def write_through_a_temporary(uri: str, data: bytes) -> None:
    """The write before: folder, temporary name, move."""
    from preprocessing import storage

    fs, path = storage._fs(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--kib", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()

    from benchmarks.report import write_report
    from infra.s3_server import start_s3
    from pipelines.environment import cpu_description
    from preprocessing import storage

    ways = {"in place (shipped)": storage.write_atomic, "temporary name + move (before)": write_through_a_temporary}
    data = os.urandom(args.kib * 1024)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, start_s3(Path(tmp)) as server:
        server.create_bucket(BUCKET)
        os.environ.update(server.env())
        for round_ in range(args.rounds):
            for way, write in ways.items():
                started = time.perf_counter()
                for i in range(args.items):
                    write(f"s3://{BUCKET}/{round_}/{way.split()[0]}/{i:06d}.npy", data)
                seconds = time.perf_counter() - started
                rows.append({"way": way, "round": round_, "items": args.items, "kib": args.kib, "seconds": seconds,
                             "ms_per_item": 1000 * seconds / args.items})
                print(rows[-1], file=sys.stderr, flush=True)
    shipped = [r for r in rows if r["way"] == "in place (shipped)"]
    lines = ["| way | round | items | s | ms/item | vs in place |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['way']} | {r['round']} | {r['items']} | {r['seconds']:.2f} | {r['ms_per_item']:.1f} | "
              f"{r['seconds'] / shipped[r['round']]['seconds']:.2f}x |" for r in rows]
    machine = (f"{cpu_description()}, {os.cpu_count()} CPUs, {platform.machine()}; moto's S3 server on 127.0.0.1, "
               f"{args.kib} KiB items, one thread")
    write_report(args.out, "s3_writes", machine, rows, lines)


if __name__ == "__main__":
    main()
