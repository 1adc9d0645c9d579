"""`modrwkv services up|status|down` as the CLI runs it: three detached services recorded in services.json."""

import argparse
import json
import socket
import tempfile

import psutil
import pytest
from mlflow.tracking import MlflowClient

from infra.cli import add_services_parser
from infra.process import HOST


def services(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    add_services_parser(parser.add_subparsers())
    args = parser.parse_args(["services", *argv])
    args.func(args)


def bound(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


@pytest.mark.slow  # starts all three services again (MLflow alone takes 10-50 s on 2 busy cores)
def test_up_status_down(capsys):
    with tempfile.TemporaryDirectory(prefix="svc", ignore_cleanup_errors=True) as state_dir:
        services(["up", "--state-dir", state_dir, "--num-cpus", "1"])
        try:
            recorded = json.loads(open(f"{state_dir}/services.json").read())
            assert set(recorded) == {"s3", "mlflow", "ray"}
            # MLflow hands out proxied artifact URIs (the S3 endpoint beside it stores them)
            mlflow_uri = f"http://{HOST}:{recorded['mlflow']['port']}"
            assert MlflowClient(mlflow_uri).get_experiment_by_name("Default").artifact_location.startswith(
                "mlflow-artifacts:")
            capsys.readouterr()
            services(["status", "--state-dir", state_dir])
            status = capsys.readouterr().out
            assert status.count(" running ") == 3 and "NOT RUNNING" not in status
            assert f"export MLFLOW_TRACKING_URI={mlflow_uri}" in status
            assert "SECRET" not in status and open(recorded["ray"]["token_path"]).read() not in status
        finally:
            services(["down", "--state-dir", state_dir])
        assert "stopped: s3, mlflow, ray" in capsys.readouterr().out
        ports = [recorded["s3"]["port"], recorded["mlflow"]["port"], recorded["ray"]["gcs_port"],
                 recorded["ray"]["dashboard_port"]]
        assert not any(psutil.pid_exists(d["pid"]) for d in recorded.values())
        assert not any(bound(p) for p in ports)
        services(["status", "--state-dir", state_dir])
        assert "no services recorded" in capsys.readouterr().out
