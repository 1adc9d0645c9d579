"""`modrwkv services up|down|status`: the local S3 endpoint, MLflow server and Ray head, as detached processes
recorded in `<state-dir>/services.json`."""

import argparse
import contextlib
import fcntl
import itertools
import json
import os
import shlex
import sys
import time
from pathlib import Path

from .mlflow_server import TRACKING_DATABASE, MlflowServer, start_mlflow
from .process import ServiceError, ServiceProcess, without_proxy_for_loopback, write_whole
from .ray_head import RayHead, start_ray_head
from .s3_server import LOCAL_CREDENTIALS, S3Server, start_s3
from .signals import signals_unwind

BUCKET = "modrwkv"
KINDS = {"s3": S3Server, "mlflow": MlflowServer, "ray": RayHead}  # start order; stopped in reverse
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def services_file(state_dir: Path) -> Path:
    return state_dir / "services.json"


@contextlib.contextmanager
def services_lock(state_dir: Path):
    """Held by whoever reads the record to change it (`up`, `down`, the demo's MLflow) until it is written: two
    `up` at once both found nothing running, both started, and the second record hid the first set for good."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "services.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process starting or stopping the services in {state_dir}", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock, as does the process's end


def write_services(state_dir: Path, services: dict[str, ServiceProcess]) -> None:
    """Whole or not at all: a write that fails (disk full) leaves the previous record, whose services `down` can still
    stop."""
    write_whole(services_file(state_dir), json.dumps({name: s.to_dict() for name, s in services.items()}, indent=2))


def load_services(state_dir: Path) -> dict[str, ServiceProcess]:
    path = services_file(state_dir)
    if not path.exists():
        return {}
    try:
        return {name: KINDS[name].from_dict(d) for name, d in json.loads(path.read_text()).items()}
    except ServiceError as e:
        raise ServiceError(f"{path}: {e}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # cut short, another version's, edited by hand
        raise ServiceError(f"{path}: not a record of these services ({type(e).__name__}: {e}); stop the pids it "
                           "names by hand and delete it") from None


def set_aside_tracking_database(state_dir: Path) -> Path | None:
    """The MLflow database of the services' last run, renamed `mlflow-until-<time>.db` (returned; None when there is
    none): its runs' artifacts were in the S3 endpoint, which keeps objects in memory and lost them when it stopped,
    so a new server starts on a new database, and the old one keeps those runs' params and metrics."""
    database = state_dir / TRACKING_DATABASE
    if not database.exists():
        return None
    stopped = time.strftime("%Y%m%dT%H%M%S", time.localtime(database.stat().st_mtime))
    kept = state_dir / f"mlflow-until-{stopped}.db"
    for n in itertools.count(2):
        if not kept.exists():
            break
        kept = state_dir / f"mlflow-until-{stopped}-{n}.db"
    for suffix in ("-journal", "-wal", "-shm"):  # SQLite's, of a server killed mid-write: they go with their database
        if (companion := database.with_name(database.name + suffix)).exists():
            companion.rename(kept.with_name(kept.name + suffix))
    database.rename(kept)
    return kept


def services_up(state_dir: Path, num_cpus: int | None = None) -> dict[str, ServiceProcess]:
    """S3 with bucket `modrwkv`, MLflow storing artifacts in `s3://modrwkv/mlflow` (on a new database:
    `set_aside_tracking_database`), and a Ray head whose jobs get both in their environment. If one fails, the ones
    already started are stopped."""
    with services_lock(state_dir), contextlib.ExitStack() as started:
        running = [name for name, s in load_services(state_dir).items() if s.alive()]
        if running:
            raise ServiceError(f"already running: {', '.join(running)} (see {services_file(state_dir)}); "
                               "run `down` first")
        if kept := set_aside_tracking_database(state_dir):
            print(f"the MLflow runs of the services' last run are in {kept}: their params and metrics, not their "
                  f"artifacts (the S3 endpoint held those in memory); `mlflow ui --backend-store-uri "
                  f"sqlite:///{kept}` shows them", file=sys.stderr)
        s3 = started.enter_context(start_s3(state_dir))
        s3.create_bucket(BUCKET)
        mlflow = started.enter_context(start_mlflow(state_dir, artifacts_destination=f"s3://{BUCKET}/mlflow",
                                                    env=s3.env()))
        ray = started.enter_context(start_ray_head(state_dir, num_cpus=num_cpus, env={**s3.env(), **mlflow.env()}))
        services = {"s3": s3, "mlflow": mlflow, "ray": ray}
        write_services(state_dir, services)
        started.pop_all()  # keep them running past this process
    return services


def services_down(state_dir: Path) -> tuple[list[str], list[ServiceProcess]]:
    """Stops the recorded services, the last started first. Returns the names of those stopped and the services
    that were not running (their pid gone or now another process's, which is left alone), in the record's order."""
    if not state_dir.is_dir():
        return [], []  # nothing recorded; locking would create the folder
    with services_lock(state_dir):
        services = load_services(state_dir)
        was_running = {name: services[name].stop() for name in reversed(services)}
        services_file(state_dir).unlink(missing_ok=True)
    stopped = [name for name in services if was_running[name]]
    return stopped, [service for name, service in services.items() if not was_running[name]]


def describe(name: str, service: ServiceProcess) -> str:
    state = "running" if service.alive() else "NOT RUNNING"
    where = {
        "s3": lambda s: f"endpoint {s.endpoint_url}",
        "mlflow": lambda s: f"tracking URI {s.tracking_uri}",
        "ray": lambda s: f"address {s.address}, dashboard {s.dashboard_url}",
    }[name](service)
    return f"{name:7s} pid {service.pid:<8d} {state:12s} {where}  (log {service.log_path})"


def client_exports(services: dict[str, ServiceProcess]) -> list[str]:
    """Shell lines that point clients at the services, quoted for the shell. No credentials: the S3 placeholders
    only where the shell has no AWS keys of its own, the Ray token stays in its file. Behind a proxy, also the
    loopback exception its clients need."""
    env = without_proxy_for_loopback(os.environ) if any(os.environ.get(v) for v in PROXY_VARIABLES) else {}
    if "s3" in services:
        env |= {k: v for k, v in services["s3"].env().items() if k not in LOCAL_CREDENTIALS}
    if "mlflow" in services:
        env |= services["mlflow"].env()
    if "ray" in services:
        env |= services["ray"].client_env()
    exports = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    if "s3" in services:  # moto takes any keys, yet clients sign with some: the placeholders where none are set
        exports.append("export " + " ".join(f'{k}="${{{k}:-{v}}}"' for k, v in LOCAL_CREDENTIALS.items()))
    return exports


def cmd_services(args) -> None:
    state_dir = Path(args.state_dir).resolve()
    if args.action == "up":
        with signals_unwind():
            services = services_up(state_dir, args.num_cpus)
    elif args.action == "down":
        stopped, not_running = services_down(state_dir)
        gone = [f"{s.name} (pid {s.pid} gone or now another process's)" for s in not_running]
        lines = [f"stopped: {', '.join(stopped)}"] if stopped else []
        lines += [f"the S3 endpoint kept its objects in memory: what runs wrote to s3://{BUCKET} (MLflow's "
                  "artifacts, caches) is gone with it"] if "s3" in stopped else []
        lines += [f"not running, left alone: {', '.join(gone)}"] if gone else []
        print("\n".join(lines) or f"nothing recorded in {services_file(state_dir)}")
        return
    else:
        services = load_services(state_dir)
        if not services:
            print(f"no services recorded in {services_file(state_dir)}")
            return
    for name, service in services.items():
        print(describe(name, service))
    running = {name: service for name, service in services.items() if service.alive()}
    print("\n".join(client_exports(running)))  # none for a service that is down: its port may be another's now


def cpu_count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def add_services_parser(subparsers) -> None:
    p = subparsers.add_parser("services", help="start/stop the local S3 endpoint, MLflow server and Ray head")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--state-dir", default="runs/services", help="pids, ports, logs and data of the services")
    p.add_argument("--num-cpus", type=cpu_count,
                   help="CPUs the Ray head offers (0: a head that runs no tasks; default: those this machine, or its "
                        "container's CPU quota, allows, as Ray counts them)")
    p.set_defaults(func=cmd_services)
