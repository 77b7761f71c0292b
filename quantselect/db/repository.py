"""The repository: domain objects in, domain objects out. Every write is one short transaction."""

from __future__ import annotations

import functools
import logging
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from sqlalchemy import Engine, and_, delete, false, func, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, load_only, selectinload, sessionmaker, undefer

from quantselect.db.engine import ensure_schema, make_engine, shown_url, writer
from quantselect.db.models import CandidateRow, ItemResultRow, JobRow, utcnow
from quantselect.domain.cache import CandidateUse
from quantselect.domain.candidates import BASELINE, Candidate
from quantselect.domain.dataset import TaskDataset
from quantselect.domain.results import (
    CANCELLED, CANCELLED_ALONE, FAILED, FINISHED, JOB_STATUSES, PENDING, QUEUED, RUNNING, SUCCEEDED, Calibration,
    CandidateResult, ItemResult, Job, JobSpec, cancelled_alone,
)
from quantselect.errors import CancelledWhileWaiting, ConflictError, InputError, NotFoundError, QuantselectError

if TYPE_CHECKING:
    from quantselect.settings import Settings

CANDIDATE_STATUSES = (PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED)
_MEASUREMENTS = (
    "status", "error", "score", "n_items", "weight_bytes", "peak_memory_bytes", "quantize_seconds",
    "eval_seconds", "tokens_per_second", "throughput_engine", "device", "node_id", "n_truncated", "early_stop",
    "prefill_tokens_per_second", "decode_tokens_per_second_b16", "disk_bytes", "artifact_path", "artifact_reused",
    "attempts", "reused_from", "items_carried", "phase",
)
DEFAULT_RETRY_SECONDS = 120.0  # how long a write waits for an unreachable database before giving up

log = logging.getLogger(__name__)
T = TypeVar("T")


def _retrying(fn: Callable[..., T]) -> Callable[..., T]:
    """Retry one short transaction while the database is unreachable (a restart, a network blip,
    a locked SQLite file), with backoff, for up to ``retry_seconds``. Every write is idempotent
    (replace-as-a-whole or insert-if-missing), so a commit whose answer was lost is safe to repeat."""

    @functools.wraps(fn)
    def wrapper(self: "Repository", *args: Any, **kwargs: Any) -> T:
        deadline, delay = time.monotonic() + self.retry_seconds, 0.2
        while True:
            try:
                return fn(self, *args, **kwargs)
            except (OperationalError, DBAPIError) as e:
                transient = isinstance(e, OperationalError) or e.connection_invalidated
                if not transient or time.monotonic() + delay > deadline:
                    raise
                log.warning("database unreachable (%s); retrying in %.1fs", " ".join(str(e.orig).split())[:120], delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    return wrapper


def _naive_utc(dt: datetime | None) -> datetime | None:
    return dt.astimezone(timezone.utc).replace(tzinfo=None) if dt is not None and dt.tzinfo else dt


class Repository:
    def __init__(self, engine: Engine, retry_seconds: float = DEFAULT_RETRY_SECONDS) -> None:
        self.engine = engine
        self.retry_seconds = retry_seconds
        self._read = sessionmaker(engine, expire_on_commit=False)
        self._write = sessionmaker(writer(engine), expire_on_commit=False)

    @classmethod
    def open(cls, settings: "Settings") -> "Repository":
        """The repository of QUANTSELECT_DB_URL, its schema migrated; a URL that is not one, or a
        database that does not answer, is a one-line error naming the variable (no password shown)."""
        from sqlalchemy.exc import ArgumentError

        try:
            engine = make_engine(settings.db_url)
        except (ArgumentError, ValueError) as e:
            raise InputError(f"QUANTSELECT_DB_URL is not a database URL SQLAlchemy reads ({e}); e.g. "
                             "postgresql://user:password@host:5432/db or sqlite:////path/to/file.db") from None
        try:
            ensure_schema(engine)
        except OperationalError as e:
            engine.dispose()
            why = " ".join(str(e.orig or e).split())[:300]
            raise QuantselectError(f"cannot reach the database at {shown_url(settings.db_url)} (QUANTSELECT_DB_URL): "
                                   f"{why}") from None
        return cls(engine, settings.db_retry_seconds)

    def close(self) -> None:
        self.engine.dispose()

    def now(self) -> datetime:
        """The clock heartbeats are written and judged by (``_clock``), read on its own."""
        with self._read() as s:
            return self._clock(s)

    def _clock(self, s: Session) -> datetime:
        """The database's clock, naive UTC: every process that writes a heartbeat or judges one reads
        the same clock, so drivers and API servers on machines whose clocks drift apart (a cluster)
        never take a live one for dead. A SQLite file is this machine's, and so is its clock."""
        if self.engine.dialect.name == "postgresql":
            return s.scalar(select(func.timezone("UTC", func.statement_timestamp())))
        return utcnow()

    # ---- jobs
    def create_job(self, spec: JobSpec, cache_keys: dict[str, str] | None = None) -> Job:
        ds = spec.dataset
        keys = cache_keys or {}
        row = JobRow(
            id=uuid.uuid4().hex[:12], status=QUEUED, model=spec.model, model_path=spec.model_path,
            dataset_source=ds.source, dataset_kind=ds.kind, metric=ds.metric, n_items=len(ds),
            dataset=ds.to_dict(), threshold=spec.threshold, gpu_hour_usd=spec.gpu_hour_usd, deploy=spec.deploy,
            confidence=spec.confidence, policy=spec.policy, early_stop=spec.early_stop,
            target_gpu=spec.target_gpu, calibration=spec.calibration.to_dict() if spec.calibration else None,
            use_cache=spec.use_cache, candidate_timeout=spec.candidate_timeout, notify=spec.notify,
            candidates=[
                CandidateRow(position=i, name=c.name, config=c.config.to_dict(), status=PENDING, gpu_ids=[],
                             cache_key=keys.get(c.name))
                for i, c in enumerate(spec.candidates)
            ],
        )
        with self._write.begin() as s:
            s.add(row)
            s.flush()
            return _job(row)

    def get_job(self, job_id: str) -> Job:
        with self._read() as s:
            return _job(self._job_row(s, job_id, _names()))

    def list_jobs(self, limit: int | None = None, statuses: tuple[str, ...] = (),
                  before: str | None = None) -> list[Job]:
        """Newest first (created_at, then id). ``before``: only the jobs after that one in this order,
        the next page after a page that ended with it (a cursor: jobs submitted meanwhile do not shift
        the pages, as an offset would)."""
        q = select(JobRow).options(_names()).order_by(JobRow.created_at.desc(), JobRow.id).limit(limit)
        if statuses:
            q = q.where(JobRow.status.in_(statuses))
        with self._read() as s:
            if before is not None:
                at = s.scalar(select(JobRow.created_at).where(JobRow.id == before))
                if at is None:
                    raise InputError(f"before={before!r}: no such job (deleted meanwhile?); give the id of the last "
                                     "job of the page before")
                q = q.where(or_(JobRow.created_at < at, and_(JobRow.created_at == at, JobRow.id > before)))
            return [_job(r) for r in s.scalars(q)]

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """How many jobs, and how many candidates, are in each status (every status named, 0 included)."""
        with self._read() as s:
            jobs = dict(s.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).all())
            candidates = dict(s.execute(select(CandidateRow.status, func.count()).group_by(CandidateRow.status)).all())
        return ({status: jobs.get(status, 0) for status in JOB_STATUSES},
                {status: candidates.get(status, 0) for status in CANDIDATE_STATUSES})

    def get_job_spec(self, job_id: str) -> JobSpec:
        with self._read() as s:
            row = self._job_row(s, job_id, undefer(JobRow.dataset), undefer(JobRow.calibration),
                                selectinload(JobRow.candidates))
            return JobSpec(
                model=row.model, model_path=row.model_path, dataset=TaskDataset.from_dict(row.dataset),
                candidates=[Candidate.from_dict({"name": c.name, "config": c.config}) for c in row.candidates],
                threshold=row.threshold, gpu_hour_usd=row.gpu_hour_usd, deploy=row.deploy,
                confidence=row.confidence, policy=row.policy, early_stop=row.early_stop,
                target_gpu=row.target_gpu,
                calibration=Calibration.from_dict(row.calibration) if row.calibration else None,
                use_cache=row.use_cache, candidate_timeout=row.candidate_timeout, notify=row.notify,
            )

    @_retrying
    def set_cache_keys(self, job_id: str, keys: dict[str, str]) -> None:
        with self._write.begin() as s:
            for c in self._job_row(s, job_id, selectinload(JobRow.candidates)).candidates:
                c.cache_key = keys.get(c.name)

    def set_model_config(self, job_id: str, config: dict[str, Any]) -> None:
        with self._write.begin() as s:
            self._job_row(s, job_id).model_config = config

    @_retrying
    def set_job_stage(self, job_id: str, stage: str | None) -> None:
        """What the job's driver is doing now; cleared when the job finishes (``finish_job``)."""
        with self._write.begin() as s:
            self._job_row(s, job_id).stage = stage

    @_retrying
    def set_ray_submission(self, job_id: str, address: str, submission_id: str) -> None:
        """The Ray job submitted to drive the job (`submit --address`, `resume --address`)."""
        with self._write.begin() as s:
            row = self._job_row(s, job_id)
            row.ray_address, row.ray_submission = address, submission_id

    def ray_submission(self, job_id: str) -> tuple[str, str] | None:
        """(the cluster's dashboard address, the submission id) of the Ray job last submitted to drive it."""
        with self._read() as s:
            found = s.execute(select(JobRow.ray_address, JobRow.ray_submission).where(JobRow.id == job_id)).first()
            if found is None:
                raise NotFoundError(f"job {job_id!r} not found")
            return (found[0], found[1]) if found[1] else None

    @_retrying
    def fail_unclaimed(self, job_id: str, submission_id: str, error: str) -> bool:
        """Fail a job whose Ray driver ``submission_id`` ended: only while it is still queued under that
        submission, checked in the update itself, so that a driver that claimed it (or a later resume's
        submission) is never failed by it. Whether it was."""
        with self._write.begin() as s:
            done = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == QUEUED,
                                                  JobRow.ray_submission == submission_id)
                             .values(status=FAILED, error=error, updated_at=utcnow()))
            return done.rowcount == 1

    @_retrying
    def set_deploy_error(self, job_id: str, error: str | None) -> None:
        """Why the deployment the job asked for (``--deploy``) did not happen; None: it did."""
        with self._write.begin() as s:
            row = self._job_row(s, job_id)
            row.deploy_error, row.updated_at = error, utcnow()

    @_retrying
    def set_candidate_configs(self, job_id: str, configs: dict[str, dict[str, Any]]) -> None:
        """Candidates' configs as the driver resolved them (a Hub checkpoint's snapshot path)."""
        with self._write.begin() as s:
            for c in self._job_row(s, job_id, selectinload(JobRow.candidates)).candidates:
                if c.name in configs:
                    c.config = configs[c.name]

    @_retrying
    def set_model_path(self, job_id: str, path: str) -> None:
        """Where the driver found the model (a Hub id's snapshot, downloaded on the cluster)."""
        with self._write.begin() as s:
            self._job_row(s, job_id).model_path = path

    @_retrying
    def set_job_status(self, job_id: str, status: str, error: str | None = None) -> None:
        if status not in JOB_STATUSES:
            raise ValueError(f"job status {status!r} is not one of {JOB_STATUSES}")
        with self._write.begin() as s:
            row = self._job_row(s, job_id)
            row.status, row.error, row.updated_at = status, error, utcnow()

    @_retrying
    def set_deployment(self, job_id: str, candidate: str | None, base_url: str | None) -> None:
        """The job's served candidate and its URL; None, None: it is served no more."""
        with self._write.begin() as s:
            if candidate is not None:
                self._candidate_row(s, job_id, candidate)
            row = self._job_row(s, job_id)
            row.deployed_candidate, row.base_url, row.updated_at = candidate, base_url, utcnow()
            if candidate is not None:  # served now: an earlier failed (or abandoned) deployment is over
                row.deploy_error = row.stage = None

    def delete_job(self, job_id: str) -> None:
        with self._write.begin() as s:
            if s.execute(delete(JobRow).where(JobRow.id == job_id)).rowcount == 0:
                raise NotFoundError(f"job {job_id!r} not found")

    # ---- the driver: claim, heartbeat, cancel
    @_retrying
    def claim_job(self, job_id: str, driver: str, stale_after: float, resume: bool = False) -> Job:
        """Make ``driver`` the one process running the job. Refused while another driver's heartbeat
        is fresher than ``stale_after`` seconds and for a succeeded job; a failed or cancelled job only
        when resuming. A job this driver claimed already (an API server's resume, waiting for a slot)
        whose cancel was asked for meanwhile ends cancelled here, refused."""
        with self._write.begin() as s:
            row = self._job_row(s, job_id, _names(), lock=True)
            if row.status == SUCCEEDED or (row.status in FINISHED and not resume):
                hint = "" if row.status == SUCCEEDED else f" (`quantselect resume {job_id}` continues it)"
                raise ConflictError(f"job {job_id} is {row.status}; nothing to run{hint}")
            if row.cancel_requested and not resume:
                raise ConflictError(f"job {job_id} is being cancelled")
            now = self._clock(s)
            fresh = row.heartbeat_at is not None and now - row.heartbeat_at < timedelta(seconds=stale_after)
            cancelled = row.cancel_requested and row.status == RUNNING and row.driver == driver and fresh
            if cancelled:  # claimed by this live driver already (resumed, waiting for a slot), so request_cancel
                # left the cancel to it: the cancel stands (before, this claim cleared it and the job ran anyway)
                row.status, row.error, row.updated_at = CANCELLED, row.cancel_reason or "cancelled by request", utcnow()
                self._cancel_unfinished(s, job_id)
            if row.status == QUEUED and fresh and row.driver != driver:
                raise ConflictError(f"job {job_id} is queued in the API server {row.driver}, which starts it when one "
                                    "of its QUANTSELECT_API_MAX_JOBS slots frees; cancel it first to run it elsewhere")
            if row.status == RUNNING and fresh and row.driver != driver:
                raise ConflictError(f"job {job_id} is running in {row.driver} (heartbeat {row.heartbeat_at:%H:%M:%S} UTC); "
                                    "cancel it first, or wait until that driver is gone")
            if not cancelled:
                row.status, row.error, row.driver, row.cancel_requested, row.cancel_reason = RUNNING, None, driver, False, None
                row.heartbeat_at, row.updated_at = now, utcnow()
                return _job(row)
        raise CancelledWhileWaiting(f"job {job_id} was cancelled before it ran again")  # once that is committed

    def hold_waiting(self, job_ids: list[str], server: str) -> None:
        """The API server ``server`` (host:pid) holds the jobs it has queued but not started yet (and
        those it resumed, claimed, waiting for a slot): its sign of life for them, so that no other
        server takes them up (``adopt_queued``) and no other driver runs them (``claim_job``)."""
        if not job_ids:
            return
        with self._write.begin() as s:
            now = self._clock(s)
            s.execute(update(JobRow).where(JobRow.id.in_(job_ids), JobRow.status == QUEUED)
                      .values(driver=server, heartbeat_at=now))
            s.execute(update(JobRow).where(JobRow.id.in_(job_ids), JobRow.status == RUNNING, JobRow.driver == server)
                      .values(heartbeat_at=now))

    def release_queued(self, job_ids: list[str], server: str) -> None:
        """The API server stops: the jobs it had queued stay queued, free for the next server to take up
        at once (``adopt_queued``) rather than after the staleness limit."""
        if not job_ids:
            return
        with self._write.begin() as s:
            s.execute(update(JobRow).where(JobRow.id.in_(job_ids), JobRow.status == QUEUED, JobRow.driver == server)
                      .values(heartbeat_at=None))

    def adopt_queued(self, server: str, stale_after: float) -> list[str]:
        """Jobs an API server queued and never started, left behind when it stopped (released) or died
        (silent longer than ``stale_after`` seconds): now held by ``server``, oldest first, for it to
        run. Jobs queued by a live server, and those submitted for a driver elsewhere (``submit
        --address``, queued by no server), are not taken."""
        def left(now: datetime) -> tuple:
            return (JobRow.status == QUEUED, JobRow.driver.is_not(None),
                    or_(JobRow.heartbeat_at.is_(None), JobRow.heartbeat_at < now - timedelta(seconds=stale_after)))

        with self._read() as s:  # every server asks every few seconds: no write (lock) when nothing is left
            if s.scalar(select(JobRow.id).where(*left(self._clock(s))).limit(1)) is None:
                return []
        with self._write.begin() as s:
            now = self._clock(s)
            rows = s.scalars(select(JobRow).where(*left(now)).order_by(JobRow.created_at, JobRow.id)
                             .with_for_update(skip_locked=True)).all()
            for row in rows:
                row.driver, row.heartbeat_at = server, now
            return [row.id for row in rows]

    def heartbeat(self, job_id: str) -> tuple[bool, frozenset[str]] | None:
        """The driver's sign of life; answers whether the job was asked to cancel, and which of its
        candidates were cancelled on their own (None: the database did not answer, which is not a
        reason to stop)."""
        try:
            with self._write.begin() as s:
                s.execute(update(JobRow).where(JobRow.id == job_id).values(heartbeat_at=self._clock(s)))
                cancel = bool(s.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id)))
                dropped = s.scalars(select(CandidateRow.name).where(
                    CandidateRow.job_id == job_id, CandidateRow.status == CANCELLED, CandidateRow.error == CANCELLED_ALONE))
                return cancel, frozenset(dropped)
        except (OperationalError, DBAPIError):
            return None

    @_retrying
    def cancel_candidate(self, job_id: str, name: str) -> CandidateResult:
        """Cancel one candidate of a queued or running job, which goes on without it: marked here;
        the job's driver stops its worker within seconds (or never starts it)."""
        with self._write.begin() as s:
            job = self._job_row(s, job_id, lock=True)
            c = self._candidate_row(s, job_id, name)
            if job.status not in (QUEUED, RUNNING):
                raise ConflictError(f"job {job_id} is {job.status}: it runs no candidate to cancel")
            if c.name == BASELINE:
                raise ConflictError(f"{name} is the baseline, which every other candidate is compared with; "
                                    f"`quantselect cancel {job_id}` cancels the whole job")
            if c.status not in (PENDING, RUNNING):
                raise ConflictError(f"candidate {name} of job {job_id} is already {c.status}")
            c.status, c.error, c.finished_at = CANCELLED, CANCELLED_ALONE, utcnow()
            job.updated_at = utcnow()
            return _result(c)

    @_retrying
    def request_cancel(self, job_id: str, stale_after: float, reason: str | None = None) -> Job:
        """Ask the job's driver to stop it. A job no driver is running (queued, or its driver's
        heartbeat is stale) is cancelled here and now. ``reason``: the error the job ends with
        (else "cancelled by request"), unless a cancel was asked for already."""
        with self._write.begin() as s:
            row = self._job_row(s, job_id, _names(), lock=True)
            if row.status in FINISHED:
                raise ConflictError(f"job {job_id} is already {row.status}")
            if not row.cancel_requested:
                row.cancel_reason = reason
            row.cancel_requested, row.updated_at = True, utcnow()
            alive = row.status == RUNNING and row.heartbeat_at is not None and \
                self._clock(s) - row.heartbeat_at < timedelta(seconds=stale_after)
            if not alive:
                row.status, row.error = CANCELLED, row.cancel_reason or (
                    "cancelled before it ran" if row.status == QUEUED else "cancelled")
                self._cancel_unfinished(s, job_id)
            return _job(row)

    @_retrying
    def delete_finished_job(self, job_id: str) -> Job:
        """``delete_job`` for a user: only a finished job that serves nothing (checked and removed
        in one transaction); refused, and nothing removed, otherwise."""
        with self._write.begin() as s:
            row = self._job_row(s, job_id, _names(), lock=True)
            if row.status not in FINISHED:
                raise ConflictError(f"job {job_id} is {row.status}: cancel it first (quantselect cancel {job_id})")
            if row.deployed_candidate:
                raise ConflictError(f"job {job_id} serves {row.deployed_candidate}: stop it first "
                                    f"(quantselect undeploy {job_id})")
            job = _job(row)
            s.execute(delete(JobRow).where(JobRow.id == job_id))
            return job

    @_retrying
    def finish_job(self, job_id: str, status: str, error: str | None = None, stage: str | None = None,
                   recommended: dict[str, Any] | None = None) -> str:
        """The job's end: its status, and every candidate still unfinished marked cancelled. A job
        whose cancel was asked for after the driver last looked ends cancelled, not succeeded (its
        results stay; ``resume`` finishes it), and one cancelled with a reason ends with it as its
        error. ``stage``: what a succeeded job still does (deploying); ``recommended``: its answer.
        Returns the status written."""
        with self._write.begin() as s:
            row = self._job_row(s, job_id, lock=True)  # against a cancel request landing in between
            if status == SUCCEEDED and row.cancel_requested:
                status, error = CANCELLED, row.cancel_reason or "cancelled by request (after its last candidate had finished)"
            elif status == CANCELLED and row.cancel_requested and row.cancel_reason:
                error = row.cancel_reason  # why the cancel was asked for
            row.status, row.error, row.updated_at = status, error, utcnow()
            row.stage = stage if status == SUCCEEDED else None
            row.recommended = recommended if status == SUCCEEDED else None
            if status == CANCELLED:
                self._cancel_unfinished(s, job_id)
            elif status == FAILED:  # their workers were stopped with the sweep; those never started stay pending
                s.execute(update(CandidateRow).where(CandidateRow.job_id == job_id, CandidateRow.status == RUNNING)
                          .values(status=CANCELLED, error="stopped: the job failed", finished_at=utcnow(), phase=None))
            return status

    @staticmethod
    def _cancel_unfinished(s: Session, job_id: str) -> None:
        s.execute(update(CandidateRow).where(CandidateRow.job_id == job_id, CandidateRow.status.in_((PENDING, RUNNING)))
                  .values(status=CANCELLED, error="cancelled", finished_at=utcnow(), phase=None))

    # ---- candidates
    @_retrying
    def mark_candidate_running(
        self, job_id: str, name: str, started_at: datetime, node_id: str | None = None,
        gpu_ids: list[str] | None = None,
    ) -> None:
        with self._write.begin() as s:
            c = self._candidate_row(s, job_id, name)
            if cancelled_alone(c.status, c.error):  # its worker started before the driver knew
                return
            c.status, c.error, c.started_at, c.finished_at = RUNNING, None, _naive_utc(started_at), None
            c.node_id, c.gpu_ids = node_id, [str(g) for g in gpu_ids or []]

    def set_phases(self, job_id: str, phases: dict[str, str]) -> bool:
        """What each of these running candidates is doing now (``phase_text``), for `status` and the
        REST job; a candidate that ended meanwhile keeps none. Best effort: False when the database
        did not answer (the next change writes it), never a reason to hold the sweep up."""
        try:
            with self._write.begin() as s:
                for name, text in phases.items():
                    s.execute(update(CandidateRow).where(CandidateRow.job_id == job_id, CandidateRow.name == name,
                                                         CandidateRow.status == RUNNING).values(phase=text[:200]))
            return True
        except (OperationalError, DBAPIError):
            return False

    @_retrying
    def save_outcome(self, job_id: str, result: CandidateResult) -> None:
        """Measurements, status and the item results of one candidate, replaced as a whole."""
        if result.status not in CANDIDATE_STATUSES:
            raise ValueError(f"candidate status {result.status!r} is not one of {CANDIDATE_STATUSES}")
        with self._write.begin() as s:
            c = self._candidate_row(s, job_id, result.name)
            for key in _MEASUREMENTS:
                setattr(c, key, getattr(result, key))
            c.gpu_ids = [str(g) for g in result.gpu_ids]
            c.started_at = _naive_utc(result.started_at) or c.started_at
            c.finished_at = _naive_utc(result.finished_at)
            s.execute(delete(ItemResultRow).where(ItemResultRow.candidate_id == c.id))
            if result.items:
                s.execute(insert(ItemResultRow), [_item_row(c.id, i) for i in result.items])

    @_retrying
    def save_items(self, job_id: str, name: str, items: list[ItemResult]) -> int:
        """Per-item results of a candidate still running, stored as they arrive so that a resumed
        job does not score them again. Items already stored are left as they are."""
        if not items:
            return 0
        with self._write.begin() as s:
            c = self._candidate_row(s, job_id, name)
            have = set(s.scalars(select(ItemResultRow.item_index).where(ItemResultRow.candidate_id == c.id)))
            new = [i for i in items if i.index not in have]
            if new:
                s.execute(insert(ItemResultRow), [_item_row(c.id, i) for i in new])
            return len(new)

    def cache_keys(self, job_id: str) -> dict[str, str | None]:
        with self._read() as s:
            q = select(CandidateRow.name, CandidateRow.cache_key).where(CandidateRow.job_id == job_id)
            return dict(s.execute(q).all())

    def has_cached(self, cache_key: str, exclude_job: str) -> bool:
        """Whether another job stored a succeeded result with this cache key (measured anywhere)."""
        with self._read() as s:
            return s.scalar(select(CandidateRow.id).where(
                CandidateRow.cache_key == cache_key, CandidateRow.status == SUCCEEDED,
                CandidateRow.job_id != exclude_job).limit(1)) is not None

    def find_cached(self, cache_key: str, exclude_job: str,
                    devices: list[str] | None = None) -> tuple[str, CandidateResult, list[ItemResult]] | None:
        """The latest succeeded result with this cache key in another job: (its job, result, items);
        ``devices``: only one measured on a device matching one of these LIKE patterns (any case)."""
        with self._read() as s:
            q = (select(CandidateRow).join(JobRow)
                 .where(CandidateRow.cache_key == cache_key, CandidateRow.status == SUCCEEDED,
                        CandidateRow.job_id != exclude_job))
            if devices is not None:
                q = q.where(or_(false(), *(CandidateRow.device.ilike(p) for p in devices)))
            c = s.scalar(q.order_by(CandidateRow.finished_at.desc()).limit(1))
            if c is None:
                return None
            items = [_item(r) for r in s.scalars(select(ItemResultRow).where(ItemResultRow.candidate_id == c.id)
                                                 .order_by(ItemResultRow.item_index))]
            return c.job_id, _result(c), items

    def get_results(self, job_id: str) -> list[CandidateResult]:
        with self._read() as s:
            return [_result(c) for c in self._job_row(s, job_id, selectinload(JobRow.candidates)).candidates]

    def get_item_results(self, job_id: str, candidate: str | None = None, offset: int = 0,
                         limit: int | None = None) -> dict[str, list[ItemResult]]:
        """Per candidate its stored per-item results by item index; ``offset``, ``limit``: of each
        candidate's, a page."""
        with self._read() as s:
            if candidate is None:
                names = [c.name for c in self._job_row(s, job_id, _names()).candidates]
            else:
                names = [self._candidate_row(s, job_id, candidate).name]
            out: dict[str, list[ItemResult]] = {n: [] for n in names}
            q = (
                select(CandidateRow.name, ItemResultRow)
                .join(ItemResultRow, ItemResultRow.candidate_id == CandidateRow.id)
                .where(CandidateRow.job_id == job_id)
                .order_by(CandidateRow.position, ItemResultRow.item_index)
            )
            if not offset and limit is None:
                for name, r in s.execute(q.where(CandidateRow.name.in_(names))):
                    out[name].append(_item(r))
            else:  # one query per candidate: a page of each
                for name in names:
                    out[name] = [_item(r) for _, r in s.execute(
                        q.where(CandidateRow.name == name).offset(offset or None).limit(limit))]
            return out

    def item_counts(self, job_id: str) -> dict[str, int]:
        """Per candidate, the per-item results stored so far (a running one's are streamed in)."""
        q = (select(CandidateRow.name, func.count(ItemResultRow.id))
             .outerjoin(ItemResultRow, ItemResultRow.candidate_id == CandidateRow.id)
             .where(CandidateRow.job_id == job_id).group_by(CandidateRow.name))
        with self._read() as s:
            return {name: n for name, n in s.execute(q)}

    # ---- helpers
    @staticmethod
    def _job_row(s: Session, job_id: str, *options: Any, lock: bool = False) -> JobRow:
        row = s.get(JobRow, job_id, options=options, with_for_update=lock or None)
        if row is None:
            raise NotFoundError(f"job {job_id!r} not found")
        return row

    def _candidate_row(self, s: Session, job_id: str, name: str) -> CandidateRow:
        row = s.scalar(select(CandidateRow).where(CandidateRow.job_id == job_id, CandidateRow.name == name))
        if row is None:
            self._job_row(s, job_id)  # a missing job says so first
            raise NotFoundError(f"job {job_id!r} has no candidate {name!r}")
        return row

    def candidate_uses(self) -> list[CandidateUse]:
        """Every candidate with what it may point at in the disk cache (its artifact, the cache key
        that names a reference, its job's model), its job's status and whether the job serves it."""
        q = (select(JobRow.id, JobRow.status, JobRow.created_at, JobRow.deployed_candidate, CandidateRow.name,
                    CandidateRow.artifact_path, CandidateRow.cache_key, JobRow.model_path)
             .join(CandidateRow, CandidateRow.job_id == JobRow.id))
        with self._read() as s:
            return [CandidateUse(job, status, created, name, path, key, served == name, model)
                    for job, status, created, served, name, path, key, model in s.execute(q)]

    def count_rows(self) -> dict[str, int]:
        """Row counts per table (diagnostics and tests)."""
        with self._read() as s:
            return {m.__tablename__: s.scalar(select(func.count()).select_from(m)) or 0
                    for m in (JobRow, CandidateRow, ItemResultRow)}


def _names():
    return selectinload(JobRow.candidates).options(load_only(CandidateRow.name, CandidateRow.position))


def _item_row(candidate_id: int, i: ItemResult) -> dict[str, Any]:
    return {"candidate_id": candidate_id, "item_index": i.index, "correct": bool(i.correct), "score": i.score,
            "truncated": bool(i.truncated), "prediction": i.prediction, "choice_logprobs": i.choice_logprobs,
            "category": i.category}


def _item(r: ItemResultRow) -> ItemResult:
    return ItemResult(r.item_index, r.correct, r.prediction, r.choice_logprobs, r.category, score=r.score,
                      truncated=r.truncated)


def _job(r: JobRow) -> Job:
    return Job(
        id=r.id, status=r.status, model=r.model, model_path=r.model_path, dataset_source=r.dataset_source,
        dataset_kind=r.dataset_kind, metric=r.metric, n_items=r.n_items, threshold=r.threshold,
        gpu_hour_usd=r.gpu_hour_usd, candidate_names=[c.name for c in r.candidates], deploy=r.deploy,
        created_at=r.created_at, updated_at=r.updated_at, error=r.error,
        deployed_candidate=r.deployed_candidate, base_url=r.base_url,
        confidence=r.confidence, policy=r.policy, early_stop=r.early_stop,
        target_gpu=r.target_gpu, model_config=r.model_config, use_cache=r.use_cache,
        cancel_requested=r.cancel_requested, driver=r.driver, heartbeat_at=r.heartbeat_at, stage=r.stage,
        deploy_error=r.deploy_error, candidate_timeout=r.candidate_timeout, notify=r.notify, recommended=r.recommended,
    )


def _result(c: CandidateRow) -> CandidateResult:
    return CandidateResult(
        name=c.name, config=dict(c.config), gpu_ids=list(c.gpu_ids or []), started_at=c.started_at,
        finished_at=c.finished_at, **{k: getattr(c, k) for k in _MEASUREMENTS},
    )
