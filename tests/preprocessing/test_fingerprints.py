"""`storage.Fingerprints` on a first pass over a big folder: it shows its progress, saves its record as it goes,
and a pass cut short keeps what it hashed, so the next run reads only the rest."""

import hashlib

import pytest

from preprocessing import storage
from preprocessing.storage import Fingerprints


class Killed(Exception):
    pass


@pytest.fixture
def folder(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    for i in range(30):
        (media / f"{i:02d}.bin").write_bytes(f"file {i}".encode() * (i + 1))
    return media


def uris(folder):
    return sorted(str(p) for p in folder.iterdir())


def test_an_interrupted_first_pass_keeps_what_it_hashed(tmp_path, folder, monkeypatch):
    files, real_sha256 = uris(folder), storage.file_sha256

    def killed_at_the_11th(uri):
        if uri == files[10]:
            raise Killed(uri)
        return real_sha256(uri)

    monkeypatch.setattr(storage, "file_sha256", killed_at_the_11th)
    with pytest.raises(Killed):
        Fingerprints(str(tmp_path / "records")).sha256s(files)
    monkeypatch.setattr(storage, "file_sha256", real_sha256)
    again = Fingerprints(str(tmp_path / "records"))
    digests = again.sha256s(files)
    assert again.files_read == 20  # the 10 hashed before the interruption are not read again
    assert digests == {uri: hashlib.sha256(open(uri, "rb").read()).hexdigest() for uri in files}


def test_the_record_is_saved_as_the_pass_goes_and_its_progress_shown(tmp_path, folder, monkeypatch, capsys):
    saves, real_write = [], storage.write_atomic
    monkeypatch.setattr(storage, "write_atomic", lambda uri, data: (saves.append(uri), real_write(uri, data)))
    Fingerprints(str(tmp_path / "once")).sha256s(uris(folder))
    assert len(saves) == 1 and "sha256 of" not in capsys.readouterr().err  # 30 files: quick, no bar

    saves.clear()
    every_file = Fingerprints(str(tmp_path / "every"), save_every_s=0)
    every_file.progress_from = 10
    every_file.sha256s(uris(folder))
    assert len(saves) == 31  # after each file, then at the end
    assert f"sha256 of {folder}" in capsys.readouterr().err and every_file.files_read == 30
