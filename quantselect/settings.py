"""Settings from environment variables, through one factory. Nothing is created at import time."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, TypeVar

from quantselect.domain.durations import parse_duration
from quantselect.errors import InputError

T = TypeVar("T", int, float)


@dataclass(frozen=True)
class Settings:
    home: Path
    db_url: str
    ray_address: str | None
    serve_host: str
    serve_port: int
    local_ray_port: int = 6379
    artifacts_override: Path | None = None
    gpu_memory: float | None = None  # one GPU's memory in bytes (QUANTSELECT_GPU_MEMORY=80GiB) when Ray's type does not tell
    # the GPUs of a node the cluster's autoscaler adds on demand (GPU workers scaled from zero): jobs
    # plan for such nodes even when none is up, and their candidates wait for one (None: no autoscaler)
    autoscaler_node_gpus: int | None = None
    db_retry_seconds: float = 120.0  # how long writes wait for an unreachable database
    max_retries: int = 1  # retries of a candidate whose worker process or node died
    heartbeat_stale_seconds: float = 30.0  # a driver silent this long is gone: its job may be resumed
    api_max_jobs: int = 4  # jobs the REST server drives at once (more wait, queued)
    stream_chunk: int | None = None  # items a worker scores between hand-overs to the driver (None: 256)
    candidate_timeout_seconds: float | None = None  # a candidate running longer is stopped and failed
    api_token: str | None = None  # the bearer token every REST API request must carry (None: none asked)
    serve_api_key: str | None = None  # the API key a deployment's OpenAI clients must send (None: none asked)
    api_paths: tuple[Path, ...] | None = None  # the folders REST requests may name files under (None: any)
    notify_hosts: tuple[str, ...] | None = None  # the hosts a job's webhook may be on (None: any but link-local)
    api_hosts: tuple[str, ...] = ()  # names a token-less REST API on loopback answers besides this machine's own
    gptq_cuda_kernel: str | None = None  # GPTQModel's kernel for GPTQ artifacts on a GPU (None: gptq_triton)
    awq_cuda_kernel: str | None = None  # and for AWQ ones (None: gemm_triton)

    @property
    def models_dir(self) -> Path:
        """Converted base models (e.g. the bundled GGUF turned into safetensors)."""
        return self.home / "models"

    @property
    def artifacts_dir(self) -> Path:
        """Quantized models in the Hugging Face layout, one folder per hash of model, candidate
        config and calibration data. On a multi-node cluster, point QUANTSELECT_ARTIFACTS_DIR at
        storage every node mounts so that a later job reuses them wherever it runs."""
        return self.artifacts_override or self.home / "artifacts"

    def ensure_home(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        return self.home


def get_settings(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    # absolute: a relative one would be another database and other artifacts in each working directory
    # (and the artifact paths stored, read by Serve replicas and drivers elsewhere, would not resolve)
    home = _folder(env, "QUANTSELECT_HOME") or Path.home() / ".quantselect"
    db_url = _db_url(env) or f"sqlite:///{home / 'quantselect.db'}"
    timeout = env.get("QUANTSELECT_CANDIDATE_TIMEOUT")
    return Settings(
        home=home,
        db_url=db_url,
        ray_address=env.get("QUANTSELECT_RAY_ADDRESS") or None,
        serve_host=env.get("QUANTSELECT_SERVE_HOST") or "127.0.0.1",
        serve_port=_number(env, "QUANTSELECT_SERVE_PORT", 8000, int, 1, 65535),
        local_ray_port=_number(env, "QUANTSELECT_LOCAL_RAY_PORT", 6379, int, 1, 65535),
        artifacts_override=_folder(env, "QUANTSELECT_ARTIFACTS_DIR"),
        gpu_memory=_gpu_memory(env),
        autoscaler_node_gpus=_number(env, "QUANTSELECT_AUTOSCALER_NODE_GPUS", None, int, 1),
        db_retry_seconds=_number(env, "QUANTSELECT_DB_RETRY_SECONDS", 120.0, float, 0),
        max_retries=_number(env, "QUANTSELECT_MAX_RETRIES", 1, int, 0),
        heartbeat_stale_seconds=_number(env, "QUANTSELECT_HEARTBEAT_STALE_SECONDS", 30.0, float, 1),
        api_max_jobs=_number(env, "QUANTSELECT_API_MAX_JOBS", 4, int, 1),
        stream_chunk=_number(env, "QUANTSELECT_STREAM_CHUNK", None, int, 1),
        candidate_timeout_seconds=parse_duration(timeout, "QUANTSELECT_CANDIDATE_TIMEOUT") if timeout else None,
        api_token=_token(env, "QUANTSELECT_API_TOKEN"),
        serve_api_key=_token(env, "QUANTSELECT_SERVE_API_KEY"),
        api_paths=_folders(env, "QUANTSELECT_API_PATHS"),
        notify_hosts=_hosts(env, "QUANTSELECT_NOTIFY_HOSTS"),
        api_hosts=_hosts(env, "QUANTSELECT_API_HOSTS") or (),
        gptq_cuda_kernel=cuda_kernel(env, "gptq"),
        awq_cuda_kernel=cuda_kernel(env, "awq"),
    )


# The kernels GPTQModel 7.6 can load a GPTQ / AWQ artifact with on an NVIDIA GPU, by the names its
# BACKEND takes (GPTQ: also without "gptq_"); AWQ's are those transformers' AwqConfig also accepts
# (gemv and gemv_fast need another checkpoint format; the CPU and XPU kernels are left out).
CUDA_KERNEL_CHOICES = {
    "gptq": ("gptq_triton", "gptq_marlin", "gptq_machete", "gptq_exllama_v2", "gptq_bitblas", "gptq_swordfish",
             "gptq_torch", "auto"),
    "awq": ("gemm_triton", "gemm", "marlin", "machete", "exllama_v2", "torch_awq", "auto"),
}


def cuda_kernel(env: Mapping[str, str], method: str) -> str | None:
    """QUANTSELECT_GPTQ_CUDA_KERNEL / QUANTSELECT_AWQ_CUDA_KERNEL, lower-cased. Read by the worker that
    loads an artifact, and checked here first: a typo would otherwise fail only once the whole
    quantization on a GPU was done."""
    name = f"QUANTSELECT_{method.upper()}_CUDA_KERNEL"
    raw = env.get(name) or ""
    value = raw.strip().lower()
    choices = CUDA_KERNEL_CHOICES[method]
    if value and value not in choices and not (method == "gptq" and f"gptq_{value}" in choices):
        raise InputError(f"{name}={raw!r}: give one of {', '.join(choices)}" + (" (gptq_ may be left out)" if
                         method == "gptq" else "") + f", or unset it for {choices[0]}")
    return value or None


MIN_TOKEN_CHARS = 16


def _gpu_memory(env: Mapping[str, str]) -> float | None:
    """QUANTSELECT_GPU_MEMORY in bytes, read here: read first by a job's driver, a typo would fail the
    job after it was stored (and its model fetched)."""
    from quantselect.domain.planner import parse_memory

    raw = (env.get("QUANTSELECT_GPU_MEMORY") or "").strip()
    try:
        return parse_memory(raw) if raw else None
    except InputError:
        raise InputError(f"QUANTSELECT_GPU_MEMORY={raw!r}: expected one GPU's memory, such as 80GiB or 24GB") from None


def _folder(env: Mapping[str, str], name: str) -> Path | None:
    raw = (env.get(name) or "").strip()
    return Path(raw).expanduser().absolute() if raw else None


def _db_url(env: Mapping[str, str]) -> str | None:
    """QUANTSELECT_DB_URL; an '@' left in its password is refused (the driver would take the rest for
    the host, and print it), without showing the URL."""
    url = (env.get("QUANTSELECT_DB_URL") or "").strip()
    where = re.match(r"[\w+.-]+://([^/?#]*)", url)
    if where and where[1].count("@") > 1:
        raise InputError("QUANTSELECT_DB_URL: its user or password holds an '@': percent-encode it as %40 "
                         "(postgresql://user:p%40ss@host/db)")
    return url or None


def is_loopback(host: str) -> bool:
    """Whether a server listening on ``host`` answers this machine only."""
    return host in ("127.0.0.1", "localhost", "::1")


def _folders(env: Mapping[str, str], name: str) -> tuple[Path, ...] | None:
    """Absolute folders, separated as in PATH (``/data:/models``); None when the variable is unset."""
    raw = env.get(name)
    if not raw or not raw.strip():
        return None
    folders = tuple(Path(p.strip()).expanduser() for p in raw.split(os.pathsep) if p.strip())
    if not folders:
        raise InputError(f"{name}={raw!r}: give absolute folders separated by {os.pathsep!r}, or unset it")
    relative = [str(f) for f in folders if not f.is_absolute()]
    if relative:
        raise InputError(f"{name}={raw!r}: {relative[0]} is not an absolute path; give absolute folders separated "
                         f"by {os.pathsep!r}")
    return folders


def _hosts(env: Mapping[str, str], name: str) -> tuple[str, ...] | None:
    """Host names (``hooks.slack.com``), ``*.example.com`` for every host under a domain, or IP
    addresses, separated by commas; lower-cased. None when the variable is unset."""
    raw = env.get(name)
    if not raw or not raw.strip():
        return None
    hosts = tuple(h.strip().lower().rstrip(".").strip("[]") for h in raw.split(",") if h.strip())
    bad = [h for h in hosts if not (re.fullmatch(r"(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*", h) or _ipv6(h))]
    if not hosts or bad:
        raise InputError(f"{name}={raw!r}: {bad[0] if bad else 'nothing'}: give host names (hooks.slack.com), "
                         "*.example.com patterns or IP addresses separated by commas, without scheme, port or path, "
                         "or unset it")
    return hosts


def _ipv6(text: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def _token(env: Mapping[str, str], name: str) -> str | None:
    """A secret a client must send; one short enough to guess is refused, naming the variable."""
    raw = (env.get(name) or "").strip()
    if raw and (len(raw) < MIN_TOKEN_CHARS or any(c.isspace() for c in raw)):
        raise InputError(f"{name}: give a token of at least {MIN_TOKEN_CHARS} characters and no spaces "
                         "(`openssl rand -hex 32` makes one)")
    if raw and not (raw.isascii() and raw.isprintable()):  # an HTTP header carries ASCII: none would match
        raise InputError(f"{name}: give a token of ASCII letters, digits and punctuation (`openssl rand -hex 32` "
                         "makes one)")
    return raw or None


def _number(env: Mapping[str, str], name: str, default: T | None, kind: Callable[[str], T],
            low: T, high: T | None = None) -> T | None:
    """A numeric setting; a value that is not one, or out of range, is a one-line error naming it."""
    raw = env.get(name)
    if not raw:
        return default
    what = "a whole number" if kind is int else "a number"
    try:
        value = kind(raw.strip())
    except ValueError:
        raise InputError(f"{name}={raw!r}: give {what}" + (f" (default {default})" if default is not None else "")) from None
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        raise InputError(f"{name}={raw!r}: give {what} " + (f"from {low} to {high}" if high is not None else f"of at least {low}"))
    return value
