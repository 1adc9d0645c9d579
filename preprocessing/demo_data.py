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


def build_digits(out: Path, n_train: int, n_test: int, n_val: int = 0) -> None:
    """Train from the front of sklearn's 1797 digits, val right after it, test from the back: no two splits share
    an image, and growing val or test leaves the training images as they were."""
    from sklearn.datasets import load_digits  # the [demo] extra

    digits = load_digits()
    total = len(digits.target)
    if n_train + n_val + n_test > total:
        raise ValueError(f"{n_train} + {n_val} + {n_test} digit images asked for; sklearn has {total}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    splits = {"train": range(n_train), "val": range(n_train, n_train + n_val), "test": range(total - n_test, total)}
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


HELD_OUT = 125  # of the 1,000 three-digit strings, those only the test split says, and as many only val says
SPLIT_SEEDS = {"train": 0, "test": 1, "val": 2}  # each split's own generator (train's and test's as before val)


def split_strings(split: str, seed: int = 0) -> np.ndarray:
    """The three-digit strings a split draws from: a fixed shuffle's first `HELD_OUT` for test, the next
    `HELD_OUT` for val, the rest for training."""
    shuffled = np.random.default_rng(seed).permutation(1000)
    parts = {"test": shuffled[:HELD_OUT], "val": shuffled[HELD_OUT : 2 * HELD_OUT], "train": shuffled[2 * HELD_OUT :]}
    return parts[split]


def speech_texts(split: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, language) of a split's utterances: three-digit strings, English and Mandarin in turn. Each split
    draws with its own generator from its own part of the strings (`split_strings`), so no val or test utterance's
    words are heard in training, val's strings are not test's, and no split depends on another's size."""
    strings = split_strings(split, seed)
    rng = np.random.default_rng([seed, SPLIT_SEEDS[split]])
    texts = []
    for i in range(n):
        number = int(strings[rng.integers(len(strings))])
        digits = (number // 100, number // 10 % 10, number % 10)
        english = i % 2 == 0
        texts.append((" ".join(WORDS[d] for d in digits) if english else "".join(HANZI[d] for d in digits),
                      "en" if english else "zh"))
    return texts


def speech_is_current(folder: Path, sizes: dict[str, int] | None = None, seed: int = 0) -> bool:
    """Whether `folder` holds the utterances `build_speech(folder, **sizes)` writes now (`SPEECH_SIZES` by default),
    in every split and with every clip: a build before 2026-12-05 drew its test strings without holding them out of
    training, one before 2026-12-06 had no val split, and a smaller build, or one cut short, passed for current."""
    sizes = sizes or SPEECH_SIZES
    for split in SPLIT_SEEDS:
        path = Path(folder) / f"{split}.jsonl"
        if not path.is_file():
            return False
        records = list(map(json.loads, path.read_text().splitlines()))
        if [(r["text"], r["language"]) for r in records] != speech_texts(split, sizes[f"n_{split}"], seed):
            return False
        if not all((Path(folder) / r["audio"]).is_file() for r in records):
            return False
    return True


def digits_are_current(folder: Path, sizes: dict[str, int] | None = None) -> bool:
    """Whether `folder` holds each split of `build_digits(folder, **sizes)` (`DIGITS_SIZES` by default) whole."""
    sizes = sizes or DIGITS_SIZES
    for split in ("train", "val", "test"):
        path = Path(folder) / f"{split}.json"
        if not path.is_file() or len(json.loads(path.read_text())) != sizes[f"n_{split}"]:
            return False
    return True


def build_speech(out: Path, n_train: int, n_test: int, n_val: int, seed: int = 0) -> None:
    """`speech_texts` of each split, spoken by espeak-ng (English and Mandarin voices)."""
    require_espeak()
    (out / "audio").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
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


SPEECH_SIZES = {"n_train": 384, "n_val": 48, "n_test": 48}  # utterances
DIGITS_SIZES = {"n_train": 256, "n_val": 100, "n_test": 100}  # images
BUILDERS = {  # each dataset's builder, by its folder under the demo data
    "digits": lambda out: build_digits(out, **DIGITS_SIZES),
    "speech": lambda out: build_speech(out, **SPEECH_SIZES),
    "series": build_series,
}


def build_demo_data(out) -> Path:
    out = Path(out)
    for name, build in BUILDERS.items():
        build(out / name)
    return out


def missing_datasets(out) -> list[str]:
    """The demo datasets under `out` not built whole, or built before the current speech or digit splits: a build
    cut short (Ctrl-C in the speech) left the ones after it missing, and a check of the digits alone never made
    them."""
    out = Path(out)
    present = {"digits": digits_are_current(out / "digits"), "speech": speech_is_current(out / "speech"),
               "series": all((out / "series" / f"{name}.csv").is_file() for name in ("co2", "sunspots", "elnino"))}
    return [name for name in BUILDERS if not present[name]]
