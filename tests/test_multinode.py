"""A real two-node Ray cluster on this machine (`ray start --head` plus `ray start --address`, each
node with one logical GPU), a real PostgreSQL, jobs submitted with `--address`: candidates run on
both nodes, every result lands once, and a node that leaves mid-job has its candidates rescheduled
on the node that remains."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from quantselect.cli import cli
from quantselect.db import Repository
from quantselect.settings import get_settings
from tests.fixtures.common import EXAMPLES
from tests.fixtures.ray_cluster import free_port

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.postgres


def _ray_env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           # a second node on the same machine: Ray refuses a multi-node cluster unless this is on
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    for k in ("RAY_ADDRESS", "QUANTSELECT_RAY_ADDRESS"):
        env.pop(k, None)
    return env


def _ports(prefix: str) -> list[str]:
    return [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")]


class TwoNodes:
    def __init__(self) -> None:
        self.temp = tempfile.mkdtemp(prefix="qs2n", dir="/tmp")
        self.port, self.dash, self.worker_port = free_port(), free_port(), free_port()
        env = _ray_env()
        subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={self.port}", f"--dashboard-port={self.dash}",
                        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--num-cpus=2", "--num-gpus=1",
                        f"--temp-dir={self.temp}", "--disable-usage-stats", *_ports("head"),
                        # notice a dead node within seconds, not the default ~30 s
                        '--system-config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3, '
                        '"health_check_initial_delay_ms": 1000}'],
                       env=env, check=True, capture_output=True)
        self.add_worker()

    def add_worker(self) -> None:
        self.worker_port = free_port()
        subprocess.run([str(BIN / "ray"), "start", f"--address=127.0.0.1:{self.port}", "--node-ip-address=127.0.0.1",
                        "--num-cpus=1", "--num-gpus=1", f"--node-manager-port={self.worker_port}",
                        f"--object-manager-port={free_port()}", *_ports("worker"), "--disable-usage-stats"],
                       env=_ray_env(), check=True, capture_output=True)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dash}"

    def worker_raylet(self) -> psutil.Process | None:
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or ())
            if "raylet" in cmd and f"node_manager_port={self.worker_port}" in cmd:
                return p
        return None

    def node_ids(self) -> dict[str, str]:
        """{"head": id, "worker": id} of the live nodes, from the Ray state of the cluster."""
        code = ("import ray, json; ray.init(address='127.0.0.1:%d', log_to_driver=False);"
                "print(json.dumps([(n['NodeID'], n['NodeManagerPort'], n['Alive']) for n in ray.nodes()]))" % self.port)
        out = subprocess.run([sys.executable, "-c", code], env=_ray_env(), capture_output=True, text=True, timeout=120)
        nodes = json.loads(out.stdout.strip().splitlines()[-1])
        return {("worker" if port == self.worker_port else "head"): nid for nid, port, alive in nodes if alive}

    def stop(self) -> None:
        raylet = self.worker_raylet()
        if raylet is not None:
            _kill_tree(raylet)
        subprocess.run(["pkill", "-9", "-f", self.temp], check=False)
        shutil.rmtree(self.temp, ignore_errors=True)  # the head's session: logs, sockets, spilled objects


def task_name(proc: psutil.Process) -> str | None:
    """The candidate a Ray worker process runs: its title is ``ray::qs:<candidate>``."""
    try:
        title = " ".join(proc.cmdline())
    except psutil.Error:
        return None
    return title[len("ray::qs:"):].split()[0] if title.startswith("ray::qs:") else None


def _kill_tree(proc: psutil.Process) -> None:
    for p in [*proc.children(recursive=True), proc]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def two_nodes():
    cluster = TwoNodes()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_settings(postgres_url, monkeypatch, tmp_path):
    from tests.fixtures.postgres import fresh_database

    with fresh_database(postgres_url) as url:
        monkeypatch.setenv("QUANTSELECT_DB_URL", url)
        monkeypatch.setenv("QUANTSELECT_ARTIFACTS_DIR", str(tmp_path / "shared-artifacts"))
        yield get_settings()


def _submit(cluster: TwoNodes, args: list[str]) -> str:
    res = CliRunner().invoke(cli, ["submit", *args, "--address", cluster.dashboard, "--no-wait"])
    assert res.exit_code == 0, res.output
    return res.output.split()[1].rstrip(":")


def _wait_job(repo: Repository, job_id: str, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while repo.get_job(job_id).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job {job_id} did not finish: {repo.get_job(job_id)}"
        time.sleep(1)


def _counts_once(repo: Repository, job_id: str, names: set[str], n_items: int) -> None:
    results = repo.get_results(job_id)
    assert sorted(r.name for r in results) == sorted(names)  # one row per candidate, none twice
    items = repo.get_item_results(job_id)
    for r in results:
        assert r.status == "succeeded", (r.name, r.error)
        assert sorted(i.index for i in items[r.name]) == list(range(n_items)), r.name  # every item once


def test_candidates_run_on_both_nodes_and_every_result_lands_once(two_nodes, pg_settings, tiny_llama):
    job_id = _submit(two_nodes, [str(tiny_llama), str(EXAMPLES / "piqa-300.jsonl"), "--limit", "12",
                                 "--candidates", "int8,int4,w8a8"])
    repo = Repository.open(pg_settings)
    try:
        _wait_job(repo, job_id)
        job = repo.get_job(job_id)
        assert job.status == "succeeded", job.error
        _counts_once(repo, job_id, {"baseline", "int8", "int4", "w8a8"}, 12)
        nodes = {r.name: r.node_id for r in repo.get_results(job_id)}
        assert set(nodes.values()) == set(two_nodes.node_ids().values()), nodes  # both nodes did work
        assert repo.count_rows()["candidates"] == 4
        artifacts = [r.artifact_path for r in repo.get_results(job_id) if r.artifact_path]
        assert artifacts and all(p.startswith(str(pg_settings.artifacts_dir)) for p in artifacts)
    finally:
        repo.close()


def test_a_worker_node_that_leaves_has_its_candidate_rescheduled_on_the_other(two_nodes, pg_settings, tiny_llama,
                                                                              monkeypatch):
    """Generation on a random model runs to the token limit: slow enough to kill the worker node
    while its candidate is half-way, after it has streamed some per-item results."""
    monkeypatch.setenv("QUANTSELECT_STREAM_CHUNK", "8")
    ids = two_nodes.node_ids()
    job_id = _submit(two_nodes, [str(tiny_llama), str(EXAMPLES / "gsm8k-50.jsonl"), "--limit", "48",
                                 "--max-new-tokens", "48", "--candidates", "int8"])
    repo = Repository.open(pg_settings)
    try:
        deadline, victim = time.monotonic() + 300, None
        while victim is None:
            assert time.monotonic() < deadline, "no candidate started on the worker node"
            raylet = two_nodes.worker_raylet()
            tasks = [t for t in (task_name(p) for p in raylet.children(recursive=True)) if t] if raylet else []
            if tasks:
                name = tasks[0]
                stored = repo.get_item_results(job_id).get(name, [])
                if len(stored) >= 8:
                    victim = name
                    _kill_tree(raylet)  # the node leaves: its raylet and every worker on it die
            time.sleep(0.2)
        _wait_job(repo, job_id)
        job = repo.get_job(job_id)
        assert job.status == "succeeded", job.error
        _counts_once(repo, job_id, {"baseline", "int8"}, 48)
        moved = next(r for r in repo.get_results(job_id) if r.name == victim)
        assert moved.node_id == ids["head"] and moved.attempts == 2, moved
        assert moved.items_carried and moved.items_carried >= 8  # what it had streamed was kept
    finally:
        repo.close()
        two_nodes.add_worker()
