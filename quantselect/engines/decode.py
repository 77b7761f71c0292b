"""Token-by-token decoding for the OpenAI-compatible server.

Two engines behind one interface (``prefill`` the prompt, then ``step`` a token at a time, each
returning the next token's logits):

- ``static``: a static KV cache of ``max_len`` tokens, kept and reset between requests, with the
  one-token step compiled the way transformers compiles ``generate()`` (``torch.compile``,
  reduce-overhead: CUDA graphs). This is the engine GPU throughput is measured with
  (``measure.throughput``); a step that ``torch.compile`` cannot take falls back to eager, once,
  with a warning.
- ``dynamic``: a cache that grows with the sequence, eager -- one sequence alone, the reference the
  tests hold the other engines to.

``BatchDecoder`` decodes many sequences at once with a dynamic cache, eager -- the kind of engine CPU
throughput is measured with (``generate()``, batch 16), and the server's batched engine (on a GPU:
for requests longer than the static cache, or every request with ``engine: dynamic``): sequences
join the running batch (prefilled together, left-padded, their caches merged in) and leave it when
they finish, between two steps (iteration-level, "continuous" batching). Padding is masked, and each row has its own
positions, so a row's logits are those of the sequence decoded alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

STATIC_MAX_LEN = 8192  # tokens of prompt plus answer the static cache holds (at most the model's context)


def cache_arg(model: Any) -> str:
    """The name ``forward`` takes the KV cache under: ``cache`` from transformers 5.24, which
    deprecates ``past_key_values`` (removed in 5.40); older releases know only the latter."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def cache_of(out: Any) -> Any:
    """The KV cache a forward pass returned, under either name (see ``cache_arg``)."""
    return out["cache"] if "cache" in out.keys() else out["past_key_values"]


class Decoder:
    def __init__(self, model: Any, static: bool, compiled: bool = True, max_len: int | None = None) -> None:
        self.model = model
        self.static = static
        self.compiled = static and compiled
        context = int(getattr(model.config.get_text_config(), "max_position_embeddings", 0) or STATIC_MAX_LEN)
        self.max_len = min(max_len or STATIC_MAX_LEN, context)
        self.device = next(model.parameters()).device
        self._cache: Any = None
        self._arg = cache_arg(model)
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
            self._cache = cache_of(out)
            return out.logits[0, -1].float()
        if self._cache is None:
            from transformers import StaticCache

            self._cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
        else:
            self._cache.reset()
        self._pos = len(ids)
        out = self.model(input_ids=x, **{self._arg: self._cache}, use_cache=True, logits_to_keep=1,
                         cache_position=torch.arange(len(ids), device=self.device))
        return out.logits[0, -1].float()

    def step(self, token: int) -> Any:
        """One token through the model, its key and value appended to the cache; the next logits."""
        import torch

        x = torch.tensor([[token]], device=self.device)
        if not self.static:
            out = self.model(input_ids=x, **{self._arg: self._cache}, use_cache=True)
            self._cache = cache_of(out)
            return out.logits[0, -1].float()
        kwargs = {"input_ids": x, self._arg: self._cache, "use_cache": True,
                  "cache_position": torch.tensor([self._pos], device=self.device)}
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


def cache_bytes(cache: Any) -> int:
    """Bytes a KV cache holds: every tensor of every layer (keys and values, a linear-attention layer's states)."""
    return sum(layer_bytes(layer) for layer in cache.layers)


def layer_bytes(layer: Any) -> int:
    import torch

    return sum(t.numel() * t.element_size() for t in vars(layer).values() if isinstance(t, torch.Tensor))


def free_memory(model: Any) -> int:
    """Bytes the process may still allocate where ``model`` lives. On GPUs: the least free of those
    holding its layers, times their number (``device_map="auto"`` balances the layers, and each GPU
    caches its own layers' keys and values). On CPU: the system's available memory, within the
    cgroup's limit where one is set (in a container the OOM killer counts there, while /proc/meminfo
    shows the node's)."""
    import psutil
    import torch

    gpus = {p.device for p in model.parameters() if p.device.type == "cuda"}
    if gpus:
        return min(int(torch.cuda.mem_get_info(d)[0]) for d in gpus) * len(gpus)
    free = int(psutil.virtual_memory().available)
    room = cgroup_room()
    return max(free if room is None else min(free, room), 0)


def cgroup_room(proc: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes this process's memory cgroups still let it take: the least over its cgroup and the ones
    above it (cgroup v2, or v1's memory controller), their page cache (inactive files: the model's,
    just read) counted as reclaimable, as the kubelet counts it; None where none sets a limit."""
    from pathlib import Path

    try:
        lines = Path(proc).read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2's one hierarchy
            base, files = Path(root), ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base, files = Path(root) / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        folder = base / path.strip("/")  # in a cgroup namespace the path is "/": the base is the cgroup
        for at in [folder, *folder.parents]:
            try:
                limit = (at / files[0]).read_text().strip()
                if limit != "max" and int(limit) < 1 << 60:  # (v1 writes a huge number for no limit)
                    used = int((at / files[1]).read_text())
                    stat = dict(entry.split() for entry in (at / "memory.stat").read_text().splitlines())
                    rooms.append(int(limit) - used + int(stat.get(files[2], 0)))
            except (OSError, ValueError):
                pass
            if at == base:
                break
    return min(rooms) if rooms else None


@dataclass(frozen=True)
class KVCost:
    """What a row of ``BatchDecoder``'s cache holds: ``per_token`` bytes per column (every layer's, while
    shorter than every window), ``per_row`` whatever its length (a linear-attention layer's states), less
    what its sliding-window layers do not keep: ``windows``, (window, their bytes per token) by window."""

    per_token: int
    per_row: int
    plain: bool
    windows: tuple[tuple[int, int], ...] = ()

    def row_bytes(self, width: int) -> int:
        """The bytes a row ``width`` columns wide holds, beyond ``per_row``."""
        return width * self.per_token - sum(b * max(width - window, 0) for window, b in self.windows)


class BatchDecoder:
    """Rows of sequences sharing one dynamic KV cache: ``add`` prefills new sequences and appends them
    as rows, ``step`` feeds one token per row, ``keep`` drops the finished rows. Caches whose layers
    are not all plain (sliding-window, hybrid) cannot be merged: ``can_add`` then says new rows wait
    until the batch is empty."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self._cache: Any = None
        self._arg = cache_arg(model)
        self._mask: Any = None  # [rows, cached tokens]: 0 on the left padding
        self._pos: Any = None  # [rows]: the next token's position in its own sequence

    @property
    def rows(self) -> int:
        return 0 if self._mask is None else int(self._mask.shape[0])

    def can_add(self) -> bool:
        from transformers.cache_utils import DynamicLayer

        return self._cache is None or all(type(layer) is DynamicLayer for layer in self._cache.layers)

    def kv_cache_growth(self) -> tuple[int, int, bool]:
        """``kv_cache_cost()``'s bytes per token and per row, and whether its layers are plain."""
        cost = self.kv_cache_cost()
        return cost.per_token, cost.per_row, cost.plain

    def kv_cache_cost(self) -> "KVCost":
        """Measured on an empty batch (left empty), layer by layer: what this model's transformers
        cache really stores (fp32 on CPU, MLA's keys and values expanded per head rather than vLLM's
        latent), where its sliding-window layers stop growing, and whether its layers are plain
        (``can_add``: sliding layers are not, so no row joins a running batch)."""
        import torch

        assert self._cache is None, "measured on an empty batch"
        try:
            with torch.inference_mode():
                self.add([[0]])
                one = [layer_bytes(layer) for layer in self._cache.layers]
                self.step([0])
                grown = [layer_bytes(layer) - b for layer, b in zip(self._cache.layers, one)]
                windows: dict[int, int] = {}
                for layer, b in zip(self._cache.layers, grown):
                    # a sliding layer stops at its window (DynamicSlidingWindowLayer keeps one token
                    # less between steps: counted at the window, on the safe side)
                    if b and (window := layer.get_max_length()) > 0:
                        windows[window] = windows.get(window, 0) + b
                return KVCost(sum(grown), sum(one) - sum(grown), self.can_add(), tuple(sorted(windows.items())))
        finally:
            self.keep([])

    def add(self, prompts: list[list[int]]) -> Any:
        """Prefill ``prompts`` (one forward pass, left-padded) and append them as the last rows;
        the next token's logits per new row, [len(prompts), vocab] in float32. If it fails, the rows
        already there are untouched."""
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=True, logits_to_keep=1)
        pos = mask.sum(-1)
        if self._cache is None:
            self._cache, self._mask, self._pos = cache_of(out), mask, pos
        else:
            self._merge(cache_of(out), mask, pos)
        return out.logits[:, -1].float()

    def step(self, tokens: list[int]) -> Any:
        """One token per row through the model; the next logits, [rows, vocab] in float32."""
        import torch

        x = torch.tensor(tokens, device=self.device).unsqueeze(1)
        self._mask = torch.cat([self._mask, self._mask.new_ones((self.rows, 1))], dim=1)
        out = self.model(input_ids=x, attention_mask=self._mask, position_ids=self._pos.unsqueeze(1),
                         **{self._arg: self._cache}, use_cache=True)
        self._cache, self._pos = cache_of(out), self._pos + 1
        return out.logits[:, -1].float()

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); the columns no kept row attends to are dropped."""
        import torch

        if not rows:
            self._cache = self._mask = self._pos = None
            return
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, device=self.device)
        self._cache.reorder_cache(index)  # every layer's state: keys and values, a linear-attention layer's conv and recurrent ones
        self._mask, self._pos = self._mask[index], self._pos[index]
        if self.can_add():  # plain layers: the left columns that are padding in every row go
            first = int(self._mask.any(0).int().argmax())
            if first:
                for layer in self._cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
                self._mask = self._mask[:, first:]

    def _merge(self, cache: Any, mask: Any, pos: Any) -> None:
        import torch

        width = max(self._mask.shape[1], mask.shape[1])

        def left_pad(t: Any, dim: int) -> Any:
            missing = width - t.shape[dim]
            if not missing:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        # built in full before any is assigned: a failure (out of memory) leaves the running batch as it was
        merged = [(torch.cat([left_pad(mine.keys, 2), left_pad(new.keys, 2)]),
                   torch.cat([left_pad(mine.values, 2), left_pad(new.values, 2)]))
                  for mine, new in zip(self._cache.layers, cache.layers)]
        mask, pos = torch.cat([left_pad(self._mask, 1), left_pad(mask, 1)]), torch.cat([self._pos, pos])
        for layer, (keys, values) in zip(self._cache.layers, merged):
            layer.keys, layer.values = keys, values
        self._mask, self._pos = mask, pos
