"""Run every candidate of a job as its own Ray task, in parallel, and hand outcomes back as they
finish. Workers never touch the database: the caller (the driver) persists each outcome."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from quantselect.domain.candidates import Candidate
from quantselect.domain.dataset import TaskDataset
from quantselect.domain.results import FAILED, CandidateResult

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


def _candidate_task(model_path: str, candidate: Candidate, dataset: TaskDataset, board, threads: int):
    import ray

    from quantselect.engines.worker import run_candidate

    ctx = ray.get_runtime_context()
    placement = {"node_id": ctx.get_node_id(),
                 "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]}

    def report(phase: str, done: int, total: int) -> None:
        board.update.remote(candidate.name, phase, done, total)

    return run_candidate(model_path, candidate, dataset, report=report, threads=threads, placement=placement)


def run_sweep(
    model_path: str,
    candidates: list[Candidate],
    dataset: TaskDataset,
    on_outcome: Callable[[CandidateResult], None],
    on_progress: Callable[[ProgressSnapshot], None] | None = None,
    poll_seconds: float = 0.5,
) -> list[CandidateResult]:
    """Run all candidates; ``on_outcome`` is called once per candidate as it finishes."""
    import ray

    from quantselect.orchestration.cluster import cluster_cpus, cluster_gpus

    placement = plan_placement(len(candidates), cluster_gpus(), cluster_cpus())
    task = ray.remote(
        max_calls=1,  # a fresh process per candidate: its own peak memory, nothing leaked
        max_retries=1,  # one retry if the worker process dies
    )(_candidate_task).options(num_cpus=placement.num_cpus, num_gpus=placement.num_gpus)
    board = _progress_board()
    dataset_ref = ray.put(dataset)
    queue = list(candidates)
    running: dict = {}
    max_in_flight = max(1, placement.slots * 2)
    outcomes: list[CandidateResult] = []
    last_snapshot: ProgressSnapshot = {}
    while queue or running:
        while queue and len(running) < max_in_flight:
            cand = queue.pop(0)
            running[task.remote(model_path, cand, dataset_ref, board, placement.threads)] = cand
        ready, _ = ray.wait(list(running), num_returns=1, timeout=poll_seconds)
        if on_progress:
            snap = ray.get(board.snapshot.remote())
            if snap != last_snapshot:
                on_progress(snap)
                last_snapshot = snap
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
    ray.kill(board)
    del dataset_ref
    time.sleep(0)
    return outcomes
