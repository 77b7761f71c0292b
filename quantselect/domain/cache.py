"""What the disk cache holds and what ``quantselect cache prune`` may remove: plain data and pure
decisions.

The cache is the artifacts folder: a quantized model per candidate config (the Hugging Face
layout, often as large as the model itself), the baseline's reference outputs of label-free jobs
(``references/``); the models folder: GGUF files converted to safetensors (a quantized file in
float32, four bytes per parameter; an unquantized one in its own float16/bfloat16); and what a
killed process left half-written (``*.tmp``). Nothing there is needed for a stored result to stay
valid: a job reuses a stored *result* without its artifact. What an entry spares is quantizing or
converting again; a deployment also reloads from it whenever a replica starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Iterable, Sequence

from quantselect.domain.candidates import BASELINE
from quantselect.domain.results import QUEUED, RUNNING
from quantselect.errors import InputError

ARTIFACT, REFERENCE, MODEL, INCOMPLETE = "artifact", "reference", "model", "incomplete"


@dataclass(frozen=True)
class CacheEntry:
    kind: str  # artifact | reference | model | incomplete
    key: str  # the folder's or file's name: what `cache prune KEY` takes
    path: str
    size_bytes: int
    last_used: datetime  # naive UTC: when it was written or last loaded
    candidate: str | None = None  # an artifact's candidate type (int8, int4-gptq, ...)
    model: str | None = None  # the base model it was made from (a converted model: its GGUF file)
    jobs: tuple[str, ...] = ()  # jobs whose results point at it
    served_by: tuple[str, ...] = ()  # jobs whose deployment loads it

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "path": self.path, "size_bytes": self.size_bytes,
                "last_used": self.last_used.isoformat(timespec="seconds") + "Z", "candidate": self.candidate,
                "model": self.model, "jobs": list(self.jobs), "served_by": list(self.served_by)}


@dataclass(frozen=True)
class CandidateUse:
    """One candidate of one job, as far as the cache is concerned."""

    job_id: str
    job_status: str
    job_created_at: datetime  # naive UTC
    candidate: str
    artifact_path: str | None
    cache_key: str | None
    served: bool  # the job's deployment is this candidate
    model_path: str | None = None  # the job's model: a folder, or the .gguf file a converted model came from


@dataclass(frozen=True)
class PrunePlan:
    remove: list[CacheEntry]
    keep: list[tuple[CacheEntry, str]]  # selected, but kept: why


def attach_uses(entries: Iterable[CacheEntry], uses: Sequence[CandidateUse]) -> list[CacheEntry]:
    """Each entry with the jobs that point at it: an artifact through a candidate's ``artifact_path``,
    a reference through the baseline's cache key (its file name), a converted model through the
    job's model (its GGUF file) or a GGUF candidate's ``artifact_path``."""
    out = []
    for e in entries:
        if e.kind == ARTIFACT:
            mine = [u for u in uses if u.artifact_path and _same(u.artifact_path, e.path)]
        elif e.kind == REFERENCE:
            mine = [u for u in uses if u.cache_key and e.key == f"{u.cache_key}.npz" and u.candidate == BASELINE]
        elif e.kind == MODEL:  # a served candidate without an artifact of its own loads from it; a GGUF
            # checkpoint candidate was loaded from its dequantized folder (its artifact_path)
            mine = [u for u in uses if (u.model_path and e.model and _same(u.model_path, e.model))
                    or (u.artifact_path and _same(u.artifact_path, e.path))]
        else:
            mine = []
        jobs = tuple(dict.fromkeys(u.job_id for u in mine))
        served = tuple(dict.fromkeys(u.job_id for u in mine if u.served))
        out.append(CacheEntry(e.kind, e.key, e.path, e.size_bytes, e.last_used, e.candidate, e.model, jobs, served))
    return out


def plan_prune(entries: Sequence[CacheEntry], uses: Sequence[CandidateUse], now: datetime, *,
               keys: Sequence[str] = (), older_than: timedelta | None = None, everything: bool = False) -> PrunePlan:
    """What ``cache prune`` removes: the entries named by ``keys`` (or all, ``everything``), last used
    more than ``older_than`` ago when given. Kept whatever was selected: what a deployment loads
    (its replicas reload it on every start), and whatever was used since a queued or running job
    began (it may be using it now)."""
    if keys and everything:
        raise InputError("cache prune: give KEYs or --all, not both")
    if not (keys or everything or older_than is not None):
        raise InputError("cache prune: say what to remove: KEY..., --older-than AGE (e.g. 30d), or --all")
    by_key = {e.key: e for e in entries}
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        raise InputError(f"cache prune: no entry {', '.join(map(repr, unknown))} in the cache "
                         "(`quantselect cache list` shows the keys)")
    chosen = [by_key[k] for k in dict.fromkeys(keys)] if keys else list(entries)
    if older_than is not None:
        chosen = [e for e in chosen if e.last_used < now - older_than]
    active = sorted((u for u in uses if u.job_status in (QUEUED, RUNNING)), key=lambda u: u.job_created_at)
    remove, keep = [], []
    for e in chosen:
        if e.served_by:
            keep.append((e, f"served by job {', '.join(e.served_by)} (`quantselect undeploy` it first)"))
        elif active and e.last_used >= active[0].job_created_at:
            keep.append((e, f"job {active[0].job_id} is {active[0].job_status} and may be using it"))
        else:
            remove.append(e)
    return PrunePlan(remove, keep)


def _same(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")
