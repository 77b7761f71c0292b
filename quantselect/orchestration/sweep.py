"""Run every candidate of a job as its own Ray task, in parallel, and hand outcomes back as they
finish. Workers never touch the database: the caller (the driver) persists each outcome."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from quantselect.domain.candidates import Candidate
from quantselect.domain.dataset import TaskDataset
from quantselect.domain.results import FAILED, SUCCEEDED, CandidateResult

ProgressSnapshot = dict[str, tuple[str, int, int]]  # candidate -> (phase, done, total)


@dataclass(frozen=True)
class Placement:
    num_cpus: float
    num_gpus: float
    threads: int
    slots: int  # how many candidates can run at once


def plan_placement(n_candidates: int, gpus: float, cpus: float) -> Placement:
    """One GPU per candidate when the cluster has GPUs (and no CPU, so GPUs bound the parallelism);
    otherwise the CPUs are split between as many candidates as can run at once."""
    if gpus >= 1:
        return Placement(num_cpus=0, num_gpus=1, threads=1, slots=int(gpus))
    cpus = max(1, int(cpus))
    parallel = max(1, min(n_candidates, cpus))
    threads = max(1, cpus // parallel)
    return Placement(num_cpus=threads, num_gpus=0, threads=threads, slots=parallel)


def _progress_board():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self) -> None:
            self.state: ProgressSnapshot = {}

        def update(self, name: str, phase: str, done: int, total: int) -> None:
            self.state[name] = (phase, done, total)

        def snapshot(self) -> ProgressSnapshot:
            return dict(self.state)

    return ProgressBoard.remote()


def _candidate_task(model_path: str, candidate: Candidate, dataset: TaskDataset, board, threads: int,
                    baseline=None, early_stop=None, measure_threads=None, calibration=None, artifacts_dir=None):
    import ray

    from quantselect.engines.worker import run_candidate

    ctx = ray.get_runtime_context()
    placement = {"node_id": ctx.get_node_id(),
                 "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]}

    def report(phase: str, done: int, total: int) -> None:
        board.update.remote(candidate.name, phase, done, total)

    return run_candidate(model_path, candidate, dataset, report=report, threads=threads, placement=placement,
                         baseline=baseline, early_stop=early_stop, measure_threads=measure_threads,
                         calibration=calibration if candidate.config.calibrated else None,
                         artifacts_dir=artifacts_dir)


def needs_baseline_first(dataset: TaskDataset, early_stop: object | None) -> bool:
    """Early stopping compares each chunk with the baseline's items, and label-free metrics score
    against the baseline's outputs: either way the baseline runs first and is shared."""
    from quantselect.engines.labelfree import needs_reference

    return early_stop is not None or needs_reference(dataset)


def run_sweep(
    model_path: str,
    candidates: list[Candidate],
    dataset: TaskDataset,
    on_outcome: Callable[[CandidateResult], None],
    on_progress: Callable[[ProgressSnapshot], None] | None = None,
    poll_seconds: float = 0.5,
    early_stop: object | None = None,
    calibration: object | None = None,
    artifacts_dir: str | None = None,
) -> list[CandidateResult]:
    """Run all candidates; ``on_outcome`` is called once per candidate as it finishes.

    ``calibration`` (a ``results.Calibration``) goes to the calibrated candidates (GPTQ, AWQ), which
    start first: they take longest. Quantized models are saved under ``artifacts_dir`` and reused.

    With ``early_stop`` (an ``engines.worker.EarlyStop``) or a label-free metric the baseline runs
    first, alone, and its per-item scores (and reference outputs) go to every other candidate.
    """
    import ray

    from quantselect.engines.worker import BaselineShare
    from quantselect.orchestration.cluster import cluster_cpus, cluster_gpus

    # Every candidate's throughput is measured with the threads it gets when all run side by side.
    measure = plan_placement(len(candidates), cluster_gpus(), cluster_cpus()).threads
    candidates = sorted(candidates, key=lambda c: (not c.is_baseline, not c.config.calibrated))
    extra = {"calibration": getattr(calibration, "texts", None), "artifacts_dir": artifacts_dir}
    board = _progress_board()
    dataset_ref = ray.put(dataset)
    poll = _Poller(board, on_progress)
    try:
        if not needs_baseline_first(dataset, early_stop):
            return _run(model_path, candidates, dataset_ref, board, poll, on_outcome, poll_seconds, measure=measure,
                        extra=extra)
        first = [c for c in candidates if c.is_baseline]
        rest = [c for c in candidates if not c.is_baseline]
        outcomes = _run(model_path, first, dataset_ref, board, poll, on_outcome, poll_seconds, measure=measure,
                        extra=extra)
        base = outcomes[0]
        if base.status != SUCCEEDED:
            for cand in rest:  # nothing to compare with: say so rather than run them
                result = CandidateResult(name=cand.name, config=cand.config.to_dict(), status=FAILED,
                                         error="not run: the baseline failed", finished_at=datetime.now(timezone.utc))
                outcomes.append(result)
                on_outcome(result)
            return outcomes
        share = BaselineShare(scores={i.index: float(i.score) for i in base.items}, reference=base.reference)
        base.reference = None
        return outcomes + _run(model_path, rest, dataset_ref, board, poll, on_outcome, poll_seconds,
                               ray.put(share), early_stop, measure=measure, extra=extra)
    finally:
        ray.kill(board)
        del dataset_ref


class _Poller:
    def __init__(self, board, on_progress) -> None:
        self.board, self.on_progress, self.last = board, on_progress, {}

    def __call__(self) -> None:
        import ray

        if self.on_progress:
            snap = ray.get(self.board.snapshot.remote())
            if snap != self.last:
                self.on_progress(snap)
                self.last = snap


def _run(model_path: str, candidates: list[Candidate], dataset_ref, board, poll: _Poller,
         on_outcome: Callable[[CandidateResult], None], poll_seconds: float,
         baseline=None, early_stop=None, measure: int | None = None,
         extra: dict | None = None) -> list[CandidateResult]:
    import ray

    from quantselect.orchestration.cluster import cluster_cpus, cluster_gpus

    if not candidates:
        return []
    placement = plan_placement(len(candidates), cluster_gpus(), cluster_cpus())
    task = ray.remote(
        max_calls=1,  # a fresh process per candidate: its own peak memory, nothing leaked
        max_retries=1,  # one retry if the worker process dies
    )(_candidate_task).options(num_cpus=placement.num_cpus, num_gpus=placement.num_gpus)
    queue = list(candidates)
    running: dict = {}
    max_in_flight = max(1, placement.slots * 2)
    outcomes: list[CandidateResult] = []
    while queue or running:
        while queue and len(running) < max_in_flight:
            cand = queue.pop(0)
            running[task.remote(model_path, cand, dataset_ref, board, placement.threads, baseline, early_stop,
                                measure, **(extra or {}))] = cand
        ready, _ = ray.wait(list(running), num_returns=1, timeout=poll_seconds)
        poll()
        for ref in ready:
            cand = running.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as e:  # the worker process died or Ray failed the task
                msg = " ".join(str(e).split())[:400]
                result = CandidateResult(name=cand.name, config=cand.config.to_dict(), status=FAILED,
                                         error=f"worker failed: {type(e).__name__}: {msg}",
                                         finished_at=datetime.now(timezone.utc))
            outcomes.append(result)
            on_outcome(result)
    poll()
    return outcomes
