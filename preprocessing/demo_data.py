"""`modrwkv data demo`: small real datasets written in the standard formats, so the demo and the tests go
through the same readers as real data.

- digits VQA (LLaVA JSON): sklearn's bundled handwritten digits as PNGs, "What digit is this?" -> "seven";
- spoken digits (ASR JSONL): English and Mandarin digit strings synthesised by espeak-ng, 16 kHz WAV;
- forecasting (CSV): statsmodels' bundled CO2 (weekly), sunspots (yearly) and El Niño (monthly) series.
"""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
HANZI = "零一二三四五六七八九"
QUESTION = "<image>\nWhat digit is this?"


def write_json(path: Path, records, lines: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if lines:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")


def build_digits(out: Path, n_train: int, n_test: int) -> None:
    """Train from the front of sklearn's 1797 digits, test from the back: the splits never share an image."""
    from sklearn.datasets import load_digits  # the [demo] extra

    digits = load_digits()
    (out / "images").mkdir(parents=True, exist_ok=True)
    splits = {"train": range(n_train), "test": range(len(digits.target) - n_test, len(digits.target))}
    for split, indices in splits.items():
        records = []
        for i in indices:
            name = f"images/digit-{i:04d}.png"
            pixels = (255 - digits.images[i] * 15).astype(np.uint8)  # 0..16 ink -> dark on white
            Image.fromarray(pixels).resize((32, 32), Image.NEAREST).save(out / name)
            records.append({"id": f"digit-{i:04d}", "image": name, "conversations": [
                {"from": "human", "value": QUESTION}, {"from": "gpt", "value": WORDS[digits.target[i]]}]})
        write_json(out / f"{split}.json", records)


def require_espeak() -> None:
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        raise FileNotFoundError(f"{' and '.join(missing)} not found: install Debian's espeak-ng and sox "
                                "(`make demo` installs them when run as root)")


def synthesise(text: str, voice: str, path: Path) -> None:
    speech = subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "--stdout", text], check=True, capture_output=True).stdout
    # -R: sox dithers with a fixed seed, so a rebuilt set is byte for byte the same and its cached features are reused
    subprocess.run(["sox", "-R", "-v", "0.8", "-t", "wav", "-", "-r", "16000", "-c", "1", "-b", "16", str(path)],
                   input=speech, check=True, capture_output=True)


HELD_OUT = 125  # of the 1,000 three-digit strings, those only the test split says (a fixed shuffle picks them)


def speech_texts(split: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, language) of a split's utterances: three-digit strings, English and Mandarin in turn. Each split
    draws with its own generator from its own part of the strings (`HELD_OUT` of them for the test split), so no
    test utterance's words are heard in training, and the test set does not depend on the training set's size."""
    shuffled = np.random.default_rng(seed).permutation(1000)
    strings = shuffled[:HELD_OUT] if split == "test" else shuffled[HELD_OUT:]
    rng = np.random.default_rng([seed, split == "test"])
    texts = []
    for i in range(n):
        number = int(strings[rng.integers(len(strings))])
        digits = (number // 100, number // 10 % 10, number % 10)
        english = i % 2 == 0
        texts.append((" ".join(WORDS[d] for d in digits) if english else "".join(HANZI[d] for d in digits),
                      "en" if english else "zh"))
    return texts


def speech_is_current(folder: Path, seed: int = 0) -> bool:
    """Whether `folder` holds the test utterances `build_speech` writes now (a build before 2026-12-05 drew its
    test strings without holding them out of training)."""
    path = Path(folder) / "test.jsonl"
    if not path.is_file():
        return False
    said = [(r["text"], r["language"]) for r in map(json.loads, path.read_text().splitlines())]
    return said == speech_texts("test", len(said), seed)


def build_speech(out: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """`speech_texts` of each split, spoken by espeak-ng (English and Mandarin voices)."""
    require_espeak()
    (out / "audio").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        records = []
        for i, (text, language) in enumerate(speech_texts(split, n, seed)):
            name = f"audio/{split}-{i:04d}.wav"
            synthesise(text, "en-us" if language == "en" else "cmn", out / name)
            records.append({"id": f"{split}-{i:04d}", "audio": name, "text": text, "language": language})
        write_json(out / f"{split}.jsonl", records, lines=True)


def build_series(out: Path) -> None:
    import pandas as pd  # with statsmodels' datasets (the [demo] extra), which return pandas frames
    from statsmodels import datasets

    out.mkdir(parents=True, exist_ok=True)
    co2 = datasets.co2.load_pandas().data  # weekly, with gaps (NaN) left as they are
    pd.DataFrame({"week": co2.index.strftime("%Y-%m-%d"), "co2": co2["co2"].to_numpy()}).to_csv(out / "co2.csv", index=False)
    sun = datasets.sunspots.load_pandas().data
    pd.DataFrame({"year": sun["YEAR"].astype(int), "sunspots": sun["SUNACTIVITY"]}).to_csv(out / "sunspots.csv", index=False)
    nino = datasets.elnino.load_pandas().data
    monthly = nino.drop(columns="YEAR").to_numpy().reshape(-1)
    pd.DataFrame({"month": np.arange(len(monthly)), "sst": monthly}).to_csv(out / "elnino.csv", index=False)


SPEECH_SIZES = (384, 48)  # training and test utterances
DIGITS_SIZES = (256, 100)  # training and test images
BUILDERS = {  # each dataset's builder, by its folder under the demo data
    "digits": lambda out: build_digits(out, *DIGITS_SIZES),
    "speech": lambda out: build_speech(out, *SPEECH_SIZES),
    "series": build_series,
}


def build_demo_data(out) -> Path:
    out = Path(out)
    for name, build in BUILDERS.items():
        build(out / name)
    return out


def missing_datasets(out) -> list[str]:
    """The demo datasets under `out` not built whole, or built before the current speech test split: a build cut
    short (Ctrl-C in the speech) left the ones after it missing, and a check of the digits alone never made them."""
    out = Path(out)
    present = {"digits": (out / "digits" / "test.json").is_file(), "speech": speech_is_current(out / "speech"),
               "series": all((out / "series" / f"{name}.csv").is_file() for name in ("co2", "sunspots", "elnino"))}
    return [name for name in BUILDERS if not present[name]]
