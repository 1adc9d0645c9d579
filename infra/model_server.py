"""A logged or registered ModRWKV served over HTTP on this machine: `mlflow models serve` in this environment
(`--env-manager local`: the project's packages, no download), answering POST /invocations (`pipelines/serving.py`
says what a request holds)."""

import dataclasses
import os
from pathlib import Path

from .process import HOST, ServiceProcess, http_ok, service_port, spawn, venv_bin, wait_until


@dataclasses.dataclass(kw_only=True)
class ModelServer(ServiceProcess):
    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def start_model_server(model_uri: str, state_dir: str | Path, port: int | None = None,
                       env: dict[str, str] | None = None, timeout: float = 180.0) -> ModelServer:
    """`model_uri`: models:/<id>, models:/NAME/VERSION or @alias, found through MLFLOW_TRACKING_URI (in `env` or
    this process's environment). Waits until /ping answers: the model and its encoders are loaded by then."""
    port = service_port(port)
    # mlflow starts `uvicorn` by name: this environment's, which an unactivated venv does not put on PATH
    path = {"PATH": f"{Path(venv_bin('uvicorn')).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [venv_bin("mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local", "--host", HOST,
           "--port", str(port), "--workers", "1"]
    server = ModelServer(**spawn("model-server", cmd, Path(state_dir).resolve(), {**path, **(env or {})}), port=port)
    wait_until(server, lambda: http_ok(f"{server.url}/ping"), "answer /ping", timeout, port)
    return server
