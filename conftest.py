# Root conftest: registers the shared test fixtures (real Ray, real PostgreSQL, real models).
pytest_plugins = [
    "tests.fixtures.common",
    "tests.fixtures.models",
    "tests.fixtures.ray_cluster",
    "tests.fixtures.postgres",
]
