"""Connecting to Ray: a local in-process cluster, a persistent local head, or a given address."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from quantselect.errors import QuantselectError
from quantselect.settings import Settings


def _local_env() -> None:
    # Loopback-only local clusters: no token auth (left unset, Ray turns it on and the Jobs API then
    # answers 401 to clients that did not set it), bound to 127.0.0.1.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def connect(settings: Settings, *, persistent: bool = False) -> None:
    """Connect this process to Ray once.

    - ``QUANTSELECT_RAY_ADDRESS`` set: join that cluster.
    - ``persistent``: start (or join) a local head that outlives this process, so a Serve
      deployment keeps answering after the CLI exits.
    - otherwise: an in-process local cluster that ends with this process.
    """
    import ray

    if ray.is_initialized():
        return
    # Inside a Ray job (submitted with --address) Ray sets RAY_ADDRESS: join that cluster.
    address = settings.ray_address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        elif persistent:
            _local_env()
            ensure_local_head(settings)
            ray.init(address="auto", log_to_driver=False)
        else:
            _local_env()
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    except ConnectionError as e:
        raise QuantselectError(f"cannot connect to Ray at {address or 'the local head'}: {e}") from None


def _ray_cli() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def ensure_local_head(settings: Settings) -> None:
    """Start a detached local Ray head (with the dashboard, for the Jobs API) unless one runs."""
    status = subprocess.run([_ray_cli(), "status"], capture_output=True, text=True, env=os.environ.copy())
    if status.returncode == 0:
        return
    started = subprocess.run(
        [_ray_cli(), "start", "--head", "--dashboard-host", "127.0.0.1", "--disable-usage-stats"],
        capture_output=True, text=True, env=os.environ.copy(),
    )
    if started.returncode != 0:
        tail = (started.stderr or started.stdout).strip().splitlines()[-1:] or ["no output"]
        raise QuantselectError(f"could not start a local Ray head: {tail[0]}")


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0))
