"""The cluster path of the encode job, from the repository root, with Hugging Face's `kernels` installed.

`python -m pipelines.encode` and `ray job submit --working-dir .` both put the repository root first on sys.path
(the driver's, and the Ray workers'), where our old `kernels/` folder hid HF's `kernels`, which transformers >= 5.25
imports when any encoder loads. Both run the demo's config on 32 digit images with the real DINOv2-S, on Ray Data
however few the items (`run.in_process_max_items=0`), so that its actor pool loads the encoder too; only the data,
encoder and cache paths move to a temp dir."""

import importlib.metadata as metadata
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from preprocessing.demo_data import build_digits
from preprocessing.encoders.convert import export_encoder

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/demo/encode_digits_train.yaml"
IMAGES = 32

pytestmark = pytest.mark.slow  # two real encodes on Ray Data and a Ray head: about 40 s on 2 cores


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    # the premise, not a skip: transformers >= 5.25 requires HF's kernels, and this is the environment users get
    assert metadata.version("kernels"), "Hugging Face's kernels is not installed"
    root = tmp_path_factory.mktemp("cluster_path")
    build_digits(root / "digits", n_train=IMAGES, n_test=0)
    export_encoder("dinov2-small", root / "dinov2-small")
    return root


def job_args(inputs: Path, cache_root: Path) -> list[str]:
    return ["-m", "pipelines.encode", "--config", CONFIG,
            "--set", f"dataset.path={inputs / 'digits' / 'train.json'}",
            "--set", f"encoder.model_dir={inputs / 'dinov2-small'}", "--set", f"cache.root={cache_root}",
            "--set", "run.in_process_max_items=0"]


def assert_encoded(output: str, cache_root: Path) -> None:
    assert "encode items (ray)" in output, output[-3000:]  # the actor pool ran, not the driver's small-job path
    assert f"read {IMAGES} = written {IMAGES} + rejected 0" in output, output[-3000:]
    [manifest] = cache_root.glob("image-dinov2-*/manifest.json")
    assert json.loads(manifest.read_text())["counts"]["written"] == IMAGES


def test_python_m_encode_from_the_repository_root(inputs, tmp_path):
    with tempfile.TemporaryDirectory(prefix="ray") as ray_tmpdir:  # short: Ray's socket paths must fit 107 chars
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a new local Ray, not a cluster
        env.update(HOME=str(tmp_path / "home"), RAY_TMPDIR=ray_tmpdir)
        done = subprocess.run([sys.executable, *job_args(inputs, tmp_path / "cache")], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_encoded(done.stdout + done.stderr, tmp_path / "cache")


def test_ray_job_submit_with_the_repository_as_working_dir(inputs, ray_head, tmp_path):
    command = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head.dashboard_url,
               "--working-dir", ".", "--", "python", *job_args(inputs, tmp_path / "cache")]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, **ray_head.client_env()}, capture_output=True,
                          text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in output, output[-3000:]
    assert_encoded(output, tmp_path / "cache")
