"""Connecting to Ray: a local in-process cluster, a persistent local head, or a given address."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from quantselect.errors import InputError, QuantselectError
from quantselect.settings import Settings


def _local_env() -> None:
    """Loopback-only local clusters: no token auth (left unset, Ray turns it on and the Jobs API then
    answers 401 to clients that did not set it), bound to 127.0.0.1. Must run before ``import ray``:
    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import, and with it on it rewrites
    ``127.0.0.1:PORT`` to this machine's network address, where a loopback head does not listen."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import sys

    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        constants.ENABLE_RAY_CLUSTER = False  # ray was imported first: apply the setting anyway


def connect(settings: Settings, *, persistent: bool = False) -> None:
    """Connect this process to Ray once.

    - ``QUANTSELECT_RAY_ADDRESS`` set: join that cluster.
    - ``persistent``: start (or join) a local head that outlives this process, so a Serve
      deployment keeps answering after the CLI exits.
    - otherwise: an in-process local cluster that ends with this process.
    """
    address = ray_address(settings)
    if not address:
        _local_env()
    import ray

    if ray.is_initialized():
        return
    # configure_logging=False: no Ray INFO lines ("Connecting to existing Ray cluster...") among ours,
    # in a terminal or in a driver's output that `submit --address --wait` shows; warnings still show.
    try:
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        elif persistent:
            ray.init(address=ensure_local_head(settings), log_to_driver=False, configure_logging=False)
        else:
            # "local": a fresh in-process cluster even when /tmp/ray/ray_current_cluster names
            # another (possibly dead) one, which a bare ray.init() would try to join.
            ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False, _node_ip_address="127.0.0.1")
    except ConnectionError as e:
        raise QuantselectError(f"cannot connect to Ray at {address or 'the local head'}: {e}") from None


def ray_address(settings: Settings) -> str | None:
    """The cluster this process joins: QUANTSELECT_RAY_ADDRESS, else RAY_ADDRESS (inside a Ray job,
    submitted with --address, Ray sets it); None for a local Ray. One ``ray.init`` cannot take is an
    InputError naming what to give, asked without importing Ray: `submit` checks it before it writes
    the job (a driver would otherwise fail on it after converting the model)."""
    address = settings.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        return None
    if address.startswith(("http://", "https://")):  # the Jobs API's dashboard URL (Ray's docs
        # set RAY_ADDRESS to it for `ray job submit`): ray.init takes no such address
        raise InputError(f"Ray address {address} is a dashboard URL: give HOST:6379 or ray://HOST:10001 in "
                         "QUANTSELECT_RAY_ADDRESS (or RAY_ADDRESS), or submit to it with --address")
    found = re.fullmatch(r"(ray://)?(\[[0-9a-fA-F:.]+\]|[^\s/:\[\]]+)(?::(\d{1,5}))?/?", address)
    if address not in ("auto", "local") and not (found and (found[1] or found[3]) and 0 < int(found[3] or 1) < 65536):
        variable = "QUANTSELECT_RAY_ADDRESS" if settings.ray_address else "RAY_ADDRESS"
        raise InputError(f"{variable}={address!r} is no Ray address: give the head's HOST:6379 (GCS port), or "
                         "ray://HOST:10001, or unset it for a local Ray")
    return address


def check_jobs_address(address: str) -> None:
    """``submit``/``resume --address``: the Ray dashboard's URL, ``http(s)://HOST[:PORT][/PATH]``, which
    the Jobs API client takes; any other spelling is refused before the job is written (Ray's own
    error, "Invalid address format", comes after it, and says nothing of what to give)."""
    found = re.fullmatch(r"https?://(\[[0-9a-fA-F:.]+\]|[^\s/:?#@\[\]]+)(?::(\d{1,5}))?(/[^\s?#]*)?", address)
    if not found or not 0 < int(found[2] or 80) < 65536:
        raise InputError(f"--address {address}: give the Ray dashboard's URL, http://HOST:8265 (the Jobs API; "
                         "QUANTSELECT_RAY_ADDRESS is the one that takes HOST:6379)")


def _ray_cli() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_head_is_up(settings: Settings) -> bool:
    """Whether the detached local head answers (a probe: `ray status` retries for minutes when nothing listens)."""
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", settings.local_ray_port)) == 0


def address_answers(address: str, timeout: float = 3.0) -> bool | None:
    """Whether something listens at a Ray address (``HOST:PORT``, ``ray://HOST:PORT``), asked without
    importing Ray; None for an address that names no port (``auto``, ``local``)."""
    found = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)/?", address.strip())
    if found is None:
        return None
    try:
        with socket.create_connection((found[1], int(found[2])), timeout=timeout):
            return True
    except OSError:
        return False


def cluster_exists(settings: Settings) -> bool:
    """Whether there is a cluster ``connect(persistent=True)`` would join rather than start: this
    process is connected, an address is set, or the local head answers."""
    ray = sys.modules.get("ray")
    return bool((ray is not None and ray.is_initialized()) or settings.ray_address or os.environ.get("RAY_ADDRESS")
                or local_head_is_up(settings))


def ensure_local_head(settings: Settings) -> str:
    """Start a detached local Ray head on 127.0.0.1 (with the dashboard, for the Jobs API) unless
    one already answers there; returns its address."""
    address = f"127.0.0.1:{settings.local_ray_port}"
    if local_head_is_up(settings):
        return address
    # The agents get free ports: their defaults (e.g. 52365) may be held by another local Ray, and a
    # head whose job agent cannot bind refuses every job ("No available agent").
    agents = [f"--{flag}={_free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                         "runtime-env-agent-port", "metrics-export-port")]
    started = subprocess.run(
        [_ray_cli(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={settings.local_ray_port}",
         "--dashboard-host=127.0.0.1", "--disable-usage-stats", *agents],
        capture_output=True, text=True, env=os.environ.copy(),
    )
    if started.returncode != 0:
        tail = (started.stderr or started.stdout).strip().splitlines()[-1:] or ["no output"]
        raise QuantselectError(f"could not start a local Ray head at {address}: {tail[0]}")
    return address


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0))


def alive_nodes(nodes: list[dict] | None = None) -> list[dict]:
    """The live nodes of ``ray.nodes()`` (or of the list given, in its shape)."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    return [n for n in nodes if n.get("Alive")]


def gpus_per_node() -> list[int]:
    """Whole GPUs of each live node."""
    return [int(n["Resources"].get("GPU", 0)) for n in alive_nodes()]


def largest_node_cpus(nodes: list[dict] | None = None) -> float:
    """The CPUs of the largest live node: the most one task can be given (it runs on one node)."""
    return max((float(n["Resources"].get("CPU", 0)) for n in alive_nodes(nodes)), default=0.0)


def unplaceable(asked: dict[str, float], nodes: list[dict] | None = None,
                autoscaler_gpus: int | None = None) -> str | None:
    """Why no live node could ever hold a task asking for ``asked`` (``{"CPU": 0, "GPU": 2}``): its
    resources against each node's total, not what is free now (busy resources free up, a node that
    is too small never grows); None when one could. ``autoscaler_gpus``: the GPUs of a node the
    autoscaler adds on demand (QUANTSELECT_AUTOSCALER_NODE_GPUS), which could hold it too."""
    alive = alive_nodes(nodes)
    asked = {k: v for k, v in asked.items() if v}
    if any(all(n["Resources"].get(k, 0) >= v for k, v in asked.items()) for n in alive):
        return None
    if autoscaler_gpus and 0 < asked.get("GPU", 0) <= autoscaler_gpus:  # such a node, with whatever CPUs it asks besides
        return None
    most = {k: max((n["Resources"].get(k, 0) for n in alive), default=0) for k in asked}
    short = [k for k in asked if most[k] < asked[k]] or list(asked)  # else: no one node has all of it
    scaled = (f" and the autoscaler adds nodes of {_amount(autoscaler_gpus, 'GPU')} (QUANTSELECT_AUTOSCALER_NODE_GPUS)"
              if autoscaler_gpus and "GPU" in short else "")
    return (f"it asks for {' and '.join(_amount(asked[k], k) for k in short)} on one node and the largest "
            f"live node has {' and '.join(f'{most[k]:g}' for k in short)}{scaled}")


def _amount(n: float, resource: str) -> str:
    return f"{n:g} {resource}{'s' if n > 1 else ''}"


def accelerator_types(resources: dict[str, float]) -> list[str]:
    """The GPU types Ray recognised, from its resources (``accelerator_type:H100`` -> ``H100``)."""
    return [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]


def _whole_word_patterns(kind: str) -> list[str]:
    """LIKE patterns of a ``cuda:`` device whose name holds the Ray type as whole words: "L4" matches
    "cuda:NVIDIA L4", never "cuda:NVIDIA L40S"; a size suffix is dropped ("A100-80G": the device says
    "A100-SXM4-80GB"); LIKE's one-character wildcard joins the words ("RTX-PRO-6000": "RTX PRO 6000")."""
    core = re.sub(r"-\d+GB?$", "", kind, flags=re.IGNORECASE).replace("-", "_")
    return [f"{before}{core}{after}" for before in ("cuda:", "cuda:% ") for after in ("", " %", "-%")]


def device_patterns(nodes: list[dict] | None = None, autoscaler_gpus: int | None = None) -> list[str]:
    """What the cluster's candidates measure on, as SQL LIKE patterns (any case) of a result's
    ``device``. Where the cluster has GPUs only its GPU nodes count (a candidate asks for a GPU: a
    CPU-only head runs none): one whose GPUs Ray recognised (``accelerator_type:L4``) gives patterns of
    that type as whole words; one without (logical GPUs: a worker there runs on the CPU) gives ``cpu``,
    as does every node of a cluster without GPUs -- unless an autoscaler adds GPU nodes
    (``autoscaler_gpus``): the candidates run on those, of a type unknown before one is up (none matches)."""
    alive = alive_nodes(nodes)
    patterns: set[str] = set()
    gpu_nodes = [n for n in alive if n["Resources"].get("GPU", 0) > 0]
    for node in gpu_nodes or ([] if autoscaler_gpus else alive):
        kinds = accelerator_types(node["Resources"])
        for kind in kinds:
            patterns.update(_whole_word_patterns(kind))
        if not kinds:
            patterns.add("cpu")
    return sorted(patterns)


def gpu_memory_bytes(settings: Settings, nodes: list[dict] | None = None) -> float | None:
    """The memory of one GPU of the cluster: QUANTSELECT_GPU_MEMORY when set, else the smallest of the
    GPU types Ray reports (``accelerator_type:H100``) that the GPU table knows; None when unknown (then
    every candidate gets a whole GPU: packing without knowing the memory could run out of it), as for a
    type sold in several sizes (Ray calls a 40 GB and an 80 GB A100 both "A100") unless a node's type
    names the size (``A100-80G``)."""
    from quantselect.domain import planner
    from quantselect.domain.gpus import accelerator_memory_gib

    if settings.gpu_memory:
        return settings.gpu_memory
    sizes = []
    for node in alive_nodes(nodes):
        kinds = accelerator_types(node["Resources"])
        if not kinds:
            continue
        gib = accelerator_memory_gib(max(kinds, key=len))  # "A100-80G" over the "A100" beside it
        if gib is None:
            return None
        sizes.append(gib * planner.GIB)
    return min(sizes) if sizes else None
