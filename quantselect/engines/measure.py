"""Measurements of a loaded candidate: memory and throughput (prefill, decode at batch 1 and 16).

Throughput is measured with the engine that serves the candidate, named next to every figure:
on CPU, transformers ``generate()`` as quantselect's Serve deployment runs it; on a GPU,
``generate()`` with a static KV cache, which transformers compiles (``torch.compile``, CUDA graphs)
-- eager generation reaches a few per cent of the bandwidth limit there and ranks quantized models
wrongly. Each figure is taken after a warm-up at the same shapes (which also pays the compilation).
"""

from __future__ import annotations

import logging
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

THROUGHPUT_PROMPT = "Write a short story about a robot who learns to paint."


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        import torch

        for i in range(torch.cuda.device_count()):  # every GPU the worker holds (a model split over several)
            torch.cuda.reset_peak_memory_stats(i)


def peak_memory_bytes(device: str) -> int:
    """CUDA peak allocated, summed over the GPUs the worker sees (a candidate too large for one is
    split over all of them: ``device_map="auto"``); the process's peak resident set size on CPU
    (each candidate runs in a fresh worker process, so this is the candidate's own peak)."""
    if device == "cuda":
        import torch

        return sum(int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count()))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass(frozen=True)
class Throughput:
    prefill_tokens_per_second: float
    decode_b1: float
    decode_b16: float
    engine: str


PREFILL_SHAPE = (4, 256)  # sequences x tokens per prefill measurement


def engine_name(device: str, note: str = "") -> str:
    if device == "cuda":
        return f"transformers generate, static cache compiled (torch.compile{note}) on cuda"
    return "transformers generate (eager) on cpu"


def kernels(model: Any) -> str:
    """The quantized linear layers' kernel classes (GPTQModel's, bitsandbytes'), if any: ``nn.Linear``
    itself (plain or holding torchao's tensors) is not named."""
    import torch

    names = sorted({type(m).__name__ for m in model.modules()
                    if type(m) is not torch.nn.Linear and "Linear" in type(m).__name__ and not list(m.children())})
    return f", kernels {'/'.join(names)}" if names else ""


class _Compileable:
    """A model's quantizer, said to be compileable: transformers leaves models of some quantizers
    (GPTQ, AWQ, bitsandbytes) uncompiled by default, and eager decoding is what a GPU must not be
    measured with; if ``torch.compile`` cannot take them, the measurement falls back and says so."""

    is_compileable = True

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@contextmanager
def _compile_allowed(model: Any) -> Iterator[str]:
    """Let transformers compile this model's decoding; yields a note for the engine name when that
    had to be forced."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or quantizer.is_compileable:
        yield ""
        return
    method = getattr(quantizer.quantization_config, "quant_method", "quantized")
    model.hf_quantizer = _Compileable(quantizer)
    try:
        yield f", forced for {getattr(method, 'value', method)}"
    finally:
        model.hf_quantizer = quantizer


def throughput(model: Any, tokenizer: Any, new_tokens: int = 32, step: Callable[[int], None] = lambda i: None
               ) -> Throughput:
    """Prefill tokens/s, and decode tokens/s at batch 1 and batch 16, each after a warm-up; on a GPU
    with the compiled static-cache engine, or -- named so, and then never used as a cost -- eager
    where ``torch.compile`` fails on the model's kernels. ``step(i)`` as step ``i`` of
    ``MEASURE_STEPS`` begins."""
    device = next(model.parameters()).device
    step(0)
    prefill = prefill_tokens_per_second(model)

    def decode(n: int = new_tokens, said: Callable[[int], None] = step, **kw: Any) -> tuple[float, float]:
        said(1)
        b1 = decode_tokens_per_second(model, tokenizer, n, batch=1, **kw)
        said(2)
        return b1, decode_tokens_per_second(model, tokenizer, n, batch=16, repeats=1, **kw)

    if device.type != "cuda":
        return Throughput(prefill, *decode(), engine_name(device.type) + kernels(model))
    gpus = len({p.device for p in model.parameters()})
    if gpus > 1:  # layers split over several GPUs: served eager and batched (the compiled static step takes
        # one device), so measured that way, and named eager: never a cost (the roofline stands in)
        return Throughput(prefill, *decode(), f"transformers generate (eager), layers split over {gpus} GPUs on cuda"
                          + kernels(model))
    with _compile_allowed(model) as note:
        if note:  # kernels outside torch (GPTQModel's Triton, bitsandbytes) tune eagerly, not while a CUDA graph records
            decode(2, lambda i: None, static=True, compiled=False)
        try:
            b1, b16 = decode(static=True)
            engine = engine_name("cuda", note)
        except Exception as e:  # noqa: BLE001 -- the compiler's errors have no common type
            log.warning("torch.compile failed on this model (%s: %s); measuring it eager", type(e).__name__, e)
            b1, b16 = decode(static=True, compiled=False)
            engine = f"transformers generate, static cache eager (torch.compile failed: {type(e).__name__}) on cuda"
    return Throughput(prefill, b1, b16, engine + kernels(model))


def _sync(device: Any) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def prefill_tokens_per_second(model: Any, shape: tuple[int, int] = PREFILL_SHAPE) -> float:
    """One forward pass over ``shape`` tokens (no cache kept), after a warm-up; the best of two."""
    import torch

    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 32000))
    ids = torch.randint(0, min(vocab, 30000), shape, generator=torch.Generator().manual_seed(0)).to(device)
    best = 0.0
    with torch.inference_mode():
        model(input_ids=ids[:, :16], use_cache=False)  # warm-up
        for _ in range(2):
            _sync(device)
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            _sync(device)
            best = max(best, ids.numel() / (time.perf_counter() - start))
    return best


def decode_tokens_per_second(model: Any, tokenizer: Any, new_tokens: int = 32, repeats: int = 2, batch: int = 1,
                             static: bool = False, compiled: bool = True) -> float:
    """Greedy decode of ``batch`` copies of one prompt (new tokens of all rows per second, prefill
    included, as a server sees it) after a warm-up; the best of ``repeats`` runs (least disturbed by
    other work on a shared machine). ``static``: a static KV cache, which transformers compiles on a
    GPU unless ``compiled`` is false."""
    import torch

    device = next(model.parameters()).device
    enc = tokenizer([THROUGHPUT_PROMPT] * batch, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=pad)
    if static:
        kwargs["cache_implementation"] = "static"
        if not compiled:
            kwargs["disable_compile"] = True
    best = 0.0
    with torch.inference_mode():
        # warm-up at the measured shapes: a static cache compiles here, once
        model.generate(**enc, **(kwargs if static else {**kwargs, "max_new_tokens": 4, "min_new_tokens": 4}))
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            out = model.generate(**enc, **kwargs)
            _sync(device)
            generated = (out.shape[1] - enc["input_ids"].shape[1]) * batch
            best = max(best, generated / (time.perf_counter() - start))
    return best
