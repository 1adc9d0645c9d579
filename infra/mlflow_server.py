"""A local MLflow tracking server: runs in SQLite, artifacts in a directory or proxied to S3."""

import dataclasses
from pathlib import Path

from .process import HOST, ServiceProcess, http_ok, service_port, spawn, venv_bin, wait_until

TRACKING_DATABASE = "mlflow.db"  # in the state dir


@dataclasses.dataclass(kw_only=True)
class MlflowServer(ServiceProcess):
    port: int

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.tracking_uri}


def start_mlflow(
    state_dir: str | Path, port: int | None = None, artifacts_destination: str | None = None,
    env: dict[str, str] | None = None, timeout: float = 300.0,
) -> MlflowServer:
    """`artifacts_destination` is a directory or `s3://bucket/prefix` (then `env` carries the S3 endpoint and
    credentials, e.g. `S3Server.env()`); clients upload through the server, so they need no S3 access."""
    state_dir = Path(state_dir).resolve()
    port = service_port(port)
    cmd = [
        venv_bin("mlflow"), "server", "--host", HOST, "--port", str(port),
        "--backend-store-uri", f"sqlite:///{state_dir / TRACKING_DATABASE}",
        "--artifacts-destination", artifacts_destination or str(state_dir / "mlflow-artifacts"),
        "--workers", "1",
    ]
    # no job runner: its seven worker processes serve GenAI jobs (scorers, prompt optimisation) that training runs
    # never start, and they slow both start and stop
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    server = MlflowServer(**spawn("mlflow", cmd, state_dir, env), port=port)
    # /health answers after 7-13 s on 2 cores (the server imports all of MLflow first)
    wait_until(server, lambda: http_ok(f"{server.tracking_uri}/health"), "answer /health", timeout, port)
    return server


def stop_mlflow(server: MlflowServer) -> None:
    server.stop()
