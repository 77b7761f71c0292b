"""Fit planner: from a model's ``config.json`` alone (no weights), the memory each precision needs
and how many GPUs of a given size it takes. Pure arithmetic, so it works for a 70B model whose
weights are not on this machine.

Counted per precision:
- weights: the decoder's linear layers at the precision's bytes per weight, including its scale /
  zero-point overhead (per channel for 8-bit, per group of 128 for 4-bit, per block of 64 for NF4);
  a mixture of experts holds every expert; embeddings, norms, routers and the output projection
  stay in 16-bit (as quantselect and GPTQ/AWQ do);
- KV cache: 2 (K and V) × KV heads × head dim × batch × 2 bytes (16-bit cache) × the tokens each
  layer keeps: the context, or at most its window for a sliding-window layer (Mistral-7B-v0.1's
  every layer, Gemma-2's every other, 5 of 6 of Gemma-3's) or its chunk for a chunked-attention one
  (3 of 4 of Llama-4's); Multi-head Latent Attention (DeepSeek-V2/V3, Kimi-K2) caches one latent of
  kv_lora_rank + qk_rope_head_dim values per token and layer instead, as vLLM and SGLang do;
- runtime headroom: activations, CUDA context and allocator slack, taken as 10 % of the GPU plus
  1 GiB. A model that does not fit one GPU is split by tensor parallelism over a power-of-two
  number of GPUs (1, 2, 4, 8), the weights divided evenly and the KV cache by KV heads (a GPU holds
  at least one head's: MLA's one latent is whole on every GPU, as vLLM keeps it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from quantselect.domain.gpus import GPUS as GPU_SPECS
from quantselect.domain.gpus import gpu as gpu_spec
from quantselect.errors import InputError

GIB = 1024**3

# Bytes per weight of the decoder's linear layers, scales and zero points included.
PRECISIONS: dict[str, tuple[float, str]] = {
    "bf16": (2.0, "16-bit floating point"),
    "fp8": (1.0 + 4 / 4096, "fp8 e4m3, one fp32 scale per output row (of ~4096 weights)"),
    "int8": (1.0 + 2 / 4096, "int8 weights, one 16-bit scale per output channel"),
    "int4": (0.5 + 4 / 128, "int4 weights, 16-bit scale and zero point per group of 128 (GPTQ/AWQ/RTN)"),
    "nf4": (0.5 + 1 / 64 + 4 / (64 * 256), "NF4 (bitsandbytes), 8-bit absmax per block of 64, double-quantized"),
}

# GPU memory of common inference GPUs (GiB as the driver reports usable memory, rounded down).
GPUS: dict[str, float] = {name: spec.memory_gib for name, spec in GPU_SPECS.items()}

HEADROOM_FRACTION = 0.10
HEADROOM_BYTES = 1 * GIB


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int  # the MLP of a dense layer
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    max_context: int | None
    attention_bias: bool
    mlp_matrices: int = 3  # gate, up, down; 2 (up, down) for a non-gated MLP (GPT-2, StarCoder2, Phi-2...)
    sliding_window: int | None = None
    # layers whose KV cache keeps only the last ``sliding_window`` tokens (or, for Llama-4's chunked
    # attention, the tokens of the current chunk of that size: as many, at most)
    sliding_layers: int = 0
    # a mixture of experts: ``moe_layers`` layers route each token to ``experts_per_token`` of
    # ``experts`` MLPs of ``expert_intermediate``, plus shared experts of ``shared_intermediate`` in all
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    moe_layers: int = 0
    # Multi-head Latent Attention (DeepSeek-V2/V3, Kimi-K2): K and V are expanded (kv_b_proj) from a
    # latent of ``kv_lora_rank`` plus a rope key of ``qk_rope_head_dim`` all heads share, which is all
    # the cache holds; ``head_dim`` is then the value head's (o_proj's input per head)
    kv_lora_rank: int = 0
    q_lora_rank: int = 0  # 0: one q_proj (DeepSeek-V2-Lite), else q_a_proj -> q_b_proj
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0

    def _attention(self) -> int:
        o = self.heads * self.head_dim * self.hidden
        if not self.kv_lora_rank:
            return self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + o
        qk = self.heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
        q = (self.hidden + qk) * self.q_lora_rank if self.q_lora_rank else self.hidden * qk
        kv_a = self.hidden * (self.kv_lora_rank + self.qk_rope_head_dim)
        kv_b = self.kv_lora_rank * self.heads * (self.qk_nope_head_dim + self.head_dim)
        return q + kv_a + kv_b + o

    def _linear(self, experts: int) -> int:
        mlp = self.mlp_matrices * self.hidden * self.intermediate
        moe = self.mlp_matrices * self.hidden * (experts * self.expert_intermediate + self.shared_intermediate)
        return self.layers * self._attention() + (self.layers - self.moe_layers) * mlp + self.moe_layers * moe

    @property
    def linear_params(self) -> int:
        """Weights of the decoder's linear layers (what quantization shrinks), every expert counted."""
        return self._linear(self.experts)

    @property
    def active_linear_params(self) -> int:
        """The linear weights one token computes with: its top-k experts only."""
        return self._linear(self.experts_per_token)

    def linear_params_read(self, batch: int) -> int:
        """The linear weights a decode step of ``batch`` sequences reads: at most ``batch × k`` experts
        per layer (an upper bound: tokens of a batch often share experts)."""
        return self._linear(min(self.experts, batch * self.experts_per_token))

    @property
    def other_params(self) -> int:
        """Embeddings, output projection, norms, biases and routers: kept in 16-bit."""
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        norms = self.layers * (2 * self.hidden + self.q_lora_rank + self.kv_lora_rank) + self.hidden
        bias = self.layers * (self.heads + 2 * self.kv_heads) * self.head_dim if self.attention_bias else 0
        return emb + norms + bias + self.moe_layers * self.hidden * self.experts

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    @property
    def active_params(self) -> int:
        return self.params - self.linear_params + self.active_linear_params

    def kv_tokens(self, context: int) -> int:
        """Tokens of one sequence's KV cache, summed over the layers (sliding-window layers keep their window)."""
        window = min(context, self.sliding_window or context)
        return (self.layers - self.sliding_layers) * context + self.sliding_layers * window

    @property
    def kv_per_token_layer(self) -> int:
        """Values one token's cache holds in one layer: K and V of every KV head, or MLA's latent."""
        return self.kv_lora_rank + self.qk_rope_head_dim if self.kv_lora_rank else 2 * self.kv_heads * self.head_dim

    @property
    def kv_shards(self) -> int:
        """What tensor parallelism splits the cache by: the KV heads (one MLA latent)."""
        return 1 if self.kv_lora_rank else self.kv_heads

    def kv_cache_bytes(self, context: int, batch: int, bytes_per_element: int = 2) -> int:
        return self.kv_per_token_layer * self.kv_tokens(context) * batch * bytes_per_element


# model types whose transformers 5 config class ties the embeddings unless told otherwise (besides
# every *gemma* one); Llama, Mistral, Qwen2 and Qwen3 do not
TIED_BY_DEFAULT = frozenset({"smollm3", "cohere", "cohere2", "starcoder2", "falcon", "opt", "bloom", "gpt2",
                             "gpt_bigcode", "ernie4_5", "lfm2", "minicpm3"})


def tied_by_default(model_type: str | None) -> bool:
    """transformers' default for ``tie_word_embeddings`` when a config.json omits it."""
    return "gemma" in (model_type or "") or model_type in TIED_BY_DEFAULT


def _tied(outer: dict[str, Any], text: dict[str, Any]) -> bool:
    """Whether the output head shares the input embedding: the outer config's flag (the top-level
    model of a multimodal wrapper owns the head), else the language model's own (older checkpoints
    saved it there), else transformers' default for the language model's type."""
    for c in (outer, text):
        if c.get("tie_word_embeddings") is not None:
            return bool(c["tie_word_embeddings"])
    return tied_by_default(text.get("model_type") or outer.get("model_type"))


# transformers' config-class defaults for the shape fields a config.json may leave out (multimodal
# checkpoints do: gemma-3-4b-it's text_config gives no heads, head dim or vocabulary); read off the
# config classes of transformers 5, not imported here (the domain layer must not import it)
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma3_text": {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "sliding_window": 4096,
                    "max_position_embeddings": 131072},
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "max_position_embeddings": 2048},
    "mistral": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "sliding_window": 4096,
                "max_position_embeddings": 131072},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "use_sliding_window": False,
              "max_position_embeddings": 32768},
}
# the language model's type when a wrapper's text_config does not say
TEXT_MODEL_TYPE = {"gemma3": "gemma3_text", "llava": "llama", "llava_next": "llama", "mistral3": "mistral"}
# families whose MLP is up -> activation -> down (no gate): 2 matrices, not 3
NON_GATED = frozenset({"gpt2", "gpt_bigcode", "starcoder2", "phi", "gpt_neox", "gpt_neo", "gptj", "codegen", "opt",
                       "falcon", "bloom", "mpt", "persimmon", "nemotron"})
# families whose config class defaults the MLP width to 4 x hidden (gpt2's n_inner: null)
FOUR_X_MLP = frozenset({"gpt2", "gpt_bigcode", "gptj", "gpt_neo", "codegen", "falcon", "bloom"})
# the default period of full-attention layers among sliding ones (layer i slides unless (i+1) % n == 0)
SLIDING_PATTERN = {"gemma2": 2, "gemma3_text": 6, "gemma3": 6, "cohere2": 4, "gpt_oss": 2}
# Llama-4's language model (its GGUF architecture is llama4): one shared expert, chunked attention
LLAMA4 = frozenset({"llama4_text", "llama4"})


def _sliding(cfg: dict[str, Any], layers: int, model_type: str | None) -> tuple[int | None, int]:
    """(window, layers that use it), as transformers builds ``layer_types``."""
    window = cfg.get("sliding_window")
    if not isinstance(window, int) or window <= 0 or cfg.get("use_sliding_window") is False:
        return None, 0  # Qwen2/3 carry a window they do not use
    types = cfg.get("layer_types")
    if isinstance(types, list) and types:
        return window, sum(t == "sliding_attention" for t in types[:layers])
    pattern = (cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern")
               or SLIDING_PATTERN.get(model_type or ""))
    if isinstance(pattern, int) and pattern > 0:
        return window, sum(1 for i in range(layers) if (i + 1) % pattern)
    if cfg.get("use_sliding_window") and isinstance(cfg.get("max_window_layers"), int):
        return window, max(0, layers - cfg["max_window_layers"])  # Qwen2/3: the layers from max_window_layers on
    return window, layers  # Mistral-7B-v0.1, Phi-3, StarCoder2: every layer


def _chunked(cfg: dict[str, Any], layers: int, model_type: str | None) -> tuple[int | None, int]:
    """(chunk size, layers that use it) of chunked local attention, as transformers builds Llama-4's
    ``layer_types``: a layer with RoPE (no_rope_layers 1; by default 3 of every 4) attends within its
    chunk of attention_chunk_size tokens, so it keeps at most that many."""
    types, no_rope = cfg.get("layer_types"), cfg.get("no_rope_layers")
    if isinstance(types, list) and "chunked_attention" in types:
        n = sum(t == "chunked_attention" for t in types[:layers])
    elif model_type not in LLAMA4:
        return None, 0
    elif isinstance(no_rope, list) and no_rope:
        n = sum(1 for x in no_rope[:layers] if x)
    else:
        interval = cfg.get("no_rope_layer_interval") or 4
        n = sum(1 for i in range(layers) if (i + 1) % interval)
    chunk = cfg.get("attention_chunk_size", 8192)  # Llama4TextConfig's default (and llama.cpp's); null: off
    return (chunk, n) if isinstance(chunk, int) and chunk > 0 else (None, 0)


def _experts(cfg: dict[str, Any], layers: int, intermediate: int, model_type: str | None) -> dict[str, int]:
    """A mixture of experts' fields of ``Shape`` (none for a dense model): Mixtral (num_local_experts of
    intermediate_size), Qwen2/3-MoE (num_experts of moe_intermediate_size, a shared expert,
    decoder_sparse_step, mlp_only_layers), DeepSeek (n_routed_experts + n_shared_experts, the first
    first_k_dense_replace layers dense), Llama-4 (one shared expert; moe_layers, or every
    interleave_moe_layer_step-th layer)."""
    experts = next((cfg[n] for n in ("num_local_experts", "num_experts", "n_routed_experts")
                    if isinstance(cfg.get(n), int) and cfg[n] > 0), 0)
    if not experts:
        return {}
    width = cfg.get("moe_intermediate_size") or intermediate
    shared = cfg.get("shared_expert_intermediate_size") or (cfg.get("n_shared_experts") or 0) * width
    if model_type in LLAMA4:
        shared = width
    first, dense = cfg.get("first_k_dense_replace") or 0, set(cfg.get("mlp_only_layers") or ())
    step = cfg.get("decoder_sparse_step") or cfg.get("interleave_moe_layer_step") or 1
    freq, listed = cfg.get("moe_layer_freq") or 1, cfg.get("moe_layers")
    if isinstance(listed, list) and all(isinstance(i, int) for i in listed):
        moe = len({i for i in listed if 0 <= i < layers})  # Llama-4 lists them (interleave_moe_layer_step's)
    else:
        moe = sum(1 for i in range(layers)
                  if i >= first and i not in dense and (i + 1) % step == 0 and i % freq == 0)
    # without num_experts_per_tok, count every expert as active (the slower, safer estimate)
    return {"experts": experts, "experts_per_token": min(experts, cfg.get("num_experts_per_tok") or experts),
            "expert_intermediate": int(width), "shared_intermediate": int(shared), "moe_layers": moe}


def shape_from_config(cfg: dict[str, Any], where: str = "config.json") -> Shape:
    """Read the decoder's shape from a Hugging Face ``config.json`` (Llama, Mistral, Qwen2/3, Gemma,
    their mixtures of experts, GPT-2-style models...); fields a multimodal wrapper's ``text_config``
    omits take its family's defaults (transformers writes a sub-config's differences from them only;
    a model's own config.json, or a GGUF header, lacking one is refused, naming the field)."""
    if not isinstance(cfg, dict):  # a JSON file, but [1, 2] or null
        raise InputError(f"{where}: not a JSON object")
    outer = cfg
    cfg = cfg.get("text_config")  # multimodal wrappers keep the language model's config inside
    cfg = outer if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise InputError(f"{where}: field 'text_config' is not a JSON object")
    for c, name in ((outer, "model_type"), (cfg, "text_config.model_type")):  # looked up below: hashable
        if c.get("model_type") is not None and not isinstance(c["model_type"], str):
            raise InputError(f"{where}: field {name!r} must be a string, such as \"llama\"")
    model_type = cfg.get("model_type") or TEXT_MODEL_TYPE.get(outer.get("model_type") or "", outer.get("model_type"))
    if cfg is not outer:
        cfg = {**FAMILY_DEFAULTS.get(model_type or "", {}), **cfg}

    def get(*names: str) -> int | None:
        return next((int(cfg[n]) for n in names if isinstance(cfg.get(n), int) and cfg[n] > 0), None)

    def need(*names: str) -> int:
        value = get(*names)
        if value is None:
            raise InputError(f"{where}: field {names[0]!r} is missing or not a positive integer")
        return value

    hidden = need("hidden_size", "n_embd", "d_model")
    heads = need("num_attention_heads", "n_head", "num_heads")
    layers = need("num_hidden_layers", "n_layer", "num_layers")
    if model_type in FOUR_X_MLP:
        intermediate = get("intermediate_size", "n_inner", "ffn_hidden_size") or 4 * hidden
    else:
        intermediate = need("intermediate_size", "n_inner", "ffn_dim")
    if get("num_key_value_heads"):
        kv = need("num_key_value_heads")
    elif cfg.get("new_decoder_architecture") and get("num_kv_heads"):
        kv = need("num_kv_heads")  # Falcon-40B/180B: grouped KV heads
    else:
        kv = 1 if cfg.get("multi_query") else heads  # StarCoder, Falcon-7B: one KV head
    head_dim = get("head_dim") or hidden // heads
    mla = {}
    if get("kv_lora_rank"):  # DeepSeek-V2/V3, Kimi-K2; the multi-token-prediction layers
        # (num_nextn_predict_layers) are left out: transformers and vLLM load them only to speculate
        mla = {"kv_lora_rank": need("kv_lora_rank"), "q_lora_rank": get("q_lora_rank") or 0,
               "qk_nope_head_dim": need("qk_nope_head_dim"), "qk_rope_head_dim": need("qk_rope_head_dim")}
        head_dim = get("v_head_dim") or hidden // heads  # MiniCPM3 leaves it out (its model derives it so)
    window, sliding = _sliding(cfg, layers, model_type)
    if not sliding:
        window, sliding = _chunked(cfg, layers, model_type)
    return Shape(
        # Llama-4: intermediate_size is an expert's width, intermediate_size_mlp a dense layer's
        hidden=hidden, intermediate=get("intermediate_size_mlp") or intermediate, layers=layers,
        heads=heads, kv_heads=kv, head_dim=head_dim, vocab=need("vocab_size"),
        tied=_tied(outer, cfg),
        max_context=get("max_position_embeddings", "n_positions"),
        attention_bias=bool(cfg.get("attention_bias", model_type in ("qwen2", "qwen2_moe"))),
        mlp_matrices=2 if model_type in NON_GATED else 3,
        sliding_window=window, sliding_layers=sliding,
        **_experts(cfg, layers, intermediate, model_type), **mla,
    )


def fmt_bytes(n: float | None) -> str:
    """Bytes for people: ``512 B``, ``210.1 MiB``, ``1.4 GiB`` (the inverse of parse_memory)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def parse_memory(text: str) -> float:
    """'24GiB', '24 GB', '80' (GiB) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m)?\s*", text.lower())
    if not m:
        raise InputError(f"--gpu-memory {text!r}: expected a size such as 24GiB or 80GB")
    value, unit = float(m.group(1)), m.group(2) or "gib"
    factor = {"gib": GIB, "g": GIB, "gb": 1e9, "mib": 1024**2, "m": 1024**2, "mb": 1e6}[unit]
    if value <= 0:
        raise InputError(f"--gpu-memory {text!r} must be positive")
    return value * factor


@dataclass(frozen=True)
class PlanRow:
    precision: str
    description: str
    weight_bytes: float
    kv_cache_bytes: float
    total_bytes: float
    gpus: int | None  # GPUs needed (power of two, at most 8); None when even 8 are not enough
    fits_one_gpu: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# Bytes per element of the KV cache: 16-bit by default; fp8 as vLLM's --kv-cache-dtype fp8 and
# TensorRT-LLM store it (half the memory, for long contexts and large batches).
KV_CACHE_DTYPES = {"bf16": 2, "fp16": 2, "fp8": 1}
# The longest context planned: beyond any published model's (Llama-4 Scout's 10M tokens); past it a
# mistyped --context only prints absurd sizes. Past the model's own maximum is a note, not an error:
# RoPE scaling (YaRN...) can stretch it.
MAX_CONTEXT = 1 << 24


def plan(shape: Shape, gpu_memory_bytes: float, context: int, batch: int, kv_cache: str = "bf16",
         files: dict[str, tuple[float, str]] | None = None) -> list[PlanRow]:
    """A row per precision; ``files``: rows whose weight bytes are known exactly (name ->
    (bytes, description)), e.g. the GGUF file being planned."""
    if context < 1 or batch < 1:
        raise InputError("context and batch must be at least 1")
    if context > MAX_CONTEXT:
        raise InputError(f"context {context:,} tokens is more than the planner takes ({MAX_CONTEXT:,}, longer "
                         "than any model reads); give a smaller context")
    if kv_cache not in KV_CACHE_DTYPES:
        raise InputError(f"KV cache dtype {kv_cache!r} must be one of {', '.join(KV_CACHE_DTYPES)}")
    kv = shape.kv_cache_bytes(context, batch, KV_CACHE_DTYPES[kv_cache])
    rows = []
    sized = [(name, shape.linear_params * bytes_per_weight + shape.other_params * 2, description)
             for name, (bytes_per_weight, description) in PRECISIONS.items()]
    for name, weights, description in sized + [(n, w, d) for n, (w, d) in (files or {}).items()]:
        gpus = _gpus(weights, kv, shape.kv_shards, gpu_memory_bytes)
        rows.append(PlanRow(name, description, weights, kv, weights + kv, gpus, gpus == 1))
    return rows


def _gpus(weights: float, kv: float, shards: int, gpu_memory_bytes: float) -> int | None:
    """GPUs (1, 2, 4 or 8, tensor parallel) each holding 1/n of the weights and its KV heads' share of
    the cache: ceil(heads / n) of them, as vLLM replicates a head over GPUs when there are fewer."""
    usable = usable_gpu_memory(gpu_memory_bytes)
    return next((n for n in (1, 2, 4, 8) if weights / n + kv * -(-shards // n) / shards <= usable), None)


def plan_notes(shape: Shape, context: int) -> list[str]:
    """What a reader of the plan should know about its figures, one line each."""
    notes = []
    if shape.max_context and context > shape.max_context:
        notes.append(f"context {context:,} is beyond the model's max_position_embeddings ({shape.max_context:,}): "
                     "it needs its RoPE scaled further (e.g. YaRN), and quality may drop")
    if shape.kv_lora_rank:
        notes.append(f"KV cache: Multi-head Latent Attention's compressed latent ({shape.kv_lora_rank} + "
                     f"{shape.qk_rope_head_dim} values per token and layer), as vLLM and SGLang store it; "
                     "every GPU of a tensor-parallel group holds all of it")
    return notes


def gpus_needed(total_bytes: float, gpu_memory_bytes: float) -> int | None:
    """GPUs (1, 2, 4 or 8, tensor parallel) whose memory less headroom holds ``total_bytes``."""
    usable = gpu_memory_bytes * (1 - HEADROOM_FRACTION) - HEADROOM_BYTES
    return next((n for n in (1, 2, 4, 8) if total_bytes / n <= usable), None)


def gpu_memory(gpu: str | None, memory: str | None) -> tuple[str, float]:
    if gpu and memory:
        raise InputError("give --gpu or --gpu-memory, not both")
    if memory:
        return memory, parse_memory(memory)
    try:
        spec = gpu_spec(gpu)  # the same names (and short names: H100, 4090) as a job's --target-gpu
    except InputError as e:
        raise InputError(f"{e} (or give --gpu-memory)") from None
    return spec.name, spec.memory_gib * GIB


def gpus_needed_text(gpus: int | None) -> str:
    if gpus is None:
        return "does not fit on 8"
    return "fits on 1" if gpus == 1 else f"needs {gpus}"


def check_candidate(name: str, config: Any, shape: Shape, model_type: str | None = None) -> None:
    """A grouped scheme's group size must divide the input width of every linear layer it
    quantizes (hidden size; heads x head dim for the attention output; the MLP's intermediate size);
    and its engine must take the model's architecture."""
    reason = getattr(config, "unsupported", {}).get(model_type or "")
    if reason:
        raise InputError(f"candidate {name}: {reason} (model_type {model_type})")
    group = getattr(config, "group_size", None)
    if not group:
        return
    widths = {"hidden size": shape.hidden, "attention width": shape.heads * shape.head_dim}
    if shape.moe_layers < shape.layers:
        widths["intermediate size"] = shape.intermediate
    if shape.experts:
        widths["expert intermediate size"] = shape.expert_intermediate
    bad = {k: v for k, v in widths.items() if v % group}
    if bad:
        what = ", ".join(f"{k} {v}" for k, v in bad.items())
        fits = [g for g in (16, 32, 64, 128, 256) if all(v % g == 0 for v in widths.values())]
        hint = f" (group_size={max(fits)} fits)" if fits else ""
        raise InputError(f"candidate {name}: group size {group} does not divide the model's {what}{hint}")


# ---- what one candidate's worker needs on a GPU (placement of a sweep) ----------------------------
CUDA_CONTEXT_BYTES = 0.5 * GIB  # the CUDA context and the allocator's slack of one process
EVAL_TOKENS = 2048  # padded tokens of the smallest evaluation batch worth running (the evaluator sizes
# its batches from the free memory, so a share of a GPU is enough as long as this much fits)


@dataclass(frozen=True)
class CandidateNeed:
    """GPU memory one candidate's worker needs: its weights at their precision, the working memory of
    quantizing (one layer in fp32, and for GPTQ/AWQ the layer's Hessian) and of evaluating (one batch
    of activations and fp32 logits, the KV cache of the measurement), and the CUDA context."""

    weights: float
    quantize: float
    evaluate: float
    context: float = CUDA_CONTEXT_BYTES

    @property
    def total(self) -> float:
        return self.weights + max(self.quantize, self.evaluate) + self.context

    def describe(self) -> str:
        return (f"{self.total / GIB:.1f} GiB (weights {self.weights / GIB:.1f} + working "
                f"{max(self.quantize, self.evaluate) / GIB:.1f} + CUDA context {self.context / GIB:.1f})")


def candidate_need(shape: Shape, config: Any) -> CandidateNeed:
    per_weight = config.bytes_per_weight()  # the reference (full precision) is bf16 on a GPU: 2 bytes
    weights = shape.linear_params * per_weight + shape.other_params * 2
    mlp = max(shape.intermediate, shape.expert_intermediate)
    widest = max(shape.hidden, mlp, shape.heads * shape.head_dim)
    layer = shape.hidden * mlp * 4.0  # the largest linear layer, in fp32
    hessian = widest * widest * 4.0 * 2 if getattr(config, "calibrated", False) else 0.0
    per_token = 4 * (8 * shape.hidden + 3 * shape.intermediate) + 8 * shape.vocab
    kv = shape.kv_cache_bytes(1024, 16)  # batch 16 x 1,024 tokens, 16-bit
    return CandidateNeed(weights=weights, quantize=2 * layer + hessian, evaluate=EVAL_TOKENS * per_token + kv)


def usable_gpu_memory(gpu_memory_bytes: float) -> float:
    """What one GPU holds for candidates, the planner's headroom left out."""
    return gpu_memory_bytes * (1 - HEADROOM_FRACTION) - HEADROOM_BYTES


@dataclass(frozen=True)
class Request:
    """Ray resources for one candidate: a fraction of one GPU, or ``gpus`` whole GPUs on one node
    (a placement group); ``None`` gpus when it fits on no node of the cluster (``reason`` says why)."""

    gpus: float | None
    need: CandidateNeed | None
    reason: str | None = None

    @property
    def whole_gpus(self) -> int:
        return int(self.gpus) if self.gpus and self.gpus >= 1 else 1


def gpu_request(need: CandidateNeed | None, gpu_memory_bytes: float | None, max_gpus_per_node: int) -> Request:
    """The share of a GPU (rounded up to 1/100, so Ray's fractional accounting is exact) when the
    candidate fits one GPU; else the power-of-two GPU count (≤ the largest node's) it takes; else a
    refusal with the numbers. Without a known GPU memory, one whole GPU per candidate."""
    if need is None or not gpu_memory_bytes:
        return Request(gpus=1.0, need=need)
    usable = usable_gpu_memory(gpu_memory_bytes)
    if need.total <= usable:
        return Request(gpus=min(1.0, max(0.01, -(-need.total * 100 // usable) / 100)), need=need)
    n = next((g for g in (2, 4, 8, 16) if g <= max_gpus_per_node and need.total / g <= usable), None)
    if n is None:
        return Request(gpus=None, need=need, reason=(
            f"needs {need.describe()}; the largest node has {max_gpus_per_node} GPU(s) of "
            f"{gpu_memory_bytes / GIB:.1f} GiB ({usable / GIB:.1f} GiB usable each)"))
    return Request(gpus=float(n), need=need)
