"""`submit --address`: the job's driver runs on a separate Ray cluster through the Ray Jobs API."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantselect.cli import cli
from tests.fixtures.common import EXAMPLES
from tests.fixtures.ray_cluster import free_port

BIN = Path(sys.executable).parent


@pytest.fixture
def head_node():
    """A real `ray start --head` cluster of its own (temp dir, ports), stopped afterwards without
    touching the test session's cluster."""
    temp = tempfile.mkdtemp(prefix="qsr", dir="/tmp")
    port, dash = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
                    "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp}",
                    # Ports of its own: the agents' defaults (e.g. 52365) are taken by the test session's
                    # cluster, and a head whose job agent cannot bind answers "No available agent".
                    f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                    f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True)
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run(["pkill", "-9", "-f", temp], check=False)
        shutil.rmtree(temp, ignore_errors=True)  # its session's logs and sockets


def test_submit_with_address_runs_the_driver_on_the_cluster(head_node, tiny_llama):
    """With --wait, what the driver on the cluster prints comes back as it runs (its progress lines,
    then the results), and its exit status: a resume the driver refuses exits non-zero, saying why."""
    res = CliRunner().invoke(cli, ["submit", str(tiny_llama), str(EXAMPLES / "piqa-300.jsonl"), "--limit", "6",
                                   "--candidates", "int8", "--address", head_node, "--wait"])
    assert res.exit_code == 0, res.output
    job_id = res.output.split()[1].rstrip(":")
    assert f"Submitted to the Ray cluster at {head_node} as Ray job quantselect-{job_id}" in res.output
    assert "running 2 candidate(s) on Ray" in res.output and " int8 " in res.output, res.output  # its progress
    assert f"Job {job_id} (succeeded)" in res.output and "Recommendation" in res.output, res.output
    assert " INFO " not in res.output, res.output  # Ray's own chatter, not the driver's output
    out = CliRunner().invoke(cli, ["status", job_id]).output
    assert "succeeded" in out and "int8" in out
    again = CliRunner().invoke(cli, ["resume", job_id, "--address", head_node, "--wait"])
    assert again.exit_code == 1, again.output
    assert f"job {job_id} is succeeded; nothing to run" in again.output, again.output  # the driver's own error
    assert again.output.rstrip().splitlines()[-1].startswith(f"Error: the driver of job {job_id} on the cluster"), again.output


def test_a_driver_that_ends_before_it_claims_the_job_fails_it_saying_why(head_node, tiny_llama, monkeypatch):
    """A driver that ends on the cluster before it claims its job (a bad environment there, a crash at
    import, a stopped Ray job, a restarted head) left the job queued for ever, and `status --follow`
    waiting for ever: `status` asks the cluster about the Ray job stored at submission and fails the
    job, naming that Ray job, how it ended and the driver's last words. RAY_API_SERVER_ADDRESS and
    RAY_ADDRESS, which Ray's Jobs client takes over the address it is given, are set aside."""
    from quantselect.service import Service, SubmitRequest

    svc = Service()
    job = svc.submit(SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=6,
                                   candidates=["int8"]))
    # Ray's Jobs client takes these over the address it is given: a shell set up for another cluster
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("QUANTSELECT_MAX_RETRIES", "many")  # the driver gets it on the cluster, and cannot start
    sid = svc.submit_remote(job.id, head_node)
    monkeypatch.delenv("QUANTSELECT_MAX_RETRIES")
    res = CliRunner().invoke(cli, ["status", job.id, "--follow", "--every", "0.5"])
    assert res.exit_code == 1, res.output
    assert res.output.splitlines()[-1] == (
        f"Error: job {job.id} failed: its driver, Ray job {sid} on {head_node}, ended FAILED before it started the "
        "job: Error: QUANTSELECT_MAX_RETRIES='many': give a whole number (default 1); "
        f"`quantselect resume {job.id} --address {head_node}` runs it again"), res.output
    assert svc.get_job(job.id).status == "failed"
    assert CliRunner().invoke(cli, ["status", job.id]).output.splitlines()[0].startswith(f"Job {job.id}: failed (its driver")


def test_a_stale_ray_address_file_does_not_hijack_a_local_run(tmp_path_factory):
    """`ray start` writes <ray temp>/ray_current_cluster and a killed head leaves it behind; a bare
    ray.init() would then try to join that dead cluster. Local runs must start their own."""
    temp = Path(tempfile.mkdtemp(prefix="qsa", dir="/tmp"))  # short: Ray's socket paths have a limit
    (temp / "ray").mkdir()
    (temp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "QUANTSELECT_RAY_ADDRESS")}
    env["RAY_TMPDIR"] = str(temp)
    code = ("from quantselect.orchestration.cluster import connect; from quantselect.settings import get_settings;"
            "connect(get_settings()); import ray; print('cpus', ray.cluster_resources()['CPU']); ray.shutdown()")
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "cpus" in out.stdout
    finally:
        subprocess.run(["pkill", "-9", "-f", str(temp)], check=False)
        shutil.rmtree(temp, ignore_errors=True)


def test_the_persistent_local_head_is_reached_on_loopback_even_if_ray_was_imported_first():
    """`demo --deploy` / `deploy` / `api` start a detached head on 127.0.0.1 and join it. Ray
    rewrites 127.0.0.1 to the machine's network address unless told otherwise before its import;
    a loopback head does not listen there, and the join hung for minutes."""
    temp = Path(tempfile.mkdtemp(prefix="qsh", dir="/tmp"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "QUANTSELECT_RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(RAY_TMPDIR=str(temp), QUANTSELECT_LOCAL_RAY_PORT=str(free_port()), QUANTSELECT_HOME=str(temp / "home"),
               PATH=f"{BIN}:{os.environ['PATH']}")
    code = ("import ray; from quantselect.orchestration.cluster import connect; from quantselect.settings import get_settings;"
            "connect(get_settings(), persistent=True); print('joined', ray.get_runtime_context().gcs_address)")
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"joined 127.0.0.1:{env['QUANTSELECT_LOCAL_RAY_PORT']}" in out.stdout, out.stdout + out.stderr[-1000:]
    finally:
        subprocess.run(["pkill", "-9", "-f", str(temp)], check=False)
        subprocess.run(["pkill", "-9", "-f", f"port={env['QUANTSELECT_LOCAL_RAY_PORT']}"], check=False)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_model_only_the_cluster_can_read_is_checked_by_the_driver(ray_cluster, tiny_llama, tmp_path):
    """`submit --address` with a model path this machine cannot read: submit checks the rest, the
    driver checks the model (failing the job with the reason, and where), and computes the cache
    keys it could not, so that a later job of the same model reuses its results."""
    from dataclasses import replace

    from quantselect.errors import InputError, QuantselectError
    from quantselect.service import Service, SubmitRequest

    svc = Service()
    storage = tmp_path / "cluster-storage" / "llama"  # mounted on the cluster's nodes, not (yet) here
    req = SubmitRequest(model=str(storage), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=12, candidates=["int8"],
                        model_on_cluster=True)
    with pytest.raises(InputError, match="model path does not exist"):
        svc.submit(replace(req, model_on_cluster=False))
    with pytest.raises(InputError, match="must be absolute"):
        svc.submit(replace(req, model="models/relative/llama"))
    # owner/name is a Hugging Face Hub id: the driver fetches it on the cluster (tests/test_hub.py)
    assert svc.build_spec(replace(req, model="relative/llama")).model_path == "relative/llama"
    job = svc.submit(req)
    assert set(svc.repo.cache_keys(job.id).values()) == {None}
    with pytest.raises(QuantselectError, match=r"on the driver's machine \(.*\): .*model path does not exist"):
        svc.run_job(job.id)
    assert svc.get_job(job.id).status == "failed" and "driver's machine" in svc.get_job(job.id).error
    shutil.copytree(tiny_llama, storage)  # now the driver can read it
    assert svc.resume(job.id).status == "succeeded"
    keys = svc.repo.cache_keys(job.id)
    assert all(keys.values())
    again = svc.submit(replace(req, model_on_cluster=False))  # readable here: keys at submit, equal
    assert svc.repo.cache_keys(again.id) == keys
    assert svc.run_job(again.id).status == "succeeded"
    assert {r.reused_from for r in svc.results(again.id)} == {job.id}


def test_submit_with_address_leaves_a_model_it_cannot_read_to_the_cluster(tmp_path):
    missing = tmp_path / "on-the-cluster-only"
    res = CliRunner().invoke(cli, ["submit", str(missing), str(EXAMPLES / "piqa-300.jsonl"), "--limit", "6",
                                   "--candidates", "int8", "--address", f"http://127.0.0.1:{free_port()}"])
    assert "not on this machine; the job's driver reads and checks it on the cluster" in res.output
    assert res.exit_code == 1 and "cannot submit to the Ray cluster" in res.output  # nobody listens there
    assert "Traceback" not in res.output
