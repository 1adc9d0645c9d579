"""Dataset readers: standard formats in, descriptors with provenance out, bad records rejected with reasons."""

import json

import numpy as np
import pytest

from preprocessing.readers import read_asr_manifest, read_librispeech, read_llava, read_series, sample_key


def test_sample_keys_are_stable_safe_and_distinct():
    assert sample_key("digit-0007") == "digit-0007"
    odd = [sample_key(x) for x in ("a.b", "a/b", "a b", 17)]
    assert all("." not in k and "/" not in k for k in odd)
    assert len(set(odd[:3])) == 3 and sample_key("a.b") == sample_key("a.b")


def test_llava_json_and_jsonl(tmp_path):
    good = {"id": "s1", "image": "img/1.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "grey"}]}
    bad = [
        {"id": "no-conv", "image": "x.png"},
        {"id": "two-images-one-tag", "image": ["a.png", "b.png"], "conversations": good["conversations"]},
        {"id": "wrong-role", "image": "a.png", "conversations": [{"from": "robot", "value": "<image>"}]},
        ["not", "an", "object"],
    ]
    (tmp_path / "data.json").write_text(json.dumps([good, *bad, good]))
    samples, rejects = read_llava(str(tmp_path / "data.json"), image_root="/imgs")
    assert [s.key for s in samples] == ["s1"]
    assert samples[0].sources == ["/imgs/img/1.png"]
    assert [t["role"] for t in samples[0].meta["turns"]] == ["user", "assistant", "user", "assistant"]
    reasons = [r.reason for r in rejects]
    assert "'conversations' must be a non-empty list" in reasons[0]
    assert "1 <image> placeholders for 2 images" in reasons[1]
    assert "'from': 'human'|'gpt'" in reasons[2]
    assert "an object with an 'id'" in reasons[3]
    assert reasons[4] == "duplicate sample id" and len(rejects) == 5
    assert rejects[0].source.endswith("data.json[1]")

    (tmp_path / "data.jsonl").write_text(json.dumps(good) + "\n{broken\n")
    samples, rejects = read_llava(str(tmp_path / "data.jsonl"))
    assert samples[0].sources == [str(tmp_path / "img/1.png")]  # relative to the manifest's folder
    assert rejects[0].source.endswith("data.jsonl:2") and "invalid JSON" in rejects[0].reason


def test_asr_manifest_and_librispeech_folders(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"audio": "a/x.wav", "text": "hello", "language": "en"}\n{"audio": 3}\n')
    samples, rejects = read_asr_manifest(str(tmp_path / "m.jsonl"))
    assert samples[0].key == "x" and samples[0].meta["turns"][1] == {"role": "assistant", "text": "hello"}
    assert "<audio>" in samples[0].meta["turns"][0]["text"]
    assert len(rejects) == 1 and rejects[0].source.endswith("m.jsonl:2")

    chapter = tmp_path / "ls" / "19" / "198"
    chapter.mkdir(parents=True)
    (chapter / "19-198.trans.txt").write_text("19-198-0000 NORTHANGER ABBEY\n19-198-0001 CHAPTER ONE\n")
    samples, rejects = read_librispeech(str(tmp_path / "ls"))
    assert [s.key for s in samples] == ["19-198-0000", "19-198-0001"] and not rejects
    assert samples[1].sources == [str(chapter / "19-198-0001.flac")] and samples[1].meta["text"] == "CHAPTER ONE"


def test_series_windows_split_by_time(tmp_path):
    n = 100
    rows = ["t,a,b,empty"] + [f"{i},{i},{2 * i},nan" for i in range(n)]
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    kwargs = dict(lookback=10, horizon=5, stride=5, columns=["a", "b", "empty", "nope"], time_column="t")
    by_split = {split: read_series(str(tmp_path / "s.csv"), split=split, **kwargs) for split in ("train", "val", "test")}
    train, rejects = by_split["train"]
    assert {r.reason for r in rejects} == {"the column has no finite values",
                                           "no column 'nope'; columns: ['t', 'a', 'b', 'empty']"}
    # train covers rows [0, 70): horizons end by row 70
    a = [s for s in train if s.meta["column"] == "a"]
    assert a[0].series["lookback"] == list(range(10)) and a[0].series["target"] == list(range(10, 15))
    assert max(s.meta["start"] for s in a) + 15 <= 70
    val = [s for s in by_split["val"][0] if s.meta["column"] == "a"]
    test = [s for s in by_split["test"][0] if s.meta["column"] == "a"]
    assert all(70 <= s.meta["start"] + 10 and s.meta["start"] + 15 <= 80 for s in val) and val
    assert all(80 <= s.meta["start"] + 10 for s in test) and test[-1].meta["start"] + 15 <= n
    targets = [tuple(s.series["target"]) for s in a + val + test]
    assert len(targets) == len(set(targets))  # no horizon appears in two splits


def test_series_gaps_are_interpolated_or_rejected(tmp_path):
    values = np.arange(40, dtype=float)
    values[5] = np.nan
    (tmp_path / "g.csv").write_text("v\n" + "\n".join("nan" if np.isnan(v) else str(v) for v in values) + "\n")
    filled, _ = read_series(str(tmp_path / "g.csv"), lookback=8, horizon=2, stride=10, nan_policy="interpolate")
    assert filled[0].series["lookback"][5] == pytest.approx(5.0)
    kept, _ = read_series(str(tmp_path / "g.csv"), lookback=8, horizon=2, stride=10)
    assert np.isnan(kept[0].series["lookback"][5])  # left for the validate stage, which rejects the window
