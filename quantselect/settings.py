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
    )
