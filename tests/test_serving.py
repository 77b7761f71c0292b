"""Serving: real local Ray + Serve, real quantized models, the official openai client. No mocks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from quantselect.domain.candidates import CATALOG
from quantselect.errors import ConflictError, InputError, NotFoundError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_url(serve_port, tiny_llama):
    from quantselect.serving.deploy import deploy, undeploy

    url = deploy("tiny-int8", str(tiny_llama), CATALOG["int8"].to_dict(), port=serve_port)
    yield url
    undeploy("tiny-int8")


@pytest.fixture(scope="module")
def smol_url(serve_port, demo_model_dir):
    from quantselect.serving.deploy import deploy, undeploy

    url = deploy("smollm2-int4", str(demo_model_dir), CATALOG["int4"].to_dict(), port=serve_port)
    yield url
    undeploy("smollm2-int4")


def _client(url: str, api_key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=120)


def test_deploy_returns_openai_base_url(tiny_url, serve_port):
    from quantselect.serving.deploy import list_deployments

    assert tiny_url == f"http://127.0.0.1:{serve_port}/models/tiny-int8/v1"
    assert "tiny-int8" in list_deployments()
    health = httpx.get(tiny_url.removesuffix("/v1") + "/healthz").json()
    assert health["status"] == "ok" and health["model"] == "tiny-int8" and "torchao" in health["engine"]
    assert health["threads"] == len(os.sched_getaffinity(0))  # all cores, not the one thread Ray gives the actor
    models = _client(tiny_url).models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [("tiny-int8", "model", "quantselect")]
    assert _client(tiny_url).models.retrieve("tiny-int8").id == "tiny-int8"


def test_completions_tiny_int8(tiny_url):
    client = _client(tiny_url)
    r = client.completions.create(model="tiny-int8", prompt="Once upon a time", max_tokens=8, temperature=0)
    (choice,) = r.choices
    assert r.object == "text_completion" and r.model == "tiny-int8"
    assert choice.text.strip() and choice.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 8 and r.usage.prompt_tokens >= 4
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # greedy streaming gives the same text, chunk by chunk, then [DONE] (the client stops on it)
    chunks = list(client.completions.create(model="tiny-int8", prompt="Once upon a time", max_tokens=8,
                                            temperature=0, stream=True))
    assert len(chunks) >= 2 and "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    # several prompts, sampling
    r = client.completions.create(model="tiny-int8", prompt=["a", "b c"], max_tokens=4, temperature=0.8,
                                  top_p=0.9, seed=1)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens <= 8


def test_chat_tiny_int8_sampling(tiny_url):
    client = _client(tiny_url)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model="tiny-int8", messages=msgs, max_tokens=6, temperature=1.0, top_p=0.9)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content and 1 <= r.usage.completion_tokens <= 6


def test_chat_smollm2_int4_answers(smol_url):
    client = _client(smol_url)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="smollm2-int4", messages=msgs, max_tokens=12, temperature=0)
    answer = r.choices[0].message.content
    assert "Paris" in answer, answer
    stream = client.chat.completions.create(model="smollm2-int4", messages=msgs, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


def test_concurrent_requests_are_decoded_together(smol_url):
    """Requests that arrive while others decode join their batch (``healthz`` reports the most rows
    decoded together), and each gets the greedy answer it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    client = _client(smol_url)
    questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?",
                 "Say hello in Spanish.", "What do bees make?", "Which planet is the largest?"]

    def ask(q: str) -> tuple[str, int, str]:
        r = client.chat.completions.create(model="smollm2-int4", messages=[{"role": "user", "content": q}],
                                           max_tokens=20, temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason

    alone = [ask(q) for q in questions]
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(ask, questions))
    assert together == alone
    health = httpx.get(smol_url.removesuffix("/v1") + "/healthz", timeout=30).json()
    assert health["decoding"] == "dynamic KV cache, batches of up to 16"
    assert health["batch"]["peak_rows"] >= 2, health
    # a streamed answer abandoned half-way (minutes of tokens left) leaves the batch within seconds
    with httpx.stream("POST", smol_url + "/completions", timeout=60,
                      json={"prompt": "Count: 1, 2, 3,", "max_tokens": 4000, "temperature": 0, "stream": True}) as r:
        next(r.iter_lines())
        assert httpx.get(smol_url.removesuffix("/v1") + "/healthz", timeout=30).json()["batch"]["rows"] == 1
    _batch_empties(smol_url, "the abandoned answer is still decoding")
    # so does an answer not streamed whose client gave up waiting (here a 2 s timeout)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(smol_url + "/completions", timeout=httpx.Timeout(60, read=2),
                   json={"prompt": "Count: 1, 2, 3,", "max_tokens": 4000, "temperature": 0})
    _batch_empties(smol_url, "the answer its client gave up on is still decoding")
    assert ask(questions[0]) == alone[0]


def _batch_empties(url: str, otherwise: str) -> None:
    for _ in range(100):
        if httpx.get(url.removesuffix("/v1") + "/healthz", timeout=30).json()["batch"]["rows"] == 0:
            return
        time.sleep(0.2)
    raise AssertionError(otherwise)


def test_stop_sequences_truncate(smol_url):
    client = _client(smol_url)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    full = client.chat.completions.create(model="smollm2-int4", messages=msgs, max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    cut = text.index("Paris")
    r = client.chat.completions.create(model="smollm2-int4", messages=msgs, max_tokens=12, temperature=0,
                                       stop=["Paris", "zzz"])
    assert r.choices[0].message.content == text[:cut] and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="smollm2-int4", messages=msgs, max_tokens=12,
                                                 temperature=0, stop="Paris", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text[:cut]


STREAM_TEXT = "Déjà vu — 東京で会いましょう 🚀🚀 naïve café\n    def f(x):\treturn x ** 2  # ok"


def _sentencepiece_like():
    """A Metaspace tokenizer (the Llama 2 / Mistral / Gemma kind, which drops the space of a
    sequence's first word), trained here on a few lines."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator([STREAM_TEXT, "the quick brown fox jumps over the lazy dog"] * 3, vocab_size=120,
                           special_tokens=["<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=sp._tokenizer, eos_token="<eos>")


def _streamed(tok, ids, stop=None, max_tokens=None):
    from quantselect.serving.app import CompletionRequest, _Sequence

    seq = _Sequence(tok, {tok.eos_token_id}, [], CompletionRequest(prompt="x", stop=stop), max_tokens or 10_000, "cpu")
    for t in ids:
        if seq.push(t):
            break
    items = list(seq.results())  # (it ends: the last item has a reason)
    assert all("\ufffd" not in delta for delta, reason, _ in items if reason is None)  # no half characters
    return "".join(delta for delta, _, _ in items), items[-1][1]


@pytest.mark.parametrize("kind", ["smollm2", "sentencepiece"])
def test_streamed_text_is_the_whole_decode(kind, demo_model_dir):
    """Detokenized a window at a time, the streamed deltas add up to the whole decode: characters
    split over tokens (bytes of 東京 and 🚀), leading spaces, stop strings that span tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_model_dir)) if kind == "smollm2" else _sentencepiece_like()
    ids = tok(STREAM_TEXT, add_special_tokens=False)["input_ids"]
    whole = tok.decode(ids, skip_special_tokens=True)
    assert _streamed(tok, ids + [tok.eos_token_id]) == (whole, "stop")
    assert _streamed(tok, ids, max_tokens=len(ids)) == (whole, "length")
    for n in range(1, len(ids)):  # cut anywhere, even inside a character: what a whole decode gives
        assert _streamed(tok, ids[:n], max_tokens=n) == (tok.decode(ids[:n], skip_special_tokens=True), "length")
    for stop in ("東京", "🚀", "café\n ", "** 2"):
        assert _streamed(tok, ids, stop=[stop, "zzz"]) == (whole[:whole.index(stop)], "stop")


def test_errors_are_openai_shaped(tiny_url):
    client = _client(tiny_url)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-int8", prompt="Hi", max_tokens=-1)
    assert "max_tokens" in e.value.body["message"]
    r = httpx.post(tiny_url + "/chat/completions", json={"model": "tiny-int8"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(tiny_url + "/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(tiny_url + "/embeddings", json={"input": "Hi"})  # a route it does not have: OpenAI's shape too
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("Invalid URL (POST "), r.text
    # prompts the model cannot take: a 400 before anything is generated (streamed or not); the rest
    # of the context bounds max_tokens
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny-int8", prompt="a " * 600, max_tokens=4, stream=stream)
        assert e.value.body["code"] == "context_length_exceeded" and "512 tokens" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny-int8", prompt=[[1, 2], [1, 10**9]], max_tokens=4, stream=stream)
        assert e.value.body["code"] == "invalid_prompt" and "Token id 1000000000 is not in" in e.value.body["message"]
    r = client.completions.create(model="tiny-int8", prompt="a " * 505, max_tokens=100, temperature=0)
    assert r.usage.prompt_tokens == 506 and r.usage.completion_tokens <= 6
    # what no sampling can take: one line each, a 400 (never a 500, nor the batch's other answers failing)
    for body, says in [({"seed": 2**64}, "seed: Input should be less than or equal to"),
                       ({"stop": ["x"] * 17}, "stop: Value error, give at most 16 stop strings"),
                       ({"prompt": ["a"] * 65}, "prompt: Value error, 65 prompts: give at most 64 in one request"),
                       ({"echo": True}, "echo: this server does not echo the prompt; leave it out")]:
        r = httpx.post(tiny_url + "/completions", json={"model": "tiny-int8", "prompt": "Hi", **body}, timeout=60)
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
    r = httpx.post(tiny_url + "/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]})
    assert r.status_code == 400 and "a text part needs its text as a string" in r.json()["error"]["message"], r.text
    # what OpenAI takes: null for a default, a temperature too low to divide by (greedy), an empty stop
    greedy = client.completions.create(model="tiny-int8", prompt="Once upon a time", max_tokens=8, temperature=0)
    r = httpx.post(tiny_url + "/completions", timeout=60, json={
        "prompt": "Once upon a time", "max_tokens": 8, "temperature": 1e-40, "top_p": None, "stop": "", "n": None})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy.choices[0].text, r.text
    # a chat answer is not cut at 16 tokens (the legacy completions default): it runs to its end or the context
    msgs = [{"role": "user", "content": "Tell me a long story."}]
    r = client.chat.completions.create(model="tiny-int8", messages=msgs, temperature=0, max_tokens=None)
    assert r.usage.completion_tokens > 16 and (r.choices[0].finish_reason == "stop"
                                               or r.usage.prompt_tokens + r.usage.completion_tokens == 512), r.usage


def test_a_deployment_with_an_api_key_answers_only_clients_that_send_it(tiny_llama, serve_port, monkeypatch, capsys):
    """QUANTSELECT_SERVE_API_KEY: the /v1 routes answer 401, in OpenAI's shape, to a client without
    the key or with another (the openai client raises AuthenticationError), and serve one with it;
    /healthz stays open for probes and for deploy's own wait. The printed curl line sends it."""
    from quantselect.cli import _print_deployment
    from quantselect.serving.deploy import deploy, undeploy

    key = "sk-local-0123456789abcdef"
    url = deploy("keyed", str(tiny_llama), CATALOG["baseline"].to_dict(), port=serve_port, api_key=key)
    try:
        assert httpx.get(url.removesuffix("/v1") + "/healthz").json()["status"] == "ok"
        r = httpx.get(url + "/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.json()["error"]["message"].startswith("No API key provided")
        for body in ({"prompt": ""}, b"{not json"):  # the key is asked for before the body is read
            r = httpx.post(url + "/completions", **({"json": body} if isinstance(body, dict) else {"content": body}))
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        r = httpx.post(url + "/completions", json={"prompt": "Hi", "max_tokens": 0}, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request", r.text
        for wrong in ("x", key[:-1]):
            with pytest.raises(openai.AuthenticationError) as e:
                _client(url, wrong).completions.create(model="keyed", prompt="Hi", max_tokens=2)
            assert e.value.body["message"].startswith("Incorrect API key provided")
        with pytest.raises(openai.AuthenticationError):
            _client(url, "x").chat.completions.create(model="keyed", messages=[{"role": "user", "content": "Hi"}])
        answer = _client(url, key).completions.create(model="keyed", prompt="Hi", max_tokens=2, temperature=0)
        assert answer.usage.completion_tokens >= 1
        assert [m.id for m in _client(url, key).models.list().data] == ["keyed"]
        assert httpx.get(url.removesuffix("/v1") + "/healthz").json()["api_key"] is True
        # Deployed again from a shell without the key, it would be served open: refused, saying so.
        with pytest.raises(ConflictError, match="deployment 'keyed' asks its clients for an API key, and this process "
                                                "has no QUANTSELECT_SERVE_API_KEY"):
            deploy("keyed", str(tiny_llama), CATALOG["baseline"].to_dict(), port=serve_port)
        assert _client(url, key).models.list().data[0].id == "keyed"  # still served, with its key
    finally:
        undeploy("keyed")
    monkeypatch.setenv("QUANTSELECT_SERVE_API_KEY", key)
    _print_deployment(url, "baseline")
    assert "-H 'Content-Type: application/json' -H \"Authorization: Bearer $QUANTSELECT_SERVE_API_KEY\" -d" in \
        capsys.readouterr().out


def test_deploy_validates_before_touching_ray(serve_port):
    from ray import serve

    from quantselect.serving.deploy import deploy, ensure_serve, undeploy

    def deployed() -> dict[str, set[str]]:
        return {app: set(status.deployments) for app, status in serve.status().applications.items()}

    ensure_serve("127.0.0.1", serve_port)  # a proxy on serve_port, whichever test ran before (for the conflict)
    before = deployed()
    for bad in ("", "Upper", "-x", "a_b", "a/b", "x" * 64):
        with pytest.raises(InputError):
            deploy(bad, "/nowhere", CATALOG["int8"].to_dict(), port=serve_port)
    with pytest.raises(InputError):
        deploy("ok", "/nowhere", {"_type": "int3", "_version": 1, "_data": {}}, port=serve_port)
    with pytest.raises(ConflictError):  # the proxy already listens on serve_port
        deploy("ok", "/nowhere", CATALOG["int8"].to_dict(), port=serve_port + 1)
    with pytest.raises(NotFoundError):
        undeploy("never-deployed")
    assert deployed() == before  # nothing deployed (nor removed) by the refused calls


def test_undeploy_removes_the_route(tiny_llama, serve_port):
    from quantselect.serving.deploy import deploy, list_deployments, undeploy

    url = deploy("short-lived", str(tiny_llama), CATALOG["baseline"].to_dict(), port=serve_port)
    assert "short-lived" in list_deployments()
    undeploy("short-lived")
    assert "short-lived" not in list_deployments()
    assert httpx.get(url + "/models").status_code == 404


def test_failed_replica_is_cleaned_up_with_its_reason(serve_port, tmp_path):
    from quantselect.errors import QuantselectError
    from quantselect.serving.deploy import deploy, list_deployments

    with pytest.raises(QuantselectError, match="deployment 'broken' failed: .*"):
        deploy("broken", str(tmp_path / "no-model"), CATALOG["int8"].to_dict(), port=serve_port)
    assert "broken" not in list_deployments()


def test_a_replica_the_cluster_cannot_place_fails_the_deployment(tiny_llama, serve_port):
    """Three GPUs on a cluster of two: serve.run would wait for ever (as a second candidate of a job on
    the one GPU the first holds); the deployment fails, saying what it needs, and nothing is left."""
    from quantselect.errors import QuantselectError
    from quantselect.serving.deploy import deploy, list_deployments

    with pytest.raises(QuantselectError, match=r"^deployment 'too-big' failed: the cluster could not place its "
                                               r"replica within 1 s \(it needs .*GPU.*3.*; free: .*\)$"):
        deploy("too-big", str(tiny_llama), CATALOG["int8"].to_dict(), port=serve_port, use_gpu=True, gpus=3,
               place_timeout_s=1)
    assert "too-big" not in list_deployments()


def test_a_candidate_its_job_ran_on_two_gpus_is_deployed_on_two(tiny_llama, serve_port, monkeypatch):
    """Service.deploy gives the replica as many GPUs as the candidate's job ran it on (a model too
    large for one). Here the two GPUs are Ray's logical ones and torch has no CUDA, so the replica
    starts on both and then refuses, saying how many it holds and what to install."""
    from quantselect.domain.candidates import resolve_candidates
    from quantselect.domain.dataset import load_dataset
    from quantselect.domain.results import CandidateResult, JobSpec
    from quantselect.errors import QuantselectError
    from quantselect.service import Service
    from quantselect.serving.deploy import list_deployments
    from tests.fixtures.common import EXAMPLES

    monkeypatch.setenv("QUANTSELECT_SERVE_PORT", str(serve_port))
    svc = Service()
    candidates = resolve_candidates(["int8"])
    job = svc.repo.create_job(JobSpec(model=str(tiny_llama), model_path=str(tiny_llama), candidates=candidates,
                                      dataset=load_dataset(EXAMPLES / "piqa-300.jsonl", limit=4)))
    for c in candidates:  # as a job on two GPUs of a CUDA node records them
        svc.repo.save_outcome(job.id, CandidateResult(name=c.name, config=c.config.to_dict(), status="succeeded", score=0.5,
                                                      n_items=4, device="cuda:0", gpu_ids=["0", "1"]))
    svc.repo.finish_job(job.id, "succeeded")
    with pytest.raises(QuantselectError, match=r"deployment 'int8-\w+' failed: .*this replica holds 2 GPU\(s\) \(Ray's "
                                               r"(0, 1|1, 0)\) but torch .* sees no CUDA device: install a CUDA build"):
        svc.deploy(job.id, "int8")
    assert not any(d.startswith("int8-") for d in list_deployments()) and svc.get_job(job.id).deployed_candidate is None


def test_every_candidate_name_makes_a_deployment_name():
    """A candidate with parameters, an fp8 KV cache or a label with '.', '_' or capitals is deployed
    under a name Serve takes (its own name was refused), and no two candidates share one."""
    from quantselect.service import _deployment_name
    from quantselect.serving.deploy import check_name

    names = ["int8", "int8:kv_cache=fp8", "int8-kv-cache-fp8", "int4-gptq:group_size=64", "int4-gptq:group_size=64:bits=3",
             "llama3.1-awq", "Llama3_1-AWQ", "Llama3.1-AWQ", ":", "x" * 53, "int4-gptq:bits=3:group_size=64:kv_cache=fp8"]
    made = [_deployment_name("4f1c2a9e", n) for n in names]
    assert all(check_name(m) for m in made) and len(set(made)) == len(made), made
    assert made[0] == "int8-4f1c2a"  # a name Serve takes is kept: deployments made before keep theirs
    assert _deployment_name("4f1c2a9e", "q4-") == "q4--4f1c2a" and _deployment_name("4f1c2a9e", "a--b") == "a--b-4f1c2a"


def test_a_candidate_with_an_fp8_kv_cache_is_deployed(tiny_llama, serve_port, monkeypatch):
    from quantselect.domain.candidates import resolve_candidates
    from quantselect.domain.dataset import load_dataset
    from quantselect.domain.results import CandidateResult, JobSpec
    from quantselect.service import Service
    from tests.fixtures.common import EXAMPLES

    monkeypatch.setenv("QUANTSELECT_SERVE_PORT", str(serve_port))
    svc = Service()
    candidates = resolve_candidates(["int8:kv_cache=fp8"])
    job = svc.repo.create_job(JobSpec(model=str(tiny_llama), model_path=str(tiny_llama), candidates=candidates,
                                      dataset=load_dataset(EXAMPLES / "piqa-300.jsonl", limit=4)))
    for c in candidates:
        svc.repo.save_outcome(job.id, CandidateResult(name=c.name, config=c.config.to_dict(), status="succeeded",
                                                      score=0.5, n_items=4, device="cpu"))
    svc.repo.finish_job(job.id, "succeeded")
    url = svc.deploy(job.id, "int8:kv_cache=fp8")
    try:
        model = url.split("/models/")[1].removesuffix("/v1")
        r = _client(url).completions.create(model=model, prompt="Once upon a time", max_tokens=4, temperature=0)
        assert r.choices[0].text and svc.get_job(job.id).deployed_candidate == "int8:kv_cache=fp8"
    finally:
        assert svc.undeploy(job.id) == model


def test_serve_config_file_builds_an_application():
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema
    from ray._common.utils import import_attr

    doc = yaml.safe_load((REPO / "cluster" / "serve-config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc)
    (app_cfg,) = schema.applications
    app = call_user_app_builder_with_args_if_necessary(import_attr(app_cfg.import_path), app_cfg.args)
    assert isinstance(app, Application)
    with pytest.raises(Exception):
        call_user_app_builder_with_args_if_necessary(import_attr(app_cfg.import_path), {**app_cfg.args, "typo": 1})
    # A candidate too large for one GPU (its job gave it several) is served on as many: the replica
    # asks Ray for them, and its layers are split over them (checked on a GPU machine).
    app = call_user_app_builder_with_args_if_necessary(import_attr(app_cfg.import_path),
                                                       {**app_cfg.args, "use_gpu": True, "gpus": 2})
    assert app._bound_deployment.ray_actor_options == {"num_cpus": 0, "num_gpus": 2}
    with pytest.raises(InputError, match="engine static: a model split over 2 GPUs decodes with the batch"):
        call_user_app_builder_with_args_if_necessary(import_attr(app_cfg.import_path),
                                                     {**app_cfg.args, "use_gpu": True, "gpus": 2, "engine": "static"})
    app = call_user_app_builder_with_args_if_necessary(import_attr(app_cfg.import_path), app_cfg.args)
    assert app._bound_deployment.ray_actor_options == {"num_cpus": 0}  # a CPU replica reserves nothing


def test_serving_imports_no_torch_and_no_db():
    code = ("import sys, quantselect.serving.deploy, quantselect.serving.app; "
            "bad = [m for m in ('torch', 'transformers', 'quantselect.db') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_the_static_cache_runs_in_one_thread_of_its_own():
    """Its warm-up and every request run in one long-lived thread: torch's CUDA graph trees are per
    thread, so the graphs captured at warm-up replay only there (a thread per request captured them
    again each time)."""
    import threading

    from quantselect.serving.app import _StaticWorker

    worker = _StaticWorker(None, threading.Lock())
    names = {worker.call(lambda: (threading.current_thread().name, threading.get_ident())) for _ in range(3)}
    assert len(names) == 1 and next(iter(names))[0] == "quantselect-static", names
    with pytest.raises(ZeroDivisionError):
        worker.call(lambda: 1 / 0)
    assert worker.call(lambda: threading.get_ident()) == next(iter(names))[1]  # the thread outlived the error


def test_the_static_cache_engine_answers_like_the_dynamic_one(tiny_url, tiny_llama, serve_port, tmp_path):
    """The engine a GPU replica uses by default (a static KV cache, one request at a time; compiled
    there), here eager on CPU: the same greedy text as the dynamic engine, streamed or not. A client
    that leaves a stream half-way frees it for the next request. (Its model's chat template refuses a
    system message, as Gemma's does: a 400 that says so.)"""
    from quantselect.serving.deploy import deploy, undeploy

    model = Path(shutil.copytree(tiny_llama, tmp_path / "tiny"))
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}assistant:")
    url = deploy("tiny-static", str(model), CATALOG["int8"].to_dict(), port=serve_port, engine="static")
    try:
        assert httpx.get(url.removesuffix("/v1") + "/healthz", timeout=30).json()["decoding"] == "static KV cache, one request at a time"
        static, dynamic = _client(url), _client(tiny_url)
        for prompt in ("Once upon a time", "The weather today", "a b c d e f"):
            a = static.completions.create(model="tiny-static", prompt=prompt, max_tokens=16, temperature=0)
            b = dynamic.completions.create(model="tiny-int8", prompt=prompt, max_tokens=16, temperature=0)
            assert a.choices[0].text == b.choices[0].text and a.usage == b.usage
        chunks = static.completions.create(model="tiny-static", prompt="Once upon a time", max_tokens=16,
                                           temperature=0, stream=True)
        first = dynamic.completions.create(model="tiny-int8", prompt="Once upon a time", max_tokens=16, temperature=0)
        assert "".join(c.choices[0].text for c in chunks) == first.choices[0].text
        with httpx.stream("POST", url + "/completions", timeout=60,
                          json={"prompt": "Count: 1, 2, 3,", "max_tokens": 400, "temperature": 0, "stream": True}) as r:
            next(r.iter_lines())  # then gone, the cache held: the next request waited for a garbage collection
        again = static.completions.create(model="tiny-static", prompt="Once upon a time", max_tokens=16, temperature=0)
        assert again.choices[0].text == first.choices[0].text
        with pytest.raises(openai.BadRequestError) as e:
            static.chat.completions.create(model="tiny-static", messages=[
                {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
        assert e.value.body["message"] == ("This model's chat template refuses these messages: System role not "
                                           "supported") and e.value.body["code"] == "invalid_messages"
        r = static.chat.completions.create(model="tiny-static", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4)
        assert r.choices[0].message.content
    finally:
        undeploy("tiny-static")
