"""The disk cache: `quantselect cache list` and `cache prune`, on artifacts and references a real
job wrote, with real locks and a real database."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timedelta

import pytest
from click.testing import CliRunner

from quantselect.cli import cli
from quantselect.domain.cache import ARTIFACT, CacheEntry, CandidateUse, plan_prune
from quantselect.domain.candidates import CATALOG
from quantselect.errors import InputError
from tests.fixtures.common import EXAMPLES

NOW = datetime(2026, 11, 27, 12, 0)


def entry(key: str, days_ago: float, served_by: tuple[str, ...] = ()) -> CacheEntry:
    return CacheEntry(ARTIFACT, key, f"/a/{key}", 100, NOW - timedelta(days=days_ago), served_by=served_by)


def use(job: str, status: str, created_days_ago: float) -> CandidateUse:
    return CandidateUse(job, status, NOW - timedelta(days=created_days_ago), "int8", None, None, False)


def test_plan_prune_selects_by_key_age_or_all_and_keeps_what_is_served_or_in_use():
    old, new, served = entry("old", 40), entry("new", 1), entry("served", 90, ("j1",))
    entries = [old, new, served]
    plan = plan_prune(entries, [], NOW, older_than=timedelta(days=30))
    assert plan.remove == [old] and [(e.key, "undeploy" in why) for e, why in plan.keep] == [("served", True)]
    assert plan_prune(entries, [], NOW, keys=["new"]).remove == [new]
    assert plan_prune(entries, [], NOW, keys=["new"], older_than=timedelta(days=30)).remove == []
    assert plan_prune(entries, [], NOW, everything=True).remove == [old, new]
    # a job queued 2 days ago may load anything used since: "new" stays, "old" goes
    plan = plan_prune(entries, [use("j2", "succeeded", 3), use("j3", "queued", 2)], NOW, everything=True)
    assert plan.remove == [old] and ("new", "job j3 is queued and may be using it") in [(e.key, w) for e, w in plan.keep]
    with pytest.raises(InputError, match="say what to remove"):
        plan_prune(entries, [], NOW)
    with pytest.raises(InputError, match="not both"):
        plan_prune(entries, [], NOW, keys=["old"], everything=True)
    with pytest.raises(InputError, match="no entry 'nope'"):
        plan_prune(entries, [], NOW, keys=["old", "nope"])


def cache(*args: str):
    res = CliRunner().invoke(cli, ["cache", *args])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    return res


def listed() -> dict[str, dict]:
    return {e["key"]: e for e in json.loads(cache("list", "--format", "json").output)}


def test_cache_lists_and_prunes_what_a_job_left_keeping_what_is_served_or_in_use(ray_cluster, tiny_llama, tmp_path,
                                                                                   monkeypatch):
    from quantselect.engines.models import file_lock
    from quantselect.engines.quantize import load_candidate
    from quantselect.service import Service, SubmitRequest

    monkeypatch.setenv("QUANTSELECT_HOME", str(tmp_path / "home"))  # not the session's shared models folder
    svc = Service()
    # label-free prompts: the job keeps the baseline's reference outputs next to its artifacts
    job = svc.submit(SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "gsm8k-prompts-50.jsonl"), limit=4,
                                   candidates=["int8", "int4"], max_new_tokens=8))
    svc.run_job(job.id)
    root = svc.settings.artifacts_dir
    entries = listed()
    by_kind = {(e["kind"], (e["candidate"] or "-").split()[0]): e for e in entries.values()}
    int8, int4 = by_kind[("artifact", "int8_weight_only")], by_kind[("artifact", "int4_weight_only")]
    reference = next(e for e in entries.values() if e["kind"] == "reference")
    assert all(e["jobs"] == [job.id] and e["size_bytes"] > 0 for e in (int8, int4, reference))
    results = {r.name: r for r in svc.results(job.id)}
    assert results["int8"].artifact_path == int8["path"]
    assert int8["size_bytes"] > results["int8"].disk_bytes > 0  # its weights, plus config and tokenizer
    (root / "int8-0123456789abcdef.tmp").mkdir()  # what a killed build leaves
    (root / "int8-0123456789abcdef.tmp" / "model.safetensors").write_bytes(b"x" * 1000)
    table = cache("list").output
    assert int4["key"] in table and "incomplete" in table and "4 entries" in table

    svc.repo.set_deployment(job.id, "int8", "http://127.0.0.1:8000/x")
    res = cache("prune", "--all", "--dry-run")
    assert res.exit_code == 0 and "Would remove 3 entries" in res.output
    assert f"Kept artifact {int8['key']}: served by job {job.id}" in res.output
    assert len(listed()) == 4  # a dry run removes nothing

    # nothing was used a day ago; then the reference is made two days old
    assert "Removed 0 entries" in cache("prune", "--older-than", "1d").output
    old = time.time() - 2 * 86400
    os.utime(reference["path"], (old, old))
    res = cache("prune", "--older-than", "1d")
    assert f"Removed reference {reference['key']}" in res.output and "Removed 1 entry" in res.output
    assert not os.path.exists(reference["path"])

    # int4 locked by a process building or loading it: kept
    with file_lock(root / f".{int4['key']}.lock") as held:
        assert held
        res = cache("prune", int4["key"])
    assert "a process is building or loading it" in res.output and os.path.isdir(int4["path"])

    # a queued job, then int4 loaded again (its "last used" moves): kept while that job may use it
    queued = svc.repo.create_job(svc.repo.get_job_spec(job.id))
    time.sleep(0.05)
    assert load_candidate(str(tiny_llama), CATALOG["int4"], "cpu", artifacts_dir=str(root)).reused
    res = cache("prune", "--all")
    assert f"Kept artifact {int4['key']}: job {queued.id} is queued and may be using it" in res.output
    assert "Removed incomplete int8-0123456789abcdef.tmp" in res.output
    assert set(listed()) == {int8["key"], int4["key"]}

    svc.repo.delete_job(queued.id)
    svc.repo.set_deployment(job.id, None, None)
    res = cache("prune", "--all")
    assert "Removed 2 entries" in res.output and listed() == {}
    assert "The cache is empty" in cache("list").output
    # the job's results stay valid without their artifacts
    assert {r.name: r.status for r in svc.results(job.id)} == {"baseline": "succeeded", "int8": "succeeded",
                                                               "int4": "succeeded"}


def test_a_prune_removes_only_what_quantselect_wrote_in_a_shared_artifacts_folder(tiny_llama, tmp_path, monkeypatch):
    """QUANTSELECT_ARTIFACTS_DIR may be a shared mount's root: a folder or file there that is not an
    artifact, a reference or what a build of ours leaves (``<key>.tmp``, a reference's
    ``.<name>.npz.<pid>.tmp``) is not listed, and `cache prune --all` leaves it alone."""
    from quantselect.engines.quantize import load_candidate

    root = tmp_path / "shared"
    monkeypatch.setenv("QUANTSELECT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("QUANTSELECT_ARTIFACTS_DIR", str(root))
    made = load_candidate(str(tiny_llama), CATALOG["int8"], "cpu", artifacts_dir=str(root)).artifact_path
    theirs = [root / "alice" / "thesis.tex", root / "datasets.tmp" / "train.jsonl", root / "int8-old" / "notes",
              root / "references" / "README.txt", root / "references" / "alice.npz.tmp"]
    for f in theirs:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("mine")
    ours = [root / "int8_weight_only-0123456789abcdef.tmp" / "model.safetensors",  # a killed build
            root / "references" / ".0123abcd.npz.4242.tmp"]  # a killed reference's write
    for f in ours:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x" * 100)
    assert set(listed()) == {os.path.basename(made), "int8_weight_only-0123456789abcdef.tmp", ".0123abcd.npz.4242.tmp"}
    res = cache("prune", "--all")
    assert res.exit_code == 0 and "Removed 3 entries" in res.output, res.output
    assert all(f.read_text() == "mine" for f in theirs) and not any(f.exists() for f in ours)
    assert not os.path.exists(made) and listed() == {}


def test_a_model_folder_someone_put_in_the_models_folder_is_not_a_conversion_to_prune(tmp_path, monkeypatch):
    """$QUANTSELECT_HOME/models holds GGUF conversions (``<stem>-<12 hex>``); a user's own model
    folder put there is not listed as a half-written conversion, and `cache prune --all` keeps it."""
    monkeypatch.setenv("QUANTSELECT_HOME", str(tmp_path / "home"))
    models = tmp_path / "home" / "models"
    theirs = models / "my-llama" / "config.json"
    ours = models / "llama.q4_k_m-0123456789ab.tmp" / "model.safetensors"  # a killed conversion
    for f in (theirs, ours):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("{}")
    assert set(listed()) == {"llama.q4_k_m-0123456789ab.tmp"}
    res = cache("prune", "--all")
    assert res.exit_code == 0 and "Removed 1 entr" in res.output, res.output
    assert theirs.read_text() == "{}" and not ours.exists()


@pytest.mark.parametrize("args, message", [
    ([], "say what to remove: KEY..., --older-than AGE"),
    (["nope"], "no entry 'nope' in the cache"),
    (["--older-than", "3x"], "--older-than='3x': give a duration such as 30d, 12h"),
    (["--all", "k"], "give KEYs or --all, not both"),
])
def test_bad_prune_arguments_are_one_line_exit_2(args, message):
    res = cache("prune", *args)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_a_converted_gguf_model_is_listed_kept_while_served_and_converted_again_after_a_prune(tmp_path, monkeypatch):
    """The bundled GGUF file converted for real (float32 safetensors) into a home of its own."""
    from quantselect.engines.models import demo_gguf_path, needs_conversion, resolve_model
    from quantselect.service import Service, SubmitRequest

    monkeypatch.setenv("QUANTSELECT_HOME", str(tmp_path / "home"))
    svc = Service()
    assert needs_conversion("demo", svc.settings.models_dir)  # what a job's "preparing the model" line says
    folder = resolve_model("demo", svc.settings.models_dir)
    assert not needs_conversion("demo", svc.settings.models_dir)
    assert not needs_conversion(str(demo_gguf_path()), svc.settings.models_dir)  # the same file, by its path
    [model] = listed().values()
    assert model["kind"] == "model" and model["path"] == str(folder) and model["model"] == str(demo_gguf_path())
    assert model["size_bytes"] > 500 * 2**20 and model["jobs"] == []  # 135M parameters, 4 bytes each
    job = svc.submit(SubmitRequest(model="demo", dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=2, candidates=[]))
    svc.repo.set_deployment(job.id, "baseline", "http://127.0.0.1:8000/x")  # a baseline replica loads it
    assert listed()[model["key"]]["served_by"] == [job.id]
    res = cache("prune", "--all")
    assert f"Kept model {model['key']}: served by job {job.id}" in res.output and folder.is_dir()
    svc.repo.delete_job(job.id)
    assert "Removed model" in cache("prune", "--all").output and not folder.exists()
    assert needs_conversion("demo", svc.settings.models_dir)
    assert resolve_model("demo", svc.settings.models_dir) == folder and (folder / "config.json").is_file()


def test_an_unquantized_gguf_is_converted_in_its_own_dtype_exactly_and_a_quantized_one_in_float32(tmp_path,
                                                                                                  monkeypatch):
    """llama.cpp's F16 export of a model (here SmolLM2 written as F16 by gguf-py) is stored as float16,
    half the bytes of float32, and holds every weight exactly: the folder loads to the same tensors as
    transformers' own float32 load of the file. A file with an F32 tensor float16 would round keeps
    float32, as does a quantized file (the bundled Q4_1)."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, GGUFWriter
    from transformers import AutoModelForCausalLM

    from quantselect.engines.models import demo_gguf_path, gguf_exact_dtype, resolve_model
    from tests.fixtures.models import requantize_gguf

    assert gguf_exact_dtype(demo_gguf_path()) == "float32"
    for value, dtype in ((0.5, "float16"), (0.1, "float32")):  # 0.1 has no exact float16
        path = tmp_path / f"probe-{value}.gguf"
        writer = GGUFWriter(str(path), "llama")
        writer.add_tensor("blk.0.attn_q.weight", np.ones((8, 8), np.float16), raw_dtype=GGMLQuantizationType.F16)
        writer.add_tensor("blk.0.attn_norm.weight", np.full(8, value, np.float32), raw_dtype=GGMLQuantizationType.F32)
        writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
        assert gguf_exact_dtype(path) == dtype

    f16 = requantize_gguf(demo_gguf_path(), tmp_path / "SmolLM2-135M-Instruct.F16.gguf", "F16")
    assert gguf_exact_dtype(f16) == "float16"
    monkeypatch.setenv("QUANTSELECT_HOME", str(tmp_path / "home"))
    folder = resolve_model(str(f16), tmp_path / "home" / "models")
    [model] = listed().values()
    assert model["candidate"] == "float16 (from GGUF)" and model["model"] == str(f16)
    assert 250 * 2**20 < model["size_bytes"] < 300 * 2**20  # 135M parameters, 2 bytes each (float32: 540 MB)
    ours = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(str(f16.parent), gguf_file=f16.name, dtype=torch.float32).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
