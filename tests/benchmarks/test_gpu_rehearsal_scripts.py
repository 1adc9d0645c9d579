"""benchmarks/gpu_rehearsal.sh and gpu_rehearsal_inputs.sh as shell scripts, with the programs they start (python3,
nvidia-smi, the venv's python) replaced by stubs: what they write and where, not what the stubs would compute."""

import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="no git")


def stub(folder: Path, name: str, script: str = "exit 0") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(f"#!/bin/sh\n{script}\n")
    (folder / name).chmod(stat.S_IRWXU)


def repo_with(folder: Path, *files: str) -> Path:
    """A git repository holding copies of these files of ours, committed."""
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, folder / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(folder)]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "scripts"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    return folder


PYTHON3 = 'echo stub python3 "$@"'


def rehearse(repo: Path, tmp_path: Path, python3: str = PYTHON3, **env) -> subprocess.CompletedProcess:
    """benchmarks/gpu_rehearsal.sh run in `repo` with python3 and nvidia-smi stubbed; `env` over the defaults: OUT
    under tmp_path, the kernel tests alone, 60 s of budget."""
    tools = tmp_path / "bin"
    stub(tools, "python3", python3)
    stub(tools, "nvidia-smi", "echo stub GPU")
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "PARTS": "kernel_tests", "TRITON_CACHE_DIR": str(tmp_path / "triton"), "BUDGET_S": "60", **env}
    return subprocess.run(["bash", "benchmarks/gpu_rehearsal.sh"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=60)


def test_the_rehearsal_packs_logs_and_autotuning_results_into_a_relative_out(tmp_path):
    """OUT given relative (its default is): both archives land in it, although the autotuning results are packed
    from inside Triton's cache folder."""
    repo = repo_with(tmp_path / "repo", "benchmarks/gpu_rehearsal.sh")
    cache = tmp_path / "triton"
    (cache / "somehash").mkdir(parents=True)
    (cache / "somehash" / "_chunk_fwd_kernel.autotune.json").write_text("{}")
    run = rehearse(repo, tmp_path, OUT="out/gpu")
    assert run.returncode == 0, run.stderr
    assert "== kernel_tests: exit 0" in run.stdout
    out = repo / "out" / "gpu"
    with tarfile.open(out / "rehearsal.tar.gz") as logs:
        assert "./kernel_tests.log" in logs.getnames()
    with tarfile.open(out / "triton_autotune.tar.gz") as tuned:
        assert tuned.getnames() == ["./somehash/_chunk_fwd_kernel.autotune.json"]


@pytest.mark.parametrize("failing, message", [("pip install", "the wheels in .whl did not install"),
                                               ("import deepspeed", "a carried package does not import")])
def test_a_failed_install_stops_the_rehearsal_before_any_part(tmp_path, failing, message):
    """Without the stop, every part ran on and the first one to import what the wheels held failed minutes later,
    on the device's time."""
    repo = repo_with(tmp_path / "repo", "benchmarks/gpu_rehearsal.sh")
    carried_inputs(repo)
    run = rehearse(repo, tmp_path, f'case "$*" in *"{failing}"*) exit 1;; esac; {PYTHON3}')
    assert run.returncode == 1 and f"== {message}: stopping" in run.stdout, run.stdout + run.stderr
    assert "== kernel_tests" not in run.stdout


def test_an_unknown_part_stops_the_rehearsal_naming_the_parts_and_the_machine_line_comes_back(tmp_path):
    """A mistyped part ("wkv7_kernel") ran nothing and packed nothing: not even the machine's line came back."""
    repo = repo_with(tmp_path / "repo", "benchmarks/gpu_rehearsal.sh")
    run = rehearse(repo, tmp_path, PARTS="kernel_tests wkv7_kernel")
    assert run.returncode == 2 and "== unknown part wkv7_kernel; the parts: kernel_tests" in run.stdout
    assert "== kernel_tests" not in run.stdout
    # every part by default, none with budget left: each skipped at once, the machine's line packed before any
    carried_inputs(repo)
    run = rehearse(repo, tmp_path, BUDGET_S="0", PARTS="")  # empty: the default, every part
    assert run.returncode == 0 and "== wkv7_kernels: skipped" in run.stdout, run.stdout + run.stderr
    with tarfile.open(tmp_path / "out" / "rehearsal.tar.gz") as logs:
        assert logs.getnames() == [".", "./machine.log"]
    # and all it printed, in $OUT as it was printed
    assert (tmp_path / "out" / "console.log").read_text() == run.stdout


def carried_inputs(repo: Path) -> None:
    """What gpu_rehearsal_inputs.sh makes and a call carries: wheels, and the demo's caches."""
    (repo / ".whl").mkdir()
    (repo / ".whl" / "deepspeed-0.19.8-py3-none-any.whl").write_text("")
    (repo / "runs" / "gpu_demo").mkdir(parents=True)
    (repo / "runs" / "gpu_demo" / "caches.json").write_text("{}")


@pytest.mark.parametrize("parts, carried, missing", [
    ("deepspeed_tests", [], "deepspeed_tests: .whl/;"),
    ("kernel_tests demo_quality", [".whl/deepspeed-0.19.8-py3-none-any.whl"],
     "demo_quality: runs/gpu_demo/caches.json;"),
    ("demo_quality", ["runs/gpu_demo/caches.json"], "demo_quality: .whl/;")])
def test_parts_that_read_the_carried_inputs_stop_the_rehearsal_without_them(tmp_path, parts, carried, missing):
    """Not carried (or made in another checkout), each such part failed on its first import or file in turn; the
    DeepSpeed tests need the wheels alone (the carry's 64 MiB may hold nothing else)."""
    repo = repo_with(tmp_path / "repo", "benchmarks/gpu_rehearsal.sh")
    for name in carried:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("")
    run = rehearse(repo, tmp_path, PARTS=parts)
    assert run.returncode == 3 and f"== not carried (benchmarks/gpu_rehearsal_inputs.sh makes them): {missing}" in (
        run.stdout), run.stdout
    assert "== kernel_tests" not in run.stdout
    (repo / ".whl").mkdir(exist_ok=True)
    (repo / ".whl" / "deepspeed-0.19.8-py3-none-any.whl").write_text("")
    assert rehearse(repo, tmp_path, PARTS="deepspeed_tests").returncode == 0  # the wheels are all it reads


def test_parts_that_need_no_wheels_run_without_them(tmp_path):
    """The import check belongs to the carried wheels: a kernels-only run on an image without DeepSpeed goes on."""
    repo = repo_with(tmp_path / "repo", "benchmarks/gpu_rehearsal.sh")
    run = rehearse(repo, tmp_path, f'case "$*" in *"import deepspeed"*) exit 1;; esac; {PYTHON3}')
    assert run.returncode == 0 and "== kernel_tests: exit 0" in run.stdout, run.stdout + run.stderr


def test_the_inputs_script_runs_in_a_git_worktree(tmp_path):
    """In a worktree .git is a file: the wheels' folder is excluded through git's own path for info/exclude, where
    writing .git/info/exclude stopped the script."""
    main = repo_with(tmp_path / "main", "benchmarks/gpu_rehearsal_inputs.sh", "requirements.lock")
    worktree = tmp_path / "worktree"
    subprocess.run(["git", "-C", str(main), "worktree", "add", "-q", str(worktree)], check=True, capture_output=True)
    tools = tmp_path / "bin"
    stub(tools, "python3")  # pip download
    stub(worktree / ".venv" / "bin", "python")  # pip wheel
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", "benchmarks/gpu_rehearsal_inputs.sh", "--no-caches"], cwd=worktree, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "KiB of the" in run.stdout and "KiB beside the tracked tree" in run.stdout
    (worktree / ".whl" / "x.whl").write_text("")
    ignored = subprocess.run(["git", "-C", str(worktree), "check-ignore", ".whl/x.whl"], capture_output=True)
    assert ignored.returncode == 0
    # what a call carries is counted in bytes with the tracked tree's: 64 MiB of caches leave no room
    (worktree / "runs" / "gpu_demo").mkdir(parents=True)
    with open(worktree / "runs" / "gpu_demo" / "caches.tar", "wb") as f:
        f.truncate(64 * 2**20)  # sparse: its size without its disk
    run = subprocess.run(["bash", "benchmarks/gpu_rehearsal_inputs.sh", "--no-caches"], cwd=worktree, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and ".whl runs/gpu_demo hold 655" in run.stderr and "KiB, over the" in run.stderr
