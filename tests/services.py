"""Session-scoped fixtures that start the real local services once for the whole test run; any test module
can request `s3_server`, `mlflow_server` or `ray_head`. Registered in tests/conftest.py."""

import tempfile

import pytest

from infra.mlflow_server import start_mlflow
from infra.ray_head import start_ray_head
from infra.s3_server import start_s3

BUCKET = "modrwkv-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 endpoint with one bucket, `BUCKET`."""
    with start_s3(tmp_path_factory.mktemp("s3")) as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server):
    """MLflow with runs in SQLite and artifacts proxied to `s3://BUCKET/mlflow`."""
    with start_mlflow(tmp_path_factory.mktemp("mlflow"), artifacts_destination=f"s3://{BUCKET}/mlflow",
                      env=s3_server.env()) as server:
        yield server


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A 3-CPU Ray head (room for a 2-worker training job) whose HOME and RAY_TMPDIR are temp dirs; the
    latter under /tmp with a short name, since Ray's unix socket paths must fit in 107 characters."""
    with tempfile.TemporaryDirectory(prefix="ray", ignore_cleanup_errors=True) as ray_tmpdir:
        with start_ray_head(tmp_path_factory.mktemp("ray"), num_cpus=3, home=tmp_path_factory.mktemp("home"),
                            ray_tmpdir=ray_tmpdir) as head:
            yield head
