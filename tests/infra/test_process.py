"""The process plumbing under every service: ports, proxies, stopping a tree whose processes end on their own."""

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import infra.ray_head as ray_head
from infra.process import HOST, ServiceError, ServiceProcess, free_ports, spawn, without_proxy_for_loopback
from infra.ray_head import private_dir

REPO = Path(__file__).resolve().parents[2]


def test_free_ports_are_distinct():
    ports = free_ports(64)
    assert len(set(ports)) == 64


def test_health_checks_do_not_go_through_a_proxy():
    """A host with http_proxy set and no no_proxy (clusters often have one) sent even 127.0.0.1 through the proxy,
    which cannot reach it: every service looked dead."""
    check = textwrap.dedent("""
        import http.server, threading
        from infra.process import HOST, http_ok
        server = http.server.HTTPServer((HOST, 0), http.server.SimpleHTTPRequestHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        print(http_ok(f"http://{HOST}:{server.server_port}/"))
    """)
    env = {**os.environ, "http_proxy": f"http://{HOST}:9", "HTTP_PROXY": f"http://{HOST}:9"}
    env.pop("no_proxy", None), env.pop("NO_PROXY", None)
    out = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr


def test_services_reach_each_other_past_a_proxy(tmp_path, monkeypatch):
    monkeypatch.setenv("http_proxy", f"http://{HOST}:9")
    monkeypatch.setenv("no_proxy", "internal.example")
    monkeypatch.delenv("NO_PROXY", raising=False)
    service = ServiceProcess(**spawn("echo", [sys.executable, "-c", "import os; print(os.environ['no_proxy'], "
                                              "os.environ['NO_PROXY'])"], tmp_path))
    psutil.wait_procs([psutil.Process(service.pid)], timeout=30)
    assert service.log_tail().split() == [f"internal.example,{HOST},localhost"] * 2


def test_stop_survives_processes_ending_on_their_own(tmp_path, monkeypatch):
    """`down` while Ray's workers exit: one gone between being listed and being asked must not stop the rest."""
    parent = ("import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)")
    service = ServiceProcess(**spawn("tree", [sys.executable, "-c", parent], tmp_path))
    root = psutil.Process(service.pid)
    children = []
    try:  # from the spawn on: a failure leaves neither process running its two minutes
        deadline = time.monotonic() + 30
        while not root.children() and time.monotonic() < deadline:
            time.sleep(0.05)
        children = root.children()
        assert children, "the parent started no child"
        real_status = psutil.Process.status

        def gone_when_asked(process):
            if process.pid != service.pid:
                raise psutil.NoSuchProcess(process.pid)
            return real_status(process)

        monkeypatch.setattr(psutil.Process, "status", gone_when_asked)
        assert service.stop(timeout=5)
        assert not root.is_running()
    finally:
        monkeypatch.undo()
        for process in [root, *children]:
            if process.is_running():
                process.kill()


def test_rays_socket_folder_is_private(tmp_path, monkeypatch):
    folder = private_dir(tmp_path / "ray-1234")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o775)  # ours from before, made by Ray under a umask of 002
    assert private_dir(folder) == folder and stat.S_IMODE(folder.stat().st_mode) == 0o700
    monkeypatch.setattr(ray_head.os, "getuid", lambda: folder.stat().st_uid + 1)  # made by another user first
    with pytest.raises(ServiceError, match="ray-1234: Ray's socket folder belongs to another user"):
        private_dir(folder)


def test_a_link_planted_as_rays_socket_folder_is_refused(tmp_path):
    """Its name is predictable: a link another user plants there passed the owner check with our folder as its
    target, and stayed theirs to point elsewhere later."""
    (tmp_path / "ours").mkdir(mode=0o755)
    (tmp_path / "ray-1234").symlink_to(tmp_path / "ours")
    with pytest.raises(ServiceError, match="ray-1234: Ray's socket folder is not a folder"):
        private_dir(tmp_path / "ray-1234")
    assert stat.S_IMODE((tmp_path / "ours").stat().st_mode) == 0o755  # the target left as it was


def test_the_ray_token_is_owner_only_and_made_again_when_empty_or_readable_by_others(tmp_path):
    path = ray_head.auth_token_file(tmp_path)
    token = path.read_text()
    assert len(token) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ray_head.auth_token_file(tmp_path).read_text() == token  # reused on a restart
    path.chmod(0o644)
    assert ray_head.auth_token_file(tmp_path).read_text() not in ("", token)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("")  # a start cut short between creating the file and writing it
    assert len(ray_head.auth_token_file(tmp_path).read_text()) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ray-auth-token"]  # no temporary file left


def test_the_loopback_exception_joins_both_spellings_once():
    env = {"no_proxy": "a.example,127.0.0.1", "NO_PROXY": "b.example,a.example"}
    once = without_proxy_for_loopback(env)
    assert once["no_proxy"] == once["NO_PROXY"] == f"a.example,{HOST},b.example,localhost"
    assert without_proxy_for_loopback(once) == once  # exported, then read again: no longer each time


def test_a_head_of_zero_cpus_offers_zero_and_one_given_none_as_many_as_ray_counts(tmp_path, monkeypatch):
    commands = []

    def spawn_nothing(name, cmd, state_dir, env):
        commands.append(cmd)
        raise RuntimeError("not started")

    monkeypatch.setattr(ray_head, "spawn", spawn_nothing)
    with pytest.raises(RuntimeError, match="not started"):
        ray_head.start_ray_head(tmp_path, num_cpus=0, ray_tmpdir=tmp_path)
    with pytest.raises(RuntimeError, match="not started"):
        ray_head.start_ray_head(tmp_path, ray_tmpdir=tmp_path)
    cmd, counted = commands
    assert cmd[cmd.index("--num-cpus") + 1] == "0"
    assert "--num-cpus" not in counted  # Ray's count: a container's quota, where os.cpu_count() is the host's
    ports = [int(cmd[cmd.index(flag) + 1]) for flag in ("--port", "--dashboard-port", *ray_head.INTERNAL_PORT_FLAGS)]
    assert len(set(ports)) == len(ports)
