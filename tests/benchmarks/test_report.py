"""benchmarks/report.py: the JSON every benchmark writes is strict JSON, and its machine line names the CPU."""

import json

import pytest

from benchmarks.report import cpu_line, write_report


def refuse(constant: str):
    raise ValueError(f"not JSON: {constant}")


def test_a_report_with_an_infinite_setting_is_strict_json_and_names_the_cpu(tmp_path):
    """`wavlm_batching --max-padding inf` wrote `Infinity`, which strict parsers refuse."""
    write_report(tmp_path, "bench", cpu_line(), [{"max_padding": float("inf"), "ratio": float("nan"), "ms": 1.5}],
                 ["| a |"])
    report = json.loads((tmp_path / "bench.json").read_text(), parse_constant=refuse)
    assert report["results"] == [{"max_padding": "inf", "ratio": "nan", "ms": 1.5}]
    assert not report["machine"].startswith("x86_64")  # the model, not the architecture alone
    with pytest.raises(ValueError, match="not JSON: Infinity"):
        json.loads('{"a": Infinity}', parse_constant=refuse)
