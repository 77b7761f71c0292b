"""QUANTSELECT_AUTOSCALER_NODE_GPUS: a cluster whose GPU workers an autoscaler adds on demand (KubeRay
minReplicas 0, the launcher's min_workers 0). A real head with no GPU runs a job's driver; its
candidates wait for a GPU -- not run on the head's CPUs, not failed as unplaceable -- until a node
with a GPU joins (the "autoscaler" here is `ray start --address --num-gpus=1`), and then run there.

Unset, jobs plan from the GPU nodes live when they start, as before: tests/test_sweep_scheduling.py's
test_a_candidate_no_node_can_hold_fails_while_one_waiting_for_a_busy_gpu_is_not_timed (a candidate no
live node can hold fails after UNPLACEABLE_FOR) and tests/test_remote.py's
test_submit_with_address_runs_the_driver_on_the_cluster (a head without GPUs runs the candidates on
its CPUs) hold that."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
from click.testing import CliRunner

from quantselect.cli import cli
from quantselect.errors import InputError
from quantselect.settings import get_settings
from tests.fixtures.common import EXAMPLES
from tests.fixtures.ray_cluster import free_port
from tests.test_multinode import BIN, _kill_tree, _ports, _ray_env

VARIABLE = "QUANTSELECT_AUTOSCALER_NODE_GPUS"


def test_the_setting_is_a_whole_number_of_gpus_of_at_least_one():
    assert get_settings({}).autoscaler_node_gpus is None
    assert get_settings({VARIABLE: "4"}).autoscaler_node_gpus == 4
    assert get_settings({VARIABLE: " 1 "}).autoscaler_node_gpus == 1
    for bad in ("0", "-1", "1.5", "four"):
        with pytest.raises(InputError, match=rf"^{VARIABLE}='{bad}': give a whole number") as e:
            get_settings({VARIABLE: bad})
        assert "\n" not in str(e.value)


def test_a_bad_value_is_one_line_naming_it(monkeypatch):
    monkeypatch.setenv(VARIABLE, "0")
    res = CliRunner().invoke(cli, ["jobs"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == [f"Error: {VARIABLE}='0': give a whole number of at least 1"]


def _node(cpus: float, gpus: float = 0) -> dict:
    return {"Alive": True, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


def test_the_autoscalers_node_counts_among_those_that_could_hold_a_task():
    from quantselect.orchestration.cluster import unplaceable

    cpu_only = [_node(8)]
    assert unplaceable({"CPU": 0, "GPU": 1}, cpu_only, autoscaler_gpus=1) is None
    assert unplaceable({"CPU": 0, "GPU": 0.25}, cpu_only, autoscaler_gpus=1) is None
    assert unplaceable({"CPU": 0, "GPU": 4}, cpu_only, autoscaler_gpus=4) is None
    assert unplaceable({"CPU": 0, "GPU": 2}, [_node(8, 2)], autoscaler_gpus=1) is None  # a live node holds it
    assert unplaceable({"CPU": 0, "GPU": 2}, cpu_only, autoscaler_gpus=1) == (
        f"it asks for 2 GPUs on one node and the largest live node has 0 and the autoscaler adds nodes of 1 GPU ({VARIABLE})")
    # unset: as before
    assert unplaceable({"CPU": 0, "GPU": 1}, cpu_only) == "it asks for 1 GPU on one node and the largest live node has 0"


def test_with_no_gpu_node_up_no_stored_result_is_taken_for_what_the_autoscalers_gpus_measure():
    """The candidates will run on GPUs of a type unknown until a node is up: a result stored by a run
    on the CPUs is not theirs to reuse (nor any other); once a GPU node is up, its type's are."""
    from quantselect.orchestration.cluster import device_patterns

    head = _node(8)
    assert device_patterns([head]) == ["cpu"]  # unset: the head's CPUs run the candidates
    assert device_patterns([head], autoscaler_gpus=1) == []
    l4 = {"Alive": True, "Resources": {"CPU": 8, "GPU": 1, "accelerator_type:L4": 1}}
    assert device_patterns([head, l4], autoscaler_gpus=1) == device_patterns([head, l4]) != []


def _doctor() -> dict[str, dict]:
    res = CliRunner().invoke(cli, ["doctor", "--format", "json"])
    assert "Traceback" not in res.output, res.output
    return {c["name"]: c for c in json.loads(res.output)["checks"]}


def test_doctor_lists_the_setting_and_warns_without_the_gpu_memory(monkeypatch):
    monkeypatch.delenv("QUANTSELECT_GPU_MEMORY", raising=False)
    assert _doctor()["autoscaler"]["detail"].startswith(f"{VARIABLE} unset: ")
    monkeypatch.setenv(VARIABLE, "4")
    # set on a laptop that submits with --address (the driver on the cluster gets it): said, not taken for a mistake
    check = _doctor()["autoscaler"]
    assert check["detail"].startswith(f"{VARIABLE} 4 applies to jobs submitted with --address and where "
                                      "QUANTSELECT_RAY_ADDRESS is set (jobs run here, on a local Ray, ignore it)"), check
    assert check["status"] == "warn" and "set QUANTSELECT_GPU_MEMORY" in check["detail"], check
    monkeypatch.setenv("QUANTSELECT_GPU_MEMORY", "24GiB")
    assert _doctor()["autoscaler"]["status"] == "info"
    monkeypatch.delenv("QUANTSELECT_GPU_MEMORY")
    monkeypatch.setenv("QUANTSELECT_RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    check = _doctor()["autoscaler"]
    assert check["status"] == "warn", check
    assert check["detail"].startswith(f"{VARIABLE} 4: ") and "set QUANTSELECT_GPU_MEMORY" in check["detail"]
    monkeypatch.setenv("QUANTSELECT_GPU_MEMORY", "24GiB")
    check = _doctor()["autoscaler"]
    assert check["status"] == "info" and check["detail"].startswith(f"{VARIABLE} 4: "), check


class ScaleFromZero:
    """A head with no GPU (`ray start --head --num-gpus=0`); ``add_gpu_node`` is the autoscaler."""

    def __init__(self) -> None:
        self.temp = tempfile.mkdtemp(prefix="qsas", dir="/tmp")
        self.port, self.worker_port = free_port(), None
        subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={self.port}", f"--dashboard-port={free_port()}",
                        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
                        f"--temp-dir={self.temp}", "--disable-usage-stats", *_ports("head")],
                       env=_ray_env(), check=True, capture_output=True)

    def add_gpu_node(self) -> None:
        self.worker_port = free_port()
        subprocess.run([str(BIN / "ray"), "start", f"--address=127.0.0.1:{self.port}", "--node-ip-address=127.0.0.1",
                        "--num-cpus=1", "--num-gpus=1", f"--node-manager-port={self.worker_port}",
                        f"--object-manager-port={free_port()}", *_ports("worker"), "--disable-usage-stats"],
                       env=_ray_env(), check=True, capture_output=True)

    def gpu_node_id(self) -> str:
        code = ("import ray, json; ray.init(address='127.0.0.1:%d', log_to_driver=False);"
                "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('GPU')]))"
                % self.port)
        out = subprocess.run([sys.executable, "-c", code], env=_ray_env(), capture_output=True, text=True, timeout=120)
        (node,) = json.loads(out.stdout.strip().splitlines()[-1])
        return node

    def stop(self) -> None:
        """Every process of this cluster with what it started: the agents a raylet starts retitle
        themselves (``ray::DashboardAgent``), so a match on the temp dir alone would leave them."""
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or ())
            if self.temp in cmd or (self.worker_port and "raylet" in cmd and f"node_manager_port={self.worker_port}" in cmd):
                try:
                    _kill_tree(p)
                except psutil.Error:
                    pass
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture
def scale_from_zero():
    cluster = ScaleFromZero()
    try:
        yield cluster
    finally:
        cluster.stop()


# The job's driver, in a process of its own that joins the cluster (this one stays off Ray), with the
# grace a candidate no node can hold gets shortened: were the candidates taken for unplaceable, they
# would fail within seconds.
DRIVER = """
import sys
from quantselect.orchestration import sweep
sweep.UNPLACEABLE_FOR, sweep.FIT_EVERY = 2.0, 0.5
from quantselect.service import Service
print(Service().run_job(sys.argv[1]).status)
"""


def test_candidates_wait_for_the_gpu_node_the_autoscaler_adds_and_run_there(scale_from_zero, tiny_llama, monkeypatch):
    from quantselect.service import Service, SubmitRequest

    monkeypatch.setenv(VARIABLE, "1")
    svc = Service()
    job = svc.submit(SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=6,
                                   candidates=["int8", "int4"], use_cache=False))
    env = {**_ray_env(), "QUANTSELECT_RAY_ADDRESS": f"127.0.0.1:{scale_from_zero.port}",
           "QUANTSELECT_HOME": os.environ["QUANTSELECT_HOME"], VARIABLE: "1"}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, job.id], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        names = {"baseline", "int8", "int4"}
        deadline, waiting_since = time.monotonic() + 240, None
        while True:  # every candidate in flight at once, each waiting for a GPU; for well past the grace
            assert driver.poll() is None, driver.communicate()[0]
            assert time.monotonic() < deadline, {r.name: (r.status, r.phase) for r in svc.results(job.id)}
            seen = {r.name: (r.status, r.phase) for r in svc.results(job.id)}
            waiting = all(seen[n] == ("running", "waiting for a GPU") for n in names)
            assert all(s in ("pending", "running") for s, _ in seen.values()), seen  # none failed, none ran
            assert all(p is None or p.startswith("waiting") for _, p in seen.values()), seen  # none on the CPUs
            if waiting and waiting_since is None:
                waiting_since = time.monotonic()
            if waiting_since is not None and time.monotonic() - waiting_since > 8:
                break
            time.sleep(0.5)
        scale_from_zero.add_gpu_node()
        out, _ = driver.communicate(timeout=400)
        assert driver.returncode == 0 and out.strip().splitlines()[-1] == "succeeded", out
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    results = {r.name: r for r in svc.results(job.id)}
    assert all(r.status == "succeeded" for r in results.values()), {n: r.error for n, r in results.items()}
    gpu_node = scale_from_zero.gpu_node_id()
    assert {r.node_id for r in results.values()} == {gpu_node}, results
    assert all(r.gpu_ids == ["0"] for r in results.values()), [(r.name, r.gpu_ids) for r in results.values()]


def test_a_candidate_waits_for_the_autoscaler_only_so_long(scale_from_zero, tiny_llama, monkeypatch, caplog):
    """A node the autoscaler never adds (its quota or max_workers reached): the candidate waiting for it
    fails after AUTOSCALED_WITHIN (30 min; shortened here) saying so, rather than waiting for ever;
    and on a local Ray (no address) the setting is ignored: the candidates run on its CPUs."""
    from quantselect.service import Service, SubmitRequest

    monkeypatch.setenv(VARIABLE, "1")
    svc = Service()
    job = svc.submit(SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=4,
                                   candidates=[], use_cache=False))
    env = {**_ray_env(), "QUANTSELECT_RAY_ADDRESS": f"127.0.0.1:{scale_from_zero.port}",
           "QUANTSELECT_HOME": os.environ["QUANTSELECT_HOME"], VARIABLE: "1"}
    driver = DRIVER.replace("sweep.FIT_EVERY = 2.0, 0.5", "sweep.FIT_EVERY, sweep.AUTOSCALED_WITHIN = 2.0, 0.5, 6.0")
    out = subprocess.run([sys.executable, "-c", driver, job.id], env=env, capture_output=True, text=True, timeout=400)
    (baseline,) = svc.results(job.id)
    assert baseline.status == "failed" and baseline.error == (
        "cannot be placed: it asks for 1 GPU on one node and the largest live node has 0, and no node of 1 GPU the "
        "autoscaler adds (QUANTSELECT_AUTOSCALER_NODE_GPUS) came up in 6s"), (baseline.error, out.stdout[-2000:])
    assert svc.get_job(job.id).status == "failed"

    local = svc.submit(SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=4,
                                     candidates=[], use_cache=False))
    assert svc.run_job(local.id).status == "succeeded"  # this process: a local Ray, the variable set
    assert f"{VARIABLE}=1 is ignored: this job runs on a local Ray" in caplog.text
