"""The REST API on the real app (TestClient runs it in-process), a real local Ray, real SQLite,
real models; the deploy endpoint ends in a real Ray Serve deployment answering the openai client."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from tests.fixtures.common import EXAMPLES
from tests.fixtures.hooks import Hook


@pytest.fixture
def client(ray_cluster, serve_port, monkeypatch):
    from quantselect.api.app import create_app

    monkeypatch.setenv("QUANTSELECT_SERVE_PORT", str(serve_port))
    with TestClient(create_app(connect_ray=False)) as c:
        yield c


def piqa_items(n: int) -> list[dict]:
    return [json.loads(line) for line in (EXAMPLES / "piqa-300.jsonl").read_text().splitlines()[:n]]


def wait_for(client: TestClient, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def test_health_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/recommendation",
            "/api/v1/jobs/{job_id}/compare", "/api/v1/jobs/{job_id}/deploy"} <= set(paths)
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize(
    "body, message",
    [
        ({"model": "demo", "items": [], "threshold": 0.9}, "the dataset is empty"),
        ({"model": "demo", "items": [{"prompt": "a", "choices": ["x", "y"], "answer": 3}]}, "items[0]: field 'answer' is 3"),
        ({"model": "demo", "items": [{"prompt": "a", "reference": "b"}], "threshold": 2}, "threshold 2.0 must be in"),
        ({"model": "demo", "items": [{"prompt": "a", "reference": "b"}], "candidates": ["int5"]}, "unknown candidate"),
        ({"model": "demo", "items": [{"prompt": "a", "reference": "b"}], "policy": "lucky"}, "policy 'lucky' must be one of"),
        ({"model": "/no/such/model", "items": [{"prompt": "a", "reference": "b"}]}, "model path does not exist"),
        ({"model": "demo", "dataset": "/no/such.jsonl"}, "dataset file not found"),
        ({"model": "demo", "items": [{"prompt": "a", "reference": "b"}], "candidate_timeout": "soon"},
         "candidate_timeout='soon': give a duration such as 90m"),
        ({"model": "demo", "items": [{"prompt": "a", "reference": "b"}], "notify": "ftp://hooks"},
         "notify 'ftp://hooks': give an http(s) URL"),
        ({"items": []}, "body.model: Field required"),
        ({"model": "demo", "items": [], "thresold": 0.9}, "body.thresold: Extra inputs are not permitted"),
    ],
)
def test_invalid_bodies_are_422_with_a_readable_message(client, body, message):
    res = client.post("/api/v1/jobs", json=body)
    assert res.status_code == 422, res.text
    assert message in res.json()["detail"]
    assert client.get("/api/v1/jobs").json() == []


def test_preview_says_what_a_submission_would_run_and_submits_nothing(client, tiny_llama):
    body = {"model": str(tiny_llama), "items": piqa_items(40), "candidates": ["int8", "int4-gptq:group_size=64", "fp8"],
            "calibration_samples": 8}
    res = client.post("/api/v1/jobs/preview", json=body)
    assert res.status_code == 200, res.text
    p = res.json()
    assert (p["n_items"], p["metric"], p["calibration"]["held_out_items"]) == (32, "accuracy", 8)
    rows = {c["name"]: c for c in p["candidates"]}
    assert list(rows) == ["baseline", "int8", "int4-gptq:group_size=64", "fp8"]
    assert rows["int8"]["unavailable_here"] is None and "compute capability" in rows["fp8"]["unavailable_here"]
    assert rows["int8"]["weights_bytes"] < rows["baseline"]["weights_bytes"] and not rows["int8"]["stored_result"]
    bad = client.post("/api/v1/jobs/preview", json={**body, "candidates": ["int4:group_size=256"]})
    assert bad.status_code == 422 and "group size 256 does not divide" in bad.json()["detail"]
    assert client.get("/api/v1/jobs").json() == []


def test_a_client_lists_candidates_gpus_and_jobs_and_plans_the_fit_before_submitting(client):
    """What the CLI's `candidates`, `gpus` and `plan` say, over HTTP: the names a request's
    `candidates` and `target_gpu` take, and whether a model fits, from its config alone."""
    configs = Path(__file__).parent / "data" / "configs"
    candidates = {c["name"]: c for c in client.get("/api/v1/candidates").json()}
    assert {"baseline", "fp16", "int8", "w8a8", "int4", "int4-gptq", "int4-awq", "nf4", "fp8"} <= set(candidates)
    assert candidates["baseline"]["default"] and candidates["int4-gptq"]["calibrated"]
    assert candidates["int4-gptq"]["parameters"]["group_size"] == 128
    assert all(c["available"] == (c["reason"] is None) for c in candidates.values())
    gpus = {g["name"]: g for g in client.get("/api/v1/gpus").json()}
    assert gpus["H100-80GB"]["aliases"] == ["H100"] and gpus["L4"]["usd_per_hour"] > 0
    res = client.get("/api/v1/plan", params={"model": str(configs / "llama-3.1-70b.json"), "gpu": "H100"})
    assert res.status_code == 200, res.text
    rows = {r["precision"]: r for r in res.json()["precisions"]}
    assert res.json()["gpu"] == "H100-80GB" and rows["bf16"]["gpus"] == 2 and rows["int4"]["gpus"] == 1
    res = client.get("/api/v1/plan", params={"model": "/no/such/model"})
    assert res.status_code == 422 and res.json()["detail"].startswith("/no/such/model: ")
    res = client.get("/api/v1/plan", params={"model": str(configs / "llama-3.1-70b.json"), "batch": 0})
    assert res.status_code == 422 and res.json()["detail"].startswith("query.batch: ")
    res = client.get("/api/v1/plan", params={"model": str(configs / "llama-3.1-70b.json"), "gpu": "H1000"})
    assert res.status_code == 422 and "unknown target GPU 'H1000'" in res.json()["detail"]
    # and which jobs are there: the newest, of some statuses
    assert client.get("/api/v1/jobs", params={"status": ["queued", "running"], "limit": 5}).status_code == 200
    res = client.get("/api/v1/jobs", params={"status": "done"})
    assert res.status_code == 422 and res.json()["detail"].startswith("status 'done' is not one of queued, running")


def test_unknown_ids_are_404(client):
    for path in ("/api/v1/jobs/nope", "/api/v1/jobs/nope/recommendation", "/api/v1/jobs/nope/results"):
        res = client.get(path)
        assert res.status_code == 404 and "not found" in res.json()["detail"]
    assert client.post("/api/v1/jobs/nope/deploy").status_code == 404


def test_submit_inline_items_recommend_and_deploy(client, tiny_llama):
    res = client.post("/api/v1/jobs", json={"model": str(tiny_llama), "items": piqa_items(8),
                                           "candidates": ["int8"], "threshold": 0.5, "gpu_hour_usd": 2.0})
    assert res.status_code == 202, res.text
    job_id = res.json()["id"]
    assert res.json()["status"] in ("queued", "running")
    # The API keeps answering while the job runs.
    assert client.get("/healthz").status_code == 200
    job = wait_for(client, job_id)
    assert job["status"] == "succeeded", job
    assert {r["name"] for r in job["results"]} == {"baseline", "int8"}
    assert [j["id"] for j in client.get("/api/v1/jobs").json()] == [job_id]

    rec = client.get(f"/api/v1/jobs/{job_id}/recommendation", params={"threshold": 0.01}).json()
    assert rec["chosen"] in ("baseline", "int8") and rec["threshold"] == 0.01
    assert client.get(f"/api/v1/jobs/{job_id}/recommendation", params={"threshold": 3}).status_code == 422
    strict = client.get(f"/api/v1/jobs/{job_id}/recommendation", params={"policy": "lower-bound", "confidence": 0.8})
    assert strict.status_code == 200 and strict.json()["policy"] == "lower-bound"
    assert all(c["ci_low"] is not None for c in strict.json()["candidates"])
    items = client.get(f"/api/v1/jobs/{job_id}/results", params={"items": True}).json()
    assert len(items) == 2 * 8
    assert all(r["items_stored"] == 8 for r in job["results"])
    cmp = client.get(f"/api/v1/jobs/{job_id}/compare", params={"candidate": "int8"}).json()
    right = {(i["candidate"], i["index"]): i["correct"] for i in items}
    assert cmp["n_items"] == 8 and cmp["n_worse"] == sum(right["baseline", n] > right["int8", n] for n in range(8))
    assert client.get(f"/api/v1/jobs/{job_id}/compare", params={"candidate": "nope"}).status_code == 404
    assert client.get(f"/api/v1/jobs/{job_id}/compare", params={"candidate": "baseline"}).status_code == 422

    dep = client.post(f"/api/v1/jobs/{job_id}/deploy", json={"candidate": "int8"})
    assert dep.status_code == 200, dep.text
    base_url = dep.json()["base_url"]
    assert "/models/int8-" in base_url and base_url.endswith("/v1")
    oai = openai.OpenAI(base_url=base_url, api_key="unused")
    model = oai.models.list().data[0].id
    chat = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens > 0
    assert client.get(f"/api/v1/jobs/{job_id}").json()["base_url"] == base_url
    served = client.delete(f"/api/v1/jobs/{job_id}/record")  # served: not deleted
    assert served.status_code == 409 and "undeploy" in served.json()["detail"]
    # its artifact is on disk, served: a prune keeps it and says why
    [artifact] = [e for e in client.get("/api/v1/cache").json() if e["kind"] == "artifact"]
    assert artifact["jobs"] == [job_id] and artifact["served_by"] == [job_id] and artifact["size_bytes"] > 0
    dry = client.post("/api/v1/cache/prune", json={"keys": [artifact["key"]], "dry_run": True}).json()
    assert dry["removed"] == [] and "served by job" in dry["kept"][0]["reason"]
    bad = client.post("/api/v1/cache/prune", json={})
    assert bad.status_code == 422 and "say what to remove" in bad.json()["detail"]

    # Another candidate of the job, batched decoding asked for: it replaces the first once it answers.
    from quantselect.serving.deploy import list_deployments

    assert client.post(f"/api/v1/jobs/{job_id}/deploy", json={"engine": "fast"}).status_code == 422
    again = client.post(f"/api/v1/jobs/{job_id}/deploy", json={"candidate": "baseline", "engine": "dynamic"})
    assert again.status_code == 200, again.text
    new_url = again.json()["base_url"]
    new_model = new_url.rstrip("/").split("/")[-2]
    assert new_model.startswith("baseline-") and new_model in list_deployments() and model not in list_deployments()
    health = httpx.get(new_url.removesuffix("/v1") + "/healthz", timeout=30).json()
    assert health["decoding"].startswith("dynamic KV cache") and health["model"] == new_model
    # Stopping it: the deployment goes, the job forgets it, and a second stop is a conflict.
    gone = client.delete(f"/api/v1/jobs/{job_id}/deploy")
    assert gone.status_code == 200 and gone.json() == {"job_id": job_id, "stopped": new_model}
    assert new_model not in list_deployments()
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["base_url"] is None and job["deployed_candidate"] is None
    assert client.delete(f"/api/v1/jobs/{job_id}/deploy").status_code == 409
    # served no more: the artifact can go
    pruned = client.post("/api/v1/cache/prune", json={"keys": [artifact["key"]]}).json()
    assert [e["key"] for e in pruned["removed"]] == [artifact["key"]] and pruned["freed_bytes"] == artifact["size_bytes"]
    assert not [e for e in client.get("/api/v1/cache").json() if e["kind"] == "artifact"]
    # The finished job, served no more, can be deleted: its record goes, and a second delete is a 404.
    assert client.delete(f"/api/v1/jobs/{job_id}/record").json() == {"deleted": job_id}
    assert client.get(f"/api/v1/jobs/{job_id}").status_code == 404
    assert client.delete(f"/api/v1/jobs/{job_id}/record").status_code == 404


def _settled(client: TestClient, job_id: str, timeout: float = 300) -> dict:
    """The job once it is done and deployed (or not): a succeeded job's stage is "deploying ..." until
    then, written with its status, so a client never sees it done before its deployment started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] == "failed" or (job["status"] == "succeeded" and job["stage"] is None):
            return job
        assert job["stage"] is None or job["status"] == "running" or job["stage"].startswith("deploying"), job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not settle: {job}")


def test_a_job_that_asks_to_be_deployed_serves_its_recommendation_or_says_why_not(client, tiny_llama, monkeypatch):
    """`"deploy": true`: the recommended candidate is served once the job succeeds. When it cannot be
    (a random model scores 0 on GSM8K: nothing to recommend), the job still succeeds, its results
    stand, and `deploy_error` says why; `status` shows it, and deploying a named candidate clears it."""
    from click.testing import CliRunner

    from quantselect.cli import cli
    from quantselect.serving.deploy import list_deployments

    body = {"model": str(tiny_llama), "dataset": str(EXAMPLES / "gsm8k-50.jsonl"), "limit": 4, "max_new_tokens": 8,
            "candidates": ["int8"], "deploy": True}
    job_id = client.post("/api/v1/jobs", json=body).json()["id"]
    job = _settled(client, job_id)
    assert job["status"] == "succeeded" and job["base_url"] is None and job["driver_silent_seconds"] is None, job
    assert job["deploy_error"] == (f"job {job_id}: no recommendation: the baseline scores 0 on this task, so there "
                                   "is nothing to keep; name the candidate to use"), job
    assert {r["name"]: r["status"] for r in job["results"]} == {"baseline": "succeeded", "int8": "succeeded"}
    shown = CliRunner().invoke(cli, ["status", job_id]).output
    assert shown.splitlines()[0] == f"Job {job_id}: succeeded" and f"  not deployed: {job['deploy_error']}" in shown, shown
    dep = client.post(f"/api/v1/jobs/{job_id}/deploy", json={"candidate": "int8"})
    assert dep.status_code == 200, dep.text
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["deploy_error"] is None and job["deployed_candidate"] == "int8"
    assert client.delete(f"/api/v1/jobs/{job_id}/deploy").status_code == 200

    # A server with QUANTSELECT_SERVE_API_KEY deploys with it: the deployment asks its clients for it.
    from quantselect.api.app import create_app

    key = "sk-served-0123456789abcdef"
    monkeypatch.setenv("QUANTSELECT_SERVE_API_KEY", key)
    body = {"model": str(tiny_llama), "items": piqa_items(8), "candidates": ["int8"], "threshold": 0.01, "deploy": True}
    with TestClient(create_app(connect_ray=False)) as keyed:
        job_id = keyed.post("/api/v1/jobs", json=body).json()["id"]
        job = _settled(keyed, job_id)
        chosen = keyed.get(f"/api/v1/jobs/{job_id}/recommendation").json()["chosen"]
        assert job["status"] == "succeeded" and job["deploy_error"] is None and job["deployed_candidate"] == chosen, job
        model = job["base_url"].rstrip("/").split("/")[-2]
        assert model in list_deployments()
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=job["base_url"], api_key="unused").completions.create(model=model, prompt="Hi")
        reply = openai.OpenAI(base_url=job["base_url"], api_key=key).completions.create(model=model, prompt="Hi", max_tokens=3)
        assert reply.usage.completion_tokens > 0
        # A server without the key deploying the job's other candidate would stop the keyed deployment
        # and serve the new one open: refused, and the keyed one still serves.
        other = "baseline" if chosen != "baseline" else "int8"
        res = client.post(f"/api/v1/jobs/{job_id}/deploy", json={"candidate": other})
        assert res.status_code == 409 and res.json()["detail"].startswith(
            f"deployment '{model}' asks its clients for an API key, and this process has no QUANTSELECT_SERVE_API_KEY"), res.text
        assert keyed.get(f"/api/v1/jobs/{job_id}").json()["deployed_candidate"] == chosen
        assert model in list_deployments() and f"{other}-{job_id[:6]}" not in list_deployments()
        reply = openai.OpenAI(base_url=job["base_url"], api_key=key).completions.create(model=model, prompt="Hi", max_tokens=3)
        assert reply.usage.completion_tokens > 0
        assert keyed.delete(f"/api/v1/jobs/{job_id}/deploy").json()["stopped"] == model


def test_stopping_the_server_cancels_the_job_it_runs_and_the_next_server_runs_the_one_it_queued(
        ray_cluster, tiny_llama, monkeypatch):
    """The app's shutdown (Ctrl-C or SIGTERM on `quantselect api`) cancels the job it drives (its
    workers stop within seconds: the shutdown does not wait for the job to end), saying why, and
    `resume` continues it. The job it had queued stays queued, `status` says why, and the next server
    on the database runs it. Before, the process waited for every job; then queued ones were lost."""
    from click.testing import CliRunner

    from quantselect.api.app import SERVER_STOPPED, create_app
    from quantselect.cli import cli
    from quantselect.service import Service

    monkeypatch.setenv("QUANTSELECT_API_MAX_JOBS", "1")  # the second job waits in the queue
    monkeypatch.setenv("QUANTSELECT_STREAM_CHUNK", "4")
    svc = Service()
    body = {"model": str(tiny_llama), "dataset": str(EXAMPLES / "gsm8k-50.jsonl"), "limit": 50, "max_new_tokens": 64,
            "candidates": ["int8"]}
    hook = Hook()
    with TestClient(create_app(svc, connect_ray=False)) as client:
        first = client.post("/api/v1/jobs", json={**body, "notify": hook.url}).json()["id"]
        second = client.post("/api/v1/jobs", json=body).json()["id"]
        deadline = time.monotonic() + 600
        while not any(svc.items_stored(first).values()):
            assert time.monotonic() < deadline, "the first job never scored an item"
            time.sleep(0.2)
    job = svc.get_job(first)  # the shutdown has run
    assert (job.status, job.error) == ("cancelled", f"{SERVER_STOPPED}; `quantselect resume {first}` continues it")
    hook.close()
    assert [p["text"] for p in hook.posted] == [  # the webhook says it too (before, it said "cancelled by request")
        f"quantselect job {first} ({tiny_llama} on {EXAMPLES / 'gsm8k-50.jsonl'}) cancelled: {job.error}"]
    assert {r.status for r in svc.results(first)} <= {"cancelled", "succeeded"}, svc.results(first)
    assert svc.get_job(second).status == "queued" and {r.status for r in svc.results(second)} == {"pending"}
    assert CliRunner().invoke(cli, ["status", second]).output.startswith(
        f"Job {second}: queued by the API server {svc.driver_id}, which stopped before starting it; the next "
        "`quantselect api` on this database runs it")
    follow = CliRunner().invoke(cli, ["status", second, "--follow"])  # it returns (it waited for ever)
    assert follow.exit_code == 1 and follow.output.rstrip().splitlines()[-1] == (
        f"Error: job {second}: queued by an API server that stopped before starting it; the next `quantselect api` "
        f"on this database runs it, or `quantselect resume {second}` here"), follow.output
    deadline = time.monotonic() + 60
    while ray_cluster.available_resources().get("GPU") != 2:  # the first job's workers are gone
        assert time.monotonic() < deadline, ray_cluster.available_resources()
        time.sleep(0.5)
    with TestClient(create_app(svc, connect_ray=False)) as client:  # the server again (a restart, a new release)
        assert wait_for(client, second)["status"] == "succeeded"
    assert svc.get_job(first).status == "cancelled"  # an interrupted job waits for its user's `resume`


class HeldHook:
    """A webhook that answers no POST until ``released`` is set: a job posting its end to it holds its
    driver thread, the API server's one slot (QUANTSELECT_API_MAX_JOBS=1), meanwhile."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.arrived, self.released = threading.Event(), threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                hook.arrived.set()
                hook.released.wait(60)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def finished_but_cancelled(svc, notify: str | None = None) -> str:
    """A cancelled job whose every candidate had succeeded: resuming it runs nothing on Ray."""
    from quantselect.domain.results import CandidateResult, ItemResult
    from quantselect.service import SubmitRequest

    job = svc.repo.create_job(svc.build_spec(SubmitRequest(model="demo", items=piqa_items(4), candidates=["int8"],
                                                           notify=notify)))
    for name in job.candidate_names:
        svc.repo.save_outcome(job.id, CandidateResult(name=name, config={}, status="succeeded", score=1.0, n_items=4,
                                                      weight_bytes=2**20, items=[ItemResult(i, True, 0) for i in range(4)]))
    svc.repo.finish_job(job.id, "cancelled", error="cancelled")
    return job.id


def test_a_job_resumed_in_the_server_runs_once_a_cancel_while_it_waits_stands_and_shutdown_ends_them_all(
        demo_model_dir, monkeypatch):
    """A resume of a job this server runs or has queued is a 409 (before, each one started another
    driver of the same job). A job resumed here, waiting for a slot, that is cancelled meanwhile
    ends cancelled (before, its driver's claim cleared the cancel and it ran). At shutdown, a queued
    job cancelled and deleted meanwhile does not stop the others from ending as they should."""
    import threading

    from quantselect.api.app import SERVER_STOPPED, create_app
    from quantselect.service import Service

    monkeypatch.setenv("QUANTSELECT_API_MAX_JOBS", "1")
    svc = Service()
    hook, note = HeldHook(), Hook()
    blocker, waiting = finished_but_cancelled(svc, hook.url), finished_but_cancelled(svc, note.url)
    with TestClient(create_app(svc, connect_ray=False)) as client:
        assert client.post(f"/api/v1/jobs/{blocker}/resume").status_code == 202
        assert hook.arrived.wait(120), "the first job never ended"  # its driver thread holds the one slot
        assert client.post(f"/api/v1/jobs/{waiting}/resume").status_code == 202  # claimed; waits for the slot
        for job_id, state in ((waiting, "queued"), (blocker, "running")):
            res = client.post(f"/api/v1/jobs/{job_id}/resume")
            assert res.status_code == 409 and res.json() == {"detail": f"job {job_id} is already {state} in this API server"}
        assert client.delete(f"/api/v1/jobs/{waiting}").status_code == 202
        hook.released.set()
        deadline = time.monotonic() + 120
        while svc.get_job(waiting).status == "running":
            assert time.monotonic() < deadline, "the cancelled job never ended"
            time.sleep(0.2)
        job = svc.get_job(waiting)
        assert (job.status, job.error) == ("cancelled", "cancelled by request")
        assert {r.status for r in svc.results(waiting)} == {"succeeded"}  # its results stay; `resume` continues it
        note.close()  # and its webhook says how it ended, as for any end
        assert [(p["job"]["status"], p["text"].endswith(" cancelled: cancelled by request")) for p in note.posted] == [
            ("cancelled", True)], note.posted

    hook = HeldHook()
    blocker, resumed = finished_but_cancelled(svc, hook.url), finished_but_cancelled(svc)
    with TestClient(create_app(svc, connect_ray=False)) as client:
        assert client.post(f"/api/v1/jobs/{blocker}/resume").status_code == 202
        assert hook.arrived.wait(120), "the first job never ended"
        gone = client.post("/api/v1/jobs", json={"model": "demo", "items": piqa_items(4), "candidates": ["int8"]}).json()["id"]
        assert client.delete(f"/api/v1/jobs/{gone}").json()["status"] == "cancelled"
        assert client.delete(f"/api/v1/jobs/{gone}/record").json() == {"deleted": gone}
        assert client.post(f"/api/v1/jobs/{resumed}/resume").status_code == 202
        threading.Timer(3, hook.released.set).start()  # once the shutdown has begun
    job = svc.get_job(resumed)  # waiting for a slot as the server stopped (after the deleted one)
    assert (job.status, job.error) == ("cancelled", f"{SERVER_STOPPED}; `quantselect resume {resumed}` continues it")


def test_out_of_range_numbers_are_422_not_500(monkeypatch):
    """Integers in a query beyond what the database and the planner hold (before: a 500), and an
    infinite price in a body (1e999 reads as inf)."""
    from quantselect.api.app import MAX_QUERY_INT, create_app
    from quantselect.domain.planner import MAX_CONTEXT

    huge = "1" + "0" * 400
    with TestClient(create_app(connect_ray=False)) as client:
        for path, params, name in (("/api/v1/jobs", {"limit": 10**20}, "limit"),
                                   ("/api/v1/plan", {"model": "demo", "context": huge}, "context"),
                                   ("/api/v1/plan", {"model": "demo", "batch": 10**20}, "batch"),
                                   ("/api/v1/jobs/x/compare", {"candidate": "int8", "limit": 10**20}, "limit")):
            res = client.get(path, params=params)
            assert res.status_code == 422 and res.json()["detail"] == (
                f"query.{name}: Input should be less than or equal to {MAX_QUERY_INT}"), res.text
        assert client.get("/api/v1/jobs", params={"limit": MAX_QUERY_INT}).json() == []
        res = client.get("/api/v1/plan", params={"model": "demo", "context": MAX_CONTEXT, "batch": MAX_QUERY_INT})
        assert res.status_code == 200, res.text
        assert res.json()["notes"][0].startswith(f"context {MAX_CONTEXT:,} is beyond the model's max_position_embeddings")
        res = client.get("/api/v1/plan", params={"model": "demo", "context": MAX_QUERY_INT})
        assert res.status_code == 422 and "more than the planner takes" in res.text, res.text
        body = '{"model": "demo", "items": %s, "gpu_hour_usd": 1e999}' % json.dumps(piqa_items(4))
        res = client.post("/api/v1/jobs", content=body, headers={"content-type": "application/json"})
        assert res.status_code == 422 and res.json() == {
            "detail": "gpu-hour price inf must be a positive, finite number of US dollars"}, res.text
        assert client.get("/api/v1/jobs").json() == []


TOKEN = "s3cret-token-0123456789abcdef"


def test_with_a_token_every_api_request_must_carry_it(monkeypatch):
    """QUANTSELECT_API_TOKEN set: a request without it, or with another, is refused (401, one line,
    `WWW-Authenticate: Bearer`) and changes nothing; with it, it is served. /healthz (probes) and the
    OpenAPI docs stay open, which show the scheme. A token short enough to guess is refused, naming
    the variable."""
    from click.testing import CliRunner

    from quantselect.api.app import create_app
    from quantselect.cli import cli

    monkeypatch.setenv("QUANTSELECT_API_TOKEN", TOKEN)
    body = {"model": "demo", "items": piqa_items(4)}
    with TestClient(create_app(connect_ray=False)) as client:
        for headers, what in (({}, "no bearer token"), ({"Authorization": "Bearer " + TOKEN[:-1] + "X"}, "wrong bearer token"),
                              ({"Authorization": "Basic " + TOKEN}, "no bearer token")):
            for res in (client.get("/api/v1/jobs", headers=headers), client.post("/api/v1/jobs", json=body, headers=headers)):
                assert res.status_code == 401 and res.headers["www-authenticate"] == "Bearer", res.text
                assert res.json() == {"detail": f"{what}: send the header `Authorization: Bearer TOKEN` with the server's "
                                                "QUANTSELECT_API_TOKEN"}
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/api/v1/jobs", headers=auth).json() == []  # nothing was submitted
        for headers, status in (({}, 401), (auth, 422)):  # the token is asked for before the body is read
            res = client.post("/api/v1/jobs", content=b"{not json", headers={"content-type": "application/json", **headers})
            assert res.status_code == status, res.text
        assert client.get("/api/v1/no-such-route").status_code == 401  # says nothing of what exists
        assert client.get("/healthz/", follow_redirects=False).status_code != 401  # open, as /healthz
        assert client.get("/api/v1/no-such-route", headers=auth).status_code == 404
        routes = [(m.upper(), path.replace("{job_id}", "x").replace("{name}", "y"))
                  for path, methods in client.app.openapi()["paths"].items() if path.startswith("/api/") for m in methods]
        assert len(routes) >= 19
        for method, path in routes:  # every one of them, a route added later too
            assert client.request(method, path).status_code == 401, (method, path)
        assert client.get("/healthz").status_code == 200 and client.get("/docs").status_code == 200
        spec = client.get("/openapi.json").json()
        assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        assert spec["paths"]["/api/v1/jobs"]["get"]["security"] == [{"HTTPBearer": []}]
    monkeypatch.delenv("QUANTSELECT_API_TOKEN")
    with TestClient(create_app(connect_ray=False)) as client:  # no token: no scheme, every request served
        assert client.get("/api/v1/jobs").status_code == 200
        assert "securitySchemes" not in client.get("/openapi.json").json().get("components", {})
    monkeypatch.setenv("QUANTSELECT_API_TOKEN", "letmein")
    res = CliRunner().invoke(cli, ["api"])
    assert res.exit_code == 2 and res.output == (
        "Error: QUANTSELECT_API_TOKEN: give a token of at least 16 characters and no spaces (`openssl rand -hex 32` "
        "makes one)\n")


def test_without_a_token_a_server_on_loopback_answers_only_requests_naming_this_machine(monkeypatch):
    """No QUANTSELECT_API_TOKEN, `quantselect api` on 127.0.0.1 (the default): a request whose Host
    is not 127.0.0.1, localhost or [::1] is refused (400, one line) before any route runs. A web page
    the user opens could otherwise re-point its own name to 127.0.0.1 (DNS rebinding) and read the
    jobs, their items and outputs, submit or delete. With a token, or listening beyond loopback
    (which warns), any Host is served as before."""
    import uvicorn
    from click.testing import CliRunner

    from quantselect.api.app import create_app
    from quantselect.cli import cli

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))  # the app `api` would serve
    assert CliRunner().invoke(cli, ["api"]).exit_code == 0
    client = TestClient(served[0], base_url="http://evil.example:8080")  # no lifespan: Ray is not joined
    for res in (client.get("/api/v1/jobs"), client.get("/healthz"),
                client.post("/api/v1/jobs", json={"model": "demo", "items": piqa_items(4)}),
                client.get("/api/v1/jobs", headers={"Host": "127.0.0.1.evil.example"})):
        assert res.status_code == 400 and res.json()["detail"].startswith("Host '") and res.json()["detail"].endswith(
            "is not this machine: with no QUANTSELECT_API_TOKEN, this server answers requests to 127.0.0.1, "
            "localhost or [::1] only; set a token, or add the name to QUANTSELECT_API_HOSTS, to serve other names"), res.text
    for host in ("127.0.0.1:8080", "localhost", "LOCALHOST:80", "[::1]:8080"):
        assert client.get("/api/v1/jobs", headers={"Host": host}).json() == [], host  # nothing was submitted
    assert CliRunner().invoke(cli, ["api", "--host", "0.0.0.0"]).exit_code == 0  # warned: any Host
    assert TestClient(served[1], base_url="http://10.0.0.7:8080").get("/api/v1/jobs").status_code == 200
    monkeypatch.setenv("QUANTSELECT_API_TOKEN", TOKEN)
    app = create_app(connect_ray=False, listen="127.0.0.1")
    res = TestClient(app, base_url="http://quantselect.internal").get(
        "/api/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
    assert res.status_code == 200 and res.json() == []


def test_a_token_less_server_on_loopback_also_answers_the_names_in_api_hosts(monkeypatch):
    """A reverse proxy on this machine that passes its own Host on (quantselect.internal): listed in
    QUANTSELECT_API_HOSTS, that name is served without a token; any other still gets the one-line 400."""
    from quantselect.api.app import create_app
    from quantselect.errors import InputError

    monkeypatch.setenv("QUANTSELECT_API_HOSTS", "quantselect.internal, *.lab.example")
    app = create_app(connect_ray=False, listen="127.0.0.1")
    for host in ("quantselect.internal", "QUANTSELECT.INTERNAL:443", "api.lab.example", "localhost:8080"):
        assert TestClient(app, base_url=f"http://{host}").get("/api/v1/jobs").json() == [], host
    for host in ("evil.example", "lab.example.evil.example", "quantselect.internal.evil.example"):
        res = TestClient(app, base_url=f"http://{host}").get("/api/v1/jobs")
        assert res.status_code == 400 and "QUANTSELECT_API_HOSTS" in res.json()["detail"], (host, res.text)
        assert "localhost or [::1], quantselect.internal, *.lab.example only" in res.json()["detail"]
    monkeypatch.setenv("QUANTSELECT_API_HOSTS", "http://quantselect.internal/")
    with pytest.raises(InputError, match="QUANTSELECT_API_HOSTS='http://quantselect.internal/': "):
        create_app(connect_ray=False, listen="127.0.0.1")


def test_a_token_is_compared_as_the_bytes_the_client_sends():
    """Header bytes reach the gate decoded as latin-1: a secret beyond ASCII (set in code; the
    variable takes ASCII only) was compared as that text's UTF-8 and never matched."""
    from dataclasses import replace

    from quantselect.api.app import create_app
    from quantselect.service import Service
    from quantselect.settings import get_settings

    token = "clé-0123456789-ключ-voilà"  # its last byte, 0xa0, is a blank to str.strip()
    with TestClient(create_app(Service(replace(get_settings(), api_token=token)), connect_ray=False)) as client:
        sent = b"Bearer " + token.encode()  # as curl sends it from a UTF-8 terminal
        assert client.get("/api/v1/jobs", headers={"Authorization": sent}).status_code == 200
        assert client.get("/api/v1/jobs", headers={"Authorization": sent[:-1]}).status_code == 401
        assert client.get("/api/v1/jobs", headers={"Authorization": b"Bearer " + token.encode("utf-16")}).status_code == 401


def test_the_api_command_serves_http_asking_for_its_token_and_warns_when_open_to_the_network(ray_cluster, tmp_path):
    """`quantselect api` as users start it, a real HTTP server: with a token it says so and asks
    for it; listening beyond this machine without one, it warns before it starts."""
    import os
    import subprocess
    import sys

    from tests.fixtures.ray_cluster import free_port

    env = {**os.environ, "QUANTSELECT_RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "QUANTSELECT_API_TOKEN": TOKEN, "QUANTSELECT_API_PATHS": str(tmp_path)}
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "quantselect", "api", "--host", "0.0.0.0", "--port", str(port)],
                              env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr.readline() == ("Every request but /healthz and the docs must carry `Authorization: Bearer "
                                            "$QUANTSELECT_API_TOKEN`.\n")
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
                time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/gpus").status_code == 401
        res = httpx.get(f"http://127.0.0.1:{port}/api/v1/gpus", headers={"Authorization": f"Bearer {TOKEN}"})
        assert res.status_code == 200 and any(g["name"].startswith("H100") for g in res.json())
    finally:
        server.terminate()
        server.wait(timeout=60)
    del env["QUANTSELECT_API_TOKEN"], env["QUANTSELECT_API_PATHS"]
    server = subprocess.Popen([sys.executable, "-m", "quantselect", "api", "--host", "0.0.0.0", "--port", str(port)],
                              env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr.readline() == (
            f"warning: serving on 0.0.0.0:{port} with no QUANTSELECT_API_TOKEN: whoever reaches this port can submit "
            "and delete jobs and read their datasets; set one (`openssl rand -hex 32`)\n")
        assert server.stderr.readline().startswith("warning: requests may name any file this server can read")
    finally:
        server.kill()
        server.wait(timeout=60)


def test_with_api_paths_a_request_names_files_of_this_machine_only_under_them(tiny_llama, tmp_path, monkeypatch):
    """QUANTSELECT_API_PATHS: a dataset, labels, calibration file, model or checkpoint folder outside
    those folders is refused (403) before anything is read, whether it exists or not (the answer
    tells nothing of what is there), links followed; Hub ids, hf:// files and the demo model are
    not this machine's files. Without it, a client could read back any JSONL/CSV/Parquet file the
    server can read, as a dataset's items."""
    import shutil

    from quantselect.api.app import create_app
    from quantselect.errors import InputError
    from quantselect.settings import get_settings

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(EXAMPLES / "piqa-300.jsonl", data / "piqa.jsonl")
    (data / "escape.jsonl").symlink_to(EXAMPLES / "piqa-300.jsonl")
    monkeypatch.setenv("QUANTSELECT_API_PATHS", f"{data}:{tmp_path / 'models'}")
    inside = {"model": "demo", "dataset": str(data / "piqa.jsonl"), "limit": 8, "candidates": ["int8"]}
    refused = [({"dataset": str(EXAMPLES / "piqa-300.jsonl")}, str(EXAMPLES / "piqa-300.jsonl")),
               ({"dataset": "/etc/no-such-file.jsonl"}, "/etc/no-such-file.jsonl"),
               ({"dataset": str(data / "escape.jsonl")}, str(data / "escape.jsonl")),
               ({"dataset": str(data / ".." / "data" / ".." / "secrets.csv")}, str(data / ".." / "data" / ".." / "secrets.csv")),
               ({"model": str(tiny_llama)}, str(tiny_llama)),
               ({"candidates": ["int8", f"mine={tiny_llama}"]}, str(tiny_llama)),
               ({"candidates": ["int4-gptq"], "calibration": str(EXAMPLES / "gsm8k-50.jsonl")}, str(EXAMPLES / "gsm8k-50.jsonl")),
               ({"labels": "/etc/passwd", "map": ["prompt=goal", "choices=sol1,sol2"]}, "/etc/passwd"),
               ({"dataset": "/tmp/a\u0000b.jsonl"}, "/tmp/a\u0000b.jsonl")]
    with TestClient(create_app(connect_ray=False)) as client:
        for change, name in refused:
            for route in ("/api/v1/jobs", "/api/v1/jobs/preview"):
                res = client.post(route, json={**inside, **change})
                assert res.status_code == 403, (change, res.text)
                assert res.json()["detail"] == (f"{name}: outside the folders this server reads (QUANTSELECT_API_PATHS: "
                                                f"{data}, {tmp_path / 'models'}); put it there, or name it on the "
                                                "Hugging Face Hub")
        assert client.get("/api/v1/jobs").json() == []
        res = client.post("/api/v1/jobs/preview", json=inside)
        assert res.status_code == 200 and res.json()["n_items"] == 8, res.text
        for hub in ({"model": "nobody/not-cached"}, {"model": "https://huggingface.co/nobody/not-cached"},
                    {"candidates": ["int8", "theirs=https://huggingface.co/nobody/awq"]}):  # Hub ids: not paths
            res = client.post("/api/v1/jobs/preview", json={**inside, **hub})
            assert res.status_code == 422 and "not a folder or file here" in res.json()["detail"], res.text
        assert client.get("/api/v1/plan", params={"model": str(tiny_llama)}).status_code == 403
        assert client.get("/api/v1/plan", params={"model": "demo"}).status_code == 200
        # A relative owner/name is the Hub's, even where the server's working directory holds such a
        # folder: the answer tells nothing of it (before, a 403 there against a 422 elsewhere).
        shutil.copytree(tiny_llama, tmp_path / "work" / "acme" / "tiny")
        monkeypatch.chdir(tmp_path / "work")
        answers = []
        for model in ("acme/tiny", "acme/none"):
            res = client.post("/api/v1/jobs/preview", json={**inside, "model": model})
            plan = client.get("/api/v1/plan", params={"model": model})
            answers.append((res.status_code, res.json()["detail"].replace(model, "M"), plan.status_code,
                            plan.json()["detail"].replace(model, "M")))
        assert answers[0] == answers[1] and answers[0][0] == 422 and "M: not a folder or file here" in answers[0][1], answers
    with pytest.raises(InputError, match="QUANTSELECT_API_PATHS='data': data is not an absolute path"):
        get_settings({"QUANTSELECT_API_PATHS": "data"})
    with pytest.raises(InputError, match="QUANTSELECT_API_PATHS=':': give absolute folders"):
        get_settings({"QUANTSELECT_API_PATHS": ":"})


def test_a_webhook_on_a_host_the_server_does_not_post_to_is_403(monkeypatch):
    from quantselect.api.app import create_app

    monkeypatch.setenv("QUANTSELECT_NOTIFY_HOSTS", "hooks.slack.com,*.internal.example")
    body = {"model": "demo", "items": piqa_items(4), "candidates": ["int8"]}
    with TestClient(create_app(connect_ray=False)) as client:
        for url in ("http://169.254.169.254/latest/meta-data/iam/", "http://127.0.0.1:8265/api/jobs/"):
            res = client.post("/api/v1/jobs", json={**body, "notify": url})
            shown = url.split("/")[2]  # the URL is a secret: its path is not echoed
            assert res.status_code == 403 and res.json()["detail"].startswith(f"notify 'http://{shown}/…': "), res.text
        assert client.get("/api/v1/jobs").json() == []
        res = client.post("/api/v1/jobs/preview", json={**body, "notify": "https://chat.internal.example/hooks/x"})
        assert res.status_code == 200, res.text


def test_a_jobs_webhook_url_is_shown_without_its_token(tiny_llama):
    """A webhook URL is a secret (a Slack or Teams hook's path is its token; a URL may carry a user
    and password): the job as the API, `jobs --json` and the posted job show its scheme, host and
    port only; the database keeps it whole for the driver that posts."""
    from click.testing import CliRunner

    from quantselect.api.app import create_app
    from quantselect.cli import cli
    from quantselect.service import Service, SubmitRequest

    svc = Service()
    url = "https://bot:pa55@hooks.slack.com/services/T0001/B0001/s3cr3t?x=tok3n"
    job = svc.repo.create_job(svc.build_spec(SubmitRequest(model="demo", items=piqa_items(4), candidates=["int8"],
                                                           notify=url)))
    svc.repo.finish_job(job.id, "failed", error="it broke")  # not taken up by the server below
    with TestClient(create_app(svc, connect_ray=False)) as client:
        answers = [client.get("/api/v1/jobs").text, client.get(f"/api/v1/jobs/{job.id}").text]
        assert client.get("/api/v1/jobs").json()[0]["notify"] == "https://hooks.slack.com/…"
    answers.append(CliRunner().invoke(cli, ["jobs", "--format", "json"]).output)
    answers.append(CliRunner().invoke(cli, ["status", job.id]).output)
    for text in answers:
        assert not any(secret in text for secret in ("pa55", "s3cr3t", "tok3n", "T0001")), text
    assert svc.repo.get_job(job.id).notify == url


def test_metrics_for_prometheus(monkeypatch):
    """GET /metrics: jobs and candidates by status over the whole database, and this server's own
    jobs, in Prometheus' text format; behind the API token when one is set (Prometheus sends it as
    a bearer token)."""
    import re

    from quantselect.api.app import create_app
    from quantselect.service import Service, SubmitRequest

    svc = Service()
    svc.repo.create_job(svc.build_spec(SubmitRequest(model="demo", items=piqa_items(40), candidates=["int8"])))
    with TestClient(create_app(svc, connect_ray=False)) as client:
        res = client.get("/metrics")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    lines = res.text.splitlines()
    samples = dict(line.rsplit(" ", 1) for line in lines if not line.startswith("#"))
    assert all(re.fullmatch(r'[a-z_]+(\{[a-z]+="[a-z]+"\})?', name) and value.isdigit() for name, value in samples.items())
    assert samples['quantselect_jobs{status="queued"}'] == "1" and samples['quantselect_jobs{status="running"}'] == "0"
    assert samples['quantselect_candidates{status="pending"}'] == "2"
    assert samples['quantselect_api_jobs{state="running"}'] == "0" and samples["quantselect_api_max_jobs"] == "4"
    assert "# TYPE quantselect_jobs gauge" in lines
    monkeypatch.setenv("QUANTSELECT_API_TOKEN", TOKEN)
    with TestClient(create_app(connect_ray=False)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_jobs_and_per_item_results_come_in_pages():
    """GET /api/v1/jobs?limit=N&before=ID: the next page after the job a page ended with, which jobs
    submitted meanwhile do not shift; ?items=true&offset=&limit=: a page of each candidate's items
    (GSM8K: 1,319 items x 10 candidates in one answer before). Bounds are a one-line 422."""
    from quantselect.api.app import MAX_QUERY_INT, create_app
    from quantselect.domain.results import CandidateResult, ItemResult
    from quantselect.service import Service, SubmitRequest

    svc = Service()
    spec = svc.build_spec(SubmitRequest(model="demo", items=piqa_items(6), candidates=["int8"]))
    first = svc.repo.create_job(spec).id
    for name, n in (("baseline", 6), ("int8", 4)):
        svc.repo.save_outcome(first, CandidateResult(name=name, config={}, status="succeeded", score=0.5, n_items=n,
                                                     items=[ItemResult(i, i % 2 == 0, 0) for i in range(n)]))
    for _ in range(4):
        svc.repo.create_job(spec)
    with TestClient(create_app(svc, connect_ray=False)) as client:
        every = [j["id"] for j in client.get("/api/v1/jobs").json()]
        seen, params = [], {"limit": 2}
        for _ in range(4):
            res = client.get("/api/v1/jobs", params=params)
            assert res.status_code == 200, res.text
            seen += [j["id"] for j in res.json()]
            params["before"] = seen[-1]
            svc.repo.create_job(spec)  # submitted while the client pages
        assert seen == every and len(every) == 5
        url = f"/api/v1/jobs/{first}/results"
        res = client.get(url, params={"items": "true", "offset": 2, "limit": 3})
        assert res.status_code == 200, res.text
        assert [(r["candidate"], r["index"]) for r in res.json()] == [
            ("baseline", 2), ("baseline", 3), ("baseline", 4), ("int8", 2), ("int8", 3)]
        assert len(client.get(url, params={"items": "true"}).json()) == 10
        assert client.get(url, params={"items": "true", "offset": 6}).json() == []
        for path, params, detail in (
                ("/api/v1/jobs", {"before": "nope"},
                 "before='nope': no such job (deleted meanwhile?); give the id of the last job of the page before"),
                (url, {"items": "true", "offset": -1}, "query.offset: Input should be greater than or equal to 0"),
                (url, {"items": "true", "limit": 0}, "query.limit: Input should be greater than or equal to 1"),
                (url, {"items": "true", "limit": 10**20}, f"query.limit: Input should be less than or equal to {MAX_QUERY_INT}"),
                (url, {"limit": 10}, "offset and limit page the per-item results: add items=true")):
            res = client.get(path, params=params)
            assert res.status_code == 422 and res.json() == {"detail": detail}, (params, res.text)


def test_a_job_whose_driver_was_submitted_to_an_unreachable_cluster_is_answered_at_once():
    """GET /api/v1/jobs/ID of a queued job whose driver was submitted to a Ray cluster asks that
    cluster about it (tests/test_remote.py); one that does not answer is said in driver_note, without
    waiting long or failing the job."""
    from quantselect.api.app import create_app
    from quantselect.service import Service, SubmitRequest
    from tests.fixtures.ray_cluster import free_port

    svc = Service()
    job = svc.repo.create_job(svc.build_spec(SubmitRequest(model="demo", items=piqa_items(4), candidates=["int8"])))
    local = svc.repo.create_job(svc.build_spec(SubmitRequest(model="demo", items=piqa_items(4), candidates=["int8"])))
    address = f"http://127.0.0.1:{free_port()}"
    svc.repo.set_ray_submission(job.id, address, f"quantselect-{job.id}")
    with TestClient(create_app(svc, connect_ray=False)) as client:
        res = client.get(f"/api/v1/jobs/{job.id}")
        assert res.status_code == 200, res.text
        assert res.json()["status"] == "queued"
        note = res.json()["driver_note"]
        assert note.startswith(f"cannot ask the Ray cluster at {address} about the job's driver, Ray job "
                               f"quantselect-{job.id}: "), note
        assert "failed to connect" in note.lower(), note  # why: nobody listens there (said, not the job failed)
        assert client.get(f"/api/v1/jobs/{local.id}").json()["driver_note"] is None
