"""Bad input to the real CLI (click's runner, real SQLite, a real model folder; no Ray started): each is
one line naming what to fix, exit status 2, refused before anything is written or started."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantselect.cli import cli
from quantselect.errors import InputError

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100}


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def refused(res, start: str) -> str:
    """The one-line error of an exit-2 refusal, which must start with ``start``."""
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and "Traceback" not in line, res.output
    assert line.removeprefix("Error: ").startswith(start), res.output
    return line


def model_folder(root: Path, **config) -> Path:
    """A Hugging Face folder check_model takes: config.json, a real (tiny) safetensors file, a tokenizer file."""
    import numpy as np
    from safetensors.numpy import save_file

    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({**LLAMA, **config}))
    save_file({"model.embed_tokens.weight": np.zeros((100, 64), dtype=np.float32)}, str(root / "model.safetensors"))
    (root / "tokenizer.json").write_text("{}")
    return root


@pytest.fixture
def model(tmp_path) -> Path:
    return model_folder(tmp_path / "model")


@pytest.fixture
def tasks(tmp_path) -> Path:
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "choices": ["a", "b"], "answer": i % 2}) + "\n"
                            for i in range(12)))
    return path


def jobs() -> list:
    from quantselect.service import Service

    svc = Service()
    try:
        return svc.list_jobs()
    finally:
        svc.close()


# ---- api: its host and port are checked before uvicorn starts (and its start-up, Ray) ----------------

@pytest.fixture
def served(monkeypatch) -> list:
    """What `api` hands uvicorn: nothing, for a refused host or port (its lifespan would start a lasting Ray head)."""
    import uvicorn

    calls: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    return calls


def test_api_refuses_a_port_out_of_range_before_anything_starts(served):
    for port in ("99999", "-1", "0"):
        res = run("api", "--port", port)
        assert res.exit_code == 2 and f"Invalid value for '--port': {port} is not in the range 1<=x<=65535" in res.output, \
            res.output
    assert served == []


def test_api_refuses_a_host_it_cannot_listen_on_and_a_port_in_use_in_one_line(served):
    refused(run("api", "--host", "nonexistent.invalid", "--port", "18555"), "--host nonexistent.invalid: cannot listen there: ")
    refused(run("api", "--host", "192.0.2.1", "--port", "18555"), "--host 192.0.2.1: cannot listen there: ")  # not ours
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused(run("api", "--port", str(port)), f"--port {port}: address already in use on 127.0.0.1")
    assert served == []
    assert run("api", "--port", str(port)).exit_code == 0 and served[0]["port"] == port  # free again: served


# ---- Ray addresses: checked before the job is written, by a dry run alike ----------------------------

def test_a_bad_ray_address_is_refused_before_the_job_is_written(model, tasks, monkeypatch):
    base = ["submit", str(model), str(tasks), "--candidates", "int8"]
    for address in ("http://x:8265", "notaurl"):
        monkeypatch.setenv("QUANTSELECT_RAY_ADDRESS", address)
        for dry in ([], ["--dry-run"]):
            start = ("Ray address http://x:8265 is a dashboard URL: give HOST:6379" if address.startswith("http")
                     else "QUANTSELECT_RAY_ADDRESS='notaurl' is no Ray address: give the head's HOST:6379")
            refused(run(*base, *dry), start)
    monkeypatch.delenv("QUANTSELECT_RAY_ADDRESS")
    for address in ("notaurl", "head:6379", "ray://head:10001", "http://head:99999"):
        for dry in ([], ["--dry-run"]):
            refused(run(*base, "--address", address, *dry), f"--address {address}: give the Ray dashboard's URL, "
                                                             "http://HOST:8265")
    refused(run("resume", "anyjob", "--address", "notaurl"), "--address notaurl: give the Ray dashboard's URL")
    assert jobs() == []  # no job row written, none failed


def test_the_ray_address_rules_follow_what_ray_init_takes():
    from quantselect.orchestration.cluster import check_jobs_address, ray_address
    from quantselect.settings import get_settings

    for good in ("head:6379", "10.0.0.1:6379", "[::1]:6379", "ray://head:10001", "ray://head", "auto", "local"):
        assert ray_address(get_settings({"QUANTSELECT_RAY_ADDRESS": good})) == good
    for bad in ("notaurl", "10.0.0.1", "head:x", "head:0", "head:70000", "https://head:8265"):
        with pytest.raises(InputError):
            ray_address(get_settings({"QUANTSELECT_RAY_ADDRESS": bad}))
    for good in ("http://127.0.0.1:8265", "https://ray.example.com", "http://[::1]:8265/", "https://gw.example/ray"):
        check_jobs_address(good)


# ---- the dry run's memory estimates ------------------------------------------------------------------

def test_a_dry_run_says_why_it_has_no_memory_estimates(tmp_path, tasks):
    bad = model_folder(tmp_path / "bad", hidden_size="big")
    res = run("submit", str(bad), str(tasks), "--candidates", "int8", "--dry-run")
    assert res.exit_code in (0, 2), res.output  # refusing such a model is check_model's call; not misexplaining it
    assert "read on the cluster" not in res.output and "field 'hidden_size' is missing or not a positive integer" \
        in res.output, res.output
    if res.exit_code == 0:
        assert "(no memory estimates: " in res.output and "config.json: field 'hidden_size'" in res.output
    # an absolute path that is not here, with --address: its driver reads it on the cluster
    res = run("submit", str(tmp_path / "on-the-cluster"), str(tasks), "--candidates", "int8", "--dry-run",
              "--address", "http://127.0.0.1:8265")
    assert res.exit_code == 0, res.output
    assert "(no memory estimates: the model's config.json is read on the cluster)" in res.output


# ---- candidates ---------------------------------------------------------------------------------------

def test_empty_candidates_are_refused_not_a_baseline_only_job(model, tasks):
    for empty in ("", ",", " , "):
        for dry in ([], ["--dry-run"]):
            refused(run("submit", str(model), str(tasks), "--candidates", empty, *dry), "--candidates is empty: ")
    assert jobs() == []
    from quantselect.domain.candidates import resolve_candidates

    with pytest.raises(InputError, match="^candidates are empty: "):  # the REST API's ["", " "]
        resolve_candidates(["", " "])
    assert [c.name for c in resolve_candidates([])] == ["baseline"]  # a service caller's own choice
    assert [c.name for c in resolve_candidates(["int8", ""])] == ["baseline", "int8"]  # a trailing comma


def test_a_parameter_given_twice_is_refused_and_false_is_shown(model, tasks):
    refused(run("submit", str(model), str(tasks), "--candidates", "int4:group_size=64:group_size=16", "--dry-run"),
            "candidate 'int4:group_size=64:group_size=16': group_size given twice")
    refused(run("submit", str(model), str(tasks), "--candidates", "int4:group_size=64:group-size=64", "--dry-run"),
            "candidate 'int4:group_size=64:group-size=64': group_size given twice")
    res = run("submit", str(model), str(tasks), "--candidates", "nf4:double_quant=false,int4:group_size=64",
              "--dry-run")
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if line.startswith("nf4:double_quant=false "))
    assert " double_quant=false " in row, row
    row = next(line for line in res.output.splitlines() if line.startswith("int4:group_size=64 "))
    assert " group_size=64 " in row, row


# ---- delete and results ------------------------------------------------------------------------------

def test_delete_looks_up_every_job_first_and_deletes_nothing_when_one_is_unknown(model, tasks):
    from quantselect.service import Service, SubmitRequest

    svc = Service()
    try:
        ids = [svc.submit(SubmitRequest(model=str(model), dataset=str(tasks), candidates=["int8"])).id for _ in range(2)]
        for job_id in ids:
            svc.cancel(job_id)  # no driver runs it: cancelled at once, and so deletable
    finally:
        svc.close()
    refused(run("delete", ids[0], "nope", ids[1], "nada"), "jobs 'nope', 'nada' not found: nothing deleted")
    refused(run("delete", ids[0], "nope"), "job 'nope' not found: nothing deleted")
    assert sorted(j.id for j in jobs()) == sorted(ids)
    res = run("delete", ids[0], ids[1], ids[0])
    assert res.exit_code == 0 and res.output == f"Deleted job {ids[0]}.\nDeleted job {ids[1]}.\n", res.output
    assert jobs() == []


def test_results_items_are_json_or_csv_never_a_table_or_markdown_silently_json(model, tasks):
    from quantselect.service import Service, SubmitRequest

    svc = Service()
    try:
        job_id = svc.submit(SubmitRequest(model=str(model), dataset=str(tasks), candidates=["int8"])).id
    finally:
        svc.close()
    for fmt in ("markdown", "table"):
        refused(run("results", job_id, "--items", "--format", fmt), f"--items exports JSON or CSV, not {fmt}: ")
    res = run("results", job_id, "--items")  # --format left out: JSON
    assert res.exit_code == 0 and json.loads(res.output) == [], res.output
    res = run("results", job_id, "--items", "--format", "json")
    assert res.exit_code == 0 and json.loads(res.output) == [], res.output
