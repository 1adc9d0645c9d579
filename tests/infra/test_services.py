"""The real local services: each starts, answers, is usable by its clients, and stops (pid gone, port free).
They are shared per session (tests/services.py); the stop checks run on instances of their own."""

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from infra.jobs import run_job, submit_job
from infra.process import HOST, ServiceError, ServiceProcess, free_ports, http_ok, spawn, wait_until
from infra.s3_server import s3_client, start_s3
from tests.services import BUCKET

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent.resolve()  # the venv may be reached through a symlink


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def test_s3_put_get(s3_server):
    s3 = s3_client(s3_server.endpoint_url)
    s3.put_object(Bucket=BUCKET, Key="cache/shard-0.tar", Body=b"features")
    assert s3.get_object(Bucket=BUCKET, Key="cache/shard-0.tar")["Body"].read() == b"features"


def test_the_s3_client_reaches_the_local_endpoint_past_a_proxy(s3_server, monkeypatch):
    """`services up` creates its bucket in-process: boto3 sent that through http_proxy, which cannot reach it."""
    monkeypatch.setenv("http_proxy", f"http://{HOST}:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert BUCKET in [b["Name"] for b in s3_client(s3_server.endpoint_url).list_buckets()["Buckets"]]


def test_s3_stops_by_pid(tmp_path):
    server = start_s3(tmp_path)
    assert Path(server.pid_file).read_text().strip() == str(server.pid)
    server.stop()
    assert not psutil.pid_exists(server.pid)
    assert port_free(server.port)
    assert not Path(server.pid_file).exists()


@pytest.mark.skipif(sys.platform != "linux", reason="steps the boot time psutil reads from Linux's /proc/stat")
def test_a_service_is_still_found_after_the_clock_steps(tmp_path, monkeypatch):
    service = ServiceProcess(**spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"], tmp_path))
    wall_clock_start = psutil.Process(service.pid).create_time()
    booted = psutil.boot_time()
    # the kernel keeps the boot time as wall clock minus uptime, so stepping the clock 5 minutes moves it as much
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: booted + 300)
    assert psutil.Process(service.pid).create_time() == pytest.approx(wall_clock_start + 300)
    assert service.alive()
    assert service.stop()
    assert not psutil.pid_exists(service.pid)
    assert not service.stop()  # already stopped: nothing to stop


def test_a_port_in_use_is_refused_before_the_start(tmp_path):
    """Something already listening on the port asked for would answer the health check in the service's place."""
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        with pytest.raises(ServiceError, match=f"port {taken.getsockname()[1]} on {HOST} is in use"):
            start_s3(tmp_path, port=taken.getsockname()[1], timeout=20)
    assert not list(tmp_path.iterdir())  # nothing spawned


def test_failed_start_names_the_log(tmp_path):
    service = ServiceProcess(**spawn("s3", [sys.executable, "-c", "print('no such bucket'); exit(3)"], tmp_path))
    with pytest.raises(ServiceError, match=f"(?s)log: {tmp_path / 's3.log'}.*no such bucket"):
        wait_until(service, lambda: False, "answer", timeout=20, port=1)


def test_an_answer_from_another_process_is_not_a_start(tmp_path):
    """Whatever took the port answers the health check: while the service starts (it has not bound the port yet),
    and after it exited."""
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        starting = ServiceProcess(**spawn("s3", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path))
        with pytest.raises(ServiceError, match="s3 did not get to answering within 2 s"):
            wait_until(starting, lambda: True, "answering", timeout=2, port=port)
        exited = ServiceProcess(**spawn("s3", [sys.executable, "-c", "exit(3)"], tmp_path))
        psutil.Process(exited.pid).wait(timeout=30)
        with pytest.raises(ServiceError, match="s3 exited before answering"):
            wait_until(exited, lambda: True, "answering", timeout=20, port=port)


def test_a_start_is_its_own_service_answering_on_its_port(tmp_path):
    """A child of the service listening counts (MLflow's and Ray's servers are)."""
    (port,) = free_ports(1)
    listener = f"import subprocess, sys; subprocess.run([sys.executable, '-m', 'http.server', " \
               f"'--bind', '{HOST}', '{port}'])"
    service = ServiceProcess(**spawn("http", [sys.executable, "-c", listener], tmp_path))
    try:
        wait_until(service, lambda: http_ok(f"http://{HOST}:{port}/"), "answer", timeout=30, port=port)
        assert service.listens_on(port) and not service.listens_on(port + 1)
    finally:
        service.stop()


def test_a_port_answering_in_another_protocol_is_not_healthy():
    """An SSH banner made the health check raise http.client's BadStatusLine instead of answering False."""
    with socket.socket() as server:
        server.bind((HOST, 0))
        server.listen()
        answer = threading.Thread(target=lambda: server.accept()[0].sendall(b"SSH-2.0-OpenSSH_9.6\r\n"))
        answer.start()
        assert not http_ok(f"http://{HOST}:{server.getsockname()[1]}/health")
        answer.join(timeout=10)


def test_an_interrupted_start_stops_the_service(tmp_path):
    """Ctrl-C while a service comes up: nobody holds it yet and it runs in a session of its own, so the wait
    stops it, or it would run on unrecorded."""
    service = ServiceProcess(**spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"], tmp_path))
    polls = []

    def ctrl_c_on_the_second_poll() -> bool:
        polls.append(None)
        if len(polls) == 2:
            raise KeyboardInterrupt
        return False

    try:
        with pytest.raises(KeyboardInterrupt):
            wait_until(service, ctrl_c_on_the_second_poll, "answer", timeout=60, port=1)
        assert not psutil.pid_exists(service.pid)
        assert not Path(service.pid_file).exists()
    finally:
        service.stop()


def test_a_start_interrupted_before_the_wait_stops_the_service(tmp_path, monkeypatch):
    """Ctrl-C right after the process started, while spawn records it: nothing holds it yet either."""
    import infra.process

    started, real_popen = [], subprocess.Popen

    def recording_popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    def ctrl_c(process):
        raise KeyboardInterrupt

    monkeypatch.setattr(infra.process.subprocess, "Popen", recording_popen)
    monkeypatch.setattr(infra.process, "seconds_after_boot", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"], tmp_path)
    (process,) = started
    assert process.poll() is not None and not (tmp_path / "sleeper.pid").exists()


def test_mlflow_metric_through_client_and_rest(mlflow_server):
    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    experiment = client.create_experiment("infra-metric")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "loss", 1.25, step=3)
    url = (f"{mlflow_server.tracking_uri}/api/2.0/mlflow/metrics/get-history"
           f"?run_id={run.info.run_id}&metric_key=loss")
    with urllib.request.urlopen(url) as r:
        history = json.load(r)["metrics"]
    assert [(m["value"], m["step"]) for m in history] == [(1.25, 3)]


def test_mlflow_artifacts_land_in_s3(mlflow_server, s3_server):
    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    run = client.create_run(client.create_experiment("infra-artifacts"))
    client.log_text(run.info.run_id, "hello", "notes/hello.txt")
    keys = [o["Key"] for o in s3_client(s3_server.endpoint_url).list_objects_v2(Bucket=BUCKET, Prefix="mlflow/")["Contents"]]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/notes/hello.txt") for k in keys), keys


def test_ray_task_from_a_client_process(ray_head):
    script = textwrap.dedent(f"""
        import ray, sys
        ray.init(address="{ray_head.address}")
        print(ray.get(ray.remote(lambda: sys.executable).remote()))
    """)
    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, **ray_head.client_env()},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # workers run the venv's `python3`, the job's `python` may be either name: compare the venv's bin dir
    assert Path(out.stdout.strip().splitlines()[-1]).parent.resolve() == VENV_BIN


def listening_addresses(head: psutil.Process) -> list:
    listening = []
    for process in [head, *head.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker may exit meanwhile
            listening += [c.laddr for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    return listening


def test_ray_listens_on_loopback_only(ray_head):
    """Ray's own choice would put the GCS, raylet and agents on all interfaces, the client server on the machine's
    address: reachable from other machines, token auth their only guard."""
    listening = listening_addresses(psutil.Process(ray_head.pid))
    assert ray_head.gcs_port in [address.port for address in listening]
    assert {address.ip for address in listening} <= {HOST, f"::ffff:{HOST}"}, listening


def test_a_jobs_own_ray_instance_listens_on_loopback_only(ray_local):
    """The instance a job starts without a cluster (`infra.local_ray.init_ray`; the tests' `ray_local` too) is in
    the head's single-machine mode: a plain ray.init() put the GCS and raylet on every interface (`::`) and the
    dashboard agent on 0.0.0.0, with no token asked."""
    gcs_port = int(ray_local.get_runtime_context().gcs_address.rsplit(":", 1)[1])
    listening = listening_addresses(psutil.Process())  # this process's services (tests' own) are on HOST too
    assert gcs_port in [address.port for address in listening]
    assert {address.ip for address in listening} <= {HOST, f"::ffff:{HOST}"}, listening
    from ray._private import ray_constants  # and the mode was this instance's alone: a later join is a cluster's

    assert ray_constants.ENABLE_RAY_CLUSTER and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ


def test_a_jobs_sigterm_handler_outlives_ray_init(ray_local):
    """`ray.init` puts its own SIGTERM handler (sys.exit(15)) in place on every call: `modrwkv train` under `kill`
    or `ray job stop` exited 15 and ended its MLflow run FAILED, its `signals_unwind` handler gone once Ray had
    started."""
    from infra.local_ray import init_ray
    from infra.signals import signals_unwind

    with signals_unwind():
        handler = signal.getsignal(signal.SIGTERM)
        init_ray(ignore_reinit_error=True)  # the jobs' call, Ray being up already
        assert signal.getsignal(signal.SIGTERM) is handler


def test_a_token_exported_for_another_cluster_is_neither_the_heads_nor_its_clients(tmp_path, monkeypatch):
    """Ray reads RAY_AUTH_TOKEN before RAY_AUTH_TOKEN_PATH: a user's token for another cluster, left in the shell,
    made the head take it while its health check sent the file's (refused: the start failed after its timeout)."""
    from infra.ray_head import start_ray_head

    monkeypatch.setenv("RAY_AUTH_TOKEN", "f" * 64)
    head = start_ray_head(tmp_path / "state", num_cpus=0)
    try:
        assert http_ok(f"{head.dashboard_url}/api/version", head.auth_headers())
        script = f"import ray; ray.init(address='{head.address}'); print('joined')"
        out = subprocess.run([sys.executable, "-c", script], env={**os.environ, **head.client_env()},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "joined" in out.stdout, out.stderr[-2000:]
    finally:
        head.stop()


def test_ray_takes_no_fixed_port(ray_head):
    """A second head on the machine (another user's, or a test's) would find Ray's fixed defaults taken."""
    from ray.autoscaler._private.constants import AUTOSCALER_METRIC_PORT
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    from infra.ray_head import INTERNAL_PORT_VARIABLES

    head = psutil.Process(ray_head.pid)
    dashboard_metrics = int(head.environ()["DASHBOARD_METRIC_PORT"])
    deadline = time.monotonic() + 30  # the dashboard opens its metrics endpoint a moment after it answers
    while dashboard_metrics not in {a.port for a in listening_addresses(head)} and time.monotonic() < deadline:
        time.sleep(0.5)
    ports = {address.port for address in listening_addresses(head)}
    assert dashboard_metrics in ports
    # a port the head was given may be a default by chance (picked free in the range the defaults sit in)
    command = head.cmdline()
    given = {int(command[i + 1]) for i, arg in enumerate(command[:-1]) if arg.endswith("-port")}
    given |= {int(head.environ()[variable]) for variable in INTERNAL_PORT_VARIABLES}
    defaults = {10001, 52365, DASHBOARD_METRIC_PORT, AUTOSCALER_METRIC_PORT}
    assert not (ports - given) & defaults, sorted(ports)


def test_job_runs_with_the_venv_python(ray_head):
    result = run_job(ray_head.dashboard_url, 'python -c "import modrwkv, sys; print(sys.executable)"',
                     working_dir=REPO, headers=ray_head.auth_headers(), timeout=180)
    assert result.status == "SUCCEEDED", result.logs
    assert Path(result.logs.strip().splitlines()[-1]).parent.resolve() == VENV_BIN


def test_a_stopped_job_has_time_to_end_its_runs(ray_head, tmp_path):
    """`ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S, Ray's 3 s by default: a training
    aborts its Ray run and ends its MLflow run KILLED on the way out (`signals_unwind`), 5.5-6 s on 2 cores. A job
    that takes 5 s to unwind is let finish."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    unwound = tmp_path / "unwound"
    script = textwrap.dedent(f"""
        import time
        from infra.signals import signals_unwind
        with signals_unwind():
            try:
                print("started", flush=True)
                time.sleep(120)
            finally:
                time.sleep(5)
                open({str(unwound)!r}, "w").close()
        """)
    job_id = submit_job(ray_head.dashboard_url, f"python -c {shlex.quote(script)}", working_dir=REPO,
                        headers=ray_head.auth_headers())
    client = JobSubmissionClient(ray_head.dashboard_url, headers=ray_head.auth_headers())
    try:
        deadline = time.monotonic() + 180
        while "started" not in client.get_job_logs(job_id) and time.monotonic() < deadline:
            assert not client.get_job_status(job_id).is_terminal(), client.get_job_logs(job_id)
            time.sleep(0.5)
        client.stop_job(job_id)
        deadline = time.monotonic() + 60
        while not client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        client.stop_job(job_id)
    assert client.get_job_status(job_id) == JobStatus.STOPPED and unwound.exists(), client.get_job_logs(job_id)


@pytest.mark.slow
def test_ray_job_submit_cli(ray_head):
    """The documented command line: `ray job submit` with the head's client env."""
    out = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.dashboard_url,
         "--working-dir", str(REPO), "--", "python", "-c", "import modrwkv; print('job-ok')"],
        env={**os.environ, **ray_head.client_env()}, capture_output=True, text=True, timeout=180,
    )
    output = out.stdout + out.stderr
    assert out.returncode == 0, output
    assert "job-ok" in output and "succeeded" in output
