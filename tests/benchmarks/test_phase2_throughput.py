"""benchmarks/phase2_throughput.py end to end on CPU at its tiny shape, run as the GPU machine runs it (as a script,
without the job frameworks), with the profiled step."""

import json

from .gpu_machine import run_benchmark


def test_a_tiny_phase2_step_is_timed_and_profiled_eager_and_compiled(tmp_path):
    run_benchmark("phase2_throughput.py", "--shape", "tiny", "--steps", "1", "--profile", "--compile", "on", "off",
                  "--out", str(tmp_path))
    row, compiled = json.loads((tmp_path / "phase2_throughput.json").read_text())["results"]
    assert not row["compiled"] and compiled["compiled"]  # eager first, whatever the order asked
    assert row["backend"] == "chunked" and row["tokens_per_s"] > 0 and row["last_loss"] < row["first_loss"] + 1
    assert compiled["tokens_per_s"] > 0 and abs(compiled["last_loss"] - row["last_loss"]) < 1e-4  # same step
    profile = row["profile"]
    assert 0 < profile["busy"] <= 2 and profile["calls"] > 100 and len(profile["top"]) == 15
    assert sum(o["share"] for o in profile["top"]) <= 1 + 1e-9
    assert "aten::mm" in {o["name"] for o in profile["top"]}  # the blocks' matrix products lead on a CPU
    assert "the profiled step's" in (tmp_path / "phase2_throughput.md").read_text()
