"""Measurements of a loaded candidate: memory and generation throughput."""

from __future__ import annotations

import resource
import time
from typing import Any

THROUGHPUT_PROMPT = "Write a short story about a robot who learns to paint."


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes(device: str) -> int:
    """CUDA peak allocated on a GPU; the process's peak resident set size on CPU (each candidate
    runs in a fresh worker process, so this is the candidate's own peak)."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def decode_tokens_per_second(model: Any, tokenizer: Any, new_tokens: int = 32, repeats: int = 2) -> float:
    """Greedy decode at batch 1 after a warm-up; the best of ``repeats`` runs (least disturbed by
    other work on a shared machine)."""
    import torch

    device = next(model.parameters()).device
    enc = tokenizer(THROUGHPUT_PROMPT, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    best = 0.0
    with torch.inference_mode():
        model.generate(**enc, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.generate(**enc, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            generated = out.shape[1] - enc["input_ids"].shape[1]
            best = max(best, generated / (time.perf_counter() - start))
    return best
