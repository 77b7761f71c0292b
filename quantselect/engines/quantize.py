"""Apply a candidate config to a real model. One handler per config type (torchao-style).

Everything here imports torch/transformers/torchao lazily: this module is imported by Ray workers
and serving replicas, never by ``import quantselect`` or the CLI's ``--help``.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from typing import Any, Callable

from quantselect.domain.candidates import (
    CandidateConfig,
    Fp8Dynamic,
    FullPrecision,
    HalfPrecision,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    LowBitWeightOnly,
)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: str  # "cpu" or "cuda"
    dtype: str
    quantize_seconds: float
    engine: str  # how the weights were quantized, for display


@dataclass(frozen=True)
class Handler:
    load_dtype: Callable[[str], str]  # device -> dtype to load the float weights in
    apply: Callable[[Any, CandidateConfig, str], str] | None  # quantize in place, returns engine name
    available: Callable[[], str | None]  # None when it can run here, else the reason


HANDLERS: dict[type[CandidateConfig], Handler] = {}


def _reference_dtype(device: str) -> str:
    return "bfloat16" if device == "cuda" else "float32"


def _cuda_capability() -> tuple[int, int] | None:
    import torch

    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def _needs_torchao() -> str | None:
    return None if importlib.util.find_spec("torchao") else "needs torchao: pip install torchao"


def _not_lm_head(module: Any, fqn: str) -> bool:
    import torch

    # The output projection stays in float, as GPTQ/AWQ/llm-compressor do: it is small next to the
    # body, quality-critical, and often tied to the input embedding.
    return isinstance(module, torch.nn.Linear) and not fqn.endswith("lm_head")


def _torchao(config_factory: Callable[[CandidateConfig, str], Any]) -> Callable[[Any, CandidateConfig, str], str]:
    def apply(model: Any, config: CandidateConfig, device: str) -> str:
        from torchao.quantization import quantize_

        ao_config = config_factory(config, device)
        quantize_(model, ao_config, filter_fn=_not_lm_head)
        return f"torchao {type(ao_config).__name__}"

    return apply


def _int8_wo(config: CandidateConfig, device: str) -> Any:
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _int8_dyn(config: CandidateConfig, device: str) -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def _apply_w8a8(model: Any, config: CandidateConfig, device: str) -> str:
    """W8A8 int8. On a GPU through torchao. On CPU through PyTorch's fbgemm dynamic quantization:
    torchao's int8 dynamic path has no fast CPU kernel here (measured ~40x slower than fp32 on an
    AVX2 machine), while fbgemm's int8 GEMM is the engine a CPU deployment of W8A8 would use
    (faster than fp32). Both quantize weights per channel to int8 and activations per token /
    per tensor to int8 at run time."""
    if device == "cuda":
        return _torchao(_int8_dyn)(model, config, device)
    import warnings

    import torch

    names = {n: torch.ao.quantization.per_channel_dynamic_qconfig for n, m in model.named_modules() if _not_lm_head(m, n)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(model, qconfig_spec=names, dtype=torch.qint8, inplace=True)
    return "fbgemm int8 dynamic quantization (torch.ao)"


def _int4_wo(config: CandidateConfig, device: str) -> Any:
    import torch
    from torchao.quantization import Int4WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    assert isinstance(config, Int4WeightOnly)
    if device == "cuda":
        return Int4WeightOnlyConfig(group_size=config.group_size, int4_packing_format="tile_packed_to_4d")
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(config.group_size))


def _low_bit(config: CandidateConfig, device: str) -> Any:
    import torch
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    assert isinstance(config, LowBitWeightOnly)
    return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{config.bits}"), granularity=PerGroup(config.group_size))


def _fp8_dyn(config: CandidateConfig, device: str) -> Any:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def _fp8_available() -> str | None:
    if (reason := _needs_torchao()) is not None:
        return reason
    cap = _cuda_capability()
    if cap is None or cap < (8, 9):
        return "fp8 needs a CUDA GPU with compute capability >= 8.9 (Ada, Hopper or newer)"
    return None


HANDLERS[FullPrecision] = Handler(_reference_dtype, None, lambda: None)
HANDLERS[HalfPrecision] = Handler(lambda d: "bfloat16", None, lambda: None)  # dtype from the config
HANDLERS[Int8WeightOnly] = Handler(_reference_dtype, _torchao(_int8_wo), _needs_torchao)
HANDLERS[Int8Dynamic] = Handler(_reference_dtype, _apply_w8a8, _needs_torchao)
HANDLERS[Int4WeightOnly] = Handler(
    lambda d: "bfloat16" if d == "cuda" else "float32", _torchao(_int4_wo), _needs_torchao
)
HANDLERS[LowBitWeightOnly] = Handler(
    lambda d: "bfloat16" if d == "cuda" else "float32", _torchao(_low_bit), _needs_torchao
)
HANDLERS[Fp8Dynamic] = Handler(lambda d: "bfloat16", _torchao(_fp8_dyn), _fp8_available)


def handler_for(config: CandidateConfig) -> Handler:
    try:
        return HANDLERS[type(config)]
    except KeyError:
        raise TypeError(f"no engine handler registered for {type(config).__name__}") from None


def availability(config: CandidateConfig) -> str | None:
    """None when the candidate can run on this machine, else a one-line reason."""
    return handler_for(config).available()


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_candidate(model_path: str, config: CandidateConfig, device: str | None = None) -> LoadedModel:
    """Load the base model from ``model_path`` and quantize it as ``config`` says, in memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    handler = handler_for(config)
    reason = handler.available()
    if reason is not None:
        raise RuntimeError(reason)
    dtype = config.dtype if isinstance(config, HalfPrecision) else handler.load_dtype(device)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device).eval()
    engine = f"{dtype} weights"
    start = time.perf_counter()
    if handler.apply is not None:
        engine = handler.apply(model, config, device)
    quantize_seconds = time.perf_counter() - start
    return LoadedModel(model, tokenizer, device, dtype, quantize_seconds, engine)


def weight_bytes(model: Any) -> int:
    """Bytes the weights occupy in memory, counting the inner tensors of quantized tensor
    subclasses (int data, scales, zero points) and each shared tensor once."""
    import torch

    seen: set[int] = set()

    def size(t: Any) -> int:
        if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        if isinstance(t, torch.nn.Parameter) and type(t.data) is not torch.Tensor:
            return size(t.data)
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            return 0
        seen.add(ptr)
        return t.numel() * t.element_size()

    total = 0
    for p in list(model.parameters()) + list(model.buffers()):
        total += size(p)
    for m in model.modules():  # fbgemm dynamic-quantized Linear keeps packed weights, not parameters
        if hasattr(m, "_packed_params") and callable(getattr(m, "weight", None)):
            w = m.weight()
            total += w.numel() * w.element_size() + 8 * (w.q_per_channel_scales().numel() if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric) else 1)
            b = m.bias()
            total += 0 if b is None else b.numel() * b.element_size()
    return total
