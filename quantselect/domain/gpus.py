"""Common inference GPUs: memory, bandwidth, peak compute, and an indicative price."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from quantselect.errors import InputError

DEFAULT_TARGET = "H100-80GB"


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float  # usable, as the driver reports it
    bandwidth_tbs: float  # memory bandwidth, TB/s
    bf16_tflops: float  # dense tensor-core peak
    int8_tops: float | None
    fp8_tflops: float | None  # None: no fp8 tensor cores (compute capability < 8.9)
    capability: tuple[int, int]
    usd_per_hour: float  # indicative on-demand price of one GPU; override per job
    aliases: tuple[str, ...] = ()

    def peak(self, compute: str) -> float:
        """FLOP/s of the candidate's compute format (bf16 where the GPU lacks the format)."""
        value = {"int8": self.int8_tops, "fp8": self.fp8_tflops}.get(compute) or self.bf16_tflops
        return value * 1e12

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["capability"] = ".".join(map(str, self.capability))
        d["aliases"] = list(self.aliases)
        return d


# Datasheet figures (dense, no sparsity; a GeForce card's bf16/fp8 with FP32 accumulate run at half
# rate, its INT8 does not: the RTX 4090 does 165 / 330 / 660 per the Ada whitepaper); prices are
# indicative on-demand cloud prices per GPU-hour in late 2026 -- override them with the job's --gpu-hour-usd.
GPUS: dict[str, GpuSpec] = {g.name: g for g in (
    GpuSpec("H100-80GB", 79.6, 3.35, 989, 1979, 1979, (9, 0), 2.50, ("H100",)),
    GpuSpec("A100-80GB", 79.2, 2.04, 312, 624, None, (8, 0), 1.60, ("A100",)),
    GpuSpec("L40S", 44.5, 0.864, 362, 733, 733, (8, 9), 1.00),
    GpuSpec("L4", 22.0, 0.300, 121, 242, 242, (8, 9), 0.50),
    GpuSpec("A10G", 22.0, 0.600, 70, 140, None, (8, 6), 1.00),
    GpuSpec("RTX-4090", 23.6, 1.008, 165, 660, 330, (8, 9), 0.40, ("4090", "GeForce RTX 4090")),
)}

# Other memory sizes a table GPU also comes in: Ray names a GPU by its model alone ("NVIDIA
# A100-SXM4-40GB" is "A100", as is the 80 GB card), so its memory is unknown from that name: shares
# sized for the 80 GB card would run a 40 GB one out of memory, and the 40 GB size would refuse or
# split what an 80 GB card holds.
OTHER_SIZES_GIB: dict[str, tuple[float, ...]] = {"A100-80GB": (39.4,)}


def gpu(name: str | None) -> GpuSpec:
    """The table entry for a user-given name (case and punctuation do not matter)."""
    key = _norm(name or DEFAULT_TARGET)
    for spec in GPUS.values():
        if key in {_norm(spec.name), *map(_norm, spec.aliases)}:
            return spec
    raise InputError(f"unknown target GPU {name!r}; known: {', '.join(GPUS)}")


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _contains(words: list[str], part: list[str]) -> bool:
    n = len(part)
    return any(words[i:i + n] == part for i in range(len(words) - n + 1))


def gpu_of_device(device: str | None) -> GpuSpec | None:
    """The table entry a measured device ("cuda:NVIDIA H100 80GB HBM3") is, if any: a table name
    (or alias) must occur in it as whole words ("L4" is not "L40", "A10G" not "A100", "RTX-4090" is
    not "RTX A6000"); of several matches, the longest name wins."""
    if not device or not device.startswith("cuda"):
        return None
    words = _words(device)
    best: tuple[int, GpuSpec] | None = None
    for spec in GPUS.values():
        if spec.name.endswith("80GB") and "80gb" not in words:
            continue  # a 40 GB A100 / a PCIe H100 variant is not the table's GPU
        for name in (spec.name, spec.name.removesuffix("-80GB"), *spec.aliases):
            part = _words(name)
            if part and _contains(words, part) and (best is None or len(name) > best[0]):
                best = (len(name), spec)
    return best[1] if best else None


def accelerator_memory_gib(kind: str) -> float | None:
    """The memory of one GPU of a Ray accelerator type ("L40S", "A100-80G"), from the table; None for a
    GPU the table lacks ("L4" is not "L40S": names compare whole) and for one sold in several sizes
    whose type does not name it ("A100": 40 or 80 GB)."""
    sized = re.fullmatch(r"(.+?)-(\d+)GB?", kind.strip(), re.IGNORECASE)
    key = _norm(sized[1] if sized else kind)
    for spec in GPUS.values():
        if key in {_norm(spec.name), _norm(re.sub(r"-\d+GB$", "", spec.name)), *map(_norm, spec.aliases)}:
            sizes = (spec.memory_gib, *OTHER_SIZES_GIB.get(spec.name, ()))
            near = [s for s in sizes if sized and abs(s - float(sized[2])) <= 0.1 * float(sized[2])]
            return min(near) if near else (sizes[0] if len(sizes) == 1 else None)
    return None
