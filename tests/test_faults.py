"""Faults with real processes, counting rows afterwards: no result lost, none duplicated.

A killed worker is retried (bounded) from the items it had streamed, then marked failed with the
cause; a killed driver's job is resumed; a cancelled job stops its workers and frees their GPUs;
a database that goes away for a few seconds costs nothing. Generation on a random tiny model runs
to the token limit, which makes candidates slow enough to interrupt half-way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from click.testing import CliRunner

from quantselect.cli import cli
from quantselect.errors import QuantselectError
from quantselect.service import Service, SubmitRequest
from quantselect.settings import get_settings
from tests.fixtures.common import EXAMPLES
from tests.test_multinode import task_name

GSM8K = str(EXAMPLES / "gsm8k-50.jsonl")


def _slow_request(model, candidates: list[str], **kw) -> SubmitRequest:
    return SubmitRequest(model=str(model), dataset=GSM8K, limit=40, max_new_tokens=48, candidates=candidates, **kw)


def _submit_in_a_process(model, candidates: str) -> subprocess.Popen:
    """`quantselect submit` of a slow job as a user runs it: its own process, the job's driver (with a
    local Ray cluster of its own), in a session of its own; output collected."""
    return subprocess.Popen(
        [sys.executable, "-m", "quantselect", "submit", str(model), GSM8K, "--limit", "40",
         "--max-new-tokens", "48", "--candidates", candidates],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _workers(name: str | None = None, under: int | None = None) -> list[psutil.Process]:
    """Live Ray worker processes running a candidate (of one name) in the process tree of ``under``
    (this test's own Ray cluster: never another run's workers on the same machine)."""
    procs = psutil.Process(under).children(recursive=True) if under else psutil.process_iter()
    return [p for p in procs if (t := task_name(p)) and (name is None or t == name)]


def _wait(what: str, cond, timeout: float = 240, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)
    return value


def _assert_once(svc: Service, job_id: str, n_items: int, succeeded: set[str]) -> None:
    results = {r.name: r for r in svc.results(job_id)}
    assert len(results) == len(svc.get_job(job_id).candidate_names)
    items = svc.item_results(job_id)
    for name in succeeded:
        assert results[name].status == "succeeded", (name, results[name].error)
        assert sorted(i.index for i in items[name]) == list(range(n_items)), name


def test_a_killed_worker_is_retried_from_its_streamed_items_then_failed_with_the_cause(ray_cluster, tiny_llama,
                                                                                      monkeypatch):
    monkeypatch.setenv("QUANTSELECT_STREAM_CHUNK", "8")
    svc = Service()
    job = svc.submit(_slow_request(tiny_llama, ["int8", "int4"]))
    runner = threading.Thread(target=svc.run_job, args=(job.id,))
    runner.start()
    try:
        # int8: killed once, after it stored its first chunk -> the retry scores only the rest
        _wait("int8 to store items",
              lambda: len(svc.item_results(job.id)["int8"]) >= 8 and _workers("int8", under=os.getpid()))
        for p in _workers("int8", under=os.getpid()):
            p.kill()
        # int4: killed on every attempt -> failed after 1 + max_retries attempts, with the cause
        for _ in range(2):
            victims = _wait("an int4 worker", lambda: _workers("int4", under=os.getpid()))
            for p in victims:  # the worker and any process it forked (they share its title)
                p.kill()
            _wait("the int4 worker gone", lambda: not _workers("int4", under=os.getpid()), timeout=30)
    finally:
        runner.join(timeout=400)
    assert not runner.is_alive()
    assert svc.get_job(job.id).status == "succeeded"
    _assert_once(svc, job.id, 40, {"baseline", "int8"})
    results = {r.name: r for r in svc.results(job.id)}
    assert results["int8"].attempts == 2 and results["int8"].items_carried >= 8
    assert results["int4"].status == "failed" and results["int4"].attempts == 2
    assert "worker failed after 2 attempt(s)" in results["int4"].error
    assert svc.item_results(job.id)["int4"] == []  # a failed candidate keeps no partial items
    assert svc.repo.count_rows()["item_results"] == 80


def test_a_killed_driver_is_resumed_reusing_finished_candidates_and_stored_items(ray_cluster, tiny_llama,
                                                                                monkeypatch, qs_home):
    """The driver runs in its own process (with its own local Ray); SIGKILL takes it and its cluster
    down mid-job. `quantselect resume` continues here, on the test's cluster."""
    monkeypatch.setenv("QUANTSELECT_STREAM_CHUNK", "8")
    monkeypatch.setenv("QUANTSELECT_HEARTBEAT_STALE_SECONDS", "3")
    svc = Service()

    def killed_half_way() -> tuple[str, set, list, dict] | None:
        """Submit, and SIGKILL the driver once a candidate is done and another has streamed items;
        what it leaves, or None where it was not half-way when it died (40 tiny items go fast: the
        half-way one may finish between the look and the kill) or the job ended first."""
        known = {j.id for j in svc.list_jobs()}
        driver = _submit_in_a_process(tiny_llama, "int8,w8a8")
        try:
            # Generous limits: they only stop a hung run. The driver starts a Ray cluster of its own beside
            # the test's, on a machine that may be busy (one CI run took over 300 s to get half-way).
            job_id = _wait("the job", lambda: [j.id for j in svc.list_jobs() if j.id not in known], timeout=300)[0]

            def state(job_id: str = job_id):
                done = {r.name for r in svc.results(job_id) if r.status == "succeeded"}
                items = svc.item_results(job_id)
                return done, [n for n in items if n not in done and len(items[n]) >= 8]

            def halfway():
                if svc.get_job(job_id).status != "running":
                    return "ended"
                done, partial = state()
                return done and partial and (done, partial)

            try:
                seen = _wait("one candidate done and another half-way", halfway, timeout=500, every=0.05)
            except AssertionError:  # say what the driver was doing: its output, and the job's state
                os.killpg(driver.pid, signal.SIGKILL)
                out = driver.communicate(timeout=30)[0]
                states = {r.name: (r.status, len(svc.item_results(job_id).get(r.name, []))) for r in svc.results(job_id)}
                raise AssertionError(f"never half-way: candidates {states}; the driver said:\n{out[-3000:]}") from None
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
            driver.wait(timeout=30)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
        if seen == "ended":
            return None
        done, partial = state()  # as the kill left it: the driver was the job's one writer
        return (job_id, done, partial, {r.name: r for r in svc.results(job_id)}) if done and partial else None

    for _ in range(3):  # where the kill came a moment late, again, on a job of its own
        if (caught := killed_half_way()) is not None:
            break
    else:
        raise AssertionError("the driver was never killed half-way in three jobs")
    job_id, done, partial, before = caught
    assert svc.get_job(job_id).status == "running"  # nobody marked it: the process just vanished
    shown = CliRunner().invoke(cli, ["status", job_id]).output  # what was streamed in, as another shell sees it
    for name in partial:
        assert f"{len(svc.item_results(job_id)[name])}/40 items scored and stored" in shown, shown
    # Refused while the driver's heartbeat is fresh, judged with a limit no busy machine outlasts
    # (with 3 s, the kill and the looks above could take long enough to make it stale already)...
    monkeypatch.setenv("QUANTSELECT_HEARTBEAT_STALE_SECONDS", "600")
    refused = CliRunner().invoke(cli, ["resume", job_id])
    assert refused.exit_code != 0 and "is running in" in refused.output, refused.output
    # ... and taken over once it is stale
    monkeypatch.setenv("QUANTSELECT_HEARTBEAT_STALE_SECONDS", "3")
    time.sleep(3.5)
    res = CliRunner().invoke(cli, ["resume", job_id])
    assert res.exit_code == 0, res.output
    assert svc.get_job(job_id).status == "succeeded"
    _assert_once(svc, job_id, 40, {"baseline", "int8", "w8a8"})
    after = {r.name: r for r in svc.results(job_id)}
    for name in done:  # finished candidates were kept as they were, not run again
        assert after[name].finished_at == before[name].finished_at and after[name].score == before[name].score
    for name in partial:
        assert after[name].items_carried >= 8, after[name]
    assert len(svc.results(job_id)) == 3  # (an earlier job, killed a moment late, has its own)
    assert sum(len(items) for items in svc.item_results(job_id).values()) == 120


def test_cancel_stops_the_workers_and_frees_their_gpus(ray_cluster, tiny_llama):
    """Over REST (DELETE) for one job and the CLI for another, while the API keeps answering."""
    from fastapi.testclient import TestClient

    from quantselect.api.app import create_app

    svc = Service()
    with TestClient(create_app(svc)) as client:
        body = {"model": str(tiny_llama), "dataset": GSM8K, "limit": 40, "max_new_tokens": 48,
                "candidates": ["int8"]}
        first = client.post("/api/v1/jobs", json=body).json()["id"]
        second = client.post("/api/v1/jobs", json=body).json()["id"]
        _wait("both jobs running", lambda: all(svc.get_job(j).status == "running" for j in (first, second))
              and len(_workers(under=os.getpid())) >= 2)
        assert client.get("/healthz").json() == {"status": "ok"}
        r = client.delete(f"/api/v1/jobs/{first}")
        assert r.status_code == 202 and r.json()["cancel_requested"] is True
        res = CliRunner().invoke(cli, ["cancel", second])
        assert res.exit_code == 0 and "cancel requested" in res.output
        for job_id in (first, second):
            _wait("the job cancelled", lambda: svc.get_job(job_id).status == "cancelled", timeout=30)
        _wait("the workers gone", lambda: not _workers(under=os.getpid()), timeout=30)
        _wait("the GPUs free", lambda: ray_cluster.available_resources().get("GPU") == 2, timeout=30)
        for job_id in (first, second):
            assert {r.status for r in svc.results(job_id)} <= {"succeeded", "cancelled"}
            assert client.get(f"/api/v1/jobs/{job_id}").json()["status"] == "cancelled"
        assert client.delete(f"/api/v1/jobs/{first}").status_code == 409  # already cancelled
        assert client.delete("/api/v1/jobs/nope").status_code == 404


def test_results_survive_a_database_that_goes_away_for_a_few_seconds(ray_cluster, tiny_llama, monkeypatch):
    """A PostgreSQL server of its own is stopped while candidates are running and started again
    seconds later: the driver's writes wait and retry; every result lands once."""
    from tests.fixtures.postgres import PostgresServer, _admin

    server = PostgresServer()
    try:
        _admin(f"{server.base}/postgres", "CREATE DATABASE qs_outage")
        monkeypatch.setenv("QUANTSELECT_DB_URL", f"{server.base}/qs_outage")
        monkeypatch.setenv("QUANTSELECT_STREAM_CHUNK", "8")
        svc = Service(get_settings())
        job = svc.submit(_slow_request(tiny_llama, ["int8", "int4"]))
        errors: list[BaseException] = []

        def run() -> None:
            try:
                svc.run_job(job.id)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        runner = threading.Thread(target=run)
        runner.start()
        _wait("items streaming", lambda: sum(map(len, svc.item_results(job.id).values())) >= 8)
        server.stop()
        time.sleep(6)  # outcomes and streamed items arrive meanwhile
        server.start()
        runner.join(timeout=400)
        assert not runner.is_alive() and not errors, errors
        assert svc.get_job(job.id).status == "succeeded"
        _assert_once(svc, job.id, 40, {"baseline", "int8", "int4"})
        assert svc.repo.count_rows() == {"jobs": 1, "candidates": 3, "item_results": 120}
        svc.close()
    finally:
        server.close()


def test_rest_resume_refuses_while_a_live_driver_runs_the_job_then_continues_it(ray_cluster, tiny_llama,
                                                                                monkeypatch):
    from fastapi.testclient import TestClient

    from quantselect.api.app import create_app

    monkeypatch.setenv("QUANTSELECT_HEARTBEAT_STALE_SECONDS", "2")
    svc = Service()
    job = svc.submit(SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=6,
                                   candidates=["int8"]))
    svc.repo.claim_job(job.id, "elsewhere:1234", 2)  # another driver, alive (fresh heartbeat)
    with TestClient(create_app(svc)) as client:
        r = client.post(f"/api/v1/jobs/{job.id}/resume")
        assert r.status_code == 409 and "is running in elsewhere:1234" in r.json()["detail"]
        time.sleep(2.5)  # that driver has gone silent
        r = client.post(f"/api/v1/jobs/{job.id}/resume")
        assert r.status_code == 202, r.json()
        _wait("the job done", lambda: svc.get_job(job.id).status == "succeeded", timeout=240)
        assert client.post(f"/api/v1/jobs/{job.id}/resume").status_code == 409  # nothing left to run
    _assert_once(svc, job.id, 6, {"baseline", "int8"})


def test_a_candidate_cancelled_on_its_own_stops_while_the_job_goes_on(ray_cluster, tiny_llama, monkeypatch):
    """`cancel JOB --candidate NAME`: one queued is never started, one running has its worker stopped
    within seconds; the others finish and the job succeeds. A resume leaves such a candidate cancelled.
    The baseline cannot be cancelled alone, nor a candidate of a finished job."""
    from dataclasses import replace

    from fastapi.testclient import TestClient

    from quantselect.api.app import create_app
    from quantselect.domain.results import CANCELLED_ALONE

    monkeypatch.setenv("QUANTSELECT_STREAM_CHUNK", "4")
    monkeypatch.setenv("QUANTSELECT_HEARTBEAT_STALE_SECONDS", "4")  # the driver looks every second
    svc = Service()
    req = SubmitRequest(model=str(tiny_llama), dataset=GSM8K, limit=50, max_new_tokens=64,
                        candidates=["int8", "w8a8", "int4"])
    job = svc.submit(req)
    res = CliRunner().invoke(cli, ["cancel", job.id, "--candidate", "int4"])  # queued: it never starts
    assert res.exit_code == 0 and "int4 cancelled" in res.output, res.output
    for name, message in (("baseline", "is the baseline"), ("nope", "has no candidate 'nope'"),
                          ("int4", "is already cancelled")):
        bad = CliRunner().invoke(cli, ["cancel", job.id, "--candidate", name])
        assert bad.exit_code != 0 and message in bad.output and "Traceback" not in bad.output, bad.output
    runner = threading.Thread(target=svc.run_job, args=(job.id,))
    runner.start()
    try:
        _wait("w8a8 scoring", lambda: svc.items_stored(job.id).get("w8a8", 0) >= 4, timeout=900, every=0.05)
        assert svc.items_stored(job.id)["w8a8"] < 50  # half-way
        with TestClient(create_app(svc, connect_ray=False)) as client:
            r = client.delete(f"/api/v1/jobs/{job.id}/candidates/w8a8")
            assert r.status_code == 202 and r.json()["status"] == "cancelled", r.text
            assert client.delete(f"/api/v1/jobs/{job.id}/candidates/baseline").status_code == 409
        _wait("the w8a8 worker stopped", lambda: not _workers("w8a8", under=os.getpid()), timeout=60)
    finally:
        runner.join(timeout=400)
    assert not runner.is_alive() and svc.get_job(job.id).status == "succeeded"
    results = {r.name: r for r in svc.results(job.id)}
    assert {n: (r.status, r.error) for n, r in results.items() if r.status != "succeeded"} == {
        "w8a8": ("cancelled", CANCELLED_ALONE), "int4": ("cancelled", CANCELLED_ALONE)}
    assert results["int4"].started_at is None  # never started
    _assert_once(svc, job.id, 50, {"baseline", "int8"})
    bad = CliRunner().invoke(cli, ["cancel", job.id, "--candidate", "int8"])
    assert bad.exit_code != 0 and f"job {job.id} is succeeded" in bad.output, bad.output
    # A job cancelled after one of its candidates was: resumed, that one stays cancelled, the rest runs
    # (here: reused from the job above, which had the same inputs).
    again = svc.submit(replace(req, candidates=["int8", "w8a8"]))
    assert CliRunner().invoke(cli, ["cancel", again.id, "--candidate", "w8a8"]).exit_code == 0
    assert svc.cancel(again.id).status == "cancelled"
    assert svc.resume(again.id).status == "succeeded"
    after = {r.name: (r.status, r.reused_from) for r in svc.results(again.id)}
    assert after == {"baseline": ("succeeded", job.id), "int8": ("succeeded", job.id), "w8a8": ("cancelled", None)}, after


def test_a_candidate_running_longer_than_the_timeout_is_stopped_and_failed(ray_cluster, tiny_llama, monkeypatch):
    """A job's candidate timeout (`submit --candidate-timeout`; else the driver's
    QUANTSELECT_CANDIDATE_TIMEOUT) bounds every candidate (the baseline too): a worker still running
    after it is stopped, its GPU freed, and the candidate failed saying so; without a baseline the job
    fails, saying why."""
    monkeypatch.setenv("QUANTSELECT_CANDIDATE_TIMEOUT", "6h")  # the job's own limit wins
    svc = Service()
    job = svc.submit(_slow_request(tiny_llama, ["int8"], candidate_timeout=1))  # far shorter than a candidate takes
    with pytest.raises(QuantselectError, match=r"the baseline failed, nothing to compare with: stopped: still "
                                               r"running after 1s \(the job's candidate timeout\)"):
        svc.run_job(job.id)
    assert svc.get_job(job.id).status == "failed"
    results = {r.name: r for r in svc.results(job.id)}
    assert {n: r.status for n, r in results.items()} == {"baseline": "failed", "int8": "failed"}
    assert results["int8"].error == "stopped: still running after 1s (the job's candidate timeout)"
    _wait("the workers gone", lambda: not _workers(under=os.getpid()), timeout=60)
    _wait("the GPUs free", lambda: ray_cluster.available_resources().get("GPU") == 2, timeout=60)


def _converting() -> list[psutil.Process]:
    """This process's GGUF conversions (`python -m quantselect.engines.apart convert`)."""
    return _apart("convert")


def _apart(verb: str) -> list[psutil.Process]:
    """This process's children doing ``verb`` to a job's model (`python -m quantselect.engines.apart`)."""
    return [p for p in psutil.Process().children(recursive=True)
            if f"quantselect.engines.apart {verb}" in " ".join(p.cmdline())]


def _converting_the_demo(qs_home, monkeypatch) -> tuple[Service, str, threading.Thread, dict]:
    """A job on the demo model whose driver (a thread, as in the API server) is converting its GGUF
    file, in a models folder of its own (not the session's, where it is converted already)."""
    monkeypatch.setenv("QUANTSELECT_HEARTBEAT_STALE_SECONDS", "2")  # the driver looks every 0.5 s
    (qs_home / "models").unlink()
    (qs_home / "models").mkdir()
    svc = Service()
    job = svc.submit(SubmitRequest(model="demo", dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=4,
                                   candidates=["int8"]))
    ended: dict = {}

    def drive() -> None:
        try:
            ended["job"] = svc.run_job(job.id)
        except QuantselectError as e:
            ended["error"] = e

    driver = threading.Thread(target=drive)
    driver.start()
    _wait("the conversion to start", lambda: "dequantizing" in (svc.get_job(job.id).stage or "") and _converting(),
          timeout=60)
    return svc, job.id, driver, ended


def test_a_cancel_does_not_wait_for_the_model_to_be_prepared(qs_home, monkeypatch):
    """Preparing the model can take long (a 70B download, the conversion of its GGUF file, ~20 s for
    the demo here): a cancel meanwhile ends the job within seconds, not after the preparation, and
    stops the conversion's process."""
    from quantselect.engines.models import needs_conversion

    svc, job_id, driver, ended = _converting_the_demo(qs_home, monkeypatch)
    svc.cancel(job_id)
    driver.join(timeout=30)
    assert not driver.is_alive() and "job" in ended, ended
    assert (ended["job"].status, ended["job"].error) == ("cancelled", "cancelled by request")
    _wait("the conversion stopped", lambda: not _converting(), timeout=30)
    assert needs_conversion("demo", svc.settings.models_dir)  # stopped, not finished
    assert svc.get_job(job_id).status == "cancelled" and {r.status for r in svc.results(job_id)} == {"cancelled"}


def test_a_gguf_conversion_killed_fails_the_job_saying_so_and_leaves_the_driver_alive(qs_home, monkeypatch):
    """The conversion runs in a process of its own (transformers' GGUF loader peaks at about twice the
    model in float32): when the kernel's out-of-memory killer ends it, the job fails saying so, and
    the driver (the API server, say) lives on."""
    svc, job_id, driver, ended = _converting_the_demo(qs_home, monkeypatch)
    for p in _converting():
        p.kill()  # what the out-of-memory killer sends
    driver.join(timeout=30)
    assert not driver.is_alive()
    job = svc.get_job(job_id)
    assert job.status == "failed" and job.error == (
        "demo: converting its GGUF file was killed (SIGKILL); out of memory? It takes about 8 bytes of host "
        "memory per parameter, once"), job.error
    assert str(ended["error"]) == job.error


def test_ctrl_c_in_a_local_run_cancels_the_job_which_resume_continues(ray_cluster, tiny_llama, monkeypatch, qs_home):
    """SIGINT (Ctrl-C) in `submit`: its workers are stopped, the job is cancelled (not failed with a
    bare KeyboardInterrupt, its candidates left "running"), the command says how to continue and
    exits 130; `resume` then finishes it, keeping the items already stored."""
    from quantselect.service import INTERRUPTED

    monkeypatch.setenv("QUANTSELECT_STREAM_CHUNK", "4")
    svc = Service()
    driver = _submit_in_a_process(tiny_llama, "int8")
    try:
        job_id = _wait("the job", lambda: [j.id for j in svc.list_jobs()], timeout=300)[0]
        _wait("items stored", lambda: any(svc.items_stored(job_id).values()), timeout=900, every=0.05)
        driver.send_signal(signal.SIGINT)  # to the driver alone, as a terminal's Ctrl-C reaches it first
        out = driver.communicate(timeout=120)[0]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, out[-3000:]
    assert f"Job {job_id} interrupted: its workers are stopped; `quantselect resume {job_id}` continues it" in out, out[-3000:]
    assert "Traceback" not in out and "Aborted" not in out, out[-3000:]
    job = svc.get_job(job_id)
    assert (job.status, job.error) == ("cancelled", INTERRUPTED)
    assert {r.status for r in svc.results(job_id)} <= {"succeeded", "cancelled"}, svc.results(job_id)
    stored = sum(svc.items_stored(job_id).values())
    assert stored > 0
    res = CliRunner().invoke(cli, ["resume", job_id])
    assert res.exit_code == 0, res.output
    _assert_once(svc, job_id, 40, {"baseline", "int8"})


def test_a_model_whose_log_probabilities_are_nan_fails_alone_before_streaming_them(tiny_llama, tmp_path):
    """A model that computes NaN (fp16 overflow, a broken kernel or checkpoint: here a tiny Llama whose
    final norm is NaN) fails its candidate with one line naming the item; no NaN reaches the driver,
    where PostgreSQL's JSON columns would refuse it and fail the whole job's write."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantselect.domain.candidates import CATALOG, Candidate
    from quantselect.domain.dataset import load_dataset
    from quantselect.engines.worker import run_candidate

    broken = tmp_path / "nan-llama"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(str(broken))
    AutoTokenizer.from_pretrained(str(tiny_llama)).save_pretrained(str(broken))
    streamed: list = []
    result = run_candidate(str(broken), Candidate("baseline", CATALOG["baseline"]),
                           load_dataset(EXAMPLES / "piqa-300.jsonl", limit=4), on_items=streamed.extend, stream_chunk=2)
    assert (result.status, result.error) == ("failed", "the model produced non-finite log-probabilities on item 0")
    assert streamed == [] and result.items == []
