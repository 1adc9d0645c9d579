"""ray_cluster.yaml against Ray's own cluster-launcher schema (what `ray up` checks before it starts anything)."""

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = Path(__file__).resolve().parents[2] / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CONFIG.read_text())


def test_cluster_config_is_valid(config):
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    gpu_types = {name: t for name, t in prepared["available_node_types"].items() if t["resources"].get("GPU")}
    assert gpu_types and all(t["max_workers"] >= t["min_workers"] for t in gpu_types.values())


def test_every_node_fails_a_task_killed_for_memory_after_the_retries_a_local_instance_makes(config):
    """Ray's default retries such a task without end: a collection's folder encode too large for its node never
    failed, and nothing said so."""
    from pipelines.encode import OOM_RETRIES

    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        (start,) = [c for c in commands if "ray start" in c]
        assert f"RAY_task_oom_retries={OOM_RETRIES} ray start" in start


def test_every_node_gives_a_stopped_job_the_time_a_local_head_does(config):
    """`ray job stop`'s SIGKILL comes RAY_JOB_STOP_WAIT_TIME_S after its SIGTERM, read where the job's supervisor
    runs: the head, or a worker where the job asks for entrypoint resources (the local head's is checked by
    `test_a_stopped_job_has_time_to_end_its_runs`)."""
    from infra.ray_head import JOB_STOP_WAIT

    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        (start,) = [c for c in commands if "ray start" in c]
        assert " ".join(f"{k}={v}" for k, v in JOB_STOP_WAIT.items()) in start.split(";")[-1].split("ray start")[0]


def test_cluster_install_provides_what_a_job_imports(config):
    """The packages the setup command installs (the project's dependencies plus the extras it names) cover
    what a training, encode or eval job imports on a node, the tokenizer's vocabulary (`rwkv`) included."""
    import re
    import tomllib

    project = tomllib.loads((CONFIG.parent / "pyproject.toml").read_text())["project"]
    installs = [c for c in config["setup_commands"] if "pip install" in c and "~/modrwkv" in c]
    assert len(installs) == 1, config["setup_commands"]
    assert "-c ~/modrwkv/constraints.txt" in installs[0]  # the pinned torch
    target = re.search(r"-e\s+['\"]?~/modrwkv(\[[^\]]*\])?", installs[0])
    assert target, installs[0]
    extras = target.group(1).strip("[]").split(",") if target.group(1) else []
    requirements = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]
    names = {re.split(r"[\[<>=~! ;]", r, maxsplit=1)[0].lower() for r in requirements}
    assert {"torch", "ray", "deepspeed", "mlflow", "webdataset", "boto3", "transformers", "rwkv"} <= names


def test_every_node_installs_the_lock_but_torchs_own_build(config, tmp_path):
    """A node got the newest versions pyproject.toml's ranges allowed when it booted (the head one day, a worker the
    autoscaler adds another); now the lock's, run here as a node runs the setup commands (HOME holding the
    repository as ~/modrwkv): every locked package but torch (its CUDA build from PyPI) and triton (that torch's)."""
    import subprocess

    (tmp_path / "modrwkv").symlink_to(CONFIG.parent)
    *prepare, install = config["setup_commands"]
    for command in prepare:
        subprocess.run(command, shell=True, check=True, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert "-c ~/modrwkv-lock.txt" in install and "-c ~/modrwkv/constraints.txt" in install
    locked = [line for line in (CONFIG.parent / "requirements.lock").read_text().splitlines()
              if line and not line.startswith("#")]
    constrained = [line for line in (tmp_path / "modrwkv-lock.txt").read_text().splitlines()
                   if line and not line.startswith("#")]
    assert {line.split("==")[0] for line in set(locked) - set(constrained)} == {"torch", "triton"}
    assert set(constrained) < set(locked)


def test_nothing_git_ignores_is_copied_to_the_nodes(config):
    """`ray up` rsyncs the working tree to every node: `make drift`'s venv went along (2.8 GB), missing from the
    list of excludes."""
    assert ".gitignore" in config["rsync_filter"]
    assert {".venv", ".venv-drift", "runs"} <= set(config["rsync_exclude"])  # for a copy without git


@pytest.mark.parametrize("where", ["top", "node_type"])
def test_unknown_key_is_rejected(config, where):
    bad = copy.deepcopy(config)
    (bad if where == "top" else bad["available_node_types"]["gpu_a10g"])["gpus_per_node"] = 1
    with pytest.raises(Exception, match="gpus_per_node"):
        validate_config(prepare_config(bad))


def test_a_gpu_workers_setup_refuses_a_torch_that_sees_no_gpu(config):
    """The check runs as the node runs it: on this CPU-only torch it stops the setup, naming why (a node whose driver
    is too old for its CUDA torch fails the same way, at setup, not at every job's first step)."""
    import subprocess
    import sys

    import torch

    (check,) = config["worker_setup_commands"]
    done = subprocess.run(check.replace("python ", f"{sys.executable} ", 1), shell=True, capture_output=True, text=True)
    expected = "CPU-only torch on a GPU worker" if not torch.version.cuda else "sees no GPU"
    assert done.returncode != 0 or torch.cuda.is_available()
    assert torch.cuda.is_available() or expected in done.stderr, done.stderr
