"""`modrwkv encode` end to end, through a real (local) Ray instance and through the driver (small jobs): bad inputs
quarantined with counts that reconcile, the same entries either way, cache reuse, resume after a kill, and Ray
Data against a local S3 server."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import yaml

from modrwkv.conversation import Turn
from pipelines.config import from_dict
from pipelines.encode import EncodeConfig, run_encode, run_encodes, series_window
from preprocessing.cache.entry import FeatureCache
from preprocessing.demo_data import build_digits
from preprocessing.readers.sample import RawSample, sample_key
from preprocessing.validate import Limits, Rejected
from tests.tiny_models import save_tiny_clip, save_tiny_wavlm, save_tiny_whisper

from ..preprocessing.bad_inputs import huge_header_png, png_bytes, truncated_jpeg, wav_bytes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    d = tmp_path_factory.mktemp("encoders")
    return {"clip": save_tiny_clip(d / "clip"), "clip_b": save_tiny_clip(d / "clip_b", seed=1),
            "whisper": save_tiny_whisper(d / "whisper")}


def config(**sections) -> EncodeConfig:
    return from_dict(EncodeConfig, sections)


def turns(question, answer):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


# two good images, three bad ones, a missing file and a record without conversations: 5 items to encode
BAD_IMAGE_ITEMS = 5


def bad_images_set(folder: Path) -> tuple[dict, dict[str, bytes]]:
    """A LLaVA set with good and bad images under `folder`: its dataset section and the image files."""
    img = folder / "img"
    img.mkdir(parents=True)
    files = {"good-0.png": png_bytes(seed=0), "good-1.png": png_bytes((40, 24), seed=1), "trunc.jpg": truncated_jpeg(),
             "zero.png": b"", "bomb.png": huge_header_png()}
    for name, data in files.items():
        (img / name).write_bytes(data)
    records = [{"id": Path(n).stem, "image": n, "conversations": turns("<image>\nWhat is it?", "noise")} for n in files]
    records += [{"id": "missing", "image": "nope.png", "conversations": turns("<image>\nWhat?", "x")},
                {"id": "schema", "image": "good-0.png", "conversation": []}]
    (folder / "vqa.json").write_text(json.dumps(records))
    return {"format": "llava", "path": str(folder / "vqa.json"), "media_root": str(img)}, files


def test_bad_inputs_are_quarantined_and_counts_reconcile(tmp_path, encoders, ray_local):
    dataset, files = bad_images_set(tmp_path)
    result = run_encode(config(dataset=dataset, encoder={"kind": "clip", "model_dir": str(encoders["clip"])},
                               cache={"root": str(tmp_path / "cache"), "shard_size": 3},
                               run={"in_process_max_items": 0}))
    assert result.encoded_in == "ray"
    assert result.manifest["counts"] == {"read": 7, "written": 2, "rejected": 5}
    reasons = {r["key"]: r["reason"] for r in map(json.loads, open(Path(result.uri) / "rejects.jsonl"))}
    assert "not a readable image" in reasons["trunc"] and "empty file" in reasons["zero"]
    assert "decompression bomb" in reasons["bomb"] and "cannot read" in reasons["missing"]
    assert "'conversations' must be a non-empty list" in reasons["schema"]
    cache = FeatureCache(result.uri)
    written = {s.key: s for s in cache.iter_samples(shuffle=False)}
    assert sorted(written) == ["good-0", "good-1"]
    sample = written["good-1"]
    assert sample.items[0].dtype == np.float16 and sample.items[0].shape == (17, 32)
    assert sample.meta["content_sha256"] == [hashlib.sha256(files["good-1.png"]).hexdigest()]
    assert sample.turns[1] == Turn("assistant", "noise")


def test_features_past_the_stores_range_are_rejected_not_stored_as_inf(tmp_path):
    """fp16 holds values up to 65504: an encoder whose activations run larger (or one in fp16 that overflowed to NaN)
    stored inf, which trained to a NaN loss; each such item is a reject with the reason, the others are written."""
    import torch
    from transformers import CLIPVisionModel

    loud = CLIPVisionModel.from_pretrained(save_tiny_clip(tmp_path / "clip"))
    with torch.no_grad():
        loud.pre_layrnorm.weight.mul_(1e6)  # a residual stream of about a million
    loud.save_pretrained(tmp_path / "loud")
    dataset, _ = bad_images_set(tmp_path / "data")
    result = run_encode(config(dataset=dataset, encoder={"kind": "clip", "model_dir": str(tmp_path / "loud")},
                               cache={"root": str(tmp_path / "cache")}))
    assert result.manifest["counts"] == {"read": 7, "written": 0, "rejected": 7}
    reasons = {r["key"]: r["reason"] for r in map(json.loads, open(Path(result.uri) / "rejects.jsonl"))}
    assert "the encoder's features hold NaN or inf, or values past fp16's range" in reasons["good-0"]
    assert reasons["good-0"].endswith("; the encoder ran in fp32")
    assert "largest |value| " in reasons["good-1"] and "not a readable image" in reasons["trunc"]


def test_a_file_that_storage_fails_to_read_fails_the_job_and_a_vanished_one_is_rejected(tmp_path, monkeypatch):
    """A sample rejected because the storage failed once would be missing from the entry, and from every later run
    that reuses it: only a file gone since it was fingerprinted is rejected; any other read error stops the job."""
    from pipelines.encode import decode_item
    from preprocessing import storage

    image = tmp_path / "1.png"
    image.write_bytes(png_bytes())
    row = {"source": str(image), "ref": hashlib.sha256(image.read_bytes()).hexdigest()}

    def failing(uri):
        raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation")

    monkeypatch.setattr(storage, "read_bytes", failing)
    with pytest.raises(OSError, match=f"{image}: cannot read it: AWS Error NETWORK_CONNECTION"):
        decode_item(row, "image", None, None)
    image.unlink()
    monkeypatch.undo()
    assert "cannot read it" in decode_item(row, "image", None, None)["reject"]


def test_a_bad_record_added_since_names_another_entry_whose_counts_reconcile(tmp_path, encoders, capsys):
    """A cache hit served the entry of the same samples, whose manifest and rejects.jsonl did not count the record
    rejected since (only printed): the run's read != written + rejected. Its entry now holds it, its items found."""
    dataset, _ = bad_images_set(tmp_path)
    encoder = {"kind": "clip", "model_dir": str(encoders["clip"])}
    first = run_encode(config(dataset=dataset, encoder=encoder, cache={"root": str(tmp_path / "cache")}))
    records = json.loads(Path(dataset["path"]).read_text())
    Path(dataset["path"]).write_text(json.dumps(records + [{"id": "added", "conversations": "not a list"}]))
    again = run_encode(config(dataset=dataset, encoder=encoder, cache={"root": str(tmp_path / "cache")}))
    assert not again.reused and again.uri != first.uri and first.manifest["counts"]["read"] == 7
    assert again.manifest["counts"] == {**first.manifest["counts"], "read": 8,
                                        "rejected": first.manifest["counts"]["rejected"] + 1}
    reasons = {r["key"]: r["reason"] for r in map(json.loads, open(Path(again.uri) / "rejects.jsonl"))}
    assert "'conversations' must be a non-empty list" in reasons["added"]
    assert again.items.get("encoded", 0) == 0, again.items  # the features were in the store
    third = run_encode(config(dataset=dataset, encoder=encoder, cache={"root": str(tmp_path / "cache")}))
    assert third.reused and third.uri == again.uri  # the same records, good and bad: the entry serves


def test_a_file_rewritten_keeping_its_size_and_time_is_rejected_once_then_read_anew(tmp_path, encoders):
    """Its fingerprint (size, modification time, sha256) still named the old bytes: a run that decoded it rejected it
    ("changed while the job ran; encode again"), and every run after it too, `run.force` included."""
    import os

    from pipelines.encode import CHANGED

    dataset, _ = bad_images_set(tmp_path)
    image = tmp_path / "img" / "good-1.png"
    run = {"dataset": dataset, "encoder": {"kind": "clip", "model_dir": str(encoders["clip"])},
           "cache": {"root": str(tmp_path / "cache")}}
    first = run_encode(config(**run))
    stat = image.stat()
    image.write_bytes(png_bytes((40, 24), seed=7))  # cp -p, rsync -a: other bytes, the same size and time
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert image.stat().st_size == stat.st_size
    forced = run_encode(config(**run, run={"force": True}))
    reasons = {r["key"]: r["reason"] for r in map(json.loads, open(Path(forced.uri) / "rejects.jsonl"))}
    assert reasons["good-1"].startswith(f"{image}: {CHANGED}") and forced.uri == first.uri
    again = run_encode(config(**run))  # hashed anew: its new bytes are encoded, into an entry of their own
    assert again.uri != first.uri and again.manifest["counts"] == first.manifest["counts"]
    cache = FeatureCache(again.uri)
    assert "good-1" in {sample.key for index in range(len(cache.shards)) for sample in cache.read_shard(index)}


# the image set above covers the Ray job's quarantine in the fast tier; Ray's audio and series jobs take seconds each
@pytest.mark.parametrize("encoded_in", ["driver", pytest.param("ray", marks=pytest.mark.slow)])
def test_bad_audio_and_series_are_quarantined_and_counts_reconcile(tmp_path, encoders, request, encoded_in):
    run = {}  # the default: a job this small, in the driver
    if encoded_in == "ray":
        request.getfixturevalue("ray_local")
        run = {"in_process_max_items": 0}
    audio = tmp_path / "audio"
    audio.mkdir()
    # "long" passes the job's limits (raised to 40 s) and is read as two of Whisper's 30 s windows
    clips = {"ok": wav_bytes(0.6), "stereo8k": wav_bytes(0.6, rate=8000, channels=2), "text": b"not audio at all",
             "long": wav_bytes(31, rate=8000)}
    for name, data in clips.items():
        (audio / f"{name}.wav").write_bytes(data)
    lines = [{"audio": f"{n}.wav", "text": "one two"} for n in clips] + [
        {"id": "silent-text", "audio": "ok.wav", "text": ""}, {"audio": "gone.wav", "text": "x"},
        {"id": "placeholder", "audio": "ok.wav", "text": "the <image> tag"}]
    (audio / "asr.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = run_encode(config(dataset={"format": "asr_jsonl", "path": str(audio / "asr.jsonl")},
                               encoder={"kind": "whisper", "model_dir": str(encoders["whisper"])},
                               cache={"root": str(tmp_path / "cache")}, limits={"max_audio_seconds": 40}, run=run))
    assert result.encoded_in == encoded_in
    assert result.manifest["counts"] == {"read": 7, "written": 3, "rejected": 4}
    reasons = {r["key"]: r["reason"] for r in map(json.loads, open(Path(result.uri) / "rejects.jsonl"))}
    assert "not a readable audio file" in reasons["text"] and "is empty" in reasons["silent-text"]
    assert "cannot read" in reasons["gone"] and "holds <image>, a placeholder of another" in reasons["placeholder"]
    lengths = {s.key: s.items[0].shape[0] for s in FeatureCache(result.uri).iter_samples(shuffle=False)}
    assert lengths == {"ok": 30, "stereo8k": 30, "long": 1550}  # 0.6 s at 50 Hz (8 kHz stereo resampled); 31 s

    # a clip within the job's limits (lowered to 10 ms) but shorter than WavLM's one feature frame (400 samples):
    # the decode task, where the encoder's inputs are prepared, refuses it
    save_tiny_wavlm(tmp_path / "wavlm")
    (audio / "tiny.wav").write_bytes(wav_bytes(0.02))
    (audio / "tiny.jsonl").write_text(json.dumps({"audio": "tiny.wav", "text": "one"}) + "\n")
    result = run_encode(config(dataset={"format": "asr_jsonl", "path": str(audio / "tiny.jsonl")},
                               encoder={"kind": "wavlm", "model_dir": str(tmp_path / "wavlm")},
                               cache={"root": str(tmp_path / "cache")}, limits={"min_audio_seconds": 0.01}, run=run))
    assert result.manifest["counts"] == {"read": 1, "written": 0, "rejected": 1}
    (reject,) = map(json.loads, open(Path(result.uri) / "rejects.jsonl"))
    assert reject["reason"] == (f"the encoder refused it: sample {audio / 'tiny.wav'}: 320 samples at 16 kHz, fewer "
                                "than the 400 of one feature frame")

    rows = ["v,dead"] + [f"{np.sin(i / 3):.4f},nan" if i != 50 else "nan,nan" for i in range(60)]
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    result = run_encode(config(dataset={"format": "series", "path": str(tmp_path / "s.csv"), "lookback": 16,
                                        "horizon": 4, "stride": 8, "fractions": [1.0, 0.0, 0.0]},
                               encoder={"kind": "raw"}, cache={"root": str(tmp_path / "cache")}, run=run))
    # a raw window (the WaveNet's input) is its own item, its normalised lookback in its shard: nothing to encode
    assert result.encoded_in is None and result.items["unique"] == 0
    # windows start at 0, 8, ..., 40: row 50 (NaN) is in the target of the one at 32 and the lookback of the one
    # at 40; the dead column has no value at all
    assert result.manifest["counts"] == {"read": 7, "written": 4, "rejected": 3}
    reasons = sorted(r["reason"] for r in map(json.loads, open(Path(result.uri) / "rejects.jsonl")))
    assert reasons == ["lookback has 1 NaN or inf values", "target has 1 NaN or inf values",
                       "the column has no finite values"]
    sample = next(s for s in FeatureCache(result.uri).iter_samples(shuffle=False) if s.meta["start"] == 0)
    assert sample.items[0].shape == (16, 1) and sample.target.shape == (4,) and sample.item_files == []
    assert sample.items[0].dtype == np.float32 and np.array_equal(sample.items[0][:, 0], sample.lookback)
    assert abs(float(sample.items[0].mean())) < 1e-5  # normalised per window
    raw = np.sin(np.arange(16) / 3).round(4)
    assert sample.meta["mean"] == pytest.approx(raw.mean(), abs=1e-4)


def test_a_flat_lookback_is_kept_only_while_its_target_stays_flat():
    """Solar output at night, zero sales: a constant lookback has no scale, so a target that moves after it
    would be stored times 1e5 (the std floor); such a window is rejected, one that stays flat kept (zeros)."""
    from pipelines.encode import series_window
    from preprocessing.readers import RawSample
    from preprocessing.validate import Limits, Rejected

    def window(lookback, target):
        return series_window(RawSample("w", "series", [], {}, {"lookback": lookback, "target": target}), Limits())

    flat = window([0.1] * 8, [0.1] * 4)
    assert np.abs(flat.arrays["target"]).max() < 1 and flat.meta["std"] == pytest.approx(1e-5)
    assert np.abs(window([0.1] * 7 + [0.2], [0.1, 0.1, 1.3, 2.5]).arrays["target"]).max() < 100  # a scale: kept
    with pytest.raises(Rejected, match="the lookback is flat but the target moves"):
        window([0.1] * 8, [0.1, 0.1, 1.3, 2.5])
    # a target past float32's range once normalised was stored as inf: a NaN loss in training
    with pytest.raises(Rejected, match=r"normalised by the lookback \(mean 0.5, std 0.534522\) is past float32"):
        window([0.0, 1.0] * 4, [1.0, 1e39])


def test_a_window_at_a_high_level_stores_its_target_as_it_moves():
    """The target is normalised by the lookback's float64 stats: at a level of 1e7 its hundredths survive."""
    from preprocessing.readers import RawSample
    from preprocessing.validate import Limits

    movement = 0.01 * np.sin(np.arange(12) / 2)
    lookback, target = 1e7 + movement[:8], 1e7 + movement[8:]
    stored = series_window(RawSample("meter", "series", [], {}, {"lookback": lookback, "target": target}), Limits())
    expected = (movement[8:] - movement[:8].mean()) / movement[:8].std(ddof=1)
    assert stored.arrays["target"].dtype == stored.arrays["item"].dtype == np.float32
    np.testing.assert_allclose(stored.arrays["target"], expected, atol=1e-5)
    assert stored.meta["mean"] == pytest.approx(lookback.mean(), abs=1e-8)


def test_a_small_job_encodes_in_the_driver_exactly_as_ray_data_does(tmp_path, encoders, ray_local):
    dataset, _ = bad_images_set(tmp_path / "data")
    results = {}
    # at most `in_process_max_items` items to encode: the driver; one more: Ray Data
    for path, limit in (("driver", BAD_IMAGE_ITEMS), ("ray", BAD_IMAGE_ITEMS - 1)):
        results[path] = run_encode(config(dataset=dataset, encoder={"kind": "clip", "model_dir": str(encoders["clip"])},
                                          cache={"root": str(tmp_path / path), "shard_size": 3},
                                          run={"in_process_max_items": limit, "batch_size": 2}))
        assert results[path].encoded_in == path
    driver, ray = results["driver"], results["ray"]
    assert Path(driver.uri).name == Path(ray.uri).name
    assert driver.manifest["counts"] == {"read": 7, "written": 2, "rejected": 5}
    # the same samples (each shard's sha256 covers its samples and the names of their feature files) and rejects
    same = ("counts", "shards", "items")
    assert {k: driver.manifest[k] for k in same} == {k: ray.manifest[k] for k in same}
    assert (Path(driver.uri) / "rejects.jsonl").read_text() == (Path(ray.uri) / "rejects.jsonl").read_text()
    stored = [{p.relative_to(tmp_path / path): p.read_bytes() for p in (tmp_path / path).glob("features/*/*/*.npy")}
              for path in results]
    assert len(stored[0]) == 2 and stored[0] == stored[1]  # the same feature files, byte for byte


def test_aishell_encodes_from_its_own_layout_and_counts_reconcile(tmp_path, encoders):
    """data_aishell's transcript and one split's speaker folders, through the job: Mandarin targets without the word
    spaces, a clip the transcript does not cover rejected, read = written + rejected."""
    (tmp_path / "transcript").mkdir()
    transcript = tmp_path / "transcript" / "aishell_transcript_v0.8.txt"
    transcript.write_text("BAC009S0764W0121 甚至 出现 交易\nBAC009S0764W0122 一二线 城市\n")
    speaker = tmp_path / "wav" / "test" / "S0764"
    speaker.mkdir(parents=True)
    for n in (121, 122, 123):
        (speaker / f"BAC009S0764W0{n}.wav").write_bytes(wav_bytes(0.6, seed=n))
    result = run_encode(config(dataset={"format": "aishell", "path": str(transcript),
                                        "media_root": str(tmp_path / "wav" / "test")},
                               encoder={"kind": "whisper", "model_dir": str(encoders["whisper"])},
                               cache={"root": str(tmp_path / "cache")}))
    assert result.manifest["counts"] == {"read": 3, "written": 2, "rejected": 1}
    (reject,) = map(json.loads, open(Path(result.uri) / "rejects.jsonl"))
    assert reject["key"] == "BAC009S0764W0123" and "no transcribed words" in reject["reason"]
    samples = {s.key: s for s in FeatureCache(result.uri).iter_samples(shuffle=False)}
    assert samples["BAC009S0764W0121"].text("assistant") == "甚至出现交易"
    assert samples["BAC009S0764W0122"].items[0].shape[0] == 30 and samples["BAC009S0764W0122"].meta["language"] == "zh"


def test_librispeech_gets_the_datasets_opt_in_for_media_outside_its_root(tmp_path):
    from pipelines.encode import read_dataset
    from pipelines.encode_config import DatasetConfig

    chapter = tmp_path / "ls" / "19" / "198"
    chapter.mkdir(parents=True)
    (chapter / "19-198.trans.txt").write_text("../../../elsewhere HELLO\n")
    dataset = {"format": "librispeech", "path": str(tmp_path / "ls")}
    samples, rejects = read_dataset(from_dict(DatasetConfig, dataset))
    assert not samples and "outside the media root" in rejects[0].reason
    samples, rejects = read_dataset(from_dict(DatasetConfig, {**dataset, "allow_media_outside_root": True}))
    assert samples[0].sources == [str(chapter / "../../../elsewhere.flac")] and not rejects


def test_a_series_window_lets_its_values_go_and_its_key_still_covers_them():
    """The driver holds every prepared window until the entry is written: not its raw values (the normalised arrays
    are what it stores), which the entry key covers by their digest. Two windows differing only in the target share
    their item (the normalised lookback) and must not share a key."""
    def window(target):
        turns = [{"role": "user", "text": "<series>"}]
        return RawSample(sample_key("s-0"), "series", [], {"id": "s-0", "turns": turns},
                         {"lookback": np.arange(8.0), "target": np.array(target)})

    a, b = series_window(window([8.0, 9.0]), Limits()), series_window(window([8.0, 9.5]), Limits())
    assert a.raw.series == {} and a.refs == b.refs
    assert a.record() != b.record()
    assert a.record() == series_window(window([8.0, 9.0]), Limits()).record()
    np.testing.assert_allclose(a.arrays["target"] * a.meta["std"] + a.meta["mean"], [8.0, 9.0], rtol=1e-6)
    rejected = window([8.0, np.nan])  # a rejected window lets its values go too: they may view a whole file
    with pytest.raises(Rejected, match="NaN"):
        series_window(rejected, Limits())
    assert rejected.series == {}


def test_the_bound_on_a_jobs_windows_is_not_in_the_entry_key(tmp_path):
    """Raising max_windows to get past it must find the entry the lower bound built, not encode another."""
    (tmp_path / "s.csv").write_text("x\n" + "\n".join(str(i % 7) for i in range(60)) + "\n")
    spec = {"dataset": {"format": "series", "path": str(tmp_path / "s.csv"), "lookback": 8, "horizon": 4,
                        "stride": 4, "fractions": [1.0, 0.0, 0.0]},
            "encoder": {"kind": "raw"}, "cache": {"root": str(tmp_path / "cache")}}
    first = run_encode(from_dict(EncodeConfig, spec))
    spec["dataset"]["max_windows"] = first.manifest["counts"]["written"]
    again = run_encode(from_dict(EncodeConfig, spec))
    assert not first.reused and again.reused and again.uri == first.uri


def test_a_series_config_finds_its_entry_again_without_reading_while_its_files_are_unchanged(tmp_path, monkeypatch):
    """Finding a series entry by its key means reading and cutting every window (days for GIFT-Eval's pretraining
    set, before each training phase): a config that made an entry finds it again from a listing of its files while
    none changed, and reads them again when one did, or when its record or entry is gone."""
    import pipelines.encode

    series = tmp_path / "s.csv"
    series.write_text("x\n" + "\n".join(str(i % 7) for i in range(60)) + "\n")
    spec = {"dataset": {"format": "series", "path": str(series), "lookback": 8, "horizon": 4, "stride": 4,
                        "fractions": [1.0, 0.0, 0.0]},
            "encoder": {"kind": "raw"}, "cache": {"root": str(tmp_path / "cache")}}
    first = run_encode(from_dict(EncodeConfig, spec))
    read = pipelines.encode.read_dataset
    monkeypatch.setattr(pipelines.encode, "read_dataset", lambda d: pytest.fail(f"{d.path} read again"))
    spec["dataset"]["max_windows"] = 50  # changes no window
    again = run_encode(from_dict(EncodeConfig, spec))
    assert again.reused and again.uri == first.uri and again.manifest == first.manifest
    reads = []
    monkeypatch.setattr(pipelines.encode, "read_dataset", lambda d: reads.append(d.path) or read(d))
    stat = series.stat()
    os.utime(series, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten, the same size: read again
    touched = run_encode(from_dict(EncodeConfig, spec))
    assert reads == [str(series)] and touched.reused and touched.uri == first.uri  # its entry found by its key
    monkeypatch.setattr(pipelines.encode, "read_dataset", lambda d: pytest.fail(f"{d.path} read again"))
    spec["dataset"]["path"] = os.path.relpath(series)  # the same file, named another way: the same record
    assert run_encode(from_dict(EncodeConfig, spec)).uri == first.uri
    spec["dataset"]["path"] = str(series)
    monkeypatch.setattr(pipelines.encode, "read_dataset", read)
    with series.open("a") as f:  # a day more
        f.write("\n".join(str(i % 7) for i in range(4)) + "\n")
    grown = run_encode(from_dict(EncodeConfig, spec))
    assert not grown.reused and grown.manifest["counts"]["written"] == first.manifest["counts"]["written"] + 1
    for record in (tmp_path / "cache" / "resolved").iterdir():
        record.unlink()
    assert run_encode(from_dict(EncodeConfig, spec)).uri == grown.uri  # read again, its entry found by key


def test_a_collection_is_encoded_an_entry_per_folder_and_one_failing_stops_none_of_the_others(tmp_path, capsys,
                                                                                            monkeypatch):
    """GIFT-Eval's pretraining set holds far more windows than one job can: `dataset.each_folder` encodes each folder
    by a job of its own, the entries those folders make alone. A folder that fails (here one past max_windows) is
    named at the end, after the others are written; training's caches take the collection's YAML as its entries;
    an evaluation, which reads one cache, refuses it before encoding anything."""
    import pipelines.encode
    from pipelines.caches import resolve_cache, resolve_caches

    collection = tmp_path / "gift"
    for name, steps in (("solar", 60), ("retail", 64), ("huge", 400)):  # 13, 14 and 98 windows
        (collection / name / "H").mkdir(parents=True)
        (collection / name / "H" / "s.csv").write_text("x\n" + "\n".join(str(i % 7) for i in range(steps)) + "\n")
    (collection / "README.md").write_text("a file beside the folders: not a dataset")
    (collection / "top.csv").write_text("x\n1\n2\n")  # a series beside them: in no folder's job, and said so
    (collection / ".cache" / "huggingface").mkdir(parents=True)  # what `huggingface-cli download` leaves
    spec = {"dataset": {"format": "series", "path": str(collection), "each_folder": True, "lookback": 8,
                        "horizon": 4, "stride": 4, "fractions": [1.0, 0.0, 0.0], "max_windows": 20},
            "encoder": {"kind": "raw"}, "cache": {"root": str(tmp_path / "cache")}}
    with pytest.raises(RuntimeError, match=r"1 of 3 folders failed to encode \(the other 2 entries are written.*\n"
                                           r"  huge: TooManyWindows: .*huge/H/s.csv"):
        run_encodes(from_dict(EncodeConfig, spec))
    printed = capsys.readouterr().out
    assert "[1/3] huge: TooManyWindows" in printed
    assert re.search(r"\[3/3\] solar: encoded \S+ \(13 samples, 0 rejected\)\n", printed)
    assert "not datasets, not read: ['.cache']" in printed
    assert "series files outside its folders, not read (move each into a folder of its own): ['top.csv']" in printed
    alone = {name: run_encode(from_dict(EncodeConfig, {**spec, "dataset": {
        **spec["dataset"], "path": str(collection / name), "each_folder": False}})) for name in ("retail", "solar")}
    assert all(r.reused for r in alone.values())  # the collection's job made the very entries
    assert [r.manifest["counts"]["written"] for r in alone.values()] == [14, 13]
    assert "each_folder" not in alone["solar"].manifest["dataset"]  # entries from before it keep their keys
    spec["dataset"]["max_windows"] = 100
    (tmp_path / "gift.yaml").write_text(yaml.safe_dump(spec))
    uris = resolve_caches([str(tmp_path / "gift.yaml")])
    assert len(uris) == 3 and uris[1:] == [alone["retail"].uri, alone["solar"].uri]  # huge, retail, solar
    assert FeatureCache(uris[0]).manifest["counts"]["written"] == 98
    monkeypatch.setattr(pipelines.encode, "read_dataset", lambda d: pytest.fail(f"{d.path} read again"))
    assert resolve_caches([str(tmp_path / "gift.yaml")]) == uris  # a training phase's start: a listing per folder
    monkeypatch.setattr(pipelines.encode, "join_ray", lambda *a, **k: pytest.fail("Ray started to find entries"))
    assert resolve_caches([str(tmp_path / "gift.yaml")], {str(tmp_path / "gift.yaml"): {"run.folder_jobs": 2}}) \
        == uris  # folders encoded in Ray tasks are first looked for by the driver
    with pytest.raises(ValueError, match="a collection, encoded an entry per folder"):
        resolve_cache(str(tmp_path / "gift.yaml"))
    spec["dataset"]["path"] = str(collection / "solar" / "H")  # a folder of files, no folders
    with pytest.raises(ValueError, match="each_folder reads the folders directly inside it, and there are none"):
        run_encodes(from_dict(EncodeConfig, spec))
    spec["dataset"]["path"] = str(collection / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        run_encodes(from_dict(EncodeConfig, spec))


class InProcessRay:
    """What `folder_outcomes` asks of Ray, each task run in this process when its result is asked for: a task of
    the folder `lose` is lost (its worker killed), and an exception of a task comes wrapped as Ray's."""

    import ray.exceptions as exceptions

    def __init__(self, lose: str | None = None):
        self.lose, self.tasks, self.cancelled, self.options = lose, {}, [], None

    def remote(self, **options):
        self.options = options

        def submit(config, s3):
            self.tasks[len(self.tasks)] = (function, config, s3)
            return len(self.tasks) - 1

        function = None

        def wrap(f):
            nonlocal function
            function = f
            return type("Task", (), {"remote": staticmethod(submit)})

        return wrap

    def wait(self, refs, num_returns):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        function, config, s3 = self.tasks[ref]
        if Path(config.dataset.path).name == self.lose:
            raise self.exceptions.WorkerCrashedError()
        try:
            return function(config, s3)
        except Exception as e:
            raise self.exceptions.RayTaskError("encode_folder", traceback.format_exc(), e) from e

    def cancel(self, ref):
        self.cancelled.append(ref)

    @staticmethod
    def cluster_resources():
        return {"memory": 2 * 2**30}


def test_folder_tasks_a_lost_one_fails_its_folder_alone_and_an_error_of_the_code_stops_them(tmp_path, monkeypatch):
    """`run.folder_jobs` > 1 (Ray stood in for by `InProcessRay`): a task lost with its worker is its folder's
    failure, the others written; a damaged record is no failure: its folder is read again and the record rewritten,
    the other folders found by the driver; an error of the code (not of a folder's data) stops the run."""
    import pipelines.encode

    collection = tmp_path / "gift"
    for name, steps in (("solar", 60), ("retail", 64), ("wind", 40)):
        (collection / name / "H").mkdir(parents=True)
        (collection / name / "H" / "s.csv").write_text("x\n" + "\n".join(str(i % 7) for i in range(steps)) + "\n")
    config = from_dict(EncodeConfig, {
        "dataset": {"format": "series", "path": str(collection), "each_folder": True, "lookback": 8, "horizon": 4,
                    "stride": 4, "fractions": [1.0, 0.0, 0.0]},
        "encoder": {"kind": "raw"}, "cache": {"root": str(tmp_path / "cache")}, "run": {"folder_jobs": 2}})
    ray = InProcessRay(lose="retail")
    monkeypatch.setattr(pipelines.encode, "join_ray", lambda run, local_cpus: ray)
    with pytest.raises(RuntimeError, match=r"1 of 3 folders failed to encode .*\n  retail: WorkerCrashedError"):
        run_encodes(config)
    assert len(ray.tasks) == 3 and ray.options == {"num_cpus": 1, "scheduling_strategy": "SPREAD"}
    ray = InProcessRay()
    monkeypatch.setattr(pipelines.encode, "join_ray", lambda run, local_cpus: ray)
    config.run.folder_memory_gb = 3
    with pytest.raises(ValueError, match="run.folder_memory_gb 3: the local Ray instance has 2.0 GiB for tasks"):
        run_encodes(config)
    config.run.folder_memory_gb = 1.5
    entries = run_encodes(config)  # solar and wind found by the driver, retail encoded by a task
    assert ray.options == {"num_cpus": 1, "scheduling_strategy": "SPREAD", "memory": 3 * 2**29}
    assert [Path(ray.tasks[0][1].dataset.path).name] == ["retail"] and len(ray.tasks) == 1
    (damaged,) = [r for r in (tmp_path / "cache" / "resolved").iterdir()
                  if json.loads(r.read_text())["entry"] == entries[1].uri]  # solar's (entries: retail, solar, wind)
    damaged.write_text("[")
    ray = InProcessRay()
    monkeypatch.setattr(pipelines.encode, "join_ray", lambda run, local_cpus: ray)
    assert [r.uri for r in run_encodes(config)] == [r.uri for r in entries]
    assert [Path(t[1].dataset.path).name for t in ray.tasks.values()] == ["solar"]
    assert json.loads(damaged.read_text())["entry"] == entries[1].uri  # rewritten
    monkeypatch.setattr(pipelines.encode, "found_unchanged", lambda *args: None)  # every folder to a task
    monkeypatch.setattr(pipelines.encode, "run_encode", lambda config: {}["a bug"])
    ray = InProcessRay()
    monkeypatch.setattr(pipelines.encode, "join_ray", lambda run, local_cpus: ray)
    with pytest.raises(KeyError, match="a bug"):
        run_encodes(config)
    assert ray.cancelled == [1]  # the other running task


FOLDERS_KILLED_FOR_MEMORY = """
import sys
from pipelines.config import from_dict
from pipelines.encode import EncodeConfig, run_encodes
config = from_dict(EncodeConfig, {
    "dataset": {"format": "series", "path": sys.argv[1], "each_folder": True, "lookback": 8, "horizon": 4,
                "stride": 4, "fractions": [1.0, 0.0, 0.0]},
    "encoder": {"kind": "raw"}, "cache": {"root": sys.argv[2]}, "run": {"folder_jobs": 2}})
try:
    run_encodes(config)
except RuntimeError as e:
    print(e)
"""


@pytest.mark.slow
def test_a_folder_task_killed_for_memory_fails_its_folder_rather_than_being_retried_without_end(tmp_path):
    """A local Ray instance whose memory monitor kills every task (a threshold of 1% of the node's memory): each
    folder is named failed after OOM_RETRIES retries, where Ray's default retried them without end, in silence."""
    for name in ("solar", "wind"):
        (tmp_path / "gift" / name).mkdir(parents=True)
        (tmp_path / "gift" / name / "s.csv").write_text("x\n" + "\n".join(str(i % 7) for i in range(40)) + "\n")
    env = {**os.environ, "RAY_memory_usage_threshold": "0.01", "RAY_memory_monitor_refresh_ms": "100",
           "RAY_task_oom_retry_delay_base_ms": "100"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", FOLDERS_KILLED_FOR_MEMORY, str(tmp_path / "gift"),
                           str(tmp_path / "cache")], env=env, capture_output=True, text=True, timeout=240,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    failed = done.stdout[done.stdout.index("2 of 2 folders failed to encode"):]
    assert re.match(r"[^\n]*\n  solar: OutOfMemoryError: [^\n]*run\.folder_memory_gb[^\n]*\n"
                        r"  wind: OutOfMemoryError: [^\n]*run\.folder_memory_gb[^\n]*\n", failed), failed


def test_small_jobs_go_to_the_driver_unless_their_actors_would_have_gpus_it_lacks(monkeypatch):
    import torch

    from pipelines.encode import RunConfig, encodes_in_driver

    assert not encodes_in_driver(RunConfig(in_process_max_items=0), 1)  # 0: always Ray
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not encodes_in_driver(RunConfig(gpus_per_actor=1), 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert encodes_in_driver(RunConfig(gpus_per_actor=1), 1)


def digits_config(data, encoder, root, **run):
    return {"dataset": {"format": "llava", "path": str(data / "train.json")},
            "encoder": {"kind": "clip", "model_dir": str(encoder)},
            "cache": {"root": str(root), "shard_size": 2}, "run": {"actors": 1, "batch_size": 2, **run}}


def snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in folder.iterdir()}


def test_second_run_reuses_the_cache_and_a_changed_encoder_does_not(tmp_path, encoders, ray_local, monkeypatch):
    import pipelines.encode

    build_digits(tmp_path / "digits", n_train=24, n_test=0)
    first = run_encode(config(**digits_config(tmp_path / "digits", encoders["clip"], tmp_path / "cache")))
    before = snapshot(Path(first.uri))
    encode_items = pipelines.encode.encode_items
    monkeypatch.setattr(pipelines.encode, "encode_items", lambda *args: pytest.fail("the cached run encoded items"))
    second = run_encode(config(**digits_config(tmp_path / "digits", encoders["clip"], tmp_path / "cache")))
    assert second.reused and second.uri == first.uri and second.fingerprinted_files == 0  # no media byte read
    assert snapshot(Path(first.uri)) == before  # nothing written
    monkeypatch.setattr(pipelines.encode, "encode_items", encode_items)
    other = run_encode(config(**digits_config(tmp_path / "digits", encoders["clip_b"], tmp_path / "cache")))
    assert other.uri != first.uri and not other.reused
    limits = config(**digits_config(tmp_path / "digits", encoders["clip"], tmp_path / "cache"))
    limits.limits.max_audio_seconds = 10.0  # another modality's limit: the image store and its entry are kept
    again = run_encode(limits)
    assert again.reused and again.uri == first.uri
    limits.limits.max_image_pixels = 1 << 20
    assert run_encode(limits).uri not in (first.uri, other.uri)


def test_an_int8_store_lives_beside_the_fp16_one_at_half_the_bytes(tmp_path, encoders):
    """The same images encoded into an fp16 and an int8 store (a small job: in the driver): two stores, the int8
    items int8 [L, D + 2] at about half the bytes, and training reads back features within half a step of each
    vector's scale of the fp16 ones (which carry the encoder's own rounding to fp16)."""
    build_digits(tmp_path / "digits", n_train=6, n_test=0)
    sections = digits_config(tmp_path / "digits", encoders["clip"], tmp_path / "cache")
    fp16 = run_encode(config(**sections))
    int8 = run_encode(config(**{**sections, "cache": {**sections["cache"], "precision": "int8"}}))
    assert int8.manifest["feature_store"] != fp16.manifest["feature_store"]
    assert int8.manifest["store"]["precision"] == "int8" and "precision" not in fp16.manifest["store"]
    stores = {r.manifest["feature_store"]: sorted((tmp_path / "cache" / "features" / r.manifest["feature_store"])
                                                  .glob("*/*.npy")) for r in (fp16, int8)}
    fp16_files, int8_files = stores[fp16.manifest["feature_store"]], stores[int8.manifest["feature_store"]]
    assert len(fp16_files) == len(int8_files) == 6
    stored = np.load(int8_files[0], allow_pickle=False)
    width = np.load(fp16_files[0], allow_pickle=False).shape[1]
    assert stored.dtype == np.int8 and stored.shape[1] == width + 2
    ratio = sum(f.stat().st_size for f in int8_files) / sum(f.stat().st_size for f in fp16_files)
    assert ratio < 0.55 + 128 * 6 / sum(f.stat().st_size for f in fp16_files)  # + each .npy's 128-byte header
    exact = {s.key: s.items[0].astype(np.float32) for s in FeatureCache(fp16.uri).iter_samples(shuffle=False)}
    for sample in FeatureCache(int8.uri).iter_samples(shuffle=False):
        (features,) = sample.items
        assert features.dtype == np.float32 and features.shape == exact[sample.key].shape
        step = np.abs(exact[sample.key]).max(axis=1, keepdims=True) / 127
        fp16_rounding = np.abs(exact[sample.key]) * 2.0**-11  # the fp16 store's own error
        assert np.all(np.abs(features - exact[sample.key]) <= 0.5 * step * 1.01 + fp16_rounding)


def test_encode_names_the_samples_over_the_context_length(tmp_path, encoders, ray_local):
    from modrwkv.batching import Collator
    from modrwkv.multimodal import ModRWKVConfig, ProjectorConfig
    from modrwkv.tokenizer import WorldTokenizer
    from tests.mixed_llava import mixed_llava

    path = mixed_llava(tmp_path / "data", n_images=6, n_long=2)
    sections = {"dataset": {"format": "llava", "path": str(path)},
                "encoder": {"kind": "clip", "model_dir": str(encoders["clip"])},
                "cache": {"root": str(tmp_path / "cache"), "shard_size": 4}, "max_length": 200}
    result = run_encode(config(**sections))
    assert sorted(s["key"] for s in result.over_length) == ["long-0", "long-1"]
    assert run_encode(config(**{**sections, "max_length": 100000})).over_length == []  # a cache hit reports too
    # the manifest's lengths are the collator's: text tokens plus each item's compressed length
    cache = FeatureCache(result.uri)
    projector = ProjectorConfig(encoder_dim=32, model_dim=32, kernel=3, stride=2)
    model = ModRWKVConfig.from_dict({"backbone": {"vocab_size": 65536, "n_layer": 1, "n_embd": 32, "head_size": 16}})
    model.projectors["image"] = projector
    collate, compressed = Collator(WorldTokenizer(), model), projector.compressed_length
    tokens = {s.key: len(collate.encode(s).ids) for s in cache.iter_samples(shuffle=False)}
    assert len(tokens) == 12 and len({n for n in tokens.values()}) > 2  # image, text-only and long samples
    assert cache.over_length(0, compressed) == [{"key": k, "tokens": n} for k, n in tokens.items()]


def store_items(root: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in root.glob("features/*/*/*.npy")}


@pytest.mark.slow
def test_interrupted_encode_resumes_with_only_the_missing_items(tmp_path, encoders, ray_local):
    build_digits(tmp_path / "digits", n_train=64, n_test=0)
    path = tmp_path / "encode.yaml"
    # Ray Data: its start leaves time to kill the job part way (the driver would finish these 64 items first)
    path.write_text(yaml.safe_dump(digits_config(tmp_path / "digits", encoders["clip"], tmp_path / "cache",
                                                 in_process_max_items=0)))
    # its own short Ray temp dir: Ray's socket paths must stay under 108 characters
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp")}
    log = open(tmp_path / "job.log", "w")
    job = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "encode", "--config", str(path)], cwd=ROOT, env=env,
                           stdout=log, stderr=log, start_new_session=True)
    deadline = time.time() + 120
    while len(store_items(tmp_path / "cache")) < 6 and time.time() < deadline and job.poll() is None:
        time.sleep(0.02)
    assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    time.sleep(3)  # let anything the dead job left behind settle before looking
    assert not list((tmp_path / "cache").glob("*/manifest.json"))
    before = store_items(tmp_path / "cache")
    assert 6 <= len(before) < 64

    resumed = run_encode(config(**digits_config(tmp_path / "digits", encoders["clip"], tmp_path / "cache")))
    assert not resumed.reused
    assert resumed.items == {"unique": 64, "in_store": len(before), "encoded": 64 - len(before), "rejected": 0}
    after = store_items(tmp_path / "cache")
    assert len(after) == 64 and all(after[name] == stamp for name, stamp in before.items())  # none written again

    fresh = run_encode(config(**digits_config(tmp_path / "digits", encoders["clip"], tmp_path / "fresh")))
    assert fresh.manifest["shards"] == resumed.manifest["shards"]  # same keys, counts and bytes (sha256) per shard
    assert fresh.manifest["counts"] == resumed.manifest["counts"] == {"read": 64, "written": 64, "rejected": 0}
    assert store_items(tmp_path / "fresh").keys() == after.keys()  # the same item files, byte for byte


def test_a_resumed_encode_rewrites_the_shards_a_sample_rejected_before_has_moved(tmp_path, encoders, monkeypatch):
    """The first run fails one image (as a decode short of memory would) and dies writing its second shard; the
    second encodes it: every shard from the first on holds other samples now, and none may be kept."""
    import pipelines.encode as encode
    from preprocessing.cache.entry import CacheEntry
    from preprocessing.cache.index import read_index

    build_digits(tmp_path / "digits", n_train=8, n_test=0)
    sections = digits_config(tmp_path / "digits", encoders["clip"], tmp_path / "cache")
    real_encode, real_write = encode.encode_items, CacheEntry.write_shard

    def first_image_fails(config, store, todo):
        results, where = real_encode(config, store, todo)
        first = min(todo, key=lambda ref: todo[ref]["source"])
        return {**results, first: {"reject": "decoding it needs more memory than this process has"}}, where

    def dies_at_the_second_shard(entry, index, *args):
        if index == 1:
            raise KeyboardInterrupt
        return real_write(entry, index, *args)

    monkeypatch.setattr(encode, "encode_items", first_image_fails)
    monkeypatch.setattr(CacheEntry, "write_shard", dies_at_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run_encode(config(**sections))
    monkeypatch.undo()

    resumed = run_encode(config(**sections))
    keys = read_index(resumed.uri, ["key"])["key"].to_pylist()
    assert sorted(keys) == sorted(r["id"] for r in json.loads((tmp_path / "digits" / "train.json").read_text()))
    fresh = run_encode(config(**{**sections, "cache": {**sections["cache"], "root": str(tmp_path / "fresh")}}))
    assert fresh.manifest["shards"] == resumed.manifest["shards"]


def encoded_but_the_manifest(tmp_path, encoder, monkeypatch) -> dict:
    """8 digits encoded in 4 shards by a run that dies before its manifest; returns the config's sections."""
    from preprocessing.cache.entry import CacheEntry

    build_digits(tmp_path / "digits", n_train=8, n_test=0)
    sections = digits_config(tmp_path / "digits", encoder, tmp_path / "cache")

    def dies_before_the_manifest(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(CacheEntry, "finish", dies_before_the_manifest)
        with pytest.raises(KeyboardInterrupt):
            run_encode(config(**sections))
    return sections


def test_a_resumed_encode_of_fewer_shards_leaves_none_of_the_first_runs_past_them(tmp_path, encoders, monkeypatch):
    """The first run writes 4 shards and dies before its manifest; two of its store items go (a `cache gc`), and the
    second run fails to encode them again: 3 shards, and the first run's fourth, which no manifest names, is not left
    in the entry to be copied or counted."""
    import pipelines.encode as encode

    sections = encoded_but_the_manifest(tmp_path, encoders["clip"], monkeypatch)
    for item in sorted((tmp_path / "cache").glob("features/*/*/*.npy"))[:2]:
        item.unlink()
    next((tmp_path / "cache").glob("image-*/shard-00003.json")).unlink()  # a shard left without its receipt
    monkeypatch.setattr(encode, "encode_items", lambda config, store, todo: (
        {ref: {"reject": "decoding it needs more memory than this process has"} for ref in todo}, "driver"))
    resumed = run_encode(config(**sections))
    assert resumed.manifest["counts"] == {"read": 8, "written": 6, "rejected": 2}
    assert sorted(p.name for p in Path(resumed.uri).glob("shard-*")) == [
        f"shard-{i:05d}.{suffix}" for i in range(3) for suffix in ("json", "tar")]


def test_weights_replaced_after_the_job_keyed_its_store_fail_it(tmp_path, encoders, monkeypatch):
    """The driver keys the store by the weights it hashed; an encoder that loaded others would file their features
    under the old weights' key, where every later job reuses them."""
    import shutil

    import pipelines.encode as encode

    build_digits(tmp_path / "digits", n_train=2, n_test=0)
    shutil.copytree(encoders["clip"], tmp_path / "clip")
    shutil.copy(encoders["clip_b"] / "model.safetensors", tmp_path / "clip_b.safetensors")
    write_entry = encode.write_entry

    def replaced_meanwhile(*args):
        shutil.copy(tmp_path / "clip_b.safetensors", tmp_path / "clip" / "model.safetensors")
        return write_entry(*args)

    monkeypatch.setattr(encode, "write_entry", replaced_meanwhile)
    with pytest.raises(RuntimeError, match=r"clip: other weights \(sha256 .*\) than the job keyed its feature store "
                                           r"by .* a rerun keys them anew"):
        run_encode(config(**digits_config(tmp_path / "digits", tmp_path / "clip", tmp_path / "cache")))


def test_a_kept_shard_removed_while_the_resumed_job_ran_fails_it(tmp_path, encoders, monkeypatch):
    """The first run dies before its manifest; while the second keeps its shards, a gc that listed the root before
    the lease removes one: the job fails naming it rather than writing a manifest of a missing shard."""
    from preprocessing.cache.entry import CacheEntry

    sections = encoded_but_the_manifest(tmp_path, encoders["clip"], monkeypatch)
    delete_shards_from = CacheEntry.delete_shards_from

    def collected_meanwhile(entry, first):  # after the shards were found whole and kept
        next((tmp_path / "cache").glob("image-*/shard-00001.tar")).unlink()
        delete_shards_from(entry, first)

    monkeypatch.setattr(CacheEntry, "delete_shards_from", collected_meanwhile)
    with pytest.raises(RuntimeError, match=r"1 of the 12 store items and shards .* e\.g\. .*shard-00001\.tar"):
        run_encode(config(**sections))


def test_a_sample_rejected_at_encode_is_named_by_the_item_that_failed(tmp_path, encoders, monkeypatch):
    """Two images in one sample, the second's features refused: the reject names that file, not the first."""
    import pipelines.encode as encode

    build_digits(tmp_path / "digits", n_train=2, n_test=0)
    records = json.loads((tmp_path / "digits" / "train.json").read_text())
    both = {**records[0], "id": "pair", "image": [records[0]["image"], records[1]["image"]],
            "conversations": turns("<image>\n<image>\nWhich is larger?", "the second")}
    (tmp_path / "digits" / "pair.json").write_text(json.dumps([both]))
    sections = digits_config(tmp_path / "digits", encoders["clip"], tmp_path / "cache")
    sections["dataset"]["path"] = str(tmp_path / "digits" / "pair.json")
    real_encode = encode.encode_items

    def second_image_fails(config, store, todo):
        results, where = real_encode(config, store, todo)
        second = next(ref for ref in todo if todo[ref]["source"].endswith(records[1]["image"]))
        return {**results, second: {"reject": "the encoder's features hold NaN"}}, where

    monkeypatch.setattr(encode, "encode_items", second_image_fails)
    result = run_encode(config(**sections))
    (reject,) = map(json.loads, open(Path(result.uri) / "rejects.jsonl"))
    assert reject["key"] == "pair" and reject["source"].endswith(records[1]["image"])


def test_each_media_item_is_encoded_once_across_questions_prompts_and_datasets(tmp_path, encoders, ray_local):
    build_digits(tmp_path / "digits", n_train=8, n_test=0)
    records = json.loads((tmp_path / "digits" / "train.json").read_text())
    # five questions about every image: one encoder item per image
    asked = [{**r, "id": f"{r['id']}-q{q}", "conversations": turns(f"<image>\nQuestion {q}?", f"answer {q}")}
             for r in records for q in range(5)]
    (tmp_path / "digits" / "asked.json").write_text(json.dumps(asked))
    sections = digits_config(tmp_path / "digits", encoders["clip"], tmp_path / "cache")
    sections["dataset"]["path"] = str(tmp_path / "digits" / "asked.json")
    first = run_encode(config(**sections))
    assert first.encoded_in == "driver" and first.items == {"unique": 8, "in_store": 0, "encoded": 8, "rejected": 0}
    assert first.manifest["counts"]["written"] == 40
    # new prompt wording: a new entry, every feature from the store, no media byte read again
    reworded = [{**r, "conversations": turns(r["conversations"][0]["value"].replace("Question", "Query"), "x")}
                for r in asked]
    (tmp_path / "digits" / "asked.json").write_text(json.dumps(reworded))
    edited = run_encode(config(**sections))
    assert edited.uri != first.uri and edited.items == {"unique": 8, "in_store": 8, "encoded": 0, "rejected": 0}
    assert edited.fingerprinted_files == 0 and edited.encoded_in is None
    same = {s.key: s.items[0] for s in FeatureCache(first.uri).iter_samples(shuffle=False)}
    assert all(np.array_equal(same[s.key], s.items[0])
               for s in FeatureCache(edited.uri).iter_samples(shuffle=False))
    # the plain digits set (other records, same images) and two new images: only the new ones are encoded
    build_digits(tmp_path / "more", n_train=10, n_test=0)
    more = digits_config(tmp_path / "more", encoders["clip"], tmp_path / "cache")
    assert run_encode(config(**more)).items == {"unique": 10, "in_store": 8, "encoded": 2, "rejected": 0}
    # a file rewritten with other pixels is read again and encoded; the unchanged ones are not read
    (tmp_path / "more" / records[0]["image"]).write_bytes(png_bytes(seed=7))
    changed = run_encode(config(**more))
    assert changed.fingerprinted_files == 1 and changed.items["encoded"] == 1


def test_two_jobs_encoding_overlapping_data_at_once_share_one_copy(tmp_path, encoders, ray_local):
    from concurrent.futures import ThreadPoolExecutor

    build_digits(tmp_path / "digits", n_train=16, n_test=0)
    records = json.loads((tmp_path / "digits" / "train.json").read_text())
    jobs = []
    for name, part, question in (("a", records[:12], "What digit is this?"), ("b", records[4:], "Which digit?")):
        chosen = [{**r, "conversations": turns(f"<image>\n{question}", "x")} for r in part]
        (tmp_path / "digits" / f"{name}.json").write_text(json.dumps(chosen))
        sections = digits_config(tmp_path / "digits", encoders["clip"], tmp_path / "cache")
        sections["dataset"]["path"] = str(tmp_path / "digits" / f"{name}.json")
        jobs.append(config(**sections))
    with ThreadPoolExecutor(2) as pool:  # both start before either has stored anything
        a, b = pool.map(run_encode, jobs)
    assert a.items["unique"] == b.items["unique"] == 12 and a.items["encoded"] + b.items["encoded"] >= 16
    stored = list((tmp_path / "cache" / "features").rglob("*"))
    assert len([p for p in stored if p.suffix == ".npy"]) == 16 and not [p for p in stored if ".tmp-" in p.name]
    features = [{s.meta["id"]: s.items[0] for s in FeatureCache(r.uri).iter_samples(shuffle=False)}
                for r in (a, b)]
    shared = set(features[0]) & set(features[1])
    assert len(shared) == 8 and all(np.array_equal(features[0][k], features[1][k]) for k in shared)


# A driver whose Ray started before it had S3 settings (as a cluster's did): the job must hand them to its workers
# itself. Then what Ray's state API (the dashboard's source) shows of the job's tasks and actors.
RAY_STARTED_WITHOUT_S3 = r"""
import json, os, sys, time
from ray.util.state import list_actors, list_tasks
from infra.local_ray import init_ray
from pipelines.config import from_dict
from pipelines.encode import EncodeConfig, run_encode

spec, settings, dashboard_port = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
dashboard = "http://" + init_ray(local={"num_cpus": 2}, include_dashboard=True, dashboard_port=dashboard_port,
                                 log_to_driver=False).dashboard_url
os.environ.update(settings)
result = run_encode(from_dict(EncodeConfig, spec))
for _ in range(30):  # task events reach the state API a little after the tasks ran
    shown = json.dumps([list_tasks(dashboard, detail=True, raise_on_missing_output=False),
                        list_actors(dashboard, detail=True, raise_on_missing_output=False)], default=str)
    listed = "decode_item" in shown and "ItemEncoder" in shown
    if listed:
        break
    time.sleep(1)
print(json.dumps({"counts": result.manifest["counts"], "workers_listed": listed,
                  "secret_shown": settings["AWS_SECRET_ACCESS_KEY"] in shown}))
"""


@pytest.mark.slow
def test_ray_workers_get_the_drivers_s3_settings_and_the_dashboard_never_shows_the_secret(tmp_path, encoders,
                                                                                          s3_server):
    from infra.s3_server import s3_client
    from infra.process import free_port

    from tests.services import BUCKET

    build_digits(tmp_path / "digits", n_train=4, n_test=0)
    s3 = s3_client(s3_server.endpoint_url)
    for path in (tmp_path / "digits").rglob("*.*"):
        s3.upload_file(str(path), BUCKET, f"hidden/digits/{path.relative_to(tmp_path / 'digits')}")
    spec = {"dataset": {"format": "llava", "path": f"s3://{BUCKET}/hidden/digits/train.json"},
            "encoder": {"kind": "clip", "model_dir": str(encoders["clip"])},
            "cache": {"root": f"s3://{BUCKET}/hidden-cache", "shard_size": 2}, "run": {"in_process_max_items": 0}}
    settings = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": f"never-shown-{os.getpid()}-{time.time_ns()}"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    done = subprocess.run([sys.executable, "-c", RAY_STARTED_WITHOUT_S3, json.dumps(spec), json.dumps(settings),
                           str(free_port())], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"counts": {"read": 4, "written": 4, "rejected": 0}, "workers_listed": True,
                      "secret_shown": False}


def test_encode_and_read_through_s3(tmp_path, encoders, ray_local, s3_server, monkeypatch):
    from infra.s3_server import s3_client

    from tests.services import BUCKET

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    build_digits(tmp_path / "digits", n_train=6, n_test=0)
    s3 = s3_client(s3_server.endpoint_url)
    for path in (tmp_path / "digits").rglob("*.*"):
        s3.upload_file(str(path), BUCKET, f"raw/digits/{path.relative_to(tmp_path / 'digits')}")
    source = {"format": "llava", "path": f"s3://{BUCKET}/raw/digits/train.json"}
    spec = {"dataset": source, "encoder": {"kind": "clip", "model_dir": str(encoders["clip"])},
            "cache": {"root": f"s3://{BUCKET}/cache", "shard_size": 4},
            "run": {"in_process_max_items": 0}}  # Ray Data: its workers get the S3 settings from the driver
    result = run_encode(config(**spec))
    assert result.uri.startswith(f"s3://{BUCKET}/cache/image-clip-")
    assert result.manifest["counts"] == {"read": 6, "written": 6, "rejected": 0}
    names = {o["Key"].rsplit("/", 1)[1] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="cache/")["Contents"]}
    assert {"manifest.json", "rejects.jsonl", "shard-00000.tar", "shard-00001.tar", "store.json"} <= names
    assert sum(n.endswith(".npy") for n in names) == 6  # one item per image, in the store
    assert not any(".tmp-" in n for n in names)
    samples = list(FeatureCache(result.uri).iter_samples(shuffle=False))
    assert sorted(s.key for s in samples) == [f"digit-{i:04d}" for i in range(6)]
    assert samples[0].meta["source"].startswith(f"s3://{BUCKET}/raw/digits/train.json")
    assert run_encode(config(**spec)).reused


def test_a_shard_holds_windows_of_many_series_not_consecutive_windows_of_one(tmp_path):
    """Shards were cut from the samples in key order, "<series>-<start>": a shard of the paper's series caches (4,096
    windows) held one series' consecutive windows, and training, which samples within windows of a few shards, drew
    whole batches from one or two series."""
    from modrwkv.conversation import Sample
    from pipelines.encode import plan_shards

    samples = [Sample(sample_key(f"{series}-{start}"), "series", []) for series in ("co2", "etth1", "ecl")
               for start in range(0, 1200, 4)]
    shards = plan_shards(samples, 100)
    assert [len(shard) for shard in shards] == [100] * 9
    assert sorted(s.key for shard in shards for s in shard) == sorted(s.key for s in samples)
    assert all(len({s.key.split("-")[0] for s in shard}) == 3 for shard in shards)
    assert all(20 <= sum(s.key.startswith("co2") for s in shard) <= 50 for shard in shards)  # about 100 / 3 each
    assert plan_shards(samples[::-1], 100) == shards  # fixed by the keys alone
    # an entry names the order: one in key order (written before) is another entry, written again once
    assert run_encode(cycle_series(tmp_path)).manifest["shard_order"] == "sha256"


def cycle_series(tmp_path: Path) -> EncodeConfig:
    """A raw series encode of 40 rows of a 7-step cycle: 8 training windows of 8 + 4 steps, nothing to encode."""
    (tmp_path / "s.csv").write_text("x\n" + "\n".join(str(i % 7) for i in range(40)) + "\n")
    return from_dict(EncodeConfig, {
        "dataset": {"format": "series", "path": str(tmp_path / "s.csv"), "lookback": 8, "horizon": 4, "stride": 4,
                    "fractions": [1.0, 0.0, 0.0]},
        "encoder": {"kind": "raw"}, "cache": {"root": str(tmp_path / "cache")}})


def test_an_encode_holds_a_lease_on_its_entry_while_it_writes_and_lets_it_go(tmp_path, monkeypatch):
    """What tells `gc` that the store items the job reuses and its entry's first shards are in use."""
    import pipelines.encode
    from preprocessing.cache.lease import LEASE, leased_store

    config = cycle_series(tmp_path)
    held, write = [], pipelines.encode.write_entry
    monkeypatch.setattr(pipelines.encode, "write_entry", lambda config, entry, store, *rest: held.append(
        leased_store(entry.uri) == store.name) or write(config, entry, store, *rest))
    uri = run_encode(config).uri
    assert held == [True] and not Path(uri, LEASE).exists()


def test_two_encodes_of_one_entry_at_once_take_turns_and_the_second_finds_the_first_ones(tmp_path, monkeypatch):
    """Two jobs of one config started together (an experiment submitted twice): one writes the entry, the other
    waits for its lease and finds the entry written; no shard is written twice at once."""
    import functools
    import threading

    import pipelines.encode
    from preprocessing.cache import lease as lease_module
    from preprocessing.cache.lease import lease

    config = cycle_series(tmp_path)
    # a rival's write lands within the settle: 50 ms on local disk, which two threads of a loaded CI can overrun
    monkeypatch.setitem(lease_module.SETTLE_S, False, 1.0)
    writing, write = [], pipelines.encode.write_entry

    def slow_write(*args):
        writing.append(threading.current_thread().name)
        time.sleep(0.5)
        return write(*args)

    monkeypatch.setattr(pipelines.encode, "write_entry", slow_write)
    monkeypatch.setattr(pipelines.encode, "lease", functools.partial(lease, poll_s=0.05))
    results = {}
    jobs = [threading.Thread(target=lambda n=n: results.update({n: run_encode(config)}), name=n) for n in "ab"]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert len(writing) == 1 and results["a"].uri == results["b"].uri
    assert [results[n].reused for n in writing] == [False] and sum(r.reused for r in results.values()) == 1
    assert len(list(FeatureCache(results["a"].uri).iter_samples(shuffle=False))) == 8


def test_a_reused_store_item_removed_while_the_job_ran_fails_it_and_a_rerun_heals(tmp_path, encoders, monkeypatch,
                                                                                  capsys):
    """A gc that listed the root before the job took its lease removes an old item the job reuses: the job fails
    naming it rather than writing a manifest of missing features; run again, it encodes that item anew. A store made
    with other library versions is named as such when its items are reused."""
    import shutil

    import pipelines.encode
    from preprocessing.cache.key import library_versions

    build_digits(tmp_path / "digits", n_train=8, n_test=0)
    settings = digits_config(tmp_path / "digits", encoders["clip"], tmp_path / "cache")
    shutil.rmtree(run_encode(config(**settings)).uri)  # the store's items stay, unreferenced
    store_json = next((tmp_path / "cache" / "features").glob("*/store.json"))
    record = json.loads(store_json.read_text())
    assert record["written_with"] == library_versions() and {"torch", "transformers"} <= set(record["written_with"])
    store_json.write_text(json.dumps({**record, "written_with": {**record["written_with"], "torch": "2.0.0"}}))
    plan_shards = pipelines.encode.plan_shards

    def collected_meanwhile(*args):
        next(iter((tmp_path / "cache" / "features").glob("*/*/*.npy"))).unlink()
        return plan_shards(*args)

    monkeypatch.setattr(pipelines.encode, "plan_shards", collected_meanwhile)
    with pytest.raises(RuntimeError, match="1 of the 8 store items and shards this job found and reused were "
                                           "removed while it ran .* run the job again: it writes them anew"):
        run_encode(config(**settings))
    monkeypatch.setattr(pipelines.encode, "plan_shards", plan_shards)
    capsys.readouterr()
    healed = run_encode(config(**settings))
    assert healed.items == {"unique": 8, "in_store": 7, "encoded": 1, "rejected": 0}
    assert f"made with other library versions than this job runs (torch 2.0.0 -> {library_versions()['torch']})" \
        in capsys.readouterr().out and healed.manifest["libraries"] == library_versions()
    assert len([s for s in FeatureCache(healed.uri).iter_samples() if len(s.items[0])]) == 8


def test_a_job_finishing_under_a_gc_sweep_checks_what_it_reuses_after_the_sweep_saw_its_lease(tmp_path, encoders,
                                                                                                monkeypatch, capsys):
    """A gc listed the root before this job's lease and deletes on until its next look: the job, about to write its
    manifest, first waits for a look that sees its lease, then finds the item the sweep took meanwhile and fails
    naming it, rather than finish an entry whose features are gone."""
    import shutil
    from types import SimpleNamespace

    import preprocessing.cache.lease as lease_module
    from preprocessing.cache.lease import sweeping

    build_digits(tmp_path / "digits", n_train=8, n_test=0)
    settings = digits_config(tmp_path / "digits", encoders["clip"], tmp_path / "cache")
    shutil.rmtree(run_encode(config(**settings)).uri)  # the store's items stay, unreferenced: gc's to take
    waited = []

    def swept_meanwhile(seconds: float) -> None:  # while the job waits, the sweep deletes a reused item, then looks
        if seconds < 1:  # the lease's settling, as it takes it
            return time.sleep(seconds)
        waited.append(seconds)
        next(iter((tmp_path / "cache" / "features").glob("*/*/*.npy"))).unlink()
        mark.look()

    monkeypatch.setattr(lease_module, "time", SimpleNamespace(time=time.time, sleep=swept_meanwhile))
    with sweeping(str(tmp_path / "cache"), recheck_s=30) as mark:
        with pytest.raises(RuntimeError, match="1 of the 8 store items and shards this job found and reused were "
                                               "removed while it ran"):
            run_encode(config(**settings))
    assert waited == [5.0]
    assert "is being swept by `modrwkv cache gc --apply`: waiting" in capsys.readouterr().out


def test_a_series_record_is_described_by_the_code_that_checks_and_counts_its_windows(tmp_path, monkeypatch):
    """An edit of modrwkv/conversation.py (the text checks and token counts of every window) left a series record
    found: its entry came back, nothing read, though a run would now write other windows."""
    import shutil

    import modrwkv.conversation as conversation
    from pipelines.encode import series_resolution

    (tmp_path / "s.csv").write_text("x\n" + "\n".join(str(i % 7) for i in range(40)) + "\n")
    config = from_dict(EncodeConfig, {"dataset": {"format": "series", "path": str(tmp_path / "s.csv"), "lookback": 8},
                                      "encoder": {"kind": "raw"}, "cache": {"root": str(tmp_path / "cache")}})
    before = series_resolution(config, {"kind": "raw"}).uri
    edited = tmp_path / "conversation.py"
    shutil.copy(conversation.__file__, edited)
    edited.write_text(edited.read_text() + "\n# an edit\n")
    monkeypatch.setattr(conversation, "__file__", str(edited))
    assert series_resolution(config, {"kind": "raw"}).uri != before
