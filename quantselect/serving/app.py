"""A quantized candidate behind an OpenAI-compatible API: one Ray Serve deployment (FastAPI ingress).

Routes (under the application's route prefix): ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (both with SSE streaming), ``GET /healthz``. torch/transformers are
imported only inside the replica (``load_candidate``); importing this module does not import them.
"""

# No `from __future__ import annotations`: serve.ingress rebuilds the route signatures and FastAPI must
# see the request models as classes, not strings (else the body becomes a required query parameter).
import json
import threading
import time
import uuid
from typing import Any, Iterator, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from quantselect.domain.candidates import CATALOG, config_from_dict


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def _error(status: int, message: str, type_: str, code: str | None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}}, status_code=status)


api = FastAPI(title="quantselect OpenAI-compatible server")


@api.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return _error(e.status, e.message, e.type, e.code)


@api.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
    parts = [f"{'.'.join(str(x) for x in err['loc'][1:]) or 'body'}: {err['msg']}" for err in e.errors()]
    return _error(400, "invalid request: " + "; ".join(parts), "invalid_request_error", "invalid_request")


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)
    model: Optional[str] = None
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    seed: Optional[int] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]] = Field(min_length=1)


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]], None] = ""

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=4096)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=8)
@serve.ingress(api)
class QuantizedModelServer:
    def __init__(self, name: str, model_path: str, config: dict, use_gpu: bool = False, engine: Optional[str] = None):
        from quantselect.engines.decode import Decoder
        from quantselect.engines.quantize import load_candidate

        if model_path == "demo":  # the bundled SmolLM2, converted once under $QUANTSELECT_HOME/models
            from quantselect.engines.models import resolve_model
            from quantselect.settings import get_settings

            model_path = str(resolve_model("demo", get_settings().models_dir))
        self.name = name
        self.loaded = load_candidate(model_path, config_from_dict(config), device="cuda" if use_gpu else "cpu")
        self.tok = self.loaded.tokenizer
        self.lock = threading.Lock()  # one forward pass at a time per replica
        eos = self.loaded.model.generation_config.eos_token_id
        self.eos = ({self.tok.eos_token_id} | set(eos if isinstance(eos, list) else [eos])) - {None}
        # The engine throughput was measured with: on a GPU a static KV cache with a compiled step
        # (one request at a time: the cache is the replica's), on CPU a dynamic cache, eager.
        # (build_app has validated ``engine``)
        engine = engine or ("static" if self.loaded.device == "cuda" else "dynamic")
        self.static = Decoder(self.loaded.model, static=True, compiled=self.loaded.device == "cuda") \
            if engine == "static" else None
        self.static_lock = threading.Lock()  # held for a whole request that decodes with the static cache
        self.engine = f"{engine} KV cache"
        if self.static is not None and self.static.compiled:
            self.static.warm_up()
            self.engine += ", compiled step"

    # -- generation ----------------------------------------------------------------------------
    def _check_model(self, req: _Sampling) -> None:
        if req.model is not None and req.model != self.name:
            raise ApiError(404, f"The model `{req.model}` does not exist; this server serves `{self.name}`.",
                           "invalid_request_error", "model_not_found")

    def _tokens(self, prompt: str, special: bool = True) -> list[int]:
        return self.tok(prompt, add_special_tokens=special)["input_ids"]

    def _generate(self, ids: list[int], req: _Sampling, max_tokens: int) -> Iterator[tuple[str, Optional[str], int]]:
        """Yield (text delta, finish reason or None, completion tokens so far); the last item has a reason.
        A token-by-token loop over the KV cache, so streaming and stop sequences need no threads."""
        from quantselect.engines.decode import Decoder

        if self.static is not None and self.static.fits(len(ids), max_tokens):
            with self.static_lock:
                yield from self._decode(self.static, ids, req, max_tokens)
        else:
            yield from self._decode(Decoder(self.loaded.model, static=False), ids, req, max_tokens)

    def _decode(self, decoder: Any, ids: list[int], req: _Sampling, max_tokens: int) -> Iterator[tuple[str, Optional[str], int]]:
        import torch

        stops = [req.stop] if isinstance(req.stop, str) else [s for s in (req.stop or []) if s]
        hold = max((len(s) for s in stops), default=1) - 1  # held back: could be the start of a stop
        gen = torch.Generator(device=self.loaded.device).manual_seed(req.seed) if req.seed is not None else None
        out, sent, text = [], 0, ""
        for _ in range(max_tokens):
            with self.lock, torch.inference_mode():
                logits = decoder.step(out[-1]) if out else decoder.prefill(ids)
                if req.temperature == 0:
                    tok = int(logits.argmax())
                else:
                    probs, idx = torch.sort(torch.softmax(logits / req.temperature, -1), descending=True)
                    probs[(torch.cumsum(probs, -1) - probs) >= req.top_p] = 0
                    tok = int(idx[torch.multinomial(probs / probs.sum(), 1, generator=gen)])
            if tok in self.eos:
                yield text[sent:], "stop", len(out)
                return
            out.append(tok)
            text = self.tok.decode(out, skip_special_tokens=True)
            hits = [i for i in (text.find(s) for s in stops) if i >= 0]
            if hits:
                yield text[sent:min(hits)], "stop", len(out)
                return
            safe = len(text) - hold - (1 if text.endswith("\ufffd") else 0)
            if safe > sent:
                yield text[sent:safe], None, len(out)
                sent = safe
        yield text[sent:], "length", len(out)

    def _respond(self, req: _Sampling, ids: list[list[int]], chat: bool, max_tokens: int):
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created, "model": self.name}
        if req.stream:
            return StreamingResponse(self._stream(req, ids, chat, max_tokens, head), media_type="text/event-stream")
        choices, used = [], 0
        for i, p in enumerate(ids):
            parts = list(self._generate(p, req, max_tokens))
            text, reason, used = "".join(d for d, _, _ in parts), parts[-1][1], used + parts[-1][2]
            body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
            choices.append({"index": i, **body, "finish_reason": reason})
        n_prompt = sum(len(p) for p in ids)
        return {**head, "choices": choices, "usage": {"prompt_tokens": n_prompt, "completion_tokens": used, "total_tokens": n_prompt + used}}

    def _stream(self, req: _Sampling, ids: list[list[int]], chat: bool, max_tokens: int, head: dict) -> Iterator[str]:
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        used = 0
        for i, p in enumerate(ids):
            if chat:
                yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            for delta, reason, n in self._generate(p, req, max_tokens):
                if delta or reason:
                    body = {"delta": {"content": delta} if delta else {}} if chat else {"text": delta, "logprobs": None}
                    yield _sse({**head, "choices": [{"index": i, **body, "finish_reason": reason}]})
                if reason:
                    used += n
        if (req.stream_options or {}).get("include_usage"):
            n_prompt = sum(len(p) for p in ids)
            yield _sse({**head, "choices": [], "usage": {"prompt_tokens": n_prompt, "completion_tokens": used, "total_tokens": n_prompt + used}})
        yield "data: [DONE]\n\n"

    # -- routes ----------------------------------------------------------------------------------
    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "model": self.name, "device": self.loaded.device, "engine": self.loaded.engine,
                "decoding": self.engine}

    @api.get("/v1/models")
    def models(self) -> dict:
        card = {"id": self.name, "object": "model", "created": 0, "owned_by": "quantselect", "engine": self.loaded.engine}
        return {"object": "list", "data": [card]}

    @api.post("/v1/completions")
    def completions(self, req: CompletionRequest):
        self._check_model(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        return self._respond(req, [self._tokens(p) for p in prompts], False, req.max_tokens)

    @api.post("/v1/chat/completions")
    def chat_completions(self, req: ChatRequest):
        self._check_model(req)
        msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
        if getattr(self.tok, "chat_template", None):
            prompt = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            ids = self._tokens(prompt, special=False)  # the template already holds the special tokens
        else:
            prompt = "\n".join(f"{m['role']}: {m['content']}" for m in msgs) + "\nassistant:"
            ids = self._tokens(prompt)
        return self._respond(req, [ids], True, req.max_completion_tokens or req.max_tokens)


def build_app(name: str, model_path: str, config: dict, use_gpu: bool = False,
              engine: Optional[str] = None) -> serve.Application:
    """Pure builder: the Serve application serving ``model_path`` quantized as ``config``; ``engine``:
    ``static`` or ``dynamic`` KV cache (default: static on a GPU, dynamic on CPU)."""
    config_from_dict(config)  # fail here, with an InputError, rather than in a replica
    if engine not in (None, "static", "dynamic"):
        raise ValueError(f"engine {engine!r}: give 'static' or 'dynamic'")
    resources = {"num_cpus": 0, **({"num_gpus": 1} if use_gpu else {})}
    return QuantizedModelServer.options(ray_actor_options=resources).bind(name, model_path, config, use_gpu, engine)


class AppArgs(BaseModel):
    """Arguments of ``app_builder`` (the ``args`` of a Serve config file application)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    model_path: str
    config: Union[str, dict[str, Any]]  # a catalogue name ("int4") or a CandidateConfig.to_dict()
    use_gpu: bool = False
    engine: Optional[Literal["static", "dynamic"]] = None


def app_builder(args: dict) -> serve.Application:
    """Application builder for ``serve run`` / ``serve deploy`` config files."""
    a = AppArgs.model_validate(args)
    if isinstance(a.config, str):
        if a.config not in CATALOG:
            raise ValueError(f"unknown candidate {a.config!r}; known: {', '.join(CATALOG)}")
        config = CATALOG[a.config].to_dict()
    else:
        config = a.config
    return build_app(a.name, a.model_path, config, a.use_gpu, a.engine)
