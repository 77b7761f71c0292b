"""What a candidate costs to serve on a named target GPU: a price table, and a roofline estimate of
its throughput there when it was not measured on that GPU.

Cost per 1M generated tokens = GPU-hour price x GPUs needed / tokens per hour, at the serving batch
(``COST_BATCH`` concurrent sequences: what a server sees under load).

Throughput on the target, when no measurement on that GPU type exists, is *estimated* (and labelled
so everywhere it is shown) from a roofline:

- a decode step at batch ``b`` reads every weight once (the candidate's bytes per weight, scales
  included; the output head in 16-bit) -- except an untied input embedding table, of which a step
  gathers only ``b`` rows, and the experts of a mixture that no token of the batch is routed to (both
  still count for the memory fit) -- plus the KV cache of ``b`` sequences of ``SERVING_CONTEXT``
  tokens (16-bit, or 8-bit for ``kv_cache=fp8``; a sliding-window layer's at most its window), and
  computes ``2 x active parameters x b`` FLOPs (a mixture's top-k experts; plus attention over the
  context) in the candidate's compute format (bf16 for weight-only schemes, int8 for W8A8, fp8 for fp8);
- its time is the larger of bytes / bandwidth and FLOPs / peak compute, each scaled by an
  achievable fraction (``BANDWIDTH_EFFICIENCY``: an 8B bf16 model decodes at ~78 % of the H100's
  bandwidth limit, measured; ``COMPUTE_EFFICIENCY``);
- a model that needs several GPUs (the fit planner's count) is split by tensor parallelism: their
  bandwidth and compute add up, and so does the price.

A CPU timing is never turned into a GPU cost: on a 2-core CPU a quantized 135M model is no faster
than fp32, which says nothing about a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantselect.domain import results
from quantselect.domain.candidates import GGUF, CandidateConfig
from quantselect.domain.gpus import GPUS, GpuSpec, gpu, gpu_of_device  # noqa: F401 - re-exported
from quantselect.domain.planner import Shape, gpus_needed

COST_BATCH = 16  # concurrent sequences the cost is quoted at
SERVING_CONTEXT = 1024  # tokens of context per sequence while decoding (prompt + output so far)
BANDWIDTH_EFFICIENCY = 0.8
COMPUTE_EFFICIENCY = 0.5


@dataclass(frozen=True)
class Throughput:
    tokens_per_second: float  # generated tokens per second over all sequences of the batch
    batch: int
    gpus: int
    source: str  # "measured" or "estimated"
    basis: str  # how: the engine and device, or the roofline's inputs

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def estimate_decode(weight_bytes: float, params: int, kv_bytes_per_token: float, attention_flops_per_token: float,
                    target: GpuSpec, compute: str, batch: int, gpus: int = 1,
                    context: int = SERVING_CONTEXT) -> Throughput:
    """Roofline decode throughput of ``batch`` sequences on ``gpus`` target GPUs; ``weight_bytes``:
    the weights a decode step reads (not an untied input embedding table: see ``step_weight_bytes``)."""
    bytes_per_step = weight_bytes + batch * context * kv_bytes_per_token
    flops_per_step = batch * (2.0 * params + attention_flops_per_token * context)
    t_memory = bytes_per_step / (target.bandwidth_tbs * 1e12 * BANDWIDTH_EFFICIENCY * gpus)
    t_compute = flops_per_step / (target.peak(compute) * COMPUTE_EFFICIENCY * gpus)
    bound = "memory" if t_memory >= t_compute else "compute"
    tps = batch / max(t_memory, t_compute)
    basis = (f"roofline on {gpus}x {target.name}: {bound}-bound at batch {batch}, {context}-token context, "
             f"{BANDWIDTH_EFFICIENCY:.0%} of {target.bandwidth_tbs} TB/s, {COMPUTE_EFFICIENCY:.0%} of peak {compute}")
    return Throughput(tps, batch, gpus, "estimated", basis)


def cost_per_1m_tokens(usd_per_gpu_hour: float, throughput: Throughput | None) -> float | None:
    """The price of all the GPUs the throughput needs, per million tokens."""
    if throughput is None:
        return None
    return results.cost_per_1m_tokens(usd_per_gpu_hour * throughput.gpus, throughput.tokens_per_second)


@dataclass(frozen=True)
class ServingCost:
    usd_per_1m_tokens: float | None
    throughput: Throughput | None
    note: str | None = None  # why there is no cost: the candidate cannot run on the target, or does not fit
    runs_on_target: bool = True
    weight_bytes: float | None = None  # the weights served on the target GPU(s)

    def to_dict(self) -> dict[str, Any]:
        return {"usd_per_1m_tokens": self.usd_per_1m_tokens, "note": self.note, "runs_on_target": self.runs_on_target,
                "weight_bytes": self.weight_bytes, "throughput": self.throughput.to_dict() if self.throughput else None}


def _kv_bytes_per_token(shape: Shape, config: CandidateConfig, context: int) -> float:
    """K and V bytes per token of context, averaged over a sequence of ``context`` tokens (its
    sliding-window layers keep at most their window)."""
    return shape.kv_cache_bytes(context, 1, config.kv_bytes()) / context


def step_weight_bytes(weight_bytes: float, shape: Shape, batch: int = 1, bytes_per_weight: float = 2.0) -> float:
    """The weight bytes one decode step reads: all of them but an untied input embedding table, of
    which it gathers only the batch's rows (the output head, or a tied table, is read whole), and a
    mixture's experts that no sequence of the batch routes to. At most ``batch x k`` experts of a
    layer are touched: an upper bound (tokens share experts: ~81 of Qwen3-30B-A3B's 128 at batch 16
    under uniform routing), so the estimate leans slow; at batch 16 most mixtures read every expert."""
    unread = (shape.linear_params - shape.linear_params_read(batch)) * bytes_per_weight
    return weight_bytes - unread - (0 if shape.tied else shape.vocab * shape.hidden * 2)


def serving_cost(config: CandidateConfig, shape: Shape | None, target: GpuSpec, usd_per_hour: float,
                 measured: Throughput | None = None, batch: int = COST_BATCH,
                 context: int = SERVING_CONTEXT) -> ServingCost:
    """Cost per 1M generated tokens of ``config`` served on ``target``: from a throughput measured on
    that GPU type when there is one, else from the roofline estimate (labelled "estimated")."""
    if config.compute == "fp8" and target.fp8_tflops is None:
        cap = ".".join(map(str, target.capability))
        return ServingCost(None, None, f"fp8 needs compute capability >= 8.9; {target.name} has {cap}", False)
    weights = shape.linear_params * config.bytes_per_weight() + shape.other_params * 2 if shape else None
    if measured is not None:
        return ServingCost(cost_per_1m_tokens(usd_per_hour, measured), measured, weight_bytes=weights)
    if shape is None or weights is None:
        return ServingCost(None, None, "the model's config.json is unknown: no cost estimate")
    kv = _kv_bytes_per_token(shape, config, context)
    n = gpus_needed(weights + batch * context * kv, target.memory_gib * 1024**3)
    if n is None:
        return ServingCost(None, None, f"does not fit on 8x {target.name} at batch {batch}", False,
                           weight_bytes=weights)
    attention = 4.0 * shape.heads * shape.head_dim * shape.kv_tokens(context) / context  # per token of context
    compute_params = shape.active_linear_params + shape.vocab * shape.hidden
    read = step_weight_bytes(weights, shape, batch, config.bytes_per_weight())
    tp = estimate_decode(read, compute_params, kv, attention, target, config.compute, batch, n, context)
    return ServingCost(cost_per_1m_tokens(usd_per_hour, tp), tp, weight_bytes=weights)


SHARED_GPU = "[GPU shared]"  # marks a throughput measured while other candidates ran on the same GPU


def measured_on(result: Any, target: GpuSpec) -> Throughput | None:
    """A candidate's batch-``COST_BATCH`` decode throughput when it was measured on the target GPU
    type with a serving engine, with the GPU to itself; eager ``generate()`` is never trusted for a
    cost (it ranks quantized models wrongly on a GPU), nor a GPU shared with packed candidates, nor a
    GGUF file's dense stand-in, nor a candidate whose fp8 KV cache was emulated. A candidate too
    large for one GPU was measured with its layers split over the GPUs its worker held
    (``gpu_ids``): that throughput is priced for all of them."""
    spec = gpu_of_device(getattr(result, "device", None))
    tps = getattr(result, "decode_tokens_per_second_b16", None)
    engine = getattr(result, "throughput_engine", None) or ""
    data = (getattr(result, "config", None) or {}).get("_data") or {}
    if data.get("method") == GGUF:
        return None  # measured dense in transformers, not in llama.cpp, the engine that would serve it
    if data.get("kv_cache"):
        return None  # its KV cache was rounded in 16 bits, not stored in 8: not that cache's speed
    if spec is None or spec.name != target.name or not tps or "eager" in engine or SHARED_GPU in engine:
        return None
    n = max(1, len(getattr(result, "gpu_ids", None) or []))
    # device_map="auto" runs the layers one GPU after another, not tensor parallel: say what was measured
    split = f", layers split over {n} GPUs (device_map=auto)" if n > 1 else ""
    return Throughput(float(tps), COST_BATCH, n, "measured", f"{engine} on {result.device}{split}")
