"""Use cases: submit / run / inspect a job, recommend, deploy. The one place that composes the
layers; knows nothing of click or HTTP. Heavy modules are imported inside the methods."""

from __future__ import annotations

import logging
import errno
import os
import re
import socket
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from quantselect.domain.cache import CacheEntry, PrunePlan, attach_uses, plan_prune
from quantselect.domain.checks import FAIL, INFO, OK, WARN, Check, failed
from quantselect.domain.candidates import BASELINE, DEFAULT_CANDIDATES, Candidate, Prequantized, resolve_candidates
from quantselect.domain.compare import ItemComparison, compare_items
from quantselect.domain.durations import parse_duration
from quantselect.domain.dataset import FieldMapping, load_dataset, parse_records
from quantselect.domain.results import (
    DEFAULT_CALIBRATION_SAMPLES,
    DEFAULT_CONFIDENCE,
    DEFAULT_POLICY,
    DEFAULT_THRESHOLD,
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    CandidateResult,
    ItemResult,
    Job,
    JobSpec,
    cancelled_alone,
    end_notice,
    metadata_address,
    phase_text,
    shown_url,
    validate_confidence,
    validate_policy,
    validate_notify,
    validate_price,
    validate_threshold,
)
from quantselect.domain.selection import Recommendation, recommend
from quantselect.errors import CancelledWhileWaiting, ConflictError, ForbiddenError, InputError, QuantselectError
from quantselect.settings import Settings, get_settings, is_loopback

log = logging.getLogger(__name__)
T = TypeVar("T")
_DEPLOYING = "deploying the recommended candidate on Ray Serve"  # the stage of a succeeded job until it is served
INTERRUPTED = "interrupted (SIGINT, Ctrl-C)"  # the error of a job whose driver was interrupted

DEMO_DATASET = "piqa-300.jsonl"
DEMO_LIMIT = 60
PHASE_WRITE_SECONDS = 5.0  # how often a candidate's moving count (items, layers) is written for `status`
RAY_CHECK_SECONDS = 5.0  # how long `status` waits for a cluster's answer about a job's driver there
MAX_PAGE = 2**31 - 1  # an offset or page size beyond overflows SQLite's INTEGER
DOCTOR_LOW_DISK = 20 * 2**30  # free space below which `doctor` warns: a 7B sweep writes several artifacts


def examples_dir() -> Path:
    """``examples/`` of a checkout, else the copy shipped inside the wheel."""
    pkg = Path(__file__).resolve().parent
    repo = pkg.parent / "examples"
    return repo if (repo / DEMO_DATASET).is_file() else pkg / "_examples"


@dataclass
class SubmitRequest:
    model: str
    dataset: str | None = None  # a path the process can read
    items: list[dict[str, Any]] | None = None  # or the items inline
    mapping: FieldMapping = field(default_factory=FieldMapping)
    metric: str | None = None
    limit: int | None = None
    sample: int | None = None  # a seeded random subset of this many items (instead of the first `limit`)
    threshold: float = DEFAULT_THRESHOLD
    candidates: list[str] | None = None
    gpu_hour_usd: float | None = None  # price of one target GPU-hour; None: the price table's
    target_gpu: str | None = None  # the deployment GPU the cost is quoted for (default H100-80GB)
    calibration: str | None = None  # a calibration file for GPTQ/AWQ; None: split off the task data
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES
    deploy: bool = False
    confidence: float = DEFAULT_CONFIDENCE
    policy: str = DEFAULT_POLICY
    early_stop: bool = False
    # Generation settings (None: the metric's defaults; stop=[] means no stop strings)
    max_new_tokens: int | None = None
    stop: list[str] | None = None
    chat_template: bool = False
    use_cache: bool = True  # reuse stored results of earlier jobs with the same inputs
    candidate_timeout: float | None = None  # seconds each candidate may run (None: the driver's setting)
    notify: str | None = None  # a webhook URL the job's end is posted to
    # The model path is read where the job's driver runs (submit --address): when it is not here,
    # the model is checked by the driver on the cluster instead.
    model_on_cluster: bool = False
    # A request from afar (the REST API with QUANTSELECT_API_PATHS): the files and folders of this
    # machine it may name, those under these folders (None: any this process can read).
    readable: tuple[Path, ...] | None = None


@dataclass
class Events:
    """Callbacks for live progress; all optional."""

    on_progress: Callable[[dict[str, tuple[str, int, int]]], None] | None = None
    on_outcome: Callable[[CandidateResult], None] | None = None
    on_status: Callable[[str], None] | None = None


def _deployment_name(job_id: str, candidate: str) -> str:
    """A job's candidate's Serve name: the candidate's own where it is one (a-z, 0-9, '-'), else a
    slug of it with a hash of the whole (``int8:kv_cache=fp8``, a label with '.', '_' or capitals),
    so that two candidates never share one."""
    import hashlib
    import re

    if re.fullmatch(r"[a-z0-9][a-z0-9-]{0,55}", candidate):  # one Serve takes: as before this function
        return f"{candidate}-{job_id[:6]}"
    slug = re.sub(r"[^a-z0-9]+", "-", candidate.lower()).strip("-")
    slug = f"{slug[:40]}-{hashlib.sha256(candidate.encode()).hexdigest()[:6]}".lstrip("-")
    return f"{slug}-{job_id[:6]}"


class Service:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self._repo = None
        self._lock = threading.Lock()
        self._ray_clients: dict[tuple[str, float], Any] = {}  # (dashboard, timeout) -> Ray Jobs API client

    @property
    def repo(self):
        with self._lock:
            if self._repo is None:
                from quantselect.db import Repository

                self._repo = Repository.open(self.settings)
            return self._repo

    def close(self) -> None:
        if self._repo is not None:
            self._repo.close()
            self._repo = None

    # ---- submit -------------------------------------------------------------------------
    def build_spec(self, req: SubmitRequest) -> JobSpec:
        """Validate everything before anything is written. A model named by its Hub id is checked
        on its config and tokenizer, fetched here, and a checkpoint candidate on its config, each
        pinned to the commit checked; their weights are fetched by the job's driver
        (``_model_on_driver``, ``_checkpoints_on_driver``). A request from afar (``readable``) names
        this machine's files by absolute paths: ``owner/name`` is always the Hub's."""
        from quantselect.engines.models import names_from_afar
        from quantselect.orchestration.cluster import ray_address

        if not req.model_on_cluster:  # the driver runs here and joins it: a bad one fails it after the job is written
            ray_address(self.settings)
        with names_from_afar(req.readable is not None):
            return self._build_spec(req)

    def _build_spec(self, req: SubmitRequest) -> JobSpec:
        from quantselect.engines.models import check_model, from_hub, has_chat_template, hub_id, hub_name, pin_on_hub, pinned

        from quantselect.domain.gpus import gpu

        # huggingface.co addresses copied from a browser, in the names they stand for
        mapping = req.mapping and replace(req.mapping, labels_file=hub_name(req.mapping.labels_file))
        req = replace(req, model=hub_name(req.model), dataset=hub_name(req.dataset), mapping=mapping,
                      calibration=hub_name(req.calibration))

        threshold = validate_threshold(req.threshold)
        target = gpu(req.target_gpu)
        price = target.usd_per_hour if req.gpu_hour_usd is None else validate_price(req.gpu_hour_usd)
        confidence = validate_confidence(req.confidence)
        policy = validate_policy(req.policy)
        candidates = resolve_candidates(req.candidates)
        if req.readable is not None:
            only_under(req.readable, {"dataset": req.dataset, "labels": req.mapping and req.mapping.labels_file,
                                      "calibration": req.calibration},
                       models={"model": req.model, **{f"candidate {c.name}:": hub_name(c.config.path) for c in candidates
                                                      if isinstance(c.config, Prequantized)}})
        if req.candidate_timeout is not None and not 0 < req.candidate_timeout < float("inf"):
            raise InputError(f"candidate timeout {req.candidate_timeout}: give a duration longer than 0 (in seconds)")
        if req.limit is not None and req.limit < 1:
            raise InputError(f"limit {req.limit} must be at least 1")
        if req.sample is not None and (req.sample < 1 or req.limit is not None):
            raise InputError("give --limit or --sample, not both" if req.limit is not None
                             else f"sample {req.sample} must be at least 1")
        dataset = _task_data(req)
        if req.sample is not None:
            dataset = dataset.sample(req.sample)
        if req.model_on_cluster and (hub_id(req.model) or not model_is_here(req.model)):
            if not hub_id(req.model) and not Path(req.model).is_absolute():
                raise InputError(f"{req.model}: not found here; a model path read on the cluster must be absolute")
            # checked (a Hub id: downloaded) by the driver, on the cluster (run_job); a Hub id pinned now
            model_path = pin_on_hub(req.model)
            candidates = resolve_checkpoints(candidates, None)
        else:
            hub = from_hub(req.model, weights=False)  # a Hub id: its config and tokenizer, in the HF cache
            here = check_model(str(hub or req.model), weights=hub is None)
            model_path = pinned(req.model, hub) if hub else here  # the commit checked: the one the driver fetches
            candidates = resolve_checkpoints(candidates, here)
            if dataset.chat_template and has_chat_template(here) is False:
                if dataset.items[0].messages is not None:
                    raise InputError(f"{req.model}: the tokenizer has no chat template to render the dataset's "
                                     "conversations ('messages'); use an instruct model")
                raise InputError(f"{req.model}: the tokenizer has no chat template; drop --chat-template or use an "
                                 "instruct model")
            check_candidates_fit(candidates, here)
        calibration = None
        if any(c.config.calibrated for c in candidates):
            with _hub_data(req.calibration) as local:
                dataset, calibration = split_calibration(dataset, local, req.calibration_samples)
            if local != req.calibration:
                calibration = replace(calibration, source=req.calibration)
        elif req.calibration is not None:
            raise InputError(f"{req.calibration}: a calibration file is only used by int4-gptq / int4-awq, "
                             "and no such candidate was asked for")
        return JobSpec(model=req.model, model_path=model_path, dataset=dataset, candidates=candidates,
                       threshold=threshold, gpu_hour_usd=price, deploy=req.deploy, confidence=confidence,
                       policy=policy, early_stop=req.early_stop, target_gpu=target.name, calibration=calibration,
                       use_cache=req.use_cache, candidate_timeout=req.candidate_timeout, notify=validate_notify(req.notify, self.settings.notify_hosts))

    def preview(self, req: SubmitRequest) -> dict[str, Any]:
        """What ``submit`` would run (``--dry-run``), validated the same way, without submitting or
        running anything: the items scored and held out for calibration, the metric and generation
        settings, and per candidate its estimated weights and GPU need, whether this machine can run
        it (and why not), and whether a stored result of the same inputs would be reused."""
        from quantselect.domain import planner
        from quantselect.engines.models import from_hub, hub_identity, model_config_here
        from quantselect.engines.quantize import availability

        spec = self.build_spec(req)
        shape = None
        local = spec.model_path  # a Hub id pinned at submit: read from its snapshot (cached; a GGUF file's header)
        if not model_is_here(local) and not req.model_on_cluster:
            local = str(from_hub(local, weights=False))
        here = model_is_here(local)
        found = model_config_here(local) if here else None
        # why there are no memory estimates (then a whole GPU each): said, as `plan` says it
        no_estimates = None if found else ("the model's config could not be read" if here
                                           else "the model's config.json is read on the cluster")
        if found:
            try:
                shape = planner.shape_from_config(*found)
            except InputError as e:
                shape, no_estimates = None, str(e)
        # as submit computes them: a Hub commit's are known here even when only the cluster reads its files
        known = here or hub_identity(spec.model_path)
        keys = cache_keys(replace(spec, model_path=local)) if spec.use_cache and known else {}
        d = spec.dataset
        rows = []
        for c in spec.candidates:
            need = planner.candidate_need(shape, c.config) if shape else None
            rows.append({"name": c.name, "config": c.config.to_dict(), "calibrated": c.config.calibrated,
                         "weights_bytes": need.weights if need else None,
                         "gpu_need_bytes": need.total if need else None,
                         "unavailable_here": availability(c.config),
                         "stored_result": bool(keys.get(c.name)) and self.repo.has_cached(keys[c.name], exclude_job="")})
        cal = spec.calibration
        return {"model": spec.model, "model_path": spec.model_path, "params": shape.params if shape else None,
                "no_estimates": no_estimates,
                "dataset": d.source, "kind": d.kind, "metric": d.metric, "n_items": len(d),
                "max_new_tokens": d.max_new_tokens, "stop": list(d.stop) if d.stop is not None else None,
                "chat_template": d.chat_template,
                "calibration": {"source": cal.source, "samples": len(cal.texts), "held_out_items": len(cal.items)}
                if cal else None,
                "threshold": spec.threshold, "confidence": spec.confidence, "policy": spec.policy,
                "early_stop": spec.early_stop, "target_gpu": spec.target_gpu, "gpu_hour_usd": spec.gpu_hour_usd,
                "use_cache": spec.use_cache, "candidates": rows}

    def submit(self, req: SubmitRequest) -> Job:
        from quantselect.engines.models import hub_identity

        spec = self.build_spec(req)
        # a model only the cluster can read gets its cache keys from the driver (they hash its files);
        # a Hub commit's are known here
        known = model_is_here(spec.model_path) or hub_identity(spec.model_path)
        return self.repo.create_job(spec, cache_keys(spec) if known else {})

    def submit_remote(self, job_id: str, address: str, resume: bool = False) -> str:
        """Run the job's driver on a Ray cluster through the Ray Jobs API."""
        env = driver_env(os.environ, self.settings.db_url, deploy=self.repo.get_job(job_id).deploy,
                         folders={"QUANTSELECT_HOME": self.settings.home,
                                  "QUANTSELECT_ARTIFACTS_DIR": self.settings.artifacts_dir})
        deadline = time.monotonic() + 180  # a loaded head can take minutes to start its job agent
        try:
            client = jobs_client(address)
            while True:
                try:
                    sid = client.submit_job(
                        entrypoint=f"quantselect run-job {job_id}" + (" --resume" if resume else ""),
                        submission_id=f"quantselect-{job_id}" + (f"-resume-{int(time.time())}" if resume else ""),
                        runtime_env={"env_vars": env},
                    )
                    break
                except RuntimeError as e:
                    # A head that has just started has no job agent yet: Ray says to try again.
                    if "try again" not in str(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(1)
        except Exception as e:  # noqa: BLE001
            if not resume:
                self.repo.set_job_status(job_id, FAILED, error=f"submission to {address} failed: {e}")
            raise QuantselectError(f"cannot submit to the Ray cluster at {address}: {' '.join(str(e).split())[:300]}") from None
        # which Ray job drives it: a driver that dies before it claims the job would leave it queued for
        # ever, as far as the database knows; `status` asks the cluster about it (check_remote_driver)
        self.repo.set_ray_submission(job_id, address, sid)
        return sid

    def check_remote_driver(self, job: Job, timeout: float = RAY_CHECK_SECONDS) -> tuple[Job, str | None]:
        """A job still queued whose driver was submitted to a Ray cluster (`submit --address`): ask the
        cluster about that Ray job. One that ended (failed, stopped, or unknown to the cluster: its head
        restarted) without claiming the job fails it, saying why, unless a driver claimed it meanwhile
        (checked in the update). Returns the job as it stands, and a line to show when the cluster did
        not answer (the job is left as it is then)."""
        found = self.repo.ray_submission(job.id) if job.status == QUEUED else None
        if found is None:
            return job, None
        address, sid = found
        try:
            client = self._ray_client(address, timeout)
            try:
                info = client.get_job_info(sid)
            except RuntimeError as e:
                if "status code 404" not in str(e):
                    raise
                ended, words = "is unknown to that cluster (did its head restart?)", ""
            else:
                if not info.status.is_terminal():
                    return job, None
                ended, words = f"ended {info.status.value}", last_words(client.get_job_logs(sid), info.message)
        except Exception as e:  # noqa: BLE001 - unreachable, timed out, refused: said, never the job's failure
            why = " ".join(str(e).split())[:200] if isinstance(e, (OSError, RuntimeError)) else _one_line(e)[:200]
            return job, f"cannot ask the Ray cluster at {address} about the job's driver, Ray job {sid}: {why}"
        error = (f"its driver, Ray job {sid} on {address}, {ended} before it started the job"
                 + (f": {words}" if words else "") + f"; `quantselect resume {job.id} --address {address}` runs it again")
        if self.repo.fail_unclaimed(job.id, sid, error):
            self._announce_end(job.id)
        return self.repo.get_job(job.id), None

    def _ray_client(self, address: str, timeout: float) -> Any:
        """Ray's Jobs API client for ``address``, each request of which gives up after ``timeout``
        seconds (Ray's own wait as long as the connection does: `status`, or a REST request, would
        hang on an unreachable cluster). Kept: making one asks the cluster twice."""
        client = self._ray_clients.get((address, timeout))
        if client is None:
            from ray.job_submission import JobSubmissionClient

            class Client(JobSubmissionClient):
                def _do_request(self, *args: Any, **kwargs: Any) -> Any:  # every request of the SDK (Ray 2.x)
                    kwargs.setdefault("timeout", timeout)
                    return super()._do_request(*args, **kwargs)

            client = self._ray_clients[(address, timeout)] = jobs_client(address, Client)
        return client

    def follow_remote(self, address: str, submission_id: str, on_text: Callable[[str], None], every: float = 1.0) -> str:
        """The output of a job's driver on a Ray cluster (its progress lines, then its results or its
        error), handed to ``on_text`` as it comes, until that driver ends; returns the Ray job's final
        status (SUCCEEDED, FAILED, STOPPED)."""
        try:
            client = jobs_client(address)
            shown = 0
            while True:
                status = client.get_job_status(submission_id)  # then the logs: complete once it has ended
                logs = client.get_job_logs(submission_id)
                if len(logs) > shown:
                    on_text(logs[shown:])
                    shown = len(logs)
                if status.is_terminal():
                    return status.value
                time.sleep(every)
        except (OSError, RuntimeError) as e:  # (requests' ConnectionError is an OSError, not the builtin)
            raise QuantselectError(f"lost the Ray cluster at {address} while following Ray job {submission_id}: "
                                   f"{' '.join(str(e).split())[:300]}") from None

    # ---- run (the driver) ---------------------------------------------------------------
    def run_job(self, job_id: str, events: Events | None = None, resume: bool = False) -> Job:
        """Drive the job to its end. ``resume``: continue a job whose driver died (or that failed or
        was cancelled): succeeded candidates are kept, per-item results already stored are not
        scored again; refused while another driver's heartbeat is fresh."""
        events = self._staged(job_id, events or Events())
        try:
            self.claim(job_id, resume)
        except CancelledWhileWaiting:  # the claim ended it: said as any end is
            self._announce_end(job_id)
            raise
        try:
            return self._drive(job_id, events)
        finally:
            self._announce_end(job_id)

    def _drive(self, job_id: str, events: Events) -> Job:
        """``run_job`` once this process is the job's driver."""
        beat = self._heartbeat(job_id)
        try:
            try:
                spec, model_dir, model_config, unfetched = _unless_cancelled(beat.cancelled, self._prepare, job_id,
                                                                             events, beat.cancelled)
            except _CancelledMeanwhile:
                self.repo.finish_job(job_id, CANCELLED, error="cancelled by request")
                return self.repo.get_job(job_id)
            finished, partial = self._carry_over(job_id, spec, events, skip={r.name for r in unfetched})
            finished += unfetched
            results = finished
            if len(finished) < len(spec.candidates):  # else all reused or kept: no Ray needed
                results = self._sweep(job_id, spec, model_dir, model_config, finished, partial, events, beat)
            if results is None:
                self.repo.finish_job(job_id, CANCELLED, error="cancelled by request")
                return self.repo.get_job(job_id)
            if self._succeed(job_id, results, spec.deploy) != SUCCEEDED:  # a cancel came in at the very end
                return self.repo.get_job(job_id)
        except KeyboardInterrupt:  # Ctrl-C (SIGINT): the sweep has stopped its workers; `resume` continues
            self.repo.finish_job(job_id, CANCELLED, error=INTERRUPTED)
            raise
        except BaseException as e:
            self.repo.finish_job(job_id, FAILED, error=_one_line(e))
            raise
        finally:
            beat.stop()
        return self._deployed(job_id, spec, events)

    def _announce_end(self, job_id: str) -> None:
        """Post how the job ended to its webhook (``notify``), if it has one: ``{"text": one line, as
        Slack, Mattermost and Teams show it, "job": the job as the REST API gives it}``. A hook that
        does not answer is logged, never the job's failure."""
        try:
            job = self.repo.get_job(job_id)
        except Exception as e:  # noqa: BLE001 - the database is gone too: what the job raised says more
            log.warning("job %s: its end was not announced: %s", job_id, e)
            return
        if not job.notify:
            return
        try:  # the hosts allowed where the job ends: it may have been queued before they were narrowed
            validate_notify(job.notify, self.settings.notify_hosts)
        except QuantselectError as e:
            log.warning("job %s: its end was not announced: %s", job_id, e)
            return
        post_json(job.notify, {"text": end_notice(job), "job": job.to_dict()}, f"job {job_id}'s end")

    def _prepare(self, job_id: str, events: Events, stop: threading.Event
                 ) -> tuple[JobSpec, Path, dict[str, Any] | None, list[CandidateResult]]:
        """What the sweep needs, on the driver's machine: the model and checkpoints named by their Hub
        id fetched, a GGUF model converted (each in a process of its own, stopped by ``stop``), the cache
        keys where submit could not compute them: the job's spec as it now reads, the model's folder
        and config, and the checkpoints not fetched."""
        from quantselect.engines.models import needs_conversion, resolve_model_apart

        spec = self._model_on_driver(job_id, self.repo.get_job_spec(job_id), events, stop)
        spec, unfetched = self._checkpoints_on_driver(job_id, spec, events, stop)
        if events.on_status:
            events.on_status("preparing the model" + (
                ": dequantizing its GGUF file into a safetensors folder, once (later jobs reuse it)"
                if needs_conversion(spec.model_path, self.settings.models_dir) else ""))
        if not any(self.repo.cache_keys(job_id).values()):  # e.g. submitted where the model was not readable
            self._keys_on_driver(job_id, spec)
        model_dir = resolve_model_apart(spec.model_path, self.settings.models_dir, stop)
        model_config = read_model_config(model_dir)
        self.repo.set_model_config(job_id, model_config)
        return spec, model_dir, model_config, unfetched

    def _heartbeat(self, job_id: str) -> "_Heartbeat":
        """This process's sign of life as the job's driver, often enough to stay well inside the staleness limit."""
        return _Heartbeat(self.repo, job_id, interval=min(5.0, self.settings.heartbeat_stale_seconds / 4))

    def _staged(self, job_id: str, events: Events) -> Events:
        """``events`` whose status lines are also written as the job's stage, which `status` and the
        REST job show: what a driver running elsewhere (a cluster, the API server) is doing now."""
        shown = events.on_status

        def on_status(text: str) -> None:
            self.repo.set_job_stage(job_id, text)
            if shown:
                shown(text)

        return replace(events, on_status=on_status)

    def _sweep(self, job_id: str, spec: JobSpec, model_dir: Path, model_config: dict[str, Any] | None,
               finished: list[CandidateResult], partial: dict[str, list[ItemResult]], events: Events,
               beat: "_Heartbeat") -> list[CandidateResult] | None:
        """Run the candidates not yet finished on Ray; None when the job was cancelled meanwhile."""
        from quantselect.engines.worker import EarlyStop
        from quantselect.orchestration.cluster import connect
        from quantselect.orchestration.sweep import SweepHooks, run_sweep

        connect(self.settings, persistent=spec.deploy)
        requests, refused = self._placements(spec, model_config)
        done = {r.name for r in finished}
        for result in (r for r in refused if r.name not in done):  # a finished one stays as it is
            self.repo.save_outcome(job_id, result)
            finished.append(result)
            if events.on_outcome:
                events.on_outcome(result)
        started: set[str] = set()
        written: dict[str, tuple[str, float]] = {}  # name -> the phase text stored, when

        def progress(snapshot: dict[str, tuple[str, int, int]]) -> None:
            now, phases = time.monotonic(), {}
            for name, (phase, done, total) in snapshot.items():
                if phase in (SUCCEEDED, FAILED):
                    continue
                if name not in started:
                    started.add(name)
                    self.repo.mark_candidate_running(job_id, name, datetime.now(timezone.utc))
                text, (last, at) = phase_text(phase, done, total), written.get(name, ("", 0.0))
                # a new phase or step at once; a count that moves within a phase, every few seconds
                if text != last and (text.split(" ")[0] != last.split(" ")[0] or phase == "measuring"
                                     or now - at >= PHASE_WRITE_SECONDS):
                    phases[name] = text
            if phases and self.repo.set_phases(job_id, phases):
                written.update((name, (text, now)) for name, text in phases.items())
            if events.on_progress:
                events.on_progress(snapshot)

        def outcome(result: CandidateResult) -> None:
            self.repo.save_outcome(job_id, result)
            if result.is_baseline and result.reference is not None:
                self._save_reference(job_id, result)
            if events.on_outcome:
                events.on_outcome(result)

        left = len(spec.candidates) - len(finished)
        if events.on_status:
            events.on_status(f"running {left} candidate(s) on Ray" + (f" ({len(finished)} already done)" if finished else ""))
        early_stop = EarlyStop(spec.threshold, spec.confidence) if spec.early_stop else None
        hooks = SweepHooks(on_outcome=outcome, on_items=lambda name, items: self.repo.save_items(job_id, name, items),
                           on_progress=progress, should_stop=beat.cancelled.is_set, dropped=lambda: beat.dropped)
        results = run_sweep(str(model_dir), spec.candidates, spec.dataset, hooks,
                            early_stop=early_stop, calibration=spec.calibration,
                            artifacts_dir=str(self.settings.artifacts_dir), requests=requests, finished=finished,
                            partial=partial, max_retries=self.settings.max_retries,
                            **self._candidate_timeout(spec),
                            stream_chunk=self.settings.stream_chunk, models_dir=str(self.settings.models_dir),
                            autoscaler_node_gpus=self._autoscaler_gpus())
        return None if hooks.stopped else results

    def _candidate_timeout(self, spec: JobSpec) -> dict[str, Any]:
        """How long each candidate may run, and where that was said: the job's own limit
        (``--candidate-timeout``) before this driver's ``QUANTSELECT_CANDIDATE_TIMEOUT``."""
        if spec.candidate_timeout:
            return {"candidate_timeout": spec.candidate_timeout, "timeout_source": "the job's candidate timeout"}
        return {"candidate_timeout": self.settings.candidate_timeout_seconds}

    def _succeed(self, job_id: str, results: list[CandidateResult], deploy: bool = False) -> str:
        baseline = next(r for r in results if r.is_baseline)
        if baseline.status != SUCCEEDED:
            raise QuantselectError(f"the baseline failed, nothing to compare with: {baseline.error}")
        try:
            rec = self.recommend(job_id)  # from the stored results, as `recommend` answers it
        except QuantselectError as e:  # the results stand; `recommend` will say the same
            log.warning("job %s: no recommendation stored: %s", job_id, e)
            answer = None
        else:
            chosen = rec.verdict(rec.chosen) if rec.chosen else None
            answer = {"candidate": rec.chosen, "threshold": rec.threshold,
                      "relative_score": chosen.relative_score if chosen else None,
                      "cost_per_1m_tokens_usd": chosen.cost_per_1m_tokens_usd if chosen else None}
        # A job that asked to be deployed is succeeded and "deploying" in one write: a client that
        # polls it never sees it done, with no base_url, before its deployment has started.
        return self.repo.finish_job(job_id, SUCCEEDED, stage=_DEPLOYING if deploy else None, recommended=answer)

    def _model_on_driver(self, job_id: str, spec: JobSpec, events: Events, stop: threading.Event) -> JobSpec:
        """A model named by its Hub id is fetched here, by the driver (on a cluster, on the cluster),
        into this machine's Hugging Face cache, by a process that ``stop`` kills; the job then records
        that snapshot folder as its model path. A download that fails fails the job, saying where;
        `resume` continues it."""
        from quantselect.engines.models import fetch_apart, hub_id

        if not hub_id(spec.model_path):
            return spec
        if events.on_status:
            events.on_status(f"fetching {spec.model_path} from the Hugging Face Hub (once: later jobs read "
                             f"the cache) on {socket.gethostname()}")
        try:
            path = str(fetch_apart(spec.model_path, stop))
        except InputError as e:
            raise InputError(f"on the driver's machine ({socket.gethostname()}): {e}") from None
        self.repo.set_model_path(job_id, path)
        return replace(spec, model_path=path)

    def _checkpoints_on_driver(self, job_id: str, spec: JobSpec, events: Events, stop: threading.Event
                               ) -> tuple[JobSpec, list[CandidateResult]]:
        """Checkpoint candidates named by their Hub id (pinned at submit to the commit whose config
        was read) are fetched here, by the driver, like the model; the job then records each
        snapshot as its candidate's path, which `deploy` and `export` read. A checkpoint that cannot
        be fetched fails its candidate, saying where and why (returned, and stored); the others run."""
        from quantselect.engines.models import check_model, fetch_apart, hub_id

        fetched, failed = {}, []
        settled = {r.name for r in self.repo.get_results(job_id)
                   if r.status == SUCCEEDED or cancelled_alone(r.status, r.error)}  # (kept by a resume)
        for c in spec.candidates:
            if not (isinstance(c.config, Prequantized) and hub_id(c.config.path)) or c.name in settled:
                continue
            if events.on_status:
                events.on_status(f"fetching checkpoint {c.name} ({c.config.path}) from the Hugging Face Hub on "
                                 f"{socket.gethostname()}")
            try:
                path = fetch_apart(c.config.path, stop)
                check_model(str(path), quantized=True)  # a folder without weights, say
            except InputError as e:
                where = f"{c.config.path}: " if not str(e).startswith(c.config.path) else ""
                result = CandidateResult(name=c.name, config=c.config.to_dict(), status=FAILED,
                                         error=f"not fetched on the driver's machine ({socket.gethostname()}): {where}{e}",
                                         finished_at=datetime.now(timezone.utc))
                self.repo.save_outcome(job_id, result)
                if events.on_outcome:
                    events.on_outcome(result)
                failed.append(result)
                continue
            fetched[c.name] = replace(c.config, path=str(path))
        if fetched:
            self.repo.set_candidate_configs(job_id, {name: config.to_dict() for name, config in fetched.items()})
            spec = replace(spec, candidates=[Candidate(c.name, fetched.get(c.name, c.config)) for c in spec.candidates])
        return spec, failed

    def _keys_on_driver(self, job_id: str, spec: JobSpec) -> None:
        """A job submitted where its model could not be read: the driver checks the model (saying
        where, when it cannot read it either) and stores the cache keys, which hash its files.
        Candidate parameters that do not suit the model then fail their candidate, with the reason."""
        from quantselect.engines.models import check_model

        try:
            check_model(spec.model_path)
        except InputError as e:
            raise InputError(f"on the driver's machine ({socket.gethostname()}): {e}") from None
        self.repo.set_cache_keys(job_id, cache_keys(spec))

    def _deployed(self, job_id: str, spec: JobSpec, events: Events) -> Job:
        """The succeeded job, deployed first when it asked for it. A deployment that fails does not
        fail the job, whose results stand: its reason is kept as the job's ``deploy_error``."""
        if not spec.deploy:
            return self.repo.get_job(job_id)
        if events.on_status:
            events.on_status(_DEPLOYING)
        # Heard from while deploying: `status` tells a deployment whose driver died from one under way.
        beat = self._heartbeat(job_id)
        try:
            self.deploy(job_id)
        except Exception as e:  # noqa: BLE001
            log.warning("job %s succeeded but was not deployed: %s", job_id, _one_line(e))
            self.repo.set_deploy_error(job_id, _one_line(e))
        finally:
            beat.stop()
            self.repo.set_job_stage(job_id, None)
        return self.repo.get_job(job_id)

    def _carry_over(self, job_id: str, spec: JobSpec, events: Events,
                    skip: set[str] = frozenset()) -> tuple[list[CandidateResult], dict[str, list[ItemResult]]]:
        """What this run need not compute: the job's own succeeded candidates (a resumed job), stored
        results of earlier jobs with the same cache key (unless --no-cache), and per-item results
        an interrupted candidate had already stored."""
        from quantselect.engines.labelfree import needs_reference

        stored = {r.name: r for r in self.repo.get_results(job_id)}
        # kept: succeeded ones, and those cancelled on their own (a resume does not run them again)
        finished = [r for r in stored.values() if r.status == SUCCEEDED or cancelled_alone(r.status, r.error)]
        keys = self.repo.cache_keys(job_id) if spec.use_cache else {}
        kept = {r.name for r in finished}
        keys = {n: k for n, k in keys.items() if k and n not in kept and n not in skip}
        devices = None
        if any(self.repo.has_cached(k, exclude_job=job_id) for k in keys.values()):
            # A stored result counts only where it was measured on the hardware this cluster measures
            # on: the baseline is fp32 on a CPU and bf16 on a GPU, and speed is the device's own.
            from quantselect.orchestration.cluster import connect, device_patterns

            connect(self.settings, persistent=spec.deploy)
            devices = device_patterns(autoscaler_gpus=self._autoscaler_gpus())
        for cand in spec.candidates:
            if cand.name not in keys:
                continue
            hit = self.repo.find_cached(keys[cand.name], exclude_job=job_id, devices=devices)
            if hit is None:
                continue
            source, result, items = hit
            result = replace(result, name=cand.name, reused_from=result.reused_from or source, items=items)
            self.repo.save_outcome(job_id, result)
            finished.append(result)
            if events.on_outcome:
                events.on_outcome(result)
        done = {r.name for r in finished}
        base = next((r for r in finished if r.is_baseline), None)
        if base is not None and len(done) < len(spec.candidates):
            if needs_reference(spec.dataset):  # the others compare with its stored reference outputs
                base.reference = self._stored_reference(job_id, spec)
                if base.reference is None:  # none stored (or not for these items): compute them again
                    finished.remove(base)
            if base in finished and (spec.early_stop or base.reference is not None):
                base.items = self.repo.get_item_results(job_id, base.name)[base.name]  # its per-item scores
        done = {r.name for r in finished}  # less a baseline that must run again
        partial = {n: v for n, v in self.repo.get_item_results(job_id).items() if v and n not in done}
        return finished, partial

    def _reference_path(self, job_id: str) -> Path | None:
        """Where the baseline's reference outputs (label-free metrics) are kept: by the baseline's
        cache key, which hashes the model, the items and the generation settings."""
        key = self.repo.cache_keys(job_id).get(BASELINE)
        return self.settings.artifacts_dir / "references" / f"{key}.npz" if key else None

    def _save_reference(self, job_id: str, result: CandidateResult) -> None:
        path = self._reference_path(job_id)
        if path is not None and not path.exists():
            try:
                result.reference.save(path)
            except OSError as e:  # a resume then computes it again
                log.warning("could not keep the baseline's reference outputs at %s: %s", path, e)

    def _stored_reference(self, job_id: str, spec: JobSpec) -> Any:
        from quantselect.engines.labelfree import Reference
        from quantselect.engines.models import touch

        path = self._reference_path(job_id)
        if path is None or not path.is_file():
            return None
        try:
            reference = Reference.load(path)
        except (OSError, ValueError, KeyError) as e:
            log.warning("the stored reference outputs at %s cannot be read (%s); the baseline runs again", path, e)
            return None
        if not reference.matches(spec.dataset):
            return None
        touch(path)  # used: `cache prune --older-than` keeps it
        return reference

    def _autoscaler_gpus(self) -> int | None:
        """QUANTSELECT_AUTOSCALER_NODE_GPUS where this process joins a cluster: a local Ray has no
        autoscaler (the variable kept in a shell for the cluster would leave a local job waiting)."""
        from quantselect.orchestration.cluster import ray_address

        n = self.settings.autoscaler_node_gpus
        if n and not ray_address(self.settings):
            log.warning("QUANTSELECT_AUTOSCALER_NODE_GPUS=%d is ignored: this job runs on a local Ray, which no "
                        "autoscaler grows", n)
            return None
        return n

    def _placements(self, spec: JobSpec, model_config: dict[str, Any] | None) -> tuple[dict[str, Any], list[CandidateResult]]:
        """Each candidate's GPU share from its memory estimate; candidates that fit on no node of the
        cluster are refused here, before the sweep, with the numbers (the baseline's refusal fails the job).
        A node the autoscaler adds (QUANTSELECT_AUTOSCALER_NODE_GPUS) counts, up or not."""
        from quantselect.domain import planner
        from quantselect.orchestration.cluster import gpu_memory_bytes, gpus_per_node

        nodes = gpus_per_node() + [self._autoscaler_gpus() or 0]
        if not any(nodes):
            return {}, []
        try:
            shape = planner.shape_from_config(model_config or {})
        except InputError:
            shape = None
        memory = gpu_memory_bytes(self.settings)
        requests, refused = {}, []
        for cand in spec.candidates:
            need = planner.candidate_need(shape, cand.config) if shape else None
            req = planner.gpu_request(need, memory, max(nodes))
            if req.gpus is None:
                if cand.is_baseline:
                    raise QuantselectError(f"the baseline fits on no node of this cluster: it {req.reason}")
                refused.append(CandidateResult(name=cand.name, config=cand.config.to_dict(), status=FAILED,
                                               error=f"refused before the sweep: it {req.reason}",
                                               finished_at=datetime.now(timezone.utc)))
            requests[cand.name] = req
        return requests, refused

    @property
    def driver_id(self) -> str:
        """This process, as a job's driver (or as the API server that queued it): host:pid."""
        return f"{socket.gethostname()}:{os.getpid()}"

    def claim(self, job_id: str, resume: bool = False) -> Job:
        """Make this process the job's driver (ConflictError while another live driver runs it, or an
        API server holds it queued, or when there is nothing to run); claiming again from the same
        process is allowed."""
        return self.repo.claim_job(job_id, self.driver_id, self.settings.heartbeat_stale_seconds, resume=resume)

    # ---- the API server's queue ------------------------------------------------------------
    def hold_waiting(self, job_ids: list[str]) -> None:
        """This API server's sign of life for the jobs it has queued and not started yet."""
        self.repo.hold_waiting(job_ids, self.driver_id)

    def release_queued(self, job_ids: list[str]) -> None:
        """This API server stops: the jobs it had queued stay queued, for the next server to run."""
        self.repo.release_queued(job_ids, self.driver_id)

    def adopt_queued(self) -> list[str]:
        """The jobs an API server queued and never started before it stopped or died, now this
        server's to run, oldest first."""
        return self.repo.adopt_queued(self.driver_id, self.settings.heartbeat_stale_seconds)

    def queued_by_a_server_gone(self, job: Job) -> bool:
        """A queued job whose API server stopped or died before starting it: the next server on this
        database takes it up (``adopt_queued``), or `resume` runs it elsewhere."""
        if job.status != QUEUED or job.driver is None:
            return False
        return job.heartbeat_at is None or self._silent_for(job) is not None  # released, or silent

    def resume(self, job_id: str, events: Events | None = None) -> Job:
        return self.run_job(job_id, events, resume=True)

    def cancel(self, job_id: str, reason: str | None = None) -> Job:
        """Stop a job: its driver sees the request within seconds, stops its workers (freeing their
        GPUs) and marks it cancelled, with ``reason`` as its error if given (what its webhook says);
        a job that no live driver runs is cancelled at once."""
        return self.repo.request_cancel(job_id, self.settings.heartbeat_stale_seconds, reason)

    def cancel_candidate(self, job_id: str, name: str) -> CandidateResult:
        """Cancel one candidate of a queued or running job (one taking too long, say): the job goes on
        without it, its driver stops its worker within seconds, and a resume leaves it cancelled."""
        return self.repo.cancel_candidate(job_id, name)

    def delete(self, job_id: str) -> Job:
        """Forget a finished job that serves nothing: its record, results and per-item results. Its
        quantized artifacts stay on disk, used by no job any more (``cache prune`` frees them);
        results other jobs reused from it were copied into them and stay."""
        return self.repo.delete_finished_job(job_id)

    # ---- read ---------------------------------------------------------------------------
    def list_jobs(self, limit: int | None = None, statuses: Sequence[str] = (), before: str | None = None) -> list[Job]:
        """Jobs, newest first: the ``limit`` newest, of the given ``statuses`` (all when empty);
        ``before``: those after that job, the next page after one that ended with it."""
        from quantselect.domain.results import JOB_STATUSES

        _check_page(0, limit)
        unknown = [s for s in statuses if s not in JOB_STATUSES]
        if unknown:
            raise InputError(f"status {unknown[0]!r} is not one of {', '.join(JOB_STATUSES)}")
        return self.repo.list_jobs(limit, tuple(statuses), before)

    def get_job(self, job_id: str) -> Job:
        return self.repo.get_job(job_id)

    def driver_silent_for(self, job: Job) -> float | None:
        """Seconds since a running job's driver (or a succeeded one's, while it deploys) was last heard
        from, when that is long enough to call it gone (``heartbeat_stale_seconds``: killed, its machine
        lost; `resume` continues the job, `deploy` serves it); None while it runs, or when it is done."""
        if not (job.status == RUNNING or (job.status == SUCCEEDED and job.stage)):
            return None
        return self._silent_for(job)

    def _silent_for(self, job: Job) -> float | None:
        """Seconds since the job's heartbeat, when that is ``heartbeat_stale_seconds`` or more."""
        if job.heartbeat_at is None:
            return None
        silent = (self.repo.now() - job.heartbeat_at).total_seconds()  # the database's clock, as it was written
        return silent if silent >= self.settings.heartbeat_stale_seconds else None

    def results(self, job_id: str) -> list[CandidateResult]:
        self.repo.get_job(job_id)
        return self.repo.get_results(job_id)

    def item_results(self, job_id: str, offset: int = 0, limit: int | None = None) -> dict[str, list[ItemResult]]:
        """Per candidate its per-item results by item index: all, or a page (``offset``, ``limit``) of each."""
        _check_page(offset, limit)
        return self.repo.get_item_results(job_id, offset=offset, limit=limit)

    def items_stored(self, job_id: str) -> dict[str, int]:
        """Per candidate, how many per-item results are stored: a running candidate's progress as
        another process sees it (workers stream them every ``QUANTSELECT_STREAM_CHUNK`` items)."""
        return self.repo.item_counts(job_id)

    def results_table(self, job_id: str, threshold: float | None = None, confidence: float | None = None,
                      policy: str | None = None, target_gpu: str | None = None,
                      gpu_hour_usd: float | None = None) -> tuple[Job, list[dict[str, Any]], Recommendation]:
        """Per candidate the fields ``results --format json`` promises, plus the recommendation."""
        job = self.get_job(job_id)
        results = self.repo.get_results(job_id)
        rec = self._recommend(job, results, threshold, confidence, policy, target_gpu, gpu_hour_usd)
        stored = self.repo.item_counts(job_id)
        rows = []
        for r in results:
            v = rec.verdict(r.name)
            rows.append({
                "name": r.name, "config": r.config, "status": r.status, "score": r.score, "relative_score": v.relative_score,
                "passed": v.passed, "verdict": v.verdict, "ci_low": v.ci_low, "ci_high": v.ci_high,
                "mcnemar_p": v.mcnemar_p, "items_needed": v.items_needed, "stopped_early": v.stopped_early,
                "n_truncated": r.n_truncated, "weight_bytes": r.weight_bytes, "peak_memory_bytes": r.peak_memory_bytes,
                "quantize_seconds": r.quantize_seconds, "tokens_per_second": r.tokens_per_second,
                "decode_tokens_per_second_b16": r.decode_tokens_per_second_b16,
                "prefill_tokens_per_second": r.prefill_tokens_per_second,
                "cost_per_1m_tokens_usd": v.cost_per_1m_tokens_usd, "cost_source": v.cost_source,
                "target_gpu": rec.target_gpu,
                "target_tokens_per_second": v.cost.throughput.tokens_per_second if v.cost and v.cost.throughput else None,
                "cost_note": v.cost.note if v.cost else None, "perplexity": v.perplexity,
                "disk_bytes": r.disk_bytes, "artifact_path": r.artifact_path, "artifact_reused": r.artifact_reused,
                "error": r.error,
                "eval_seconds": r.eval_seconds, "n_items": r.n_items, "items_stored": stored.get(r.name, 0),
                "device": r.device,
                "throughput_engine": r.throughput_engine, "node_id": r.node_id, "gpu_ids": r.gpu_ids,
                "attempts": r.attempts, "reused_from": r.reused_from, "items_carried": r.items_carried,
                "phase": r.phase if r.status == RUNNING else None,
                "started_at": r.started_at.isoformat() if r.started_at else None,
                "finished_at": r.finished_at.isoformat() if r.finished_at else None,
            })
        return job, rows, rec

    def recommend(self, job_id: str, threshold: float | None = None, confidence: float | None = None,
                  policy: str | None = None, target_gpu: str | None = None,
                  gpu_hour_usd: float | None = None) -> Recommendation:
        job = self.get_job(job_id)
        return self._recommend(job, self.repo.get_results(job_id), threshold, confidence, policy, target_gpu,
                               gpu_hour_usd)

    def compare(self, job_id: str, candidate: str, against: str = BASELINE, limit: int = 10) -> ItemComparison:
        """The items ``candidate`` and ``against`` scored differently, from the stored per-item
        results (a running candidate's so far), with the prompts and what each one answered."""
        if candidate == against:
            raise InputError(f"compare {candidate} with another candidate, not with itself")
        if limit < 0:
            raise InputError(f"--limit {limit} must be 0 or more")
        spec = self.repo.get_job_spec(job_id)
        mine = self.repo.get_item_results(job_id, candidate)[candidate]
        theirs = self.repo.get_item_results(job_id, against)[against]
        for name, rows in ((candidate, mine), (against, theirs)):
            if not rows:
                status = next(r.status for r in self.repo.get_results(job_id) if r.name == name)
                raise InputError(f"{name} has no scored items to compare (it is {status})")
        return compare_items(spec.dataset, candidate, mine, against, theirs, limit)

    def _recommend(self, job: Job, results: list[CandidateResult], threshold: float | None,
                   confidence: float | None = None, policy: str | None = None, target_gpu: str | None = None,
                   gpu_hour_usd: float | None = None) -> Recommendation:
        """Recomputed from the stored per-item results: nothing is evaluated again. Another target
        GPU (and its price) can be asked for: costs are estimated for it unless measured there."""
        from quantselect.domain.gpus import gpu

        t = job.threshold if threshold is None else validate_threshold(threshold)
        c = job.confidence if confidence is None else validate_confidence(confidence)
        p = job.policy if policy is None else validate_policy(policy)
        target = gpu(target_gpu or job.target_gpu)
        if gpu_hour_usd is not None:
            price = validate_price(gpu_hour_usd)
        else:
            price = job.gpu_hour_usd if target.name == job.target_gpu else target.usd_per_hour
        items = self.repo.get_item_results(job.id) if any(r.status == SUCCEEDED for r in results) else {}
        costs = serving_costs(results, job.model_config, target, price)
        return recommend(results, t, costs, items=items, confidence=c, policy=p, target_gpu=target.name)

    # ---- deploy -------------------------------------------------------------------------
    def deploy(self, job_id: str, candidate: str | None = None, engine: str | None = None) -> str:
        """Serve the job's recommended (or the named) candidate; ``engine``: ``static`` or ``dynamic``
        decoding (default: static on a GPU, dynamic on CPU). A candidate of the job served before is
        stopped once the new one answers."""
        from quantselect.engines.models import resolve_model_apart
        from quantselect.orchestration.cluster import connect
        from quantselect.serving.app import check_engine
        from quantselect.serving.deploy import deploy, list_deployments, undeploy

        check_engine(engine)  # before a Ray head is started
        job = self.get_job(job_id)
        name, chosen = self._succeeded_candidate(job, candidate, "deployed")
        config = Candidate.from_dict({"name": name, "config": chosen.config}).config
        if isinstance(config, Prequantized) and config.is_gguf:
            raise ConflictError(f"job {job_id}: {name} is a GGUF file, run by llama.cpp (llama-server -m {config.path}) "
                                "or Ollama, not by quantselect's server; `quantselect export` copies it with its evidence")
        artifact = _artifact(chosen)
        if artifact is None and config.calibrated:
            raise ConflictError(_artifact_gone(job_id, name, chosen))
        connect(self.settings, persistent=True)
        # The saved artifact is what was evaluated: serve it (quantizing again only when there is none).
        # A checkpoint is loaded from its own folder with the model's tokenizer, as it was scored: the
        # base passed is the model.
        if isinstance(config, Prequantized):
            artifact = None
        if artifact is not None:  # used now: a `cache prune --older-than` while the replicas load it keeps it
            from quantselect.engines.artifacts import MARKER

            try:
                os.utime(Path(artifact) / MARKER)
            except OSError:
                pass  # not ours to write: the replica reads it all the same
        model_dir = artifact or resolve_model_apart(job.model_path, self.settings.models_dir)
        use_gpu = bool(chosen.device and chosen.device.startswith("cuda"))
        app = _deployment_name(job_id, name)
        before = job.deployed_candidate and _deployment_name(job_id, job.deployed_candidate)
        # on as many GPUs as it was evaluated on: a candidate too large for one was given several
        try:
            url = deploy(app, str(model_dir), chosen.config, host=self.settings.serve_host, port=self.settings.serve_port,
                         use_gpu=use_gpu, gpus=max(1, len(chosen.gpu_ids)), engine=engine,
                         api_key=self.settings.serve_api_key, replaces=before or None)
        except QuantselectError:
            if before == app and app not in list_deployments():  # the one served, replaced by one that failed
                self.repo.set_deployment(job_id, None, None)
            raise
        self.repo.set_deployment(job_id, name, url)
        if before and before != app and before in list_deployments():
            undeploy(before)
        return url

    def _succeeded_candidate(self, job: Job, candidate: str | None, what: str) -> tuple[str, CandidateResult]:
        """The named candidate of a succeeded job, else the one it recommends."""
        from quantselect.errors import NotFoundError

        if candidate is not None and not candidate:  # not "the recommended one": a client that sent a blank
            raise InputError(f"candidate {candidate!r}: give the name of one of job {job.id}'s candidates, or none "
                             "for the recommended one")
        if job.status != SUCCEEDED:
            raise ConflictError(f"job {job.id} is {job.status}; only a succeeded job can be {what}")
        results = {r.name: r for r in self.repo.get_results(job.id)}
        rec = None if candidate is not None else self._recommend(job, list(results.values()), None)
        name = rec.chosen if candidate is None else candidate
        if name is None:
            raise ConflictError(f"job {job.id}: {rec.message}; name the candidate to use")
        if name not in results:  # as compare and cancel-candidate answer it
            raise NotFoundError(f"job {job.id!r} has no candidate {name!r}")
        if results[name].status != SUCCEEDED:
            raise InputError(f"job {job.id}: candidate {name!r} did not succeed and cannot be {what}")
        return name, results[name]

    def undeploy(self, job_id: str) -> str:
        """Stop serving the job's deployed candidate; returns the deployment's name. The job forgets
        it even when it no longer runs (the cluster was stopped)."""
        from quantselect.orchestration.cluster import cluster_exists, connect
        from quantselect.serving.deploy import list_deployments, undeploy

        job = self.get_job(job_id)
        if job.deployed_candidate is None:
            raise ConflictError(f"job {job_id} is not deployed")
        app = _deployment_name(job_id, job.deployed_candidate)
        if cluster_exists(self.settings):  # none: nothing is served, and none is started to find that out
            connect(self.settings, persistent=True)
            if app in list_deployments():
                undeploy(app)
        self.repo.set_deployment(job_id, None, None)
        return app

    # ---- export ----------------------------------------------------------------------------
    def export(self, job_id: str, dest: str | Path, candidate: str | None = None) -> tuple[str, Path]:
        """Write the job's recommended (or named) candidate to the new folder ``dest`` in the Hugging
        Face layout other engines load, with a model card (README.md) carrying the evidence and
        ``quantselect-evidence.json``. Returns the candidate's name and the folder."""
        import json

        from quantselect.domain.candidates import FullPrecision, HalfPrecision
        from quantselect.engines import artifacts
        from quantselect.engines.models import hub_id, resolve_model_apart
        from quantselect.render import model_card

        job = self.get_job(job_id)
        name, chosen = self._succeeded_candidate(job, candidate, "exported")
        out = Path(dest).expanduser().absolute()
        if out.exists() and not (out.is_dir() and not any(out.iterdir())):
            raise InputError(f"{dest}: already exists; name a new (or empty) folder to export to")
        _, rows, rec = self.results_table(job_id)
        differs = self.compare(job_id, name, limit=3) if name != BASELINE else None  # its worst items, shown
        evidence = {"job": job.to_dict(), "candidate": name, "results": rows, "recommendation": rec.to_dict(),
                    "compare": differs.to_dict() if differs else None}
        config = Candidate.from_dict({"name": name, "config": chosen.config}).config
        gguf = Path(config.path) if isinstance(config, Prequantized) and config.is_gguf else None
        hub = hub_id(job.model)  # the Hub links a card naming its base model from that model's page
        files = {"README.md": model_card(job, name, rows, rec, str(out), differs, gguf_file=gguf and gguf.name,
                                         kv_cache=config.kv_cache, checkpoint=isinstance(config, Prequantized),
                                         base_model=hub[0] if hub and not hub[2] else None,
                                         quantized=config.weight_bits < 16),
                 "quantselect-evidence.json": json.dumps(evidence, indent=2, default=str)}
        artifact = _artifact(chosen)
        if gguf:  # the file itself, as llama.cpp and Ollama run it
            if not gguf.is_file():
                raise ConflictError(f"job {job_id}: {name}'s GGUF file {gguf} is no longer there")
            artifacts.export_file(gguf, out, files)
        elif artifact:  # a checkpoint's own tokenizer may differ from the model's, with which it was scored
            artifacts.export_folder(artifact, out, files, tokenizer_from=resolve_model_apart(job.model_path, self.settings.models_dir)
                                    if isinstance(config, Prequantized) else None)
        elif isinstance(config, FullPrecision):  # the reference is the base model as it is
            artifacts.export_folder(resolve_model_apart(job.model_path, self.settings.models_dir), out, files)
        elif isinstance(config, HalfPrecision):
            artifacts.export_converted(resolve_model_apart(job.model_path, self.settings.models_dir), config, out, files)
        elif chosen.artifact_path:
            raise ConflictError(_artifact_gone(job_id, name, chosen))
        else:
            raise ConflictError(f"job {job_id}: {name} was quantized in memory only on {chosen.device} (no standard "
                                "serialized form there, e.g. w8a8 on a CPU), so there is nothing to export; a job "
                                "on a GPU saves it")
        return name, out

    # ---- the disk cache --------------------------------------------------------------------
    def cache_entries(self) -> list[CacheEntry]:
        """What the artifacts and models folders hold, oldest use first, each with the jobs that
        point at it."""
        return sorted(self._cache()[0], key=lambda e: e.last_used)

    def _cache(self) -> tuple[list[CacheEntry], list[Any]]:
        """Every entry on disk with the jobs that point at it, and the database's uses."""
        from quantselect.engines.artifacts import scan
        from quantselect.engines.models import scan_converted

        uses = self._candidate_uses()
        found = scan(self.settings.artifacts_dir) + scan_converted(self.settings.models_dir)
        return attach_uses(found, uses), uses

    def _candidate_uses(self) -> list[Any]:
        """The database's uses, the demo model named by the GGUF file it is converted from."""
        from quantselect.engines.models import DEMO, demo_gguf_path

        uses = self.repo.candidate_uses()
        if any(u.model_path == DEMO for u in uses):
            try:
                demo = str(demo_gguf_path())
            except InputError:  # not installed here: no converted demo model to match either
                return uses
            uses = [replace(u, model_path=demo) if u.model_path == DEMO else u for u in uses]
        return uses

    def prune_cache(self, keys: list[str] | tuple[str, ...] = (), older_than: str | None = None,
                    everything: bool = False, dry_run: bool = False) -> PrunePlan:
        """Remove what ``plan_prune`` selects (see there for what is always kept); with ``dry_run``
        only say so. An entry a process has locked (a job building or loading it) is kept too.
        The database is not touched: stored results stay valid without their artifacts."""
        from quantselect.engines.artifacts import remove

        age = timedelta(seconds=parse_duration(older_than, "--older-than", bare_seconds=False)) if older_than is not None else None
        entries, uses = self._cache()
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        plan = plan_prune(entries, uses, now, keys=keys, older_than=age, everything=everything)
        if dry_run:
            return plan
        removed, keep = [], list(plan.keep)
        for e in plan.remove:
            if remove(e):
                removed.append(e)
            else:
                keep.append((e, "a process is building or loading it right now"))
        return PrunePlan(removed, keep)

    # ---- doctor ---------------------------------------------------------------------------
    def doctor(self) -> dict[str, Any]:
        """Every part of this machine's set-up a job needs, checked without changing anything (no
        database file created, no Ray started): what was found, and what to do where it is not ok;
        ``failed`` when a job would fail."""
        import platform

        from quantselect import __version__

        checks: list[Check] = []
        for name, check in (("database", self._database_check), ("storage", self._storage_checks),
                            ("ray", self._ray_check), ("autoscaler", self._autoscaler_check),
                            ("machine", self._machine_checks), ("hugging face", self._hub_check),
                            ("access", self._access_check)):
            try:
                found = check()
            except Exception as e:  # noqa: BLE001 - one check that breaks is a failed line, not a traceback
                found = Check(name, FAIL, f"could not be checked: {_one_line(e)}")
            checks += found if isinstance(found, list) else [found]
        return {"quantselect": __version__, "python": platform.python_version(), "platform": platform.platform(),
                "checks": [c.to_dict() for c in checks], "failed": failed(checks)}

    def _database_check(self) -> Check:
        from quantselect.db.engine import known_revisions, probe, shown_url

        try:
            url = shown_url(self.settings.db_url)
        except Exception:  # noqa: BLE001 - not a URL at all
            return Check("database", FAIL, "QUANTSELECT_DB_URL is not a database URL: give sqlite:///PATH or "
                                           "postgresql://USER@HOST/DB")
        try:
            revision, head = probe(self.settings.db_url)
        except FileNotFoundError:
            return Check("database", OK, f"{url}: no file yet, created on first use (or by `quantselect db upgrade`)")
        except Exception as e:  # noqa: BLE001 - unreachable, refused, bad credentials: said in one line
            cause = getattr(e, "orig", None) or e
            return Check("database", FAIL, f"{url}: cannot connect ({' '.join(str(cause).split())[:200]}); start it "
                                           "or fix QUANTSELECT_DB_URL")
        if revision == head:
            return Check("database", OK, f"{url}: schema {revision}, this quantselect's")
        if revision is None or revision in known_revisions():
            return Check("database", OK, f"{url}: schema {revision or 'none yet'}, migrated to {head} on first use "
                                         "(or by `quantselect db upgrade`)")
        return Check("database", FAIL, f"{url}: schema {revision}, which this quantselect (up to {head}) does not know; "
                                       "upgrade quantselect")

    def _storage_checks(self) -> list[Check]:
        """Free space where quantized models, converted models and downloads go."""
        import shutil

        from huggingface_hub import constants

        places = {"home": self.settings.home, "artifacts": self.settings.artifacts_dir,
                  "hub cache": Path(constants.HF_HUB_CACHE)}
        checks = []
        for name, path in places.items():
            there = next(p for p in (path, *path.parents) if p.exists())  # what will hold it once created
            free = shutil.disk_usage(there).free
            where = f"{path}{'' if there == path else ' (not created yet)'}: {free / 2**30:.1f} GiB free"
            if not os.access(there, os.W_OK):
                checks.append(Check(name, FAIL, f"{where}, but not writable by this user"))
            elif free < DOCTOR_LOW_DISK:
                checks.append(Check(name, WARN, f"{where}; a 7B model takes ~15 GiB in bf16 and ~5 GiB per 4-bit "
                                                "artifact: free some (`quantselect cache prune`) or move it"))
            else:
                checks.append(Check(name, OK, where))
        return checks

    def _ray_check(self) -> Check:
        from quantselect.orchestration.cluster import address_answers, local_head_is_up

        address = self.settings.ray_address or os.environ.get("RAY_ADDRESS")
        if not address:
            head = f"127.0.0.1:{self.settings.local_ray_port}"
            return Check("ray", OK, "no cluster set: each job starts a local Ray; the one `deploy` and `api` keep "
                                    f"at {head} is {'running' if local_head_is_up(self.settings) else 'not running'}")
        variable = "QUANTSELECT_RAY_ADDRESS" if self.settings.ray_address else "RAY_ADDRESS"
        if address.startswith(("http://", "https://")):  # every job would fail in cluster.connect
            return Check("ray", FAIL, f"{variable} {address} is a dashboard URL, which jobs cannot join: give "
                                      "HOST:6379 or ray://HOST:10001, or submit to it with --address")
        answers = address_answers(address)
        if answers is None:
            return Check("ray", INFO, f"joins {address} (not checked: it names no port)")
        if not answers:
            return Check("ray", FAIL, f"nothing answers at {address} ({variable}): start the cluster, "
                                      "or fix or unset the variable")
        return Check("ray", OK, f"joins {address}, which answers")

    def _autoscaler_check(self) -> Check:
        n = self.settings.autoscaler_node_gpus
        if not n:
            return Check("autoscaler", INFO, "QUANTSELECT_AUTOSCALER_NODE_GPUS unset: a job plans for the GPU nodes up "
                                             "when it starts (set it where an autoscaler adds GPU nodes on demand)")
        from quantselect.orchestration.cluster import ray_address

        try:
            joined = ray_address(self.settings)
        except InputError:  # (the ray check says what is wrong with it)
            joined = None
        plan = (f"plan for nodes of {n} GPU{'s' if n > 1 else ''} the autoscaler adds, and their candidates wait for "
                "one (up to 30 min)")
        # unjoined is no mistake: a laptop that submits with --address hands it to the driver on the cluster
        found = f"QUANTSELECT_AUTOSCALER_NODE_GPUS {n}: jobs {plan}" if joined else (
            f"QUANTSELECT_AUTOSCALER_NODE_GPUS {n} applies to jobs submitted with --address and where "
            f"QUANTSELECT_RAY_ADDRESS is set (jobs run here, on a local Ray, ignore it): they {plan}")
        if self.settings.gpu_memory:
            return Check("autoscaler", INFO, found)
        return Check("autoscaler", WARN, f"{found}; while no GPU node is up its GPU memory is unknown, so every "
                                         "candidate is planned on one whole GPU (one that needs several runs out of "
                                         "memory): set QUANTSELECT_GPU_MEMORY to the memory of one of its GPUs")

    def _machine_checks(self) -> list[Check]:
        """This machine's GPUs, libraries, the candidates it can run and the bundled demo model."""
        from quantselect.engines.environment import accelerators, library_versions
        from quantselect.engines.models import demo_gguf_path

        found = accelerators()
        here = " (this machine's; the cluster's nodes may differ)" if self.settings.ray_address else ""
        if found["gpus"]:
            kinds = Counter(f"{g['name']} ({g['memory_bytes'] / 2**30:.1f} GiB, compute {g['capability']})"
                            for g in found["gpus"])
            gpus = Check("gpus", OK, ", ".join(f"{n}x {k}" for k, n in kinds.items()) + f", CUDA {found['torch_cuda']}"
                         + here)
        else:
            build = f"CUDA {found['torch_cuda']} build" if found["torch_cuda"] else "a CPU build"
            gpus = Check("gpus", INFO, f"none: torch is {build} and sees no CUDA GPU, so candidates run on CPU" + here)
        versions = library_versions()
        libraries = Check("libraries", INFO, ", ".join(f"{k} {v or '-'}" for k, v in versions.items()))
        rows = self.candidates()
        missing = [r["name"] for r in rows if r["default"] and not r["available"]]
        unavailable = [f"{r['name']} ({r['reason']})" for r in rows if not r["available"]]
        detail = f"{len(rows) - len(unavailable)} of {len(rows)} run here" + (
            f"; not: {'; '.join(unavailable)}" if unavailable else "")
        candidates = Check("candidates", WARN if missing else OK,
                           detail + (f"; default ones missing: {', '.join(missing)}" if missing else ""))
        try:
            demo = Check("demo model", OK, str(demo_gguf_path()))
        except InputError as e:
            demo = Check("demo model", WARN, str(e))
        return [gpus, libraries, candidates, demo]

    def _hub_check(self) -> Check:
        from huggingface_hub import constants, get_token

        online = "offline (HF_HUB_OFFLINE: only the cache answers)" if constants.HF_HUB_OFFLINE else "online"
        token = "a token is set" if get_token() else "no token (gated and private models need `hf auth login` or HF_TOKEN)"
        endpoint = "" if constants.ENDPOINT == "https://huggingface.co" else f" at {constants.ENDPOINT}"
        return Check("hugging face", INFO, f"{online}{endpoint}; {token}")

    def _access_check(self) -> Check:
        """Who may use what this machine serves: the REST API and the deployments."""
        api = "set" if self.settings.api_token else ("unset (on 127.0.0.1, the default, every user of this machine "
                                                     "can call it: on a shared machine, set one)")
        key = "set" if self.settings.serve_api_key else "unset"
        paths = ", ".join(map(str, self.settings.api_paths)) if self.settings.api_paths else "unset (any file)"
        hosts = ", ".join(self.settings.notify_hosts) if self.settings.notify_hosts else "unset (any but link-local and metadata)"
        detail = (f"QUANTSELECT_API_TOKEN {api}; QUANTSELECT_API_PATHS {paths}; QUANTSELECT_NOTIFY_HOSTS {hosts}; "
                  f"QUANTSELECT_SERVE_API_KEY {key}")
        warnings = []
        if not is_loopback(self.settings.serve_host) and not self.settings.serve_api_key:
            warnings.append(f"deployments listen on {self.settings.serve_host} and answer anyone who reaches them; "
                            "set QUANTSELECT_SERVE_API_KEY")
        return Check("access", WARN, f"{detail}: {'; '.join(warnings)}") if warnings else Check("access", INFO, detail)

    # ---- plan -----------------------------------------------------------------------------
    def candidates(self) -> list[dict[str, Any]]:
        """Every candidate of the catalog: its parameters and defaults, and whether this machine can
        run it (and why not)."""
        from quantselect.domain.candidates import CATALOG
        from quantselect.engines.quantize import availability

        rows = []
        for name, config in CATALOG.items():
            reason = availability(config)
            rows.append({"name": name, "available": reason is None, "reason": reason,
                         "default": name in DEFAULT_CANDIDATES or name == BASELINE, "description": config.description,
                         "parameters": config.parameters(), "calibrated": config.calibrated,
                         "bytes_per_weight": round(config.bytes_per_weight(), 4), "config": config.to_dict()})
        return rows

    def gpus(self) -> list[dict[str, Any]]:
        """The target GPUs costs are quoted for (``--target-gpu``): memory, bandwidth, compute, price."""
        from quantselect.domain.gpus import GPUS

        return [g.to_dict() for g in GPUS.values()]

    def plan(self, model: str, gpu: str | None = None, gpu_memory: str | None = None, context: int | None = None,
             batch: int = 1, kv_cache: str = "bf16", readable: tuple[Path, ...] | None = None) -> dict[str, Any]:
        """Memory per precision and GPUs needed, from the model's config.json alone (or a GGUF
        file's header). ``readable``: as ``SubmitRequest.readable``."""
        from quantselect.engines.models import names_from_afar

        with names_from_afar(readable is not None):
            return self._plan(model, gpu, gpu_memory, context, batch, kv_cache, readable)

    def _plan(self, model: str, gpu: str | None, gpu_memory: str | None, context: int | None, batch: int,
              kv_cache: str, readable: tuple[Path, ...] | None) -> dict[str, Any]:
        import json

        from quantselect.domain import planner
        from quantselect.domain.dataset import stat_errors
        from quantselect.engines.models import from_hub, gguf_file, gguf_model_config, gguf_quantization, hub_name, shown

        model = hub_name(model)
        if readable is not None:
            only_under(readable, models={"model": model})
        path = from_hub(model, config_only=True) or Path(model).expanduser()
        with stat_errors("model", model):
            gguf = gguf_file(model) or gguf_file(str(path))  # the demo's; a .gguf path, or one of a Hub repository
            config = path / "config.json" if path.is_dir() else path
            found = config.is_file()
        if gguf is not None:
            cfg, where = gguf_model_config(gguf), shown(gguf)
        else:
            if not found:
                raise InputError(f"{model}: no config.json there (give a model folder, its config.json or a .gguf file)")
            try:
                cfg = json.loads(config.read_text())
            except (OSError, ValueError, RecursionError) as e:  # (nested too deep for the parser)
                raise InputError(f"{config}: not a readable JSON config ({e})") from None
            where = str(config)
        shape = planner.shape_from_config(cfg, where)
        gpu_name, memory = planner.gpu_memory(gpu, gpu_memory)
        ctx = context or min(shape.max_context or 8192, 8192)
        files = None
        if gguf is not None:  # the file itself, exactly
            q = gguf_quantization(gguf)
            files = {f"{q['file_type']} (this file)": (q["tensor_bytes"], f"the GGUF file as it is: "
                                                      f"{q['bits_per_weight']} bits per weight, every tensor counted")}
        rows = planner.plan(shape, memory, ctx, batch, kv_cache, files)
        return {"model": str(model), "params": shape.params, "gpu": gpu_name, "gpu_memory_bytes": memory,
                "context": ctx, "batch": batch, "kv_cache": kv_cache, "precisions": [r.to_dict() for r in rows],
                "notes": planner.plan_notes(shape, ctx)}

    def demo_request(self, deploy: bool = False, limit: int = DEMO_LIMIT) -> SubmitRequest:
        return SubmitRequest(model="demo", dataset=str(examples_dir() / DEMO_DATASET), limit=limit,
                             deploy=deploy, candidates=list(demo_candidates()))


class _Heartbeat:
    """The driver's sign of life in the job row, every ``interval`` seconds, from a thread (so that a
    long model conversion does not make the job look abandoned); ``cancelled`` is set once the job
    is asked to cancel, ``dropped`` names the candidates cancelled on their own."""

    def __init__(self, repo: Any, job_id: str, interval: float) -> None:
        self.cancelled = threading.Event()
        self.dropped: frozenset[str] = frozenset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(repo, job_id, interval), daemon=True,
                                        name=f"quantselect-heartbeat-{job_id}")
        self._thread.start()

    def _run(self, repo: Any, job_id: str, interval: float) -> None:
        while not self._stop.is_set():
            answer = repo.heartbeat(job_id)
            if answer is not None:
                cancel, self.dropped = answer
                if cancel:
                    self.cancelled.set()
            self._stop.wait(interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class _CancelledMeanwhile(Exception):
    """The job was cancelled while its driver prepared it."""


def _unless_cancelled(cancelled: threading.Event, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, given up as soon as ``cancelled`` is set (``_CancelledMeanwhile``): a download of
    a 70B model, or the conversion of its GGUF file, takes long enough for a user to cancel it. ``fn``
    runs in a thread of its own, which cannot be stopped from outside: it stops itself, seeing the
    same event (a download's or a conversion's process is killed, ``Stopped``), and what it wrote
    stays for a `resume` (a download goes on from where it stopped)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e

    worker = threading.Thread(target=run, daemon=True, name=f"quantselect-prepare-{threading.get_ident()}")
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
        if cancelled.is_set():  # also when fn has just ended, stopped by it (a conversion is)
            worker.join(5)  # it kills its child process within 0.5 s: before this process may exit
            raise _CancelledMeanwhile()
    if "error" in box:
        raise box["error"]
    return box["value"]


def post_json(url: str, payload: dict[str, Any], what: str, attempts: int = 3, timeout: float = 5.0) -> bool:
    """POST ``payload`` as JSON, trying ``attempts`` times (1 s, 2 s apart); False, logged, when every
    try failed (no answer, or a status other than 2xx). Redirects are not followed, and nothing is
    sent to a host whose name resolves to a link-local or cloud metadata address: checked on the
    address connected to, or, through a proxy (``https_proxy``...), on the name resolved here. A user
    and password in the URL (%-decoded) are sent as basic authentication, never in the URL posted to."""
    import base64
    import json
    import urllib.error
    import urllib.request
    from urllib.parse import unquote_to_bytes, urlsplit, urlunsplit

    try:
        parts = urlsplit(url.strip())
    except ValueError:  # its message may quote the URL, a secret
        log.warning("could not post %s to %s: not a URL", what, shown_url(url))
        return False
    # urllib would take `user:password@host` for the host: as curl and requests do, they go apart, in an
    # Authorization header, to the URL without them (which a proxy would be asked for)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    auth = "Basic " + base64.b64encode(unquote_to_bytes(user) + b":" + unquote_to_bytes(password)).decode()
    target = urlunsplit(parts._replace(netloc=hostport)) if at else url
    body = json.dumps(payload, default=str).encode()
    opener = _webhook_opener()
    last: object = None
    for attempt in range(attempts):
        try:
            _refuse_proxied_metadata(target)
            request = urllib.request.Request(target, data=body, method="POST",
                                             headers={"Content-Type": "application/json", "User-Agent": "quantselect"})
            if user or password:  # unredirected: were a redirect followed, never to another host
                request.add_unredirected_header("Authorization", auth)
            with opener.open(request, timeout=timeout):
                return True
        except urllib.error.HTTPError as e:
            last = f"{e.code} {e.reason}" + (" (a redirect, not followed)" if 300 <= e.code < 400 else "")
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = getattr(e, "reason", None) or e
        if attempt + 1 < attempts:
            time.sleep(2**attempt)
    log.warning("could not post %s to %s: %s", what, shown_url(url), last)
    return False


def _refuse_metadata(host: str, found: list[str]) -> None:
    bad = [address for address in found if metadata_address(address)]
    if bad:
        raise OSError(f"{host} resolves to {bad[0]}, a link-local or cloud metadata address, which is never a "
                      "webhook: not posted")


def _refuse_proxied_metadata(url: str) -> None:
    """Through a proxy, which connects for us: the name as it resolves here (where it does)."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in urllib.request.getproxies() or urllib.request.proxy_bypass(host):
        return
    try:
        found = [info[4][0] for info in socket.getaddrinfo(host, parts.port or 443, 0, socket.SOCK_STREAM)]
    except OSError:  # only the proxy resolves it: its own rules apply
        return
    _refuse_metadata(host, found)


def _connect_checked(address: tuple[str, int], timeout: Any = None, source_address: Any = None,
                     *args: Any, **kwargs: Any) -> Any:
    """``socket.create_connection`` that refuses a host whose name resolves to a link-local or cloud
    metadata address, connecting to the very address checked."""
    import socket

    host, port = address
    found = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    _refuse_metadata(host, [info[4][0] for info in found])
    last: OSError = OSError(f"{host} resolves to no address")
    for info in found:
        try:
            return socket.create_connection(info[4][:2], timeout, source_address)
        except OSError as e:
            last = e
    raise last


_ENVIRON = threading.Lock()


def jobs_client(address: str, cls: Any = None) -> Any:
    """Ray's Jobs API client for ``address``. Ray's own takes RAY_API_SERVER_ADDRESS, else RAY_ADDRESS,
    over the address it is given: a shell set up for another cluster's dashboard would get the job, and
    one that joins a cluster by HOST:6379 (as QUANTSELECT_RAY_ADDRESS may) would ask that head's GCS.
    They are set aside while it is made (it reads them then, only)."""
    if cls is None:
        from ray.job_submission import JobSubmissionClient as cls

    with _ENVIRON:
        kept = {name: os.environ.pop(name) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if name in os.environ}
        try:
            return cls(address)
        finally:
            os.environ.update(kept)


def _webhook_opener() -> Any:
    """A urllib opener that follows no redirect and connects to no link-local or metadata address."""
    import http.client
    import urllib.request

    def checked(connection: type) -> type:
        class Checked(connection):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self._create_connection = _connect_checked

        return Checked

    http_conn, https_conn = checked(http.client.HTTPConnection), checked(http.client.HTTPSConnection)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:  # the 3xx is raised as an HTTPError
            return None

    class CheckedHTTP(urllib.request.HTTPHandler):
        def http_open(self, req: Any) -> Any:
            return self.do_open(http_conn, req)

    class CheckedHTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req: Any) -> Any:
            return self.do_open(https_conn, req, context=self._context)

    return urllib.request.build_opener(NoRedirect, CheckedHTTP, CheckedHTTPS)


def driver_env(environ: Mapping[str, str], db_url: str, deploy: bool,
               folders: Mapping[str, Path] | None = None) -> dict[str, str]:
    """What a driver submitted to a cluster (Ray Jobs API) gets of this process's settings: this
    database and every QUANTSELECT_* variable (artifact storage, GPU memory, retries...), but not the
    REST API's token, which it never needs, nor the deployments' key unless the job deploys: a job's
    variables are shown to whoever reaches the cluster's dashboard. ``folders``: the folder settings
    as this process resolved them (absolute: a relative one would name another folder there)."""
    kept = {k: v for k, v in environ.items() if k.startswith("QUANTSELECT_") and k not in (
        "QUANTSELECT_RAY_ADDRESS", "QUANTSELECT_API_TOKEN", *(() if deploy else ("QUANTSELECT_SERVE_API_KEY",)))}
    kept.update({k: str(path) for k, path in (folders or {}).items() if environ.get(k)})
    return {**kept, "QUANTSELECT_DB_URL": db_url}


PATH_MAX = 4096  # Linux's: the longest path a file can be opened by


def only_under(readable: tuple[Path, ...], files: Mapping[str, str | None] | None = None,
               models: Mapping[str, str] | None = None) -> None:
    """Refuse (``ForbiddenError``) a file or folder of this machine outside the ``readable`` folders
    (links followed), whether it exists or not, so that the answer says nothing of what is there.
    ``files`` and ``models`` by what they are (``dataset``, ``model``...). ``hf://`` files, and models
    named by their Hub id or ``demo``, are not this machine's."""
    from quantselect.domain.dataset import stat_errors
    from quantselect.engines.models import DEMO, hub_id

    folders = [Path(os.path.realpath(f)) for f in readable]
    here = [(what, f) for what, f in (files or {}).items() if f and not f.startswith("hf://")] + [
        (what, m) for what, m in (models or {}).items() if m != DEMO and not hub_id(m)]
    for what, name in here:
        if len(name) > PATH_MAX:  # no file has it (and realpath would take time quadratic in its segments)
            with stat_errors(what, name):
                raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        try:
            real = Path(os.path.realpath(Path(name).expanduser()))
        except (ValueError, OSError, RuntimeError):  # a NUL byte, ~nosuchuser, say: nothing this machine holds
            real = None
        if real is None or not any(real.is_relative_to(f) for f in folders):
            raise ForbiddenError(f"{name}: outside the folders this server reads (QUANTSELECT_API_PATHS: "
                                 f"{', '.join(map(str, readable))}); put it there, or name it on the Hugging Face Hub")


def _check_page(offset: int, limit: int | None) -> None:
    if not 0 <= offset <= MAX_PAGE:
        raise InputError(f"offset {offset} must be from 0 to {MAX_PAGE}")
    if limit is not None and not 1 <= limit <= MAX_PAGE:
        raise InputError(f"limit {limit} must be from 1 to {MAX_PAGE}")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_LOG_RECORD = re.compile(r"^(\(.*?\) )?\[?\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d\S*\]?\s.*\b(DEBUG|INFO|WARNING)\b")
_ERROR_LINE = re.compile(r"^(Error: |[\w.]*(Error|Exception)(: |$))")


def last_words(logs: str, message: str | None = None) -> str:
    """The line of a driver's output that says why it ended: its last error line (ours, `Error: ...`,
    or a traceback's last), else its last line that is not Ray's logging; else the first line of
    Ray's own ``message`` (a runtime environment that failed to set up writes no output)."""
    lines = [line.strip() for line in _ANSI.sub("", logs or "").splitlines()]
    lines = [line for line in lines if line and not _LOG_RECORD.match(line)]
    errors = [line for line in lines if _ERROR_LINE.match(line)]
    said = (errors or lines or [(message or "").strip().split("\n")[0]])[-1]
    return " ".join(said.split())[:300]


def _one_line(e: BaseException) -> str:
    """An error as the job row keeps it: our own errors as they are, any other with its type."""
    return str(e) if isinstance(e, QuantselectError) else f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"


def _artifact(result: CandidateResult) -> str | None:
    """The candidate's saved quantized model, if it is still on disk."""
    return result.artifact_path if result.artifact_path and Path(result.artifact_path).is_dir() else None


def _artifact_gone(job_id: str, name: str, result: CandidateResult) -> str:
    return (f"job {job_id}: the quantized model of {name} is no longer at {result.artifact_path} (pruned?); "
            "submit the job again with --no-cache (a stored result is otherwise reused without quantizing) to rebuild it")


def cache_keys(spec: JobSpec) -> dict[str, str]:
    """Each candidate's result cache key (see ``results.result_cache_key``)."""
    from quantselect.domain.results import result_cache_key
    from quantselect.engines.models import model_fingerprint

    model = model_fingerprint(spec.model_path)
    dataset = {k: v for k, v in spec.dataset.to_dict().items() if k != "source"}
    evaluation = {"early_stop": spec.early_stop}
    if spec.early_stop:
        evaluation.update(threshold=spec.threshold, confidence=spec.confidence)
    calibration = spec.calibration.texts if spec.calibration else None
    return {c.name: result_cache_key(model, dataset, _checkpoint_config(c.config), calibration if c.config.calibrated
                                     else None, evaluation)
            for c in spec.candidates}


def _checkpoint_config(config: Any) -> dict[str, Any]:
    """A candidate's config for its cache key; a checkpoint quantized elsewhere adds its files'
    fingerprint, so a folder replaced in place is evaluated again, and the tokenizer it is scored
    with (the model's since this was added: results stored before, scored with the checkpoint's own,
    are not reused)."""
    from quantselect.engines.models import hub_identity, model_fingerprint

    d = config.to_dict()
    if isinstance(config, Prequantized):
        if hub_identity(config.path):  # a Hub commit: its pinned id at submit, its snapshot on the driver
            d = {**d, "_data": {k: v for k, v in d["_data"].items() if k != "path"}}
        return {**d, "checkpoint": model_fingerprint(config.path), "tokenizer": "model"}
    return d


def serving_costs(results: list[CandidateResult], model_config: dict[str, Any] | None, target: Any,
                  price: float) -> dict[str, Any]:
    """Each candidate's cost on the target GPU: measured there, else the roofline estimate."""
    from quantselect.domain import cost, planner
    from quantselect.domain.candidates import config_from_dict

    shape = None
    if model_config:
        try:
            shape = planner.shape_from_config(model_config)
        except InputError:
            shape = None
    out = {}
    for r in results:
        try:
            config = config_from_dict(r.config)
        except InputError:
            continue
        out[r.name] = cost.serving_cost(config, shape, target, price, cost.measured_on(r, target))
    return out


def model_is_here(model: str) -> bool:
    """Whether this process can read the model (the bundled demo, or a path that exists)."""
    from quantselect.domain.dataset import stat_errors
    from quantselect.engines.models import DEMO

    if model == DEMO:
        return True
    with stat_errors("model", model):  # a name too long for a path, say: one line, not a 500
        return Path(model).expanduser().exists()


def resolve_checkpoints(candidates: list[Candidate], model_path: str | None) -> list[Candidate]:
    """Candidates given as ``LABEL=PATH`` (checkpoints quantized elsewhere): a Hugging Face folder or
    a ``.gguf`` file of the same vocabulary as the model; its quantization (method, bits, group size;
    a GGUF file's type and bits per weight) is read here, at submit, so the path must be readable
    here (on a cluster: the same path on shared storage).

    A checkpoint named by its Hub id is read from its ``config.json`` alone (a GGUF file: that file,
    whose header is its config) and recorded pinned to the commit read, ``owner/name@commit``: the
    job's driver fetches that very commit's weights on its machine (``_checkpoints_on_driver``)."""
    from quantselect.domain.candidates import GGUF, checkpoint_quantization
    from quantselect.domain.dataset import stat_errors
    from quantselect.engines.models import (check_architecture, from_hub, gguf_model_config, gguf_quantization, hub_id,
                                            hub_name, pinned, shown)

    out = []
    for c in candidates:
        if not isinstance(c.config, Prequantized):
            out.append(c)
            continue
        try:
            c = Candidate(c.name, replace(c.config, path=hub_name(c.config.path)))
            path = from_hub(c.config.path, config_only=True) or Path(c.config.path).expanduser()
        except InputError as e:
            raise InputError(f"candidate {c.name}: {e}") from None
        hub = pinned(c.config.path, path) if hub_id(c.config.path) else None
        with stat_errors(f"candidate {c.name}:", path):
            is_file, is_dir = path.is_file(), path.is_dir()
        if is_file and path.suffix.lower() == ".gguf":
            q = gguf_quantization(path)
            _check_same_model(c.name, shown(path), {**gguf_model_config(path), "vocab_size": q["vocab_size"]},
                              model_path)
            out.append(Candidate(c.name, replace(c.config, path=hub or os.path.abspath(path), method=GGUF, bits=q["bits"],
                                                 group_size=0, file_type=q["file_type"],
                                                 bits_per_weight=q["bits_per_weight"])))
            continue
        if is_file:
            raise InputError(f"candidate {c.name}: {path}: a checkpoint is a Hugging Face model folder or a .gguf file")
        if not is_dir:
            raise InputError(f"candidate {c.name}: {path}: no such checkpoint folder or .gguf file here (its "
                             "quantization is read at submit: on a cluster, submit where the same path is mounted)")
        cfg = read_model_config(path)
        if cfg is None:
            raise InputError(f"candidate {c.name}: {path}: not a Hugging Face model folder (no readable config.json)")
        if not isinstance(cfg, dict) or not isinstance(cfg.get("text_config", {}), dict):  # read as dicts below
            what = "field 'text_config' is" if isinstance(cfg, dict) else "it is"
            raise InputError(f"candidate {c.name}: {path / 'config.json'}: {what} not a JSON object")
        check_architecture(path / "config.json", f"candidate {c.name}: ")  # as the model's: {} is no model
        _check_same_model(c.name, path, cfg, model_path)
        method, bits, group = checkpoint_quantization(cfg, f"candidate {c.name}: {path / 'config.json'}")
        out.append(Candidate(c.name, replace(c.config, path=hub or str(path.resolve()), method=method, bits=bits,
                                             group_size=group)))
    return out


def _check_same_model(name: str, path: Path | str, theirs: dict[str, Any], model_path: str | None) -> None:
    """A checkpoint of another model is refused: another vocabulary, or another shape -- depth, width,
    MLP width, key/value heads (the 8B and 70B of a family share a vocabulary; Llama-2-7B and
    Mistral-7B share vocabulary size, depth and width). The model's side is read from its config.json,
    or from its GGUF file's header; a field either side lacks is not compared."""
    from quantselect.engines.models import model_config_here

    found = model_config_here(model_path) if model_path else None
    if not found:
        return
    ours = found[0]
    if _vocab(theirs) and _vocab(ours) and _vocab(theirs) != _vocab(ours):
        raise InputError(f"candidate {name}: {path} has a vocabulary of {_vocab(theirs)} tokens and the model "
                         f"{_vocab(ours)}: not a checkpoint of the same model")
    a, b = _shape(theirs), _shape(ours)
    differ = [f for f in SHAPE_FIELDS if isinstance(a[f], int) and isinstance(b[f], int) and a[f] != b[f]]
    if differ:
        def says(shape: dict[str, Any]) -> str:
            return ", ".join(SHAPE_FIELDS[f].format(shape[f]) for f in differ)

        raise InputError(f"candidate {name}: {path} has {says(a)} and the model {says(b)}: "
                         "not a checkpoint of the same model")


# what _check_same_model compares (the fields gguf_model_config reads from a GGUF header too)
SHAPE_FIELDS = {"num_hidden_layers": "{} layers", "hidden_size": "width {}", "intermediate_size": "MLP width {}",
                "num_key_value_heads": "{} key/value heads"}


def _shape(cfg: dict[str, Any]) -> dict[str, Any]:
    text = cfg.get("text_config")  # not an object (null, a list): refused, naming the file, where it is checked
    text = text if isinstance(text, dict) else {}
    return {f: cfg.get(f) if cfg.get(f) is not None else text.get(f) for f in SHAPE_FIELDS}


def _vocab(cfg: dict[str, Any]) -> int | None:
    text = cfg.get("text_config")
    return cfg.get("vocab_size") or (text.get("vocab_size") if isinstance(text, dict) else None)


def check_candidates_fit(candidates: list[Any], model_path: str) -> None:
    """Parameters that cannot work for this model (a group size that does not divide its layer
    widths) are rejected before anything runs; the shape is read from the model's config.json, or
    from its GGUF file's header."""
    from quantselect.domain import planner
    from quantselect.engines.models import model_config_here

    found = model_config_here(model_path)
    if not found:
        return
    cfg, where = found
    try:
        shape = planner.shape_from_config(cfg, where)
    except InputError:  # a family the planner cannot read: its loading says what is wrong, if anything
        return
    for c in candidates:
        planner.check_candidate(c.name, c.config, shape, cfg.get("text_config", cfg).get("model_type"))


def read_model_config(model_dir: Path) -> dict[str, Any] | None:
    import json

    try:
        return json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None


def _task_data(req: SubmitRequest) -> Any:
    """The request's items, validated: inline, or read from a file (here, or of a Hub dataset)."""
    if (req.dataset is None) == (req.items is None):
        raise InputError("give exactly one of a dataset path or inline items")
    generation = dict(max_new_tokens=req.max_new_tokens, stop=req.stop, chat_template=req.chat_template)
    if req.dataset is None:
        return parse_records(req.items[: req.limit] if req.limit else req.items, metric=req.metric, **generation)
    mapping = req.mapping
    with _hub_data(req.dataset) as path, _hub_data(mapping.labels_file if mapping else None) as labels:
        if mapping and labels != mapping.labels_file:
            mapping = replace(mapping, labels_file=labels)
        dataset = load_dataset(path, mapping, metric=req.metric, limit=req.limit, **generation)
    return replace(dataset, source=req.dataset)


@contextmanager
def _hub_data(name: str | None):
    """``name``, or where a file of a Hub dataset (``hf://datasets/...``) was downloaded to; errors
    raised inside name the file as the user did, not by its place in the Hugging Face cache."""
    from quantselect.engines.models import hub_data_file

    local = hub_data_file(name)
    if local is None:
        yield name
        return
    try:
        yield str(local)
    except InputError as e:
        raise InputError(str(e).replace(str(local), name)) from None


def split_calibration(dataset: Any, path: str | None, samples: int) -> tuple[Any, Any]:
    """Calibration samples for GPTQ/AWQ: read from ``path``, or split off the task data (those items
    are left out of the evaluation, so that no candidate is scored on what it was calibrated on)."""
    from quantselect.domain.dataset import calibration_samples, load_calibration_file
    from quantselect.domain.results import MIN_EVAL_ITEMS, Calibration, validate_calibration_samples

    samples = validate_calibration_samples(samples)
    if path is not None:
        texts = load_calibration_file(path)
        if len(texts) < samples:
            raise InputError(f"{path}: {len(texts)} calibration samples, fewer than --calibration-samples {samples}; "
                             "lower it or give more samples")
        return dataset, Calibration(source=str(path), texts=tuple(texts[:samples]))
    left = len(dataset) - samples
    if left < MIN_EVAL_ITEMS:
        raise InputError(f"--calibration-samples {samples} would leave {max(left, 0)} of {len(dataset)} items to "
                         f"evaluate (at least {MIN_EVAL_ITEMS} needed): lower it, add items, or give --calibration FILE")
    import random

    held = sorted(random.Random(0).sample(range(len(dataset)), samples))
    chosen = set(held)
    texts = calibration_samples([dataset.items[i] for i in held], dataset.chat_template)
    rest = replace(dataset, items=tuple(it for i, it in enumerate(dataset.items) if i not in chosen))
    return rest, Calibration(source="task data", texts=tuple(texts), items=tuple(held))


def demo_candidates() -> tuple[str, ...]:
    """The default candidates, less bf16 on a machine without a GPU: without native bf16 matrix
    units (AVX2-only CPUs) it evaluates ~6x slower than fp32 and would triple the demo's time."""
    import torch

    if torch.cuda.is_available():
        return DEFAULT_CANDIDATES
    return tuple(c for c in DEFAULT_CANDIDATES if c != "bf16")

