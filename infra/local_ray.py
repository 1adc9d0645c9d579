"""`ray.init` for the jobs: a cluster's address (given, or RAY_ADDRESS as `ray job submit` sets it) is joined; without
one, the process's own Ray instance is started on 127.0.0.1 only.

On Linux a plain `ray.init()` takes the machine's network address: its GCS, raylet and agents then listen on every
interface (measured on this machine's 192.0.2.2: the GCS and raylet on `::`, the dashboard agent on 0.0.0.0), with
Ray's token authentication off, so anyone who reaches the machine could submit code to it. Ray's single-machine
mode, the one `infra.ray_head` runs its head in, keeps every port on 127.0.0.1. Ray reads that mode once, when it
is imported (the jobs' modules import it at the top), and its processes read it from their environment: both are
set here, just before the instance starts, and restored once it has.
"""

import ipaddress
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .ray_head import SINGLE_MACHINE


def init_ray(address: str | None = None, local: dict | None = None, **kwargs):
    """ray.init(address, **kwargs); a new local instance (no address given, none in RAY_ADDRESS, no local cluster of
    `ray start`'s to join) on 127.0.0.1 only, with the settings `local` adds (num_cpus: Ray refuses them when it
    joins). Returns Ray's context. A SIGTERM handler the job installed (`signals_unwind`'s) stays: `ray.init` puts
    its own in place, `sys.exit(15)`, on every call (exit status 15, and a run it tracks ended FAILED)."""
    import ray
    from ray._private import services

    with job_sigterm_handler_kept():
        if services.canonicalize_bootstrap_address(address) is not None:  # joining: the cluster's own mode
            return ray.init(address=address, **kwargs)
        with loopback_only():
            return ray.init(address=address, **kwargs, **(local or {}))


@contextmanager
def job_sigterm_handler_kept() -> Iterator[None]:
    """The SIGTERM handler of before the block, back after it where it was one of Python's or ignored (Ray's stays in
    place of the default, where it ends the process by an exception that shuts Ray down, as it means to)."""
    before = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if before not in (None, signal.SIG_DFL):
            signal.signal(signal.SIGTERM, before)


@contextmanager
def loopback_only() -> Iterator[None]:
    """Ray's single-machine mode for the instance started inside, and for the processes it starts (which take it
    from their environment as they start); restored afterwards, so that nothing later (a `ray start --address` run
    from this process, a later join) inherits it."""
    from ray._private import ray_constants, services

    saved_env, saved_mode = {k: os.environ.get(k) for k in SINGLE_MACHINE}, ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(SINGLE_MACHINE)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        address = services.get_node_ip_address()
        if not ipaddress.ip_address(address).is_loopback:  # a Ray that reads the mode elsewhere: not started open
            raise RuntimeError(f"Ray {__import__('ray').__version__} would start on {address} despite its "
                               "single-machine mode; start a head with `modrwkv services up` and pass its address")
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_mode
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
