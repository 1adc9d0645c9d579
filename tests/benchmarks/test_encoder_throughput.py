"""benchmarks/encoder_throughput.py end to end on CPU with tiny encoders, run as the GPU machine runs it: as a
script, in a Python where the job frameworks and audio libraries it must not need cannot be imported."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# absent from the GPU machine the benchmark runs on
NOT_ON_THE_GPU_MACHINE = ("soundfile", "librosa", "ray", "mlflow", "deepspeed", "webdataset", "boto3")
RUN_WITHOUT_THEM = ("import runpy, sys\n"
                    "for name in sys.argv[1].split(','):\n"
                    "    sys.modules[name] = None  # import raises, find_spec answers 'not installed'\n"
                    "sys.argv = sys.argv[1:]\n"
                    "runpy.run_path('benchmarks/encoder_throughput.py', run_name='__main__')\n")


def test_tiny_encoders_report_throughput_tokens_and_bytes(tmp_path):
    subprocess.run([sys.executable, "-c", RUN_WITHOUT_THEM, ",".join(NOT_ON_THE_GPU_MACHINE),
                    "--device", "cpu", "--tiny", "--items", "4", "--batch-size", "2", "--prepare-processes", "2",
                    "--out", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True, text=True)

    report = json.loads((tmp_path / "encoder_throughput.json").read_text())
    rows = {row["encoder"]: row for row in report["results"]}
    assert sorted(rows) == ["siglip2", "whisper"]
    # 640 x 480 at patch 16 is 40 x 30 patches, scaled to fit the tiny budget of 16: 4 x 3
    # 12 s of audio: one Whisper token per 20 ms
    expected_tokens = {"siglip2": 12, "whisper": 600}
    for kind, row in rows.items():
        assert row["items_per_s"] > 0 and row["items_per_s_per_core"] > 0
        assert row["prepare_items_per_s_one_thread"] > 0 and row["forward_items_per_s"] > 0
        assert row["prepare_processes"] == 2 and row["pipelined_items_per_s"] > 0
        assert row["prepare_threads_per_forward"] == pytest.approx(
            row["forward_items_per_s"] / row["prepare_items_per_s_one_thread"])
        assert (row["items_timed"], row["batch_size"]) == (4, 2)
        assert (row["tokens_per_item"], row["feature_dim"]) == (expected_tokens[kind], 32)
        assert row["bytes_per_item_fp16"] == expected_tokens[kind] * 32 * 2
        assert row["bytes_per_item_8bit"] == expected_tokens[kind] * (32 + 2)
    assert "CPU" in report["machine"] and "tiny" in report["machine"]
