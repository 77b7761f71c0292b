"""Token-by-token decoding of one sequence, for the OpenAI-compatible server.

Two engines behind one interface (``prefill`` the prompt, then ``step`` a token at a time, each
returning the next token's logits):

- ``static``: a static KV cache of ``max_len`` tokens, kept and reset between requests, with the
  one-token step compiled the way transformers compiles ``generate()`` (``torch.compile``,
  reduce-overhead: CUDA graphs). This is the engine GPU throughput is measured with
  (``measure.throughput``); a step that ``torch.compile`` cannot take falls back to eager, once,
  with a warning.
- ``dynamic``: a cache that grows with the sequence, eager -- what CPU throughput is measured with,
  and the GPU server's engine for a request longer than the static cache.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

STATIC_MAX_LEN = 8192  # tokens of prompt plus answer the static cache holds (at most the model's context)


class Decoder:
    def __init__(self, model: Any, static: bool, compiled: bool = True, max_len: int | None = None) -> None:
        self.model = model
        self.static = static
        self.compiled = static and compiled
        context = int(getattr(model.config, "max_position_embeddings", 0) or STATIC_MAX_LEN)
        self.max_len = min(max_len or STATIC_MAX_LEN, context)
        self.device = next(model.parameters()).device
        self._cache: Any = None
        self._step: Any = None
        self._pos = 0

    def fits(self, n_prompt: int, max_tokens: int) -> bool:
        return not self.static or n_prompt + max_tokens <= self.max_len

    def prefill(self, ids: list[int]) -> Any:
        """The prompt's forward pass (eager: one shape per prompt length); the next token's logits."""
        import torch

        x = torch.tensor([ids], device=self.device)
        if not self.static:
            out = self.model(input_ids=x, use_cache=True, logits_to_keep=1)
            self._cache = out.past_key_values
            return out.logits[0, -1].float()
        if self._cache is None:
            from transformers import StaticCache

            self._cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
        else:
            self._cache.reset()
        self._pos = len(ids)
        out = self.model(input_ids=x, past_key_values=self._cache, use_cache=True, logits_to_keep=1,
                         cache_position=torch.arange(len(ids), device=self.device))
        return out.logits[0, -1].float()

    def step(self, token: int) -> Any:
        """One token through the model, its key and value appended to the cache; the next logits."""
        import torch

        x = torch.tensor([[token]], device=self.device)
        if not self.static:
            out = self.model(input_ids=x, past_key_values=self._cache, use_cache=True)
            self._cache = out.past_key_values
            return out.logits[0, -1].float()
        kwargs = dict(input_ids=x, past_key_values=self._cache, use_cache=True,
                      cache_position=torch.tensor([self._pos], device=self.device))
        if self.compiled:
            try:
                out = self._compiled_step()(**kwargs)
            except Exception as e:  # noqa: BLE001 -- the compiler's errors have no common type
                log.warning("torch.compile failed on this model (%s: %s); decoding eager", type(e).__name__, e)
                self.compiled = False  # the eager step below rewrites this position of the cache
                out = self.model(**kwargs)
        else:
            out = self.model(**kwargs)
        self._pos += 1
        # a copy: a CUDA graph's output is overwritten by its next replay
        return out.logits[0, -1].to(torch.float32, copy=True)

    def _compiled_step(self) -> Any:
        if self._step is None:
            self._step = self.model.get_compiled_call(getattr(self.model.generation_config, "compile_config", None))
        return self._step

    def warm_up(self, steps: int = 3) -> None:
        """Compile (and record the CUDA graphs) before the first request rather than during it."""
        import torch

        with torch.inference_mode():
            logits = self.prefill([int(getattr(self.model.config, "bos_token_id", None) or 1)] * 4)
            compiled, self.compiled = self.compiled, False
            logits = self.step(int(logits.argmax()))  # eager first: kernels that tune do it outside a graph
            self.compiled = compiled
            for _ in range(steps):
                logits = self.step(int(logits.argmax()))
