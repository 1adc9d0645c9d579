"""Every benchmark ends the same way: print the table with the machine, write it as Markdown and JSON."""

import json
from pathlib import Path


def write_report(out_dir, name: str, machine: str, results: list[dict], lines: list[str]) -> None:
    table = "\n".join(lines)
    print(f"machine: {machine}\n{table}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    (out / f"{name}.md").write_text(f"machine: {machine}\n\n{table}\n")
    print(f"wrote {out / (name + '.json')} and {name}.md")
