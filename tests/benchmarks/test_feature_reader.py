"""benchmarks/feature_reader.py end to end at a tiny size: its own S3 endpoint, one and two reader processes, local
disk; the report's rates are positive and every sample is read exactly once in each configuration."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_entry_read_from_s3_and_disk_by_one_and_two_processes(tmp_path):
    subprocess.run([sys.executable, "benchmarks/feature_reader.py", "--samples", "7", "--shard-size", "2",
                    "--item-tokens", "4", "--processes", "2", "--prefetch", "4", "0", "--item-threads", "2",
                    "--out", str(tmp_path)], cwd=ROOT, check=True, capture_output=True, text=True, timeout=120)

    rows = json.loads((tmp_path / "feature_reader.json").read_text())["results"]
    settings = [(r["storage"], r["processes"], r["prefetch"], r["item_threads"]) for r in rows]
    assert settings == [("s3", 1, 4, None), ("s3", 1, 0, None), ("s3", 1, 4, 2), ("s3", 2, 4, None),
                        ("local disk", 1, 4, None)]
    for row in rows:
        assert row["samples"] == 8  # 7 rounded up to whole shards of 2 that both worlds divide
        assert row["every_sample_once"] and row["samples_read"] == sum(row["samples_per_process"]) == 8
        assert len(row["samples_per_process"]) == len(row["mb_per_s_per_process"]) == row["processes"]
        assert min(row["samples_per_s_per_process"]) > 0 and min(row["mb_per_s_per_process"]) > 0
        assert row["samples_per_s"] > 0 and row["mb_per_s"] > 0
        assert row["reader_cpu_cores"] > 0 and row["machine_cpu_cores"] > 0
        # 4 image + 100 text tokens a sample at 38,900 tokens/s
        assert row["gpu_samples_per_s"] == 38_900 / 104
        assert row["slowest_process_x_gpu"] == min(row["samples_per_s_per_process"]) / row["gpu_samples_per_s"]
        if row["storage"] == "s3":
            assert row["server_cpu_cores"] > 0
        else:
            assert row["server_cpu_cores"] is None
    assert "| local disk | 1 | 4 |" in (tmp_path / "feature_reader.md").read_text()
