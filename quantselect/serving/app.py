"""A quantized candidate behind an OpenAI-compatible API: one Ray Serve deployment (FastAPI ingress).

Routes (under the application's route prefix): ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (both with SSE streaming), ``GET /healthz``. torch/transformers are
imported only inside the replica (``load_candidate``); importing this module does not import them.
"""

# No `from __future__ import annotations`: serve.ingress rebuilds the route signatures and FastAPI must
# see the request models as classes, not strings (else the body becomes a required query parameter).
import asyncio
import json
import logging
import os
import queue
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from quantselect.bearer import NO, BearerGate
from quantselect.domain.candidates import CATALOG, config_from_dict
from quantselect.errors import InputError

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def _error_body(message: str, type_: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _error(status: int, message: str, type_: str, code: str | None, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(_error_body(message, type_, code), status_code=status, headers=headers)


api = FastAPI(title="quantselect OpenAI-compatible server")


_API_KEY: Optional[str] = None  # this process's deployment's key (a replica process runs one), set as it starts


def _api_key() -> Optional[str]:
    return _API_KEY


def _key_refusal(why: str) -> JSONResponse:
    """A 401 in OpenAI's shape, as OpenAI clients expect it."""
    if why == NO:
        return _error(401, "No API key provided: send `Authorization: Bearer KEY` with the deployment's "
                           "QUANTSELECT_SERVE_API_KEY (the OpenAI client's api_key).", "invalid_request_error",
                      "invalid_api_key")
    return _error(401, "Incorrect API key provided: give the deployment's QUANTSELECT_SERVE_API_KEY.",
                  "invalid_request_error", "invalid_api_key")


# Every route but /healthz (for probes) asks for the key, before anything of the request is read.
api.add_middleware(BearerGate, secret=_api_key, open_paths=frozenset({"/healthz"}), refusal=_key_refusal)


@api.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return _error(e.status, e.message, e.type, e.code)


@api.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
    json_sent = "json" in request.headers.get("content-type", "")  # else FastAPI does not parse the body as JSON

    def part(err: dict) -> str:
        if err["type"] == "json_invalid":  # (FastAPI's msg is only "JSON decode error"; its reason is in ctx)
            return f"body is not valid JSON at character {err['loc'][-1]}: {err.get('ctx', {}).get('error', err['msg'])}"
        where = ".".join(str(x) for x in err["loc"][1:]) or "body"
        hint = " (send it as JSON, with Content-Type: application/json)" if where == "body" and not json_sent else ""
        return f"{where}: {err['msg']}{hint}"

    return _error(400, "invalid request: " + "; ".join(part(err) for err in e.errors()), "invalid_request_error",
                  "invalid_request")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own errors (a route or method it does not have) in OpenAI's shape, as clients parse it."""
    where = f"{request.method} {request.url.path}"
    message = {404: f"Invalid URL ({where}): this server answers GET /v1/models, POST /v1/completions and "
                    "POST /v1/chat/completions",
               405: f"Method not allowed ({where})"}.get(e.status_code, f"{where}: {e.detail}")
    return _error(e.status_code, message, "invalid_request_error", None, e.headers)


@api.exception_handler(Exception)
async def _server_error(request: Request, e: Exception) -> JSONResponse:
    """A bug of ours (or of a model's files, e.g. a chat template that fails) as OpenAI's 500, not plain
    text; Starlette raises it again after this answer, so that it is logged."""
    return _error(500, f"internal error: {type(e).__name__}: {e}", "server_error", None)


MAX_STOPS, MAX_STOP_CHARS = 16, 1000  # OpenAI takes 4; a stop string holds back as much streamed text
MAX_PROMPTS = 64  # prompts of one completions request, all decoded together
GREEDY_BELOW = 1e-5  # a temperature this low samples as greedy decoding (lower overflows the logits)

# Fields of OpenAI's requests that change what comes back, none of which this server does, and the
# values that ask for nothing (those clients such as LangChain send by default). Anything else is a 400
# naming the field, rather than a 200 without what was asked for (tool calls, JSON, log probabilities,
# the prompt echoed) that its client then misreads.
_NOT_DONE: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (lambda v: not v, "call tools"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "call tools"),
    "functions": (lambda v: not v, "call functions"),
    "function_call": (lambda v: v in (None, "none", "auto"), "call functions"),
    "response_format": (lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"), "constrain answers to JSON"),
    "logprobs": (lambda v: v is None or v is False, "return log probabilities"),
    "top_logprobs": (lambda v: v is None or v == 0, "return log probabilities"),
    "echo": (lambda v: not v, "echo the prompt"),
    "best_of": (lambda v: v is None or v == 1, "choose the best of several answers"),
    "suffix": (lambda v: not v, "complete before a suffix"),
    "logit_bias": (lambda v: not v, "bias tokens"),
    "presence_penalty": (lambda v: v is None or v == 0, "apply repetition penalties"),
    "frequency_penalty": (lambda v: v is None or v == 0, "apply repetition penalties"),
    "modalities": (lambda v: v is None or v == ["text"], "answer in audio"),
    "audio": (lambda v: v is None, "answer in audio"),
}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields that change nothing (user, ...)
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)  # bounded by the context the prompt leaves
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)  # 0: the top token alone (greedy)
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch's generator takes

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """OpenAI takes ``null`` for a field as its default (clients send ``"temperature": null``)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in ("temperature", "top_p", "n", "stream")}
        return data

    @model_validator(mode="before")
    @classmethod
    def _nothing_we_do_not_do(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, (asks_nothing, what) in _NOT_DONE.items():
                if name in data and not asks_nothing(data[name]):
                    raise ValueError(f"{name}: this server does not {what}; leave it out")
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: Union[str, list[str], None]) -> list[str]:
        stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]  # "" would stop at once
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"give at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters")
        return stops


class CompletionRequest(_Sampling):
    # A prompt is text or token ids (lm-eval's local-completions sends ids); validated, the list of prompts.
    prompt: Union[str, list[str], list[int], list[list[int]]]

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt: Any) -> list[Union[str, list[int]]]:
        if not prompt and isinstance(prompt, list):
            raise ValueError("give at least one prompt")
        prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"{len(prompts)} prompts: give at most {MAX_PROMPTS} in one request")
        return prompts


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]], None] = ""

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content: Any) -> Any:
        for i, p in enumerate(content if isinstance(content, list) else []):
            if p.get("type") != "text":  # (an image, audio or a file the model would answer without)
                raise ValueError(f"part {i} is {p.get('type')!r}: only text parts are supported")
            if not isinstance(p.get("text"), str):
                raise ValueError("a text part needs its text as a string")
        return content

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p["text"] for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


MAX_ROWS = 16  # sequences a replica decodes at once: the serving batch the cost figures assume
# An answer without max_tokens on a replica with a static cache is bounded by the cache (prompt plus
# answer: 8,192 tokens) when that leaves it this many; else by the model's context, on the batch.
STATIC_DEFAULT_ROOM = 2048
# The share of the memory left free once the model is loaded that the batch's KV cache may take at its
# worst: it is held twice while new rows merge in (BatchDecoder._merge builds the merged cache before it
# drops the old one), and a prefill's activations need room too. QUANTSELECT_SERVE_KV_CACHE_TOKENS, read
# where the application is built, gives the budget in tokens instead.
KV_CACHE_FRACTION = 0.4
MIN_KV_CACHE_TOKENS = 2048  # a batch-only replica whose free memory holds fewer refuses to start (unless told a budget)
KV_CACHE_TOKENS_ENV = "QUANTSELECT_SERVE_KV_CACHE_TOKENS"
# The most prompt tokens (rows x the widest, padded) one prefill pass takes in when rows can join a running
# batch (vLLM's max_num_batched_tokens): the rest join at the next step. One pass of 16 long prompts
# would need activations the KV budget leaves no room for (and stall every running answer meanwhile);
# a single prompt longer than this still goes, alone.
PREFILL_TOKENS = 8192


class _Sequence:
    """One answer being generated: its sampling, stop strings and token limit, and the (text delta,
    finish reason or None, completion tokens so far) items it has produced, the last with a reason."""

    def __init__(self, tok: Any, eos: set, ids: list[int], req: _Sampling, max_tokens: int, device: str) -> None:
        import torch

        self.tok, self.eos, self.ids, self.max_tokens = tok, eos, ids, max_tokens
        self.temperature, self.top_p = req.temperature, req.top_p
        self.stops = req.stop or []  # (validated: a list, no empty string)
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # held back: could start a stop
        self.gen = torch.Generator(device=device).manual_seed(req.seed) if req.seed is not None else None
        self.out: list[int] = []
        self.text, self.sent = "", 0
        self.prefix = self.read = 0  # incremental detokenization: see _decoded
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        self.wake: Optional[Callable[[], None]] = None  # set by aresults: tells its coroutine an item is there
        self.finished = self.cancelled = False

    def sample(self, logits: Any) -> int:
        import torch

        if self.temperature < GREEDY_BELOW or self.top_p <= 0:  # (top_p 0 keeps the top token alone)
            return int(logits.argmax())
        probs, idx = torch.sort(torch.softmax(logits / self.temperature, -1), descending=True)
        probs[(torch.cumsum(probs, -1) - probs) >= self.top_p] = 0
        return int(idx[torch.multinomial(probs / probs.sum(), 1, generator=self.gen)])

    def push(self, tok: int) -> bool:
        """Take the next token; true when the answer is finished (end of sequence, a stop string, the limit)."""
        if tok in self.eos:
            return self._emit(self.text[self.sent:] + self._decoded(final=True), "stop")
        self.out.append(tok)
        before = len(self.text)
        self.text += self._decoded(final=len(self.out) >= self.max_tokens)
        hits = [i for i in (self.text.find(s, max(0, before - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            return self._emit(self.text[self.sent:min(hits)], "stop")
        if len(self.out) >= self.max_tokens:
            return self._emit(self.text[self.sent:], "length")
        safe = len(self.text) - self.hold
        if safe > self.sent:
            self._emit(self.text[self.sent:safe], None)
            self.sent = safe
        return False

    def _decoded(self, final: bool = False) -> str:
        """The text the tokens not yet read add, decoding a short window instead of the whole answer
        at every step (as TGI and vLLM do). The window starts where the previous read did (``prefix``),
        so that a tokenizer that treats a sequence's first token apart (a leading space) gives the
        same text as a whole decode. Nothing is read while the window ends in an incomplete UTF-8
        character (U+FFFD) unless the answer ends there (``final``)."""
        old = self.tok.decode(self.out[self.prefix:self.read], skip_special_tokens=True)
        new = self.tok.decode(self.out[self.prefix:], skip_special_tokens=True)
        if len(new) <= len(old) or (new.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.out)
        return new[len(old):]

    def _put(self, item: Any) -> None:
        self.items.put(item)
        if (wake := self.wake) is not None:
            wake()

    def _emit(self, delta: str, reason: Optional[str]) -> bool:
        self._put((delta, reason, len(self.out)))
        self.finished = reason is not None
        return self.finished

    def fail(self, error: Exception) -> None:
        self._put(error)
        self.finished = True

    def cancel(self) -> None:
        """Its client is gone: the engine drops it at its next step, and a reader waiting ends."""
        self.cancelled = True
        self._put(None)

    @staticmethod
    def _item(item: Any) -> Optional[tuple[str, Optional[str], int]]:
        if isinstance(item, Exception):
            raise ApiError(500, f"generation failed: {type(item).__name__}: {item}", "server_error", None)
        return item

    def results(self) -> Iterator[tuple[str, Optional[str], int]]:
        """The items as the engine produces them."""
        while (item := self._item(self.items.get())) is not None:
            yield item
            if item[1] is not None:
                return

    async def aresults(self) -> AsyncIterator[tuple[str, Optional[str], int]]:
        """``results()`` for a route: it waits without holding a thread, so that the route's
        cancellation (its client gone, streamed or not) ends the wait at once, and its ``finally``
        takes the answer off the engine."""
        loop, ready = asyncio.get_running_loop(), asyncio.Event()

        def wake() -> None:  # (in the engine's thread)
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the loop is closed: nobody is waiting
                pass

        self.wake = wake
        while True:
            try:
                item = self._item(self.items.get_nowait())
            except queue.Empty:
                await ready.wait()
                ready.clear()
                continue
            if item is None:
                return
            yield item
            if item[1] is not None:
                return


class _Batch:
    """The replica's batched decoding: a thread that feeds every running sequence one token per step
    (``BatchDecoder``); waiting sequences join between two steps, up to ``max_rows`` and as long as
    the cache fits ``tokens`` at its worst (as vLLM admits requests into its KV cache), first come
    first served; finished or abandoned ones leave."""

    def __init__(self, model: Any, lock: threading.Lock, max_rows: int, tokens: Optional[int] = None) -> None:
        from quantselect.engines.decode import BatchDecoder, free_memory

        self.decoder, self.lock, self.max_rows = BatchDecoder(model), lock, max_rows
        self.free: Optional[int] = None  # the bytes found free, when the budget was not given
        self.cost = cost = self.decoder.kv_cache_cost()
        self.plain = cost.plain
        if tokens is None:  # what the rows' fixed states (a linear-attention layer's) leave
            free = free_memory(model)
            tokens = int(free * KV_CACHE_FRACTION - max_rows * cost.per_row) // max(cost.per_token, 1)
            log.info("the batch's KV cache holds %d tokens of %d bytes (and %d bytes per row; sliding-window layers' "
                     "(window, bytes per token): %s)", tokens, cost.per_token, cost.per_row, cost.windows)
            self.free = free
        # The budget is ``tokens`` of ``per_token`` bytes: tokens as every layer keeps them. A sliding-window
        # layer keeps only its window, so a row may be longer: ``longest``, the widest that fits alone.
        self.tokens = max(tokens, 1)
        self.bytes = self.tokens * max(cost.per_token, 1)
        self.longest = self._longest()
        self.waiting: queue.SimpleQueue = queue.SimpleQueue()
        self.head: Optional[_Sequence] = None  # the first waiting sequence, out of the queue: it did not fit yet
        self.rows: list[_Sequence] = []
        self.peak = 0  # the most sequences decoded together so far
        threading.Thread(target=self._run, name="quantselect-batch", daemon=True).start()

    def fits(self, seqs: list[_Sequence]) -> bool:
        """Whether these rows' cache fits the budget at its worst (each row running to its
        ``max_tokens``). Rows are left-padded to one width. With plain layers the columns no row attends
        to are trimmed as rows leave, so ``t`` steps on the cache holds the rows still decoding times the
        widest of them; that grows until a row ends, so its peak is at a step where one ends (a short
        answer beside a long one costs only while it runs). Else (nothing trimmed, nothing joins) every
        row is as wide as the longest prompt plus the longest answer. A row's bytes for its width are
        ``KVCost.row_bytes``: its sliding-window layers stop growing at their window."""
        row = self.cost.row_bytes
        if not self.plain:  # prefilled together: until the first step a sliding layer's window is a view of the
            # keys and values of the whole prompt, so the pass holds every layer's, for every prompt token
            width = max(len(s.ids) for s in seqs)
            return len(seqs) * width * self.cost.per_token <= self.bytes and \
                len(seqs) * row(width + max(s.max_tokens for s in seqs)) <= self.bytes
        now = [(len(s.ids) + len(s.out), s.max_tokens - len(s.out)) for s in seqs]  # (width, steps left)
        return all(sum(1 for _, r in now if r >= t) * row(max(w + t for w, r in now if r >= t)) <= self.bytes
                   for t in {r for _, r in now})

    def _longest(self) -> int:
        """The widest row that fits alone (``row_bytes`` never shrinks as it widens); 2^40 if it stops growing."""
        low, high = 0, 1 << 40
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self.cost.row_bytes(mid) <= self.bytes else (low, mid - 1)
        return low

    def _one_pass(self, new: list[_Sequence], seq: _Sequence) -> bool:
        """Whether ``seq`` joins ``new``'s prefill pass: within PREFILL_TOKENS (padded), where it could
        otherwise join at the next step; the first always does. Where rows cannot join a running batch
        (``plain`` false) every one that fits goes now, or it would wait for the whole batch to end."""
        return not new or not self.plain or (len(new) + 1) * max(len(s.ids) for s in new + [seq]) <= PREFILL_TOKENS

    def _first(self) -> Optional[_Sequence]:
        """The first waiting sequence whose client is still there, or None."""
        while self.head is None or self.head.cancelled:
            if self.waiting.empty():
                self.head = None
                return None
            self.head = self.waiting.get()
        return self.head

    def submit(self, seq: _Sequence) -> None:
        self.waiting.put(seq)

    def _run(self) -> None:
        while True:
            try:
                self._iteration()
            except Exception as e:  # noqa: BLE001 -- e.g. out of memory: the running answers fail, the replica stays up
                log.exception("batched decoding failed")
                for seq in self.rows:
                    seq.fail(e)
                self.rows = []
                self.decoder.keep([])

    def _iteration(self) -> None:
        import torch

        if not self.rows and self.head is None:
            self.head = self.waiting.get()  # idle: wait for a request
        new: list[_Sequence] = []
        if not self.rows or self.decoder.can_add():  # the first that does not fit waits, and those behind it
            while len(self.rows) + len(new) < self.max_rows and (seq := self._first()) is not None \
                    and self.fits(self.rows + new + [seq]) and self._one_pass(new, seq):
                new.append(seq)
                self.head = None
        if not new and not self.rows:
            if self.head is not None:  # (never: _limit refuses what cannot fit alone) rather than wait forever
                self.head.fail(RuntimeError(f"needs more than the batch's KV cache of {self.longest} tokens"))
                self.head = None
            return
        with self.lock, torch.inference_mode():
            if new:  # the newcomers' prompts in one pass; the running rows wait for it
                try:
                    logits, fed = self.decoder.add([s.ids for s in new]), new
                except Exception as e:  # noqa: BLE001 -- e.g. out of memory: the newcomers fail, the batch goes on
                    log.exception("prefilling %d new sequences failed", len(new))
                    for seq in new:
                        seq.fail(e)
                    return
                self.rows += new
            else:
                logits, fed = self.decoder.step([s.out[-1] for s in self.rows]), self.rows
        self.peak = max(self.peak, len(self.rows))
        for i, seq in enumerate(fed):
            try:
                seq.push(seq.sample(logits[i]))
            except Exception as e:  # noqa: BLE001 -- that answer fails, not the others of the batch
                log.exception("sampling an answer failed")
                seq.fail(e)
        keep = [i for i, s in enumerate(self.rows) if not (s.finished or s.cancelled)]
        self.decoder.keep(keep)
        self.rows = [self.rows[i] for i in keep]


class _StaticWorker:
    """The static cache's one thread: requests decode there one at a time, in the order they came,
    each until it finishes or its client is gone (the cache is never held by an answer nobody reads).
    One long-lived thread, because torch's CUDA graph trees are per thread: the graphs the warm-up
    (run here too, ``call``) captured replay in this thread only; a thread per request would capture
    them again for every request."""

    def __init__(self, decoder: Any, lock: threading.Lock) -> None:
        self.decoder, self.lock = decoder, lock
        self.waiting: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="quantselect-static", daemon=True).start()

    def submit(self, seq: _Sequence) -> None:
        self.waiting.put(seq)

    def call(self, fn: Any) -> Any:
        """Run ``fn`` in this thread, and wait for it."""
        done: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting.put((fn, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def _run(self) -> None:
        while True:
            job = self.waiting.get()
            if isinstance(job, tuple):
                fn, done = job
                try:
                    done.put((True, fn()))
                except BaseException as e:  # noqa: BLE001 -- the caller's to raise
                    done.put((False, e))
            else:
                self._decode(job)

    def _decode(self, seq: _Sequence) -> None:
        import torch

        try:
            logits = None
            while not seq.cancelled:
                with self.lock, torch.inference_mode():
                    logits = self.decoder.step(seq.out[-1]) if logits is not None else self.decoder.prefill(seq.ids)
                    if seq.push(seq.sample(logits)):
                        return
        except Exception as e:  # noqa: BLE001 -- that answer fails, the replica stays up
            log.exception("decoding on the static cache failed")
            seq.fail(e)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2 * MAX_ROWS)
@serve.ingress(api)
class QuantizedModelServer:
    def __init__(self, name: str, model_path: str, config: dict, use_gpu: bool = False, engine: Optional[str] = None,
                 api_key: Optional[str] = None, kv_cache_tokens: Optional[int] = None):
        import torch

        from quantselect.engines.decode import Decoder
        from quantselect.engines.quantize import load_candidate

        if model_path == "demo":  # the bundled SmolLM2, converted once under $QUANTSELECT_HOME/models
            from quantselect.engines.models import resolve_model
            from quantselect.settings import get_settings

            model_path = str(resolve_model("demo", get_settings().models_dir))
        import quantselect.serving.app as this_module  # (this class reaches the replica pickled by value: its
        # globals are a copy, the gate reads the module's)

        self.name, self.api_key = name, api_key
        this_module._API_KEY = api_key  # asked for by the gate, before a request's body is read
        if not use_gpu:  # Ray gives an actor without CPUs one torch thread; a CPU replica decodes with all cores
            torch.set_num_threads(len(os.sched_getaffinity(0)))
        elif not torch.cuda.is_available():
            import ray

            held = ray.get_gpu_ids()
            raise RuntimeError(f"this replica holds {len(held)} GPU(s) (Ray's {', '.join(map(str, held))}) but torch "
                               f"{torch.__version__} sees no CUDA device: install a CUDA build of torch on the node")
        self.loaded = load_candidate(model_path, config_from_dict(config), device="cuda" if use_gpu else "cpu")
        self.tok = self.loaded.tokenizer
        self.vocab = len(self.tok)  # the token ids a prompt may give
        # An empty prompt is the one token the evaluator gives it (encode_prompts): the model needs one.
        empty = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        self.empty = [empty] if empty is not None else []
        self.lock = threading.Lock()  # one forward pass at a time per replica
        eos = self.loaded.model.generation_config.eos_token_id
        self.eos = ({self.tok.eos_token_id} | set(eos if isinstance(eos, list) else [eos])) - {None}
        # The engines throughput was measured with: on CPU a batch of up to MAX_ROWS sequences on a
        # dynamic cache, eager; on a GPU a static KV cache with a compiled step, one request at a time
        # (the cache is the replica's), and the batch for requests longer than it. (build_app has
        # validated ``engine``.)
        # A model spread over several GPUs (``gpus``) decodes eagerly, batched: its layers live on
        # different devices, which a compiled step over one static cache does not take.
        spread = self.loaded.device == "cuda" and torch.cuda.device_count() > 1
        engine = engine or ("static" if self.loaded.device == "cuda" and not spread else "dynamic")
        self.static = Decoder(self.loaded.model, static=True, compiled=self.loaded.device == "cuda") \
            if engine == "static" else None
        self.static_worker = _StaticWorker(self.static, self.lock) if self.static is not None else None
        self.threads = torch.get_num_threads()
        # (a multimodal wrapper, Gemma 3's, keeps it in its text config)
        self.context = int(getattr(self.loaded.model.config.get_text_config(), "max_position_embeddings", 0) or 1 << 30)
        self.engine = f"{engine} KV cache"
        if self.static is not None and self.static.compiled:
            self.static_worker.call(self.static.warm_up)  # in the thread that decodes: its CUDA graphs
            self.engine += ", compiled step"
        # after the static cache: the batch's budget is a share of the memory left free
        self.batch = _Batch(self.loaded.model, self.lock, MAX_ROWS, kv_cache_tokens)
        if self.static is None and self.batch.free is not None and self.batch.longest < MIN_KV_CACHE_TOKENS:
            # the batch answers every request here: a replica that would refuse (almost) all of them with a 400
            raise RuntimeError(f"the batch's KV cache would hold only {self.batch.longest} tokens ({self.batch.free / 2**30:.1f} "
                               f"GiB free where the model was loaded): free memory, or set {KV_CACHE_TOKENS_ENV}")
        self.engine += ", one request at a time" if self.static is not None else f", batches of up to {MAX_ROWS}"

    # -- generation ----------------------------------------------------------------------------
    def _check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.name:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves `{self.name}`.",
                           "invalid_request_error", "model_not_found")

    def _tokens(self, prompt: str, special: bool = True) -> list[int]:
        return self.tok(prompt, add_special_tokens=special)["input_ids"]

    def _prompt_ids(self, prompt: Union[str, list[int]]) -> list[int]:
        if isinstance(prompt, str):
            return self._tokens(prompt) or self.empty
        bad = next((t for t in prompt if not 0 <= t < self.vocab), None)
        if bad is not None:  # (an id past the embeddings fails the forward pass, on CUDA the whole replica)
            raise ApiError(400, f"Token id {bad} is not in this model's vocabulary (0 to {self.vocab - 1}).",
                           "invalid_request_error", "invalid_prompt")
        return prompt or self.empty

    def _limit(self, ids: list[int], max_tokens: Optional[int]) -> int:
        """An answer's token limit: ``max_tokens`` within the room the context leaves the prompt; not
        given, that room (on the static cache its own, when ample), on the batch cut to what its KV
        cache leaves the prompt. An answer for the batch that could not fit its cache even alone is
        refused before anything runs (it would wait forever). The batch's ``longest`` row counts as its
        ``fits`` does (sliding-window layers keep only their window)."""
        room = self.context - len(ids)  # _respond has checked the prompt fits
        if max_tokens is None:
            static_room = self.static.max_len - len(ids) if self.static is not None else 0
            cap = self.batch.longest - len(ids)  # the most the batch's cache holds beside the prompt
            if static_room >= STATIC_DEFAULT_ROOM or 0 < static_room and cap <= static_room:
                return static_room  # (the static cache answers it: the batch's budget is not its limit)
            max_tokens = max(1, cap)
        max_tokens = min(max_tokens, room)
        if (self.static is None or not self.static.fits(len(ids), max_tokens)) and len(ids) + max_tokens > self.batch.longest:
            raise ApiError(400, f"This request needs {len(ids) + max_tokens} tokens of KV cache ({len(ids)} of prompt, "
                                f"{max_tokens} to generate); this replica holds {self.batch.longest}: ask for fewer "
                                "max_tokens or a shorter prompt.", "invalid_request_error", "context_length_exceeded")
        if (self.static is None or not self.static.fits(len(ids), max_tokens)) and len(ids) > self.batch.tokens:
            raise ApiError(400, f"This request's prompt of {len(ids)} tokens needs more KV cache while it is read than "
                                f"this replica holds ({self.batch.tokens} tokens): send a shorter prompt.",
                           "invalid_request_error", "context_length_exceeded")
        return max_tokens

    def _start(self, ids: list[int], req: _Sampling, max_tokens: int) -> "_Sequence":
        """Start generating an answer to ``ids`` of at most ``max_tokens`` (``_limit``); its ``results()``
        yield (text delta, finish reason or None, completion tokens so far), the last item with a
        reason. The batch takes it once its KV cache holds it, the static cache (one request at a time)
        once the requests before it are done."""
        seq = _Sequence(self.tok, self.eos, ids, req, max_tokens, self.loaded.device)
        if self.static is not None and self.static.fits(len(ids), max_tokens):
            self.static_worker.submit(seq)
        else:
            self.batch.submit(seq)
        return seq

    async def _respond(self, req: _Sampling, ids: list[list[int]], chat: bool, max_tokens: Optional[int]):
        for p in ids:  # before a stream starts: an error there could not be a 400 any more
            if not p:
                raise ApiError(400, "The prompt is empty: give at least one token.", "invalid_request_error", "invalid_prompt")
            if len(p) >= self.context:
                raise ApiError(400, f"This model's maximum context length is {self.context} tokens; the prompt has "
                               f"{len(p)}. Shorten it.", "invalid_request_error", "context_length_exceeded")
        limits = [self._limit(p, max_tokens) for p in ids]
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created, "model": self.name}
        if req.stream:
            return StreamingResponse(self._stream(req, ids, chat, limits, head), media_type="text/event-stream")
        choices, used, answers = [], 0, []
        try:
            answers += [self._start(p, req, n) for p, n in zip(ids, limits)]  # all prompts batched
            for i, answer in enumerate(answers):
                parts = [item async for item in answer.aresults()]
                text, reason, used = "".join(d for d, _, _ in parts), parts[-1][1], used + parts[-1][2]
                body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
                choices.append({"index": i, **body, "finish_reason": reason})
        finally:  # its client gone (Serve cancels the route), or one that failed: the others decode for nobody
            for answer in answers:
                answer.cancel()
        n_prompt = sum(len(p) for p in ids)
        return {**head, "choices": choices, "usage": {"prompt_tokens": n_prompt, "completion_tokens": used, "total_tokens": n_prompt + used}}

    async def _stream(self, req: _Sampling, ids: list[list[int]], chat: bool, limits: list[int],
                      head: dict) -> AsyncIterator[str]:
        """The answers as server-sent events. An async generator: a client that disconnects cancels it
        at once (Serve cancels the request), and ``finally`` takes its answers off the engines (a
        sync one would wait for a garbage collection to be closed)."""
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        used, answers, error = 0, [], None
        try:
            answers += [self._start(p, req, n) for p, n in zip(ids, limits)]
            for i, answer in enumerate(answers):
                if chat:
                    yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
                async for delta, reason, n in answer.aresults():
                    if delta or reason:
                        body = {"delta": {"content": delta} if delta else {}} if chat else {"text": delta, "logprobs": None}
                        yield _sse({**head, "choices": [{"index": i, **body, "finish_reason": reason}]})
                    if reason:
                        used += n
        except Exception as e:  # noqa: BLE001 -- e.g. out of memory: the 200 is sent, the error is the last event
            error = e if isinstance(e, ApiError) else ApiError(500, f"generation failed: {type(e).__name__}: {e}",
                                                                "server_error")
            if error is not e:  # (an engine's failure is logged where it happened)
                log.exception("streaming an answer failed")
        finally:  # a client gone: its answers leave the batch or the static cache
            for answer in answers:
                answer.cancel()
        if error is not None:  # as vLLM sends it: the openai client raises APIError with it
            yield _sse(_error_body(error.message, error.type, error.code))
            yield "data: [DONE]\n\n"
            return
        if (req.stream_options or {}).get("include_usage"):
            n_prompt = sum(len(p) for p in ids)
            yield _sse({**head, "choices": [], "usage": {"prompt_tokens": n_prompt, "completion_tokens": used, "total_tokens": n_prompt + used}})
        yield "data: [DONE]\n\n"

    # -- routes ----------------------------------------------------------------------------------
    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "model": self.name, "device": self.loaded.device, "engine": self.loaded.engine,
                "decoding": self.engine, "batch": {"max_rows": MAX_ROWS, "rows": len(self.batch.rows), "peak_rows": self.batch.peak,
                          "kv_cache_tokens": self.batch.tokens},
                "threads": self.threads, "api_key": self.api_key is not None}

    def _card(self) -> dict:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "quantselect", "engine": self.loaded.engine}

    @api.get("/v1/models")
    def models(self) -> dict:
        return {"object": "list", "data": [self._card()]}

    @api.get("/v1/models/{model_id}")
    def retrieve_model(self, model_id: str) -> dict:  # (the openai client's models.retrieve)
        self._check_model(model_id)
        return self._card()

    # The generation routes are coroutines: Serve cancels one whose client has gone, which a route run
    # in a thread would not notice. The tokenizer runs in a thread (a long prompt would hold the loop).
    @api.post("/v1/completions")
    async def completions(self, req: CompletionRequest):
        from starlette.concurrency import run_in_threadpool

        self._check_model(req.model)
        ids = await run_in_threadpool(lambda: [self._prompt_ids(p) for p in req.prompt])
        return await self._respond(req, ids, False, 16 if req.max_tokens is None else req.max_tokens)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatRequest):
        from starlette.concurrency import run_in_threadpool

        self._check_model(req.model)
        ids = await run_in_threadpool(self._chat_ids, req)
        return await self._respond(req, [ids], True, req.max_completion_tokens or req.max_tokens)  # None: the room left

    def _chat_ids(self, req: ChatRequest) -> list[int]:
        """The messages through the model's chat template, as the evaluator renders them (``developer``,
        OpenAI's newer name for the system turn, as ``system``; no template: refused, as there)."""
        if not getattr(self.tok, "chat_template", None):  # (an invented format would answer what was never evaluated)
            raise ApiError(400, "This model has no chat template (not an instruct model?): send the prompt as text to "
                                "/v1/completions.", "invalid_request_error", "no_chat_template")
        from jinja2 import TemplateError

        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except (TemplateError, ValueError, TypeError) as e:  # e.g. "System role not supported", roles not alternating
            raise ApiError(400, f"This model's chat template refuses these messages: {e}", "invalid_request_error",
                           "invalid_messages") from None
        return self._tokens(prompt, special=False)  # the template already holds the special tokens


def check_engine(engine: Optional[str]) -> None:
    if engine not in (None, "static", "dynamic"):
        raise InputError(f"engine {engine!r}: give static (a static KV cache, one request at a time) "
                         "or dynamic (requests batched)")


def kv_cache_tokens(env: Optional[dict] = None) -> Optional[int]:
    """QUANTSELECT_SERVE_KV_CACHE_TOKENS: the batch's KV cache budget in tokens (unset: a share of the
    memory the replica finds free)."""
    raw = ((os.environ if env is None else env).get(KV_CACHE_TOKENS_ENV) or "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise InputError(f"{KV_CACHE_TOKENS_ENV}={raw!r}: give the tokens a replica's batched KV cache may hold, "
                         "a positive integer such as 65536 (or leave it unset: a share of its free memory)")
    return int(raw)


def build_app(name: str, model_path: str, config: dict, use_gpu: bool = False,
              engine: Optional[str] = None, api_key: Optional[str] = None, gpus: int = 1) -> serve.Application:
    """Pure builder: the Serve application serving ``model_path`` quantized as ``config``; ``engine``:
    ``static`` or ``dynamic`` KV cache (default: static on one GPU, dynamic on CPU or several GPUs);
    ``api_key``: the key its /v1 routes ask for (None: none); ``gpus``: GPUs per replica with
    ``use_gpu``, the layers split over them (a candidate too large for one, as its job ran it). The
    batch's KV cache budget is QUANTSELECT_SERVE_KV_CACHE_TOKENS where it is built, if set."""
    config_from_dict(config)  # fail here, with an InputError, rather than in a replica
    check_engine(engine)
    tokens = kv_cache_tokens()
    if gpus < 1:
        raise InputError(f"gpus {gpus}: give at least 1 GPU per replica")
    if use_gpu and gpus > 1 and engine == "static":
        raise InputError(f"engine static: a model split over {gpus} GPUs decodes with the batch (engine dynamic); "
                         "its layers live on different devices, which the compiled static step does not take")
    resources = {"num_cpus": 0, **({"num_gpus": gpus} if use_gpu else {})}
    return QuantizedModelServer.options(ray_actor_options=resources).bind(name, model_path, config, use_gpu, engine,
                                                                          api_key, tokens)


class AppArgs(BaseModel):
    """Arguments of ``app_builder`` (the ``args`` of a Serve config file application)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    model_path: str
    config: Union[str, dict[str, Any]]  # a catalogue name ("int4") or a CandidateConfig.to_dict()
    use_gpu: bool = False
    gpus: int = 1  # with use_gpu: GPUs per replica, the model's layers split over them
    engine: Optional[Literal["static", "dynamic"]] = None


def app_builder(args: dict) -> serve.Application:
    """Application builder for ``serve run`` / ``serve deploy`` config files. The API key, if any, is
    QUANTSELECT_SERVE_API_KEY where the application is built (the application's ``runtime_env``)."""
    from quantselect.settings import get_settings

    a = AppArgs.model_validate(args)
    if isinstance(a.config, str):
        if a.config not in CATALOG:
            raise ValueError(f"unknown candidate {a.config!r}; known: {', '.join(CATALOG)}")
        config = CATALOG[a.config].to_dict()
    else:
        config = a.config
    return build_app(a.name, a.model_path, config, a.use_gpu, a.engine, get_settings().serve_api_key, a.gpus)
