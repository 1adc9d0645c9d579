"""preprocessing/local_copy.py: node-local copies of s3:// files and folders, against the local S3 endpoint."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from infra.s3_server import s3_client
from preprocessing import local_copy as local_copy_module
from preprocessing import storage
from preprocessing.local_copy import local_copy
from tests.services import BUCKET


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(local_copy_module.ROOT_ENV, str(tmp_path / "copies"))
    return s3_client(s3_server.endpoint_url)


def fetches(monkeypatch) -> list[str]:
    """The URIs `local_copy` fetches from, in order."""
    fetched, real = [], storage.copy_tree

    def counting(source, destination):
        fetched.append(source)
        real(source, destination)

    monkeypatch.setattr(storage, "copy_tree", counting)
    return fetched


def test_a_local_path_is_its_own_copy(tmp_path):
    assert local_copy(str(tmp_path / "model")) == str(tmp_path / "model")


def test_a_remote_folder_is_fetched_once_and_again_only_when_it_changes(s3, monkeypatch, tmp_path):
    prefix = "local-copy/model"
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/config.json", Body=b'{"width": 8}')
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/weights/part-0.safetensors", Body=b"0" * 100)
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/weights/part-1.safetensors", Body=b"1" * 100)
    fetched, uri = fetches(monkeypatch), f"s3://{BUCKET}/{prefix}"

    copy = Path(local_copy(uri))
    assert copy.name == "model" and copy.is_relative_to(tmp_path / "copies")
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file()) == [
        "config.json", "weights/part-0.safetensors", "weights/part-1.safetensors"]
    assert (copy / "config.json").read_bytes() == b'{"width": 8}'
    assert local_copy(uri) == str(copy) and fetched == [uri]  # unchanged: nothing fetched

    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/config.json", Body=b'{"width": 16}')  # another size
    s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/weights/part-1.safetensors")
    assert local_copy(uri) == str(copy) and fetched == [uri, uri]
    assert (copy / "config.json").read_bytes() == b'{"width": 16}'
    assert not (copy / "weights" / "part-1.safetensors").exists()  # the copy is the remote's, not a merge
    assert [p.name for p in copy.parent.iterdir() if p.name.startswith("incoming")] == []


def test_a_remote_file_is_copied_under_its_name(s3, tmp_path):
    s3.put_object(Bucket=BUCKET, Key="local-copy/file/rwkv7.pth", Body=b"state dict bytes")
    copy = Path(local_copy(f"s3://{BUCKET}/local-copy/file/rwkv7.pth"))
    assert copy.name == "rwkv7.pth" and copy.read_bytes() == b"state dict bytes"


def test_a_missing_remote_is_named(s3):
    with pytest.raises(FileNotFoundError, match=f"s3://{BUCKET}/local-copy/none: no such file or folder"):
        local_copy(f"s3://{BUCKET}/local-copy/none")


def test_workers_of_one_node_wait_for_one_fetch(s3, monkeypatch):
    for i in range(20):
        s3.put_object(Bucket=BUCKET, Key=f"local-copy/shared/shard-{i}.bin", Body=bytes([i]) * 5000)
    fetched, uri = fetches(monkeypatch), f"s3://{BUCKET}/local-copy/shared"
    with ThreadPoolExecutor(4) as pool:
        copies = list(pool.map(local_copy, [uri] * 4))
    assert len(set(copies)) == 1 and fetched == [uri]
    assert sorted(p.name for p in Path(copies[0]).iterdir()) == sorted(f"shard-{i}.bin" for i in range(20))
