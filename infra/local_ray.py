"""`ray.init` for the jobs: a cluster's address (given, or RAY_ADDRESS as `ray job submit` sets it) is joined; without
one, the process's own Ray instance is started on 127.0.0.1 only.

On Linux a plain `ray.init()` takes the machine's network address: its GCS, raylet and agents then listen on every
interface (measured on this machine's 192.0.2.2: the GCS and raylet on `::`, the dashboard agent on 0.0.0.0), with
Ray's token authentication off, so anyone who reaches the machine could submit code to it. Ray's single-machine
mode, the one `infra.ray_head` runs its head in, keeps every port on 127.0.0.1. Ray reads that mode once, when it
is imported (the jobs' modules import it at the top), and its processes read it from their environment: both are
set here, just before the instance starts.
"""

import ipaddress
import os

from .ray_head import SINGLE_MACHINE


def init_ray(address: str | None = None, **kwargs):
    """ray.init(address, **kwargs), a new local instance on 127.0.0.1 only; returns Ray's context."""
    import ray

    if not (address or os.environ.get("RAY_ADDRESS")):
        loopback_only()
    return ray.init(address=address, **kwargs)


def loopback_only() -> None:
    """Ray's single-machine mode for the instance this process starts next and for the processes it starts."""
    from ray._private import ray_constants, services

    os.environ.update(SINGLE_MACHINE)
    ray_constants.ENABLE_RAY_CLUSTER = False
    address = services.get_node_ip_address()
    if not ipaddress.ip_address(address).is_loopback:  # a Ray that reads the mode elsewhere: not started open
        raise RuntimeError(f"Ray {__import__('ray').__version__} would start on {address} despite its single-machine "
                           "mode; start a head with `modrwkv services up` and pass its address")
