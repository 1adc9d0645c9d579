"""`make demo`'s MLflow server, recorded with those of `modrwkv services up` in one services.json."""

import sys
import threading

import pipelines.demo as demo
from infra.cli import load_services, services_lock, write_services
from infra.mlflow_server import MlflowServer
from infra.process import spawn


def test_the_demo_waits_for_services_up_and_uses_its_mlflow(tmp_path, monkeypatch):
    """A demo started while `up` is starting the services waits for it, then uses its MLflow server; it used to
    start a second one and write a record without `up`'s services, which `down` then could not stop."""
    spawned = []

    def sleeper(state_dir, **kwargs) -> MlflowServer:  # stands in for an MLflow server
        spawned.append(MlflowServer(**spawn("mlflow", [sys.executable, "-c", "import time; time.sleep(120)"],
                                            state_dir), port=1))
        return spawned[-1]

    monkeypatch.setattr(demo, "SERVICES", tmp_path)
    monkeypatch.setattr(demo, "start_mlflow", sleeper)
    found = []
    try:
        with services_lock(tmp_path):  # `up`, part way
            waiting = threading.Thread(target=lambda: found.append(demo.mlflow_server()))
            waiting.start()
            waiting.join(timeout=0.5)  # unlocked, the demo finds no record and starts its own in milliseconds
            write_services(tmp_path, {"mlflow": sleeper(tmp_path)})
        waiting.join(timeout=30)
        assert len(spawned) == 1
        assert [s.pid for s in found] == [spawned[0].pid] == [s.pid for s in load_services(tmp_path).values()]
    finally:
        for service in spawned:
            service.stop()
