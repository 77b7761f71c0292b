"""Placement and scheduling of a sweep: memory estimates, GPU shares, refusals with the numbers,
several small candidates packed onto one (logical) GPU, result reuse, jobs side by side."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from quantselect.cli import cli
from quantselect.domain import planner
from quantselect.domain.candidates import resolve_candidates
from quantselect.orchestration.sweep import concurrent_slots
from quantselect.service import Service, SubmitRequest
from tests.fixtures.common import EXAMPLES, REPO

GIB = 1024**3
CONFIGS = REPO / "tests" / "data" / "configs"


def _shape(name: str) -> planner.Shape:
    return planner.shape_from_config(json.loads((CONFIGS / f"{name}.json").read_text()))


def test_memory_estimates_give_gpu_shares_placement_groups_and_refusals():
    shape = _shape("llama-3.1-8b")
    need = {c.name: planner.candidate_need(shape, c.config) for c in resolve_candidates(["int8", "int4", "int4-gptq"])}
    # weights at the precision dominate; calibration adds a Hessian to the quantization working memory
    assert 14 * GIB < need["baseline"].weights < 16 * GIB and need["int4"].weights < need["int8"].weights
    assert need["int4-gptq"].quantize > need["int4"].quantize
    h100 = 80 * GIB
    shares = {n: planner.gpu_request(v, h100, 8).gpus for n, v in need.items()}
    assert all(0 < s < 0.5 for s in shares.values()) and shares["int4"] < shares["int8"] < shares["baseline"]
    # a 70B bf16 model takes two H100s of one node; with one GPU per node it fits nowhere
    big = planner.candidate_need(_shape("llama-3.1-70b"), resolve_candidates([])[0].config)
    assert planner.gpu_request(big, h100, 8).gpus == 2.0
    refused = planner.gpu_request(big, h100, 1)
    assert refused.gpus is None
    assert "needs 140.0 GiB" in refused.reason and "1 GPU(s) of 80.0 GiB (71.0 GiB usable each)" in refused.reason
    # unknown GPU memory: one whole GPU each (never pack blind)
    assert planner.gpu_request(need["int4"], None, 8).gpus == 1.0


def test_concurrent_slots_pack_shares_first_fit():
    r = lambda g: planner.Request(gpus=g, need=None)  # noqa: E731
    assert concurrent_slots([r(0.25)] * 10, [2]) == 8
    assert concurrent_slots([r(1.0)] * 5, [1, 1]) == 2
    assert concurrent_slots([r(2.0), r(2.0), r(0.5)], [2, 1]) == 2  # one pair per 2-GPU node, a share on the other


def test_small_candidates_share_a_gpu(ray_cluster, tiny_llama, monkeypatch):
    """With the GPU memory known, candidates that each need ~1/5 of a GPU run several per (logical)
    GPU: more candidates overlap in time than there are GPUs."""
    monkeypatch.setenv("QUANTSELECT_GPU_MEMORY", "8GiB")
    svc = Service()
    job = svc.submit(SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=20,
                                   candidates=["int8", "int4", "w8a8"]))
    assert svc.run_job(job.id).status == "succeeded"
    results = [r for r in svc.results(job.id)]
    assert all(r.status == "succeeded" for r in results), [(r.name, r.error) for r in results]
    events = sorted([(r.started_at, 1) for r in results] + [(r.finished_at, -1) for r in results])
    running, most = 0, 0
    for _, step in events:
        running += step
        most = max(most, running)
    assert most > 2, f"at most {most} candidates at once on 2 GPUs: nothing was packed"
    per_gpu = {}
    for r in results:
        assert len(r.gpu_ids) == 1
        per_gpu.setdefault(r.gpu_ids[0], []).append(r.name)
    assert max(len(v) for v in per_gpu.values()) >= 2
    for r in results:  # the worker's own timings fit inside its interval
        assert 0 < r.eval_seconds < (r.finished_at - r.started_at).total_seconds(), (r.name, r.eval_seconds)
    # a throughput measured on a shared GPU is labelled, and never used as a cost
    assert all("[GPU shared]" in r.throughput_engine for r in results)


def test_a_baseline_that_fits_no_node_fails_the_job_before_the_sweep_with_the_numbers(ray_cluster, tiny_llama,
                                                                                     monkeypatch):
    monkeypatch.setenv("QUANTSELECT_GPU_MEMORY", "1.5GiB")  # 0.35 GiB usable: less than any candidate needs
    svc = Service()
    job = svc.submit(SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=20,
                                   candidates=["int8"]))
    with pytest.raises(Exception, match="fits on no node"):
        svc.run_job(job.id)
    stored = svc.get_job(job.id)
    assert stored.status == "failed" and "GiB usable each" in stored.error
    assert {r.status for r in svc.results(job.id)} == {"pending"}  # nothing ran
    assert svc.repo.count_rows()["item_results"] == 0


def test_a_matching_job_reuses_stored_results_and_no_cache_runs_again(ray_cluster, tiny_llama):
    args = ["submit", str(tiny_llama), str(EXAMPLES / "piqa-300.jsonl"), "--limit", "20", "--candidates", "int8"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    first_id = first.output.split()[1].rstrip(":")
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("reused") >= 2 and f"stored by job {first_id}" in again.output
    svc = Service()
    second_id = again.output.split()[1].rstrip(":")
    reused = {r.name: r for r in svc.results(second_id)}
    assert {r.reused_from for r in reused.values()} == {first_id}
    assert len(svc.item_results(second_id)["int8"]) == 20
    status = CliRunner().invoke(cli, ["status", second_id]).output
    assert f"reused from job {first_id}" in status
    # --no-cache: run again
    fresh = CliRunner().invoke(cli, args + ["--no-cache"])
    assert fresh.exit_code == 0, fresh.output
    assert all(r.reused_from is None for r in svc.results(fresh.output.split()[1].rstrip(":")))


def test_the_cache_key_changes_with_every_input_that_changes_results(tiny_llama, tmp_path):
    import shutil

    from quantselect.service import cache_keys

    svc = Service()
    base = dict(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=20, candidates=["int8", "int4"])
    keys = cache_keys(svc.build_spec(SubmitRequest(**base)))
    assert keys == cache_keys(svc.build_spec(SubmitRequest(**base)))  # deterministic
    assert keys["int8"] != keys["int4"]
    copy = shutil.copytree(tiny_llama, tmp_path / "copy")
    variants = [dict(limit=19), dict(candidates=["int8", "int4:group_size=64"]), dict(early_stop=True),
                dict(model=str(copy))]
    for change in variants:
        other = cache_keys(svc.build_spec(SubmitRequest(**{**base, **change})))
        assert next(v for k, v in other.items() if k.startswith("int4")) != keys["int4"], change
    # what does not change results does not change the key: the threshold (without early stopping)
    assert cache_keys(svc.build_spec(SubmitRequest(**base, threshold=0.9))) == keys


def test_two_jobs_share_the_cluster_while_the_api_answers(ray_cluster, tiny_llama):
    from fastapi.testclient import TestClient

    from quantselect.api.app import create_app

    svc = Service()
    seen: dict[str, list[str]] = {}
    with TestClient(create_app(svc)) as client:
        body = {"model": str(tiny_llama), "dataset": str(EXAMPLES / "piqa-300.jsonl"), "limit": 12,
                "candidates": ["int8"], "no_cache": True}
        ids = [client.post("/api/v1/jobs", json=body).json()["id"] for _ in range(2)]
        for j in ids:
            seen[j] = ["queued"]
        deadline = time.monotonic() + 300
        both_running = False
        while not all(seen[j][-1] in ("succeeded", "failed", "cancelled") for j in ids):
            assert time.monotonic() < deadline, seen
            assert client.get("/healthz").status_code == 200
            listed = {j["id"]: j["status"] for j in client.get("/api/v1/jobs").json()}
            for j in ids:
                if listed[j] != seen[j][-1]:
                    seen[j].append(listed[j])
            both_running |= all(listed[j] == "running" for j in ids)
            time.sleep(0.2)
    assert all(seen[j] in (["queued", "running", "succeeded"], ["queued", "succeeded"]) for j in ids), seen
    assert both_running, seen  # the two drivers ran side by side


def test_a_candidate_larger_than_one_gpu_gets_a_placement_group_of_several(ray_cluster, tiny_llama, monkeypatch):
    """2 GiB GPUs (0.8 GiB usable) for candidates that need ~1.3 GiB: each takes both logical GPUs
    of the node through a STRICT_PACK placement group, one after the other, and frees them after."""
    monkeypatch.setenv("QUANTSELECT_GPU_MEMORY", "2GiB")
    svc = Service()
    job = svc.submit(SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=6,
                                   candidates=["int8"]))
    assert svc.run_job(job.id).status == "succeeded"
    results = sorted(svc.results(job.id), key=lambda r: r.started_at)
    assert all(sorted(r.gpu_ids) == ["0", "1"] for r in results), [(r.name, r.gpu_ids) for r in results]
    assert results[0].finished_at <= results[1].started_at  # two GPUs each, on a 2-GPU node: one at a time
    from ray.util import placement_group_table

    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())
    deadline = time.monotonic() + 30  # a removed group hands its GPUs back asynchronously
    while ray_cluster.available_resources().get("GPU") != 2:
        assert time.monotonic() < deadline, ray_cluster.available_resources()
        time.sleep(0.2)


def test_a_stored_result_measured_on_other_hardware_is_not_reused(ray_cluster, tiny_llama):
    """A result depends on where it ran -- the baseline is fp32 on a CPU and bf16 on a GPU, and the
    speed is the device's own -- so a result stored by a GPU run is not reused by a run on a cluster
    that measures on CPUs (this one: its GPUs are logical), and the other way round."""
    from sqlalchemy import update

    from quantselect.db.models import CandidateRow
    from quantselect.orchestration.cluster import device_patterns

    assert device_patterns() == ["cpu"]
    svc = Service()
    req = SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=12, candidates=["int8"])
    first = svc.submit(req)
    assert svc.run_job(first.id).status == "succeeded"
    with svc.repo.engine.begin() as c:  # as if it had run on a GPU node
        c.execute(update(CandidateRow).where(CandidateRow.job_id == first.id).values(device="cuda:NVIDIA H100 80GB HBM3"))
    second = svc.submit(req)
    assert svc.run_job(second.id).status == "succeeded"
    assert all(r.reused_from is None and r.device == "cpu" for r in svc.results(second.id))
    third = svc.submit(req)  # a CPU result is there now: that one is reused
    assert svc.run_job(third.id).status == "succeeded"
    assert {r.reused_from for r in svc.results(third.id)} == {second.id}
    # and on a cluster of H100 nodes, the GPU result would be the one
    hit = svc.repo.find_cached(svc.repo.cache_keys(third.id)["int8"], exclude_job=third.id, devices=["cuda:%H100%"])
    assert hit is not None and hit[0] == first.id
    assert svc.repo.find_cached(svc.repo.cache_keys(third.id)["int8"], exclude_job=third.id, devices=["cuda:%A100%"]) is None
