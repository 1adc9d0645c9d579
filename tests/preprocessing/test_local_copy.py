"""preprocessing/local_copy.py: node-local copies of s3:// files and folders, against the local S3 endpoint."""

import os
import subprocess
import sys
import time
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
    yield s3_client(s3_server.endpoint_url)
    local_copy_module.release_copies()


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
    new = Path(local_copy(uri))
    assert new != copy and new.name == "model" and fetched == [uri, uri]
    assert (new / "config.json").read_bytes() == b'{"width": 16}'
    assert not (new / "weights" / "part-1.safetensors").exists()  # the copy is the remote's, not a merge
    assert [p.name for p in new.parent.iterdir() if p.name.startswith("incoming")] == []
    # this process was handed the old version and may still be reading it: it stays whole, config and weights
    assert (copy / "config.json").read_bytes() == b'{"width": 8}'
    assert (copy / "weights" / "part-1.safetensors").read_bytes() == b"1" * 100
    local_copy_module.release_copies()  # done with both: the next use removes the version nobody holds
    assert local_copy(uri) == str(new) and fetched == [uri, uri] and not copy.exists()
    assert [f.path for f in local_copy_module.node_folders()] == [new.parent]


def test_a_remote_file_is_copied_under_its_name(s3, tmp_path):
    s3.put_object(Bucket=BUCKET, Key="local-copy/file/rwkv7.pth", Body=b"state dict bytes")
    copy = Path(local_copy(f"s3://{BUCKET}/local-copy/file/rwkv7.pth"))
    assert copy.name == "rwkv7.pth" and copy.read_bytes() == b"state dict bytes"


def test_a_remote_file_named_like_the_copys_records_keeps_its_bytes(s3):
    for name in (local_copy_module.LISTING, local_copy_module.SOURCE):
        s3.put_object(Bucket=BUCKET, Key=f"local-copy/records/{name}", Body=b"the remote's own bytes")
        uri = f"s3://{BUCKET}/local-copy/records/{name}"
        copy = Path(local_copy(uri))
        assert copy.name == name and copy.read_bytes() == b"the remote's own bytes"
        assert local_copy(uri) == str(copy) and uri in [f.source for f in local_copy_module.node_folders()]


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


def test_copies_and_staged_outputs_unused_for_a_while_are_listed_then_pruned(s3, monkeypatch, capsys):
    from pipelines.cli import main

    s3.put_object(Bucket=BUCKET, Key="local-copy/old/rwkv7.pth", Body=b"o" * 3000)
    s3.put_object(Bucket=BUCKET, Key="local-copy/new/config.json", Body=b"n" * 10)
    old, new = f"s3://{BUCKET}/local-copy/old/rwkv7.pth", f"s3://{BUCKET}/local-copy/new"
    old_copy, new_copy = Path(local_copy(old)), Path(local_copy(new))
    staged = local_copy_module.working_dir(f"s3://{BUCKET}/runs/phase2")
    (staged / "model").mkdir()
    (staged / "model" / "weights.safetensors").write_bytes(b"w" * 2000)
    local_copy_module.publish(staged, f"s3://{BUCKET}/runs/phase2", ("model",))
    failed = local_copy_module.working_dir(f"s3://{BUCKET}/runs/failed")  # its run stopped before uploading
    (failed / "model.safetensors").write_bytes(b"f" * 10)
    ten_days_ago = time.time() - 10 * 86400
    for path in (old_copy.parent / local_copy_module.LISTING, *staged.rglob("*"), staged, *failed.rglob("*"), failed):
        os.utime(path, (ten_days_ago, ten_days_ago))

    listed = {f.path: f for f in local_copy_module.node_folders()}
    assert sorted(listed) == sorted([old_copy.parent, new_copy.parent, staged, failed])
    assert [listed[p].source for p in (old_copy.parent, new_copy.parent, staged, failed)] == [old, new, None, None]
    assert listed[old_copy.parent].bytes > 3000 and listed[staged].bytes == 2000 + len(f"s3://{BUCKET}/runs/phase2")
    assert listed[old_copy.parent].last_used < listed[new_copy.parent].last_used
    assert listed[staged].uploaded and not listed[failed].uploaded
    assert main(["cache", "local"]) == 0
    out = capsys.readouterr().out
    assert f"{old} (in use: kept)  {old_copy.parent}" in out and f"(staged output, never uploaded: kept)  {failed}" in out

    fetched = fetches(monkeypatch)
    assert [f.source for f in local_copy_module.prune(7 * 86400)] == [None]  # this process holds the copies
    local_copy_module.release_copies()
    assert sorted((f.source for f in local_copy_module.prune(7 * 86400)), key=str) == sorted([old, None], key=str)
    assert old_copy.exists() and staged.exists()  # a dry run removes nothing
    assert main(["cache", "local", "--unused-days", "7", "--apply"]) == 0
    assert "removed: 2 unused for 7 days" in capsys.readouterr().out
    assert not old_copy.exists() and not staged.exists() and new_copy.exists()
    assert (failed / "model.safetensors").read_bytes() == b"f" * 10  # never uploaded: maybe the only copy
    assert local_copy(new) == str(new_copy) and fetched == []  # the one in use stays
    assert local_copy(old) == str(old_copy) and fetched == [old] and old_copy.read_bytes() == b"o" * 3000
    assert main(["cache", "local", "--apply"]) == 2 and "give --unused-days" in capsys.readouterr().err


def test_a_folders_configs_are_copied_without_its_weights(s3, monkeypatch):
    prefix = "local-copy/encoder"
    for name, body in (("config.json", b"{}"), ("preprocessor_config.json", b'{"size": 8}'),
                       ("model.safetensors", b"w" * 1000), ("nested/extra.json", b"{}")):
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=body)
    fetched, uri = fetches(monkeypatch), f"s3://{BUCKET}/{prefix}"
    configs = Path(local_copy_module.local_configs(uri))
    assert sorted(p.name for p in configs.rglob("*")) == ["config.json", "preprocessor_config.json"]
    assert (configs / "preprocessor_config.json").read_bytes() == b'{"size": 8}'
    assert local_copy_module.local_configs(uri) == str(configs) and len(fetched) == 2  # once
    assert [f.source for f in local_copy_module.node_folders()] == [f"{uri} (configs)"]
    with pytest.raises(FileNotFoundError, match="no config files"):
        local_copy_module.local_configs(f"s3://{BUCKET}/{prefix}/nested-none")


def test_a_copy_used_after_it_was_listed_is_not_pruned(s3, monkeypatch):
    s3.put_object(Bucket=BUCKET, Key="local-copy/busy/rwkv7.pth", Body=b"b" * 100)
    uri = f"s3://{BUCKET}/local-copy/busy/rwkv7.pth"
    copy = Path(local_copy(uri))
    ten_days_ago = time.time() - 10 * 86400
    os.utime(copy.parent / local_copy_module.LISTING, (ten_days_ago, ten_days_ago))
    listed = local_copy_module.node_folders()
    local_copy_module.release_copies()
    assert [f.source for f in local_copy_module.prune(7 * 86400)] == [uri]  # stale when listed
    local_copy(uri)  # then a worker uses it, and is done with it
    local_copy_module.release_copies()
    monkeypatch.setattr(local_copy_module, "node_folders", lambda: listed)
    assert local_copy_module.prune(7 * 86400, apply=True) == [] and copy.read_bytes() == b"b" * 100


def test_a_removal_cut_short_leaves_a_copy_fetched_again_not_reused(s3, monkeypatch):
    """`cache local --apply` interrupted (Ctrl-C) inside a copy's removal: the slot's listing had outlived the
    half-removed folder, which every later job on the node then loaded as the source."""
    prefix = "local-copy/interrupted"
    for name in ("config.json", "weights.safetensors"):
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=name.encode())
    fetched, uri = fetches(monkeypatch), f"s3://{BUCKET}/{prefix}"
    copy = Path(local_copy(uri))
    local_copy_module.release_copies()

    def interrupted(path):  # the copy loses a file, then the removal stops
        (copy / "weights.safetensors").unlink()
        raise KeyboardInterrupt

    real_remove = local_copy_module.remove
    monkeypatch.setattr(local_copy_module, "remove", interrupted)
    with pytest.raises(KeyboardInterrupt):
        local_copy_module.empty_slot(copy.parent)
    monkeypatch.setattr(local_copy_module, "remove", real_remove)
    assert Path(local_copy(uri)) == copy and fetched == [uri, uri]
    assert (copy / "weights.safetensors").read_bytes() == b"weights.safetensors"


def test_a_copy_a_living_process_was_handed_is_kept_until_it_exits(s3, capsys):
    from pipelines.cli import main

    s3.put_object(Bucket=BUCKET, Key="local-copy/held/rwkv7.pth", Body=b"h" * 100)
    uri = f"s3://{BUCKET}/local-copy/held/rwkv7.pth"
    worker = subprocess.Popen(  # a long job: handed the copy, then reads it for as long as it runs
        [sys.executable, "-c", "import sys; from preprocessing.local_copy import local_copy; "
                               f"print(local_copy({uri!r}), flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    try:
        copy = Path(worker.stdout.readline().strip())
        ten_days_ago = time.time() - 10 * 86400
        os.utime(copy.parent / local_copy_module.LISTING, (ten_days_ago, ten_days_ago))
        assert [f.in_use for f in local_copy_module.node_folders()] == [True]
        assert main(["cache", "local"]) == 0 and f"{uri} (in use: kept)" in capsys.readouterr().out
        assert local_copy_module.prune(7 * 86400, apply=True) == [] and copy.read_bytes() == b"h" * 100
    finally:
        worker.communicate("")
    assert worker.returncode == 0 and [f.in_use for f in local_copy_module.node_folders()] == [False]
    assert [f.source for f in local_copy_module.prune(7 * 86400, apply=True)] == [uri] and not copy.exists()


def test_a_published_folder_is_left_as_the_staged_one_is(s3):
    """Phase I (adapter only) published where phase II's full model lay: the old weights file goes, rather than
    lying beside the adapter (a folder holding both is refused when read)."""
    prefix = "local-copy/republished/model"
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/model.safetensors", Body=b"phase II")
    staged = local_copy_module.working_dir(f"s3://{BUCKET}/local-copy/republished")
    (staged / "model").mkdir()
    (staged / "model" / "adapter.safetensors").write_bytes(b"phase I")
    local_copy_module.publish(staged, f"s3://{BUCKET}/local-copy/republished", ("model",))
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]
              if not o["Key"].endswith("/")]  # the folder's marker aside
    assert listed == [f"{prefix}/adapter.safetensors"]


def test_a_slot_another_process_empties_while_this_one_looks_is_passed_over(tmp_path, monkeypatch):
    """Workers of one node starting at once: each, its fetch done, empties the source's other versions, and lists
    the node's copies; a slot's records removed by another between a look and a read are passed over, not raised."""
    from preprocessing.local_copy import SOURCE, node_copy, node_folders

    monkeypatch.setenv(local_copy_module.ROOT_ENV, str(tmp_path / "copies"))

    def fetch(path: Path) -> None:
        path.write_text("weights")

    node_copy("s3://b/model", "model", {"v": 1}, fetch)
    read_text = Path.read_text

    def emptied_meanwhile(path: Path, *args, **kwargs):
        if path.name == SOURCE:
            path.unlink(missing_ok=True)  # as the other process's `empty_slot` does
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", emptied_meanwhile)
    assert node_copy("s3://b/model", "model", {"v": 2}, fetch).read_text() == "weights"
    assert {f.source for f in node_folders()} == {"(remote not recorded)"}
