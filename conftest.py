# Root conftest: registers the shared test fixtures (real Ray, real PostgreSQL, real models).
pytest_plugins = [
    "tests.fixtures.common",
    "tests.fixtures.models",
    "tests.fixtures.ray_cluster",
    "tests.fixtures.postgres",
    "tests.fixtures.fake_hub",
]


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests skip, saying why, where there is no CUDA GPU (the rest of the suite runs)."""
    import pytest

    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU, and this machine has none: run `make device-check` on one")
    for item in gpu_items:
        item.add_marker(skip)
