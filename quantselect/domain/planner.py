"""Fit planner: from a model's ``config.json`` alone (no weights), the memory each precision needs
and how many GPUs of a given size it takes. Pure arithmetic, so it works for a 70B model whose
weights are not on this machine.

Counted per precision:
- weights: the decoder's linear layers at the precision's bytes per weight, including its scale /
  zero-point overhead (per channel for 8-bit, per group of 128 for 4-bit, per block of 64 for NF4);
  embeddings, norms and the output projection stay in 16-bit (as quantselect and GPTQ/AWQ do);
- KV cache: 2 (K and V) × layers × KV heads × head dim × context × batch × 2 bytes (16-bit cache);
- runtime headroom: activations, CUDA context and allocator slack, taken as 10 % of the GPU plus
  1 GiB. A model that does not fit one GPU is split by tensor parallelism over a power-of-two
  number of GPUs (1, 2, 4, 8), the weights and KV cache divided evenly.
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
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    max_context: int | None
    attention_bias: bool

    @property
    def linear_params(self) -> int:
        """Weights of the decoder's linear layers (what quantization shrinks)."""
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down
        return self.layers * (q + kv + o + mlp)

    @property
    def other_params(self) -> int:
        """Embeddings, output projection, norms and biases: kept in 16-bit."""
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        norms = self.layers * 2 * self.hidden + self.hidden
        bias = self.layers * (self.heads + 2 * self.kv_heads) * self.head_dim if self.attention_bias else 0
        return emb + norms + bias

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


# model types whose transformers 5 config class ties the embeddings unless told otherwise (besides
# every *gemma* one); Llama, Mistral, Qwen2 and Qwen3 do not
TIED_BY_DEFAULT = frozenset({"smollm3", "cohere", "cohere2", "starcoder2", "falcon", "opt", "bloom", "gpt2",
                             "ernie4_5", "lfm2", "minicpm3"})


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


def shape_from_config(cfg: dict[str, Any], where: str = "config.json") -> Shape:
    """Read the decoder's shape from a Hugging Face ``config.json`` (Llama, Mistral, Qwen2/3, Gemma...)."""
    outer = cfg
    cfg = cfg.get("text_config", cfg)  # multimodal wrappers keep the language model's config inside

    def need(*names: str) -> int:
        for n in names:
            if isinstance(cfg.get(n), int) and cfg[n] > 0:
                return int(cfg[n])
        raise InputError(f"{where}: field {names[0]!r} is missing or not a positive integer")

    hidden = need("hidden_size", "n_embd", "d_model")
    heads = need("num_attention_heads", "n_head")
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    return Shape(
        hidden=hidden, intermediate=need("intermediate_size", "n_inner"), layers=need("num_hidden_layers", "n_layer"),
        heads=heads, kv_heads=int(kv), head_dim=int(head_dim), vocab=need("vocab_size"),
        tied=_tied(outer, cfg),
        max_context=cfg.get("max_position_embeddings"),
        attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") in ("qwen2",))),
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


def plan(shape: Shape, gpu_memory_bytes: float, context: int, batch: int, kv_cache: str = "bf16",
         files: dict[str, tuple[float, str]] | None = None) -> list[PlanRow]:
    """A row per precision; ``files``: rows whose weight bytes are known exactly (name ->
    (bytes, description)), e.g. the GGUF file being planned."""
    if context < 1 or batch < 1:
        raise InputError("context and batch must be at least 1")
    if kv_cache not in KV_CACHE_DTYPES:
        raise InputError(f"KV cache dtype {kv_cache!r} must be one of {', '.join(KV_CACHE_DTYPES)}")
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * context * batch * KV_CACHE_DTYPES[kv_cache]
    rows = []
    for name, (bytes_per_weight, description) in PRECISIONS.items():
        weights = shape.linear_params * bytes_per_weight + shape.other_params * 2
        total = weights + kv
        gpus = gpus_needed(total, gpu_memory_bytes)
        rows.append(PlanRow(name, description, weights, kv, total, gpus, gpus == 1))
    for name, (weights, description) in (files or {}).items():
        gpus = gpus_needed(weights + kv, gpu_memory_bytes)
        rows.append(PlanRow(name, description, weights, kv, weights + kv, gpus, gpus == 1))
    return rows


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
    widths = {"hidden size": shape.hidden, "attention width": shape.heads * shape.head_dim,
              "intermediate size": shape.intermediate}
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
    widest = max(shape.hidden, shape.intermediate, shape.heads * shape.head_dim)
    layer = shape.hidden * shape.intermediate * 4.0  # the largest linear layer, in fp32
    hessian = widest * widest * 4.0 * 2 if getattr(config, "calibrated", False) else 0.0
    per_token = 4 * (8 * shape.hidden + 3 * shape.intermediate) + 8 * shape.vocab
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * 2 * 16 * 1024  # batch 16 x 1,024 tokens, 16-bit
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
