"""`quantselect export`: a job's candidate as a Hugging Face folder that plain transformers loads,
with the evidence; a real job on a real local Ray, nothing mocked."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from quantselect.cli import cli
from tests.fixtures.common import EXAMPLES


def logits(model):
    import torch

    with torch.inference_mode():
        return model(torch.arange(1, 33).unsqueeze(0)).logits.float()


def export(*args: str):
    res = CliRunner().invoke(cli, ["export", *args])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    return res


@pytest.fixture(scope="module")
def finished_job(ray_cluster, tiny_llama, tmp_path_factory):
    """One job for the module, in a home of its own (the autouse home is per test)."""
    from quantselect.service import Service, SubmitRequest

    home = tmp_path_factory.mktemp("export-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTSELECT_HOME", str(home))
        svc = Service()
        job = svc.submit(SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=6,
                                       candidates=["int8", "bf16", "w8a8"], threshold=0.01))
        svc.run_job(job.id)
        svc.close()
    return home, job.id


@pytest.fixture
def svc(finished_job, monkeypatch):
    from quantselect.service import Service

    monkeypatch.setenv("QUANTSELECT_HOME", str(finished_job[0]))
    s = Service()
    yield s
    s.close()


def test_export_writes_a_folder_plain_transformers_loads_with_the_evidence(finished_job, svc, tmp_path, tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    from quantselect.engines import artifacts

    job_id = finished_job[1]
    results = {r.name: r for r in svc.results(job_id)}
    res = export(job_id, str(tmp_path / "int8"), "--candidate", "int8")
    assert res.exit_code == 0 and f"Exported int8 of job {job_id}" in res.output
    folder = tmp_path / "int8"
    assert not (folder / artifacts.MARKER).exists() and not list(tmp_path.glob(".*.tmp"))
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and f"quantselect job `{job_id}`" in card
    assert "relative quality" in card and "interval" in card and str(folder) in card
    evidence = json.loads((folder / "quantselect-evidence.json").read_text())
    assert evidence["candidate"] == "int8" and evidence["job"]["id"] == job_id
    # the items where it differs most from the baseline, as `quantselect compare` shows them
    assert "## Where it differs from the baseline" in card and "int8 against baseline on" in card
    assert evidence["compare"]["candidate"] == "int8" and evidence["compare"]["n_items"] > 0
    assert {r["name"] for r in evidence["results"]} == {"baseline", "int8", "bf16", "w8a8"}
    # what was evaluated: the artifact's outputs, loaded by transformers alone
    plain = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "torchao"
    assert torch.equal(logits(plain), logits(artifacts.load(results["int8"].artifact_path, "cpu").model))

    # bf16 has no artifact of its own: converted here, checked, saved in bf16
    assert export(job_id, str(tmp_path / "bf16"), "--candidate", "bf16").exit_code == 0
    half = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).eval()
    assert half.dtype == torch.bfloat16
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.bfloat16).eval()
    assert torch.equal(logits(half), logits(reference))

    # the recommended one, into an empty folder the user made
    (tmp_path / "chosen").mkdir()
    res = export(job_id, str(tmp_path / "chosen"))
    chosen = svc.recommend(job_id).chosen
    assert res.exit_code == 0 and f"Exported {chosen} of" in res.output
    assert "the recommended candidate" in (tmp_path / "chosen" / "README.md").read_text()


def test_export_refuses_what_it_cannot_write_in_one_line(finished_job, svc, tmp_path):
    job_id = finished_job[1]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    cases = [
        ([job_id, str(tmp_path / "full")], "already exists; name a new (or empty) folder"),
        ([job_id, str(tmp_path / "x"), "--candidate", "int4"], f"job '{job_id}' has no candidate 'int4'"),
        (["nope", str(tmp_path / "x")], "not found"),
        ([job_id, str(tmp_path / "x"), "--candidate", "w8a8"], "quantized in memory only on cpu"),
    ]
    for args, message in cases:
        res = export(*args)
        assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and not (tmp_path / "x").exists()
    # its artifact pruned: say how to get it back
    artifact = next(r for r in svc.results(job_id) if r.name == "int8").artifact_path
    assert CliRunner().invoke(cli, ["cache", "prune", artifact.rsplit("/", 1)[-1]]).exit_code == 0
    res = export(job_id, str(tmp_path / "x"), "--candidate", "int8")
    assert res.exit_code == 2 and "--no-cache" in res.output and not (tmp_path / "x").exists()


def test_a_converted_export_of_an_fp8_kv_cache_candidate_holds_the_weights_only(tiny_llama, tmp_path):
    """bf16:kv_cache=fp8 is exported as bf16 weights: the emulated cache's mark on the loaded config
    must not reach config.json, or the folder, used as a model, would round every candidate's cache."""
    from quantselect.domain.candidates import parse_candidate
    from quantselect.engines import artifacts, kvcache

    out = tmp_path / "bf16-fp8kv"
    artifacts.export_converted(tiny_llama, parse_candidate("bf16:kv_cache=fp8").config, out, {"README.md": "x"})
    config = json.loads((out / "config.json").read_text())
    assert kvcache.ATTR not in config and not str(config.get("_attn_implementation") or "").startswith(kvcache.PREFIX)
    assert config["dtype"] == "bfloat16" and (out / "README.md").read_text() == "x"
    assert not (out / artifacts.MARKER).exists()
