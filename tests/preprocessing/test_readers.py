"""Dataset readers: standard formats in, descriptors with provenance out, bad records rejected with reasons."""

import json
import re
import shutil

import numpy as np
import pytest

from preprocessing.readers import read_aishell, read_asr_manifest, read_librispeech, read_llava, read_series, sample_key
from preprocessing.readers.llava import answer_letter
from preprocessing.readers.series import TooManyWindows


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
        {"id": "answers-not-a-list", "image": "a.png", "answers": "cat", "conversations": good["conversations"]},
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
    assert "'answers' must be a non-empty list of strings" in reasons[4]
    assert reasons[5] == "duplicate sample id" and len(rejects) == 6
    assert rejects[0].source.endswith("data.json[1]")

    (tmp_path / "data.jsonl").write_text(json.dumps({**good, "answers": ["cat"] * 10}) + "\n{broken\n")
    samples, rejects = read_llava(str(tmp_path / "data.jsonl"))
    assert samples[0].sources == [str(tmp_path / "img/1.png")]  # relative to the manifest's folder
    assert samples[0].meta["answers"] == ["cat"] * 10  # a VQAv2-style question's, kept for its scoring
    assert rejects[0].source.endswith("data.jsonl:2") and "invalid JSON" in rejects[0].reason

    # "image": null, as a table exported to JSON writes a text-only sample's, is no image
    text_only = {"id": "t", "image": None, "conversations": [{"from": "human", "value": "Hi?"},
                                                              {"from": "gpt", "value": "Hello."}]}
    (tmp_path / "text.json").write_text(json.dumps([text_only]))
    samples, rejects = read_llava(str(tmp_path / "text.json"))
    assert [s.sources for s in samples] == [[]] and not rejects


def test_llava_multiple_choice_records_keep_their_options_and_answer_with_a_letter(tmp_path):
    def record(key, options, answer):
        return {"id": key, "image": "q.png", "options": options, "conversations": [
            {"from": "human", "value": "<image>\nWhich animal?\nA. cat\nB. dog\nAnswer with the option's letter."},
            {"from": "gpt", "value": answer}]}

    records = [record("plain", ["cat", "dog"], "B"), record("dotted", ["cat", "dog"], "A."),
               record("bracketed", ["cat", "dog"], " (B)\n"), record("stated", ["cat", "dog"], "The answer is B."),
               record("lecture", ["cat", "dog"], "Dogs bark.\nThe answer is (B)."),  # LLaVA's ScienceQA forms
               record("not-a-list", "cat, dog", "A"), record("one-option", ["cat"], "A"),
               record("blank-option", ["cat", " "], "A"), record("option-text", ["cat", "dog"], "dog"),
               record("past-the-options", ["cat", "dog"], "C"), record("lowercase", ["cat", "dog"], "b")]
    (tmp_path / "mc.json").write_text(json.dumps(records))
    samples, rejects = read_llava(str(tmp_path / "mc.json"))
    assert [s.key for s in samples] == ["plain", "dotted", "bracketed", "stated", "lecture"]
    assert [answer_letter(s.meta["turns"][1]["text"], 2) for s in samples] == ["B", "A", "B", "B", "B"]
    assert all(s.meta["options"] == ["cat", "dog"] for s in samples)  # kept for choice_accuracy
    assert [r.key for r in rejects] == ["not-a-list", "one-option", "blank-option", "option-text",
                                        "past-the-options", "lowercase"]
    assert all("'options' must be a list of 2 to 26 non-empty strings" in r.reason for r in rejects[:3])
    assert rejects[3].reason.startswith("the answer 'dog' names none of the options' letters A-B")
    assert "'C'" in rejects[4].reason and "'b'" in rejects[5].reason


def test_asr_manifest_and_librispeech_folders(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"audio": "a/x.wav", "text": "hello", "language": "en"}\n{"audio": 3}\n')
    samples, rejects = read_asr_manifest(str(tmp_path / "m.jsonl"))
    assert samples[0].key == sample_key("a/x") and samples[0].meta["turns"][1] == {"role": "assistant", "text": "hello"}
    assert "<audio>" in samples[0].meta["turns"][0]["text"]
    assert len(rejects) == 1 and rejects[0].source.endswith("m.jsonl:2")

    chapter = tmp_path / "ls" / "19" / "198"
    chapter.mkdir(parents=True)
    (chapter / "19-198.trans.txt").write_text("19-198-0000 NORTHANGER ABBEY\n19-198-0001 CHAPTER ONE\n"
                                              " 19-198-0002\tBY JANE AUSTEN\n19-198-0003\n")
    samples, rejects = read_librispeech(str(tmp_path / "ls"))
    assert [s.key for s in samples] == ["19-198-0000", "19-198-0001", "19-198-0002"]
    assert samples[1].sources == [str(chapter / "19-198-0001.flac")] and samples[1].meta["text"] == "CHAPTER ONE"
    assert samples[2].sources == [str(chapter / "19-198-0002.flac")] and samples[2].meta["text"] == "BY JANE AUSTEN"
    assert [(r.key, r.reason) for r in rejects] == [("19-198-0003", "a transcript line must be '<utterance id> "
                                                                    "<words>'")]


def test_aishell_as_it_ships(tmp_path):
    """data_aishell: one transcript for every split, a split's audio in speaker folders; the words' spaces go (CER
    counts characters), a .wav the transcript has no words for is rejected, a symlink out of the split is too."""
    (tmp_path / "transcript").mkdir()
    transcript = tmp_path / "transcript" / "aishell_transcript_v0.8.txt"
    transcript.write_text("BAC009S0764W0121 甚至 出现 交易 几乎 停滞 的 情况\n"
                          "BAC009S0764W0122 一二线 城市 虽然 也 处于 调整 中\n"
                          "BAC009S0002W0122 而 对 楼市 成交 抑制 作用 最 大 的 限 购\n"  # a training utterance
                          "BAC009S0764W0124\n")  # an id without words
    test = tmp_path / "wav" / "test"
    (test / "S0764").mkdir(parents=True)
    (tmp_path / "elsewhere.wav").write_bytes(b"not opened by the reader")
    for name in ("BAC009S0764W0121", "BAC009S0764W0122", "BAC009S0764W0123", "BAC009S0764W0124"):
        (test / "S0764" / f"{name}.wav").write_bytes(b"RIFF")
    (test / "S0764" / "BAC009S0764W0125.wav").symlink_to(tmp_path / "elsewhere.wav")
    transcript.write_text(transcript.read_text() + "BAC009S0764W0125 链接\n")
    # an utterance transcribed twice alike is kept; twice apart, rejected naming both lines (which is right?)
    (test / "S0764" / "BAC009S0764W0127.wav").write_bytes(b"RIFF")
    transcript.write_text(transcript.read_text() + "BAC009S0764W0127 一 二\nBAC009S0764W0127 三 四\n"
                          "BAC009S0764W0121 甚至 出现 交易 几乎 停滞 的 情况\n")
    # lines that are not UTF-8: one a training utterance's (not this split's to count), one a test utterance's
    (test / "S0764" / "BAC009S0764W0126.wav").write_bytes(b"RIFF")
    with transcript.open("ab") as f:
        f.write("BAC009S0002W0123 楼市\n".encode("gb18030") + "BAC009S0764W0126 楼市\n".encode("gb18030"))
    samples, rejects = read_aishell(str(transcript), str(test))
    assert [s.key for s in samples] == ["BAC009S0764W0121", "BAC009S0764W0122"]
    assert samples[0].meta["text"] == "甚至出现交易几乎停滞的情况" and samples[0].meta["language"] == "zh"
    assert samples[1].sources == [str(test / "S0764" / "BAC009S0764W0122.wav")]
    assert samples[1].meta["source"] == f"{transcript}:2"
    assert [(r.key, r.reason.split(" in ")[0]) for r in rejects[:2]] == [
        ("BAC009S0764W0123", "no transcribed words for it"), ("BAC009S0764W0124", "no transcribed words for it")]
    assert rejects[0].source == str(test / "S0764" / "BAC009S0764W0123.wav") and rejects[1].source == f"{transcript}:4"
    assert "outside the media root" in rejects[2].reason
    assert (rejects[3].key, rejects[3].source) == ("BAC009S0764W0126", f"{transcript}:10")
    assert rejects[3].reason.startswith("not UTF-8 text")
    assert (rejects[4].key, rejects[4].reason) == ("BAC009S0764W0127", f"transcript lines {transcript}:6, "
                                                   f"{transcript}:7 give it different words")
    assert len(rejects) == 5  # 7 files = 2 samples + 5 rejects


def test_asr_samples_without_an_id_are_named_by_their_path(tmp_path):
    """Named by the file's name alone, spk1/001.wav and spk2/001.wav were one id, and the second was rejected as a
    duplicate. A given id names its sample as before (0 included); a bad 'language' rejects its line only."""
    lines = [{"audio": "spk1/001.wav", "text": "one"}, {"audio": "./spk2/001.wav", "text": "two"},
             {"audio": "003.wav", "text": "three"}, {"id": "given", "audio": "spk1/004.wav", "text": "four"},
             {"id": 0, "audio": "spk1/005.wav", "text": "five"},
             {"audio": "spk1/006.wav", "text": "six", "language": ["en"]}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    samples, rejects = read_asr_manifest(str(tmp_path / "m.jsonl"))
    assert [s.key for s in samples] == [sample_key("spk1/001"), sample_key("spk2/001"), "003", "given", "0"]
    assert samples[1].sources == [str(tmp_path / "spk2/001.wav")]
    assert [r.to_dict() for r in rejects] == [{"key": sample_key("spk1/006"), "source": f"{tmp_path / 'm.jsonl'}:6",
                                               "stage": "read", "reason": "'language' must be a string, got ['en']"}]


def test_a_line_that_is_not_utf8_is_rejected_and_the_others_are_read(tmp_path):
    good = json.dumps({"id": "a", "conversations": conversation(0)}).encode()
    latin1 = '{"id": "b", "conversations": [{"from": "human", "value": "caf\u00e9"}]}'.encode("latin-1")
    (tmp_path / "v.jsonl").write_bytes(b"\n".join([good, latin1, good.replace(b'"a"', b'"c"')]) + b"\n")
    samples, rejects = read_llava(str(tmp_path / "v.jsonl"))
    assert [s.key for s in samples] == ["a", "c"]
    assert [(r.source, r.reason) for r in rejects] == [(f"{tmp_path / 'v.jsonl'}:2", "not UTF-8 text: byte 0xe9 at "
                                                        "offset 61 of the line (invalid continuation byte)")]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + good + b"\n")  # saved by a Windows editor
    assert read_llava(str(tmp_path / "bom.jsonl"))[0][0].key == "a"

    chapter = tmp_path / "ls" / "19" / "198"
    chapter.mkdir(parents=True)
    (chapter / "19-198.trans.txt").write_bytes(b"19-198-0000 CAF\xc9\n19-198-0001 CHAPTER ONE\n")
    samples, rejects = read_librispeech(str(tmp_path / "ls"))
    assert [s.key for s in samples] == ["19-198-0001"] and rejects[0].source.endswith("19-198.trans.txt:1")


def test_records_holding_a_lone_surrogate_are_rejected_and_a_byte_order_mark_is_no_text(tmp_path):
    """JSON may escape half of a UTF-16 pair ("\\ud800"), which no UTF-8 shard can hold: the record is rejected, in
    a JSON list or a JSONL or an ASR manifest alike, where it stopped the job when its shard was written."""
    good = {"id": "s1", "image": "1.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                             {"from": "gpt", "value": "a cat"}]}
    text = json.dumps([good, {**good, "id": "bad\ud800"}])
    (tmp_path / "data.json").write_bytes(b"\xef\xbb\xbf" + text.encode())  # with a byte-order mark
    samples, rejects = read_llava(str(tmp_path / "data.json"))
    assert [s.key for s in samples] == ["s1"]
    assert [(r.source.rsplit("/", 1)[1], r.reason) for r in rejects] == [
        ("data.json[1]", "holds text that is not Unicode: a lone surrogate '\\ud800'")]
    (tmp_path / "asr.jsonl").write_text('{"audio": "a\\udc80.wav", "text": "hi"}\n{"audio": "b.wav", "text": "hi"}\n')
    samples, rejects = read_asr_manifest(str(tmp_path / "asr.jsonl"))
    assert [s.key for s in samples] == ["b"] and rejects[0].source.endswith("asr.jsonl:1")
    assert sample_key("bad\ud800").startswith("bad_-")  # a key for any id, whatever it holds


def test_a_record_naming_a_key_twice_is_rejected_not_read_as_its_last_value(tmp_path):
    """{"from": "human", "from": "gpt"} parsed as "gpt", silently: a turn whose writer meant the other was trained
    as said by the model. The record is rejected naming the key, in a JSON list, a JSONL and an ASR manifest alike."""
    turns = '[{"from": "human", "value": "<image>\\nWhat?"}, {"from": "gpt", "value": "a cat"}]'
    twice = '[{"from": "human", "from": "gpt", "value": "<image>\\nWhat?"}, {"from": "gpt", "value": "a cat"}]'
    records = [f'{{"id": "s1", "image": "1.png", "conversations": {turns}}}',
               f'{{"id": "s2", "image": "2.png", "conversations": {twice}}}',
               f'{{"id": "s3", "id": "s4", "image": "3.png", "conversations": {turns}}}']
    (tmp_path / "data.json").write_text("[" + ",\n".join(records) + "]")
    (tmp_path / "data.jsonl").write_text("\n".join(records) + "\n")
    for name, places in (("data.json", ("data.json[1]", "data.json[2]")),
                         ("data.jsonl", ("data.jsonl:2", "data.jsonl:3"))):
        samples, rejects = read_llava(str(tmp_path / name))
        assert [s.key for s in samples] == ["s1"]
        assert [(r.source.rsplit("/", 1)[1], r.reason.split(" in one")[0]) for r in rejects] == [
            (places[0], "names the key 'from' twice"), (places[1], "names the key 'id' twice")]
    (tmp_path / "asr.jsonl").write_text('{"audio": "a.wav", "text": "hi", "text": "bye"}\n'
                                        '{"audio": "b.wav", "text": "hi"}\n')
    samples, rejects = read_asr_manifest(str(tmp_path / "asr.jsonl"))
    assert [s.key for s in samples] == ["b"] and "names the key 'text' twice" in rejects[0].reason


def test_a_json_file_that_does_not_parse_is_an_error_naming_it(tmp_path):
    (tmp_path / "v.json").write_text('[{"id": "a"},]')
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'v.json'}: not a readable JSON file: Expecting "
                                                   "value: line 1 column 14")):
        read_llava(str(tmp_path / "v.json"))
    (tmp_path / "v.json").write_bytes(b'[{"id": "caf\xe9"}]')
    with pytest.raises(ValueError, match="v.json: not a readable JSON file: 'utf-8' codec can't decode byte 0xe9"):
        read_llava(str(tmp_path / "v.json"))
    # what Python's parser raises besides JSONDecodeError: nesting past the stack, an integer of 5,000 digits
    for text, reason in (("[" * 200_000, "maximum recursion depth exceeded"), ('[{"id": ' + "1" * 5000 + "}]",
                                                                               "Exceeds the limit")):
        (tmp_path / "v.json").write_text(text)
        with pytest.raises(ValueError, match=f"v.json: not a readable JSON file: {reason}"):
            read_llava(str(tmp_path / "v.json"))


def test_a_jsonl_line_python_cannot_parse_or_an_id_that_names_nothing_rejects_that_line_only(tmp_path):
    """A line nested past the stack (RecursionError) or holding an integer of over 4,300 digits (a plain ValueError)
    escaped the per-line reject and stopped the job naming neither file nor line; an ASR manifest keyed a sample by
    any JSON value's Python text ("True", "{'a': 1}"), where LLaVA's reader refuses such ids."""
    good = {"audio": "a.wav", "text": "hi"}
    lines = ["[" * 200_000, '{"id": ' + "1" * 5000 + ', "audio": "b.wav", "text": "hi"}', json.dumps(good),
             json.dumps({**good, "id": True}), json.dumps({**good, "id": {"a": 1}})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    samples, rejects = read_asr_manifest(str(tmp_path / "m.jsonl"))
    assert [s.key for s in samples] == ["a"]
    assert [(r.source.rsplit(":", 1)[1], r.reason[:40]) for r in rejects] == [
        ("1", "invalid JSON: maximum recursion depth ex"), ("2", "invalid JSON: Exceeds the limit (4300 di"),
        ("4", "'id' must be a non-empty string or an in"), ("5", "'id' must be a non-empty string or an in")]


def as_lists(series: dict) -> dict:
    """A window's values (arrays) as lists, to compare with the rows written."""
    return {part: values.tolist() for part, values in series.items()}


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
    assert as_lists(a[0].series) == {"lookback": list(range(10)), "target": list(range(10, 15))}
    assert max(s.meta["start"] for s in a) + 15 <= 70
    val = [s for s in by_split["val"][0] if s.meta["column"] == "a"]
    test = [s for s in by_split["test"][0] if s.meta["column"] == "a"]
    assert all(70 <= s.meta["start"] + 10 and s.meta["start"] + 15 <= 80 for s in val) and val
    assert all(80 <= s.meta["start"] + 10 for s in test) and test[-1].meta["start"] + 15 <= n
    targets = [tuple(s.series["target"].tolist()) for s in a + val + test]
    assert len(targets) == len(set(targets))  # no horizon appears in two splits


def test_a_series_with_no_window_in_its_split_is_rejected_not_dropped(tmp_path):
    """130 values are enough for one window of 96 + 24, but not inside the first 70% (91) or the next 10%."""
    (tmp_path / "s.csv").write_text("a\n" + "\n".join(map(str, range(130))) + "\n")
    for split, rows in (("train", "0 to 91"), ("val", "91 to 104")):
        samples, rejects = read_series(str(tmp_path / "s.csv"), lookback=96, horizon=24, stride=24, split=split)
        assert samples == [] and [(r.source, r.reason) for r in rejects] == [(
            f"{tmp_path / 's.csv'}:a", f"the column has no {split} window: its {split} values, {rows}, hold no "
                                       "horizon of 24 with a lookback of 96 before it")]
    assert len(read_series(str(tmp_path / "s.csv"), lookback=96, horizon=24, stride=24, split="test")[0]) == 1


def test_fractions_cut_the_rows_where_the_time_series_library_does():
    """TSLib's borders for its 70/10/20 sets: train ends at int(0.7 n), test starts int(0.2 n) rows before the end.
    ECL's 26,304 rows: 18,412 and 21,044 (rounding both gave 18,413 and 21,043: one test window more, one row of
    training statistics different); Traffic's 17,544: 12,280 and 14,036."""
    from preprocessing.readers.series import split_range

    for n, train_end, test_start in ((26304, 18412, 21044), (17544, 12280, 14036)):
        assert [split_range(n, split, (0.7, 0.1, 0.2)) for split in ("train", "val", "test")] == [
            (0, train_end), (train_end, test_start), (test_start, n)]
    assert split_range(100, "test", (1.0, 0.0, 0.0)) == (100, 100)


def test_series_gaps_are_interpolated_or_rejected(tmp_path):
    values = np.arange(40, dtype=float)
    values[5] = np.nan
    (tmp_path / "g.csv").write_text("v\n" + "\n".join("nan" if np.isnan(v) else str(v) for v in values) + "\n")
    filled, _ = read_series(str(tmp_path / "g.csv"), lookback=8, horizon=2, stride=10, nan_policy="interpolate")
    assert filled[0].series["lookback"][5] == pytest.approx(5.0)
    kept, _ = read_series(str(tmp_path / "g.csv"), lookback=8, horizon=2, stride=10)
    assert np.isnan(kept[0].series["lookback"][5])  # left for the validate stage, which rejects the window
    # a gap at a lookback's end is held at its last value, not drawn toward the horizon it is to forecast
    step = np.array([0.0] * 8 + [10.0] * 2)
    step[7] = np.nan
    (tmp_path / "s.csv").write_text("v\n" + "\n".join("nan" if np.isnan(v) else str(v) for v in step) + "\n")
    (window,), _ = read_series(str(tmp_path / "s.csv"), lookback=8, horizon=2, stride=1, nan_policy="interpolate",
                               fractions=[1.0, 0.0, 0.0])
    assert window.series["lookback"].tolist() == [0.0] * 8 and window.series["target"].tolist() == [10.0] * 2


def test_series_column_names_given_twice(tmp_path):
    """A column listed twice is read once (its windows had the same keys: the manifest counted 12 written where the
    shards held 6); a column the header names twice is ambiguous, and rejected naming the file."""
    path = str(tmp_path / "s.csv")
    (tmp_path / "s.csv").write_text("\n".join(["v,w,w"] + [f"{i},{-i},{2 * i}" for i in range(40)]) + "\n")
    samples, rejects = read_series(path, lookback=8, horizon=2, stride=10, columns=["v", "v"], fractions=(1, 0, 0))
    assert [s.key for s in samples] == ["s-v-0", "s-v-10", "s-v-20", "s-v-30"] and not rejects
    samples, rejects = read_series(path, lookback=8, horizon=2, stride=10, fractions=(1, 0, 0))
    assert {s.meta["column"] for s in samples} == {"v"}
    assert [(r.source, r.reason) for r in rejects] == [(f"{path}:w", "the header names column 'w' 2 times")]


def test_a_series_file_pyarrow_cannot_read_is_an_error_naming_it(tmp_path):
    """Not the format, or damaged inside (a data page that does not decompress: pyarrow's OSError), alike."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "ragged.csv").write_text("v,w\n1,2\n3,4,5\n")
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    pq.write_table(pa.table({"v": [float(i) for i in range(2000)]}), tmp_path / "damaged.parquet",
                   compression="snappy")
    data = bytearray((tmp_path / "damaged.parquet").read_bytes())
    data[100:400] = bytes(300)  # inside the first data page, the footer intact
    (tmp_path / "damaged.parquet").write_bytes(bytes(data))
    for name, kind in (("ragged.csv", "csv"), ("fake.parquet", "parquet"), ("damaged.parquet", "parquet")):
        with pytest.raises(ValueError, match=f"{tmp_path / name}: not a readable {kind} file: "):
            read_series(str(tmp_path / name), lookback=1, horizon=1, stride=1)

    # an Arrow stream (save_to_disk's) cut between two record batches read as half its rows, without a word
    table = pa.table({"v": [float(i) for i in range(1000)]})
    with pa.ipc.new_stream(tmp_path / "whole.arrow", table.schema) as writer:
        for batch in table.to_batches(max_chunksize=250):
            writer.write_batch(batch)
    assert len(read_series(str(tmp_path / "whole.arrow"), lookback=8, horizon=2, stride=10)[0]) > 0
    data = (tmp_path / "whole.arrow").read_bytes()
    reader, ends = pa.BufferReader(data), []
    for _ in range(3):  # the schema and two batches
        pa.ipc.read_message(reader)
        ends.append(reader.tell())
    (tmp_path / "cut.arrow").write_bytes(data[:ends[-1]])
    assert pa.ipc.open_stream(data[:ends[-1]]).read_all().num_rows == 500  # what pyarrow reads of it
    with pytest.raises(ValueError, match=f"{tmp_path / 'cut.arrow'}: not a readable arrow file: the stream stops "
                                         "after .* bytes of record batches without its end-of-stream marker"):
        read_series(str(tmp_path / "cut.arrow"), lookback=8, horizon=2, stride=10)
    (tmp_path / "padded.arrow").write_bytes(data + bytes(8))  # zeros after the marker: whole
    assert len(read_series(str(tmp_path / "padded.arrow"), lookback=8, horizon=2, stride=10)[0]) > 0


def test_series_time_column_must_sort_in_time_order(tmp_path):
    """A CSV's dd/mm/yyyy dates are text, which sorted alphabetically scrambled the series (01/01, 01/02, 02/01):
    the time column must hold dates, timestamps or numbers, and its errors name the file."""
    days = [(d, m) for m in (1, 2) for d in range(1, 29)]
    (tmp_path / "dmy.csv").write_text("\n".join(["date,v"] + [f"{d:02d}/{m:02d}/2020,{i}" for i, (d, m) in
                                                              enumerate(days)]) + "\n")
    path = str(tmp_path / "dmy.csv")
    with pytest.raises(ValueError, match=re.escape(f"{path}: time column 'date' holds string values, which do not "
                                                   "sort in time order; give ISO dates")):
        read_series(path, lookback=8, horizon=2, stride=10, time_column="date")
    with pytest.raises(ValueError, match=re.escape(f"{path}: no time column 'Date'; columns: ['date', 'v']")):
        read_series(path, lookback=8, horizon=2, stride=10, time_column="Date")
    (tmp_path / "twice.csv").write_text("date,date,v\n2020-01-01,2020-01-01,1\n")
    with pytest.raises(ValueError, match="twice.csv: the header names the time column 'date' 2 times"):
        read_series(str(tmp_path / "twice.csv"), lookback=8, horizon=2, stride=10, time_column="date")
    # a time given to two rows (a clock's fall-back hour) repeated a step: every window across it a step off
    hours = [f"2020-10-25 {h:02d}:00" for h in range(24)]
    (tmp_path / "dst.csv").write_text("\n".join(["t,v"] + [f"{t},{i}" for i, t in enumerate(hours + hours[2:3])]))
    with pytest.raises(ValueError, match="dst.csv: time column 't' gives the time 2020-10-25 02:00:00 to more than "
                                         r"one row \(1 rows repeat a time in all\)"):
        read_series(str(tmp_path / "dst.csv"), lookback=8, horizon=2, stride=10, time_column="t")
    # in the long layout a row is a series: items that share a start are no repeated time
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"item_id": ["a", "b"], "start": pa.array([0, 0], pa.int64()),
                             "target": [[float(i) for i in range(40)], [float(-i) for i in range(40)]]}),
                   tmp_path / "long.parquet")
    assert len(read_series(str(tmp_path / "long.parquet"), lookback=8, horizon=2, stride=10, time_column="start")[0])

    for name, value in (("gap.csv", ""), ("nan.csv", "nan")):  # a row with no time, sorted last, ended the test split
        (tmp_path / name).write_text("\n".join(["t,v"] + [f"{value if i == 5 else i},{i}" for i in range(20)]) + "\n")
        with pytest.raises(ValueError, match=re.escape(f"{name}: time column 't' has no time in 1 of its 20 rows (the "
                                                       "first: data row 6); give each row its time")):
            read_series(str(tmp_path / name), lookback=4, horizon=2, stride=1, time_column="t")

    shuffled = np.random.default_rng(0).permutation(len(days))
    (tmp_path / "iso.csv").write_text("\n".join(["date,v"] + [f"2020-{days[i][1]:02d}-{days[i][0]:02d},{i}"
                                                              for i in shuffled]) + "\n")
    samples, _ = read_series(str(tmp_path / "iso.csv"), lookback=8, horizon=2, stride=10, time_column="date",
                             fractions=(1, 0, 0))
    assert as_lists(samples[0].series)["lookback"] == list(range(8))
    assert samples[-1].series["target"].tolist() == [48, 49]


def conversation(n_images=1):
    return [{"from": "human", "value": "<image>\n" * n_images + "What is it?"}, {"from": "gpt", "value": "a cat"}]


def test_media_paths_outside_the_root_are_rejected_before_they_are_opened(tmp_path):
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    (root / "img" / "ok.png").write_bytes(b"not opened by the reader")
    (root / "img" / "link.png").symlink_to("/etc/passwd")
    (root / "img" / "inner.png").symlink_to(root / "img" / "ok.png")  # a link that stays inside is fine
    records = [{"id": name, "image": path, "conversations": conversation()} for name, path in (
        ("ok", "img/ok.png"), ("inner", "img/inner.png"), ("climb", "../../etc/passwd"),
        ("absolute", "/etc/passwd"), ("symlink", "img/link.png"), ("uri", "s3://other-bucket/x.png"))]
    (root / "data.json").write_text(json.dumps(records))
    samples, rejects = read_llava(str(root / "data.json"))
    assert [s.key for s in samples] == ["ok", "inner"]
    reasons = {r.key: r.reason for r in rejects}
    assert set(reasons) == {"climb", "absolute", "symlink", "uri"}
    assert "outside the media root" in reasons["climb"] and "outside the media root" in reasons["symlink"]
    assert "is absolute" in reasons["absolute"] and "is absolute" in reasons["uri"]
    assert "/etc/passwd" in reasons["symlink"]  # names where it points

    opted_in, rejects = read_llava(str(root / "data.json"), allow_outside_root=True)
    assert len(opted_in) == 6 and not rejects
    # a symlink loop (RuntimeError from Path.resolve) rejects its record, where it stopped the job
    (root / "img" / "loop1").symlink_to(root / "img" / "loop2")
    (root / "img" / "loop2").symlink_to(root / "img" / "loop1")
    (root / "loop.json").write_text(json.dumps([{"id": "loop", "image": "img/loop1/x.png",
                                                  "conversations": conversation()}]))
    samples, rejects = read_llava(str(root / "loop.json"))
    assert not samples and rejects[0].key == "loop" and "media path 'img/loop1/x.png' does not resolve" in (
        rejects[0].reason)

    (root / "m.jsonl").write_text('{"audio": "../secret.wav", "text": "hi"}\n{"audio": "a/x.wav", "text": "hi"}\n')
    samples, rejects = read_asr_manifest(str(root / "m.jsonl"))
    assert [s.key for s in samples] == [sample_key("a/x")] and "outside the media root" in rejects[0].reason


def test_librispeech_audio_outside_the_dataset_folder_is_rejected(tmp_path):
    """A transcript's utterance id names its audio file: `..` in the id, or a symlinked .flac, must not reach out of
    the dataset's folder."""
    (tmp_path / "secret.flac").write_bytes(b"not opened by the reader")
    chapter = tmp_path / "ls" / "19" / "198"
    chapter.mkdir(parents=True)
    (chapter / "19-198-0002.flac").symlink_to(tmp_path / "secret.flac")
    (chapter / "19-198.trans.txt").write_text("19-198-0001 HELLO\n../../../secret CLIMB\n19-198-0002 LINK\n")
    samples, rejects = read_librispeech(str(tmp_path / "ls"))
    assert [s.key for s in samples] == ["19-198-0001"]
    assert [r.source for r in rejects] == [f"{chapter / '19-198.trans.txt'}:{n}" for n in (2, 3)]
    assert all("outside the media root" in r.reason for r in rejects) and rejects[1].key == "19-198-0002"

    opted_in, rejects = read_librispeech(str(tmp_path / "ls"), allow_outside_root=True)
    assert len(opted_in) == 3 and not rejects


def test_media_paths_under_an_s3_root_stay_under_its_prefix():
    from preprocessing import storage

    assert storage.media_path("s3://bucket/set", "img/a.png") == "s3://bucket/set/img/a.png"
    for root in ("s3://bucket/set", "/data/set"):  # rejected then as "no such file": a folder is none
        for path in ("", ".", "img/.."):
            with pytest.raises(ValueError, match=f"media path '{path}' names the media root {root} itself, not a file"):
                storage.media_path(root, path, allow_outside=root.startswith("/"))
    with pytest.raises(ValueError, match="leaves the media root"):
        storage.media_path("s3://bucket/set", "../other/a.png")
    with pytest.raises(ValueError, match="is absolute"):
        storage.media_path("s3://bucket/set", "s3://bucket/other/a.png")


def test_llava_conversations_that_share_their_images_id_are_all_kept(tmp_path):
    """LLaVA-Instruct-150K and llava_v1_5_mix665k name a conversation by its COCO image's id, and ~158K conversations
    share ~80K images: every conversation but the first about an image was rejected as a duplicate. Only a record
    repeated whole is one; an id used once keeps its plain key."""
    image = "coco/train2017/000000033471.jpg"
    records = [{"id": "000000033471", "image": image, "conversations": turns} for turns in (
        conversation(), [{"from": "human", "value": "What is the bus doing?\n<image>"},
                         {"from": "gpt", "value": "It is parked."}])]
    records += [records[1], {"id": 2338, "image": "vg/VG_100K/2338.jpg", "conversations": conversation()}]
    (tmp_path / "llava_v1_5_mix665k.json").write_text(json.dumps(records))
    samples, rejects = read_llava(str(tmp_path / "llava_v1_5_mix665k.json"))
    assert [s.meta["id"] for s in samples] == ["000000033471", "000000033471", "2338"]
    assert len({s.key for s in samples}) == 3 and samples[2].key == "2338"
    assert all(re.fullmatch(r"000000033471-[0-9a-f]{8}", s.key) for s in samples[:2])
    # the duplicate is named by its record, not by the image the other conversations share
    path = tmp_path / "llava_v1_5_mix665k.json"
    assert [(r.key, r.source, r.reason) for r in rejects] == [(samples[1].key, f"{path}[2]", "duplicate sample id")]
    again, _ = read_llava(str(path))
    assert [s.key for s in again] == [s.key for s in samples]  # stable: an entry's key is built from them

    # an id of null, "" or true keyed its sample "None", "-<hash>", "True": another's key, or none
    path.write_text(json.dumps([{"id": i, "image": image, "conversations": conversation()}
                                for i in (None, "", True, "None")]))
    samples, rejects = read_llava(str(path))
    assert [s.meta["id"] for s in samples] == ["None"] and [r.key for r in rejects] == [None] * 3
    assert [r.reason for r in rejects] == [f"'id' must be a non-empty string or an integer, got {v!r}"
                                           for v in (None, "", True)]


def test_a_date_column_is_no_series(tmp_path):
    """The Time-Series-Library's files (ETTh1.csv: date,HUFL,...,OT) lead with a `date` column that pyarrow parses
    as timestamps: read without a time column, it became a series of epoch seconds. Named in `columns`, it is
    rejected."""
    rows = [f"2016-07-01 {h:02d}:00:00,{h % 5}.5,{30 + h % 3}.1" for h in range(24)]
    (tmp_path / "ETTh1.csv").write_text("date,HUFL,OT\n" + "\n".join(rows) + "\n")
    samples, rejects = read_series(str(tmp_path / "ETTh1.csv"), lookback=8, horizon=4, stride=4, fractions=(1, 0, 0))
    assert {s.meta["column"] for s in samples} == {"HUFL", "OT"} and not rejects
    samples, rejects = read_series(str(tmp_path / "ETTh1.csv"), lookback=8, horizon=4, stride=4, fractions=(1, 0, 0),
                                   columns=["date", "OT"])
    assert {s.meta["column"] for s in samples} == {"OT"}
    assert [r.reason for r in rejects] == ["column 'date' holds timestamp[s] values: times, not a series"]


def test_series_in_the_long_layout_of_gift_eval(tmp_path):
    """GIFT-Eval as Hugging Face's save_to_disk writes it (an Arrow stream, one row per series: item_id, start, freq,
    target as [time] or [variate][time]): each row's target is a series per variate, split by time on its own;
    a null or short one is rejected naming its row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ramp = [float(i) for i in range(40)]
    table = pa.table({"item_id": ["a", "b", "c", "d"],
                      "start": pa.array([0, 0, 0, 0], pa.timestamp("s")),
                      "freq": ["H"] * 4,
                      "target": [ramp, [1.0, 2.0], None, [v * 2 for v in ramp]]})
    with pa.ipc.new_stream(tmp_path / "data-00000-of-00001.arrow", table.schema) as writer:
        writer.write_table(table)
    samples, rejects = read_series(str(tmp_path / "data-00000-of-00001.arrow"), 8, 4, 4, "train", [1.0, 0.0, 0.0])
    assert {s.meta["item"] for s in samples} == {"a", "d"} and len(samples) == 2 * 8  # (40 - 12) / 4 + 1 each
    first = next(s for s in samples if s.meta["item"] == "d")
    assert as_lists(first.series) == {"lookback": [v * 2 for v in ramp[:8]], "target": [v * 2 for v in ramp[8:12]]}
    assert first.key == sample_key("data-00000-of-00001-target-d-0")
    assert [(r.source.rsplit(":", 1)[1], r.reason) for r in rejects] == [
        ("target[b]", "row b's 'target' has 2 values, fewer than lookback + horizon = 12"),
        ("target[c]", "row c's 'target' is not a list of numbers")]

    multivariate = pa.table({"item_id": ["m", "n"], "target": [[ramp, [-v for v in ramp]], [ramp, None]]})
    pq.write_table(multivariate, tmp_path / "m.parquet")
    samples, rejects = read_series(str(tmp_path / "m.parquet"), 8, 4, 4, "test", [0.5, 0.2, 0.3])
    assert {s.meta["variate"] for s in samples} == {0, 1} and {s.meta["item"] for s in samples} == {"m"}
    assert [r.reason for r in rejects] == ["row n's 'target' is not a list of numbers"]  # a null variate
    assert [s.series["target"].tolist() for s in samples if s.meta["variate"] == 1][0] == [-v for v in ramp[28:32]]

    repeated = pa.table({"item_id": ["a", "a"], "target": [ramp, [-v for v in ramp]]})
    pq.write_table(repeated, tmp_path / "r.parquet")
    samples, rejects = read_series(str(tmp_path / "r.parquet"), 8, 4, 4, "train", [1.0, 0.0, 0.0])
    assert len(samples) == len(rejects) == 8 and {r.reason for r in rejects} == {"duplicate sample id"}
    assert samples[0].series["target"].tolist() == ramp[8:12]  # the first of the two rows named "a"


def test_a_folder_of_series_files_reads_as_one_dataset(tmp_path):
    """GIFT-Eval as its repository ships: `<dataset>/<freq>/data-00000-of-00001.arrow` beside JSON records. Every
    file is read, keyed by its path under the folder (the file names repeat); one that does not read is rejected;
    where a `save_to_disk` state.json lists a folder's data files, only those (not `datasets`' cache files)."""
    import pyarrow as pa
    import pyarrow.parquet  # noqa: F401  (pa.parquet)

    for dataset, sign in (("electricity/15T", 1.0), ("solar/H", -1.0)):
        (tmp_path / "gift" / dataset).mkdir(parents=True)
        table = pa.table({"item_id": ["item_0"], "target": [[sign * i for i in range(20)]]})
        with pa.ipc.new_stream(tmp_path / "gift" / dataset / "data-00000-of-00001.arrow", table.schema) as writer:
            writer.write_table(table)
        (tmp_path / "gift" / dataset / "dataset_info.json").write_text("{}")
    # datasets' processing cache beside the data it lists in state.json: the same rows, read once
    shutil.copy(tmp_path / "gift" / "solar/H" / "data-00000-of-00001.arrow",
                tmp_path / "gift" / "solar/H" / "cache-11fee8505f624f99.arrow")
    (tmp_path / "gift" / "solar/H" / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "11fee8505f624f99"}))
    # a state.json naming a file that is not there (renamed since) filters nothing: every file is read
    shutil.copytree(tmp_path / "gift" / "solar/H", tmp_path / "gift" / "solar/D")
    (tmp_path / "gift" / "solar/D" / "data-00000-of-00001.arrow").rename(tmp_path / "gift" / "solar/D" / "data.arrow")
    (tmp_path / "gift" / "broken.parquet").write_bytes(b"not parquet")
    samples, rejects = read_series(str(tmp_path / "gift"), 8, 4, 4, "train", [1.0, 0.0, 0.0])
    # (20 - 12) / 4 + 1 windows a file: electricity's, solar/H's data file, solar/D's two
    assert len(samples) == 12 and len({s.key for s in samples}) == 12
    assert {s.meta["id"].rsplit("-target", 1)[0] for s in samples} == {
        "electricity/15T/data-00000-of-00001", "solar/H/data-00000-of-00001", "solar/D/data",
        "solar/D/cache-11fee8505f624f99"}
    assert samples[0].meta["id"] == "electricity/15T/data-00000-of-00001-target-item_0-0"
    assert samples[-1].series["target"].tolist() == [-16.0, -17.0, -18.0, -19.0]
    (reject,) = rejects
    assert reject.source == str(tmp_path / "gift" / "broken.parquet") and reject.reason.startswith("not a readable")
    # load.csv beside load.parquet: two series, not one key for both (the second's windows were "duplicate")
    (tmp_path / "pair").mkdir()
    (tmp_path / "pair" / "load.csv").write_text("x\n" + "\n".join(str(i) for i in range(20)) + "\n")
    pa.parquet.write_table(pa.table({"x": [float(-i) for i in range(20)]}), tmp_path / "pair" / "load.parquet")
    samples, rejects = read_series(str(tmp_path / "pair"), 8, 4, 4, "train", [1.0, 0.0, 0.0])
    assert len(samples) == 6 and not rejects
    assert {s.meta["id"].rsplit("-x", 1)[0] for s in samples} == {"load.csv", "load.parquet"}
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "dataset_info.json").write_text("{}")
    with pytest.raises(ValueError, match="no .csv, .parquet or .arrow file under it"):
        read_series(str(tmp_path / "records"), 8, 4, 4)
    with pytest.raises(FileNotFoundError, match="missing: no such file or folder"):
        read_series(str(tmp_path / "gift" / "missing"), 8, 4, 4)


def test_more_windows_than_a_job_may_hold_stop_the_read_naming_where(tmp_path):
    """The encode job holds every window: past max_windows the read stops at the series that crosses it, counting
    the files read before it, rather than be rejected as a bad file (a folder) or run the driver out of memory."""
    (tmp_path / "tree" / "a").mkdir(parents=True)
    (tmp_path / "tree" / "b").mkdir()
    for name in ("a", "b"):  # 20 rows: (20 - 12) / 4 + 1 = 3 windows a column
        (tmp_path / "tree" / name / "s.csv").write_text("x,y\n" + "\n".join(f"{i},{-i}" for i in range(20)) + "\n")
    samples, _ = read_series(str(tmp_path / "tree"), 8, 4, 4, "train", [1.0, 0.0, 0.0], max_windows=12)
    assert len(samples) == 12
    with pytest.raises(TooManyWindows, match=r"b/s.csv:y: with the column's 3 windows the job would hold more than "
                                             r"dataset.max_windows, 11"):
        read_series(str(tmp_path / "tree"), 8, 4, 4, "train", [1.0, 0.0, 0.0], max_windows=11)
    with pytest.raises(TooManyWindows, match="s.csv:x: with the column's 3 windows"):
        read_series(str(tmp_path / "tree" / "a" / "s.csv"), 8, 4, 4, "train", [1.0, 0.0, 0.0], max_windows=2)


def test_series_split_at_given_rows_carry_their_training_scale(tmp_path):
    """ETT's benchmark split (the Time-Series-Library's borders; the rows after them unused), and every window's
    series mean and std over its training rows (ddof 0), what that library's tables standardise by."""
    rows = ["date,a,b"] + [f"2016-07-01 {h:02d}:00:00,{h},{h * h}" for h in range(24)]
    (tmp_path / "ETTh1.csv").write_text("\n".join(rows) + "\n")
    samples, rejects = read_series(str(tmp_path / "ETTh1.csv"), 4, 2, 1, "test", split_rows=[12, 16, 20])
    assert not rejects and [s.meta["start"] for s in samples if s.meta["column"] == "a"] == [12, 13, 14]
    first = samples[0]
    assert as_lists(first.series) == {"lookback": [12.0, 13.0, 14.0, 15.0], "target": [16.0, 17.0]}  # rows 20-23 unread
    assert first.meta["train_mean"] == 5.5 and first.meta["train_std"] == pytest.approx(np.std(np.arange(12)))
    b = next(s for s in samples if s.meta["column"] == "b")
    assert b.meta["train_mean"] == pytest.approx(np.mean(np.arange(12) ** 2))
    short, rejects = read_series(str(tmp_path / "ETTh1.csv"), 4, 2, 1, "test", split_rows=[12, 16, 30])
    assert not short and rejects[0].reason == "the column has 24 values, fewer than split_rows' last, 30"
