"""One candidate, start to finish, in one process: load + quantize, evaluate, measure.

Returns an outcome; never writes to the database (the driver is the only writer) and never raises:
a failure becomes a failed outcome with a one-line error, so one candidate cannot sink the job.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
import traceback
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Callable

from quantselect.domain.candidates import Candidate
from quantselect.domain.dataset import TaskDataset
from quantselect.domain.results import FAILED, MEASURE_STEPS, SUCCEEDED, CandidateResult, ItemResult
from quantselect.errors import QuantselectError

Report = Callable[[str, int, int], None]  # phase, done, total
Emit = Callable[[list[ItemResult]], None]  # per-item results as they are scored
STREAM_CHUNK = 256  # items scored between two hand-overs of per-item results to the driver

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
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


class NonFinite(QuantselectError):
    """The model's log-probabilities (or an item's score) are NaN or infinite: fp16 overflow, a broken
    kernel or checkpoint. Its verdicts would be noise, and NaN cannot be stored in a JSON column."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, NonFinite):
        return text
    if "out of memory" in text.lower() or isinstance(e, MemoryError):
        return f"out of memory: {text[:300]}"
    return f"{type(e).__name__}: {text[:500]}"


@dataclass(frozen=True)
class EarlyStop:
    """Evaluate in chunks, in a seeded random order, and stop once an anytime-valid sequential test
    against the baseline's per-item scores has settled the candidate's verdict."""

    threshold: float
    confidence: float
    chunk: int = 32
    seed: int = 0


@dataclass(frozen=True)
class BaselineShare:
    """What the baseline computed once, for every other candidate: its score per item (by index)
    and, for label-free metrics, its reference outputs."""

    scores: dict[int, float]
    reference: Any = None


def evaluation_order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _subset(dataset: TaskDataset, indices: list[int]) -> TaskDataset:
    return replace(dataset, items=tuple(dataset.items[i] for i in indices))


def _evaluate(evaluate: Any, loaded: Any, dataset: TaskDataset, share: BaselineShare | None,
              indices: list[int] | None, report: Report, done: int, total: int) -> list[ItemResult]:
    """Score ``indices`` of the dataset (all items when None); item results carry dataset indices."""
    part = dataset if indices is None else _subset(dataset, indices)
    kwargs: dict[str, Any] = {}
    if share is not None and share.reference is not None:
        kwargs["reference"] = share.reference if indices is None else share.reference.select(indices)
    items = evaluate.evaluate(loaded.model, loaded.tokenizer, part,
                              progress=lambda d, t: report("evaluating", done + d, total), **kwargs)
    if indices is not None:
        for item in items:
            item.index = indices[item.index]
    for item in items:  # checked before the items are streamed: a NaN would fail the driver's write
        values = [*(item.choice_logprobs or ()), item.score]
        if not all(math.isfinite(v) for v in values if v is not None):
            raise NonFinite(f"the model produced non-finite log-probabilities on item {item.index}")
    return items


def run_candidate(model_path: str, candidate: Candidate, dataset: TaskDataset, *,
                  report: Report | None = None, device: str | None = None,
                  threads: int | None = None, placement: dict[str, Any] | None = None,
                  baseline: BaselineShare | None = None, early_stop: EarlyStop | None = None,
                  measure_threads: int | None = None, calibration: tuple[str, ...] | list[str] | None = None,
                  artifacts_dir: str | None = None, models_dir: str | None = None, done_items: list[ItemResult] | None = None,
                  on_items: Emit | None = None, stream_chunk: int = STREAM_CHUNK) -> CandidateResult:
    """``measure_threads``: CPU threads for the throughput measurement, the same for every
    candidate of a job (one that ran alone with more threads would otherwise look cheaper).
    ``calibration``: samples for GPTQ/AWQ. ``artifacts_dir``: where quantized models are saved,
    checked on reload and reused by later jobs (None: quantize in memory only). ``models_dir``: where
    a GGUF checkpoint candidate is dequantized (once).
    ``done_items``: items an earlier attempt already scored (kept, not scored again); ``on_items``
    receives each chunk of ``stream_chunk`` newly scored items, so that a killed worker or driver
    loses at most one chunk."""
    report = report or (lambda phase, done, total: None)
    # first, before the slow imports: it replaces the driver's "waiting for a GPU" (and starts the
    # candidate's timeout); GPTQ / AWQ then count their layers
    report("quantizing", 0, 0)
    quiet_libraries()
    emit = on_items or (lambda items: None)
    done = {i.index: i for i in (done_items or [])}
    result = CandidateResult(name=candidate.name, config=candidate.config.to_dict(),
                             started_at=datetime.now(timezone.utc), n_items=len(dataset))
    if placement:
        result.node_id = placement.get("node_id")
        result.gpu_ids = list(placement.get("gpu_ids") or [])
    try:
        import torch

        from quantselect.engines import evaluate, measure, quantize
        from quantselect.engines.labelfree import build_reference, needs_reference

        if threads:
            torch.set_num_threads(threads)
        result.device = "cpu" if (device or quantize.default_device()) == "cpu" else f"cuda:{torch.cuda.get_device_name()}"
        loaded = quantize.load_candidate(model_path, candidate.config, device, calibration=calibration,
                                         artifacts_dir=artifacts_dir, models_dir=models_dir,
                                         progress=lambda done, total: report("quantizing", done, total))
        result.quantize_seconds = loaded.quantize_seconds
        result.weight_bytes = quantize.weight_bytes(loaded.model)
        result.artifact_path, result.artifact_reused = loaded.artifact_path, loaded.reused
        result.disk_bytes = loaded.disk_bytes
        gguf = getattr(candidate.config, "is_gguf", False)  # scored dense, run by llama.cpp
        if gguf:  # llama.cpp maps the file whole; not the dense stand-in's memory
            result.weight_bytes = loaded.disk_bytes
        measure.reset_peak_memory(loaded.device)
        report("evaluating", 0, len(dataset))
        start = time.perf_counter()
        if candidate.is_baseline and needs_reference(dataset):
            result.reference = build_reference(loaded.model, loaded.tokenizer, dataset,
                                               progress=lambda d, t: report("evaluating", d, t))
            items = result.reference.baseline_results(dataset)  # 1.0 on every item, by definition
        elif early_stop is None or baseline is None or candidate.is_baseline:
            items = list(done.values())
            result.items_carried = len(items)
            left = [i for i in range(len(dataset)) if i not in done]
            for at in range(0, len(left), max(1, stream_chunk)):
                chunk = _evaluate(evaluate, loaded, dataset, baseline, left[at: at + stream_chunk], report,
                                  len(items), len(dataset))
                emit(chunk)
                items += chunk
        else:
            items = _evaluate_until_settled(evaluate, loaded, dataset, baseline, early_stop, report, result, done, emit)
        result.eval_seconds = time.perf_counter() - start
        result.items = sorted(items, key=lambda i: i.index)
        result.n_items = len(items)
        result.n_truncated = sum(bool(i.truncated) for i in items)
        result.score = sum(float(i.score if i.score is not None else i.correct) for i in items) / len(items)
        if measure_threads:
            torch.set_num_threads(measure_threads)
        result.peak_memory_bytes = measure.peak_memory_bytes(loaded.device)  # of the evaluation
        speed = measure.throughput(loaded.model, loaded.tokenizer,
                                   step=lambda i: report("measuring", i, len(MEASURE_STEPS)))
        result.tokens_per_second = speed.decode_b1
        result.decode_tokens_per_second_b16 = speed.decode_b16
        result.prefill_tokens_per_second = speed.prefill_tokens_per_second
        result.throughput_engine = speed.engine
        if placement and placement.get("shared_gpu"):  # packed with other candidates: not a cost figure
            from quantselect.domain.cost import SHARED_GPU

            result.throughput_engine = f"{speed.engine} {SHARED_GPU}"
        if gguf:  # the file's weights, but not llama.cpp's speed
            result.throughput_engine += f" (GGUF {candidate.config.file_type} dequantized, not llama.cpp)"
        if candidate.config.kv_cache:  # its quality, not its speed
            result.throughput_engine += f" ({candidate.config.kv_cache} KV cache emulated in 16 bits)"
        result.status = SUCCEEDED
    except BaseException as e:  # noqa: BLE001 - a candidate's failure is data, not a crash
        if isinstance(e, KeyboardInterrupt):
            raise
        log.debug("candidate %s failed:\n%s", candidate.name, traceback.format_exc())
        result.status = FAILED
        result.error = _one_line(e)
        if result.error.startswith("out of memory"):
            try:
                from quantselect.engines import measure

                result.peak_memory_bytes = measure.peak_memory_bytes(result.device.split(":")[0] if result.device else "cpu")
                result.error = f"out of memory at a peak of {result.peak_memory_bytes / 2**30:.2f} GiB: {result.error[15:]}"
            except Exception:  # noqa: BLE001 - the error text stands without the peak
                pass
        result.items = []
        result.reference = None
    result.finished_at = datetime.now(timezone.utc)
    done = (result.n_items or len(dataset)) if result.status == SUCCEEDED else 0
    report(result.status, done, len(dataset))
    return result


def _evaluate_until_settled(evaluate: Any, loaded: Any, dataset: TaskDataset, baseline: BaselineShare,
                            rule: EarlyStop, report: Report, result: CandidateResult,
                            done: dict[int, ItemResult] | None = None, emit: Emit | None = None) -> list[ItemResult]:
    """Chunks in a seeded order; chunks an earlier attempt scored are replayed into the test from
    ``done`` (same order, same decisions), the rest scored and handed to ``emit``."""
    from quantselect.domain.statistics import SequentialTest

    done = done or {}
    test = SequentialTest(rule.threshold, rule.confidence)
    order = [i for i in evaluation_order(len(dataset), rule.seed) if i in baseline.scores]
    items: list[ItemResult] = []
    for start in range(0, len(order), rule.chunk):
        want = order[start: start + rule.chunk]
        left = [i for i in want if i not in done]
        chunk = [done[i] for i in want if i in done]
        result.items_carried = (result.items_carried or 0) + len(chunk)
        if left:
            new = _evaluate(evaluate, loaded, dataset, baseline, left, report, len(items), len(dataset))
            if emit:
                emit(new)
            chunk += new
        items += chunk
        test.update([baseline.scores[i.index] for i in chunk], [float(i.score) for i in chunk])
        if test.decision is not None:
            break
    result.early_stop = {**test.to_dict(), "chunk": rule.chunk, "seed": rule.seed,
                         "stopped_early": len(items) < len(dataset)}
    return items
