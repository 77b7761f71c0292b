"""Deploy / undeploy quantized candidates on Ray Serve. Assumes Ray is connected (``ray.init``).

Each candidate is one Serve application ``quantselect-<name>`` at route prefix ``/models/<name>``;
OpenAI clients use ``http://<host>:<port>/models/<name>/v1`` as their base URL.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request

import ray
from ray import serve

from quantselect.errors import ConflictError, InputError, NotFoundError, QuantselectError
from quantselect.serving.app import build_app

APP_PREFIX = "quantselect-"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InputError(
            f"deployment name {name!r} must be 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit"
        )
    return name


def _require_ray() -> None:
    if not ray.is_initialized():
        raise ConflictError("Ray is not connected: call ray.init() (or connect to the cluster) before deploying")


def _serve_client():
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False)


def ensure_serve(host: str, port: int) -> None:
    """Start Serve's HTTP proxy on host:port, or check that the running one listens there
    (the proxy's address is fixed for the life of the Serve instance)."""
    client = _serve_client()
    if client is None:
        serve.start(http_options={"host": host, "port": port})
        return
    cfg = client.http_config
    if (cfg.host, cfg.port) != (host, port):
        raise ConflictError(
            f"Ray Serve on this cluster already listens on {cfg.host}:{cfg.port}, not {host}:{port}; "
            "deploy with that address (QUANTSELECT_SERVE_HOST/PORT) or shut Serve down first"
        )


def _local_get(url: str, timeout: float):
    """GET a URL of this machine's Serve proxy, never through an ``http_proxy``."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=timeout)


def _wait_healthy(url: str, timeout_s: float) -> None:
    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        try:
            with _local_get(url, timeout=10) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.5)
    raise QuantselectError(f"{url} did not become healthy within {timeout_s:.0f} s ({last})")


def _wait_running(app: str, place_timeout_s: float) -> None:
    """Wait until Serve says ``app`` runs, as ``serve.run`` does, but give up on one whose replica the
    cluster has not placed within ``place_timeout_s`` (Serve says so after 30 s; ``serve.run`` waits
    forever: e.g. a second candidate of a job on the one GPU the first holds). Loading a large model
    takes as long as it takes."""
    from ray.serve.schema import ApplicationStatus

    start = time.monotonic()
    while True:
        status = serve.status().applications.get(app)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(status.message)
        waiting = [d.message for d in (status.deployments.values() if status else ()) if "to be scheduled" in d.message]
        if waiting and time.monotonic() - start > place_timeout_s:
            needs = re.search(r"Resources required for each replica: (.*?), total resources available: (.*?)\. ", waiting[0])
            raise _NotPlaced(f"the cluster could not place its replica within {place_timeout_s:.0f} s" + (
                f" (it needs {needs[1]}; free: {needs[2]})" if needs else ""))
        time.sleep(0.5)


class _NotPlaced(QuantselectError):
    pass


def _asks_for_a_key(healthz: str) -> bool | None:
    """Whether the running deployment behind ``healthz`` asks its clients for an API key; None when
    it does not say (busy, restarting, broken)."""
    import json

    try:
        with _local_get(healthz, timeout=10) as r:
            return bool(json.load(r).get("api_key"))
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _failure_reason(app: str) -> str:
    """The last line of the replica's error (Serve's own exception only says the update failed)."""
    try:
        status = serve.status().applications[app]
        messages = [d.message for d in status.deployments.values() if d.message] or [status.message]
        lines = [ln.strip() for ln in messages[-1].splitlines() if ln.strip()]
        return lines[-1] if lines else ""
    except Exception:  # noqa: BLE001 - best effort, the caller falls back to Serve's message
        return ""


def deploy(name: str, model_path: str, config: dict, *, host: str = "127.0.0.1", port: int = 8000,
           use_gpu: bool = False, gpus: int = 1, engine: str | None = None, api_key: str | None = None,
           replaces: str | None = None, timeout_s: float = 600, place_timeout_s: float = 600) -> str:
    """Serve ``model_path`` quantized as ``config`` (a ``CandidateConfig.to_dict()``) under ``name``
    (with ``use_gpu``, on ``gpus`` GPUs), its /v1 routes asking for ``api_key`` if given; replaces a
    deployment of the same name. ``replaces``: the deployment the caller stops once this one answers
    (another candidate of the same job). Without ``api_key``, replacing a deployment that asks its
    clients for a key is refused: it would serve them open. A replica the cluster cannot place within
    ``place_timeout_s``, or that does not answer within ``timeout_s`` once running, fails the deployment
    and is removed. Returns the OpenAI base URL."""
    check_name(name)
    _require_ray()
    app = build_app(name, str(model_path), config, use_gpu=use_gpu, engine=engine, api_key=api_key,
                    gpus=gpus)  # validates first
    ensure_serve(host, port)
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if api_key is None:
        running = list_deployments()
        for keyed in [n for n in (name, replaces) if n in running]:
            asks = _asks_for_a_key(f"http://{local}:{port}/models/{keyed}/healthz")
            if asks or asks is None:  # one that does not say may ask: never replaced by an open one blind
                raise ConflictError(
                    f"deployment {keyed!r} " + ("asks its clients for an API key" if asks else
                                                "does not say whether it asks its clients for an API key (its /healthz "
                                                "does not answer)") + ", and this process has no "
                    "QUANTSELECT_SERVE_API_KEY: set it (to the key or a new one) to replace it, or undeploy it first "
                    "to serve it open")
    try:
        serve._run(app, _blocking=False, name=APP_PREFIX + name, route_prefix=f"/models/{name}")
        _wait_running(APP_PREFIX + name, place_timeout_s)
        _wait_healthy(f"http://{local}:{port}/models/{name}/healthz", timeout_s)
    except (RuntimeError, QuantselectError) as e:  # the replica failed to start (bad path, quantization error,
        # no room, ...): nothing is left running that nobody knows of
        reason = str(e) if isinstance(e, QuantselectError) else (_failure_reason(APP_PREFIX + name) or str(e))
        if isinstance(e, _NotPlaced) and replaces:
            reason += f"; {replaces}, still served, may hold what it needs: undeploy it first"
        serve.delete(APP_PREFIX + name)
        raise QuantselectError(f"deployment {name!r} failed: {reason}") from e
    return f"http://{host}:{port}/models/{name}/v1"


def list_deployments() -> list[str]:
    """Names of the quantselect deployments on the connected cluster (starts nothing)."""
    _require_ray()
    apps = serve.status().applications if _serve_client() is not None else {}
    return sorted(a[len(APP_PREFIX):] for a in apps if a.startswith(APP_PREFIX))


def undeploy(name: str) -> None:
    check_name(name)
    if name not in list_deployments():
        raise NotFoundError(f"no deployment named {name!r}")
    serve.delete(APP_PREFIX + name)
