"""What this machine offers a job's workers: its accelerators and the versions of the libraries
quantselect runs on (`quantselect doctor`). Imports torch, so only the commands that ask do."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

# The libraries a job uses, in the order a bug report wants them; the optional ones may be missing.
LIBRARIES = ("torch", "transformers", "ray", "torchao", "gptqmodel", "bitsandbytes", "gguf", "optimum",
             "accelerate", "huggingface_hub", "sqlalchemy", "alembic", "psycopg", "fastapi")


def library_versions() -> dict[str, str | None]:
    """Each library's installed version, None where it is not installed."""
    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def accelerators() -> dict[str, Any]:
    """torch's CUDA build and the GPUs it sees: name, memory, compute capability."""
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "memory_bytes": p.total_memory, "capability": f"{p.major}.{p.minor}"})
    return {"torch_cuda": torch.version.cuda, "gpus": gpus}
