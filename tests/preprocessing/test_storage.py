"""preprocessing/storage.py against the local S3 endpoint and a folder."""

import copy

import pytest

from preprocessing import storage
from tests.services import BUCKET


class Recording:
    """A filesystem that records the calls made on it and passes them on."""

    def __init__(self, fs, calls: list):
        self.fs, self.calls = fs, calls

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.fs, name)


def test_writes_are_whole_on_s3_in_one_upload_and_renamed_into_place_locally(tmp_path, s3_server, monkeypatch):
    """An S3 object appears only once its upload completes, so it is written in place (no temporary name, no copy
    and delete); a local file goes through a temporary name. Both read back whole, and none leaves a temporary."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    real_fs, calls = storage._fs, []

    def recording_fs(uri):
        fs, path = real_fs(uri)
        return Recording(fs, calls), path

    monkeypatch.setattr(storage, "_fs", recording_fs)
    data = bytes(range(256)) * 1000
    remote = f"s3://{BUCKET}/storage-test/a/b/item.npy"
    storage.write_atomic(remote, data)
    assert calls == ["open_output_stream"]
    calls.clear()
    storage.write_atomic(str(tmp_path / "a" / "b" / "item.npy"), data)
    assert calls == ["create_dir", "open_output_stream", "move"]
    for uri in (remote, str(tmp_path / "a" / "b" / "item.npy")):
        assert storage.read_bytes(uri) == data
    assert storage.list_files(f"s3://{BUCKET}/storage-test/a/b") == ["item.npy"]
    assert storage.list_files(str(tmp_path / "a" / "b")) == ["item.npy"]
    # relative to the folder walked, as `media_path` takes them
    for folder in (f"s3://{BUCKET}/storage-test", str(tmp_path)):
        assert storage.walk(folder, ".npy") == ["a/b/item.npy"]


def test_s3_settings_travel_name_their_variables_and_apply_where_they_land(monkeypatch):
    for name in storage.ENV + storage.TRACKING_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    # a tracking server's token: rank 0 on another node logged nothing without it, an eval actor downloaded no model
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t0ken-value")
    settings = copy.deepcopy(storage.settings())  # by the reduce protocol Ray's pickling uses to hand it over
    assert repr(settings) == "WorkerSettings(AWS_ENDPOINT_URL, AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_TOKEN)"
    for name in ("AWS_ENDPOINT_URL", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name)
    settings.apply()
    assert storage.environment() == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
                                     "MLFLOW_TRACKING_TOKEN": "t0ken-value"}


def test_a_file_gone_has_no_sha256_but_a_failing_read_is_raised(tmp_path, monkeypatch):
    assert storage.file_sha256(str(tmp_path / "gone.png")) is None  # the encode job rejects its sample

    def failing(uri):
        raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation")

    monkeypatch.setattr(storage, "read_bytes", failing)
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):  # not a missing file: the job stops instead
        storage.file_sha256(str(tmp_path / "there.png"))


def test_the_parent_of_a_uri_named_with_a_trailing_slash_is_the_folder_holding_it(tmp_path):
    """An entry pasted as `s3://bucket/cache/image-x/`: its store is found beside it, under `s3://bucket/cache`."""
    assert storage.parent("s3://bucket/cache/image-x/") == storage.parent("s3://bucket/cache/image-x") == \
        "s3://bucket/cache"
    assert storage.parent(f"{tmp_path}/image-x/") == str(tmp_path)


def test_a_uri_joined_with_an_absolute_or_climbing_part_is_refused():
    """posixpath made `s3://bucket/runs` joined with `/tmp/x` the local `/tmp/x`, and kept `..` in an S3 key."""
    assert storage.join("s3://bucket/runs", "a/b", "c") == "s3://bucket/runs/a/b/c"
    for part in ("/tmp/x", "../other", "a/../../b"):
        with pytest.raises(ValueError, match=f"{part!r} is not a path under s3://bucket/runs"):
            storage.join("s3://bucket/runs", part)


def test_a_relative_path_under_a_uri_climbs_within_its_bucket():
    """A manifest's `../images/x.jpg` beside an S3 dataset (allow_media_outside_root): the key it names, not a key
    holding `..`, nor a refusal."""
    assert storage.resolve("s3://b/data/train", "../images/x.jpg") == "s3://b/data/images/x.jpg"
    assert storage.media_path("s3://b/data/root", "../x.jpg", allow_outside=True) == "s3://b/data/x.jpg"
    with pytest.raises(ValueError, match="'../../../x.jpg' climbs out of the bucket of s3://b/data/train"):
        storage.resolve("s3://b/data/train", "../../../x.jpg")


def test_a_file_name_that_is_not_utf8_is_left_out_of_a_listing_and_said_so(tmp_path, capsys):
    """pyarrow's listing of a local folder failed whole on one such name (an old zip's), with a UnicodeDecodeError
    naming no file: a LLaVA job stopped though no record named it, and so did a LibriSpeech or series folder's."""
    import hashlib
    import os

    (tmp_path / "s" / "deep").mkdir(parents=True)
    for name in (b"s/ok.wav", b"s/\xff\xfe.wav", b"s/deep/x.wav"):
        with open(os.path.join(os.fsencode(tmp_path), name), "wb") as f:
            f.write(b"RIFF")
    assert storage.walk(str(tmp_path), ".wav") == ["s/deep/x.wav", "s/ok.wav"]
    assert "\\xff\\xfe.wav': its name is not UTF-8; left out of the listing" in capsys.readouterr().out
    stats = storage.stat_files([str(tmp_path / "s" / "ok.wav"), str(tmp_path / "s" / "gone.wav")])
    assert stats[str(tmp_path / "s" / "ok.wav")][0] == 4 and stats[str(tmp_path / "s" / "gone.wav")] is None
    # what an encode job does with each media file: its folder listed, its bytes hashed
    digests = storage.Fingerprints(str(tmp_path / "records")).sha256s([str(tmp_path / "s" / "ok.wav")])
    assert digests == {str(tmp_path / "s" / "ok.wav"): hashlib.sha256(b"RIFF").hexdigest()}


def test_a_walk_enters_each_folder_once_and_no_folder_linked_from_inside_the_tree(tmp_path):
    """pyarrow's listing enters every linked folder: one linked into a dataset listed its series twice (in train and
    test alike), and a loop without end (a listing that never returned). A folder linked from elsewhere is entered
    (what it holds a reader may refuse: `media_path`), once."""
    import os

    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (data / "ETT-small").mkdir(parents=True)
    elsewhere.mkdir()
    for path in (data / "ETT-small" / "h1.csv", elsewhere / "far.csv"):
        path.write_text("date,OT\n")
    os.symlink("ETT-small", data / "ETT")  # an alias: the same files again
    os.symlink("..", data / "ETT-small" / "up")  # a loop
    os.symlink(elsewhere, data / "out")
    os.symlink(elsewhere, data / "ETT-small" / "out-again")
    os.symlink(data, elsewhere / "back")  # a loop through a folder out of the tree
    assert storage.walk(str(data), ".csv") == ["ETT-small/h1.csv", "ETT-small/out-again/far.csv"]  # first by name


def test_a_walk_leaves_out_what_goes_while_it_lists_and_a_link_to_itself(tmp_path, monkeypatch):
    """A writer's temporary file renamed between the folder's read and its stat (a store written by another job
    while `cache gc` or a reuse lists it), a folder removed before it is entered, a link that leads to itself: left
    out, as pyarrow's listing left them, not an error that stops the job."""
    import os
    import shutil

    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "x.npy.tmp-1").write_bytes(b"x")
    (tmp_path / "gone").mkdir()
    os.symlink("self", tmp_path / "self")
    real_scandir = os.scandir

    def scandir_then_a_writer_renames(path):
        if not isinstance(path, str):  # rmtree's own, by descriptor
            return real_scandir(path)
        entries = list(real_scandir(path))
        if path.endswith("ab"):
            os.rename(tmp_path / "ab" / "x.npy.tmp-1", tmp_path / "ab" / "x.npy")
        elif path == str(tmp_path):
            shutil.rmtree(tmp_path / "gone")
        return iter(entries)

    monkeypatch.setattr(storage.os, "scandir", scandir_then_a_writer_renames)
    assert storage.list_tree(str(tmp_path)) == {}
    monkeypatch.undo()
    assert list(storage.list_tree(str(tmp_path))) == ["ab/x.npy"]
