"""benchmarks/encoder_throughput.py and wavlm_batching.py end to end on CPU with tiny encoders, run as the GPU machine
runs them."""

import json

import pytest

from .gpu_machine import run_benchmark


def encoder_rows(out, prepare_processes: int) -> dict[str, dict]:
    run_benchmark("encoder_throughput.py", "--device", "cpu", "--tiny", "--items", "4", "--batch-size", "2",
                  "--prepare-processes", str(prepare_processes), "--out", str(out))
    report = json.loads((out / "encoder_throughput.json").read_text())
    assert "CPU" in report["machine"] and "tiny" in report["machine"]
    return {row["encoder"]: row for row in report["results"]}


def test_tiny_encoders_report_throughput_tokens_and_bytes(tmp_path):
    rows = encoder_rows(tmp_path, prepare_processes=0)
    assert sorted(rows) == ["siglip2", "whisper"]
    # 640 x 480 at patch 16 is 40 x 30 patches, scaled to fit the tiny budget of 16: 4 x 3
    # 12 s of audio: one Whisper token per 20 ms
    expected_tokens = {"siglip2": 12, "whisper": 600}
    for kind, row in rows.items():
        assert row["items_per_s"] > 0 and row["items_per_s_per_core"] > 0
        assert row["prepare_items_per_s_one_thread"] > 0 and row["forward_items_per_s"] > 0
        assert row["prepare_threads_per_forward"] == pytest.approx(
            row["forward_items_per_s"] / row["prepare_items_per_s_one_thread"])
        assert (row["prepare_processes"], row["pipelined_items_per_s"]) == (0, None)
        assert (row["items_timed"], row["batch_size"]) == (4, 2)
        assert (row["tokens_per_item"], row["feature_dim"]) == (expected_tokens[kind], 32)
        assert row["bytes_per_item_fp16"] == expected_tokens[kind] * 32 * 2
        assert row["bytes_per_item_8bit"] == expected_tokens[kind] * (32 + 2)


@pytest.mark.slow  # a pool of spawned processes per encoder, each importing torch and transformers
def test_the_forward_fed_by_worker_processes_is_timed(tmp_path):
    for row in encoder_rows(tmp_path, prepare_processes=2).values():
        assert row["prepare_processes"] == 2 and row["pipelined_items_per_s"] > 0


def test_wavlm_batched_gives_each_clip_its_features_alone(tmp_path):
    run_benchmark("wavlm_batching.py", "--device", "cpu", "--tiny", "--clips", "6", "--batch-size", "3",
                  "--out", str(tmp_path))
    rows = json.loads((tmp_path / "wavlm_batching.json").read_text())["results"]
    assert [row["max_padding"] for row in rows] == [0, 0.25, "inf"]  # strict JSON has no Infinity
    for row in rows:
        assert row["same_lengths"] and row["max_error_over_scale"] < 1e-5
        assert row["alone_clips_per_s"] > 0 and row["batched_clips_per_s"] > 0 and row["clips"] == 6
        assert row["speedup"] == pytest.approx(row["batched_clips_per_s"] / row["alone_clips_per_s"])
