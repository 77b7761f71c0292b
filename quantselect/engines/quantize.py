"""Apply a candidate config to a real model. One handler per config type (torchao-style).

Everything here imports torch/transformers/torchao lazily: this module is imported by Ray workers
and serving replicas, never by ``import quantselect`` or the CLI's ``--help``.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from quantselect.domain.candidates import (
    CandidateConfig,
    Fp8Dynamic,
    FullPrecision,
    HalfPrecision,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    Awq,
    Gptq,
    LowBitWeightOnly,
    Nf4,
    Prequantized,
    TORCHAO_FP8,
    COMPRESSED_FP8,
)
from quantselect.errors import InputError

Progress = Callable[[int, int], None]  # (done, total): layers quantized so far, for methods that go layer by layer


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: str  # "cpu" or "cuda"
    dtype: str
    quantize_seconds: float
    engine: str  # how the weights were quantized, for display
    artifact_path: str | None = None  # the saved quantized model it was loaded back from
    reused: bool = False  # that artifact came from an earlier job
    disk_bytes: int | None = None


@dataclass(frozen=True)
class Handler:
    """How one config type runs. Exactly one of ``hf_config`` (a transformers quantization config:
    the model is quantized while loading, and saves in the Hugging Face layout) and ``apply``
    (quantize a loaded float model in place) is set, or neither for unquantized dtypes.
    ``savable(device)``: whether the result saves as a standard artifact on that device."""

    load_dtype: Callable[[str], str]  # device -> dtype to load the float weights in
    available: Callable[[], str | None]  # None when it can run here, else the reason
    hf_config: Callable[[CandidateConfig, str, Any], Any] | None = None  # (config, device, calibration)
    apply: Callable[[Any, CandidateConfig, str], str] | None = None  # quantize in place, returns engine name
    engine: Callable[[CandidateConfig, str], str] | None = None  # display name for hf_config handlers
    savable: Callable[[str], bool] = lambda device: True
    load_kwargs: Callable[[str], dict[str, Any]] = lambda device: {}
    # Or: write the quantized model as a Hugging Face folder (model_path, config, device, calibration,
    # folder, progress) -> engine name; it is then loaded back from that folder (GPTQ, AWQ).
    # ``progress(done, total)`` (or None): layers quantized so far.
    export: Callable[[str, CandidateConfig, str, Any, Any, Progress | None], str] | None = None


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


def _torchao(config_factory: Callable[[CandidateConfig, str], Any]) -> Callable[[CandidateConfig, str, Any], Any]:
    """A transformers ``TorchAoConfig``: quantizes every linear layer but the output projection
    and the embedding while loading (transformers' default), and saves / reloads in the Hugging
    Face layout with the torchao config in ``config.json``."""

    def hf_config(config: CandidateConfig, device: str, calibration: Any) -> Any:
        from transformers import TorchAoConfig

        return TorchAoConfig(quant_type=config_factory(config, device))

    return hf_config


def _torchao_engine(config_factory: Callable[[CandidateConfig, str], Any]) -> Callable[[CandidateConfig, str], str]:
    return lambda config, device: f"torchao {type(config_factory(config, device)).__name__}"


def _int8_wo(config: CandidateConfig, device: str) -> Any:
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _int8_dyn(config: CandidateConfig, device: str) -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def _apply_w8a8_cpu(model: Any, config: CandidateConfig, device: str) -> str:
    """W8A8 int8 on CPU through PyTorch's fbgemm dynamic quantization: torchao's int8 dynamic path
    has no fast CPU kernel here (measured ~40x slower than fp32 on an AVX2 machine), while fbgemm's
    int8 GEMM is the engine a CPU deployment of W8A8 would use. Both quantize weights per channel
    to int8 and activations per token / per tensor at run time. fbgemm's packed weights have no
    standard serialized form, so this one is not saved as an artifact."""
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


def _w8a8_hf_config(config: CandidateConfig, device: str, calibration: Any) -> Any:
    return _torchao(_int8_dyn)(config, device, calibration) if device == "cuda" else None


def _torchao_handler(factory: Callable[[CandidateConfig, str], Any], available=_needs_torchao,
                     load_dtype: Callable[[str], str] = _reference_dtype) -> Handler:
    return Handler(load_dtype, available, hf_config=_torchao(factory), engine=_torchao_engine(factory))


def _needs_compressed_tensors() -> str | None:
    return None if importlib.util.find_spec("compressed_tensors") else \
        "needs compressed-tensors (llm-compressor's format): pip install compressed-tensors"


def _compressed_fp8() -> str | None:
    return _needs_compressed_tensors() or _fp8_available()


def _needs_bitsandbytes() -> str | None:
    return None if importlib.util.find_spec("bitsandbytes") else "needs bitsandbytes: pip install bitsandbytes"


def _nf4(config: CandidateConfig, device: str, calibration: Any) -> Any:
    """bitsandbytes NF4 through transformers (its CPU backend on CPU): saves and reloads in the
    Hugging Face layout with the quantization state of every layer."""
    import torch
    from transformers import BitsAndBytesConfig

    assert isinstance(config, Nf4)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                              bnb_4bit_use_double_quant=config.double_quant)


def _needs_gptqmodel() -> str | None:
    if importlib.util.find_spec("gptqmodel") is None:
        return "needs GPTQModel: pip install 'quantselect[gptq]' (gptqmodel 7.6, see the README)"
    return None


HANDLERS[FullPrecision] = Handler(_reference_dtype, lambda: None)
HANDLERS[HalfPrecision] = Handler(lambda d: "bfloat16", lambda: None)  # dtype from the config
HANDLERS[Int8WeightOnly] = _torchao_handler(_int8_wo)
HANDLERS[Int8Dynamic] = Handler(_reference_dtype, _needs_torchao, hf_config=None, apply=None,
                                savable=lambda device: device == "cuda")  # resolved per device below
HANDLERS[Int4WeightOnly] = _torchao_handler(_int4_wo)
HANDLERS[LowBitWeightOnly] = _torchao_handler(_low_bit)
HANDLERS[Fp8Dynamic] = _torchao_handler(_fp8_dyn, _fp8_available, lambda d: "bfloat16")


def calibration_texts(tokenizer: Any, samples: Any) -> list[str]:
    """The calibration samples as text: a conversation is rendered through the model's chat template
    whole (the answer as the assistant's turn), as the deployed model sees it."""
    out = []
    for s in samples:
        if isinstance(s, str):
            out.append(s)
        elif not getattr(tokenizer, "chat_template", None):
            raise InputError("the calibration samples are conversations, but the model's tokenizer has no chat "
                             "template to render them")
        else:
            out.append(tokenizer.apply_chat_template(list(s), tokenize=False))
    return out


def _gptqmodel_export(model_path: str, config: CandidateConfig, device: str, calibration: Any, folder: Any,
                      progress: Progress | None = None) -> str:
    """GPTQ / AWQ through GPTQModel (the maintained successor of the archived auto-gptq and
    AutoAWQ): quantize with the calibration samples and save in the Hugging Face layout
    (``quantization_config`` in ``config.json``). The model GPTQModel holds in memory after GPTQ is
    not the deployable form (measured: wrong outputs until saved and reloaded), so the saved
    folder is what gets loaded, evaluated and served. AWQ on CPU needs its torch kernel."""
    import random

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(os.cpu_count() or 1, 4))))
    if device == "cuda":  # no nvcc build of the optional fused GPTQ step, no network (see gptqmodel_reload_kwargs)
        os.environ.setdefault("GPTQMODEL_DISABLE_GPTQ_CUDA", "1")
        os.environ.setdefault("GPTQMODEL_OFFLINE", "1")
    import numpy as np
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    assert isinstance(config, (Gptq, Awq))
    _gptqmodel_logs_out_of_cwd()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    kwargs: dict[str, Any] = dict(bits=config.bits, group_size=config.group_size, offload_to_disk=False)
    # The torch kernels while quantizing: on CUDA, AUTO would pick AWQ's GEMM kernel, which GPTQModel
    # first compiles with nvcc (about a minute, and quantize() fails if that build does).
    quantize_kwargs: dict[str, Any] = {"backend": BACKEND.GPTQ_TORCH}
    if isinstance(config, Awq):
        kwargs["method"] = "awq"
        quantize_kwargs["backend"] = BACKEND.AWQ_TORCH
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # AWQ's torch kernel takes 16-bit only; GPTQ calibrates in fp32 on CPU (bf16 is slow without AMX).
    dtype = torch.bfloat16 if device == "cuda" or isinstance(config, Awq) else torch.float32
    model = GPTQModel.load(model_path, QuantizeConfig(**kwargs), device=device, dtype=dtype)
    if progress is not None:  # GPTQModel calls it as each layer starts and when it is done
        layers = int(model.model.config.get_text_config().num_hidden_layers)
        progress(0, layers)
        model.layer_callback = lambda layer_idx, submodule_finalized, **_: (
            progress(min(layer_idx + 1, layers), layers) if submodule_finalized else None)
    model.quantize(calibration_texts(tokenizer, calibration), tokenizer=tokenizer, batch_size=1, **quantize_kwargs)
    model.save(str(folder))
    tokenizer.save_pretrained(str(folder))
    kind = "AWQ" if isinstance(config, Awq) else "GPTQ"
    return f"GPTQModel {kind} {config.bits}-bit g{config.group_size} ({len(calibration)} calibration samples)"


# GPTQModel's kernels when transformers loads a GPTQ / AWQ artifact onto a GPU. Left to AUTO,
# GPTQModel 7.6 picks Machete (GPTQ, group size 64/128: downloads CUTLASS from GitHub, then builds it
# with nvcc for minutes; without network the load fails) or Marlin (GPTQ g32, AWQ: a ~2 min nvcc
# build). The Triton kernels need no build and still read only the 4-bit weights per token.
CUDA_KERNELS = {"gptq": "gptq_triton", "awq": "gemm_triton"}


def gptqmodel_reload_kwargs(folder: Any, device: str) -> dict[str, Any]:
    """``from_pretrained`` arguments that choose GPTQModel's kernel for an artifact on ``device``
    (transformers takes only ``backend`` from the config given; bits and group size stay the saved ones)."""
    import json

    if device != "cuda":
        return {}
    qc = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
    method = str(qc.get("quant_method", "")).lower()
    from quantselect.settings import CUDA_KERNEL_CHOICES, cuda_kernel

    # the worker's own environment (a driver on a cluster hands its QUANTSELECT_* on), checked again
    backend = (cuda_kernel(os.environ, method) if method in CUDA_KERNEL_CHOICES else None) or CUDA_KERNELS.get(method)
    if method == "gptq":
        from transformers import GPTQConfig

        return {"quantization_config": GPTQConfig(bits=qc["bits"], backend=backend)}
    if method == "awq":
        from transformers import AwqConfig

        return {"quantization_config": AwqConfig(bits=qc["bits"], backend=backend)}
    return {}


def _gptqmodel_logs_out_of_cwd() -> None:
    """GPTQModel 7.6 writes a log file per quantization into ./logs of the working directory."""
    import tempfile

    try:
        from gptqmodel.looper import loop_processor

        loop_processor._PROJECT_LOG_DIR = Path(tempfile.gettempdir()) / "quantselect-gptqmodel-logs"
    except (ImportError, AttributeError):  # another GPTQModel version: its logs stay where it puts them
        pass


HANDLERS[Gptq] = Handler(_reference_dtype, _needs_gptqmodel, export=_gptqmodel_export)
HANDLERS[Awq] = Handler(_reference_dtype, _needs_gptqmodel, export=_gptqmodel_export)
HANDLERS[Nf4] = Handler(_reference_dtype, _needs_bitsandbytes, hf_config=_nf4,
                        engine=lambda c, d: "bitsandbytes NF4" + (" (double-quantized)" if c.double_quant else ""))


# A checkpoint quantized elsewhere needs the library of its method to load (fp8: a GPU that has it).
PREQUANTIZED_NEEDS: dict[str, Callable[[], str | None]] = {
    "gptq": _needs_gptqmodel, "awq": _needs_gptqmodel, "bitsandbytes": _needs_bitsandbytes,
    "torchao": _needs_torchao, "fp8": _fp8_available, "fbgemm_fp8": _fp8_available, TORCHAO_FP8: _fp8_available,
    "compressed-tensors": _needs_compressed_tensors, COMPRESSED_FP8: _compressed_fp8,
}
HANDLERS[Prequantized] = Handler(_reference_dtype, lambda: None)  # loaded as it is (load_candidate)


def handler_for(config: CandidateConfig, device: str = "cpu") -> Handler:
    try:
        handler = HANDLERS[type(config)]
    except KeyError:
        raise TypeError(f"no engine handler registered for {type(config).__name__}") from None
    if isinstance(config, Prequantized):
        return replace(handler, available=PREQUANTIZED_NEEDS.get(config.method, lambda: None))
    if isinstance(config, Int8Dynamic):  # torchao on a GPU, fbgemm on CPU (see _apply_w8a8_cpu)
        if device == "cuda":
            return replace(handler, hf_config=_w8a8_hf_config, engine=_torchao_engine(_int8_dyn))
        return replace(handler, apply=_apply_w8a8_cpu)
    return handler


def availability(config: CandidateConfig) -> str | None:
    """None when the candidate can run on this machine, else a one-line reason."""
    return handler_for(config).available()


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_map(device: str) -> str:
    """One device, or every GPU the worker was given ("auto" splits the layers) when a candidate too
    large for one GPU got several (a placement group)."""
    import torch

    return "auto" if device == "cuda" and torch.cuda.device_count() > 1 else device


def _load_gguf(config: Prequantized, device: str, dtype: str, models_dir: str | None) -> LoadedModel:
    """A GGUF file's weights as llama.cpp stores them, dequantized (once, cached like a GGUF model)
    into a dense folder and loaded from it; its size on disk is the file's. The throughput measured
    here is that of the dense model, not llama.cpp's: its cost is always the roofline estimate."""
    from quantselect.engines import artifacts
    from quantselect.engines.models import resolve_model

    if models_dir is None:
        from quantselect.settings import get_settings

        models_dir = str(get_settings().models_dir)
    folder = resolve_model(config.path, Path(models_dir))
    loaded = artifacts.load_checkpoint(folder, device, dtype,
                                       f"gguf {config.file_type} dequantized to {dtype} (transformers)")
    loaded.disk_bytes = Path(config.path).stat().st_size
    return loaded


def _model_tokenizer(model_path: str) -> Any:
    """A checkpoint is scored (and served) with the model's tokenizer and chat template, as every
    candidate is: what is compared is weights. Its own may differ -- transformers' reading of a GGUF
    file's vocabulary is not llama.cpp's tokenizer, nor always the model's (BOS, pre-tokenizer) --
    and would mix a tokenizer's effect into the quality attributed to the quantization."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))


def load_candidate(model_path: str, config: CandidateConfig, device: str | None = None, *,
                   calibration: tuple[str, ...] | list[str] | None = None,
                   artifacts_dir: str | None = None, models_dir: str | None = None,
                   progress: Progress | None = None) -> LoadedModel:
    """The base model at ``model_path`` quantized as ``config`` says; ``progress(done, total)`` hears
    of each layer a layer-by-layer method (GPTQ, AWQ) has quantized.

    With ``artifacts_dir``, a quantized model is saved there in the Hugging Face layout (keyed by a
    hash of the model, the config and the calibration data), loaded back, and checked against the
    model that was saved before it is used; a later call with the same key loads the artifact
    instead of quantizing again. ``model_path`` may also be such an artifact (serving does that).
    A GGUF checkpoint is dequantized once into ``models_dir`` (default: the home's), like a GGUF model.
    A config's ``kv_cache`` changes no weight: the model is the one its ``weights_only`` config gives
    (the same artifact), with its attention reading keys and values as that cache stores them."""
    from quantselect.engines import kvcache

    loaded = _load(model_path, config.weights_only(), device, calibration, artifacts_dir, models_dir, progress)
    kvcache.emulate(loaded.model, config.kv_cache)
    return loaded


def _load(model_path: str, config: CandidateConfig, device: str | None, calibration: tuple[str, ...] | list[str] | None,
          artifacts_dir: str | None, models_dir: str | None, progress: Progress | None = None) -> LoadedModel:
    from quantselect.engines import artifacts

    device = device or default_device()
    handler = handler_for(config, device)
    reason = handler.available()
    if reason is not None:
        raise RuntimeError(reason)
    if artifacts.is_artifact(model_path):
        return artifacts.load(model_path, device, reused=True)
    if isinstance(config, Prequantized):  # quantized elsewhere: loaded as it is, every weight mapped
        if config.is_gguf:
            loaded = _load_gguf(config, device, handler.load_dtype(device), models_dir)
        else:
            loaded = artifacts.load_checkpoint(config.path, device, handler.load_dtype(device),
                                               f"prequantized ({config.method}, {config.bits}-bit)")
        loaded.tokenizer = _model_tokenizer(model_path)
        return loaded
    _check_shape(model_path, config)
    if config.calibrated and not calibration:
        raise ValueError(f"{config.type_name} needs calibration samples")
    info = {"model": str(model_path), "config": config.to_dict(), "device": device}
    if handler.export is not None:  # quantized straight to a folder (GPTQ, AWQ), then loaded from it
        export = lambda folder: _export(model_path, config, device, handler, calibration, folder, progress)  # noqa: E731
        if artifacts_dir:
            key = artifacts.key(model_path, config, calibration if config.calibrated else None, device)
            return artifacts.get_or_create(artifacts_dir, key, None, device, info, export=export)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="quantselect-") as tmp:
            loaded = artifacts.get_or_create(tmp, "model", None, device, info, export=export)
            loaded.artifact_path, loaded.disk_bytes = None, None  # the folder goes with this call
            return loaded
    quantizes = handler.hf_config is not None or handler.apply is not None
    if not (artifacts_dir and quantizes and handler.savable(device)):
        return _quantize(model_path, config, device, handler, calibration)
    key = artifacts.key(model_path, config, None, device)
    return artifacts.get_or_create(artifacts_dir, key, lambda: _quantize(model_path, config, device, handler, calibration),
                                   device, info)


def _check_shape(model_path: str, config: CandidateConfig) -> None:
    import json

    from quantselect.domain import planner

    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
        shape = planner.shape_from_config(cfg)
    except Exception:  # noqa: BLE001 - an unreadable config fails later, with transformers' own words
        return
    planner.check_candidate(config.type_name, config, shape, cfg.get("text_config", cfg).get("model_type"))


def _export(model_path: str, config: CandidateConfig, device: str, handler: Handler,
            calibration: Any, folder: Any, progress: Progress | None = None) -> tuple[str, float, str]:
    """Quantize straight to a folder: (engine, seconds, dtype to load it in)."""
    assert handler.export is not None
    start = time.perf_counter()
    engine = handler.export(model_path, config, device, calibration, folder, progress)
    return engine, time.perf_counter() - start, handler.load_dtype(device)


def _quantize(model_path: str, config: CandidateConfig, device: str, handler: Handler,
              calibration: tuple[str, ...] | list[str] | None) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = config.dtype if isinstance(config, HalfPrecision) else handler.load_dtype(device)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    start = time.perf_counter()
    if handler.hf_config is not None:
        qconfig = handler.hf_config(config, device, calibration)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype), quantization_config=qconfig,
                                                     device_map=device_map(device), **handler.load_kwargs(device)).eval()
        engine = handler.engine(config, device) if handler.engine else type(qconfig).__name__
    else:
        spread = device_map(device) == "auto"
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype),
                                                     **({"device_map": "auto"} if spread else {}))
        model = (model if spread else model.to(device)).eval()
        start = time.perf_counter()
        engine = handler.apply(model, config, device) if handler.apply is not None else f"{dtype} weights"
    quantize_seconds = time.perf_counter() - start if (handler.hf_config or handler.apply) else 0.0
    return LoadedModel(model, tokenizer, device, dtype, quantize_seconds, engine)


def weight_bytes(model: Any) -> int:
    """Bytes the weights occupy in memory, counting the inner tensors of quantized tensor
    subclasses (int data, scales, zero points), bitsandbytes' 4-bit quantization state, and each
    shared tensor once."""
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

    def quant_state(state: Any) -> int:  # bitsandbytes 4-bit: absmax per block, its code (+ the nested ones)
        if state is None:
            return 0
        tensors = [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
        return sum(size(t) for t in tensors) + quant_state(getattr(state, "state2", None))

    total = 0
    for p in list(model.parameters()) + list(model.buffers()):
        total += size(p) + quant_state(getattr(p, "quant_state", None))
        scales = getattr(p, "SCB", None)  # bitsandbytes 8-bit: a scale per row
        total += size(scales) if isinstance(scales, torch.Tensor) else 0
    for m in model.modules():  # fbgemm dynamic-quantized Linear keeps packed weights, not parameters
        if hasattr(m, "_packed_params") and callable(getattr(m, "weight", None)):
            w = m.weight()
            total += w.numel() * w.element_size() + 8 * (w.q_per_channel_scales().numel() if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric) else 1)
            b = m.bias()
            total += 0 if b is None else b.numel() * b.element_size()
    return total
