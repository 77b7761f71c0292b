"""Settings from environment variables, through one factory. Nothing is created at import time."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping


@dataclass(frozen=True)
class Settings:
    home: Path
    db_url: str
    ray_address: str | None
    serve_host: str
    serve_port: int
    local_ray_port: int = 6379
    artifacts_override: Path | None = None
    gpu_memory: str | None = None  # one GPU's memory ("80GiB") when Ray's accelerator type does not tell
    db_retry_seconds: float = 120.0  # how long writes wait for an unreachable database
    max_retries: int = 1  # retries of a candidate whose worker process or node died
    heartbeat_stale_seconds: float = 30.0  # a driver silent this long is gone: its job may be resumed
    api_max_jobs: int = 4  # jobs the REST server drives at once (more wait, queued)
    stream_chunk: int | None = None  # items a worker scores between hand-overs to the driver (None: 256)

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
    home = Path(env.get("QUANTSELECT_HOME") or Path.home() / ".quantselect").expanduser()
    db_url = env.get("QUANTSELECT_DB_URL") or f"sqlite:///{home / 'quantselect.db'}"
    return Settings(
        home=home,
        db_url=db_url,
        ray_address=env.get("QUANTSELECT_RAY_ADDRESS") or None,
        serve_host=env.get("QUANTSELECT_SERVE_HOST") or "127.0.0.1",
        serve_port=int(env.get("QUANTSELECT_SERVE_PORT") or 8000),
        local_ray_port=int(env.get("QUANTSELECT_LOCAL_RAY_PORT") or 6379),
        artifacts_override=Path(env["QUANTSELECT_ARTIFACTS_DIR"]).expanduser() if env.get("QUANTSELECT_ARTIFACTS_DIR") else None,
        gpu_memory=env.get("QUANTSELECT_GPU_MEMORY") or None,
        db_retry_seconds=float(env.get("QUANTSELECT_DB_RETRY_SECONDS") or 120.0),
        max_retries=int(env.get("QUANTSELECT_MAX_RETRIES") or 1),
        heartbeat_stale_seconds=float(env.get("QUANTSELECT_HEARTBEAT_STALE_SECONDS") or 30.0),
        api_max_jobs=int(env.get("QUANTSELECT_API_MAX_JOBS") or 4),
        stream_chunk=int(env["QUANTSELECT_STREAM_CHUNK"]) if env.get("QUANTSELECT_STREAM_CHUNK") else None,
    )
