"""`modrwkv services up|status|down` as the CLI runs it: three detached services recorded in services.json."""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

import infra.cli as cli
from infra.cli import add_services_parser, load_services, services_down, services_up
from infra.mlflow_server import MlflowServer
from infra.process import HOST, ServiceError, spawn
from infra.ray_head import RayHead
from infra.s3_server import S3Server

REPO = Path(__file__).resolve().parents[2]
SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]
# `modrwkv services up` with stand-ins: an S3 endpoint up at once, then an MLflow server that never answers
UP_WITH_STAND_INS = textwrap.dedent(f"""
    import sys
    import infra.cli as cli
    from infra.mlflow_server import MlflowServer
    from infra.process import spawn, wait_until
    from infra.s3_server import S3Server
    from pipelines.cli import main

    def start_s3(state_dir, **kwargs):
        return S3Server(**spawn("s3", {SLEEP!r}, state_dir), port=1)

    def start_mlflow(state_dir, **kwargs):
        server = MlflowServer(**spawn("mlflow", {SLEEP!r}, state_dir), port=2)
        wait_until(server, lambda: False, "answer /health", timeout=90, port=2)

    cli.start_s3, cli.start_mlflow, S3Server.create_bucket = start_s3, start_mlflow, lambda self, name: None
    sys.exit(main(["services", "up", "--state-dir", sys.argv[1]]))
""")


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
            # no key but the placeholders, and only where the shell has none
            assert [line for line in status.splitlines() if "SECRET" in line] == [
                'export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-moto-local}" '
                'AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-moto-local}"']
            assert open(recorded["ray"]["token_path"]).read() not in status
        finally:
            services(["down", "--state-dir", state_dir])
        assert "stopped: s3, mlflow, ray" in capsys.readouterr().out
        ports = [recorded["s3"]["port"], recorded["mlflow"]["port"], recorded["ray"]["gcs_port"],
                 recorded["ray"]["dashboard_port"]]
        assert not any(psutil.pid_exists(d["pid"]) for d in recorded.values())
        assert not any(bound(p) for p in ports)
        services(["status", "--state-dir", state_dir])
        assert "no services recorded" in capsys.readouterr().out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_during_up_stops_what_it_started(tmp_path, signum):
    """Ctrl-C, `kill` or a closed terminal while a service comes up: the one coming up and those already up are
    stopped; nothing is left running with no record for `down` to stop it by."""
    # each signal at its default, as in a terminal: a parent that ignores one passes that on (a background job's
    # shell ignores SIGINT, `nohup` SIGHUP), and an ignored signal is left ignored
    up = subprocess.Popen([sys.executable, "-c", UP_WITH_STAND_INS, str(tmp_path)], cwd=REPO, text=True,
                          stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    started = []
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "mlflow.pid").exists() and up.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        started = [psutil.Process(int(path.read_text())) for path in sorted(tmp_path.glob("*.pid"))]
        assert len(started) == 2, up.stderr.read() if up.poll() is not None else "no mlflow.pid in 60 s"
        time.sleep(0.5)  # polling for /health now
        up.send_signal(signum)
        up.wait(timeout=60)
        assert up.returncode != 0, up.stderr.read()
        assert not any(p.is_running() for p in started)
        assert not list(tmp_path.glob("*.pid")) and not (tmp_path / "services.json").exists()
    finally:
        up.kill()
        for p in started:
            if p.is_running():
                p.kill()


def test_two_ups_at_once_start_one_set(tmp_path, monkeypatch):
    """Two `up` on one state dir at once (two terminals, or `up` beside `make demo`): the second waits for the first,
    then finds its services running. Both used to start a set, and the second record hid the first set for good."""
    spawned, first_inside, second_inside, go_on = [], threading.Event(), threading.Event(), threading.Event()

    def stand_in(cls, name, **fields):  # sleepers, the first `up`'s S3 endpoint held back until the test lets it go
        def start(state_dir, **kwargs):
            spawned.append(cls(**spawn(name, SLEEP, state_dir), **fields))
            if name == "s3":
                (second_inside if first_inside.is_set() else first_inside).set()
                go_on.wait(timeout=30)
            return spawned[-1]
        return start

    monkeypatch.setattr(cli, "start_s3", stand_in(S3Server, "s3", port=1))
    monkeypatch.setattr(cli, "start_mlflow", stand_in(MlflowServer, "mlflow", port=2))
    monkeypatch.setattr(cli, "start_ray_head", stand_in(RayHead, "ray", gcs_port=3, dashboard_port=4, token_path="t"))
    monkeypatch.setattr(S3Server, "create_bucket", lambda self, name: None)
    results = [None, None]

    def up(i: int) -> None:
        try:
            results[i] = services_up(tmp_path, 1)
        except ServiceError as e:
            results[i] = e

    ups = [threading.Thread(target=up, args=(i,)) for i in range(2)]
    try:
        ups[0].start()
        assert first_inside.wait(timeout=30)
        ups[1].start()
        second_got_in = second_inside.wait(timeout=0.5)  # unlocked, it is past the check in milliseconds
        go_on.set()
        for thread in ups:
            thread.join(timeout=60)
        assert not second_got_in
        assert {name: s.pid for name, s in results[0].items()} == {n: s.pid for n, s in load_services(tmp_path).items()}
        assert isinstance(results[1], ServiceError) and "already running: s3, mlflow, ray" in str(results[1])
        assert len(spawned) == 3
    finally:
        go_on.set()
        services_down(tmp_path)
        for service in spawned:
            service.stop()


def test_a_failed_write_keeps_the_record(tmp_path):
    """The record is replaced whole or not at all: a write cut short (a full disk; here a file size limit) leaves the
    previous record, and `down` can still stop its services, instead of half a record nothing can read."""
    s3 = S3Server(**spawn("s3", SLEEP, tmp_path), port=1)
    try:
        cli.write_services(tmp_path, {"s3": s3})
        recorded = (tmp_path / "services.json").read_text()
        longer = {**s3.to_dict(), "log_path": "x" * 4096}
        write = textwrap.dedent(f"""
            import resource
            from pathlib import Path
            from infra.cli import write_services
            from infra.s3_server import S3Server
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))  # Python ignores SIGXFSZ: writes fail with EFBIG
            write_services(Path({str(tmp_path)!r}), {{"s3": S3Server(**{longer!r})}})
        """)
        out = subprocess.run([sys.executable, "-c", write], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "File too large" in out.stderr, out.stderr
        assert (tmp_path / "services.json").read_text() == recorded
        assert sorted(p.name for p in tmp_path.iterdir()) == ["s3.log", "s3.pid", "services.json"]
        assert services_down(tmp_path) == (["s3"], [])
    finally:
        s3.stop()


def test_down_stops_its_own_services_and_leaves_a_reused_pid_alone(tmp_path, capsys):
    """A recorded pid whose process started at another time is someone else's now: `down` says so and spares it."""
    sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
    s3 = S3Server(**spawn("s3", sleep, tmp_path), port=1)
    started = spawn("mlflow", sleep, tmp_path)
    other = psutil.Process(started["pid"])
    try:  # both sleepers stopped whatever fails: `down` may not reach them
        reused = MlflowServer(**{**started, "started_after_boot": started["started_after_boot"] - 10}, port=2)
        (tmp_path / "services.json").write_text(json.dumps({"s3": s3.to_dict(), "mlflow": reused.to_dict()}))
        capsys.readouterr()
        services(["down", "--state-dir", str(tmp_path)])
        out = capsys.readouterr().out
        assert "stopped: s3\n" in out and f"not running, left alone: mlflow (pid {other.pid} gone" in out
        assert not psutil.pid_exists(s3.pid) and other.is_running()
        assert not (tmp_path / "services.json").exists()
    finally:
        other.kill()
        if psutil.pid_exists(s3.pid):
            psutil.Process(s3.pid).kill()


def test_a_record_from_another_version_is_refused_by_name(tmp_path):
    record = {"name": "s3", "pid": 1, "create_time": 1.0, "log_path": "s3.log", "pid_file": "s3.pid", "port": 1}
    (tmp_path / "services.json").write_text(json.dumps({"s3": record}))
    with pytest.raises(ServiceError, match=f"{tmp_path / 'services.json'}: the record of s3 lacks started_after_boot"):
        services(["down", "--state-dir", str(tmp_path)])


@pytest.mark.parametrize("record", ['{"s3": {"name": "s3", "pid"', '{"minio": {}}', '["s3"]', '{"s3": 1}'],
                         ids=["cut-short", "unknown-service", "a-list", "not-a-mapping"])
def test_an_unreadable_record_is_named(tmp_path, record):
    (tmp_path / "services.json").write_text(record)
    with pytest.raises(ServiceError, match=f"{tmp_path / 'services.json'}: not a record of these services"):
        load_services(tmp_path)


def test_status_exports_are_quoted_and_only_for_running_services(tmp_path, capsys, monkeypatch):
    state_dir = tmp_path / "my runs" / "services"
    s3 = S3Server(**spawn("s3", SLEEP, state_dir), port=1)
    ray = RayHead(**spawn("ray", SLEEP, state_dir), gcs_port=3, dashboard_port=4,
                  token_path=str(state_dir / "ray-auth-token"))
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    try:
        cli.write_services(state_dir, {"s3": s3, "ray": ray})
        s3.stop()
        services(["status", "--state-dir", str(state_dir)])
        exports = [line for line in capsys.readouterr().out.splitlines() if line.startswith("export ")]
        assert not any("AWS_ENDPOINT_URL" in line for line in exports)  # its port may be another's by now
        shell = "\n".join([*exports, 'echo "$RAY_AUTH_TOKEN_PATH|$no_proxy"'])
        out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == f"{state_dir / 'ray-auth-token'}|{HOST},localhost", out.stderr
    finally:
        ray.stop()


def test_status_exports_placeholder_s3_keys_only_where_the_shell_has_none(tmp_path, capsys):
    """moto takes any keys, but boto3 signs with some: a shell with none could not reach the endpoint; a shell
    with real ones keeps them."""
    state_dir = tmp_path / "services"
    s3 = S3Server(**spawn("s3", SLEEP, state_dir), port=1)
    try:
        cli.write_services(state_dir, {"s3": s3})
        services(["status", "--state-dir", str(state_dir)])
        exports = [line for line in capsys.readouterr().out.splitlines() if line.startswith("export ")]
        shell = "\n".join([*exports, 'echo "$AWS_ENDPOINT_URL|$AWS_ACCESS_KEY_ID|$AWS_SECRET_ACCESS_KEY"'])
        clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        for keys, expected in (({}, "moto-local|moto-local"), ({"AWS_ACCESS_KEY_ID": "mine", "AWS_SECRET_ACCESS_KEY":
                                                                  "my secret"}, "mine|my secret")):
            out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=30,
                                 env={**clean, **keys})
            assert out.stdout.strip() == f"http://{HOST}:1|{expected}", out.stderr
    finally:
        s3.stop()


def test_services_up_starts_mlflow_on_a_new_database_keeping_the_last(tmp_path):
    """moto keeps objects in memory: after `down`, the database's runs point at artifacts that are gone, so the next
    `up` sets it aside (their params and metrics kept) instead of serving them."""
    assert cli.set_aside_tracking_database(tmp_path) is None
    for run in ("first", "second"):
        (tmp_path / "mlflow.db").write_text(run)
        os.utime(tmp_path / "mlflow.db", (1_700_000_000, 1_700_000_000))  # both stopped in the same second
        kept = cli.set_aside_tracking_database(tmp_path)
        assert kept.read_text() == run and kept.name.startswith("mlflow-until-") and kept.suffix == ".db"
        assert not (tmp_path / "mlflow.db").exists()
    assert len(list(tmp_path.glob("mlflow-until-*.db"))) == 2
    (tmp_path / "mlflow.db").write_text("third")
    (tmp_path / "mlflow.db-journal").write_text("a killed server's half-written transaction")
    kept = cli.set_aside_tracking_database(tmp_path)
    assert kept.with_name(kept.name + "-journal").is_file() and not (tmp_path / "mlflow.db-journal").exists()


def test_services_up_sets_the_database_aside_before_mlflow_starts(tmp_path, monkeypatch):
    (tmp_path / "mlflow.db").write_text("the last up's")
    seen = []

    def start_s3(state_dir):
        seen.append((state_dir / "mlflow.db").exists())
        raise ServiceError("no S3 today")

    monkeypatch.setattr(cli, "start_s3", start_s3)
    with pytest.raises(ServiceError, match="no S3 today"):
        services_up(tmp_path)
    assert seen == [False] and [p.read_text() for p in tmp_path.glob("mlflow-until-*.db")] == ["the last up's"]


def test_a_negative_cpu_count_is_refused(capsys):
    with pytest.raises(SystemExit):
        services(["up", "--num-cpus", "-1"])
    assert "--num-cpus: must be 0 or more, not -1" in capsys.readouterr().err
