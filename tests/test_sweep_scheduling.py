"""Placement and scheduling of a sweep: memory estimates, GPU shares, refusals with the numbers,
several small candidates packed onto one (logical) GPU, result reuse, jobs side by side."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
from click.testing import CliRunner

from quantselect.cli import cli
from quantselect.domain import planner
from quantselect.domain.candidates import resolve_candidates
from quantselect.orchestration.sweep import ProgressBoard, concurrent_slots, plan_placement
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
    from ray.util import placement_group_table

    monkeypatch.setenv("QUANTSELECT_GPU_MEMORY", "2GiB")
    earlier = set(placement_group_table())  # the session's cluster: other tests' groups are not this one's
    svc = Service()
    job = svc.submit(SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=6,
                                   candidates=["int8"]))
    assert svc.run_job(job.id).status == "succeeded"
    results = sorted(svc.results(job.id), key=lambda r: r.started_at)
    assert all(sorted(r.gpu_ids) == ["0", "1"] for r in results), [(r.name, r.gpu_ids) for r in results]
    assert results[0].finished_at <= results[1].started_at  # two GPUs each, on a 2-GPU node: one at a time
    groups = {k: pg["state"] for k, pg in placement_group_table().items() if k not in earlier}
    assert len(groups) == 2 and set(groups.values()) == {"REMOVED"}, groups  # one per candidate, each removed
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


def _node(cpus: float, gpus: float = 0, kind: str | None = None, alive: bool = True) -> dict:
    """A node as ``ray.nodes()`` describes it."""
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **({f"accelerator_type:{kind}": 1.0} if kind else {})}
    return {"Alive": alive, "Resources": resources}


def test_a_cpu_candidate_asks_for_no_more_cpus_than_one_node_has():
    """Two nodes of 4 CPUs: the last candidate left asks for 4, not the cluster's 8 -- a task runs on
    one node, and one that asks for more than any node has waits forever."""
    from quantselect.orchestration.cluster import largest_node_cpus

    nodes = [_node(4), _node(4), _node(16, alive=False)]
    assert largest_node_cpus(nodes) == 4
    assert plan_placement(1, 0, 8, largest_node_cpus(nodes)) == plan_placement(1, 0, 4)
    assert plan_placement(1, 0, 8, 4).num_cpus == 4 and plan_placement(2, 0, 8, 4).num_cpus == 4
    assert plan_placement(8, 0, 8, 4).num_cpus == 1 and plan_placement(8, 0, 8, 4).slots == 8
    assert plan_placement(1, 0, 8).num_cpus == 8  # one node of 8


def test_the_gpu_memory_of_an_a100_is_unknown_unless_a_node_says_its_size():
    """Ray calls both A100s "A100": packed for 80 GB, candidates run a 40 GB card out of memory; sized
    for 40 GB, a model an 80 GB card holds is refused or split. Unknown: a whole GPU each, unless the
    node's type names its size (``A100-80G``) or QUANTSELECT_GPU_MEMORY says it."""
    from quantselect.domain.gpus import accelerator_memory_gib
    from quantselect.orchestration.cluster import gpu_memory_bytes
    from quantselect.settings import get_settings

    assert accelerator_memory_gib("A100") is None and accelerator_memory_gib("A100-40G") == 39.4
    assert accelerator_memory_gib("A100-80G") == 79.2 and accelerator_memory_gib("H100") == 79.6
    assert accelerator_memory_gib("L4") == 22.0 and accelerator_memory_gib("L40S") == 44.5
    assert accelerator_memory_gib("L40") is None and accelerator_memory_gib("RTX-PRO-6000") is None
    settings = get_settings()
    assert gpu_memory_bytes(settings, [_node(8), _node(8, 1, "A100")]) is None
    both = _node(8, 1, "A100")
    both["Resources"]["accelerator_type:A100-80G"] = 1.0  # the label Ray's docs suggest adding
    assert gpu_memory_bytes(settings, [both]) == 79.2 * GIB
    assert gpu_memory_bytes(settings, [both, _node(8, 1, "L4")]) == 22.0 * GIB  # the smallest GPU
    assert gpu_memory_bytes(settings, [both, _node(8, 1, "L40")]) is None  # unknown: a whole GPU each
    assert gpu_memory_bytes(settings, [_node(8, 2)]) is None  # logical GPUs


def test_a_cached_result_is_reused_only_from_the_gpu_the_clusters_gpu_nodes_have():
    """The patterns come from the nodes with GPUs (a CPU-only head runs no candidate, so it adds no
    "cpu"), and name the type as whole words: on an L4 cluster a result measured on an L40S is not
    reused, one measured on an L4 is (real SQLite)."""
    from tests.test_db import make_spec, outcome

    from quantselect.db import Repository
    from quantselect.orchestration.cluster import device_patterns
    from quantselect.settings import get_settings

    l4_cluster = [_node(8), _node(8, 1, "L4"), _node(8, 1, "L4")]
    assert "cpu" not in device_patterns(l4_cluster)
    assert device_patterns([_node(4), _node(4)]) == ["cpu"] == device_patterns([_node(4, 2)])  # CPUs; logical GPUs
    repo = Repository.open(get_settings())
    try:
        jobs = [repo.create_job(make_spec(), cache_keys={"int8": "K"}) for _ in range(3)]

        def stored(job, device: str) -> None:
            repo.save_outcome(job.id, replace(outcome("int8"), device=device))

        def hit(nodes) -> str | None:
            found = repo.find_cached("K", exclude_job=jobs[2].id, devices=device_patterns(nodes))
            return found and found[1].device

        stored(jobs[0], "cuda:NVIDIA L40S")
        assert hit(l4_cluster) is None
        assert hit([_node(8, 1, "L40S")]) == "cuda:NVIDIA L40S"
        stored(jobs[1], "cpu")
        assert hit(l4_cluster) is None  # the head's CPUs run nothing here
        stored(jobs[1], "cuda:NVIDIA L4")
        assert hit(l4_cluster) == "cuda:NVIDIA L4"
        stored(jobs[0], "cuda:NVIDIA A100-SXM4-80GB")
        assert hit([_node(8, 1, "A100")]) == hit([_node(8, 1, "A100-80G")]) == "cuda:NVIDIA A100-SXM4-80GB"
        assert hit([_node(8, 1, "A10G")]) is None
        # Devices as torch names them, and the types Ray's own code derives from the same names: each
        # type finds the results of its own GPU and of no other.
        from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

        names = ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", "NVIDIA L4", "NVIDIA L40S", "NVIDIA L40",
                 "NVIDIA A10G", "NVIDIA GeForce RTX 4090", "NVIDIA RTX PRO 6000 Blackwell Server Edition", "Tesla T4"]
        kinds = [NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(n) for n in names]
        for i, name in enumerate(names):
            job = repo.create_job(make_spec(), cache_keys={"int8": f"K{i}"})
            repo.save_outcome(job.id, replace(outcome("int8"), device=f"cuda:{name}"))
        found = {(kind, name) for kind in kinds for i, name in enumerate(names)
                 if repo.find_cached(f"K{i}", exclude_job=jobs[2].id, devices=device_patterns([_node(8, 1, kind)]))}
        assert found == set(zip(kinds, names)), sorted(found)
    finally:
        repo.close()


def test_a_closed_candidate_is_not_reported_running_nor_its_late_items_handed_over():
    """Once the driver has a candidate's outcome (finished, timed out, dropped, its worker dead), the
    progress board forgets it for good: what its dying worker still sends is not shown as running
    ("int4 evaluating 128/500" for the rest of the job) nor stored after its outcome."""
    from quantselect.domain.results import ItemResult

    board = ProgressBoard()
    board.update("int4", "evaluating", 128, 500)
    board.add_items("int4", [ItemResult(0, True, 1)])
    board.update("int8", "quantizing", 0, 0)
    board.forget("int4")
    board.update("int4", "evaluating", 160, 500)  # sent before its worker was killed
    board.add_items("int4", [ItemResult(1, True, 1)])
    snapshot, fresh, _ = board.drain()
    assert snapshot == {"int8": ("quantizing", 0, 0)} and fresh == {}
    assert board.start("int4")[1] == []


def test_candidates_dropped_before_a_failed_baseline_stay_cancelled(ray_cluster, tmp_path):
    """The baseline runs first (early stopping) and fails: the others fail "not run", except one the
    user cancelled on its own meanwhile, which stays cancelled (real Ray, a model that is not there)."""
    from quantselect.domain.dataset import load_dataset
    from quantselect.domain.results import CANCELLED_ALONE
    from quantselect.engines.worker import EarlyStop
    from quantselect.orchestration.sweep import SweepHooks, run_sweep

    seen = []
    hooks = SweepHooks(on_outcome=seen.append, dropped=lambda: {"int4"})
    results = run_sweep(str(tmp_path / "no-model"), resolve_candidates(["int8", "int4"]),
                        load_dataset(EXAMPLES / "piqa-300.jsonl", limit=4), hooks, early_stop=EarlyStop(0.9, 0.9))
    outcome = {r.name: (r.status, r.error) for r in results}
    assert outcome["baseline"][0] == "failed"
    assert outcome["int8"] == ("failed", "not run: the baseline failed")
    assert outcome["int4"] == ("cancelled", CANCELLED_ALONE)
    assert [r.name for r in seen] == ["baseline", "int8", "int4"]


def test_a_candidate_not_placed_yet_is_said_to_wait_for_what_its_task_asks():
    from quantselect.orchestration.sweep import waiting_phase

    assert waiting_phase({"CPU": 0, "GPU": 1}) == waiting_phase({"CPU": 0, "GPU": 0.25}) == "waiting for a GPU"
    assert waiting_phase({"CPU": 0, "GPU": 2}) == "waiting for 2 GPUs"
    assert waiting_phase({"CPU": 1, "GPU": 0}) == "waiting for a CPU"
    assert waiting_phase({"CPU": 4, "GPU": 0}) == "waiting for 4 CPUs"


def test_a_request_no_live_node_can_hold_is_named_with_the_largest_node():
    """What a task asks for against each live node's total resources (not what is free now): a
    task runs on one node, so two nodes of 2 GPUs never hold a task asking for 4."""
    from quantselect.orchestration.cluster import unplaceable

    nodes = [_node(8, 2), _node(8, 2), _node(64, 8, alive=False)]
    assert unplaceable({"CPU": 0, "GPU": 2}, nodes) is None
    assert unplaceable({"CPU": 0, "GPU": 0.25}, nodes) is None
    assert unplaceable({"CPU": 0, "GPU": 4}, nodes) == "it asks for 4 GPUs on one node and the largest live node has 2"
    assert unplaceable({"CPU": 0, "GPU": 1}, [_node(8), _node(4)]) == \
        "it asks for 1 GPU on one node and the largest live node has 0"
    assert unplaceable({"CPU": 6, "GPU": 0}, [_node(4), _node(4)]) == \
        "it asks for 6 CPUs on one node and the largest live node has 4"
    assert unplaceable({"CPU": 4, "GPU": 0}, [_node(4), _node(4)]) is None


def _hold_gpus(ray, n: int):
    """An actor holding ``n`` of the cluster's logical GPUs until it is killed (another job's worker, say)."""

    class Holder:
        def ready(self) -> bool:
            return True

    holder = ray.remote(num_cpus=0, num_gpus=n)(Holder).remote()
    ray.get(holder.ready.remote())
    return holder


def _release(ray, holder) -> None:
    ray.kill(holder)
    deadline = time.monotonic() + 30  # the GPUs come back asynchronously
    while ray.available_resources().get("GPU") != ray.cluster_resources().get("GPU"):
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)


def test_a_candidate_waiting_for_a_gpu_says_so_in_status_while_the_other_runs(ray_cluster, tiny_llama):
    """One GPU free, two candidates of a whole GPU each: while the baseline runs, int8 -- submitted,
    queued by Ray -- is stored (and shown by `status`) as waiting for a GPU; its worker's first
    report replaces that, and its recorded start is its worker's, after the baseline finished."""
    from quantselect.cli import _status_lines
    from quantselect.service import Events

    svc = Service()
    job = svc.submit(SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=6,
                                   candidates=["int8"], use_cache=False))
    seen: list[dict[str, tuple[str, str | None]]] = []
    lines: set[str] = set()

    def progress(snapshot: dict) -> None:
        seen.append({r.name: (r.status, r.phase) for r in svc.results(job.id)})
        if seen[-1]["int8"][1] == "waiting for a GPU":
            lines.update(_status_lines(svc, svc.get_job(job.id)).values())

    holder = _hold_gpus(ray_cluster, 1)
    try:
        assert svc.run_job(job.id, Events(on_progress=progress)).status == "succeeded"
    finally:
        _release(ray_cluster, holder)
    both = [s for s in seen if s["int8"] == ("running", "waiting for a GPU")
            and s["baseline"][0] == "running" and not (s["baseline"][1] or "waiting").startswith("waiting")]
    assert both, seen
    assert "  int8       running: waiting for a GPU" in lines, lines
    assert any(s["int8"][1] and not s["int8"][1].startswith("waiting") for s in seen), seen  # then it ran
    results = {r.name: r for r in svc.results(job.id)}
    assert results["baseline"].finished_at <= results["int8"].started_at
    assert {r.phase for r in results.values()} == {None}


def test_a_candidate_no_node_can_hold_fails_while_one_waiting_for_a_busy_gpu_is_not_timed(ray_cluster, tmp_path,
                                                                                         monkeypatch):
    """No autoscaler adds a node here: a candidate asking for 4 GPUs of a node on a cluster whose
    node has 2 fails once it has been so for UNPLACEABLE_FOR (a node that left may come back),
    saying so, instead of waiting forever; the baseline, whose GPU is busy
    (held by another actor) for longer than the candidate timeout, waits -- saying so -- and is timed
    only from its worker's start (it fails on its own: the model is not there)."""
    from ray.util import placement_group_table

    from quantselect.domain.dataset import load_dataset
    from quantselect.orchestration import sweep
    from quantselect.orchestration.sweep import SweepHooks, run_sweep

    timeout, hold, grace = 15.0, 20.0, 6.0
    earlier = set(placement_group_table())  # the session's cluster: other tests' groups are not this one's
    monkeypatch.setattr(sweep, "UNPLACEABLE_FOR", grace)
    holder = _hold_gpus(ray_cluster, 2)
    snapshots: list[tuple[float, dict]] = []
    begun = time.monotonic()

    def progress(snapshot: dict) -> None:
        snapshots.append((time.monotonic() - begun, snapshot))
        if not released and time.monotonic() - begun > hold:
            _release(ray_cluster, holder)
            released.append(time.monotonic() - begun)

    released: list[float] = []
    outcomes: list = []
    ended: dict[str, float] = {}

    def outcome_of(result) -> None:
        outcomes.append(result)
        ended[result.name] = time.monotonic() - begun

    hooks = SweepHooks(on_outcome=outcome_of, on_progress=progress,
                       should_stop=lambda: time.monotonic() - begun > 120)  # before the fix int8 waits forever
    requests = {"baseline": planner.Request(gpus=1.0, need=None), "int8": planner.Request(gpus=4.0, need=None)}
    try:
        results = run_sweep(str(tmp_path / "no-model"), resolve_candidates(["int8"]),
                            load_dataset(EXAMPLES / "piqa-300.jsonl", limit=4), hooks, requests=requests,
                            candidate_timeout=timeout, poll_seconds=0.2)
    finally:
        if not released:
            _release(ray_cluster, holder)
    assert not hooks.stopped, snapshots[-1:]
    outcome = {r.name: r for r in results}
    assert outcome["int8"].status == "failed"
    assert outcome["int8"].error == "cannot be placed: it asks for 4 GPUs on one node and the largest live node has 2"
    assert [r.name for r in outcomes][0] == "int8"  # while the baseline waited
    assert released and grace <= ended["int8"] < released[0], (ended, released)  # failed while the GPUs were held
    assert outcome["baseline"].status == "failed" and "still running" not in outcome["baseline"].error
    waited = [at for at, snap in snapshots if snap.get("baseline") == ("waiting for a GPU", 0, 0)]
    assert waited and max(waited) > timeout, snapshots
    groups = {k: pg["state"] for k, pg in placement_group_table().items() if k not in earlier}
    assert set(groups.values()) == {"REMOVED"}, groups  # int8's, removed when it was given up
