"""A local S3 endpoint (moto's server) for the feature cache and MLflow artifacts when no real S3 is at hand."""

import dataclasses
from pathlib import Path

from .process import HOST, ServiceError, ServiceProcess, http_ok, service_port, spawn, venv_bin, wait_until

REGION = "us-east-1"
# moto accepts any credentials; these placeholders only make boto3 sign requests. A real endpoint takes its
# credentials from the environment instead of `s3_env`.
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "moto-local", "AWS_SECRET_ACCESS_KEY": "moto-local"}


def s3_env(endpoint_url: str) -> dict[str, str]:
    """What boto3, s3fs, pyarrow and MLflow clients need in their environment to use this endpoint."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "MLFLOW_S3_ENDPOINT_URL": endpoint_url,
        "AWS_DEFAULT_REGION": REGION,
        **LOCAL_CREDENTIALS,
    }


def s3_client(endpoint_url: str):
    import boto3  # heavy (botocore's service models); the CLI imports this module for `services` alone
    from botocore.config import Config

    env = s3_env(endpoint_url)
    return boto3.client(
        "s3", endpoint_url=endpoint_url, region_name=REGION,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=Config(proxies={}),  # the endpoint is on this machine: never through http_proxy
    )


@dataclasses.dataclass(kw_only=True)
class S3Server(ServiceProcess):
    port: int

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        return s3_env(self.endpoint_url)

    def create_bucket(self, name: str) -> None:
        s3_client(self.endpoint_url).create_bucket(Bucket=name)


def start_s3(state_dir: str | Path, port: int | None = None, timeout: float = 120.0) -> S3Server:
    port = service_port(port)
    if not Path(venv_bin("moto_server")).is_file():
        raise ServiceError("the local S3 endpoint needs moto's server: pip install 'modrwkv[demo]'")
    cmd = [venv_bin("moto_server"), "-H", HOST, "-p", str(port)]
    server = S3Server(**spawn("s3", cmd, Path(state_dir)), port=port)
    wait_until(server, lambda: http_ok(f"{server.endpoint_url}/moto-api/"), "answer on its port", timeout, port)
    return server


def stop_s3(server: S3Server) -> None:
    server.stop()
