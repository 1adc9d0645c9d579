"""The demo's registered model served by `mlflow models serve`, against `modrwkv chat` on the same inputs.

After `make demo` (which registers phase II's model as `modrwkv-demo`): starts the model server on 127.0.0.1
(`infra/model_server.py`), sends the held-out digit images, utterances and CO2 windows one request each, and asks
`modrwkv chat` (in this process, the same registered model) the same questions. Per modality: how many served
answers equal chat's (forecasts: within a relative 1e-5), the served answers' score against the references
(accuracy, word/character errors, MSE), the server's start-up time and the median and 90th-percentile request
latency (sequential requests, one row each).

    python benchmarks/serving.py [--model models:/modrwkv-demo/N] [--images 20] [--clips 8] [--windows 8]

The tracking URI and the default model come from `runs/demo/summary.json`. Writes benchmarks/out/serving.json.
"""

import argparse
import base64
import contextlib
import io
import json
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infra.model_server import start_model_server  # noqa: E402
from pipelines.cli import main as cli  # noqa: E402
from pipelines.metrics.asr import character_error_rate, word_error_rate  # noqa: E402
from preprocessing.readers.asr import PROMPTS  # noqa: E402  (what the speech caches ask, by language)

DATA = ROOT / "runs" / "demo" / "data"
LOOKBACK, HORIZON = 104, 13  # configs/demo/encode_co2_*.yaml
SERIES_QUESTION = "Forecast the next 13 weeks of CO2."  # configs/demo/encode_co2_*.yaml


def requests(images: int, clips: int, windows: int) -> list[dict]:
    """(modality, path or values, question, reference) of the held-out splits' last items."""
    import pandas as pd

    rows = []
    for record in last(json.loads((DATA / "digits" / "test.json").read_text()), images):
        question = record["conversations"][0]["value"].replace("<image>\n", "")
        rows.append({"modality": "image", "path": DATA / "digits" / record["image"], "question": question,
                     "reference": record["conversations"][1]["value"]})
    for line in last((DATA / "speech" / "test.jsonl").read_text().splitlines(), clips):
        record = json.loads(line)
        rows.append({"modality": "audio", "path": DATA / "speech" / record["audio"],
                     "question": PROMPTS[record["language"]], "reference": record["text"],
                     "language": record["language"]})
    co2 = pd.read_csv(DATA / "series" / "co2.csv")["co2"].interpolate().to_numpy(np.float32)  # nan_policy
    for end in range(len(co2) - HORIZON, len(co2) - HORIZON - 6 * windows, -6):
        rows.append({"modality": "series", "values": co2[end - LOOKBACK:end].tolist(),
                     "question": SERIES_QUESTION, "reference": co2[end:end + HORIZON].tolist()})
    return rows


def last(items: list, n: int) -> list:
    """The last n items (none for 0, where items[-0:] is all of them)."""
    return items[max(len(items) - n, 0):] if n > 0 else []


def chat_answer(model: str, row: dict, scratch: Path):
    """`modrwkv chat`'s answer (or forecast) for the row, run in this process."""
    if row["modality"] == "series":
        path = scratch / "series.csv"
        path.write_text("\n".join(map(str, row["values"])) + "\n")
    else:
        path = row["path"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["chat", "--model", model, f"--{row['modality']}", str(path), "--question", row["question"]]) == 0
    text = out.getvalue()
    if row["modality"] == "series":
        return [float(v) for v in text.split("Forecast: ", 1)[1].split(", ")]
    return text.split("Assistant: ", 1)[1].strip()


def served_answer(url: str, row: dict):
    field = {"series": row.get("values")} if row["modality"] == "series" else {
        row["modality"]: base64.b64encode(Path(row["path"]).read_bytes()).decode()}
    body = json.dumps({"dataframe_records": [{"question": row["question"], **field}]}).encode()
    started = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(f"{url}/invocations", body,
                                                       {"Content-Type": "application/json"}), timeout=300) as r:
        (prediction,) = json.loads(r.read())["predictions"]
    return prediction.get("forecast", prediction.get("answer")), time.perf_counter() - started


def agrees(served, chat) -> bool:
    if isinstance(chat, list):
        return len(served) == len(chat) and np.allclose(served, chat, rtol=1e-5, atol=0)
    return served == chat


def score(modality: str, rows: list[dict]) -> tuple[str, float]:
    if modality == "image":
        return "accuracy", float(np.mean([r["served"].strip(".").lower() == r["reference"] for r in rows]))
    if modality == "audio":  # each language's rate where it has clips (the test clips alternate en, zh)
        rates = []
        for language, rate in (("en", word_error_rate), ("zh", character_error_rate)):
            chosen = [r for r in rows if r["language"] == language]
            rates.append(f"{rate([r['reference'] for r in chosen], [r['served'] for r in chosen]).rate:.3f}"
                         if chosen else "—")
        return "WER en / CER zh", " / ".join(rates)
    return "MSE (ppm²)", float(np.mean([(np.array(r["served"]) - r["reference"]) ** 2 for r in rows]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="default: the registered version runs/demo/summary.json names")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    args = parser.parse_args()
    summary = json.loads((ROOT / "runs" / "demo" / "summary.json").read_text())
    os.environ["MLFLOW_TRACKING_URI"] = summary["mlflow"]
    model = args.model or summary["registered"]
    rows = requests(args.images, args.clips, args.windows)
    scratch = args.out / "serving"
    scratch.mkdir(parents=True, exist_ok=True)
    for row in rows:
        row["chat"] = chat_answer(model, row, scratch)
    started = time.perf_counter()
    with start_model_server(model, scratch / "server") as server:
        startup = time.perf_counter() - started
        for row in rows:
            row["served"], row["seconds"] = served_answer(server.url, row)
    table, lines = [], [f"{model} served by `mlflow models serve` (start-up {startup:.1f} s) against `modrwkv chat`",
                        f"{'modality':<9} {'n':>3} {'= chat':>7} {'metric':<16} {'served score':>13} "
                        f"{'median ms':>10} {'p90 ms':>8}"]
    for modality in ("image", "audio", "series"):
        chosen = [r for r in rows if r["modality"] == modality]
        if not chosen:  # --images 0 and the like
            continue
        metric, value = score(modality, chosen)
        latencies = sorted(r["seconds"] * 1000 for r in chosen)
        entry = {"modality": modality, "n": len(chosen), "equal_to_chat": sum(agrees(r["served"], r["chat"])
                                                                              for r in chosen),
                 "metric": metric, "served_score": value, "median_ms": statistics.median(latencies),
                 "p90_ms": float(np.percentile(latencies, 90))}  # interpolated between the nearest two
        table.append(entry)
        shown = f"{value:.4f}" if isinstance(value, float) else value
        lines.append(f"{modality:<9} {entry['n']:>3} {entry['equal_to_chat']:>7} {metric:<16} {shown:>13} "
                     f"{entry['median_ms']:>10.0f} {entry['p90_ms']:>8.0f}")
    print("\n".join(lines))
    result = {"model": model, "startup_s": startup, "table": table,
              "rows": [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in rows]}
    (args.out / "serving.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
