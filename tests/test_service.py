"""The driver (service layer) end to end on a real local Ray and real SQLite."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from quantselect.domain.candidates import Candidate, Int4WeightOnly, resolve_candidates
from quantselect.domain.dataset import load_dataset
from quantselect.domain.results import JobSpec
from quantselect.service import Events, Service
from tests.fixtures.common import EXAMPLES
from tests.fixtures.hooks import Hook


def test_a_failing_candidate_is_marked_failed_and_the_job_completes(ray_cluster, tiny_llama, monkeypatch):
    """A real failure: int4 with group size 256 cannot quantize a model whose hidden size is 128.
    Progress is handed over even while nothing changes (here at every poll), so that the CLI can
    say that a long quantization still runs; each running candidate's phase is in the database,
    which `status` shows of a job that runs elsewhere."""
    from quantselect.cli import _status_lines
    from quantselect.orchestration import sweep

    monkeypatch.setattr(sweep, "PROGRESS_EVERY", 0.0)
    svc = Service()
    candidates = resolve_candidates(["int8"]) + [Candidate("int4", Int4WeightOnly(group_size=256))]
    spec = JobSpec(model=str(tiny_llama), model_path=str(tiny_llama),
                   dataset=load_dataset(EXAMPLES / "piqa-300.jsonl", limit=6), candidates=candidates)
    job = svc.repo.create_job(spec)
    seen: list[str] = []
    snapshots: list[dict] = []
    shown: set[str] = set()

    def progress(snapshot: dict) -> None:
        snapshots.append(snapshot)
        shown.update(line for key, line in _status_lines(svc, svc.get_job(job.id)).items() if key != "job")

    done = svc.run_job(job.id, Events(on_outcome=lambda r: seen.append(r.name), on_progress=progress))
    assert done.status == "succeeded"
    assert sorted(seen) == ["baseline", "int4", "int8"]
    assert any(a == b for a, b in zip(snapshots, snapshots[1:]))  # unchanged, handed over all the same
    # (what a poll catches depends on timing: measuring takes seconds, 6 items of a tiny model not)
    doing = [line.split(": ", 1)[1] for line in shown if " running: " in line]
    assert any(d.startswith("measuring ") for d in doing), sorted(shown)
    assert all(re.match(r"(waiting for a GPU|quantizing( \d+/\d+ layers)?|evaluating \d+/6 items|measuring "
                        r"(prefill|decode at batch (1|16)) \([123]/3\))( \(|$)", d) for d in doing), doing
    assert {r.phase for r in svc.results(job.id)} == {None}  # once they end
    results = {r.name: r for r in svc.results(job.id)}
    assert results["int4"].status == "failed" and "group size 256 does not divide" in results["int4"].error
    assert results["int8"].status == "succeeded" and results["baseline"].status == "succeeded"
    assert svc.item_results(job.id)["int4"] == []
    assert len(svc.item_results(job.id)["int8"]) == 6
    rec = svc.recommend(job.id, 0.01)
    assert rec.chosen in ("baseline", "int8") and "failed" in rec.verdict("int4").reason


def _broken_model(tiny_llama: Path, tmp_path: Path) -> Path:
    """A folder every submit-time check passes (config, tokenizer, a readable safetensors header) whose
    weights transformers then refuses to load: one tensor has the wrong shape."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    model = Path(shutil.copytree(tiny_llama, tmp_path / "broken"))
    weights = load_file(str(model / "model.safetensors"))
    weights["model.embed_tokens.weight"] = torch.zeros(3, 3)
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    return model


def test_a_failed_baseline_fails_the_job_with_the_reason(ray_cluster, tiny_llama, tmp_path):
    """A model folder whose weights cannot be loaded: every candidate fails, the job says why."""
    model = _broken_model(tiny_llama, tmp_path)
    svc = Service()
    spec = JobSpec(model=str(model), model_path=str(model),
                   dataset=load_dataset(EXAMPLES / "piqa-300.jsonl", limit=2), candidates=resolve_candidates([]))
    job = svc.repo.create_job(spec)
    try:
        svc.run_job(job.id)
    except Exception as e:
        assert "baseline failed" in str(e)
    stored = svc.get_job(job.id)
    assert stored.status == "failed" and "baseline failed" in stored.error


def test_early_stopping_cuts_a_broken_candidate_short_and_keeps_every_item_it_saw(ray_cluster, demo_model_dir):
    """The real SmolLM2 on an easy task it mostly gets right (~0.9): 2-bit weights break it (~0.2).
    The baseline runs first; int2 is evaluated in chunks of 32 and stops once the anytime-valid test
    settles "fail"."""
    svc = Service()
    spec = JobSpec(model="demo", model_path="demo", dataset=load_dataset(EXAMPLES / "sequences-1000.jsonl", limit=128),
                   candidates=resolve_candidates(["int2"]), early_stop=True)
    job = svc.repo.create_job(spec)
    svc.run_job(job.id)
    results = {r.name: r for r in svc.results(job.id)}
    base, broken = results["baseline"], results["int2"]
    assert base.n_items == 128 and broken.status == "succeeded"
    assert broken.early_stop["decision"] == "fail" and broken.early_stop["stopped_early"]
    assert broken.n_items < 128 and broken.n_items % 32 == 0  # whole chunks
    items = svc.item_results(job.id)
    assert len(items["baseline"]) == 128 and len(items["int2"]) == broken.n_items
    assert len({i.index for i in items["int2"]}) == broken.n_items  # each item once, by its dataset index
    rec = svc.recommend(job.id)
    v = rec.verdict("int2")
    assert rec.chosen == "baseline" and v.stopped_early and v.verdict == "fail" and v.n_items == broken.n_items


def test_label_free_prompts_only_with_early_stopping(ray_cluster, tiny_llama):
    """Prompts without labels: the baseline's continuations and top-k distributions are the
    reference; candidates are scored against them, in shuffled chunks with early stopping on."""
    from quantselect.service import SubmitRequest

    svc = Service()
    job = svc.submit(SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "gsm8k-prompts-50.jsonl"), limit=40,
                                   candidates=["int8", "int2"], max_new_tokens=8, early_stop=True, threshold=0.9))
    assert job.metric == "top1_agreement" and job.dataset_kind == "prompts"
    svc.run_job(job.id)
    results = {r.name: r for r in svc.results(job.id)}
    assert all(r.status == "succeeded" for r in results.values()), results
    items = svc.item_results(job.id)
    assert len(items["baseline"]) == 40 and all(i.score == 1.0 for i in items["baseline"])
    assert all(0 <= i.score <= 1 and "mean_kl" in i.prediction for i in items["int8"])
    assert results["int8"].score > results["int2"].score  # 2-bit weights agree less with the baseline
    assert sorted(i.index for i in items["int2"]) == sorted({i.index for i in items["int2"]})
    rec = svc.recommend(job.id)
    assert rec.verdict("int8").relative_score == pytest.approx(results["int8"].score)  # the baseline scores 1 on every item
    rows = {r["name"]: r for r in svc.results_table(job.id)[1]}  # of the prompts and the baseline's continuations
    assert all(rows[n]["perplexity"] > 1 for n in ("baseline", "int8", "int2")) and rec.verdict("int8").perplexity


def test_a_text_corpus_job_scores_each_candidate_on_the_texts_themselves(ray_cluster, tiny_llama, tmp_path):
    """{"text"} items, the way a corpus of documents comes: no generation, the baseline's
    distributions over the texts, and each candidate's perplexity of them."""
    import json

    from quantselect.render import results_table
    from quantselect.service import SubmitRequest

    corpus = tmp_path / "docs.jsonl"
    goals = [json.loads(line)["prompt"] for line in (EXAMPLES / "piqa-300.jsonl").read_text().splitlines()[:24]]
    corpus.write_text("".join(json.dumps({"text": g}) + "\n" for g in goals))
    svc = Service()
    job = svc.submit(SubmitRequest(model=str(tiny_llama), dataset=str(corpus), candidates=["int8", "int2"],
                                   metric="kl_similarity"))
    assert (job.dataset_kind, job.metric, svc.repo.get_job_spec(job.id).dataset.max_new_tokens) == ("prompts", "kl_similarity", 0)
    svc.run_job(job.id)
    _, rows, rec = svc.results_table(job.id)
    rows = {r["name"]: r for r in rows}
    assert all(r["status"] == "succeeded" for r in rows.values()), rows
    assert rows["baseline"]["score"] == 1.0 and 0 < rows["int2"]["score"] < rows["int8"]["score"] < 1
    # each one's perplexity of the texts (on the real SmolLM2, against transformers' loss: test_labelfree)
    assert all(r["perplexity"] > 1 for r in rows.values()) and rows["int2"]["perplexity"] != rows["baseline"]["perplexity"]
    assert " ppl " in results_table(list(rows.values())).splitlines()[0]


def test_a_label_free_baseline_is_reused_with_its_stored_reference_outputs(ray_cluster, tiny_llama):
    """The baseline's reference outputs (label-free metrics) are kept by its cache key: a later job of
    the same model and items reuses the baseline instead of running it again, and scores its new
    candidates against them. Without the file the baseline runs again."""
    from quantselect.service import SubmitRequest
    from quantselect.settings import get_settings

    svc = Service()
    req = dict(model=str(tiny_llama), dataset=str(EXAMPLES / "gsm8k-prompts-50.jsonl"), limit=12, max_new_tokens=8)
    first = svc.submit(SubmitRequest(candidates=["int8"], **req))
    svc.run_job(first.id)
    stored = list((get_settings().artifacts_dir / "references").glob("*.npz"))
    assert len(stored) == 1

    second = svc.submit(SubmitRequest(candidates=["int8", "int4"], **req))
    svc.run_job(second.id)
    results = {r.name: r for r in svc.results(second.id)}
    assert results["baseline"].reused_from == first.id and results["int8"].reused_from == first.id
    assert results["int4"].status == "succeeded" and results["int4"].reused_from is None
    items = svc.item_results(second.id)
    assert len(items["int4"]) == 12 and all(0 <= i.score <= 1 and "mean_kl" in i.prediction for i in items["int4"])

    stored[0].unlink()
    third = svc.submit(SubmitRequest(candidates=["int8", "int2"], **req))
    svc.run_job(third.id)
    results = {r.name: r for r in svc.results(third.id)}
    assert results["baseline"].reused_from is None and results["baseline"].status == "succeeded"
    assert results["int2"].status == "succeeded" and stored[0].is_file()  # computed again, and kept


def test_sample_takes_a_seeded_random_subset_in_file_order(tiny_llama):
    """A dataset sorted by category is not cut to its first category, as --limit would cut it."""
    from quantselect.errors import InputError
    from quantselect.service import SubmitRequest

    svc = Service()
    items = [{"prompt": f"q{i}", "reference": "a", "category": "easy" if i < 50 else "hard"} for i in range(100)]
    spec = svc.build_spec(SubmitRequest(model=str(tiny_llama), items=items, sample=30, candidates=["int8"]))
    picked = [int(it.prompt[1:]) for it in spec.dataset.items]
    assert len(picked) == 30 and picked == sorted(picked) and {it.category for it in spec.dataset.items} == {"easy", "hard"}
    again = svc.build_spec(SubmitRequest(model=str(tiny_llama), items=items, sample=30, candidates=["int8"]))
    assert again.dataset.items == spec.dataset.items  # the same items every time: results stay comparable
    assert len(svc.build_spec(SubmitRequest(model=str(tiny_llama), items=items, sample=500)).dataset) == 100
    from_file = svc.build_spec(SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), sample=40))
    assert len(from_file.dataset) == 40 and from_file.dataset.items != load_dataset(EXAMPLES / "piqa-300.jsonl", limit=40).items
    with pytest.raises(InputError, match="give --limit or --sample, not both"):
        svc.build_spec(SubmitRequest(model=str(tiny_llama), items=items, sample=30, limit=30))


def test_a_driver_sent_to_a_cluster_gets_the_settings_but_not_the_secrets_it_does_not_need():
    """`submit --address`: the driver's variables travel through the Ray Jobs API, shown to whoever
    reaches the dashboard. It gets the database and the quantselect settings; never the REST API's
    token, and the deployments' key only when the job deploys."""
    from quantselect.service import driver_env

    here = {"QUANTSELECT_API_TOKEN": "t" * 20, "QUANTSELECT_SERVE_API_KEY": "k" * 20, "QUANTSELECT_GPU_MEMORY": "80GiB",
            "QUANTSELECT_RAY_ADDRESS": "head:6379", "QUANTSELECT_DB_URL": "sqlite:///here.db", "HOME": "/root"}
    sent = {"QUANTSELECT_GPU_MEMORY": "80GiB", "QUANTSELECT_DB_URL": "postgresql://db/qs"}
    assert driver_env(here, "postgresql://db/qs", deploy=False) == sent
    assert driver_env(here, "postgresql://db/qs", deploy=True) == {**sent, "QUANTSELECT_SERVE_API_KEY": "k" * 20}
    # folders as this process resolved them: a relative one would name another folder on the cluster
    rel = {**here, "QUANTSELECT_ARTIFACTS_DIR": "shared/artifacts"}
    folders = {"QUANTSELECT_HOME": Path("/home/me/.quantselect"), "QUANTSELECT_ARTIFACTS_DIR": Path("/work/shared/artifacts")}
    assert driver_env(rel, "postgresql://db/qs", deploy=False, folders=folders) == {
        **sent, "QUANTSELECT_ARTIFACTS_DIR": "/work/shared/artifacts"}  # (HOME unset here: not sent)


def test_names_that_are_neither_here_nor_valid_hub_ids_are_input_errors(tmp_path):
    """A typo shaped like a Hub id that the Hub client refuses, and a REST path of a user that does not
    exist: one-line input errors (a 500 / "internal error" before)."""
    from quantselect.engines.models import from_hub
    from quantselect.errors import ForbiddenError, InputError
    from quantselect.service import only_under

    with pytest.raises(InputError, match=r"^runs/llama--ft: not a folder or file here, nor a valid Hugging Face Hub id"):
        from_hub("runs/llama--ft")
    with pytest.raises(ForbiddenError):
        only_under((tmp_path,), {"dataset": "~nosuchuser-quantselect/x.jsonl"})
    # longer than any path here: refused before realpath, whose time grows with the square of its segments
    # (a 5 MB name of "/m" segments kept a CPU busy for minutes)
    with pytest.raises(InputError, match=r"^dataset .*\(5000\d+ characters\): cannot read it \(File name too long\)$"):
        only_under((tmp_path,), {"dataset": str(tmp_path) + "/m" * 2_500_000})


def test_an_export_keeps_the_additional_chat_templates(tmp_path):
    """transformers saves every chat template but the default under additional_chat_templates/ (a tool-use
    one): the exported tokenizer is the one that was saved."""
    from quantselect.engines.artifacts import export_folder

    src = tmp_path / "src"
    (src / "additional_chat_templates").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    (src / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    export_folder(src, tmp_path / "out", {"README.md": "card"})
    assert (tmp_path / "out" / "additional_chat_templates" / "tool_use.jinja").read_text() == "{{ tools }}"


def test_a_webhook_is_posted_to_its_own_host_only(tmp_path, monkeypatch, caplog):
    """A job's webhook (`--notify`, REST `notify`) is a URL a client chose, which the server then
    posts to: not a way into the server's own network. A redirect is not followed, a host whose
    name resolves to a link-local address (a cloud's metadata service: 169.254.169.254 hands out
    credentials) gets nothing, and QUANTSELECT_NOTIFY_HOSTS narrows the hosts allowed, checked at
    submit and again when the job ends (it may have been queued before)."""
    import socket

    from quantselect.domain.results import validate_notify
    from quantselect.errors import ForbiddenError, InputError
    from quantselect.service import post_json
    from quantselect.settings import get_settings

    hook = Hook()
    elsewhere = Hook([302], location=hook.url)
    real = socket.getaddrinfo

    def dns(host, *args, **kwargs):  # names as a DNS server could answer them
        return real({"metadata.example": "169.254.169.254", "hooks.example": "127.0.0.1"}.get(host, host), *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", dns)
    try:
        assert post_json(f"http://hooks.example:{hook.port}/h", {"n": 1}, "one") and hook.posted == [{"n": 1}]
        assert not post_json(elsewhere.url, {"n": 2}, "two", attempts=1)
        assert (elsewhere.requests, hook.requests) == (1, 1)  # the redirect was not followed
        # the URL is a secret (a Slack or Teams hook's path is its token): logged without it
        assert f"could not post two to http://127.0.0.1:{elsewhere.port}/…: 302 Found (a redirect, not followed)" in caplog.text
        assert elsewhere.url not in caplog.text
        assert not post_json(f"http://metadata.example:{hook.port}/h", {"n": 3}, "three", attempts=1)
        assert hook.requests == 1 and ("metadata.example resolves to 169.254.169.254, a link-local or cloud metadata "
                                       "address, which is never a webhook: not posted") in caplog.text
        # through a proxy, which would connect for us: the name as it resolves here
        proxy = Hook()
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.setenv("no_proxy", "")
        assert not post_json(f"http://metadata.example:{hook.port}/h", {"n": 4}, "four", attempts=1)
        assert post_json(f"http://hooks.example:{hook.port}/h", {"n": 5}, "five", attempts=1)
        assert proxy.posted == [{"n": 5}] and hook.requests == 1  # the proxy took it, and it alone
        proxy.close()
        monkeypatch.delenv("http_proxy")
        for url in ("http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/", "http://[::ffff:169.254.169.254]/",
                    "http://[fd00:ec2::254]/", "http://100.100.100.200/", "http://[64:ff9b::a9fe:a9fe]/",
                    "http://[2002:a9fe:a9fe::]/"):
            with pytest.raises(ForbiddenError, match="is a link-local or cloud metadata address, never a webhook"):
                validate_notify(url)
        # %-escapes, which urllib decodes after these checks (a proxy would be asked for 169.254.169.254)
        for url in ("https://169%2E254%2E169%2E254/latest", "http://169.254.169.%32%35%34/"):
            with pytest.raises(InputError, match=r"^notify '[^']+': write its host without %-escapes$"):
                validate_notify(url)
        for url in ("http://10.0.0.7/h", "http://[::1]:8080/h", "https://hooks.slack.com/services/T/B/X"):
            assert validate_notify(url) == url
        hosts = get_settings({"QUANTSELECT_NOTIFY_HOSTS": " hooks.slack.com, *.Example.com ,10.0.0.7"}).notify_hosts
        assert hosts == ("hooks.slack.com", "*.example.com", "10.0.0.7")
        for url in ("https://hooks.slack.com/services/T/B/X", "https://chat.example.com/h", "https://a.b.example.com/h",
                    "http://10.0.0.7:8065/hooks/x"):
            assert validate_notify(url, hosts) == url
        for url in ("https://example.com/h", "https://evilexample.com/h", "https://hooks.slack.com.evil.io/",
                    "http://127.0.0.1:8265/api/jobs/", "http://10.0.0.8/"):
            with pytest.raises(ForbiddenError, match=r"is not a host this server posts to \(QUANTSELECT_NOTIFY_HOSTS: "
                                                     r"hooks.slack.com, \*.example.com, 10.0.0.7\)"):
                validate_notify(url, hosts)
        for raw in ("https://hooks.slack.com/x", "hooks.slack.com:443", "a.b,,*.", "*"):
            with pytest.raises(InputError, match=r"QUANTSELECT_NOTIFY_HOSTS=.*: give host names .* without scheme, port or path"):
                get_settings({"QUANTSELECT_NOTIFY_HOSTS": raw})
        assert get_settings({"QUANTSELECT_NOTIFY_HOSTS": "[fd00::7], 10.1.2.3"}).notify_hosts == ("fd00::7", "10.1.2.3")
        svc = Service()
        spec = JobSpec(model="demo", model_path="demo", dataset=load_dataset(EXAMPLES / "piqa-300.jsonl", limit=2),
                       candidates=resolve_candidates([]), notify=hook.url)
        job = svc.repo.create_job(spec)  # queued while any host was allowed
        svc.repo.finish_job(job.id, "failed", error="it broke")
        monkeypatch.setenv("QUANTSELECT_NOTIFY_HOSTS", "hooks.slack.com")
        Service()._announce_end(job.id)  # the driver's settings, as it ends the job
        assert hook.requests == 1
        assert (f"job {job.id}: its end was not announced: notify 'http://127.0.0.1:{hook.port}/…': 127.0.0.1 is not "
                "a host this server posts to") in caplog.text and hook.url not in caplog.text
    finally:
        hook.close()
        elsewhere.close()


def test_a_webhook_on_a_host_not_allowed_is_refused_at_submit(tiny_llama, monkeypatch):
    from click.testing import CliRunner

    from quantselect.cli import cli

    monkeypatch.setenv("QUANTSELECT_NOTIFY_HOSTS", "hooks.slack.com")
    res = CliRunner().invoke(cli, ["submit", str(tiny_llama), str(EXAMPLES / "piqa-300.jsonl"), "--notify",
                                   "http://localhost:6379/"])
    assert res.exit_code == 2 and res.output == (
        "Error: notify 'http://localhost:6379/': localhost is not a host this server posts to "
        "(QUANTSELECT_NOTIFY_HOSTS: hooks.slack.com); use a hook on one of them\n")
    assert Service().list_jobs() == []


def test_a_job_posts_its_end_to_its_webhook(ray_cluster, tiny_llama, tmp_path, caplog):
    """`submit --notify URL`: once the job ends, its driver posts one line (as Slack, Mattermost and
    Teams show a webhook's `text`) and the job as the REST API gives it, retrying a hook that fails
    (503 here, once). A failed job says why; a hook that never answers is logged and fails nothing."""
    from click.testing import CliRunner

    from quantselect.cli import cli

    hook = Hook([503])
    try:
        res = CliRunner().invoke(cli, ["submit", str(tiny_llama), str(EXAMPLES / "piqa-300.jsonl"), "--limit", "6",
                                       "--candidates", "int8", "--threshold", "0.5", "--notify", hook.url])
        assert res.exit_code == 0, res.output
        job = Service().list_jobs()[0]
        assert len(hook.posted) == 2 and hook.posted[0] == hook.posted[1]  # the 503, then the retry
        posted = hook.posted[-1]
        assert posted["job"]["id"] == job.id and posted["job"]["status"] == "succeeded" and posted["job"]["notify"] == f"http://127.0.0.1:{hook.port}/…"
        rec = job.recommended
        assert posted["text"] == (f"quantselect job {job.id} ({tiny_llama} on {EXAMPLES / 'piqa-300.jsonl'}) succeeded: "
                                  f"{rec['candidate']} recommended, {rec['relative_score']:.1%} of the baseline's quality, "
                                  f"${rec['cost_per_1m_tokens_usd']:.4g} per 1M tokens")
        model = _broken_model(tiny_llama, tmp_path)
        svc = Service()
        spec = JobSpec(model=str(model), model_path=str(model), dataset=load_dataset(EXAMPLES / "piqa-300.jsonl", limit=2),
                       candidates=resolve_candidates([]), notify=hook.url)
        failed = svc.repo.create_job(spec)
        with pytest.raises(Exception, match="baseline failed"):
            svc.run_job(failed.id)
        assert hook.posted[-1]["text"].startswith(f"quantselect job {failed.id} ({model} on {EXAMPLES / 'piqa-300.jsonl'}) "
                                                  "failed: the baseline failed, nothing to compare with: ")
    finally:
        hook.close()
    gone = svc.repo.create_job(replace(spec, model=str(tiny_llama), model_path=str(tiny_llama),
                                       candidates=resolve_candidates(["int8"])))
    assert svc.run_job(gone.id).status == "succeeded"  # its hook no longer answers: logged, nothing else
    assert f"could not post job {gone.id}'s end to http://127.0.0.1:{hook.port}/…" in caplog.text
    assert hook.url not in caplog.text  # its path is the hook's token
    res = CliRunner().invoke(cli, ["submit", str(tiny_llama), str(EXAMPLES / "piqa-300.jsonl"), "--notify", "slack"])
    assert res.exit_code == 2 and res.output == ("Error: notify 'slack': give an http(s) URL to post the job's end to, "
                                                 "such as https://hooks.slack.com/services/T000/B000/XXXX\n")
