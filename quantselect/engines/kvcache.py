"""An fp8 KV cache's effect on quality, reproduced on any device (``NAME:kv_cache=fp8``).

vLLM's ``--kv-cache-dtype fp8`` stores every key (after the rotary embedding) and value in fp8 e4m3,
at a per-tensor scale of 1.0 when the checkpoint carries no KV scales (values beyond +-448 saturate),
and attention reads them back from the cache, the prompt's included. Here the keys and values are
rounded to exactly those fp8 values right before attention, in every forward pass (scoring,
generation, serving): attention sees what it would see from an fp8 cache. Rounding is idempotent, so
a cache that already holds rounded values rounds to itself.

What is reproduced is the quality, not the memory: the cache is still held in 16 (or 32) bits, and
the speed is that of the rounding, not of an fp8 cache. The cost model counts the cache at one byte
per element (``CandidateConfig.kv_bytes``).

How: an attention function wrapping the model's own (``sdpa`` or ``eager``) is registered with
transformers' ``AttentionInterface`` (and its mask function with the ``AttentionMaskInterface``) and
selected in the model's config; the scorer's own unpadded attention rounds too (``round_kv``).
"""

from __future__ import annotations

from typing import Any

FP8_MAX = 448.0  # largest finite float8_e4m3fn
PREFIX = "quantselect_kv_"  # + format + "_" + the wrapped implementation
ATTR = "quantselect_kv_cache"  # on the model's config: the format its attention rounds K and V to


def _round_fp8(x: Any) -> Any:
    import torch

    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def round_kv(module: Any, key: Any, value: Any) -> tuple[Any, Any]:
    """Keys and values as the module's KV cache stores them: unchanged for a 16-bit cache."""
    if getattr(getattr(module, "config", None), ATTR, "") == "fp8":
        return _round_fp8(key), _round_fp8(value)
    return key, value


def inner(implementation: str | None) -> str | None:
    """The attention implementation a wrapper rounds for (``sdpa``, ``eager``), or the name itself."""
    if implementation and implementation.startswith(PREFIX):
        return implementation.rsplit("_", 1)[1]
    return implementation


def _register(name: str, wrapped: str) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name in AttentionInterface._global_mapping:
        return

    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any):
        key, value = round_kv(module, key, value)
        if wrapped == "eager":  # each family's own (Gemma's caps its scores)
            import sys

            function = sys.modules[type(module).__module__].eager_attention_forward
        else:
            function = ALL_ATTENTION_FUNCTIONS[wrapped]
        return function(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[wrapped])


def emulate(model: Any, kv_cache: str) -> None:
    """Make ``model``'s attention read its keys and values as a ``kv_cache`` cache stores them."""
    if not kv_cache:
        return
    configs = [model.config] + [getattr(model.config, k) for k in ("text_config",) if hasattr(model.config, k)]
    for config in configs:
        own = inner(config._attn_implementation) or "sdpa"
        if own not in ("sdpa", "eager"):
            raise RuntimeError(f"kv_cache={kv_cache} is emulated over sdpa or eager attention, not {own}")
        name = f"{PREFIX}{kv_cache}_{own}"
        _register(name, own)
        setattr(config, ATTR, kv_cache)
        config._attn_implementation = name
