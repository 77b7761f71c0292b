"""Candidate configs: inert, versioned objects, one registered engine handler each.

A config says *what* to run (``Int8WeightOnly()``); the engines layer owns *how*. Configs
serialize as ``{"_type", "_version", "_data"}`` and load back only from the allow-list below.
Adding a scheme = one config class here + one handler in ``quantselect.engines.quantize``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from quantselect.errors import InputError

BASELINE = "baseline"


@dataclass(frozen=True)
class CandidateConfig:
    type_name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    description: ClassVar[str] = ""
    weight_bits: ClassVar[float] = 16.0  # per weight, for display and rough estimates

    def to_dict(self) -> dict[str, Any]:
        return {"_type": self.type_name, "_version": self.version, "_data": asdict(self)}


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


@dataclass(frozen=True)
class Int8WeightOnly(CandidateConfig):
    type_name: ClassVar[str] = "int8_weight_only"
    description: ClassVar[str] = "int8 weights, per-channel scales (torchao), activations in float"
    weight_bits: ClassVar[float] = 8.0


@dataclass(frozen=True)
class Int8Dynamic(CandidateConfig):
    type_name: ClassVar[str] = "int8_dynamic"
    description: ClassVar[str] = "W8A8: int8 weights, dynamically quantized int8 activations (torchao on GPU, fbgemm on CPU)"
    weight_bits: ClassVar[float] = 8.0


@dataclass(frozen=True)
class Int4WeightOnly(CandidateConfig):
    type_name: ClassVar[str] = "int4_weight_only"
    group_size: int = 32
    description: ClassVar[str] = "int4 weights, round-to-nearest with per-group scales (torchao), float activations"
    weight_bits: ClassVar[float] = 4.5

    def __post_init__(self) -> None:
        if self.group_size not in (16, 32, 64, 128, 256):
            raise InputError(f"int4 group_size {self.group_size} must be one of 16, 32, 64, 128, 256")


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
        if self.bits not in (2, 3):
            raise InputError(f"low-bit bits {self.bits} must be 2 or 3 (use int4 / int8 for more)")
        if self.group_size not in (16, 32, 64, 128, 256):
            raise InputError(f"low-bit group_size {self.group_size} must be one of 16, 32, 64, 128, 256")


@dataclass(frozen=True)
class Fp8Dynamic(CandidateConfig):
    type_name: ClassVar[str] = "fp8_dynamic"
    description: ClassVar[str] = "fp8 e4m3 weights and dynamically quantized fp8 activations (torchao)"
    weight_bits: ClassVar[float] = 8.0


CONFIG_TYPES: dict[str, type[CandidateConfig]] = {
    c.type_name: c
    for c in (FullPrecision, HalfPrecision, Int8WeightOnly, Int8Dynamic, Int4WeightOnly, LowBitWeightOnly,
              Fp8Dynamic)
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


def config_from_dict(d: dict[str, Any]) -> CandidateConfig:
    cls = CONFIG_TYPES.get(d.get("_type", ""))
    if cls is None:
        raise InputError(f"unknown candidate config type {d.get('_type')!r}")
    if d.get("_version") != cls.version:
        raise InputError(f"candidate config {cls.type_name} version {d.get('_version')} is not supported")
    known = {f.name for f in fields(cls)}
    data = d.get("_data") or {}
    unknown = set(data) - known
    if unknown:
        raise InputError(f"candidate config {cls.type_name}: unknown field(s) {', '.join(sorted(unknown))}")
    return cls(**data)


def resolve_candidates(names: list[str] | tuple[str, ...] | None) -> list[Candidate]:
    """Turn user-given names into candidates; the baseline is always first, listed or not."""
    names = list(DEFAULT_CANDIDATES if names is None else names)
    seen: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name not in CATALOG:
            raise InputError(f"unknown candidate {name!r}; known: {', '.join(CATALOG)}")
        if name not in seen:
            seen.append(name)
    if BASELINE in seen:
        seen.remove(BASELINE)
    return [Candidate(BASELINE, CATALOG[BASELINE])] + [Candidate(n, CATALOG[n]) for n in seen]
