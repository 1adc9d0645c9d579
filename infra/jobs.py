"""Submit a job to a Ray cluster through its dashboard and wait for it. The command-line equivalent:

    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=runs/services/ray-auth-token \\
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m pipelines.train ...

The job's `python` is the one on the head's PATH (`start_ray_head` puts the venv first); the working dir is
uploaded, so the job imports this checkout's packages.
"""

import dataclasses
import time
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

# Never uploaded with the working dir: run outputs, caches and VCS data (.gitignore'd paths are skipped too).
EXCLUDES = [".git", "runs", ".venv", "benchmarks/out", "**/__pycache__", "*.egg-info"]
FINISHED = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


@dataclasses.dataclass
class JobResult:
    job_id: str
    status: JobStatus
    logs: str


def runtime_env(working_dir: str | Path = ".", env_vars: dict[str, str] | None = None) -> dict:
    """`env_vars` are the job's runtime env, which Ray's dashboard and state API show to whoever reaches them: no
    real credentials there (the local endpoint's placeholders are fine). A job's driver passes its own S3 settings
    on to its workers as `preprocessing.storage.Settings` does."""
    return {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": dict(env_vars or {})}


def submit_job(dashboard_url: str, entrypoint: str, working_dir: str | Path = ".",
               env_vars: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> str:
    """`headers` carries the auth token (`RayHead.auth_headers()`); without it the client reads
    RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH from the environment."""
    client = JobSubmissionClient(dashboard_url, headers=headers)
    return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(working_dir, env_vars))


def wait_for_job(dashboard_url: str, job_id: str, timeout: float = 600.0,
                 headers: dict[str, str] | None = None) -> JobResult:
    client = JobSubmissionClient(dashboard_url, headers=headers)
    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(job_id)) not in FINISHED:
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            raise TimeoutError(f"job {job_id} still {status.value} after {timeout:.0f} s")
        time.sleep(0.5)
    return JobResult(job_id, status, client.get_job_logs(job_id))


def run_job(dashboard_url: str, entrypoint: str, working_dir: str | Path = ".",
            env_vars: dict[str, str] | None = None, headers: dict[str, str] | None = None,
            timeout: float = 600.0) -> JobResult:
    job_id = submit_job(dashboard_url, entrypoint, working_dir, env_vars, headers)
    return wait_for_job(dashboard_url, job_id, timeout, headers)
