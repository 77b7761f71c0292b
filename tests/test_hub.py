"""A model named by its Hugging Face Hub id (``owner/name[@revision]``): resolved to its snapshot in
the Hugging Face cache, as `hf download` leaves it (blobs, links, refs). No test machine reaches the
Hub, so each test puts what it needs in this run's own cache and the client runs offline
(``HF_HUB_OFFLINE=1``, tests/fixtures/common.py): the resolution, the errors and the job that runs
on the snapshot are the real ones."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantselect.cli import cli
from quantselect.engines.models import check_model, from_hub, hub_id, resolve_model
from quantselect.errors import InputError
from quantselect.service import Service
from tests.fixtures.common import EXAMPLES, SHARED, put_in_hub_cache

CONFIGS = Path(__file__).parent / "data" / "configs"


@pytest.fixture(scope="module")
def hub_tiny(tiny_llama) -> tuple[str, Path]:
    return "tiny-org/tiny-llama", put_in_hub_cache(tiny_llama, "tiny-org/tiny-llama")


def _run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_what_is_a_hub_id(tmp_path, monkeypatch):
    assert hub_id("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", None, None)
    assert hub_id("meta-llama/Llama-3.1-8B@refs/pr/12") == ("meta-llama/Llama-3.1-8B", "refs/pr/12", None)
    assert hub_id("bartowski/Llama-3.2-1B-GGUF/Llama-3.2-1B-Q4_K_M.gguf") == (
        "bartowski/Llama-3.2-1B-GGUF", None, "Llama-3.2-1B-Q4_K_M.gguf")
    assert hub_id("org/x-GGUF/q8/x.Q8_0.GGUF@v2") == ("org/x-GGUF", "v2", "q8/x.Q8_0.GGUF")
    for not_one in ("demo", "/models/llama", "./llama", "~/llama", "llama", "a/b/c", "model.gguf", "org/na me",
                    "org/repo/file.bin"):
        assert hub_id(not_one) is None, not_one
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "llama").mkdir(parents=True)
    assert hub_id("models/llama") is None  # a path that exists is the path


def test_a_huggingface_co_address_copied_from_a_browser_names_what_it_shows():
    from quantselect.engines.models import hub_name

    hf = "https://huggingface.co"
    assert hub_name(f"{hf}/Qwen/Qwen2.5-7B-Instruct/") == "Qwen/Qwen2.5-7B-Instruct"
    assert hub_name(f"{hf}/meta-llama/Llama-3.1-8B/tree/refs%2Fpr%2F12") == "meta-llama/Llama-3.1-8B@refs/pr/12"
    assert hub_name(f"{hf}/org/X-GGUF/resolve/v2/q8/X.Q8_0.gguf?download=true") == "org/X-GGUF/q8/X.Q8_0.gguf@v2"
    assert hub_name(f"{hf}/datasets/openai/gsm8k/blob/main/main/test-00000-of-00001.parquet") == \
        "hf://datasets/openai/gsm8k@main/main/test-00000-of-00001.parquet"
    for other in ("/models/llama", "Qwen/Qwen2.5", "demo", "hf://datasets/a/b/c.jsonl", None):
        assert hub_name(other) == other
    with pytest.raises(InputError, match="a dataset's page; name one of its files"):
        hub_name(f"{hf}/datasets/openai/gsm8k")
    with pytest.raises(InputError, match="a file of a model repository; name the repository, Qwen/Q@main, or one"):
        hub_name(f"{hf}/Qwen/Q/blob/main/config.json")


def test_a_hub_commit_is_one_identity_pinned_or_downloaded_whatever_of_it_is_here(tmp_path):
    """The result cache knows a Hub download by its repository and commit: the id pinned at submit
    and the snapshot the driver fetched give one key, and files added to the snapshot later (a
    README, the weights after the config) do not change it."""
    from quantselect.engines.models import hub_identity, model_fingerprint

    commit = "0123456789abcdef0123456789abcdef01234567"
    assert hub_identity(f"org/m@{commit}") == f"org/m@{commit}"
    assert hub_identity(f"org/m-GGUF/q8/m.Q8_0.gguf@{commit}") == f"org/m-GGUF/q8/m.Q8_0.gguf@{commit}"
    for not_pinned in ("org/m", "org/m@main", "org/m@v1.0", "demo", str(tmp_path / "snapshots" / commit)):
        assert hub_identity(not_pinned) is None, not_pinned
    snapshot = tmp_path / "hub" / "models--org--m" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert hub_identity(str(snapshot)) == f"org/m@{commit}"
    assert hub_identity(str(snapshot / "q8" / "m.Q8_0.gguf")) == f"org/m/q8/m.Q8_0.gguf@{commit}"
    key = model_fingerprint(str(snapshot))
    assert key == model_fingerprint(f"org/m@{commit}") != model_fingerprint(f"org/m@{'f' * 40}")
    (snapshot / "README.md").write_text("fetched later")
    assert model_fingerprint(str(snapshot)) == key
    plain = tmp_path / "plain"  # a folder of the user's: its files' names, sizes and times
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    before = model_fingerprint(str(plain))
    (plain / "README.md").write_text("edited in place")
    assert model_fingerprint(str(plain)) != before


def test_a_job_runs_on_a_hub_id_from_the_cache(ray_cluster, hub_tiny, tmp_path):
    from quantselect.service import SubmitRequest

    repo, snapshot = hub_tiny
    res = _run("submit", repo, str(EXAMPLES / "piqa-300.jsonl"), "--limit", "8", "--candidates", "int8",
               "--threshold", "0.5")
    assert res.exit_code == 0, res.output
    job = Service().list_jobs()[0]
    assert (job.model, job.model_path, job.status) == (repo, str(snapshot), "succeeded")
    # Submitted, it was pinned to the commit its config was checked on; the driver fetched that one.
    pin = Service().submit(SubmitRequest(model=repo, dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=8,
                                         candidates=["int8"]))
    assert pin.model_path == f"{repo}@{snapshot.name}" and all(Service().repo.cache_keys(pin.id).values())
    assert {r.name: r.status for r in Service().results(job.id)} == {"baseline": "succeeded", "int8": "succeeded"}
    # Exported, its card names the base model in the metadata the Hub reads to list the upload among
    # that model's quantizations.
    _, out = Service().export(job.id, str(tmp_path / "export"), "int8")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\nbase_model: tiny-org/tiny-llama\n"
                           "base_model_relation: quantized\n"), card[:200]
    # A revision is a ref of the cache, or a commit; the snapshot is the same folder.
    assert from_hub(f"{repo}@main") == from_hub(f"{repo}@{snapshot.name}") == snapshot


def test_a_hub_id_not_in_the_cache_offline_is_one_line_and_writes_nothing(tiny_llama):
    res = _run("submit", "nobody/no-such-model", str(EXAMPLES / "piqa-300.jsonl"), "--limit", "8")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == [
        "Error: nobody/no-such-model: not a folder or file here, and HF_HUB_OFFLINE is set and the Hugging Face "
        "cache does not hold it; download it where the Hub can be reached (the cache is HF_HUB_CACHE), or give a "
        "folder"]
    assert Service().list_jobs() == []
    with pytest.raises(InputError, match="nobody/no-such-model@v2: not a folder or file here"):
        from_hub("nobody/no-such-model@v2")
    # A checkpoint candidate is named the same way, and refused the same way, with its name.
    res = _run("submit", str(tiny_llama), str(EXAMPLES / "piqa-300.jsonl"), "--candidates", "hub-awq=nobody/awq")
    assert res.exit_code == 2 and res.output.startswith("Error: candidate hub-awq: nobody/awq: not a folder")


def test_a_repository_without_safetensors_gives_its_bin_weights_and_one_without_weights_is_refused(tiny_llama, tmp_path):
    import torch
    from safetensors.torch import load_file

    bins = tmp_path / "bins"
    shutil.copytree(tiny_llama, bins)
    torch.save(load_file(str(bins / "model.safetensors")), bins / "pytorch_model.bin")
    (bins / "model.safetensors").unlink()
    snapshot = put_in_hub_cache(bins, "old-org/bin-llama")
    assert from_hub("old-org/bin-llama") == snapshot and (snapshot / "pytorch_model.bin").is_file()
    shutil.copytree(tiny_llama, tmp_path / "no-weights", ignore=shutil.ignore_patterns("*.safetensors"))
    no_weights = put_in_hub_cache(tmp_path / "no-weights", "org/no-weights")
    # The submission is checked on the config and tokenizer; the driver fetches the weights and,
    # finding none, fails the job with the reason.
    res = _run("submit", "org/no-weights", str(EXAMPLES / "piqa-300.jsonl"), "--limit", "8")
    assert res.exit_code != 0 and "Traceback" not in res.output
    [job] = Service().list_jobs()
    assert job.status == "failed" and job.error.endswith(f"{no_weights}: folder has no weights (*.safetensors or *.bin)")
    # A dry run fetches the config and the tokenizer, not the weights: it checks all it can without
    # them, and names the commit the job would run.
    res = _run("submit", "org/no-weights", str(EXAMPLES / "piqa-300.jsonl"), "--limit", "20", "--dry-run")
    assert res.exit_code == 0 and f"Model org/no-weights (org/no-weights@{no_weights.name}, 7M parameters)" in res.output, \
        res.output


def test_the_planner_reads_only_the_config_of_a_hub_id(tmp_path):
    """A 70B model whose weights are nowhere near: its config.json alone, as `hf download
    meta-llama/Llama-3.1-70B config.json` leaves it, is what `plan` reads."""
    (tmp_path / "cfg").mkdir()
    shutil.copy(CONFIGS / "llama-3.1-70b.json", tmp_path / "cfg" / "config.json")
    put_in_hub_cache(tmp_path / "cfg", "meta-llama/Llama-3.1-70B")
    res = _run("plan", "https://huggingface.co/meta-llama/Llama-3.1-70B", "--gpu", "H100", "--format", "json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    rows = {r["precision"]: r for r in out["precisions"]}
    assert out["params"] == pytest.approx(70.55e9, rel=0.005) and rows["bf16"]["gpus"] == 2 and rows["int4"]["gpus"] == 1
    res = _run("plan", "meta-llama/Llama-3.1-405B")
    assert res.exit_code == 2 and "meta-llama/Llama-3.1-405B: not a folder or file here" in res.output


def test_a_hub_id_submitted_to_a_cluster_is_fetched_by_the_driver(ray_cluster, tiny_llama):
    """`submit --address` with a Hub id: nothing is downloaded where the job is submitted; the
    driver fetches it on its machine (failing the job, saying where, when it cannot), records the
    snapshot it ran on, and computes the cache keys there."""
    from dataclasses import replace

    from quantselect.errors import QuantselectError
    from quantselect.service import Events, SubmitRequest

    svc = Service()
    req = SubmitRequest(model="cluster-org/tiny-llama", dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=8,
                        candidates=["int8"], model_on_cluster=True)
    with pytest.raises(InputError, match="the Hugging Face cache does not hold it"):
        svc.submit(replace(req, model_on_cluster=False))
    job = svc.submit(req)
    assert job.model_path == "cluster-org/tiny-llama" and set(svc.repo.cache_keys(job.id).values()) == {None}
    with pytest.raises(QuantselectError, match=r"on the driver's machine \(.*\): cluster-org/tiny-llama: not a folder"):
        svc.run_job(job.id)
    snapshot = put_in_hub_cache(tiny_llama, "cluster-org/tiny-llama")  # now the driver's cache has it
    # What the driver is doing is the job's stage in the database, for `status` and the REST job of
    # a job that runs elsewhere; it is cleared when the job ends.
    seen = []
    done = svc.resume(job.id, Events(on_status=lambda text: seen.append((text, svc.get_job(job.id).stage))))
    assert seen and all(text == stage for text, stage in seen), seen
    assert seen[0][0].startswith("fetching cluster-org/tiny-llama from the Hugging Face Hub")
    assert any(text.startswith("running 2 candidate(s) on Ray") for text, _ in seen) and done.stage is None
    svc.repo.set_job_status(job.id, "running")  # as `status` sees a job while its driver runs elsewhere
    svc.repo.set_job_stage(job.id, seen[0][0])
    assert _run("status", job.id).output.splitlines()[0] == f"Job {job.id}: running: {seen[0][0]}"
    svc.repo.finish_job(job.id, "succeeded")
    assert (done.status, done.model, done.model_path) == ("succeeded", "cluster-org/tiny-llama", str(snapshot))
    assert all(svc.repo.cache_keys(job.id).values())
    # Run here, it is fetched from the cache: the same snapshot, the same keys, the results reused.
    again = svc.submit(replace(req, model_on_cluster=False))
    assert svc.run_job(again.id).status == "succeeded"
    assert svc.repo.cache_keys(again.id) == svc.repo.cache_keys(job.id)
    assert {r.reused_from for r in svc.results(again.id)} == {job.id}


def test_a_hub_id_submitted_to_a_cluster_is_pinned_at_submit_without_a_download(fake_hub, tiny_llama, demo_q4_0_gguf,
                                                                              tmp_path, monkeypatch):
    """`submit --address` with a Hub id asks the Hub which commit it names now, downloading
    nothing: the driver fetches that commit however long the job queues, and a name the Hub lacks
    fails the submission at once, not the job later. Where the Hub cannot be reached from here, the
    job is submitted unpinned (its driver fetches the revision as it is then)."""
    from dataclasses import replace

    from huggingface_hub import constants

    from quantselect.service import SubmitRequest

    commit = fake_hub.add("far-org/tiny-llama", tiny_llama)
    (tmp_path / "release").mkdir()
    shutil.copy(demo_q4_0_gguf, tmp_path / "release" / demo_q4_0_gguf.name)
    gguf_commit = fake_hub.add("far-org/SmolLM2-GGUF", tmp_path / "release")
    gguf = f"far-org/SmolLM2-GGUF/{demo_q4_0_gguf.name}"
    svc = Service()
    req = SubmitRequest(model="far-org/tiny-llama", dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=8,
                        candidates=["int8"], model_on_cluster=True)
    assert svc.build_spec(req).model_path == f"far-org/tiny-llama@{commit}"
    assert svc.build_spec(replace(req, model=f"far-org/tiny-llama@{commit}")).model_path == f"far-org/tiny-llama@{commit}"
    assert svc.build_spec(replace(req, model=gguf)).model_path == f"{gguf}@{gguf_commit}"
    assert fake_hub.served == {}  # not a byte of any file
    for name, said in [
        ("far-org/tiny-lama", "far-org/tiny-lama: not a folder or file here, nor a model on the Hugging Face Hub"),
        ("far-org/tiny-llama@v9", "far-org/tiny-llama@v9: the Hugging Face Hub has no revision 'v9' of far-org/tiny-llama"),
        ("far-org/SmolLM2-GGUF/other.gguf", "far-org/SmolLM2-GGUF/other.gguf: far-org/SmolLM2-GGUF on the Hugging Face "
                                            "Hub has no file other.gguf"),
        ("far-org/SmolLM2-GGUF", "far-org/SmolLM2-GGUF: the Hub repository has no config.json, so it is not a Hugging "
                                 "Face model; a repository of GGUF files: name one of them, owner/name/file.gguf"),
    ]:
        with pytest.raises(InputError) as e:
            svc.build_spec(replace(req, model=name))
        assert str(e.value).startswith(said), str(e.value)
    assert svc.list_jobs() == []
    # its dry run says a stored result of the same commit would be reused, as the driver then reuses it
    from quantselect.domain.results import CandidateResult

    assert not any(c["stored_result"] for c in svc.preview(req)["candidates"])
    job = svc.submit(req)
    for name in job.candidate_names:
        svc.repo.save_outcome(job.id, CandidateResult(name=name, config={}, status="succeeded", score=1.0, n_items=8))
    svc.repo.finish_job(job.id, "succeeded")
    assert all(c["stored_result"] for c in svc.preview(req)["candidates"])
    fake_hub.down(503)  # the Hub answers that it cannot answer now: as if out of reach
    assert svc.build_spec(req).model_path == "far-org/tiny-llama"
    fake_hub.down(None)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    assert svc.build_spec(req).model_path == "far-org/tiny-llama"
    assert svc.build_spec(replace(req, model=gguf)).model_path == gguf


def test_a_download_is_a_process_of_its_own_which_a_cancel_stops(ray_cluster, tiny_llama, fake_hub, tmp_path):
    """The driver downloads a Hub model's weights in a process of its own: a cancel meanwhile ends the
    job at once and stops the download, also where the driver lives on (the API server drives its
    jobs in threads, as this test does), and the Hub sees its client go. A `resume` downloads it
    and runs the job on that snapshot."""
    import threading

    from quantselect.service import SubmitRequest

    commit = fake_hub.add("far-org/tiny-llama", tiny_llama)
    fake_hub.trickle("far-org/tiny-llama", "model.safetensors")  # a 16 GB download, as it were
    svc = Service()
    job = svc.submit(SubmitRequest(model="far-org/tiny-llama", dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=8,
                                   candidates=["int8"]))
    assert job.model_path == f"far-org/tiny-llama@{commit}"  # its config and tokenizer read, pinned
    ended: dict = {}
    driver = threading.Thread(target=lambda: ended.setdefault("job", svc.run_job(job.id)))
    driver.start()
    assert fake_hub.started.wait(60), fake_hub.requests
    assert svc.get_job(job.id).stage.startswith(f"fetching far-org/tiny-llama@{commit} from the Hugging Face Hub")
    svc.cancel(job.id)
    driver.join(timeout=30)
    assert not driver.is_alive() and (ended["job"].status, ended["job"].error) == ("cancelled", "cancelled by request")
    assert fake_hub.disconnected.wait(10), "the download goes on after the job was cancelled"
    # A driver killed outright (SIGKILL, its pod evicted) takes its download with it.
    fake_hub.started.clear(), fake_hub.disconnected.clear()
    cli = subprocess.Popen([sys.executable, "-m", "quantselect", "submit", "far-org/tiny-llama",
                            str(EXAMPLES / "piqa-300.jsonl"), "--limit", "8", "--candidates", "int8"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert fake_hub.started.wait(120), fake_hub.requests[-5:]
    finally:
        cli.kill()
        cli.wait()
    assert fake_hub.disconnected.wait(10), "the download outlives its driver"
    fake_hub.trickle("far-org/tiny-llama", "model.safetensors", on=False)
    done = svc.resume(job.id)
    assert done.status == "succeeded" and Path(done.model_path).name == commit
    assert (Path(done.model_path) / "model.safetensors").read_bytes() == (tiny_llama / "model.safetensors").read_bytes()


def test_a_gguf_file_of_a_hub_repository_is_a_model_or_a_candidate(demo_q4_0_gguf, tmp_path):
    """``owner/name/file.gguf``: that one file of the repository (llama.cpp releases hold one file
    per quantization), fetched alone, then read as any .gguf file is."""
    from quantselect.service import SubmitRequest

    (tmp_path / "release").mkdir()
    shutil.copy(demo_q4_0_gguf, tmp_path / "release" / demo_q4_0_gguf.name)
    snapshot = put_in_hub_cache(tmp_path / "release", "acme/SmolLM2-GGUF")
    name = f"acme/SmolLM2-GGUF/{demo_q4_0_gguf.name}"
    assert from_hub(name) == snapshot / demo_q4_0_gguf.name
    items = [{"prompt": f"q{i}", "reference": "a"} for i in range(20)]
    spec = Service().build_spec(SubmitRequest(model="demo", items=items, candidates=[f"q40={name}"]))
    q40 = spec.candidates[1].config
    assert (q40.path, q40.method, q40.file_type) == (f"{name}@{snapshot.name}", "gguf", "Q4_0")
    # As the model: checked from its header at submit, fetched by the driver.
    spec = Service().build_spec(SubmitRequest(model=name, items=items, candidates=["int8"]))
    assert (spec.model, spec.model_path) == (name, f"{name}@{snapshot.name}")
    # The same, by the addresses a browser shows on huggingface.co
    page = f"https://huggingface.co/acme/SmolLM2-GGUF/blob/main/{demo_q4_0_gguf.name}"
    spec = Service().build_spec(SubmitRequest(model=page, items=items, candidates=[f"q40={page}"]))
    assert (spec.model, spec.model_path) == (f"{name}@main", f"{name}@{snapshot.name}")
    assert spec.candidates[1].config.path == f"{name}@{snapshot.name}"
    # The snapshot's file is a link to a blob named by its hash: it is read through the link (the
    # blob has no .gguf suffix), for the model and for a candidate alike.
    assert check_model(str(from_hub(name))) == str(snapshot / demo_q4_0_gguf.name)
    folder = resolve_model(str(from_hub(name)), tmp_path / "models")
    assert (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
    res = _run("plan", name, "--format", "json")  # the planner reads its header, as of a .gguf path
    assert res.exit_code == 0, res.output
    assert "Q4_0 (this file)" in [r["precision"] for r in json.loads(res.output)["precisions"]]
    with pytest.raises(InputError, match=r"acme/SmolLM2-GGUF/other\.gguf: not a folder or file here, and HF_HUB_OFFLINE"):
        from_hub("acme/SmolLM2-GGUF/other.gguf")
    # The repository named whole is not a model: the error says to name one of its files.
    res = _run("submit", "acme/SmolLM2-GGUF", str(EXAMPLES / "piqa-300.jsonl"))
    assert res.exit_code == 2 and res.output.strip() == (
        "Error: acme/SmolLM2-GGUF: the Hub repository has no config.json, so it is not a Hugging Face model; "
        "a repository of GGUF files: name one of them, owner/name/file.gguf")


def test_a_hub_gguf_file_is_read_from_its_header_alone_until_the_driver_fetches_it(fake_hub, demo_q4_0_gguf, tmp_path):
    """`plan`, `submit` and a dry run of a GGUF file on the Hub read its header (config, tokenizer,
    quantization: the first megabytes) by ranged requests, not the gigabytes of its weights; the
    job's driver downloads the whole file, the commit read at submit."""
    from huggingface_hub import try_to_load_from_cache

    from quantselect.service import SubmitRequest

    (tmp_path / "release").mkdir()
    shutil.copy(demo_q4_0_gguf, tmp_path / "release" / demo_q4_0_gguf.name)
    (tmp_path / "release" / "broken.gguf").write_bytes(b"<html>not a model</html>")
    commit = fake_hub.add("far-org/SmolLM2-GGUF", tmp_path / "release")
    name, size = f"far-org/SmolLM2-GGUF/{demo_q4_0_gguf.name}", demo_q4_0_gguf.stat().st_size

    res = _run("plan", name, "--format", "json")
    assert res.exit_code == 0, res.output
    assert "Q4_0 (this file)" in [r["precision"] for r in json.loads(res.output)["precisions"]]
    header = fake_hub.served[name]
    assert 0 < header < size / 20, (header, size)  # SmolLM2's header: its 49k-token vocabulary, ~2 MB of 80 MB
    items = [{"prompt": f"q{i}", "reference": "a"} for i in range(20)]
    spec = Service().build_spec(SubmitRequest(model=name, items=items, candidates=["int8", f"q40={name}"]))
    assert spec.model_path == spec.candidates[-1].config.path == f"{name}@{commit}"
    assert spec.candidates[-1].config.file_type == "Q4_0"
    assert fake_hub.served[name] == header  # read once per process
    assert try_to_load_from_cache("far-org/SmolLM2-GGUF", demo_q4_0_gguf.name, revision=commit) is None
    # The driver's fetch: the whole file, which later reads use as it is.
    whole = from_hub(spec.model_path)
    assert whole.read_bytes() == demo_q4_0_gguf.read_bytes() and fake_hub.served[name] == header + size
    assert from_hub(name, weights=False) == from_hub(name, config_only=True) == whole
    # What is not a GGUF file says so in one line, having read a few bytes of it.
    res = _run("plan", "far-org/SmolLM2-GGUF/broken.gguf")
    assert res.exit_code == 2 and res.output.strip().endswith(
        "not a readable GGUF file (it does not start with 'GGUF')"), res.output


def test_a_hub_gguf_header_copy_is_named_by_its_hub_name_kept_while_used_and_the_cache_stands_in_for_a_hub_down(
        fake_hub, demo_q4_0_gguf, tmp_path, monkeypatch):
    """A header copy's temporary path never reaches a message: the file is named as the user named
    it, pinned. A copy not used for ten minutes is removed when another is made (a long-lived API
    server names many files). A Hub that answers 5xx is not the end: a file the Hugging Face cache
    holds is read there, as ``hf_hub_download`` does; one it lacks is the Hub's error, in one line."""
    import os
    import time

    import gguf
    import numpy as np

    from quantselect.engines import models

    (tmp_path / "release").mkdir()
    shutil.copy(demo_q4_0_gguf, tmp_path / "release" / demo_q4_0_gguf.name)
    writer = gguf.GGUFWriter(tmp_path / "release" / "partial.gguf", "llama")  # no heads
    writer.add_embedding_length(64)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    commit = fake_hub.add("own-org/SmolLM2-GGUF", tmp_path / "release")  # one no earlier test put in the cache
    name, partial = f"own-org/SmolLM2-GGUF/{demo_q4_0_gguf.name}", "own-org/SmolLM2-GGUF/partial.gguf"

    res = _run("plan", partial)
    assert res.exit_code == 2 and res.output == (
        f"Error: {partial}@{commit}: field 'num_attention_heads' is missing or not a positive integer\n"), res.output
    copy = from_hub(partial, weights=False)
    assert models.shown(copy) == f"{partial}@{commit}" and models.shown(demo_q4_0_gguf) == str(demo_q4_0_gguf)
    # An idle copy goes when another is made; a used one stays.
    idle = time.time() - models.HEADER_COPY_IDLE_SECONDS - 1
    os.utime(copy, (idle, idle))
    header = from_hub(name, weights=False)
    assert not copy.exists() and header.is_file()
    os.utime(header, (idle, idle))
    assert from_hub(name, weights=False) == header and header.stat().st_mtime > idle  # used again: kept
    assert from_hub(partial, weights=False) == copy and header.is_file()  # fetched again
    # The Hub down: the whole file in the cache is read there, a file not in it is the Hub's error.
    whole = from_hub(name)  # downloaded as `hf download` does: the cache knows which commit main is
    fake_hub.down(503)
    assert from_hub(name, weights=False) == whole
    res = _run("plan", partial)
    assert res.exit_code == 2 and res.output.startswith(
        f"Error: {partial}: downloading it from the Hugging Face Hub failed: Server error '503 Service Unavailable'"), res.output
    assert len(res.output.splitlines()) == 1, res.output


def test_a_gguf_header_reads_as_gguf_py_reads_the_whole_file(demo_q4_0_gguf):
    """The header reader (``engines/gguf_header.py``) against the gguf package's own reader: every
    key-value and every tensor's name, shape, type and size the same."""
    from gguf import GGUFReader

    from quantselect.engines.gguf_header import read_file_header

    header, whole = read_file_header(demo_q4_0_gguf), GGUFReader(str(demo_q4_0_gguf))
    theirs = {k: f.contents() for k, f in whole.fields.items() if not k.startswith("GGUF.")}
    assert header.fields.keys() == theirs.keys()
    for key, value in theirs.items():
        assert header.fields[key] == pytest.approx(value) if isinstance(value, float) else header.fields[key] == value, key
    assert [(t.name, t.shape, t.ggml_type, t.n_bytes) for t in header.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.n_bytes)) for t in whole.tensors]
    assert header.size <= whole.data_offset
    # The start of the file alone holds the header; anything shorter says where it ends.
    start = demo_q4_0_gguf.read_bytes()[:header.size]
    assert read_file_header(_written(demo_q4_0_gguf.parent / "start.gguf", start)) == header
    with pytest.raises(InputError, match=r"start\.gguf: not a readable GGUF file \(it ends inside its header, at byte 1000\)"):
        read_file_header(_written(demo_q4_0_gguf.parent / "start.gguf", start[:1000]))


def test_a_corrupt_gguf_header_is_one_line_and_read_no_further_than_the_file(tmp_path):
    """A length past the end of the file fails before anything more is fetched (over the Hub, a
    corrupt count would otherwise download the rest of the file); a tensor type the installed gguf
    package does not know says to upgrade it."""
    import struct

    from quantselect.engines.gguf_header import read_file_header, read_header

    def gguf(kvs: bytes, n_kv: int, tensors: bytes = b"", n_tensors: int = 0) -> bytes:
        return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + tensors

    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    huge = gguf(string("general.name") + struct.pack("<IQ", 8, 2**60), 1) + b"\0" * 100
    asked: list[int] = []

    def fetch(offset: int, n: int) -> bytes:
        asked.append(n)
        return huge[offset:offset + n]

    with pytest.raises(InputError, match=r"^far: not a readable GGUF file \(it ends inside its header, at byte 156\)$"):
        read_header(fetch, "far", len(huge))
    assert sum(asked) <= len(huge)
    odd = gguf(string("general.architecture") + struct.pack("<I", 8) + string("llama"), 1,
               string("blk.0.attn_q.weight") + struct.pack("<IQQIQ", 2, 64, 64, 200, 0), 1)
    with pytest.raises(InputError, match=r"odd\.gguf: tensor blk\.0\.attn_q\.weight has GGML type 200, which the "
                                         r"installed gguf package \(.+\) does not know; upgrade it"):
        read_file_header(_written(tmp_path / "odd.gguf", odd))


def test_a_crafted_gguf_header_is_refused_at_its_cap_not_read_into_memory(tmp_path, monkeypatch):
    """A header is what an API request names (``plan?model=org/repo/big.gguf``) and is read into
    memory: one that declares more values than a real header holds (a vocabulary is under a
    million) is refused before they are read, and one larger than ``MAX_HEADER_BYTES`` (real ones
    are 10-20 MB) before more is fetched, in one line naming the file, local or remote alike."""
    import struct

    import gguf
    import numpy as np

    from quantselect.engines import gguf_header
    from quantselect.engines.gguf_header import read_file_header, read_header

    # An array of 2**40 strings in a file of a few bytes more (a remote file's size is the Hub's word).
    crafted = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 21) + b"tokenizer.ggml.tokens"
               + struct.pack("<IIQ", 9, 8, 2**40) + struct.pack("<Q", 1) + b"a" * 4096)
    asked: list[int] = []

    def fetch(offset: int, n: int) -> bytes:
        asked.append(n)
        return crafted[offset:offset + n]

    with pytest.raises(InputError, match=r"^org/repo/big\.gguf@abc: its header holds more than 8,388,608 values: "
                                         r"not a GGUF file quantselect reads$"):
        read_header(fetch, "org/repo/big.gguf@abc", 50 << 30)
    assert asked == [1 << 20]  # the first read only
    # A header of bytes past the cap: a real file written by the gguf package, the cap lowered.
    writer = gguf.GGUFWriter(tmp_path / "big.gguf", "llama")
    writer.add_array("tokenizer.ggml.tokens", [f"token-{i}" for i in range(20_000)])
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert len(read_file_header(tmp_path / "big.gguf").fields["tokenizer.ggml.tokens"]) == 20_000
    monkeypatch.setattr(gguf_header, "MAX_HEADER_BYTES", 64 << 10)
    with pytest.raises(InputError, match=rf"^{re.escape(str(tmp_path))}/big\.gguf: its header is larger than 0.0625 MiB: "
                                         r"not a GGUF file quantselect reads$"):
        read_file_header(tmp_path / "big.gguf")
    monkeypatch.setattr(gguf_header, "MAX_HEADER_VALUES", 10_000)
    with pytest.raises(InputError, match=r"its header holds more than 10,000 values"):
        read_file_header(tmp_path / "big.gguf")


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_file_of_a_hub_dataset_is_a_task_dataset_labels_or_calibration_file(tiny_llama, tmp_path):
    """``hf://datasets/OWNER/NAME[@REVISION]/PATH``, as the Hub's file system (and pandas, polars,
    duckdb) name a file: downloaded once into the Hugging Face cache where the job is submitted (the
    items are stored with the job), and named so in the job and in every error."""
    from quantselect.domain.dataset import FieldMapping
    from quantselect.service import SubmitRequest

    (tmp_path / "piqa" / "data").mkdir(parents=True)
    for name in ("valid.jsonl", "valid-labels.lst"):
        shutil.copy(SHARED / "datasets" / "piqa" / name, tmp_path / "piqa" / "data" / name)
    put_in_hub_cache(tmp_path / "piqa", "acme/piqa", repo_type="dataset")
    (tmp_path / "mine").mkdir()
    lines = (EXAMPLES / "gsm8k-50.jsonl").read_text().splitlines()
    (tmp_path / "mine" / "gsm8k.jsonl").write_text("\n".join(lines[:30]) + "\n")
    (tmp_path / "mine" / "broken.jsonl").write_text(lines[0] + "\n" + lines[1][:-1] + "\n")
    (tmp_path / "mine" / "calibration.txt").write_text("\n".join(f"sample {i} of a calibration text" for i in range(16)))
    put_in_hub_cache(tmp_path / "mine", "acme/mine", repo_type="dataset")
    svc = Service()

    # PIQA as distributed, its labels beside it: the CLI's --map and --labels, both files on the Hub
    piqa = "hf://datasets/acme/piqa/data/valid.jsonl"
    req = SubmitRequest(model=str(tiny_llama), dataset=piqa, limit=20, candidates=["int8"],
                        mapping=FieldMapping.parse(["prompt=Question: {goal}\nAnswer:", "choices=sol1,sol2"],
                                                   "hf://datasets/acme/piqa@main/data/valid-labels.lst"))
    spec = svc.build_spec(req)
    assert (spec.dataset.source, spec.dataset.kind, len(spec.dataset)) == (piqa, "multiple_choice", 20)
    local = svc.build_spec(SubmitRequest(model=str(tiny_llama), dataset=str(SHARED / "datasets" / "piqa" / "valid.jsonl"),
                                         limit=20, candidates=["int8"], mapping=FieldMapping.parse(
                                             ["prompt=Question: {goal}\nAnswer:", "choices=sol1,sol2"],
                                             str(SHARED / "datasets" / "piqa" / "valid-labels.lst"))))
    assert spec.dataset.items == local.dataset.items
    # a calibration file of a Hub dataset too, for GPTQ
    gptq = svc.build_spec(SubmitRequest(model=str(tiny_llama), dataset="hf://datasets/acme/mine/gsm8k.jsonl",
                                        candidates=["int4-gptq"], calibration="hf://datasets/acme/mine/calibration.txt",
                                        calibration_samples=8))
    assert gptq.calibration.source == "hf://datasets/acme/mine/calibration.txt" and len(gptq.calibration.texts) == 8
    assert len(gptq.dataset) == 30  # nothing held out of the task data

    # Errors name the file as the user did, with its line; nothing is submitted.
    res = _run("submit", str(tiny_llama), "hf://datasets/acme/mine/broken.jsonl")
    assert res.exit_code == 2 and res.output.startswith("Error: hf://datasets/acme/mine/broken.jsonl:2: malformed JSON")
    res = _run("submit", str(tiny_llama), "hf://datasets/acme/mine/gone.jsonl")
    assert res.exit_code == 2 and res.output.strip() == (
        "Error: hf://datasets/acme/mine/gone.jsonl: not here, and HF_HUB_OFFLINE is set and the Hugging Face "
        "cache does not hold it; download it where the Hub can be reached (the cache is HF_HUB_CACHE), or give a file")
    res = _run("submit", str(tiny_llama), "hf://acme/mine/gsm8k.jsonl")
    assert res.exit_code == 2 and "a file of a Hub dataset is named hf://datasets/OWNER/NAME[@REVISION]/PATH" in res.output
    assert Service().list_jobs() == []
    # The CLI's dry run reads it the same way
    res = _run("submit", str(tiny_llama), "hf://datasets/acme/mine/gsm8k.jsonl", "--dry-run")
    assert res.exit_code == 0 and "Data: 30 items of hf://datasets/acme/mine/gsm8k.jsonl" in res.output, res.output
    # or by its address on huggingface.co
    res = _run("submit", str(tiny_llama), "https://huggingface.co/datasets/acme/mine/blob/main/gsm8k.jsonl", "--dry-run")
    assert res.exit_code == 0 and "Data: 30 items of hf://datasets/acme/mine@main/gsm8k.jsonl" in res.output, res.output


def test_a_hub_dataset_file_is_downloaded_and_its_errors_say_what_to_fix(fake_hub, tiny_llama, tmp_path):
    """A task dataset and a calibration file named hf://datasets/..., downloaded by the real client
    from a Hub (the fake one) at submit; a missing file, revision or dataset is a one-line error that
    names it, and nothing is submitted."""
    from quantselect.service import SubmitRequest

    folder = tmp_path / "tasks"
    (folder / "data").mkdir(parents=True)
    lines = (EXAMPLES / "gsm8k-50.jsonl").read_text().splitlines()
    (folder / "data" / "gsm8k.jsonl").write_text("\n".join(lines[:30]) + "\n")
    (folder / "calibration.txt").write_text("\n".join(f"sample {i} of a calibration text" for i in range(16)))
    fake_hub.add("fake-org/tasks", folder, repo_type="dataset")
    spec = Service().build_spec(SubmitRequest(model=str(tiny_llama), dataset="hf://datasets/fake-org/tasks/data/gsm8k.jsonl",
                                              candidates=["int4-gptq"], calibration="hf://datasets/fake-org/tasks/calibration.txt",
                                              calibration_samples=8))
    assert (spec.dataset.source, len(spec.dataset), len(spec.calibration.texts)) == (
        "hf://datasets/fake-org/tasks/data/gsm8k.jsonl", 30, 8)
    assert "GET /datasets/fake-org/tasks/resolve/main/data/gsm8k.jsonl" in fake_hub.requests
    for name, error in (
            ("hf://datasets/fake-org/tasks/data/test.jsonl",
             "fake-org/tasks on the Hugging Face Hub has no file data/test.jsonl"),
            ("hf://datasets/fake-org/tasks@v2/data/gsm8k.jsonl",
             "the Hugging Face Hub has no revision 'v2' of fake-org/tasks"),
            ("hf://datasets/fake-org/other/data/gsm8k.jsonl",
             "not here, nor a dataset on the Hugging Face Hub (a private one needs `hf auth login` or HF_TOKEN)")):
        res = _run("submit", str(tiny_llama), name)
        assert res.exit_code == 2 and res.output == f"Error: {name}: {error}\n", res.output
    assert Service().list_jobs() == []
