"""The Makefile's targets, as `make -n` lists their commands and as `make tools` behaves without root."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="no make")


def dry_run(target: str) -> str:
    return subprocess.run([MAKE, "-n", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_only_what_builds_the_speech_needs_espeak_and_sox():
    """`make test` needs neither (no test synthesises speech), so it must not try to install them: as a user other
    than root it failed inside apt-get before a test ran."""
    for target in ("test", "test-fast"):
        assert "espeak-ng" not in dry_run(target)
    for target in ("demo", "quality", "drift"):
        assert "command -v espeak-ng" in dry_run(target)


def test_tools_tells_a_user_without_root_the_command(tmp_path):
    """Not root and the tools missing: the install command is printed, apt-get is not run (it would fail)."""
    for name, script in {"id": "echo 1000", "apt-get": f": > {tmp_path}/apt-get-ran; exit 100"}.items():
        (tmp_path / name).write_text(f"#!/bin/sh\n{script}\n")
        (tmp_path / name).chmod(stat.S_IRWXU)
    # PATH holds these two alone: no espeak-ng or sox on it
    out = subprocess.run([MAKE, "tools"], cwd=ROOT, env={**os.environ, "PATH": str(tmp_path)}, capture_output=True,
                         text=True)
    assert out.returncode != 0
    assert "sudo apt-get install espeak-ng sox" in out.stderr
    assert not (tmp_path / "apt-get-ran").exists()


def test_an_install_that_finds_no_torch_cpu_build_is_tried_again_with_pytorchs_index(tmp_path):
    """A fresh machine's pip knows PyPI alone, which has no `torch==2.13.0+cpu`: the install failed there, and the
    README's two commands set nothing up without an exported index."""
    venv, calls = tmp_path / "venv", tmp_path / "calls"
    # a Python whose venv's pip records its arguments and finds torch only on PyTorch's index
    pip = f"#!/bin/sh\necho \"$*\" >> {calls}\ncase \"$*\" in *\"-r requirements.lock\"*download.pytorch.org*) ;; " \
          "*\"-r requirements.lock\"*) exit 1;; esac\n"
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nmkdir -p {venv}/bin\nprintf '%s' '{pip}' > {venv}/bin/pip\nchmod +x {venv}/bin/pip\n")
    python.chmod(stat.S_IRWXU)
    out = subprocess.run([MAKE, f"PYTHON={python}", f"VENV={venv}", f"{venv}/.installed"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    installs = [line for line in calls.read_text().splitlines() if "-r requirements.lock" in line]
    assert len(installs) == 2 and installs[1].endswith("--extra-index-url https://download.pytorch.org/whl/cpu")
    assert "retrying with https://download.pytorch.org/whl/cpu" in out.stderr
