"""The driver (service layer) end to end on a real local Ray and real SQLite."""

from __future__ import annotations

from quantselect.domain.candidates import Candidate, Int4WeightOnly, resolve_candidates
from quantselect.domain.dataset import load_dataset
from quantselect.domain.results import JobSpec
from quantselect.service import Events, Service
from tests.fixtures.common import EXAMPLES


def test_a_failing_candidate_is_marked_failed_and_the_job_completes(ray_cluster, tiny_llama):
    """A real failure: int4 with group size 256 cannot quantize a model whose hidden size is 128."""
    svc = Service()
    candidates = resolve_candidates(["int8"]) + [Candidate("int4", Int4WeightOnly(group_size=256))]
    spec = JobSpec(model=str(tiny_llama), model_path=str(tiny_llama),
                   dataset=load_dataset(EXAMPLES / "piqa-300.jsonl", limit=6), candidates=candidates)
    job = svc.repo.create_job(spec)
    seen: list[str] = []
    done = svc.run_job(job.id, Events(on_outcome=lambda r: seen.append(r.name)))
    assert done.status == "succeeded"
    assert sorted(seen) == ["baseline", "int4", "int8"]
    results = {r.name: r for r in svc.results(job.id)}
    assert results["int4"].status == "failed" and "divisible" in results["int4"].error
    assert results["int8"].status == "succeeded" and results["baseline"].status == "succeeded"
    assert svc.item_results(job.id)["int4"] == []
    assert len(svc.item_results(job.id)["int8"]) == 6
    rec = svc.recommend(job.id, 0.01)
    assert rec.chosen in ("baseline", "int8") and "failed" in rec.verdict("int4").reason


def test_a_failed_baseline_fails_the_job_with_the_reason(ray_cluster, tmp_path):
    """A model folder whose weights are unreadable: every candidate fails, the job says why."""
    model = tmp_path / "broken"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    svc = Service()
    spec = JobSpec(model=str(model), model_path=str(model),
                   dataset=load_dataset(EXAMPLES / "piqa-300.jsonl", limit=2), candidates=resolve_candidates([]))
    job = svc.repo.create_job(spec)
    try:
        svc.run_job(job.id)
    except Exception as e:
        assert "baseline failed" in str(e)
    stored = svc.get_job(job.id)
    assert stored.status == "failed" and "baseline failed" in stored.error
