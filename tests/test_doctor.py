"""`quantselect doctor` (and GET /api/v1/doctor) on this machine's real set-up: a real SQLite file and
PostgreSQL server, a real Ray cluster's address, torch as installed. It changes nothing."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from quantselect.cli import cli
from quantselect.db.engine import head_revision, normalize_url


def _doctor(*args: str) -> tuple[int, dict[str, dict]]:
    res = CliRunner().invoke(cli, ["doctor", "--format", "json", *args])
    assert "Traceback" not in res.output, res.output
    return res.exit_code, {c["name"]: c for c in json.loads(res.output)["checks"]}


def test_a_fresh_machine_is_checked_without_creating_anything(qs_home):
    (qs_home / "models").unlink()
    qs_home.rmdir()
    code, checks = _doctor()
    assert code == 0, checks
    assert not qs_home.exists()  # no database file, no folder
    assert checks["database"] == {"name": "database", "status": "ok", "detail": f"sqlite:///{qs_home}/quantselect.db: no "
                                  "file yet, created on first use (or by `quantselect db upgrade`)"}
    assert checks["home"]["detail"].startswith(f"{qs_home} (not created yet): ")
    assert checks["ray"]["detail"].startswith("no cluster set: each job starts a local Ray")
    assert checks["gpus"]["status"] in ("ok", "info") and "torch" in checks["libraries"]["detail"]
    assert checks["candidates"]["status"] == "ok" and " run here" in checks["candidates"]["detail"]
    assert checks["demo model"]["status"] == "ok"
    res = CliRunner().invoke(cli, ["doctor"])
    assert res.exit_code == 0 and res.output.startswith("quantselect 0.1.0, Python ")
    assert res.output.splitlines()[1].split() == ["check", "status", "detail"]


def test_a_database_is_checked_at_its_schema_and_an_unreachable_one_fails(qs_home, postgres_url, monkeypatch):
    from tests.fixtures.postgres import fresh_database

    assert CliRunner().invoke(cli, ["db", "upgrade"]).exit_code == 0
    code, checks = _doctor()
    assert code == 0 and checks["database"]["detail"].endswith(f": schema {head_revision()}, this quantselect's")
    with create_engine(normalize_url(f"sqlite:///{qs_home}/quantselect.db")).begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    code, checks = _doctor()
    assert code == 1 and checks["database"]["status"] == "fail"
    assert "schema 9999_from_the_future, which this quantselect (up to" in checks["database"]["detail"]
    with fresh_database(postgres_url) as url:
        monkeypatch.setenv("QUANTSELECT_DB_URL", url)
        code, checks = _doctor()
        assert code == 0 and checks["database"]["detail"].endswith("schema none yet, migrated to "
                                                                   f"{head_revision()} on first use (or by `quantselect db upgrade`)")
    monkeypatch.setenv("QUANTSELECT_DB_URL", "localhost:5432/db")  # not a URL: a failed line, the others checked
    code, checks = _doctor()
    assert code == 1 and checks["database"]["detail"].startswith("QUANTSELECT_DB_URL is not a database URL")
    assert checks["ray"]["status"] == "ok"
    monkeypatch.setenv("QUANTSELECT_DB_URL", "postgresql://someone:hunter2@127.0.0.1:9/nowhere")
    code, checks = _doctor()
    assert code == 1 and checks["database"]["status"] == "fail", checks["database"]
    assert checks["database"]["detail"].startswith("postgresql://someone:***@127.0.0.1:9/nowhere: cannot connect (")
    assert "hunter2" not in json.dumps(checks)


def test_a_ray_address_is_checked_and_deployments_open_to_the_network_are_warned_of(ray_cluster, monkeypatch):
    address = ray_cluster.get_runtime_context().gcs_address
    monkeypatch.setenv("QUANTSELECT_RAY_ADDRESS", address)
    code, checks = _doctor()
    assert code == 0 and checks["ray"] == {"name": "ray", "status": "ok", "detail": f"joins {address}, which answers"}
    assert checks["gpus"]["detail"].endswith("(this machine's; the cluster's nodes may differ)")
    monkeypatch.setenv("QUANTSELECT_RAY_ADDRESS", "127.0.0.1:9")
    code, checks = _doctor()
    assert code == 1 and checks["ray"]["status"] == "fail" and checks["ray"]["detail"].startswith("nothing answers at 127.0.0.1:9")
    monkeypatch.delenv("QUANTSELECT_RAY_ADDRESS")
    monkeypatch.setenv("QUANTSELECT_SERVE_HOST", "0.0.0.0")
    code, checks = _doctor()
    assert code == 0 and checks["access"]["status"] == "warn" and "set QUANTSELECT_SERVE_API_KEY" in checks["access"]["detail"]
    monkeypatch.setenv("QUANTSELECT_SERVE_API_KEY", "k" * 32)
    code, checks = _doctor()
    assert checks["access"] == {"name": "access", "status": "info",
                                "detail": "QUANTSELECT_API_TOKEN unset (on 127.0.0.1, the default, every user of this machine can "
                                          "call it: on a shared machine, set one); "
                                          "QUANTSELECT_API_PATHS unset (any file); QUANTSELECT_NOTIFY_HOSTS unset (any but "
                                          "link-local and metadata); QUANTSELECT_SERVE_API_KEY set"}
    assert "k" * 32 not in json.dumps(checks)


def test_a_dashboard_url_as_the_ray_address_fails_naming_the_variable_set(qs_home, monkeypatch):
    """Ray's docs export RAY_ADDRESS=http://HOST:8265 for `ray job submit`; every job would fail on it."""
    monkeypatch.delenv("QUANTSELECT_RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    code, checks = _doctor()
    assert code == 1 and checks["ray"] == {"name": "ray", "status": "fail", "detail": (
        "RAY_ADDRESS http://127.0.0.1:8265 is a dashboard URL, which jobs cannot join: give HOST:6379 or "
        "ray://HOST:10001, or submit to it with --address")}


def test_the_rest_api_answers_the_servers_own_checks():
    from fastapi.testclient import TestClient

    from quantselect.api.app import create_app

    with TestClient(create_app(connect_ray=False)) as client:
        res = client.get("/api/v1/doctor")
    assert res.status_code == 200
    body = res.json()
    assert body["quantselect"] == "0.1.0" and [c["name"] for c in body["checks"]][:2] == ["database", "home"]
    assert body["checks"][0]["detail"].endswith("this quantselect's")  # the server migrated it as it started
    assert body["failed"] is False


@pytest.fixture(autouse=True)
def _no_tokens(monkeypatch):
    for name in ("QUANTSELECT_API_TOKEN", "QUANTSELECT_SERVE_API_KEY", "QUANTSELECT_SERVE_HOST", "QUANTSELECT_API_PATHS",
                 "QUANTSELECT_NOTIFY_HOSTS"):
        monkeypatch.delenv(name, raising=False)
