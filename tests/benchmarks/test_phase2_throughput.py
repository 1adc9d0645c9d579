"""benchmarks/phase2_throughput.py end to end on CPU at its tiny shape, run as the GPU machine runs it (as a script,
without the job frameworks), with the profiled step."""

import json

import pytest

from .gpu_machine import run_benchmark


def phase2_rows(out, *compile_modes: str, row_tokens: int = 1024) -> list[dict]:
    run_benchmark("phase2_throughput.py", "--shape", "tiny", "--steps", "1", "--profile", "--compile", *compile_modes,
                  "--row-tokens", str(row_tokens), "--out", str(out))
    return json.loads((out / "phase2_throughput.json").read_text())["results"]


def test_a_tiny_phase2_step_is_timed_and_profiled(tmp_path):
    (row,) = phase2_rows(tmp_path, "off", row_tokens=512)  # the tiny shape's rows hold 1,024
    assert not row["compiled"] and row["backend"] == "chunked" and 256 < row["tokens_per_step"] <= 512
    assert row["tokens_per_s"] > 0 and row["last_loss"] < row["first_loss"] + 1
    profile = row["profile"]
    # busy: the profiled step's op time over the timed steps', two timings: no bound holds with other work on the cores
    assert profile["busy"] > 0 and profile["calls"] > 100 and len(profile["top"]) == 15
    assert sum(o["share"] for o in profile["top"]) <= 1 + 1e-9
    assert "aten::mm" in {o["name"] for o in profile["top"]}  # the blocks' matrix products lead on a CPU
    assert "the profiled step's" in (tmp_path / "phase2_throughput.md").read_text()


@pytest.mark.slow  # torch.compile of the whole step: half a minute on 2 cores
def test_the_compiled_step_runs_after_the_eager_one_and_computes_the_same(tmp_path):
    row, compiled = phase2_rows(tmp_path, "on", "off")
    assert not row["compiled"] and compiled["compiled"]  # eager first, whatever the order asked
    assert compiled["tokens_per_s"] > 0 and abs(compiled["last_loss"] - row["last_loss"]) < 1e-4  # same step
