"""The serving deployment's OpenAI-compatible routes as OpenAI clients use them (the official openai
client among them), run in this process without Ray: the deployment's FastAPI app on a real server
object (a real tiny model, its real decoding threads) through starlette's TestClient. Only Serve's
lookup of the replica's object (the dependency ``serve.ingress`` gives each route's ``self``) is
replaced, by the object itself. Serve itself is exercised in test_serving.py."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import openai
import pytest
from fastapi import Request
from fastapi.testclient import TestClient

from quantselect.domain.candidates import CATALOG


def _routes(router):
    for route in router.routes:  # (FastAPI >= 0.137 nests included routers)
        if hasattr(route, "original_router"):
            yield from _routes(route.original_router)
        else:
            yield route


@pytest.fixture(scope="module")
def serve_here():
    """``serve_here(name, model_dir)``: a TestClient on the app, serving that model as ``name`` (its
    batch's KV cache holding ``kv_cache_tokens``, if given)."""
    import quantselect.serving.app as app

    server_class = next(c for c in app.QuantizedModelServer.func_or_class.__mro__ if "_chat_ids" in vars(c))
    lookups = {p.default.dependency for r in _routes(app.api) if hasattr(r, "endpoint")
               for n, p in inspect.signature(r.endpoint).parameters.items() if n == "self"}
    assert lookups, "serve.ingress no longer gives the routes' self as a dependency"
    servers: dict = {}

    def server(request: Request):  # each client its server, by the host it asks
        return servers[request.url.hostname]

    for lookup in lookups:
        app.api.dependency_overrides[lookup] = server

    def serve_here(name: str, model_dir: Path, kv_cache_tokens: int | None = None, **client) -> TestClient:
        servers[name] = server_class(name, str(model_dir), CATALOG["baseline"].to_dict(), kv_cache_tokens=kv_cache_tokens)
        return TestClient(app.api, base_url=f"http://{name}", **client)

    yield serve_here
    for lookup in lookups:
        app.api.dependency_overrides.pop(lookup, None)


@pytest.fixture(scope="module")
def tiny(serve_here, tiny_llama) -> TestClient:
    return serve_here("tiny", tiny_llama)


def _openai(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{http.base_url.host}/v1", api_key="x", max_retries=0, http_client=http)


def _refused(r, says: str) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error", error


def test_fields_that_would_change_the_answer_are_refused(tiny):
    """Tools, JSON output, log probabilities, an echoed prompt...: a 400 naming the field, not a plain
    answer its client misreads; the defaults clients send (LangChain: penalties 0, best_of 1) pass."""
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for extra, says in [({"tools": [tool], "tool_choice": "required"}, "tools: this server does not call tools; leave it out"),
                        ({"tool_choice": "required"}, "tool_choice: this server does not call tools"),
                        ({"functions": [tool["function"]]}, "functions: this server does not call functions"),
                        ({"response_format": {"type": "json_object"}}, "response_format: this server does not constrain"),
                        ({"logprobs": True, "top_logprobs": 2}, "logprobs: this server does not return log probabilities"),
                        ({"top_logprobs": 2}, "top_logprobs:"),
                        ({"logit_bias": {"1": 5}}, "logit_bias:"),
                        ({"presence_penalty": 0.5}, "presence_penalty: this server does not apply repetition penalties"),
                        ({"modalities": ["text", "audio"]}, "modalities: this server does not answer in audio")]:
        _refused(tiny.post("/v1/chat/completions", json={**chat, **extra}), says)
    # lm-eval's local-completions (loglikelihood) asks for the prompt's log probabilities
    for extra, says in [({"echo": True, "logprobs": 1}, "logprobs:"), ({"echo": True}, "echo: this server does not echo"),
                        ({"logprobs": 0}, "logprobs:"), ({"best_of": 3}, "best_of:"), ({"suffix": "end"}, "suffix:"),
                        ({"frequency_penalty": -1}, "frequency_penalty:")]:
        _refused(tiny.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, **extra}), says)
    from pydantic import BaseModel

    class City(BaseModel):
        name: str

    with pytest.raises(openai.BadRequestError, match="response_format: this server does not constrain answers to JSON"):
        _openai(tiny).chat.completions.parse(model="tiny", messages=chat["messages"], response_format=City)
    defaults = {"presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False, "top_logprobs": 0, "logit_bias": {},
                "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "user": "u", "n": 1}
    assert tiny.post("/v1/chat/completions", json={**chat, **defaults}).status_code == 200
    defaults = {"logprobs": None, "echo": False, "best_of": 1, "suffix": None, "presence_penalty": 0, "frequency_penalty": 0}
    assert tiny.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, **defaults}).status_code == 200


def test_a_developer_message_is_read_as_a_system_one(tiny):
    """As the evaluator reads it (dataset.py): the served prompt is the evaluated one (SmolLM2's template
    would otherwise add its default system prompt and a ``developer`` turn)."""
    def ask(role: str) -> dict:
        return tiny.post("/v1/chat/completions", json={"messages": [{"role": role, "content": "Be brief."},
                                                                    {"role": "user", "content": "Hi"}],
                                                       "max_tokens": 4, "temperature": 0}).json()

    system, developer = ask("system"), ask("developer")
    assert developer["usage"] == system["usage"], (developer, system)
    assert developer["choices"][0]["message"] == system["choices"][0]["message"]


def test_parts_other_than_text_are_refused(tiny):
    """An image the model would answer without seeing it: a 400, as the evaluator refuses it."""
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]
    r = tiny.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
    _refused(r, "messages.0.content: Value error, part 1 is 'image_url': only text parts are supported")
    r = tiny.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content[:1]}], "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_a_failure_mid_stream_ends_the_stream_with_an_error_event(serve_here, tiny_llama, tmp_path):
    """Generation that fails once the stream has begun (its 200 sent): the error as the last event,
    then [DONE], as vLLM sends it; the openai client raises APIError with its message (without it,
    the stream was cut and the client saw a protocol error). The failure is real: a model whose
    weights hold NaN (an fp16 overflow, a broken checkpoint) gives NaN logits, which sampling refuses."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    broken = Path(shutil.copytree(tiny_llama, tmp_path / "nan"))
    model.save_pretrained(str(broken))
    http = serve_here("nan", broken)
    with http.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                          "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert json.loads(events[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # it had begun
    assert events[-1] == "[DONE]" and len(events) == 3, events
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and error["param"] is None and error["code"] is None
    assert error["message"].startswith("generation failed: RuntimeError: probability tensor contains"), error
    client = _openai(http)
    for stream in (client.chat.completions.create(model="nan", messages=[{"role": "user", "content": "Hi"}], stream=True),
                   client.completions.create(model="nan", prompt=["Hi", "Ho"], max_tokens=4, stream=True)):
        with pytest.raises(openai.APIError, match="^generation failed: RuntimeError") as e:
            list(stream)
        assert type(e.value) is openai.APIError and e.value.body["type"] == "server_error"
    with pytest.raises(openai.InternalServerError, match="generation failed"):  # not streamed: a 500
        client.completions.create(model="nan", prompt="Hi", max_tokens=4)


def test_chat_needs_a_chat_template(serve_here, tiny_llama, tmp_path):
    """A base model (no chat template) is not given an invented chat format, which no job evaluated
    (the evaluator refuses conversations there too): a 400 that sends to /v1/completions."""
    base = Path(shutil.copytree(tiny_llama, tmp_path / "base"))
    (base / "chat_template.jinja").unlink()
    http = serve_here("base", base)
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    _refused(r, "This model has no chat template (not an instruct model?): send the prompt as text to /v1/completions.")
    assert r.json()["error"]["code"] == "no_chat_template"
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_the_try_it_line_after_a_deploy_is_a_request_the_model_answers(tiny_llama, tmp_path, capsys):
    """The curl line `deploy` prints: chat for a model with a chat template, a completion for one
    without (chat would be the 400 above)."""
    from quantselect.cli import _print_deployment

    base = Path(shutil.copytree(tiny_llama, tmp_path / "base"))
    (base / "chat_template.jinja").unlink()
    url = "http://127.0.0.1:8000/models/int8/v1"
    for folder, route, field in ((tiny_llama, "chat/completions", '"messages"'), (base, "completions", '"prompt"')):
        _print_deployment(url, "int8", str(folder))
        curl = [line for line in capsys.readouterr().out.splitlines() if "curl" in line]
        assert len(curl) == 1 and f"curl -s {url}/{route} -H" in curl[0] and field in curl[0], curl


def test_prompts_given_as_token_ids(tiny, tiny_llama):
    """As OpenAI takes them (lm-eval's local-completions sends ids): the same answer as the text's;
    an id outside the vocabulary is a 400 before anything runs (on CUDA it would fail the replica)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    ids = tok("Once upon a time")["input_ids"]
    client = _openai(tiny)
    text = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
    one = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert one.choices[0].text == text.choices[0].text and one.usage == text.usage
    two = client.completions.create(model="tiny", prompt=[ids, ids[:2]], max_tokens=6, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == text.choices[0].text
    for bad in (len(tok), -1):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                client.completions.create(model="tiny", prompt=[[*ids, bad]], max_tokens=2, stream=stream)
            assert e.value.body["code"] == "invalid_prompt"
            assert e.value.body["message"] == f"Token id {bad} is not in this model's vocabulary (0 to {len(tok) - 1})."
    _refused(tiny.post("/v1/completions", json={"prompt": []}), "prompt: Value error, give at least one prompt")


def test_body_errors_say_what_to_fix(tiny):
    """A JSON syntax error says where and why; a body sent without Content-Type: application/json
    (requests' data=, curl -d without -H), which FastAPI does not read as JSON, says to send it."""
    r = tiny.post("/v1/completions", content=b'{"prompt": "Hi",}', headers={"content-type": "application/json"})
    _refused(r, "invalid request: body is not valid JSON at character 16: Expecting property name enclosed in double quotes")
    for headers in ({}, {"content-type": "application/x-www-form-urlencoded"}):
        r = tiny.post("/v1/completions", content=json.dumps({"prompt": "Hi"}).encode(), headers=headers)
        _refused(r, "(send it as JSON, with Content-Type: application/json)")
    r = tiny.post("/v1/completions", json=["Hi"])  # JSON, not an object: no such hint
    _refused(r, "body: Input should be a valid dictionary")
    assert "Content-Type" not in r.json()["error"]["message"]


def test_routes_it_does_not_have_answer_in_openai_shape(tiny, serve_here, tiny_llama, tmp_path):
    """Unknown routes and methods, and a server error, answer OpenAI's error object (not FastAPI's
    {"detail"}, nor plain text); models.retrieve answers."""
    r = tiny.post("/v1/embeddings", json={"input": "Hi"})
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("Invalid URL (POST /v1/embeddings)"), r.text
    r = tiny.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error" and "POST" in r.headers["allow"]
    client = _openai(tiny)
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found"
    # a model whose chat template itself fails (not a refusal of the messages): a 500 in OpenAI's shape
    broken = Path(shutil.copytree(tiny_llama, tmp_path / "broken-template"))
    (broken / "chat_template.jinja").write_text("{{ messages[0]['content'] }}{{ 1 // 0 }}")
    r = serve_here("broken", broken, raise_server_exceptions=False).post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 500 and r.json()["error"] == {
        "message": "internal error: ZeroDivisionError: integer division or modulo by zero", "type": "server_error",
        "param": None, "code": None}, r.text


def test_empty_prompts_are_answered(tiny, tiny_llama):
    """As OpenAI answers them: the prompt is the one token the evaluator gives an empty prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    client = _openai(tiny)
    empty = client.completions.create(model="tiny", prompt="", max_tokens=4, temperature=0)
    bos = client.completions.create(model="tiny", prompt=[tok.bos_token_id], max_tokens=4, temperature=0)
    assert empty.usage.prompt_tokens == 1 and empty.choices[0].text == bos.choices[0].text
    r = client.completions.create(model="tiny", prompt=["Hi", ""], max_tokens=4, temperature=0)
    assert r.choices[1].text == empty.choices[0].text
    assert client.completions.create(model="tiny", prompt=[[]], max_tokens=4, temperature=0).usage.prompt_tokens == 1


def test_top_p_zero_keeps_the_top_token(tiny):
    """OpenAI takes 0 to 1: 0 keeps only the most likely token (greedy, whatever the temperature)."""
    client = _openai(tiny)
    greedy = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0)
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=1.5, top_p=0)
    assert r.choices[0].text == greedy.choices[0].text


def _peak(http: TestClient) -> int:
    return http.get("/healthz").json()["batch"]["peak_rows"]


def test_the_batch_admits_what_its_kv_cache_budget_holds(serve_here, tiny_llama):
    """The batch takes a sequence only when every running row's worst case (prompt plus the tokens it
    may still produce, the rows left-padded to the longest) and its own fit the replica's KV cache
    budget; else it waits, in the order it came. Budget 60, max_tokens 10: A (20 ids) and B (30) fit
    alone, not together (2 rows x 40); C (1 id) fits beside A (2 x 30) but came after B, and does not
    overtake it. The batch never held two rows: each started once the one before it had left."""
    a, b, c = [5] * 20, [6] * 30, [7]
    small = serve_here("budget60", tiny_llama, kv_cache_tokens=60)
    assert small.get("/healthz").json()["batch"]["kv_cache_tokens"] == 60
    alone = [small.post("/v1/completions", json={"prompt": p, "max_tokens": 10, "temperature": 0}).json()
             for p in (a, b, c)]
    assert _peak(small) == 1
    # two requests at once, each its own thread: the second waits for the first, then decodes as alone
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda p: small.post("/v1/completions", json={"prompt": p, "max_tokens": 10,
                                                                           "temperature": 0}).json(), (a, b)))
    assert [r["choices"][0]["text"] for r in both] == [r["choices"][0]["text"] for r in alone[:2]], both
    assert _peak(small) == 1
    # three prompts of one request, queued together: first come, first served
    three = small.post("/v1/completions", json={"prompt": [a, b, c], "max_tokens": 10, "temperature": 0}).json()
    assert [ch["text"] for ch in three["choices"]] == [r["choices"][0]["text"] for r in alone], three
    assert _peak(small) == 1
    roomy = serve_here("budget120", tiny_llama, kv_cache_tokens=120)  # 3 rows x 40: together
    assert roomy.post("/v1/completions", json={"prompt": [a, b, c], "max_tokens": 10, "temperature": 0}).status_code == 200
    assert _peak(roomy) == 3


def test_a_short_answer_beside_a_long_one_costs_the_cache_only_while_it_runs(tiny_llama):
    """Rows are trimmed as they leave: a 4-token answer beside a 40-token one holds the long row's width
    for 4 steps, not its final width (else one long answer, a chat without max_tokens say, would keep
    every other request out of the batch); two long ones still do not fit together."""
    import threading
    from types import SimpleNamespace as Row

    from transformers import AutoModelForCausalLM

    from quantselect.serving.app import _Batch

    batch = _Batch(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), threading.Lock(), 16, tokens=60)
    long, short = Row(ids=[5] * 10, out=[], max_tokens=40), Row(ids=[6] * 5, out=[], max_tokens=4)
    assert batch.plain and batch.fits([long, short])  # peak: 2 x 14 at step 4, then 1 x 50
    assert not batch.fits([long, Row(ids=[6] * 5, out=[], max_tokens=30)])  # 2 x 40 at step 30
    running = Row(ids=[5] * 4, out=[0] * 6, max_tokens=26)  # 10 wide, 20 steps left
    assert batch.fits([running, Row(ids=[6] * 20, out=[], max_tokens=5)])  # 2 x 25 at step 5, then 1 x 30
    assert not batch.fits([running, Row(ids=[6] * 26, out=[], max_tokens=5)])  # 2 x 31 at step 5


def test_the_batch_budget_does_not_cut_an_answer_the_static_cache_takes(tiny_llama):
    """On the static engine (the GPU default; here on CPU) an answer without max_tokens gets the room
    the static cache leaves its prompt, not the batch's smaller budget (which cut it, down to 1 token)."""
    import quantselect.serving.app as app

    server_class = next(c for c in app.QuantizedModelServer.func_or_class.__mro__ if "_chat_ids" in vars(c))
    server = server_class("static", str(tiny_llama), CATALOG["baseline"].to_dict(), engine="static", kv_cache_tokens=60)
    assert server.static.max_len == 512  # the tiny model's context
    assert server._limit([5] * 59, None) == 512 - 59 and server._limit([5] * 30, None) == 512 - 30
    assert server._limit([5] * 30, 8) == 8


def test_a_request_the_kv_cache_budget_cannot_hold_is_refused(serve_here, tiny_llama):
    """One sequence whose own worst case exceeds the whole budget would wait forever (or, without a
    budget, run the replica out of memory): a 400 before anything runs, streamed or not, naming what
    to ask for. A chat answer without max_tokens (which would run to the model's context) is cut to
    what the budget leaves its prompt instead."""
    http = serve_here("budget40", tiny_llama, kv_cache_tokens=40)
    says = ("This request needs 41 tokens of KV cache (30 of prompt, 11 to generate); this replica holds 40: "
            "ask for fewer max_tokens or a shorter prompt.")
    for stream in (False, True):
        for prompt in ([6] * 30, [[1], [6] * 30]):  # one of its prompts is enough
            r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 11, "stream": stream})
            _refused(r, says)
            assert r.json()["error"]["code"] == "context_length_exceeded"
        r = http.post("/v1/completions", json={"prompt": [6] * 45, "max_tokens": 1, "stream": stream})
        _refused(r, "This request needs 46 tokens of KV cache (45 of prompt, 1 to generate); this replica holds 40")
    assert _peak(http) == 0  # nothing ran
    assert http.post("/v1/completions", json={"prompt": [6] * 30, "max_tokens": 10}).status_code == 200
    r = _openai(http).chat.completions.create(model="budget40", messages=[{"role": "user", "content": "Hi"}], temperature=0)
    assert r.usage.total_tokens <= 40 and r.usage.completion_tokens >= 1, r.usage
    if r.choices[0].finish_reason == "length":  # (unless the model stopped before)
        assert r.usage.total_tokens == 40, r.usage


def test_the_kv_cache_budget_is_set_where_the_application_is_built(monkeypatch):
    """QUANTSELECT_SERVE_KV_CACHE_TOKENS, read by build_app (deploy, a Serve config's app_builder) and
    given to the replicas; a value that is not a number of tokens fails there, naming it."""
    from quantselect.errors import InputError
    from quantselect.serving.app import build_app

    config = CATALOG["baseline"].to_dict()
    monkeypatch.delenv("QUANTSELECT_SERVE_KV_CACHE_TOKENS", raising=False)
    assert build_app("x", "/m", config)._bound_deployment.init_args[-1] is None  # unset: a share of free memory
    monkeypatch.setenv("QUANTSELECT_SERVE_KV_CACHE_TOKENS", "4096")
    assert build_app("x", "/m", config)._bound_deployment.init_args[-1] == 4096
    for bad in ("64k", "0", "-5"):
        monkeypatch.setenv("QUANTSELECT_SERVE_KV_CACHE_TOKENS", bad)
        with pytest.raises(InputError, match=f"QUANTSELECT_SERVE_KV_CACHE_TOKENS='{bad}': give the tokens"):
            build_app("x", "/m", config)
