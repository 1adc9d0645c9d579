"""Run a local service as a detached process: spawn it in its own session, wait until it answers, stop it by pid.

The services (S3 endpoint, MLflow server, Ray head) each describe themselves as a `ServiceProcess` subclass; the
pid and its start time are enough to stop one later from another process (`modrwkv services down`).
"""

import contextlib
import dataclasses
import http.client
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from collections.abc import Mapping
from typing import Callable, Self

import psutil

HOST = "127.0.0.1"


class ServiceError(RuntimeError):
    """A service did not come up (the message names its log file) or could not be stopped."""


def venv_bin(name: str) -> str:
    """A console script of the running interpreter's environment, so services run the venv's packages."""
    return str(Path(sys.executable).parent / name)


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free right now on 127.0.0.1: all bound before any is let go, as one bound and let go at a
    time can come back twice. Another process may take one before the service binds it; the service then exits
    and `wait_until` reports that with its log."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    return free_ports(1)[0]


def service_port(port: int | None) -> int:
    """`port`, refused when something already answers on it (whose health check would pass for the service's), or
    a free one when None."""
    if port is None:
        return free_port()
    if port_open(port):
        raise ServiceError(f"port {port} on {HOST} is in use: stop what listens there or leave the port unset")
    return port


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def without_proxy_for_loopback(env: Mapping[str, str]) -> dict[str, str]:
    """no_proxy and NO_PROXY with 127.0.0.1 and localhost added to what `env` holds: on a host with http_proxy set
    (clusters often do), HTTP clients send even loopback requests through the proxy, which cannot reach them."""
    given = f"{env.get('no_proxy', '')},{env.get('NO_PROXY', '')},{HOST},localhost".split(",")
    hosts = ",".join(dict.fromkeys(h.strip() for h in given if h.strip()))  # both spellings' hosts, each once
    return {"no_proxy": hosts, "NO_PROXY": hosts}


DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the services are on this machine


def http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        with DIRECT.open(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError):
        return False  # HTTPException: something that is not an HTTP server on the port (an SSH banner)


def seconds_after_boot(process: psutil.Process) -> float:
    """When the process started, in seconds since boot. psutil derives its wall-clock start time from the kernel's
    count since boot plus the boot time, so subtracting the boot time read now gives that count back."""
    return process.create_time() - psutil.boot_time()


@dataclasses.dataclass(kw_only=True)
class ServiceProcess:
    """A spawned service. Usable as a context manager: leaving the block stops it."""

    name: str
    pid: int
    # with the pid, identifies the process even after the pid could have been reused; counted from boot, as the kernel
    # counts it, because a wall-clock start time moves when the clock is stepped and the live service looks gone
    started_after_boot: float
    log_path: str
    pid_file: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Self:
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in d]
        if missing:
            raise ServiceError(f"the record of {d.get('name', 'a service')} lacks {', '.join(missing)}: another "
                               "version wrote it; stop the pid it names by hand and delete the record")
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    def process(self) -> psutil.Process | None:
        """The running process, or None when it is gone (or its pid now belongs to another process)."""
        try:
            p = psutil.Process(self.pid)
            if abs(seconds_after_boot(p) - self.started_after_boot) < 0.05 and p.status() != psutil.STATUS_ZOMBIE:
                return p
        except psutil.NoSuchProcess:
            pass
        return None

    def alive(self) -> bool:
        return self.process() is not None

    def listens_on(self, port: int) -> bool:
        """Whether the service (or a process it started) listens on `port`: what answers there is this service,
        not another process that took the port between `free_ports` letting it go and the service binding it."""
        proc = self.process()
        if proc is None:
            return False
        listening = set()
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                listening |= {c.laddr.port for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        return port in listening

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log written)"

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM to the service (each one tears its own children down on it), then SIGKILL to whatever of its
        process tree is left. Ray starts workers in their own process groups, so the tree, not the group, is
        what gets collected. False when it was not running (nothing to stop)."""
        proc = self.process()
        if proc is not None:
            tree = [proc]
            with contextlib.suppress(psutil.NoSuchProcess):  # it may end on its own meanwhile
                tree += proc.children(recursive=True)
                proc.terminate()
            psutil.wait_procs([proc], timeout=timeout)
            for p in tree:  # dozens of Ray processes end meanwhile: any of them may be gone by the time it is asked
                with contextlib.suppress(psutil.NoSuchProcess):
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        p.kill()
            psutil.wait_procs(tree, timeout=5)
        Path(self.pid_file).unlink(missing_ok=True)
        return proc is not None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def write_whole(path: Path, text: str) -> None:
    """Whole or not at all (a temporary file renamed over `path`): a reader never sees half of it, and a write that
    fails (disk full) leaves the previous one."""
    temporary = path.with_name(f"{path.name}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def spawn(name: str, cmd: list[str], state_dir: Path, env: dict[str, str] | None = None) -> dict:
    """Start `cmd` in a new session (it outlives the caller and gets no terminal signals), output to
    `<state_dir>/<name>.log`, pid to `<state_dir>/<name>.pid`. Returns the `ServiceProcess` fields."""
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / f"{name}.log"
    pid_file = state_dir / f"{name}.pid"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **without_proxy_for_loopback(os.environ), **(env or {})},
        )
    try:
        write_whole(pid_file, f"{proc.pid}\n")  # `down`, or a waiting `up`, may read it at any moment
        return dict(name=name, pid=proc.pid, started_after_boot=seconds_after_boot(psutil.Process(proc.pid)),
                    log_path=str(log_path), pid_file=str(pid_file))
    except BaseException:  # Ctrl-C before the caller holds it: in a session of its own, it would run on unrecorded
        with contextlib.suppress(psutil.NoSuchProcess):
            started = psutil.Process(proc.pid)
            for process in [*started.children(recursive=True), started]:
                process.kill()
        proc.wait()
        pid_file.unlink(missing_ok=True)
        raise


def wait_until(service: ServiceProcess, healthy: Callable[[], bool], what: str, timeout: float, port: int) -> None:
    """Poll `healthy` until it holds while the service listens on `port` (not another process answering there);
    if the process exits first or time runs out, stop it and raise an error that names the log file and quotes its
    end. Interrupted (Ctrl-C, or a signal the caller turns into an exception), it stops the service too: its caller
    does not hold it yet, and it runs in a session of its own."""
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if healthy() and service.listens_on(port):
                return
            if not service.alive():
                raise ServiceError(f"{service.name} exited before {what}; log: {service.log_path}\n"
                                   f"{service.log_tail()}")
            time.sleep(0.25)
        raise ServiceError(f"{service.name} did not get to {what} within {timeout:.0f} s; log: {service.log_path}\n"
                           f"{service.log_tail()}")
    except BaseException:
        service.stop()  # also removes the pid file
        raise
