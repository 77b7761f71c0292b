"""What the REST API answers to bad or odd input, on the real app (TestClient, no Ray unless said),
real SQLite: one line of JSON naming what to fix, never a 500 or Starlette's plain text; its OpenAPI
document says so. And `quantselect api` as users run it, stopped with SIGTERM."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from tests.fixtures.common import EXAMPLES


def piqa_items(n: int) -> list[dict]:
    return [json.loads(line) for line in (EXAMPLES / "piqa-300.jsonl").read_text().splitlines()[:n]]


def _app(**kw):
    from quantselect.api.app import create_app

    return create_app(connect_ray=False, **kw)


def test_durations_past_100_years_or_infinite_are_a_one_line_422_not_a_500():
    """`older_than` of 200000w overflowed the date it is subtracted from (a 500), 1e20 weeks the
    timedelta (a 500; the CLI printed "internal error"); 400 nines read as an infinite timeout; a JSON
    number of seconds was formatted 1e+20 and refused as no duration."""
    from quantselect.cli import cli
    from quantselect.domain.durations import parse_duration
    from quantselect.errors import InputError

    assert parse_duration(5400, "candidate_timeout") == 5400.0  # a JSON number: seconds
    assert parse_duration(90.5, "candidate_timeout") == 90.5
    assert parse_duration("52w", "--older-than", bare_seconds=False) == 52 * 7 * 86400
    for text, why in (("9" * 400 + "s", "at most 100 years"), (1e20, "at most 100 years"),
                      (float("inf"), "at most 100 years"), (float("nan"), "longer than 0"), (-5, "longer than 0"),
                      ("101y", "give a duration such as")):
        with pytest.raises(InputError, match=why) as e:
            parse_duration(text, "candidate_timeout")
        assert str(e.value).startswith("candidate_timeout=") and len(str(e.value)) < 150, str(e.value)
    with TestClient(_app()) as client:
        for older_than in ("200000w", "99999999999999999999w", "9" * 400 + "d"):
            res = client.post("/api/v1/cache/prune", json={"older_than": older_than, "dry_run": True})
            assert res.status_code == 422, res.text
            assert res.json()["detail"].startswith("older_than='") and res.json()["detail"].endswith(
                ": give a duration of at most 100 years"), res.text
        assert client.post("/api/v1/cache/prune", json={"older_than": "5200w", "dry_run": True}).status_code == 200
        body = {"model": "demo", "items": piqa_items(4), "candidates": ["int8"]}
        for timeout, detail in (("9" * 400 + "s", "candidate_timeout='" + "9" * 39 + "…" + "9" * 8 + "s': "
                                 "give a duration of at most 100 years"),
                                (1e20, "candidate_timeout=1e+20: give a duration of at most 100 years")):
            res = client.post("/api/v1/jobs/preview", json={**body, "candidate_timeout": timeout})
            assert res.status_code == 422 and res.json() == {"detail": detail}, res.text
        assert client.post("/api/v1/jobs/preview", json={**body, "candidate_timeout": 5400}).status_code == 200
    res = CliRunner().invoke(cli, ["cache", "prune", "--older-than", "99999999999999999999w", "--dry-run"])
    assert res.exit_code == 2 and res.output == (
        "Error: --older-than='99999999999999999999w': give a duration of at most 100 years\n"), res.output


def _succeeded_job(svc) -> str:
    """A succeeded job whose baseline succeeded and whose int8 failed, as a driver stores them."""
    from quantselect.domain.results import CandidateResult, ItemResult
    from quantselect.service import SubmitRequest

    job = svc.repo.create_job(svc.build_spec(SubmitRequest(model="demo", items=piqa_items(4), candidates=["int8"])))
    svc.repo.save_outcome(job.id, CandidateResult(name="baseline", config={}, status="succeeded", score=1.0, n_items=4,
                                                  weight_bytes=2**20, items=[ItemResult(i, True, 0) for i in range(4)]))
    svc.repo.save_outcome(job.id, CandidateResult(name="int8", config={}, status="failed", error="it broke"))
    svc.repo.finish_job(job.id, "succeeded")
    return job.id


def test_deploy_names_a_blank_candidate_and_answers_404_for_one_the_job_does_not_have():
    """`{"candidate": ""}` deployed the recommended candidate (a blank read as "not given"); a name
    the job does not have was a 422 "did not succeed" (compare and cancel-candidate say 404)."""
    from quantselect.errors import InputError, NotFoundError
    from quantselect.service import Service

    svc = Service()
    job_id = _succeeded_job(svc)
    with TestClient(_app(service=svc)) as client:
        url = f"/api/v1/jobs/{job_id}/deploy"
        for body, status, detail in (
                ({"candidate": ""}, 422, f"candidate '': give the name of one of job {job_id}'s candidates, or none "
                                         "for the recommended one"),
                ({"candidate": "nosuch"}, 404, f"job '{job_id}' has no candidate 'nosuch'"),
                ({"candidate": "int8"}, 422, f"job {job_id}: candidate 'int8' did not succeed and cannot be deployed")):
            res = client.post(url, json=body)
            assert (res.status_code, res.json()) == (status, {"detail": detail}), res.text
        assert client.get(f"/api/v1/jobs/{job_id}").json()["deployed_candidate"] is None
    with pytest.raises(InputError, match="candidate '': give the name"):  # `quantselect deploy --candidate ""`
        svc.deploy(job_id, "")
    with pytest.raises(NotFoundError):
        svc.deploy(job_id, "nosuch")


def test_an_unexpected_error_is_a_json_500_naming_it_and_its_traceback_stays_in_the_log():
    from quantselect.api.app import MAX_DETAIL

    app = _app()

    def broken() -> None:
        raise RuntimeError("the first line\nTraceback-like second line")

    def long_broken() -> None:
        raise ValueError("x" * 5000)

    app.add_api_route("/api/v1/broken", broken)
    app.add_api_route("/api/v1/long-broken", long_broken)
    with TestClient(app, raise_server_exceptions=False) as client:
        res = client.get("/api/v1/broken")
        assert res.status_code == 500 and res.headers["content-type"] == "application/json", res.text
        assert res.json() == {"detail": "internal error: RuntimeError: the first line"}
        res = client.get("/api/v1/long-broken")
        assert res.status_code == 500 and len(res.json()["detail"]) == MAX_DETAIL + 1, res.text
    with TestClient(app) as client:  # raised on after the answer: uvicorn logs its traceback
        with pytest.raises(RuntimeError, match="the first line"):
            client.get("/api/v1/broken")


def test_a_body_that_is_not_json_says_to_send_json_and_where_it_breaks():
    with TestClient(_app()) as client:
        res = client.post("/api/v1/jobs", content='{"model": "demo"}',
                          headers={"content-type": "application/x-www-form-urlencoded"})  # curl -d
        assert res.status_code == 422 and res.json() == {
            "detail": "send the body as JSON, with the header Content-Type: application/json"}, res.text
        res = client.post("/api/v1/cache/prune", content='{"all": true}')  # no content type at all
        assert res.json() == {"detail": "send the body as JSON, with the header Content-Type: application/json"}
        res = client.post("/api/v1/jobs", content="{bad", headers={"content-type": "application/json"})
        assert res.status_code == 422 and res.json() == {
            "detail": "the body is not valid JSON at character 2: Expecting property name enclosed in double quotes"}
        res = client.post("/api/v1/jobs", json={"items": []})  # JSON, just wrong: as before
        assert res.json() == {"detail": "body.model: Field required"}
        assert client.get("/api/v1/jobs").json() == []


def test_openapi_documents_the_errors_as_sent_and_the_ranges_the_service_enforces():
    """Generated clients parse errors from the document: every /api/v1 route's 4xx/5xx is a Detail
    ({"detail": "<one line>"}), not FastAPI's HTTPValidationError (a list), which is never sent."""
    with TestClient(_app()) as client:
        spec = client.get("/openapi.json").json()
        assert "HTTPValidationError" not in spec["components"]["schemas"]
        schema = spec["components"]["schemas"]["Detail"]["properties"]
        assert schema == {"detail": {"title": "Detail", "type": "string"}}
        ops = [(p, op) for p, methods in spec["paths"].items() if p.startswith("/api/v1") for op in methods.values()]
        assert len(ops) >= 19
        for path, op in ops:
            for status in ("403", "404", "409", "422", "500"):
                assert op["responses"][status]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/Detail"}, (path, status)
        job = spec["components"]["schemas"]["JobRequest"]["properties"]
        assert (job["threshold"]["exclusiveMinimum"], job["threshold"]["maximum"]) == (0, 1.5)
        assert (job["confidence"]["minimum"], job["confidence"]["exclusiveMaximum"]) == (0.5, 1)
        assert job["limit"]["minimum"] == job["sample"]["minimum"] == 1
        assert (job["calibration_samples"]["minimum"], job["calibration_samples"]["maximum"]) == (1, 4096)
        assert (job["max_new_tokens"]["minimum"], job["max_new_tokens"]["maximum"]) == (0, 32768)
        assert job["model"]["minLength"] == 1
        compare = spec["paths"]["/api/v1/jobs/{job_id}/compare"]["get"]["parameters"]
        assert next(p for p in compare if p["name"] == "limit")["schema"]["minimum"] == 0
        # what the document says is what is enforced: by the service, in its words, one line each
        body = {"model": "demo", "items": piqa_items(4)}
        for change, detail in (({"threshold": 0}, "threshold 0.0 must be in (0, 1.5]"),
                               ({"confidence": 1}, "confidence 1.0 must be in [0.5, 1)"),
                               ({"limit": 0}, "limit 0 must be at least 1"),
                               ({"sample": 0}, "sample 0 must be at least 1"),
                               ({"candidates": ["int4-gptq:group_size=64"], "calibration_samples": 4097},
                                "calibration-samples 4097 must be between 1 and 4096")):
            res = client.post("/api/v1/jobs/preview", json={**body, **change})
            assert res.status_code == 422 and res.json()["detail"].startswith(detail), (change, res.text)
        res = client.get("/api/v1/jobs/x/compare", params={"candidate": "int8", "limit": -1})
        assert res.status_code == 422 and res.json() == {
            "detail": "query.limit: Input should be greater than or equal to 0"}, res.text  # before: "--limit -1 ..."


def test_blank_models_head_probes_long_inputs_and_host_headers(tmp_path, monkeypatch):
    """`model: ""` was a 403 ": outside the folders this server reads" (with QUANTSELECT_API_PATHS) or
    "folder has no config.json"; HEAD /healthz a 405; a 5 MB model name came back whole in the 403 (now
    a 422, no path being that long; a 4,000-character one is still a 403, cut);
    `Host: [::1]evil` passed as [::1]."""
    monkeypatch.setenv("QUANTSELECT_API_PATHS", str(tmp_path))
    with TestClient(_app()) as client:
        res = client.post("/api/v1/jobs/preview", json={"model": "", "items": piqa_items(4)})
        assert res.status_code == 422 and res.json() == {
            "detail": "body.model: String should have at least 1 character"}, res.text
        res = client.get("/api/v1/plan", params={"model": ""})
        assert res.status_code == 422 and res.json() == {
            "detail": "query.model: String should have at least 1 character"}, res.text
        res = client.head("/healthz")
        assert res.status_code == 200 and res.content == b""
        res = client.post("/api/v1/jobs/preview", json={"model": "m" * 5_000_000, "items": piqa_items(4)})
        assert res.status_code == 422 and len(res.json()["detail"]) <= 1001, len(res.text)  # no path is that long
        assert res.json()["detail"].startswith("model mmm") and res.json()["detail"].endswith(
            "(5000000 characters): cannot read it (File name too long)"), res.text
        res = client.post("/api/v1/jobs/preview", json={"model": "m" * 4000, "items": piqa_items(4)})
        assert res.status_code == 403 and len(res.json()["detail"]) <= 1001, len(res.text)  # outside: cut in the answer
        assert res.json()["detail"].startswith("mmm") and res.json()["detail"].endswith("…")
    monkeypatch.delenv("QUANTSELECT_API_PATHS")
    monkeypatch.setenv("QUANTSELECT_API_HOSTS", "quantselect.internal")
    client = TestClient(_app(listen="127.0.0.1"))
    for host in ("[::1]evil", "[::1]evil:80", "localhost:8391:1", "localhost:", "127.0.0.1:x", "[::1", "",
                 "quantselect.internal.evil", "quantselect.internal]", "x" * 5000):
        res = client.get("/api/v1/jobs", headers={"Host": host})
        assert res.status_code == 400 and res.json()["detail"].startswith("Host '"), (host, res.text)
        assert len(res.json()["detail"]) < 600
    for host in ("[::1]", "[::1]:8080", "127.0.0.1", "localhost:80", "quantselect.internal",
                 "QUANTSELECT.internal:443"):
        assert client.get("/api/v1/jobs", headers={"Host": host}).json() == [], host


def test_sigterm_stops_the_api_server_cleanly_cancelling_its_job_saying_why(ray_cluster, tiny_llama, tmp_path):
    """`kill` (SIGTERM) on `quantselect api` with a job running: Ray's handler, installed when the
    server joined the cluster, replaced uvicorn's and exited at once (a traceback in the log), leaving
    the job `running` under a dead driver. Now it stops as Ctrl-C does: the job ends cancelled, saying
    why (`resume` continues it), its workers stop, and no traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    from quantselect.api.app import SERVER_STOPPED
    from quantselect.service import Service
    from tests.fixtures.ray_cluster import free_port

    env = {**os.environ, "QUANTSELECT_RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "QUANTSELECT_STREAM_CHUNK": "4"}  # QUANTSELECT_HOME: this test's (qs_home)
    port, log = free_port(), tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "quantselect", "api", "--port", str(port)], env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    svc = Service()
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline and server.poll() is None, log.read_text()
                time.sleep(0.5)
        body = {"model": str(tiny_llama), "dataset": str(EXAMPLES / "gsm8k-50.jsonl"), "limit": 50,
                "max_new_tokens": 64, "candidates": ["int8"]}
        job_id = httpx.post(f"{url}/api/v1/jobs", json=body).json()["id"]
        deadline = time.monotonic() + 600
        while not any(svc.items_stored(job_id).values()):  # running, half-way
            assert time.monotonic() < deadline and server.poll() is None, log.read_text()
            time.sleep(0.2)
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=60)
    text = log.read_text()
    job = svc.get_job(job_id)
    assert (job.status, job.error) == ("cancelled", f"{SERVER_STOPPED}; `quantselect resume {job_id}` continues it"), \
        text
    assert {r.status for r in svc.results(job_id)} <= {"cancelled", "succeeded"}, svc.results(job_id)
    # uvicorn, once stopped, raises the signal again with its default handler: killed by SIGTERM
    assert code in (0, -signal.SIGTERM) and "Traceback" not in text, (code, text)
    deadline = time.monotonic() + 60
    while ray_cluster.available_resources().get("GPU") != 2:  # its workers are gone
        assert time.monotonic() < deadline, ray_cluster.available_resources()
        time.sleep(0.5)
