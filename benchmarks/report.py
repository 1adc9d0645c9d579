"""Every benchmark ends the same way: print the table with the machine, write it as Markdown and JSON."""

import json
import math
import os
from pathlib import Path

from pipelines.environment import cpu_description


def cpu_line() -> str:
    """The machine's CPU as the tables name it: its model (the figures moved between an AVX2, an AMX and an
    AVX-512 host; `platform.processor()` is empty on Linux) and its cores."""
    return f"{cpu_description()}, {os.cpu_count()} cores"


def json_safe(value):
    """`value` with each infinite or NaN float as the string "inf", "-inf" or "nan": JSON has none of them (Python
    writes `Infinity`, which strict parsers refuse; `wavlm_batching --max-padding inf`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_report(out_dir, name: str, machine: str, results: list[dict], lines: list[str]) -> None:
    table = "\n".join(lines)
    print(f"machine: {machine}\n{table}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(json_safe({"machine": machine, "results": results}), indent=2,
                                                 allow_nan=False))
    (out / f"{name}.md").write_text(f"machine: {machine}\n\n{table}\n")
    print(f"wrote {out / (name + '.json')} and {name}.md")
