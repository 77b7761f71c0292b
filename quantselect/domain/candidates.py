"""Candidate configs: inert, versioned objects, one registered engine handler each.

A config says *what* to run (``Int8WeightOnly()``); the engines layer owns *how*. Configs
serialize as ``{"_type", "_version", "_data"}`` and load back only from the allow-list below.
Adding a scheme = one config class here + one handler in ``quantselect.engines.quantize``.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

from quantselect.errors import InputError

BASELINE = "baseline"

# KV-cache formats a candidate can be evaluated with (``NAME:kv_cache=fp8``); "" is the model's own
# 16-bit cache. fp8 is e4m3 at a per-tensor scale of 1.0, as vLLM's ``--kv-cache-dtype fp8`` stores
# it when the checkpoint carries no KV scales.
KV_CACHES = {"": 2, "fp8": 1}  # bytes per element


@dataclass(frozen=True)
class CandidateConfig:
    type_name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    description: ClassVar[str] = ""
    weight_bits: ClassVar[float] = 16.0  # per weight, for display and rough estimates
    # What a GPU computes the matrix products in when serving it: bf16 for weight-only schemes.
    compute: ClassVar[str] = "bf16"
    # Needs calibration data (GPTQ, AWQ): its samples are split off the task data.
    calibrated: ClassVar[bool] = False
    # config.json model_types its engine cannot quantize, with the reason (checked before any work)
    unsupported: ClassVar[dict[str, str]] = {}
    # The KV cache the candidate is evaluated with (a key of ``KV_CACHES``): it changes no weight, so
    # the quantized model is shared with the same candidate's 16-bit-cache twin (``weights_only``).
    kv_cache: str = field(default="", kw_only=True)

    def __post_init__(self) -> None:
        if self.kv_cache not in KV_CACHES:
            raise InputError(f"kv_cache {self.kv_cache!r} must be fp8 (or left out for the model's 16-bit cache)")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.kv_cache:  # left out, so that configs (and their cache keys) read as before it existed
            del data["kv_cache"]
        return {"_type": self.type_name, "_version": self.version, "_data": data}

    def weights_only(self) -> "CandidateConfig":
        """The config without its KV-cache setting: what the quantized weights depend on."""
        return replace(self, kv_cache="") if self.kv_cache else self

    def kv_bytes(self) -> int:
        """Bytes per element of the KV cache when served."""
        return KV_CACHES[self.kv_cache]

    def bytes_per_weight(self) -> float:
        """Bytes per weight of the decoder's linear layers when served on a GPU, scales and zero
        points included (the fit planner's and the cost model's figure)."""
        return 2.0

    def parameters(self) -> dict[str, Any]:
        """The scheme's own parameters (``kv_cache``, which every candidate takes, is not listed)."""
        return {k: v for k, v in asdict(self).items() if k != "kv_cache"}


GROUP_SIZES = (16, 32, 64, 128, 256)


def _check_group(scheme: str, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise InputError(f"{scheme} group_size {group_size} must be one of {', '.join(map(str, GROUP_SIZES))}")


def _check_bits(scheme: str, bits: int, allowed: tuple[int, ...]) -> None:
    if bits not in allowed:
        raise InputError(f"{scheme} bits {bits} must be one of {', '.join(map(str, allowed))}")


def _grouped_bytes(bits: int, group_size: int) -> float:
    return bits / 8 + 4 / group_size  # a 16-bit scale and a 16-bit zero point per group


@dataclass(frozen=True)
class FullPrecision(CandidateConfig):
    """The reference: fp32 on CPU, bf16 on a GPU (what the model would be served at unquantized)."""

    type_name: ClassVar[str] = "full_precision"
    description: ClassVar[str] = "reference precision: fp32 on CPU, bf16 on GPU"
    weight_bits: ClassVar[float] = 32.0


@dataclass(frozen=True)
class HalfPrecision(CandidateConfig):
    type_name: ClassVar[str] = "half_precision"
    dtype: str = "bfloat16"  # or "float16"
    description: ClassVar[str] = "weights and activations in 16-bit floating point"

    def __post_init__(self) -> None:
        super().__post_init__()
        aliases = {"half": "float16", "fp16": "float16", "bf16": "bfloat16"}  # torch's and the usual (a job stored
        object.__setattr__(self, "dtype", aliases.get(self.dtype, self.dtype))  # with dtype=half reads back)
        if self.dtype not in ("bfloat16", "float16"):  # torch's names: the worker loads getattr(torch, dtype)
            raise InputError(f"half precision dtype {self.dtype!r} must be bfloat16 or float16")


@dataclass(frozen=True)
class Int8WeightOnly(CandidateConfig):
    type_name: ClassVar[str] = "int8_weight_only"
    description: ClassVar[str] = "int8 weights, per-channel scales (torchao), activations in float"
    weight_bits: ClassVar[float] = 8.0

    def bytes_per_weight(self) -> float:
        return 1.0 + 2 / 4096


@dataclass(frozen=True)
class Int8Dynamic(CandidateConfig):
    type_name: ClassVar[str] = "int8_dynamic"
    description: ClassVar[str] = "W8A8: int8 weights, dynamically quantized int8 activations (torchao on GPU, fbgemm on CPU)"
    weight_bits: ClassVar[float] = 8.0
    compute: ClassVar[str] = "int8"

    def bytes_per_weight(self) -> float:
        return 1.0 + 2 / 4096


@dataclass(frozen=True)
class Int4WeightOnly(CandidateConfig):
    type_name: ClassVar[str] = "int4_weight_only"
    group_size: int = 32
    description: ClassVar[str] = "int4 weights, round-to-nearest with per-group scales (torchao), float activations"
    weight_bits: ClassVar[float] = 4.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_group("int4", self.group_size)

    def bytes_per_weight(self) -> float:
        return _grouped_bytes(4, self.group_size)


@dataclass(frozen=True)
class LowBitWeightOnly(CandidateConfig):
    """2- or 3-bit weights: usually far too lossy to deploy, listed so that users can see where
    quality breaks, and used to show early stopping cutting broken candidates short."""

    type_name: ClassVar[str] = "low_bit_weight_only"
    bits: int = 3
    group_size: int = 32
    description: ClassVar[str] = "2/3-bit weights, round-to-nearest per group (torchao); expect large quality loss"

    @property
    def weight_bits(self) -> float:  # type: ignore[override]
        return self.bits + 16 / self.group_size

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_bits("low-bit", self.bits, (2, 3))
        _check_group("low-bit", self.group_size)

    def bytes_per_weight(self) -> float:
        return _grouped_bytes(self.bits, self.group_size)


@dataclass(frozen=True)
class Fp8Dynamic(CandidateConfig):
    type_name: ClassVar[str] = "fp8_dynamic"
    description: ClassVar[str] = "fp8 e4m3 weights and dynamically quantized fp8 activations (torchao)"
    weight_bits: ClassVar[float] = 8.0
    compute: ClassVar[str] = "fp8"

    def bytes_per_weight(self) -> float:
        return 1.0 + 4 / 4096


@dataclass(frozen=True)
class _Calibrated(CandidateConfig):
    """A weight-only scheme calibrated on samples split off the task data (GPTQModel)."""

    bits: int = 4
    group_size: int = 128
    calibrated: ClassVar[bool] = True
    allowed_bits: ClassVar[tuple[int, ...]] = (4,)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_bits(self.type_name, self.bits, self.allowed_bits)
        _check_group(self.type_name, self.group_size)

    @property
    def weight_bits(self) -> float:  # type: ignore[override]
        return self.bits + 32 / self.group_size

    def bytes_per_weight(self) -> float:
        return _grouped_bytes(self.bits, self.group_size)


@dataclass(frozen=True)
class Gptq(_Calibrated):
    """GPTQ (GPTQModel): weights rounded one column at a time, correcting the error with second-order
    statistics of the calibration activations."""

    type_name: ClassVar[str] = "gptq"
    description: ClassVar[str] = "GPTQ weight-only (GPTQModel), calibrated on samples split off the task data"
    allowed_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)


@dataclass(frozen=True)
class Awq(_Calibrated):
    """AWQ (GPTQModel): per-channel scales chosen from calibration activations protect the salient
    weights, then 4-bit round-to-nearest per group."""

    type_name: ClassVar[str] = "awq"
    description: ClassVar[str] = "AWQ 4-bit weight-only (GPTQModel), calibrated on samples split off the task data"
    unsupported: ClassVar[dict[str, str]] = {
        t: "GPTQModel 7.6's AWQ cannot run Gemma 3's rotary embedding (measured); use int4-gptq"
        for t in ("gemma3", "gemma3_text")
    }


@dataclass(frozen=True)
class Nf4(CandidateConfig):
    type_name: ClassVar[str] = "nf4"
    double_quant: bool = True
    description: ClassVar[str] = "NF4 4-bit normal-float weights, absmax per block of 64 (bitsandbytes)"
    weight_bits: ClassVar[float] = 4.25

    def bytes_per_weight(self) -> float:
        return 0.5 + (1 / 64 + 4 / (64 * 256) if self.double_quant else 4 / 64)


@dataclass(frozen=True)
class Prequantized(CandidateConfig):
    """A checkpoint quantized elsewhere (a published AWQ / GPTQ / bitsandbytes / torchao / fp8
    release, or any other Hugging Face folder of the same model), evaluated as it is against the
    baseline. ``method``, ``bits`` and ``group_size`` are read from its ``quantization_config``
    (``checkpoint_quantization``) when the job is submitted; they drive the cost and fit estimates.

    A ``.gguf`` file (llama.cpp / Ollama: Q4_K_M, Q8_0, ...) is one too, ``method`` "gguf": its weights
    are dequantized exactly as stored and scored; ``bits_per_weight`` is measured from its tensors."""

    type_name: ClassVar[str] = "prequantized"
    path: str = ""
    # quantization_config.quant_method, "none" for a plain 16/32-bit checkpoint; TORCHAO_FP8 for
    # torchao's fp8-activation configs (computed in fp8: needs a GPU that has it)
    method: str = "none"
    bits: int = 16
    group_size: int = 0  # 0: per channel, or not grouped
    file_type: str = ""  # a GGUF file's type (Q4_K_M, Q8_0, ...); "" for a Hugging Face folder
    bits_per_weight: float = 0.0  # a GGUF file's, from its weight tensors' bytes; 0: from bits and group size
    description: ClassVar[str] = "a checkpoint quantized elsewhere (LABEL=PATH: a folder or a .gguf file), evaluated as it is"

    @property
    def is_gguf(self) -> bool:
        return self.method == GGUF

    @property
    def weight_bits(self) -> float:  # type: ignore[override]
        if self.bits_per_weight:
            return self.bits_per_weight
        return self.bits + (32 / self.group_size if self.group_size and self.bits < 16 else 0)

    @property
    def compute(self) -> str:  # type: ignore[override]
        return "fp8" if self.method in FP8_METHODS else "bf16"

    def bytes_per_weight(self) -> float:
        if self.bits_per_weight:
            return self.bits_per_weight / 8
        if self.bits >= 16:
            return 2.0
        return _grouped_bytes(self.bits, self.group_size) if self.group_size else self.bits / 8 + 2 / 4096


TORCHAO_FP8 = "torchao_fp8"
COMPRESSED_FP8 = "compressed-tensors_fp8"  # fp8 weights and activations (llm-compressor's FP8 scheme)
FP8_METHODS = ("fp8", "fbgemm_fp8", TORCHAO_FP8, COMPRESSED_FP8)
GGUF = "gguf"


def checkpoint_quantization(config: dict[str, Any], where: str = "config.json") -> tuple[str, int, int]:
    """(method, bits, group size) of a checkpoint from its ``config.json`` (``where``, named in the
    errors): its ``quantization_config`` (GPTQ/AWQ ``bits``/``group_size``, bitsandbytes 4/8-bit,
    fp8, torchao's config type), or a plain checkpoint's dtype."""
    text = config.get("text_config")
    q = config.get("quantization_config") or (text.get("quantization_config") if isinstance(text, dict) else None)
    if not q:
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
        return "none", 32 if "32" in dtype else 16, 0
    q = _object(q, "quantization_config", where)
    method = str(q.get("quant_method", "unknown")).lower()
    if method == "torchao":
        return _torchao_quantization(q, where)
    group = _count(q.get("group_size") or q.get("q_group_size"), "quantization_config.group_size", where)
    if method == "bitsandbytes":
        return method, 4 if q.get("load_in_4bit") else 8, 64 if q.get("load_in_4bit") else 0
    if method in FP8_METHODS or "fp8" in str(q.get("quant_type", "")).lower():
        return method, 8, 0
    bits = q.get("bits") or q.get("w_bit") or q.get("weight_bits")
    if bits is None and method == "compressed-tensors":  # its weights' num_bits, first group
        groups = _object(q.get("config_groups") or {}, "quantization_config.config_groups", where)
        name, first = next(iter(groups.items()), ("", {}))
        at = f"quantization_config.config_groups.{name}"
        first = _object(first, at, where)
        weights = _object(first.get("weights") or {}, f"{at}.weights", where)
        inputs = _object(first.get("input_activations") or {}, f"{at}.input_activations", where)
        bits, group = weights.get("num_bits"), _count(weights.get("group_size"), f"{at}.weights.group_size", where)
        if all(t.get("type") == "float" and t.get("num_bits") == 8 for t in (weights, inputs)):
            return COMPRESSED_FP8, 8, 0  # llm-compressor's FP8 (W8A8): computed in fp8
    return method, _count(bits, "quantization_config.bits", where) or 8, max(group, 0)


def _object(value: Any, field: str, where: str) -> dict[str, Any]:
    """A field of a checkpoint's config.json read as an object: another type is the file's error, in one line."""
    if not isinstance(value, dict):
        raise InputError(f"{where}: field {field!r} is {_shown(value)}, not a JSON object")
    return value


def _count(value: Any, field: str, where: str) -> int:
    """A bit width or group size of a checkpoint's config.json: an integer (or its digits in a string);
    missing (None, 0) is 0."""
    if not value:
        return 0
    digits = str(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else ""
    if not re.fullmatch(r"\s*-?[0-9]{1,9}\s*", digits):
        raise InputError(f"{where}: field {field!r} is {_shown(value)}, not an integer")
    return int(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:36]}..."


def _torchao_quantization(q: dict[str, Any], where: str = "config.json") -> tuple[str, int, int]:
    """A torchao checkpoint's (method, bits, group size), from its serialized config
    (``quant_type: {"default": {"_type": "Int4WeightOnlyConfig", "_data": {...}}}``, as transformers'
    ``TorchAoConfig`` writes it). A config type not known here is refused: guessing its bits would
    price it wrongly."""
    qt = q.get("quant_type")
    default = qt.get("default") if isinstance(qt, dict) else None
    kind = str(default.get("_type", "")) if isinstance(default, dict) else ""
    at = "quantization_config.quant_type.default._data"
    data = _object((default.get("_data") if isinstance(default, dict) else None) or {}, at, where)

    def inner(value: Any) -> Any:  # a serialized torch/torchao object: {"_type", "_data"}
        return value.get("_data") if isinstance(value, dict) else value

    granularity = data.get("granularity")
    if isinstance(granularity, dict) and granularity.get("_type") == "PerGroup":
        per_group = _object(inner(granularity) or {}, f"{at}.granularity._data", where)
        group = _count(per_group.get("group_size"), f"{at}.granularity._data.group_size", where)
    else:
        group = _count(data.get("group_size"), f"{at}.group_size", where)  # PerRow / PerAxis: per channel
    if kind == "Int4WeightOnlyConfig":
        return "torchao", 4, group or 128  # torchao's default group size
    if kind == "Float8DynamicActivationInt4WeightConfig":  # int4 weights, fp8 activations
        return TORCHAO_FP8, 4, group or 128
    if kind.startswith("Float8"):  # fp8 weights; with fp8 activations, computed in fp8
        return (TORCHAO_FP8 if "Activation" in kind else "torchao"), 8, 0
    if kind in ("Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig"):
        return "torchao", 8, group
    bits = re.fullmatch(r"u?int([1-8])", str(inner(data.get("weight_dtype")) or ""))
    if bits and "Intx" in kind:  # IntxWeightOnlyConfig, Int8DynamicActivationIntxWeightConfig
        return "torchao", int(bits.group(1)), group
    raise InputError(f"torchao checkpoint of {kind or qt!r}: its bits per weight are unknown to quantselect "
                     "(known: Int4WeightOnlyConfig, IntxWeightOnlyConfig, Int8*, Float8*)")


CONFIG_TYPES: dict[str, type[CandidateConfig]] = {
    c.type_name: c
    for c in (FullPrecision, HalfPrecision, Int8WeightOnly, Int8Dynamic, Int4WeightOnly, LowBitWeightOnly,
              Fp8Dynamic, Gptq, Awq, Nf4, Prequantized)
}

# The catalogue users pick from by name.
CATALOG: dict[str, CandidateConfig] = {
    BASELINE: FullPrecision(),
    "bf16": HalfPrecision("bfloat16"),
    "fp16": HalfPrecision("float16"),
    "int8": Int8WeightOnly(),
    "w8a8": Int8Dynamic(),
    "int4": Int4WeightOnly(group_size=32),
    "fp8": Fp8Dynamic(),
    "int4-gptq": Gptq(bits=4, group_size=128),
    "int4-awq": Awq(bits=4, group_size=128),
    "nf4": Nf4(),
    "int3": LowBitWeightOnly(bits=3),
    "int2": LowBitWeightOnly(bits=2),
}

DEFAULT_CANDIDATES = ("bf16", "int8", "w8a8", "int4")


@dataclass(frozen=True)
class Candidate:
    name: str
    config: CandidateConfig

    @property
    def is_baseline(self) -> bool:
        return self.name == BASELINE

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Candidate":
        return cls(name=d["name"], config=config_from_dict(d["config"]))


def _stored_dtype(dtype: Any) -> Any:
    """A stored half-precision dtype as torch names it: ``torch.bfloat16``, ``BF16``, ``half`` read as
    bfloat16, bfloat16, float16."""
    if not isinstance(dtype, str):
        return dtype
    name = dtype.strip().lower().removeprefix("torch.")
    return {"bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(name, name)


def config_from_dict(d: dict[str, Any]) -> CandidateConfig:
    cls = CONFIG_TYPES.get(d.get("_type", ""))
    data = d.get("_data") or {}
    if cls is HalfPrecision and _stored_dtype(data.get("dtype")) not in ("bfloat16", "float16"):
        # stored before stop 26, when half precision took any torch dtype (float32, float64...): read back as the
        # full precision it was
        cls, data = FullPrecision, {k: v for k, v in data.items() if k != "dtype"}
        d = {**d, "_version": cls.version}
    elif cls is HalfPrecision and "dtype" in data:
        data = {**data, "dtype": _stored_dtype(data["dtype"])}
    if cls is None:
        raise InputError(f"unknown candidate config type {d.get('_type')!r}")
    if d.get("_version") != cls.version:
        raise InputError(f"candidate config {cls.type_name} version {d.get('_version')} is not supported")
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise InputError(f"candidate config {cls.type_name}: unknown field(s) {', '.join(sorted(unknown))}")
    return cls(**data)


LABEL = re.compile(r"[a-z0-9][a-z0-9._-]{0,39}")


def parse_candidate(spec: str) -> Candidate:
    """``NAME`` or ``NAME:key=value[:key=value...]`` (e.g. ``int4-gptq:group_size=64:bits=3``): a
    catalogue entry with some of its parameters changed; or ``LABEL=PATH[:kv_cache=fp8]``: a checkpoint
    quantized elsewhere (``Prequantized``; the service reads its quantization from the folder), named
    ``LABEL[:kv_cache=fp8]``. Errors name the candidate and the field."""
    label, eq, path = spec.strip().partition("=")
    if eq and ":" not in label:
        label = label.strip()
        if not LABEL.fullmatch(label) or label in CATALOG:
            raise InputError(f"candidate {spec!r}: the label {label!r} must be lower case letters, digits, '.', '_' "
                             "or '-' (up to 40), and not a catalogue name")
        path, kv = path.strip(), ""
        if ":kv_cache=" in path:  # a checkpoint evaluated with an fp8 KV cache
            path, _, kv = (p.strip() for p in path.rpartition(":kv_cache="))
            if not kv:
                raise InputError(f"candidate {spec!r}: kv_cache= needs a value (fp8)")
        if not path:
            raise InputError(f"candidate {spec!r}: give the checkpoint's folder (or .gguf file) after '='")
        if kv and path.lower().endswith(".gguf"):
            raise InputError(f"candidate {spec!r}: kv_cache={kv} is vLLM's KV cache; a .gguf file is served by "
                             "llama.cpp, whose cache types (q8_0, q4_0) are not emulated")
        try:
            config = Prequantized(path=path, kv_cache=kv)
        except InputError as e:
            raise InputError(f"candidate {spec!r}: {e}") from None
        return Candidate(f"{label}:kv_cache={kv}" if kv else label, config)
    name, *pairs = [p.strip() for p in spec.strip().split(":")]
    if name not in CATALOG:
        raise InputError(f"unknown candidate {name!r}; known: {', '.join(CATALOG)}")
    base = CATALOG[name]
    known = {f.name: f for f in fields(base)}
    changes: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not raw.strip():
            raise InputError(f"candidate {spec!r}: {pair!r} must be key=value")
        if key not in known:
            options = ", ".join(known) or "none"
            raise InputError(f"candidate {spec!r}: unknown parameter {key!r} (parameters of {name}: {options})")
        if key in changes:  # which one was meant? (the last would win silently)
            raise InputError(f"candidate {spec!r}: {key} given twice; give it once")
        default = known[key].default
        try:
            if isinstance(default, bool):
                if raw.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value: Any = raw.strip().lower() in ("true", "1", "yes")
            elif isinstance(default, int):
                value = int(raw)
            else:
                value = type(default)(raw.strip()) if default is not MISSING else raw.strip()
        except ValueError:
            raise InputError(f"candidate {spec!r}: {key}={raw!r} is not a valid {type(default).__name__}") from None
        changes[key] = value
    try:
        config = replace(base, **changes) if changes else base
    except InputError as e:
        raise InputError(f"candidate {spec!r}: {e}") from None
    canonical = name + "".join(f":{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changes.items()
                               if getattr(base, k) != v)
    return Candidate(canonical, config)


def resolve_candidates(names: list[str] | tuple[str, ...] | None) -> list[Candidate]:
    """Turn user-given names into candidates; the baseline is always first, listed or not."""
    names = list(DEFAULT_CANDIDATES if names is None else names)
    if names and not any(n.strip() for n in names):  # an empty shell variable, `--candidates "$C"`: not a choice
        raise InputError("candidates are empty: name candidates (see `quantselect candidates`), or leave them out "
                         "for the default set")
    seen: dict[str, Candidate] = {}
    for raw in names:
        if not raw.strip():
            continue
        cand = parse_candidate(raw)
        first = seen.get(cand.name)
        if first is not None and first.config != cand.config:  # one label, two checkpoints
            paths = " and ".join(getattr(c.config, "path", "") or c.name for c in (first, cand))
            raise InputError(f"candidate {cand.name!r} is given twice, for {paths}: give each checkpoint its own label")
        if cand.name != BASELINE:
            seen.setdefault(cand.name, cand)
    return [Candidate(BASELINE, CATALOG[BASELINE])] + list(seen.values())
