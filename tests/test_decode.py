"""The server's decoding engines: a static KV cache (reused across requests; compiled on a GPU)
gives the same tokens as the dynamic cache, in every tiny family and SmolLM2."""

from __future__ import annotations

import pytest

from quantselect.domain.candidates import CATALOG
from quantselect.engines.decode import Decoder
from quantselect.engines.quantize import load_candidate
from tests.fixtures.models import FAMILIES


def greedy(decoder: Decoder, ids: list[int], n: int) -> list[int]:
    import torch

    out: list[int] = []
    with torch.inference_mode():
        logits = decoder.prefill(ids)
        for _ in range(n):
            out.append(int(logits.argmax()))
            logits = decoder.step(out[-1])
    return out


@pytest.mark.parametrize("family", [*FAMILIES, "smollm2"])
def test_the_static_cache_decodes_the_tokens_of_the_dynamic_cache(tiny_models, demo_model_dir, family):
    path = demo_model_dir if family == "smollm2" else tiny_models[family]
    lm = load_candidate(str(path), CATALOG["baseline"], "cpu")
    static, dynamic = Decoder(lm.model, static=True, compiled=False, max_len=64), Decoder(lm.model, static=False)
    static.warm_up()  # what a GPU replica does at start (compiling there); the next requests reset the cache
    prompts = [lm.tokenizer(p)["input_ids"] for p in ("Once upon a time", "The capital of France is", "1, 2, 3,")]
    for ids in prompts:  # the same static cache, reset between requests
        assert greedy(static, ids, 20) == greedy(dynamic, ids, 20), family
    assert static.fits(40, 24) and not static.fits(41, 24) and dynamic.fits(10_000, 10_000)


def test_the_static_cache_is_never_longer_than_the_model_context(tiny_llama):
    lm = load_candidate(str(tiny_llama), CATALOG["baseline"], "cpu")
    assert Decoder(lm.model, static=True).max_len == 512  # the tiny models' max_position_embeddings
