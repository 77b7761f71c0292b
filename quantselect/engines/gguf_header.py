"""A GGUF file's header, read without its tensors: the key-value metadata (the model's shape, its
tokenizer, its type) and each tensor's name, shape and type. It is at the start of the file, a few
megabytes (most of it the tokenizer's vocabulary) before gigabytes of weights, so it can be read
from a local file or, by ranged requests, from the Hugging Face Hub without downloading the weights.

The layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md, versions 2 and 3):
``GGUF``, version (u32), tensor count (u64), key-value count (u64); each key-value: key (string),
value type (u32), value; each tensor: name (string), dimension count (u32), dimensions (u64 each,
fastest first), ggml type (u32), offset (u64). A string is its length (u64) then UTF-8 bytes; an
array is its element type (u32), length (u64), then the elements. Little-endian, or big-endian
throughout (a version whose low half is 0 read the other way round).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from quantselect.errors import InputError

VERSIONS = (2, 3)
# value type -> struct format (STRING = 8 and ARRAY = 9 are read apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_FIRST_READ = 1 << 20  # then twice as much each time: a 10 MB header (a 150k-token vocabulary) in 4 reads
# What a header may hold, so that a crafted one (a Hub file an API request names) cannot take the
# memory of the process reading it: real headers are 10-20 MB and under a million values (a 262k
# vocabulary's tokens, scores and types, its merges), each parsed value a Python object
MAX_HEADER_BYTES = 256 << 20
MAX_HEADER_VALUES = 1 << 23  # key-values, tensors, their dimensions and array elements together


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order, fastest-varying dimension first
    ggml_type: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_bytes(self) -> int:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        return self.n_elements * size // block

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.ggml_type).name


@dataclass(frozen=True)
class Header:
    version: int
    fields: dict[str, Any]  # key -> value; an array is a list
    tensors: tuple[TensorInfo, ...]
    size: int  # bytes from the start of the file to the end of the tensor infos


class _Stream:
    """Sequential reads over ``fetch(offset, n)`` (fewer bytes only at the end of the file),
    buffered in reads that double in size."""

    def __init__(self, fetch: Callable[[int, int], bytes], where: str, size: int | None, buf: bytearray) -> None:
        self._fetch, self.where, self.size = fetch, where, size
        self._buf = buf
        self._eof = False
        self.pos = 0
        self.values = 0
        self.order = "<"

    def _too_big(self, what: str) -> InputError:
        return InputError(f"{self.where}: its header {what}: not a GGUF file quantselect reads")

    def count(self, n: int) -> int:
        """``n`` more values declared, refused before any is read when there are too many."""
        self.values += n
        if self.values > MAX_HEADER_VALUES:
            raise self._too_big(f"holds more than {MAX_HEADER_VALUES:,} values")
        return n

    def take(self, n: int) -> memoryview:
        want = self.pos + n
        if self.size is not None and want > self.size:  # a corrupt length: fail before fetching the rest
            raise InputError(f"{self.where}: not a readable GGUF file (it ends inside its header, at byte {self.size})")
        if want > MAX_HEADER_BYTES:
            raise self._too_big(f"is larger than {MAX_HEADER_BYTES / 2**20:g} MiB")
        while len(self._buf) < want and not self._eof:
            ask = min(max(want - len(self._buf), _FIRST_READ, len(self._buf)), MAX_HEADER_BYTES - len(self._buf))
            if self.size is not None:
                ask = min(ask, self.size - len(self._buf))
            got = self._fetch(len(self._buf), ask)
            self._eof = len(got) < ask
            self._buf += got
        if len(self._buf) < want:
            raise InputError(f"{self.where}: not a readable GGUF file (it ends inside its header, at byte {len(self._buf)})")
        out = memoryview(self._buf)[self.pos:want]
        self.pos = want
        return out

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack(self.order + fmt, self.take(size))[0]

    def string(self) -> str:
        n = self.scalar("Q")  # a length past the file or MAX_HEADER_BYTES is refused before it is read
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            inner, n = self.scalar("I"), self.count(self.scalar("Q"))
            if inner in _SCALARS:  # one read for the whole array
                fmt = _SCALARS[inner]
                return list(struct.unpack(f"{self.order}{n}{fmt}", self.take(n * struct.calcsize(fmt))))
            return [self.value(inner) for _ in range(n)]
        raise InputError(f"{self.where}: not a readable GGUF file (value type {kind} at byte {self.pos - 4})")


def read_header(fetch: Callable[[int, int], bytes], where: str, size: int | None = None,
                read: bytearray | None = None) -> Header:
    """The header of the GGUF file of ``size`` bytes that ``fetch(offset, n)`` reads (``where``
    names it in errors); ``read``, when given, is filled with the bytes fetched (at least the
    header's ``size``: a caller that keeps them needs no second copy)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    s = _Stream(fetch, where, size, bytearray() if read is None else read)
    if bytes(s.take(4)) != b"GGUF":
        raise InputError(f"{where}: not a readable GGUF file (it does not start with 'GGUF')")
    version = s.scalar("I")
    if version & 0xFFFF == 0:  # written big-endian
        s.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in VERSIONS:
        raise InputError(f"{where}: not a readable GGUF file (version {version}; versions "
                         f"{' and '.join(map(str, VERSIONS))} are read)")
    n_tensors, n_fields = s.count(s.scalar("Q")), s.count(s.scalar("Q"))
    fields: dict[str, Any] = {}
    for _ in range(n_fields):
        key = s.string()
        fields[key] = s.value(s.scalar("I"))
    tensors = []
    for _ in range(n_tensors):
        name = s.string()
        dims = s.count(s.scalar("I"))
        shape = tuple(s.scalar("Q") for _ in range(dims))
        kind = s.scalar("I")
        try:
            GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            from importlib.metadata import version as installed

            raise InputError(f"{where}: tensor {name} has GGML type {kind}, which the installed gguf package "
                             f"({installed('gguf')}) does not know; upgrade it (pip install -U gguf)") from None
        tensors.append(TensorInfo(name, shape, kind))
        s.scalar("Q")  # its offset in the data section
    return Header(version, fields, tuple(tensors), s.pos)


def read_file_header(path: Path, where: str | None = None) -> Header:
    """The header of a local GGUF file (or of the start of one: see ``from_hub``'s header copies),
    named ``where`` in errors (its path by default)."""
    where = where or str(path)
    try:
        with open(path, "rb") as fh:
            def fetch(offset: int, n: int) -> bytes:
                fh.seek(offset)
                return fh.read(n)

            return read_header(fetch, where, os.fstat(fh.fileno()).st_size)
    except OSError as e:
        raise InputError(f"{where}: cannot read it ({e.strerror or e})") from None


# llama.cpp's architecture names that differ from transformers' model_type where the planner tells
# families apart (a non-gated MLP, the period of sliding layers, Llama-4's shared expert)
MODEL_TYPES = {"gpt-oss": "gpt_oss", "phi2": "phi", "gptneox": "gpt_neox", "starcoder": "gpt_bigcode",
               "llama4": "llama4_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "deepseek2": "deepseek_v2"}


def model_config(header: Header) -> dict[str, Any]:
    """The model's shape as the ``config.json`` fields the planner reads, from llama.cpp's keys
    (``{arch}.embedding_length``, ``block_count``, ``attention.head_count``..., a mixture's
    ``expert_count``, DeepSeek's ``attention.kv_lora_rank``, ``attention.sliding_window``)."""
    fields = header.fields

    def get(key: str) -> Any:
        value = fields.get(key)
        return max(value) if isinstance(value, list) and value else value  # per-layer sizes: the widest

    arch = get("general.architecture") or "llama"

    def of(key: str) -> Any:
        return get(f"{arch}.{key}")

    tensors = {t.name for t in header.tensors}
    tokens = fields.get("tokenizer.ggml.tokens")
    cfg = {"model_type": MODEL_TYPES.get(arch, arch), "hidden_size": of("embedding_length"),
           "intermediate_size": of("feed_forward_length"), "num_hidden_layers": of("block_count"),
           "num_attention_heads": of("attention.head_count"), "num_key_value_heads": of("attention.head_count_kv"),
           "head_dim": of("attention.key_length"),
           "vocab_size": of("vocab_size") or (len(tokens) if isinstance(tokens, list) else None),
           "max_position_embeddings": of("context_length"),
           "tie_word_embeddings": "output.weight" not in tensors, "attention_bias": "blk.0.attn_q.bias" in tensors,
           # a mixture of experts (Mixtral is a llama whose experts are feed_forward_length wide)
           "num_experts": of("expert_count"), "num_experts_per_tok": of("expert_used_count"),
           "moe_intermediate_size": of("expert_feed_forward_length"),
           "shared_expert_intermediate_size": of("expert_shared_feed_forward_length"),
           "n_shared_experts": of("expert_shared_count"), "first_k_dense_replace": of("leading_dense_block_count"),
           "interleave_moe_layer_step": of("interleave_moe_layer_step"),
           "sliding_window": of("attention.sliding_window")}
    pattern = fields.get(f"{arch}.attention.sliding_window_pattern")  # a period, or a flag per layer
    if isinstance(pattern, list):
        cfg["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    elif isinstance(pattern, int):
        cfg["sliding_window_pattern"] = pattern
    if of("attention.kv_lora_rank"):  # DeepSeek's MLA: llama.cpp writes the absorbed form's key and value
        # lengths (latent + rope, latent) with the heads' own as *_mla; files before mid-2025 only the heads'
        rope = of("rope.dimension_count") or 0
        key = of("attention.key_length_mla") or of("attention.key_length")
        cfg.update({"kv_lora_rank": of("attention.kv_lora_rank"), "q_lora_rank": of("attention.q_lora_rank"),
                    "qk_rope_head_dim": rope, "qk_nope_head_dim": key - rope if key else None,
                    "v_head_dim": of("attention.value_length_mla") or of("attention.value_length")})
    return {k: v for k, v in cfg.items() if v is not None}
