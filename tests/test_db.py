"""Persistence on real SQLite and a real PostgreSQL (tests using ``db_url`` run on both)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text, update

from quantselect.db import Repository, current_revision, ensure_schema, make_engine, upgrade
from quantselect.db.engine import _config, head_revision, migrations_dir, normalize_url
from quantselect.db.models import Base, JobRow, utcnow
from quantselect.domain.candidates import resolve_candidates
from quantselect.domain.dataset import parse_records
from quantselect.domain.results import CandidateResult, ItemResult, JobSpec
from quantselect.errors import NotFoundError, SchemaError
from quantselect.settings import get_settings

REPO = Path(__file__).resolve().parents[1]
TABLES = {"jobs", "candidates", "item_results", "alembic_version"}


def make_spec() -> JobSpec:
    records = [
        {"prompt": "2+2=", "choices": ["3", "4"], "answer": 1, "category": "math"},
        {"prompt": "Sky colour?", "choices": ["blue", "green", "red"], "answer": 0},
        {"prompt": "Capital of France?", "choices": ["Paris", "Rome"], "answer": 0, "category": "geo"},
    ]
    return JobSpec(
        model="demo", model_path="/models/demo", dataset=parse_records(records, source="task.jsonl"),
        candidates=resolve_candidates(["bf16", "int8"]), threshold=0.97, gpu_hour_usd=3.0, deploy=True,
    )


def outcome(name: str, n: int = 3, score: float = 0.66) -> CandidateResult:
    t0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    return CandidateResult(
        name=name, config={}, status="succeeded", score=score, n_items=n, weight_bytes=5 * 2**32,
        peak_memory_bytes=7 * 2**32, quantize_seconds=1.5, eval_seconds=2.5, tokens_per_second=123.4,
        throughput_engine="hf-generate", device="cpu", node_id="node-1", gpu_ids=["0"],
        started_at=t0, finished_at=t0 + timedelta(seconds=4),
        items=[ItemResult(i, i % 2 == 0, i if i else "text", [-0.1, -2.3] if i else None, "c") for i in range(n)],
    )


@pytest.fixture
def repo(db_url):
    r = Repository.open(get_settings({"QUANTSELECT_DB_URL": db_url}))
    yield r
    r.close()


def count(repo: Repository, table: str) -> int:
    with repo.engine.connect() as conn:
        return conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()


def test_migrations_apply_from_scratch_and_down(db_url):
    assert current_revision(db_url) is None
    upgrade(db_url, "0001")  # step by step, as an existing installation upgrades
    assert current_revision(db_url) == "0001"
    upgrade(db_url)
    assert current_revision(db_url) == head_revision() == "0012"
    engine = make_engine(db_url)
    try:
        assert TABLES <= set(inspect(engine).get_table_names())
        with engine.begin() as conn:
            command.downgrade(_config(conn), "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(engine)
        assert current_revision(engine) == "0012"
    finally:
        engine.dispose()


def test_upgrading_an_old_database_keeps_its_candidates_and_item_results(db_url):
    """SQLite batch migrations rebuild tables by DROP TABLE: with foreign keys on, that cascaded."""
    upgrade(db_url, "0001")
    engine = make_engine(db_url)
    t0 = datetime(2025, 1, 1)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO jobs (id, status, model, model_path, dataset_source, dataset_kind, metric, n_items, "
                "dataset, threshold, gpu_hour_usd, deploy, created_at, updated_at) VALUES ('j1', 'succeeded', 'm', "
                "'/m', 't.jsonl', 'multiple_choice', 'accuracy', 1, '[]', 0.9, 3.0, :no, :t0, :t0)"), {"no": False, "t0": t0})
            conn.execute(text("INSERT INTO candidates (id, job_id, position, name, config, status, gpu_ids) "
                              "VALUES (1, 'j1', 0, 'baseline', '{}', 'succeeded', '[]')"))
            conn.execute(text("INSERT INTO item_results (candidate_id, item_index, correct, prediction) "
                              "VALUES (1, 0, :yes, '0')"), {"yes": True})
        upgrade(engine)
        with engine.connect() as conn:
            counts = [conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()
                      for t in ("jobs", "candidates", "item_results")]
            if conn.dialect.name == "sqlite":  # the pooled connection has its foreign keys back
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()
    assert current_revision(db_url) == head_revision()
    assert counts == [1, 1, 1]


def test_autogenerate_finds_no_drift(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_repository_round_trip(repo):
    spec = make_spec()
    job = repo.create_job(spec)
    assert len(job.id) == 12 and job.status == "queued" and job.error is None
    assert job.candidate_names == ["baseline", "bf16", "int8"]
    assert (job.model, job.model_path, job.metric, job.n_items, job.deploy) == ("demo", "/models/demo", "accuracy", 3, True)
    assert (job.dataset_source, job.dataset_kind, job.threshold, job.gpu_hour_usd) == ("task.jsonl", "multiple_choice", 0.97, 3.0)
    assert repo.get_job(job.id) == job
    assert repo.get_job_spec(job.id) == spec
    other = repo.create_job(spec)
    assert [j.id for j in repo.list_jobs()][:2] in ([other.id, job.id], [job.id, other.id])
    assert len(repo.list_jobs(limit=1)) == 1

    repo.set_job_status(job.id, "running")
    started = datetime(2025, 1, 2, 4, 0, tzinfo=timezone(timedelta(hours=1)))
    repo.mark_candidate_running(job.id, "int8", started, node_id="n2", gpu_ids=["1"])
    pending = repo.get_results(job.id)
    assert [r.status for r in pending] == ["pending", "pending", "running"]
    assert pending[2].started_at == datetime(2025, 1, 2, 3, 0) and pending[2].gpu_ids == ["1"]
    assert pending[2].config == spec.candidates[2].config.to_dict()

    for i, name in enumerate(job.candidate_names):
        repo.save_outcome(job.id, outcome(name, score=0.5 + i / 10))
    results = repo.get_results(job.id)
    assert [r.name for r in results] == job.candidate_names
    want = outcome("int8", score=0.7)
    got = results[2]
    assert got.items == [] and got.status == "succeeded" and got.weight_bytes == 5 * 2**32
    assert (got.score, got.tokens_per_second, got.node_id, got.gpu_ids) == (0.7, 123.4, "node-1", ["0"])
    assert got.started_at == want.started_at.replace(tzinfo=None) and got.finished_at.tzinfo is None

    items = repo.get_item_results(job.id)
    assert list(items) == job.candidate_names and items["bf16"] == want.items
    assert repo.get_item_results(job.id, "int8") == {"int8": want.items}

    repo.set_job_status(job.id, "failed", error="boom")
    repo.set_deployment(job.id, "int8", "http://127.0.0.1:8000/int8/v1")
    done = repo.get_job(job.id)
    assert (done.status, done.error, done.deployed_candidate) == ("failed", "boom", "int8")
    assert done.base_url.endswith("/v1") and done.updated_at >= done.created_at

    repo.delete_job(job.id)
    assert count(repo, "candidates") == 3 and count(repo, "item_results") == 0  # cascade reached the items
    repo.delete_job(other.id)
    assert count(repo, "jobs") == count(repo, "candidates") == 0


def test_save_outcome_is_idempotent(repo):
    job = repo.create_job(make_spec())
    repo.save_outcome(job.id, outcome("bf16"))
    repo.save_outcome(job.id, outcome("bf16"))
    assert count(repo, "item_results") == 3
    repo.save_outcome(job.id, outcome("bf16", n=2))  # a retry replaces, never appends
    assert count(repo, "item_results") == 2
    assert [i.index for i in repo.get_item_results(job.id, "bf16")["bf16"]] == [0, 1]
    failed = CandidateResult(name="bf16", config={}, status="failed", error="OOM")
    repo.save_outcome(job.id, failed)
    assert count(repo, "item_results") == 0
    assert repo.get_results(job.id)[1].error == "OOM"


def test_non_finite_floats_in_json_columns_are_stored_as_null(repo):
    """PostgreSQL's json refuses NaN/Infinity: one candidate's NaN logprob failed the whole job's write."""
    job = repo.create_job(make_spec())
    nan, inf = float("nan"), float("inf")
    result = outcome("bf16", n=2)
    result.items = [ItemResult(0, True, 0, [nan, -inf, -0.5], "c"), ItemResult(1, False, 1, [-1.0, -2.0], None)]
    result.early_stop = {"p": nan, "bounds": [inf, 0.25]}
    repo.save_outcome(job.id, result)
    repo.save_items(job.id, "int8", [ItemResult(0, True, 0, [inf, -1.0])])
    items = repo.get_item_results(job.id)
    assert [i.choice_logprobs for i in items["bf16"]] == [[None, None, -0.5], [-1.0, -2.0]]
    assert items["int8"][0].choice_logprobs == [None, -1.0]
    assert repo.get_results(job.id)[1].early_stop == {"p": None, "bounds": [None, 0.25]}


def test_item_counts_show_a_running_candidates_streamed_items(repo):
    """What `quantselect status` shows of a job another process runs."""
    job = repo.create_job(make_spec())
    assert repo.item_counts(job.id) == {"baseline": 0, "bf16": 0, "int8": 0}
    repo.save_items(job.id, "int8", [ItemResult(i, True, "x", None, None) for i in range(2)])
    repo.save_outcome(job.id, outcome("bf16"))
    other = repo.create_job(make_spec())
    repo.save_items(other.id, "int8", [ItemResult(0, True, "x", None, None)])
    assert repo.item_counts(job.id) == {"baseline": 0, "bf16": 3, "int8": 2}
    assert repo.item_counts(other.id)["int8"] == 1


def test_a_running_candidates_phase_is_shown_until_it_ends(repo):
    """What `status` and the REST job show of a candidate another process runs: its phase, written
    by the driver; only while the candidate runs, and gone once it ends, however it ends."""
    job = repo.create_job(make_spec())
    now = datetime.now(timezone.utc)
    for name in ("baseline", "bf16", "int8"):
        repo.mark_candidate_running(job.id, name, now)
    assert repo.set_phases(job.id, {"baseline": "measuring decode at batch 1 (2/3)", "bf16": "quantizing 3/32 layers",
                                    "int8": "evaluating 10/40 items"})
    assert {r.name: r.phase for r in repo.get_results(job.id)} == {
        "baseline": "measuring decode at batch 1 (2/3)", "bf16": "quantizing 3/32 layers", "int8": "evaluating 10/40 items"}
    repo.save_outcome(job.id, outcome("bf16"))
    repo.set_phases(job.id, {"bf16": "evaluating 40/40 items"})  # a snapshot older than its outcome
    assert repo.finish_job(job.id, "failed") == "failed"  # the rest were stopped with it
    assert {r.name: (r.status, r.phase) for r in repo.get_results(job.id)} == {
        "baseline": ("cancelled", None), "bf16": ("succeeded", None), "int8": ("cancelled", None)}


def test_a_cancel_asked_for_as_the_last_candidate_finishes_ends_the_job_cancelled(repo):
    """The driver checks for a cancel between candidates; one that lands after its last check must
    still win over "succeeded" (and so keep the job from being deployed)."""
    job = repo.create_job(make_spec())
    repo.claim_job(job.id, driver="driver-1", stale_after=60)
    repo.heartbeat(job.id)
    for name in ("bf16", "int8"):
        repo.save_outcome(job.id, outcome(name))
    asked = repo.request_cancel(job.id, stale_after=60)  # the driver is alive: only asked
    assert asked.status == "running"
    assert repo.finish_job(job.id, "succeeded") == "cancelled"
    done = repo.get_job(job.id)
    assert done.status == "cancelled" and "after its last candidate" in done.error
    statuses = {r.name: r.status for r in repo.get_results(job.id)}
    assert statuses.pop("bf16") == statuses.pop("int8") == "succeeded"  # finished results are kept
    assert set(statuses.values()) == {"cancelled"}  # the rest (the baseline here) never ran
    other = repo.create_job(make_spec())
    repo.claim_job(other.id, driver="driver-2", stale_after=60)
    assert repo.finish_job(other.id, "succeeded") == "succeeded"


def test_a_cancel_with_a_reason_ends_the_job_with_it_and_shows_no_error_meanwhile(repo):
    """A cancel asked for with a reason (the API server that runs the job stops) is the job's error
    once its driver ends it, not before (a running job shows none); a cancel asked for first, by a
    user, keeps its own; a job cancelled on the spot (its driver silent) keeps the reason when its
    driver still ends it; a resume forgets it."""
    reason = "interrupted: the API server that ran it stopped"
    job = repo.create_job(make_spec())
    repo.claim_job(job.id, driver="driver-1", stale_after=60)
    repo.heartbeat(job.id)
    asked = repo.request_cancel(job.id, stale_after=60, reason=reason)
    assert (asked.status, asked.error) == ("running", None) and repo.get_job(job.id).error is None
    assert repo.finish_job(job.id, "cancelled", error="cancelled by request") == "cancelled"
    assert repo.get_job(job.id).error == reason
    repo.claim_job(job.id, driver="driver-1", stale_after=60, resume=True)
    repo.heartbeat(job.id)
    repo.finish_job(job.id, "succeeded")
    assert repo.get_job(job.id).status == "succeeded"  # the old reason did not turn it into a cancel
    by_user = repo.create_job(make_spec())
    repo.claim_job(by_user.id, driver="driver-1", stale_after=60)
    repo.heartbeat(by_user.id)
    repo.request_cancel(by_user.id, stale_after=60)
    repo.request_cancel(by_user.id, stale_after=60, reason=reason)  # the server stops meanwhile
    repo.finish_job(by_user.id, "cancelled", error="cancelled by request")
    assert repo.get_job(by_user.id).error == "cancelled by request"
    silent = repo.create_job(make_spec())
    repo.claim_job(silent.id, driver="driver-1", stale_after=60)
    gone = repo.request_cancel(silent.id, stale_after=0, reason=reason)  # its driver taken for gone: cancelled now
    assert (gone.status, gone.error) == ("cancelled", reason)
    repo.finish_job(silent.id, "cancelled", error="cancelled by request")  # its driver, still ending it
    assert repo.get_job(silent.id).error == reason


def test_a_cancel_of_a_job_claimed_and_waiting_for_its_driver_stands(repo):
    """An API server claims a job it resumes, then runs it when a slot frees, claiming it again: a
    cancel asked for in between (its driver alive: only asked) ends the job then, with its reason.
    Before, that second claim cleared it and the job ran. A later resume by the user still runs it."""
    from quantselect.errors import ConflictError

    job = repo.create_job(make_spec())
    repo.claim_job(job.id, driver="server:1", stale_after=60, resume=True)
    repo.save_outcome(job.id, outcome("bf16"))
    assert repo.request_cancel(job.id, stale_after=60, reason="no longer needed").status == "running"
    with pytest.raises(ConflictError, match=f"job {job.id} was cancelled before it ran again"):
        repo.claim_job(job.id, driver="server:1", stale_after=60, resume=True)
    done = repo.get_job(job.id)
    assert (done.status, done.error) == ("cancelled", "no longer needed")
    assert {r.name: r.status for r in repo.get_results(job.id)} == {
        "baseline": "cancelled", "bf16": "succeeded", "int8": "cancelled"}
    assert repo.claim_job(job.id, driver="server:1", stale_after=60, resume=True).status == "running"


def test_jobs_an_api_server_queued_are_held_while_it_lives_and_taken_up_when_it_is_gone(repo):
    """The queue of the API server lives in the database: a job it queued is held (no other server
    takes it, no other driver runs it); one whose server stopped (released) or died (silent past the
    limit) is taken up by the next server, once, oldest first; a job queued for a driver elsewhere
    (`submit --address`: no server holds it) never is."""
    from quantselect.errors import ConflictError

    held, released, dead, remote = (repo.create_job(make_spec()).id for _ in range(4))
    repo.hold_waiting([held], "alive:1")
    repo.hold_waiting([released], "stopped:2")
    repo.release_queued([released], "stopped:2")
    repo.hold_waiting([dead], "killed:3")
    with repo._write.begin() as s:
        s.execute(update(JobRow).where(JobRow.id == dead).values(heartbeat_at=utcnow() - timedelta(seconds=90)))
    with pytest.raises(ConflictError, match=f"job {held} is queued in the API server alive:1"):
        repo.claim_job(held, driver="cli:9", stale_after=60)
    assert sorted(repo.adopt_queued("next:4", stale_after=60)) == sorted([released, dead])
    assert repo.adopt_queued("other:5", stale_after=60) == []  # held now by next:4
    assert {j: repo.get_job(j).driver for j in (held, released, dead, remote)} == {
        held: "alive:1", released: "next:4", dead: "next:4", remote: None}
    assert repo.claim_job(dead, driver="next:4", stale_after=60).status == "running"  # its new server runs it
    assert repo.claim_job(remote, driver="cluster:7", stale_after=60).status == "running"


def test_a_job_whose_ray_driver_ended_is_failed_only_while_nobody_claimed_it(repo):
    """`submit --address` stores the Ray job driving the job; `status` fails the job when that Ray job
    ended, but only if the job is still queued under that very submission: a driver that claimed it
    meanwhile, or a later resume's submission, leaves it as it is."""
    queued, claimed = (repo.create_job(make_spec()).id for _ in range(2))
    assert repo.ray_submission(queued) is None
    for job_id in (queued, claimed):
        repo.set_ray_submission(job_id, "http://head:8265", f"quantselect-{job_id}")
    assert repo.ray_submission(queued) == ("http://head:8265", f"quantselect-{queued}")
    repo.claim_job(claimed, driver="cluster:1", stale_after=60)
    assert not repo.fail_unclaimed(claimed, f"quantselect-{claimed}", "its driver ended")
    assert repo.get_job(claimed).status == "running"
    assert not repo.fail_unclaimed(queued, "quantselect-an-older-one", "its driver ended")
    assert repo.fail_unclaimed(queued, f"quantselect-{queued}", "its driver ended")
    job = repo.get_job(queued)
    assert (job.status, job.error) == ("failed", "its driver ended")
    assert not repo.fail_unclaimed(queued, f"quantselect-{queued}", "again")  # once


def test_jobs_are_paged_by_the_last_one_seen_while_new_ones_arrive(repo):
    """`before`: the jobs after that one, newest first (created_at, then id): a job submitted while a
    client pages neither shifts the pages (as an offset would) nor shows up twice; ties in created_at
    are broken by id; an unknown cursor is a one-line error."""
    from quantselect.errors import InputError

    ids = [repo.create_job(make_spec()).id for _ in range(5)]
    with repo._write.begin() as s:  # two created at the same instant, the oldest
        s.execute(update(JobRow).where(JobRow.id.in_(ids[1:3])).values(created_at=datetime(2020, 1, 1)))
    order = [j.id for j in repo.list_jobs()]
    assert set(order) == set(ids) and order[-2:] == sorted(ids[1:3])
    first = [j.id for j in repo.list_jobs(2)]
    repo.create_job(make_spec())  # arrives while paging
    second = [j.id for j in repo.list_jobs(2, before=first[-1])]
    third = [j.id for j in repo.list_jobs(2, before=second[-1])]
    assert first + second + third == order
    assert repo.list_jobs(2, before=order[-1]) == []
    repo.finish_job(order[2], "failed")
    assert [j.id for j in repo.list_jobs(None, ("queued",), before=order[0])] == order[1:2] + order[3:]
    with pytest.raises(InputError, match=r"^before='nope': no such job"):
        repo.list_jobs(2, before="nope")


def test_item_results_are_paged_per_candidate(repo):
    job = repo.create_job(make_spec())
    repo.save_outcome(job.id, outcome("bf16", n=5))
    repo.save_outcome(job.id, outcome("int8", n=3))
    page = repo.get_item_results(job.id, offset=2, limit=2)
    assert {n: [i.index for i in items] for n, items in page.items()} == {"baseline": [], "bf16": [2, 3], "int8": [2]}
    assert [i.index for i in repo.get_item_results(job.id, "bf16", offset=4)["bf16"]] == [4]
    assert [i.index for i in repo.get_item_results(job.id)["bf16"]] == [0, 1, 2, 3, 4]


@pytest.mark.postgres
def test_heartbeats_are_written_and_judged_by_the_database_clock(postgres_url, monkeypatch):
    """Drivers and API servers on a cluster run on machines whose clocks drift apart. A heartbeat
    written by a machine whose clock is 10 minutes slow is still fresh to one whose clock is right:
    its queue is not taken up, its job not run twice, not cancelled as if no driver ran it, and
    `status` does not call it silent."""
    import quantselect.db.repository as repository
    from quantselect.errors import ConflictError
    from quantselect.service import Service
    from tests.fixtures.postgres import fresh_database

    with fresh_database(postgres_url) as url:
        repo = Repository.open(get_settings({"QUANTSELECT_DB_URL": url}))
        queued, running = (repo.create_job(make_spec()).id for _ in range(2))
        with monkeypatch.context() as slow:
            slow.setattr(repository, "utcnow", lambda: utcnow() - timedelta(minutes=10))
            repo.hold_waiting([queued], "slow-clock:1")
            repo.claim_job(running, driver="slow-clock:2", stale_after=60)
            repo.heartbeat(running)
        assert repo.adopt_queued("right-clock:3", stale_after=60) == []
        with pytest.raises(ConflictError, match=f"job {running} is running in slow-clock:2"):
            repo.claim_job(running, driver="right-clock:4", stale_after=60, resume=True)
        assert repo.request_cancel(running, stale_after=60).status == "running"  # its driver stops it
        monkeypatch.setenv("QUANTSELECT_DB_URL", url)
        assert Service().driver_silent_for(repo.get_job(running)) is None
        assert abs(repo.now() - utcnow()) < timedelta(seconds=60)  # naive UTC, as every timestamp here
        repo.close()


def test_unknown_ids_raise_not_found(repo):
    with pytest.raises(NotFoundError, match="job 'nope' not found"):
        repo.get_job("nope")
    for call in (repo.get_job_spec, repo.get_results, repo.get_item_results, repo.delete_job):
        with pytest.raises(NotFoundError):
            call("nope")
    with pytest.raises(NotFoundError):
        repo.set_job_status("nope", "running")
    job = repo.create_job(make_spec())
    with pytest.raises(NotFoundError, match="no candidate 'int3'"):
        repo.save_outcome(job.id, outcome("int3"))
    with pytest.raises(NotFoundError):
        repo.set_deployment(job.id, "int3", "http://x")
    with pytest.raises(NotFoundError):
        repo.get_item_results(job.id, "int3")


def test_unknown_revision_is_a_schema_error(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'f00dcafe'"))
        with pytest.raises(SchemaError) as err:
            ensure_schema(engine)
    finally:
        engine.dispose()
    msg = str(err.value)
    assert "\n" not in msg and "f00dcafe" in msg and "quantselect db upgrade" in msg


def test_first_use_migrates_once_under_concurrency(db_url):
    def open_and_close(_):
        Repository.open(get_settings({"QUANTSELECT_DB_URL": db_url})).close()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(open_and_close, range(4)))
    assert current_revision(db_url) == head_revision()


def test_sqlite_engine_settings(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'a' / 'b' / 'x.db'}")
    try:
        with engine.connect() as conn:
            pragmas = [conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("journal_mode", "busy_timeout", "foreign_keys")]
    finally:
        engine.dispose()
    assert pragmas == ["wal", 30000, 1]
    assert normalize_url("postgresql://u@h/db") == normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert make_engine("postgresql://u@h/db").dialect.driver == "psycopg"


def test_wheel_ships_the_migrations(tmp_path):
    assert migrations_dir() == REPO / "migrations"
    try:
        import hatchling  # noqa: F401

        no_isolation = ["--no-build-isolation"]
    except ImportError:
        no_isolation = []  # pip fetches hatchling into an isolated build environment
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *no_isolation, "-q", "-w", str(tmp_path), str(REPO)],
        check=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("quantselect-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"quantselect/_migrations/env.py", "quantselect/_migrations/versions/0001_initial.py",
            "quantselect/_migrations/versions/0002_statistics.py",
            "quantselect/_migrations/script.py.mako", "quantselect/db/engine.py"} <= names
    # Installed from the wheel (no checkout beside the package), the code migrates from _migrations.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    url = f"sqlite:///{tmp_path / 'w.db'}"
    probe = f"from quantselect.db.engine import *; upgrade({url!r}); print(migrations_dir(), current_revision({url!r}))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(site / "quantselect" / "_migrations"), "0012"]


def test_candidate_uses_name_artifacts_cache_keys_and_the_served_candidate(repo):
    """What `cache prune` asks the database: which job points at which artifact, and which one it serves."""
    job = repo.create_job(make_spec(), cache_keys={"baseline": "k-base", "int8": "k-int8"})
    repo.save_outcome(job.id, CandidateResult(name="int8", config={}, status="succeeded", artifact_path="/a/int8-x"))
    repo.set_deployment(job.id, "int8", "http://127.0.0.1:8000/x")
    uses = {u.candidate: u for u in repo.candidate_uses()}
    assert uses["int8"].artifact_path == "/a/int8-x" and uses["int8"].served and uses["int8"].job_status == "queued"
    assert uses["baseline"].cache_key == "k-base" and not uses["baseline"].served
    assert uses["int8"].job_created_at == job.created_at
    repo.set_deployment(job.id, None, None)
    assert not any(u.served for u in repo.candidate_uses())


def test_has_password_finds_it_in_the_userinfo_and_the_query():
    from quantselect.db.engine import has_password

    assert has_password("postgresql://quantselect:s3cret@db.example.com:5432/quantselect")
    assert has_password("postgresql://quantselect@db.example.com/quantselect?password=s3cret&sslmode=require")
    for url in ("postgresql://quantselect@db.example.com/quantselect", "sqlite:////tmp/q.db", "not a url"):
        assert not has_password(url)


def test_a_database_url_that_is_not_one_or_does_not_answer_is_one_line_naming_the_variable():
    """Not an internal error with a driver's traceback text; the password is never shown."""
    from quantselect.errors import InputError, QuantselectError

    with pytest.raises(QuantselectError, match=r"^cannot reach the database at postgresql://u:\*\*\*@127\.0\.0\.1:1/x "
                                               r"\(QUANTSELECT_DB_URL\): connection failed") as e:
        Repository.open(get_settings({"QUANTSELECT_DB_URL": "postgresql://u:s3cret@127.0.0.1:1/x"}))
    assert "s3cret" not in str(e.value) and "\n" not in str(e.value)
    for url in ("postgresql://u@h:54x2/db", "nonsense"):
        with pytest.raises(InputError, match=r"^QUANTSELECT_DB_URL is not a database URL SQLAlchemy reads"):
            Repository.open(get_settings({"QUANTSELECT_DB_URL": url}))
