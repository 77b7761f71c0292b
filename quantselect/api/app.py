"""The REST API (FastAPI; OpenAPI at /docs). Routes parse and render; the service does the work.
Jobs run in a background thread of this process, which stays free to answer while they run."""

from __future__ import annotations

import logging
import re
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import APIRouter, Body, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from quantselect.bearer import BearerGate
from quantselect.domain.candidates import BASELINE
from quantselect.domain.dataset import MAX_NEW_TOKENS_LIMIT, FieldMapping
from quantselect.domain.durations import parse_duration
from quantselect.domain.results import (
    CANCELLED, DEFAULT_CALIBRATION_SAMPLES, DEFAULT_CONFIDENCE, DEFAULT_POLICY, DEFAULT_THRESHOLD,
    MAX_CALIBRATION_SAMPLES, RUNNING,
)
from quantselect.errors import ConflictError, InputError, NotFoundError, QuantselectError
from quantselect.service import Service, SubmitRequest
from quantselect.settings import is_loopback

log = logging.getLogger(__name__)
SERVER_STOPPED = "interrupted: the API server that ran it stopped"
# Integers a query takes, at most: beyond, SQLite's INTEGER and the planner's floats overflow (a 500)
MAX_QUERY_INT = 2**31 - 1
# how long GET /api/v1/jobs/ID waits for the answer of the cluster a job's driver was submitted to
RAY_CHECK_SECONDS = 3.0
# An error's detail, at most: values are quoted back (a request may send megabytes)
MAX_DETAIL = 1000


class Detail(BaseModel):
    """Every error answer: one line saying what is wrong and what to change."""

    detail: str


# The error answers of every /api/v1 route (FastAPI's default 422 schema, a list, is not what is sent)
ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": Detail, "description": why} for status, why in (
    (400, "The Host header names another machine (a server on loopback with no QUANTSELECT_API_TOKEN)."),
    (401, "No or a wrong bearer token (a server started with QUANTSELECT_API_TOKEN)."),
    (403, "A file outside the folders this server reads (QUANTSELECT_API_PATHS), or a webhook host it does not "
          "post to."),
    (404, "No such job, candidate or deployment."),
    (409, "Valid, but not in the job's present state (a deploy before it succeeded, say)."),
    (422, "A field, query parameter or body to fix."),
    (500, "A bug: the server's log has the traceback."),
)}


def _range(**bounds: float) -> dict[str, Any]:
    """Bounds the service enforces (answering with its own one-line 422), shown in the OpenAPI schema:
    as pydantic constraints they would answer first, in pydantic's words."""
    return {"json_schema_extra": bounds}


def _clip(text: str, limit: int = MAX_DETAIL) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _stopped(job_id: str) -> str:
    return f"{SERVER_STOPPED}; `quantselect resume {job_id}` continues it"


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="A Hugging Face folder or .gguf file the server can read, a "
                       "Hugging Face Hub id (owner/name[@revision]: its config and tokenizer are fetched to check the "
                       "request, the job is pinned to that commit and fetches its weights into the server's Hugging "
                       "Face cache), or 'demo'.")
    dataset: str | None = Field(None, description="Path of a dataset (JSONL, JSON array, CSV, Parquet) the server can read, "
                                "or a file of a Hub dataset: hf://datasets/OWNER/NAME[@REVISION]/PATH.")
    items: list[dict[str, Any]] | None = Field(None, description="Or the items inline, in the canonical format.")
    map: list[str] = Field(default_factory=list, description="Field mapping, as the CLI's --map KEY=VALUE.")
    labels: str | None = Field(None, description="Path (or hf://datasets/... file) with one answer index per line.")
    metric: str | None = None
    limit: int | None = Field(None, description="Use only the first N items.", **_range(minimum=1))
    sample: int | None = Field(None, description="Use a seeded random N of the items instead of the first N.",
                               **_range(minimum=1))
    threshold: float = Field(DEFAULT_THRESHOLD, description="Quality relative to the baseline a candidate must keep.",
                             **_range(exclusiveMinimum=0, maximum=1.5))
    candidates: list[str] | None = Field(None, description="Candidate names (GET /api/v1/candidates), with "
                                        "NAME:key=value parameters, or LABEL=PATH checkpoints quantized elsewhere "
                                        "(a folder, a .gguf file, or a Hub id: its config.json is read to check the "
                                        "request, the job fetches its weights).")
    gpu_hour_usd: float | None = Field(None, description="Price of one target GPU-hour (default: the price table's).")
    target_gpu: str | None = Field(None, description="Deployment GPU the cost is quoted for (default H100-80GB).")
    calibration: str | None = Field(None, description="Path of a GPTQ/AWQ calibration file the server can read, "
                                    "or an hf://datasets/... file.")
    calibration_samples: int = Field(DEFAULT_CALIBRATION_SAMPLES, description="GPTQ/AWQ calibration samples.",
                                     **_range(minimum=1, maximum=MAX_CALIBRATION_SAMPLES))
    deploy: bool = False
    confidence: float = Field(DEFAULT_CONFIDENCE, description="Confidence of the intervals and verdicts.",
                              **_range(minimum=0.5, exclusiveMaximum=1))
    policy: str = Field(DEFAULT_POLICY, description="'point' or 'lower-bound': what must meet the threshold.")
    early_stop: bool = Field(False, description="Stop each candidate once an anytime-valid test settles its verdict.")
    candidate_timeout: str | float | None = Field(
        None, description="How long each candidate may run ('90m', '6h', '1h30m', or a number of seconds; at most "
        "100 years): one still running is "
        "stopped, its GPU freed, and fails saying so; the others run on. Default: the server's "
        "QUANTSELECT_CANDIDATE_TIMEOUT, if set.")
    notify: str | None = Field(None, description="A webhook URL the job's end is posted to: {\"text\": one line (as "
                               "Slack, Mattermost and Teams show it), \"job\": the job as GET /api/v1/jobs/{id} gives it}.")
    max_new_tokens: int | None = Field(None, description="Generation: most tokens per answer (default per metric; "
                                       "0: score the text given, for the metrics that do).",
                                       **_range(minimum=0, maximum=MAX_NEW_TOKENS_LIMIT))
    stop: list[str] | None = Field(None, description="Generation: stop strings (default per metric; [] for none).")
    chat_template: bool = Field(False, description="Generation: wrap prompts in the model's chat template.")
    no_cache: bool = Field(False, description="Run every candidate even when a stored result with the same inputs exists.")


class DeployRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    candidate: str | None = Field(None, description="Serve this candidate instead of the recommended one.")
    engine: Literal["static", "dynamic"] | None = Field(
        None, description="Decoding: 'static' (one request at a time; the GPU default) or 'dynamic' (batched; the CPU default).")


class PruneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[str] = Field(default_factory=list, description="Entries to remove, as GET /api/v1/cache names them.")
    older_than: str | None = Field(None, description="Only entries unused for this long, e.g. '30d', '12h'.")
    all: bool = Field(False, description="Every entry (what is served or in use is still kept).")
    dry_run: bool = Field(False, description="Say what would be removed; remove nothing.")


def create_app(service: Service | None = None, *, connect_ray: bool = True, listen: str | None = None) -> FastAPI:
    """The app; ``listen``: the address the server listens on (`quantselect api --host`), which
    decides whether requests must name this machine (``LoopbackHosts``)."""
    svc = service or Service()
    # Jobs run side by side on the cluster (each its own driver thread); more wait, queued.
    executor = ThreadPoolExecutor(max_workers=svc.settings.api_max_jobs, thread_name_prefix="quantselect-job")
    active: dict[str, bool] = {}  # the jobs this server runs or has queued -> whether their driver thread started
    queue_lock = threading.RLock()  # a job enters ``active`` once: two drivers of one job would share its row
    stopping = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.repo  # migrate on first use, before the first request
        if connect_ray:
            _connect_keeping_signal_handlers()
        keeper = threading.Thread(target=_keep_the_queue, name="quantselect-queue", daemon=True)
        keeper.start()
        yield
        _stop_jobs()
        keeper.join()

    def _connect_keeping_signal_handlers() -> None:
        """Join Ray, keeping the server's SIGINT and SIGTERM handlers: uvicorn installs them before the
        lifespan starts, and ray.init replaces SIGTERM's (on the main thread) with one that exits at
        once, so `kill` left the jobs this server ran `running` under a dead driver."""
        from quantselect.orchestration.cluster import connect

        main = threading.current_thread() is threading.main_thread()  # signals are set there only
        kept = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            connect(svc.settings, persistent=True)
        finally:
            for sig, handler in kept.items():
                if handler is not None:  # None: not set from Python, nothing to put back
                    signal.signal(sig, handler)

    def _keep_the_queue() -> None:
        """Every few seconds: hold the jobs queued here (their heartbeat: no other server or driver
        takes them), and take up those an API server queued and never started before it stopped or
        died (this one's predecessor, after a restart or a kill; another of several servers on one
        database), oldest first."""
        every = min(5.0, svc.settings.heartbeat_stale_seconds / 4)
        while not stopping.is_set():
            try:
                svc.hold_waiting([job_id for job_id, started in list(active.items()) if not started])
                # one of its own goes stale only when holding it failed for that long: it is queued already
                adopted = [job_id for job_id in svc.adopt_queued() if job_id not in active]
                if adopted:
                    log.warning("taking up %d job(s) an API server queued and never started: %s", len(adopted),
                                ", ".join(adopted))
                for job_id in adopted:
                    _queue(job_id)
            except Exception as e:  # a database blip: try again at the next tick
                log.warning("the job queue: %s", e)
            stopping.wait(every)

    def _stop_jobs() -> None:
        """The server stops: the jobs it drives are cancelled (their driver threads stop their workers
        within seconds, which the shutdown waits for), saying so, and `resume` continues them; those it
        had queued and not started stay queued, for the next server on this database to run. Before,
        the process waited for every running job to finish."""
        stopping.set()
        ours = dict(active)
        running = [job_id for job_id, started in ours.items() if started]
        if ours:
            log.warning("the API server stops: cancelling %d running job(s) (resume continues them); %d queued "
                        "job(s) stay queued for the next API server on this database", len(running),
                        len(ours) - len(running))
        for job_id in running:  # they end with the reason (and their webhooks say it)
            try:
                svc.cancel(job_id, reason=_stopped(job_id))
            except QuantselectError:  # it has just ended
                pass
        executor.shutdown(wait=True, cancel_futures=True)
        svc.release_queued([job_id for job_id in ours if job_id not in running])
        for job_id in ours:  # resumed here and still waiting for a slot: never started again
            try:
                if svc.get_job(job_id).status == RUNNING:
                    svc.repo.finish_job(job_id, CANCELLED, error=_stopped(job_id))
            except NotFoundError:  # cancelled while it waited, then its record deleted
                pass
            except Exception as e:  # the others still end as they should
                log.warning("job %s: %s", job_id, e)

    def _queue(job_id: str, resume: bool = False) -> None:
        with queue_lock:
            if job_id in active:  # queued or running here already
                return
            active[job_id] = False
        svc.hold_waiting([job_id])  # held from now: no other server takes it up
        executor.submit(_run, job_id, resume)

    app = FastAPI(title="quantselect", version="0.1.0", lifespan=lifespan,
                  description="Which precision should I deploy? Measured on your own task.")
    # With QUANTSELECT_API_TOKEN set, every request carries it (`Authorization: Bearer ...`), asked for
    # by the gate; /healthz (for probes) and the OpenAPI docs stay open, and show the scheme.
    token = svc.settings.api_token
    v1 = APIRouter(dependencies=[Security(HTTPBearer(auto_error=False, description="QUANTSELECT_API_TOKEN, the "
                                                     "token the server was started with"))] if token else [],
                   responses=ERRORS)
    if token:
        app.add_middleware(BearerGate, secret=lambda: token, open_paths=OPEN_PATHS, refusal=_token_refusal)
    elif listen is not None and is_loopback(listen):
        app.add_middleware(LoopbackHosts, also=svc.settings.api_hosts)

    @app.exception_handler(QuantselectError)
    async def _our_error(request: Request, e: QuantselectError) -> JSONResponse:
        return JSONResponse(status_code=e.http_status, content={"detail": _clip(str(e))})

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        if any(err["loc"][:1] == ("body",) for err in errors) and not _is_json(request.headers.get("content-type")):
            # `curl -d` sends a form: FastAPI reads it as bytes, and pydantic says it is no dictionary
            return JSONResponse(status_code=422, content={
                "detail": "send the body as JSON, with the header Content-Type: application/json"})
        msgs = []
        for err in errors:
            if err["type"] == "json_invalid":  # its loc is the position, its msg drops the reason
                pos = err["loc"][-1]
                msgs.append("the body is not valid JSON" + (f" at character {pos + 1}" if isinstance(pos, int) else "")
                            + f": {err.get('ctx', {}).get('error', err['msg'])}")
            else:
                msgs.append("{}: {}".format(".".join(str(p) for p in err["loc"]), err["msg"]))
        return JSONResponse(status_code=422, content={"detail": _clip("; ".join(msgs))})

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        """Last resort, JSON as every other answer (Starlette's is plain text); the traceback goes to
        the server's log (Starlette re-raises after this answer), never to the client."""
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return JSONResponse(status_code=500, content={
            "detail": _clip(f"internal error: {type(e).__name__}" + (f": {first}" if first else ""))})

    def _run(job_id: str, resume: bool = False) -> None:
        if stopping.is_set():
            return
        active[job_id] = True
        try:
            svc.run_job(job_id, resume=resume)
        except QuantselectError as e:  # the job row carries the error; keep the server up
            log.warning("job %s: %s", job_id, e)
        except Exception:
            log.exception("job %s failed", job_id)
        finally:
            active.pop(job_id, None)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # load balancers probe with HEAD (not in the document: one operation id per route)
    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)

    @v1.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        """Prometheus text format: jobs and candidates by status (the whole database), this server's
        jobs running and waiting for a slot. Behind the API token when one is set."""
        jobs, candidates = svc.repo.counts()
        running = sum(1 for started in list(active.values()) if started)
        return prometheus_text([
            ("quantselect_jobs", "Jobs in the database, by status.", "status", jobs),
            ("quantselect_candidates", "Candidates of every job, by status.", "status", candidates),
            ("quantselect_api_jobs", "This API server's jobs: running, and waiting for one of its "
             "QUANTSELECT_API_MAX_JOBS slots.", "state", {"running": running, "waiting": len(active) - running}),
            ("quantselect_api_max_jobs", "Jobs this API server drives at once.", None, svc.settings.api_max_jobs),
        ])

    def _request(body: JobRequest) -> SubmitRequest:
        return SubmitRequest(model=body.model, dataset=body.dataset, items=body.items,
                             mapping=FieldMapping.parse(body.map, body.labels), metric=body.metric,
                             limit=body.limit, sample=body.sample, threshold=body.threshold,
                             candidates=body.candidates,
                             gpu_hour_usd=body.gpu_hour_usd, target_gpu=body.target_gpu,
                             calibration=body.calibration, calibration_samples=body.calibration_samples,
                             deploy=body.deploy, confidence=body.confidence,
                             policy=body.policy, early_stop=body.early_stop, max_new_tokens=body.max_new_tokens,
                             stop=body.stop, chat_template=body.chat_template, use_cache=not body.no_cache,
                             candidate_timeout=None if body.candidate_timeout is None
                             else parse_duration(body.candidate_timeout, "candidate_timeout"),
                             notify=body.notify, readable=svc.settings.api_paths)

    @v1.post("/api/v1/jobs", status_code=202)
    def submit_job(body: JobRequest) -> dict[str, Any]:
        job = svc.submit(_request(body))
        _queue(job.id)
        return job.to_dict()

    @v1.post("/api/v1/jobs/preview")
    def preview_job(body: JobRequest) -> dict[str, Any]:
        """What POST /api/v1/jobs would run (as the CLI's --dry-run): checked the same way, nothing
        submitted: the items scored and held out, per candidate its estimated memory, whether the
        server can run it, and whether a stored result would be reused."""
        return svc.preview(_request(body))

    @v1.get("/api/v1/jobs")
    def list_jobs(limit: int | None = Query(None, ge=1, le=MAX_QUERY_INT, description="Only the N newest."),
                  status: list[str] = Query([], description="Only jobs in these statuses."),
                  before: str | None = Query(None, max_length=64, description="Only the jobs after this one: the "
                                             "next page after one that ended with it (jobs submitted meanwhile "
                                             "do not shift the pages).")) -> list[dict[str, Any]]:
        """Jobs, newest first; page with ``limit`` and ``before`` (the id of the last job of a page)."""
        return [j.to_dict() for j in svc.list_jobs(limit, status, before)]

    @v1.get("/api/v1/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        """The job and its results. A job still queued whose driver was submitted to a Ray cluster
        (`submit --address`) that ended before it claimed the job is failed, saying why; ``driver_note``:
        why that cluster could not be asked (it is asked for at most a few seconds)."""
        _, note = svc.check_remote_driver(svc.get_job(job_id), timeout=RAY_CHECK_SECONDS)
        job, rows, _ = svc.results_table(job_id)
        return {**job.to_dict(), "driver_silent_seconds": svc.driver_silent_for(job), "driver_note": note,
                "results": rows}

    @v1.delete("/api/v1/jobs/{job_id}", status_code=202)
    def cancel_job(job_id: str) -> dict[str, Any]:
        """Cancel: the job's driver stops its workers within seconds and marks it cancelled."""
        return svc.cancel(job_id).to_dict()

    @v1.delete("/api/v1/jobs/{job_id}/record")
    def delete_job(job_id: str) -> dict[str, Any]:
        """Delete a finished job that serves nothing: its record, results and per-item results."""
        return {"deleted": svc.delete(job_id).id}

    @v1.post("/api/v1/jobs/{job_id}/resume", status_code=202)
    def resume_job(job_id: str) -> dict[str, Any]:
        """Continue a job whose driver died (or that failed or was cancelled), in this server."""
        with queue_lock:  # a second resume (or one of a job this server runs) would start a second driver
            if job_id in active:
                raise ConflictError(f"job {job_id} is already {'running' if active[job_id] else 'queued'} in this "
                                    "API server")
            job = svc.claim(job_id, resume=True)  # 409 now, not later, if a live driver runs it
            _queue(job_id, True)
        return job.to_dict()

    @v1.get("/api/v1/jobs/{job_id}/results")
    def get_results(job_id: str, items: bool = False,
                    offset: int = Query(0, ge=0, le=MAX_QUERY_INT, description="With items: skip each candidate's "
                                        "first N items (by item index)."),
                    limit: int | None = Query(None, ge=1, le=MAX_QUERY_INT, description="With items: at most N "
                                              "items of each candidate.")) -> list[dict[str, Any]]:
        """Per candidate its results; ``items=true``: its per-item results instead, all or a page of each
        candidate's (``offset``, ``limit``)."""
        if items:
            svc.get_job(job_id)
            return [{"candidate": n, **i.to_dict()} for n, rows in svc.item_results(job_id, offset, limit).items()
                    for i in rows]
        if offset or limit is not None:
            raise InputError("offset and limit page the per-item results: add items=true")
        return svc.results_table(job_id)[1]

    @v1.get("/api/v1/jobs/{job_id}/compare")
    def get_comparison(job_id: str, candidate: str, against: str = BASELINE,
                       limit: int = Query(10, ge=0, le=MAX_QUERY_INT, description="At most N items each way "
                                          "(worse, better).")) -> dict[str, Any]:
        """The items ``candidate`` scored differently from ``against`` (the baseline), worst drops
        first, with each prompt, what was expected and what each one answered."""
        return svc.compare(job_id, candidate, against, limit).to_dict()

    @v1.get("/api/v1/jobs/{job_id}/recommendation")
    def get_recommendation(job_id: str,
                           threshold: float | None = Query(None, **_range(exclusiveMinimum=0, maximum=1.5)),
                           confidence: float | None = Query(None, **_range(minimum=0.5, exclusiveMaximum=1)),
                           policy: str | None = None, target_gpu: str | None = None,
                           gpu_hour_usd: float | None = None) -> dict[str, Any]:
        return svc.recommend(job_id, threshold, confidence, policy, target_gpu, gpu_hour_usd).to_dict()

    @v1.delete("/api/v1/jobs/{job_id}/candidates/{name}", status_code=202)
    def cancel_candidate(job_id: str, name: str) -> dict[str, Any]:
        """Cancel one candidate of a queued or running job: the job goes on without it."""
        result = svc.cancel_candidate(job_id, name)
        return {"job_id": job_id, "candidate": name, "status": result.status, "error": result.error}

    @v1.post("/api/v1/jobs/{job_id}/deploy")
    def deploy(job_id: str, body: DeployRequest | None = Body(None)) -> dict[str, Any]:
        url = svc.deploy(job_id, body.candidate if body else None, body.engine if body else None)
        return {"job_id": job_id, "candidate": svc.get_job(job_id).deployed_candidate, "base_url": url}

    @v1.delete("/api/v1/jobs/{job_id}/deploy")
    def undeploy(job_id: str) -> dict[str, Any]:
        return {"job_id": job_id, "stopped": svc.undeploy(job_id)}

    @v1.get("/api/v1/candidates")
    def list_candidates() -> list[dict[str, Any]]:
        """Every candidate (the names ``candidates`` takes), its parameters, whether it is a default,
        and whether this server's machine can run it, and why not."""
        return svc.candidates()

    @v1.get("/api/v1/doctor")
    def doctor() -> dict[str, Any]:
        """`quantselect doctor --format json` on the server: its database, disk, Ray, GPUs, libraries,
        the candidates it can run, and access; ``failed`` when a job would fail there."""
        return svc.doctor()

    @v1.get("/api/v1/gpus")
    def list_gpus() -> list[dict[str, Any]]:
        """The target GPUs costs are quoted for (``target_gpu``): memory, bandwidth, compute, price per hour."""
        return svc.gpus()

    @v1.get("/api/v1/plan")
    def plan(model: str = Query(min_length=1), gpu: str | None = None, gpu_memory: str | None = None,
             context: int | None = Query(None, ge=1, le=MAX_QUERY_INT), batch: int = Query(1, ge=1, le=MAX_QUERY_INT),
             kv_cache: Literal["bf16", "fp16", "fp8"] = "bf16") -> dict[str, Any]:
        """Will ``model`` fit? Weight and KV-cache memory per precision and the GPUs it needs, from its
        config.json alone (a folder or .gguf file the server can read, or a Hub id), as `quantselect plan`."""
        return svc.plan(model, gpu, gpu_memory, context, batch, kv_cache, readable=svc.settings.api_paths)

    @v1.get("/api/v1/cache")
    def cache() -> list[dict[str, Any]]:
        """The quantized models and reference outputs on disk, oldest use first."""
        return [e.to_dict() for e in svc.cache_entries()]

    @v1.post("/api/v1/cache/prune")
    def prune_cache(body: PruneRequest) -> dict[str, Any]:
        """Remove cache entries; what a deployment serves or a running job may use is kept, with why."""
        if body.older_than is not None:  # named as this body names it (the service says --older-than)
            parse_duration(body.older_than, "older_than", bare_seconds=False)
        plan = svc.prune_cache(body.keys, body.older_than, body.all, body.dry_run)
        return {"dry_run": body.dry_run, "removed": [e.to_dict() for e in plan.remove],
                "freed_bytes": 0 if body.dry_run else sum(e.size_bytes for e in plan.remove),
                "kept": [{**e.to_dict(), "reason": why} for e, why in plan.keep]}

    app.include_router(v1)
    return app


def prometheus_text(gauges: list[tuple[str, str, str | None, dict[str, int] | int]]) -> str:
    """Gauges in Prometheus' text exposition format: (name, help, label, {label value: value} or a value)."""
    lines = []
    for name, help_, label, values in gauges:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
        if isinstance(values, dict):
            lines += [f'{name}{{{label}="{key}"}} {value}' for key, value in values.items()]
        else:
            lines.append(f"{name} {values}")
    return "\n".join(lines) + "\n"


def _is_json(content_type: str | None) -> bool:
    """Whether FastAPI reads a body with this content type as JSON (it reads none without one)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class LoopbackHosts:
    """With no token, on a loopback address, only requests to this machine by name: ``Host``
    127.0.0.1, localhost or [::1] (any port), or one of ``also`` (QUANTSELECT_API_HOSTS: the name a
    local reverse proxy passes on). A web page the user opens could otherwise read and submit jobs by
    DNS rebinding (its own name re-pointed to 127.0.0.1: the browser sends that name)."""

    NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})
    # the whole header: a name (or a bracketed IPv6 address), then a port or nothing (`[::1]evil` is no [::1])
    HOST = re.compile(r"(\[[0-9a-f:.]+\]|[^\[\]:]+)(?::\d+)?")

    def __init__(self, app: Any, also: tuple[str, ...] = ()) -> None:
        self.app, self.also = app, also

    def _allowed(self, name: str) -> bool:
        from quantselect.domain.results import host_allowed

        return name in self.NAMES or bool(name and self.also and host_allowed(name.strip("[]"), self.also))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1").strip().lower()
            found = self.HOST.fullmatch(host)
            if found is None or not self._allowed(found[1]):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                also = f", {', '.join(self.also)}" if self.also else ""
                await JSONResponse({"detail": f"Host {_clip(host, 200)!r} is not this machine: with no "
                                    "QUANTSELECT_API_TOKEN, this server answers requests to 127.0.0.1, localhost or "
                                    f"[::1]{also} only; set a token, or add the name to QUANTSELECT_API_HOSTS, to "
                                    "serve other names"},
                                   status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _token_refusal(why: str) -> JSONResponse:
    return JSONResponse({"detail": f"{why} bearer token: send the header `Authorization: Bearer TOKEN` with the "
                                   "server's QUANTSELECT_API_TOKEN"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
