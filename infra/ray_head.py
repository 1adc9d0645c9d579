"""A local Ray head node (`ray start --head --block`), stopped by its pid.

Not `ray stop`: it terminates every Ray process on the machine by name, other users' clusters included.
Every port it opens (GCS, raylet, client server, dashboard and its agent, runtime-env agent, metrics) is on
127.0.0.1: in Ray's single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, its default on macOS and Windows)
`ray start` keeps `--node-ip-address 127.0.0.1`; otherwise it swaps in the machine's address, and the GCS, raylet
and agents listen on all interfaces. No other machine can join such a head (`ray_cluster.yaml` is for clusters).
Token authentication is always on, with the token in a file under the state dir: other users of the machine reach
127.0.0.1 too, and an explicit mode keeps a stray `~/.ray/auth_token` from switching auth on behind our back.
"""

import contextlib
import dataclasses
import hashlib
import os
import secrets
import stat
import sys
import tempfile
from pathlib import Path

from .process import (HOST, ServiceError, ServiceProcess, free_ports, http_ok, service_port, spawn,
                      venv_bin, wait_until)

# Ports Ray would otherwise take from fixed defaults (10001, 52365, ...), which a second head on the machine holds.
INTERNAL_PORT_FLAGS = (
    "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port", "--object-manager-port",
)
# The same for the Prometheus endpoints of the dashboard and the autoscaler, which only read these variables
INTERNAL_PORT_VARIABLES = ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT")

# Ray's single-machine mode: every port on 127.0.0.1 (see above)
SINGLE_MACHINE = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Ray takes a token in RAY_AUTH_TOKEN before the one in RAY_AUTH_TOKEN_PATH's file: one exported for another cluster
# would become this head's (and its clients' would not match the file's); empty, Ray passes over it
NO_TOKEN_VARIABLE = {"RAY_AUTH_TOKEN": ""}
# `ray job stop` sends SIGTERM, then SIGKILL after this many seconds (Ray's default, 3): a training stopped so aborts
# its Ray run and ends its MLflow run KILLED on the way out, which 3 s cut short (`modrwkv train`: 5.5-6 s from its
# SIGTERM to its exit, on 2 cores)
JOB_STOP_WAIT = {"RAY_JOB_STOP_WAIT_TIME_S": "30"}


@dataclasses.dataclass(kw_only=True)
class RayHead(ServiceProcess):
    gcs_port: int
    dashboard_port: int
    token_path: str

    @property
    def address(self) -> str:
        """For `ray.init(address=...)`."""
        return f"{HOST}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """For `ray job submit --address` and `JobSubmissionClient`."""
        return f"http://{HOST}:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """What a client (ray.init, `ray job submit`, JobSubmissionClient) needs in its environment. ray.init needs
        the single-machine mode too: without it, it swaps the head's 127.0.0.1 for the machine's address and finds
        nothing listening there."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path, **NO_TOKEN_VARIABLE, **SINGLE_MACHINE}

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {Path(self.token_path).read_text().strip()}"}


def auth_token_file(state_dir: Path) -> Path:
    """The cluster's token, created once (owner-only) and reused on restarts; made again when the file is empty (a
    start cut short) or readable by others (it may have been read)."""
    path = state_dir / "ray-auth-token"
    with contextlib.suppress(FileNotFoundError):
        found = path.lstat()
        if stat.S_ISREG(found.st_mode) and found.st_size and stat.S_IMODE(found.st_mode) == 0o600:
            return path
    temporary = path.with_name(f"{path.name}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
    try:
        with os.fdopen(descriptor, "w") as f:
            f.write(secrets.token_hex(32))
        os.replace(temporary, path)  # whole, or the old file stays
    finally:
        temporary.unlink(missing_ok=True)
    return path


def default_ray_tmpdir(state_dir: Path) -> Path:
    """Ray's unix sockets live under RAY_TMPDIR and their paths must fit in 107 characters with the session name
    (~70 of them), so not under a deep state dir; one per state dir, so not Ray's shared /tmp/ray either."""
    return Path(tempfile.gettempdir()) / f"ray-{hashlib.sha1(str(state_dir).encode()).hexdigest()[:8]}"


def private_dir(path: Path) -> Path:
    """`path`, created owner-only (one of ours from before, made by Ray with the umask's mode, is made so), and
    refused when another user owns it: its name is predictable, and whoever controls the folder controls the sockets
    Ray puts in it."""
    path.mkdir(mode=0o700, exist_ok=True)
    found = path.lstat()  # the folder itself: a link planted there would pass its target's owner off as the folder's
    if not stat.S_ISDIR(found.st_mode):
        raise ServiceError(f"{path}: Ray's socket folder is not a folder (a link?); remove it, or pass ray_tmpdir")
    if found.st_uid != os.getuid():
        raise ServiceError(f"{path}: Ray's socket folder belongs to another user; remove it, or pass ray_tmpdir")
    path.chmod(0o700)
    return path


def start_ray_head(
    state_dir: str | Path, port: int | None = None, dashboard_port: int | None = None, num_cpus: int | None = None,
    home: str | Path | None = None, ray_tmpdir: str | Path | None = None, env: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> RayHead:
    """`env` reaches the jobs' drivers and workers (e.g. MLFLOW_TRACKING_URI, the S3 variables). `home` defaults
    to the caller's HOME."""
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    # every port picked at once, so no two are the same
    picked = iter(free_ports(len(INTERNAL_PORT_VARIABLES) + len(INTERNAL_PORT_FLAGS) + 2))
    port = next(picked) if port is None else service_port(port)
    dashboard_port = next(picked) if dashboard_port is None else service_port(dashboard_port)
    token_path = auth_token_file(state_dir)
    head_env = {
        **(env or {}),
        "RAY_TMPDIR": str(ray_tmpdir or private_dir(default_ray_tmpdir(state_dir))),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        **NO_TOKEN_VARIABLE,
        # jobs run `python ...` from PATH: it must be this venv's interpreter
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # nothing to drain locally; stop at once on SIGTERM
        **JOB_STOP_WAIT,
        **SINGLE_MACHINE,
        **{variable: str(next(picked)) for variable in INTERNAL_PORT_VARIABLES},
    }
    if home:
        head_env["HOME"] = str(home)
    cmd = [
        venv_bin("ray"), "start", "--head", "--block", "--port", str(port),
        # the node's address, so every port's: HOST, the address its clients dial (kept as given only in the
        # single-machine mode set above)
        "--node-ip-address", HOST, "--dashboard-host", HOST, "--dashboard-port", str(dashboard_port),
        "--disable-usage-stats",
        # none given: Ray's own count, which is a container's CPU quota (os.cpu_count() is the host's)
        *(["--num-cpus", str(num_cpus)] if num_cpus is not None else []),
    ]
    for flag in INTERNAL_PORT_FLAGS:
        cmd += [flag, str(next(picked))]
    head = RayHead(**spawn("ray", cmd, state_dir, head_env), gcs_port=port, dashboard_port=dashboard_port,
                   token_path=str(token_path))
    wait_until(head, lambda: http_ok(f"{head.dashboard_url}/api/version", head.auth_headers()),
               "GCS and dashboard answering", timeout, port)  # the GCS listening, and the dashboard answering
    return head


def stop_ray_head(head: RayHead) -> None:
    head.stop()
