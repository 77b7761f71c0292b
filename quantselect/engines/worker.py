"""One candidate, start to finish, in one process: load + quantize, evaluate, measure.

Returns an outcome; never writes to the database (the driver is the only writer) and never raises:
a failure becomes a failed outcome with a one-line error, so one candidate cannot sink the job.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from datetime import datetime, timezone
from typing import Any, Callable

from quantselect.domain.candidates import Candidate
from quantselect.domain.dataset import TaskDataset
from quantselect.domain.results import FAILED, SUCCEEDED, CandidateResult

Report = Callable[[str, int, int], None]  # phase, done, total

log = logging.getLogger(__name__)


def quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - cosmetic only
        pass
    logging.getLogger("torchao").setLevel(logging.ERROR)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if "out of memory" in text.lower() or isinstance(e, MemoryError):
        return f"out of memory: {text[:300]}"
    return f"{type(e).__name__}: {text[:500]}"


def run_candidate(model_path: str, candidate: Candidate, dataset: TaskDataset, *,
                  report: Report | None = None, device: str | None = None,
                  threads: int | None = None, placement: dict[str, Any] | None = None) -> CandidateResult:
    quiet_libraries()
    report = report or (lambda phase, done, total: None)
    result = CandidateResult(name=candidate.name, config=candidate.config.to_dict(),
                             started_at=datetime.now(timezone.utc), n_items=len(dataset))
    if placement:
        result.node_id = placement.get("node_id")
        result.gpu_ids = list(placement.get("gpu_ids") or [])
    try:
        import torch

        from quantselect.engines import evaluate, measure, quantize

        if threads:
            torch.set_num_threads(threads)
        report("quantizing", 0, len(dataset))
        loaded = quantize.load_candidate(model_path, candidate.config, device)
        result.device = loaded.device if loaded.device == "cpu" else f"cuda:{torch.cuda.get_device_name()}"
        result.quantize_seconds = loaded.quantize_seconds
        result.weight_bytes = quantize.weight_bytes(loaded.model)
        measure.reset_peak_memory(loaded.device)
        report("evaluating", 0, len(dataset))
        start = time.perf_counter()
        items = evaluate.evaluate(loaded.model, loaded.tokenizer, dataset,
                                  progress=lambda done, total: report("evaluating", done, total))
        result.eval_seconds = time.perf_counter() - start
        result.items = items
        result.score = sum(i.correct for i in items) / len(items)
        report("measuring", len(dataset), len(dataset))
        result.tokens_per_second = measure.decode_tokens_per_second(loaded.model, loaded.tokenizer)
        result.throughput_engine = f"transformers generate (eager, batch 1) on {loaded.device}"
        result.peak_memory_bytes = measure.peak_memory_bytes(loaded.device)
        result.status = SUCCEEDED
    except BaseException as e:  # noqa: BLE001 - a candidate's failure is data, not a crash
        if isinstance(e, KeyboardInterrupt):
            raise
        log.debug("candidate %s failed:\n%s", candidate.name, traceback.format_exc())
        result.status = FAILED
        result.error = _one_line(e)
        result.items = []
    result.finished_at = datetime.now(timezone.utc)
    report(result.status, len(dataset) if result.status == SUCCEEDED else 0, len(dataset))
    return result
