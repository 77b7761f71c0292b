"""Run every candidate of a job as its own Ray task, in parallel, and hand outcomes back as they
finish. Workers never touch the database: the caller (the driver) persists each outcome, and the
per-item results a worker streams while it runs.

Placement: on a cluster with GPUs each candidate asks for the share of a GPU its memory estimate
needs (several small candidates share one GPU), whole GPUs of one node through a placement group
when it needs more than one, and is refused before the sweep when no node has enough. The longest
(calibrated) candidates start first; at most as many tasks are in flight as can run at once, plus
one; the driver waits on all of them together (``ray.wait``), never on one. A submitted candidate
that Ray has not started yet is shown "waiting for a GPU" (its candidate timeout starts with its
worker's first report); one that no live node could ever hold is failed, not left waiting.

With an autoscaler that adds GPU nodes on demand (``autoscaler_node_gpus``, from
QUANTSELECT_AUTOSCALER_NODE_GPUS) the candidates ask for GPUs even while none is up, all of them in
flight at once (their pending demand is what the autoscaler scales on), and one that a node of that
many GPUs could hold waits for it instead of failing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Collection

from quantselect.domain.candidates import Candidate
from quantselect.domain.dataset import TaskDataset
from quantselect.domain.planner import Request
from quantselect.domain.results import CANCELLED, CANCELLED_ALONE, FAILED, SUCCEEDED, CandidateResult, ItemResult
from quantselect.domain.durations import format_duration

ProgressSnapshot = dict[str, tuple[str, int, int]]  # candidate -> (phase, done, total)
PROGRESS_EVERY = 5.0  # seconds between two progress calls when nothing changed
FIT_EVERY = 5.0  # seconds between two checks that the live nodes can still hold each candidate in flight
# how long a candidate no live node can hold may stay so before it fails: a node that left (a crash,
# a preempted VM its cluster replaces) may come back
UNPLACEABLE_FOR = 120.0
# how long a candidate only a node the autoscaler would add can hold waits for one (provisioning a GPU
# node takes minutes; one that never comes, quota or max_workers reached, would leave it waiting for ever)
AUTOSCALED_WITHIN = 1800.0
# A submitted candidate whose worker has not reported this long after is shown waiting for its
# resources (sooner, every candidate would say so for the second its worker process takes to start).
WAITING_AFTER = 5.0


def waiting_phase(asked: dict[str, float]) -> str:
    """``waiting for a GPU`` (a share of one, or one), ``waiting for 2 GPUs``, ``waiting for 4 CPUs``."""
    kind, n = ("GPU", asked.get("GPU") or 0) if asked.get("GPU") else ("CPU", asked.get("CPU") or 0)
    return f"waiting for a {kind}" if n <= 1 else f"waiting for {n:g} {kind}s"


@dataclass(frozen=True)
class Placement:
    num_cpus: float
    num_gpus: float
    threads: int
    slots: int  # how many candidates can run at once


def plan_placement(n_candidates: int, gpus: float, cpus: float, node_cpus: float | None = None) -> Placement:
    """One GPU per candidate when the cluster has GPUs (and no CPU, so GPUs bound the parallelism);
    otherwise the CPUs are split between as many candidates as can run at once, each asking for no
    more than the largest node has (``node_cpus``): a task runs on one node, and one that asks for the
    CPUs of two is never scheduled."""
    if gpus >= 1:
        return Placement(num_cpus=0, num_gpus=1, threads=1, slots=int(gpus))
    cpus = max(1, int(cpus))
    parallel = max(1, min(n_candidates, cpus))
    threads = max(1, min(cpus // parallel, int(node_cpus or cpus)))
    return Placement(num_cpus=threads, num_gpus=0, threads=threads, slots=parallel)


def concurrent_slots(requests: list[Request], gpus_per_node: list[int]) -> int:
    """How many of these candidates can run at once: first-fit of their GPU shares, largest first,
    onto the cluster's GPUs (a multi-GPU request takes whole GPUs of one node)."""
    free = [[1.0] * n for n in gpus_per_node]
    placed = 0
    for r in sorted((r for r in requests if r.gpus), key=lambda r: -r.gpus):
        if r.gpus >= 1:
            node = next((g for g in free if sum(x >= 1 for x in g) >= r.gpus), None)
            if node is None:
                continue
            for _ in range(int(r.gpus)):
                node[node.index(next(x for x in node if x >= 1))] = 0.0
        else:
            slot = next(((g, i) for g in free for i, x in enumerate(g) if x + 1e-9 >= r.gpus), None)
            if slot is None:
                continue
            slot[0][slot[1]] -= r.gpus
        placed += 1
    return max(1, placed)


class ProgressBoard:
    """Progress, attempts and the per-item results each candidate has streamed so far (a Ray actor,
    see ``_progress_board``). A candidate the driver has closed (its outcome handed over: finished,
    stopped, dropped) is forgotten for good: a report or items its dying worker still sends are
    ignored, so it is neither shown as running nor has items stored after its outcome."""

    def __init__(self) -> None:
        self.state: ProgressSnapshot = {}
        self.attempts: dict[str, int] = {}
        self.items: dict[str, dict[int, ItemResult]] = {}
        self.fresh: dict[str, list[ItemResult]] = {}
        self.closed: set[str] = set()

    def update(self, name: str, phase: str, done: int, total: int) -> None:
        if name not in self.closed:
            self.state[name] = (phase, done, total)

    def start(self, name: str) -> tuple[int, list[ItemResult]]:
        """A worker begins (again): its attempt number and the items already scored."""
        self.attempts[name] = self.attempts.get(name, 0) + 1
        return self.attempts[name], list(self.items.get(name, {}).values())

    def seed(self, name: str, items: list[ItemResult]) -> None:
        if name not in self.closed:
            self.items.setdefault(name, {}).update({i.index: i for i in items})

    def add_items(self, name: str, items: list[ItemResult]) -> None:
        if name not in self.closed:
            self.seed(name, items)
            self.fresh.setdefault(name, []).extend(items)

    def drain(self) -> tuple[ProgressSnapshot, dict[str, list[ItemResult]], dict[str, int]]:
        fresh, self.fresh = self.fresh, {}
        return dict(self.state), fresh, dict(self.attempts)

    def forget(self, name: str) -> None:
        self.closed.add(name)
        for held in (self.state, self.items, self.fresh):
            held.pop(name, None)


def _progress_board():
    """The job's ``ProgressBoard``, on the driver's node: a worker node that leaves takes none of it along."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    board = ray.remote(num_cpus=0, max_restarts=0)(ProgressBoard)
    return board.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()


def _candidate_task(model_path: str, candidate: Candidate, dataset: TaskDataset, board, threads: int,
                    baseline=None, early_stop=None, measure_threads=None, calibration=None, artifacts_dir=None,
                    stream_chunk=None, models_dir=None):
    import ray

    from quantselect.engines.worker import run_candidate

    ctx = ray.get_runtime_context()
    placement = {"node_id": ctx.get_node_id(),
                 "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])],
                 "shared_gpu": 0 < (ctx.get_assigned_resources().get("GPU") or 0) < 1}
    attempt, done = ray.get(board.start.remote(candidate.name))
    last: list = []

    def report(phase: str, done: int, total: int) -> None:
        board.update.remote(candidate.name, phase, done, total)

    def on_items(items: list[ItemResult]) -> None:
        last[:] = [board.add_items.remote(candidate.name, items)]

    result = run_candidate(model_path, candidate, dataset, report=report, threads=threads, placement=placement,
                           baseline=baseline, early_stop=early_stop, measure_threads=measure_threads,
                           calibration=calibration if candidate.config.calibrated else None,
                           artifacts_dir=artifacts_dir, models_dir=models_dir, done_items=done, on_items=on_items,
                           **({"stream_chunk": stream_chunk} if stream_chunk else {}))
    result.attempts = attempt
    ray.get(last)  # the streamed items reach the board before the outcome reaches the driver
    return result


def needs_baseline_first(dataset: TaskDataset, early_stop: object | None) -> bool:
    """Early stopping compares each chunk with the baseline's items, and label-free metrics score
    against the baseline's outputs: either way the baseline runs first and is shared."""
    from quantselect.engines.labelfree import needs_reference

    return early_stop is not None or needs_reference(dataset)


@dataclass
class SweepHooks:
    """The driver's side of a sweep, all optional: outcomes, streamed items, progress (on every
    change, and every ``PROGRESS_EVERY`` seconds without one, so that it can say a long phase still
    runs), a stop signal checked between waits (a cancelled job), and the names of candidates
    cancelled on their own, which are stopped (or never started) while the others go on."""

    on_outcome: Callable[[CandidateResult], None] = lambda r: None
    on_items: Callable[[str, list[ItemResult]], None] | None = None
    on_progress: Callable[[ProgressSnapshot], None] | None = None
    should_stop: Callable[[], bool] = lambda: False
    dropped: Callable[[], Collection[str]] = lambda: ()
    stopped: bool = field(default=False, init=False)


def run_sweep(
    model_path: str,
    candidates: list[Candidate],
    dataset: TaskDataset,
    hooks: SweepHooks,
    poll_seconds: float = 0.5,
    early_stop: object | None = None,
    calibration: object | None = None,
    artifacts_dir: str | None = None,
    *,
    requests: dict[str, Request] | None = None,
    finished: list[CandidateResult] | None = None,
    partial: dict[str, list[ItemResult]] | None = None,
    max_retries: int = 1,
    candidate_timeout: float | None = None,
    timeout_source: str = "QUANTSELECT_CANDIDATE_TIMEOUT",
    stream_chunk: int | None = None,
    models_dir: str | None = None,
    autoscaler_node_gpus: int | None = None,
) -> list[CandidateResult]:
    """Run the candidates; ``hooks.on_outcome`` is called once per candidate as it finishes.

    ``calibration`` (a ``results.Calibration``) goes to the calibrated candidates (GPTQ, AWQ), which
    start first: they take longest. Quantized models are saved under ``artifacts_dir`` and reused;
    GGUF checkpoints are dequantized into ``models_dir``.
    ``requests``: each candidate's GPU share (``planner.gpu_request``); None: one GPU each.
    ``finished``: outcomes already stored (a resumed job, reused results): not run again; a finished
    baseline is shared from its stored items. ``partial``: per-item results a candidate had already
    streamed before: the worker scores only the rest. A worker whose process or node dies is retried
    ``max_retries`` times, from the items it had streamed. ``candidate_timeout``: seconds a candidate
    may run (from its worker's first report, retries included) before it is stopped and failed, with
    an error that names ``timeout_source`` (where the limit was set). ``autoscaler_node_gpus``: the
    GPUs of a node the cluster's autoscaler adds on demand (see the module's docstring).

    With ``early_stop`` (an ``engines.worker.EarlyStop``) or a label-free metric the baseline runs
    first, alone, and its per-item scores (and reference outputs) go to every other candidate.
    """
    import ray

    from quantselect.engines.worker import BaselineShare
    from quantselect.orchestration.cluster import cluster_cpus, cluster_gpus, largest_node_cpus

    finished = list(finished or [])
    done_names = {r.name for r in finished}
    todo = [c for c in candidates if c.name not in done_names]
    # Every candidate's throughput is measured with the threads it gets when all run side by side
    # (on GPUs, the autoscaler's too before one is up).
    measure = plan_placement(len(candidates), max(cluster_gpus(), autoscaler_node_gpus or 0), cluster_cpus(),
                             largest_node_cpus()).threads
    todo.sort(key=lambda c: (not c.is_baseline, not c.config.calibrated, -((requests or {}).get(c.name) or _ONE).whole_gpus))
    extra = {"calibration": getattr(calibration, "texts", None), "artifacts_dir": artifacts_dir,
             "stream_chunk": stream_chunk, "models_dir": models_dir}
    board = _progress_board()
    for name, items in (partial or {}).items():
        if items and name not in done_names:
            board.seed.remote(name, items)
    dataset_ref = ray.put(dataset)
    run = _Runner(model_path, dataset_ref, board, hooks, poll_seconds, measure, extra, requests or {}, max_retries,
                  candidate_timeout, timeout_source, autoscaler_node_gpus)
    try:
        if not todo:
            return finished
        if not needs_baseline_first(dataset, early_stop):
            return finished + run(todo)
        base = next((r for r in finished if r.is_baseline), None)
        rest = [c for c in todo if not c.is_baseline]
        outcomes: list[CandidateResult] = []
        if base is None:
            outcomes = run([c for c in todo if c.is_baseline])
            base = outcomes[0] if outcomes else None
        if hooks.stopped or base is None:
            return finished + outcomes
        if base.status != SUCCEEDED:
            dropped = set(hooks.dropped())
            for cand in rest:  # nothing to compare with: say so rather than run them
                if cand.name in dropped:  # cancelled on its own meanwhile: it stays so
                    outcomes.append(run._stopped(cand, CANCELLED, CANCELLED_ALONE))
                    continue
                result = CandidateResult(name=cand.name, config=cand.config.to_dict(), status=FAILED,
                                         error="not run: the baseline failed", finished_at=datetime.now(timezone.utc))
                outcomes.append(result)
                hooks.on_outcome(result)
            return finished + outcomes
        share = BaselineShare(scores={i.index: float(i.score) for i in base.items}, reference=base.reference)
        base.reference = None
        return finished + outcomes + run(rest, ray.put(share), early_stop)
    finally:
        ray.kill(board)
        del dataset_ref


_ONE = Request(gpus=1.0, need=None)


class _Runner:
    """Submits candidates with bounded fan-out, polls progress and streamed items, collects
    outcomes in completion order, and stops everything when the driver says so."""

    def __init__(self, model_path: str, dataset_ref: Any, board: Any, hooks: SweepHooks, poll_seconds: float,
                 measure: int, extra: dict[str, Any], requests: dict[str, Request], max_retries: int,
                 timeout: float | None = None, timeout_source: str = "", autoscaler_gpus: int | None = None) -> None:
        self.model_path, self.dataset_ref, self.board, self.hooks = model_path, dataset_ref, board, hooks
        self.poll_seconds, self.measure, self.extra, self.requests = poll_seconds, measure, extra, requests
        self.max_retries, self.timeout, self.timeout_source = max_retries, timeout, timeout_source
        self.autoscaler_gpus = autoscaler_gpus
        self.began: dict[str, float] = {}  # when each candidate's worker first reported (waiting is not timed)
        self.asked: dict[str, dict[str, float]] = {}  # the resources each candidate's task asks for
        self.submitted: dict[str, float] = {}  # when each candidate in flight whose worker never reported was submitted
        self.fit_at = 0.0
        self.unplaced_since: dict[str, float] = {}
        self.last: ProgressSnapshot = {}
        self.last_at = 0.0
        self.attempts: dict[str, int] = {}

    def poll(self) -> None:
        import ray

        snap, fresh, self.attempts = ray.get(self.board.drain.remote())
        now = time.monotonic()
        for name in snap:
            self.began.setdefault(name, now)
            self.submitted.pop(name, None)
        for name, at in self.submitted.items():  # not placed by Ray yet: said, so that a job that stands still says why
            if now - at >= WAITING_AFTER:
                snap[name] = (waiting_phase(self.asked[name]), 0, 0)
        if self.hooks.on_items:
            for name, items in fresh.items():
                self.hooks.on_items(name, items)
        if self.hooks.on_progress and (snap != self.last or time.monotonic() - self.last_at >= PROGRESS_EVERY):
            self.hooks.on_progress(snap)
            self.last, self.last_at = snap, time.monotonic()

    def _forget(self, name: str) -> None:
        """A candidate that ended: nothing more of it to show."""
        self.board.forget.remote(name)
        self.submitted.pop(name, None)
        self.unplaced_since.pop(name, None)

    def _stopped(self, cand: Candidate, status: str, error: str, **fields: Any) -> CandidateResult:
        """The outcome of a candidate stopped here (or never started), handed to the driver."""
        self._forget(cand.name)
        result = CandidateResult(name=cand.name, config=cand.config.to_dict(), status=status, error=error,
                                 finished_at=datetime.now(timezone.utc), **fields)
        self.hooks.on_outcome(result)
        return result

    def _overdue(self, name: str) -> bool:
        return self.timeout is not None and name in self.began and time.monotonic() - self.began[name] > self.timeout

    def _unplaceable(self, running: dict[Any, tuple[Candidate, Any]]) -> dict[str, str]:
        """The candidates in flight that no live node has been able to hold for ``UNPLACEABLE_FOR``
        (checked every few seconds): asked for more than the largest node has, or its node left. Ray
        would keep them pending forever (it waits for an autoscaler), and their waiting is not timed.
        One that a node the autoscaler adds could hold waits for it up to ``AUTOSCALED_WITHIN``."""
        from quantselect.orchestration.cluster import alive_nodes, unplaceable

        if not running or time.monotonic() - self.fit_at < FIT_EVERY:
            return {}
        now = self.fit_at = time.monotonic()
        nodes = alive_nodes()
        why: dict[str, tuple[str, float]] = {}  # what holds it back, and for how long it may
        for c, _ in running.values():
            live = unplaceable(self.asked[c.name], nodes)
            if live and self.autoscaler_gpus and not unplaceable(self.asked[c.name], nodes, self.autoscaler_gpus):
                n = self.autoscaler_gpus
                why[c.name] = (f"{live}, and no node of {n} GPU{'s' if n > 1 else ''} the autoscaler adds "
                               f"(QUANTSELECT_AUTOSCALER_NODE_GPUS) came up in {format_duration(AUTOSCALED_WITHIN)}",
                               AUTOSCALED_WITHIN)
            elif live:
                why[c.name] = (unplaceable(self.asked[c.name], nodes, self.autoscaler_gpus) or live, UNPLACEABLE_FOR)
        for c, _ in running.values():
            if c.name in why:
                self.unplaced_since.setdefault(c.name, now)
            else:
                self.unplaced_since.pop(c.name, None)
        return {name: f"cannot be placed: {text}" for name, (text, grace) in why.items()
                if now - self.unplaced_since[name] >= grace}

    def __call__(self, candidates: list[Candidate], baseline=None, early_stop=None) -> list[CandidateResult]:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from quantselect.orchestration.cluster import cluster_cpus, cluster_gpus, gpus_per_node, largest_node_cpus

        if not candidates:
            return []
        # with an autoscaler, GPUs even when none is up: a task asking for one is the demand it scales on
        gpus = max(cluster_gpus(), self.autoscaler_gpus or 0)
        base = plan_placement(len(candidates), gpus, cluster_cpus(), largest_node_cpus())
        task = ray.remote(
            max_calls=1,  # a fresh process per candidate: its own peak memory, nothing leaked
            max_retries=self.max_retries,  # retried when the worker process or its node dies
        )(_candidate_task)
        reqs = {c.name: self.requests.get(c.name) or _ONE for c in candidates}
        slots = concurrent_slots(list(reqs.values()), gpus_per_node()) if gpus >= 1 else base.slots
        max_in_flight = slots + 1  # one queued, so a freed GPU never waits for the driver
        if self.autoscaler_gpus:  # all pending at once: the live GPUs' slots would hold it to one node's worth
            max_in_flight = len(candidates)
        queue = list(candidates)
        running: dict[Any, tuple[Candidate, Any]] = {}
        outcomes: list[CandidateResult] = []

        def submit(cand: Candidate):
            req, pg = reqs[cand.name], None
            if gpus < 1:
                opts: dict[str, Any] = {"num_cpus": base.num_cpus, "num_gpus": 0}
            elif req.gpus and req.gpus > 1:
                # one bundle of n GPUs: reserved all at once, on one node (a task must fit in one bundle)
                pg = placement_group([{"GPU": req.whole_gpus}], strategy="STRICT_PACK")
                opts = {"num_cpus": 0, "num_gpus": req.whole_gpus, "scheduling_strategy": PlacementGroupSchedulingStrategy(pg)}
            else:
                opts = {"num_cpus": 0, "num_gpus": req.gpus}
            self.asked[cand.name] = {"CPU": opts["num_cpus"], "GPU": opts["num_gpus"]}
            return task.options(name=f"qs:{cand.name}", **opts), pg

        try:
            while queue or running:
                if self.hooks.should_stop():
                    self.hooks.stopped = True
                    break
                dropped, unplaced = set(self.hooks.dropped()), self._unplaceable(running)
                for cand in [c for c in queue if c.name in dropped]:
                    queue.remove(cand)
                    outcomes.append(self._stopped(cand, CANCELLED, CANCELLED_ALONE))
                for ref, (cand, pg) in [(r, v) for r, v in running.items()
                                        if v[0].name in dropped or v[0].name in unplaced or self._overdue(v[0].name)]:
                    ray.cancel(ref, force=True)  # its worker process is killed: its GPU is free now
                    if pg is not None:
                        remove_placement_group(pg)
                    del running[ref]
                    if cand.name in dropped:
                        outcomes.append(self._stopped(cand, CANCELLED, CANCELLED_ALONE))
                    elif cand.name in unplaced:
                        outcomes.append(self._stopped(cand, FAILED, unplaced[cand.name], attempts=self.attempts.get(cand.name)))
                    else:
                        outcomes.append(self._stopped(
                            cand, FAILED, f"stopped: still running after {format_duration(self.timeout)} "
                                          f"({self.timeout_source})", attempts=self.attempts.get(cand.name)))
                if not (queue or running):
                    break
                while queue and len(running) < max_in_flight:
                    cand = queue.pop(0)
                    fn, pg = submit(cand)
                    self.submitted[cand.name] = time.monotonic()
                    ref = fn.remote(self.model_path, cand, self.dataset_ref, self.board, base.threads, baseline,
                                    early_stop, self.measure, **self.extra)
                    running[ref] = (cand, pg)
                ready, _ = ray.wait(list(running), num_returns=len(running), timeout=self.poll_seconds, fetch_local=False)
                self.poll()
                for ref in ready:
                    cand, pg = running.pop(ref)
                    if pg is not None:
                        remove_placement_group(pg)
                    try:
                        result = ray.get(ref)
                    except Exception as e:  # the worker process (or its node) died, and so did its retries
                        msg = " ".join(str(e).split())[:400]
                        tries = self.attempts.get(cand.name) or self.max_retries + 1
                        result = CandidateResult(name=cand.name, config=cand.config.to_dict(), status=FAILED,
                                                 error=f"worker failed after {tries} attempt(s): {type(e).__name__}: {msg}",
                                                 attempts=tries, finished_at=datetime.now(timezone.utc))
                    self._forget(cand.name)
                    outcomes.append(result)
                    self.hooks.on_outcome(result)
        finally:
            for ref, (_, pg) in running.items():  # stopped (or the driver failed): free their GPUs now
                ray.cancel(ref, force=True)
                if pg is not None:
                    remove_placement_group(pg)
        return outcomes
