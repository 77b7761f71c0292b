"""Every candidate on a CUDA GPU (``make device-check``; skipped with the reason elsewhere): each
quantizes a tiny model, saves and reloads its artifact, stays close to the bf16 baseline, and
decodes; the compiled serving engine (static-cache generation) measures a candidate transformers
compiles itself and one it leaves uncompiled."""

from __future__ import annotations

import pytest

from quantselect.domain.candidates import CATALOG
from quantselect.domain.dataset import load_dataset
from tests.fixtures.common import EXAMPLES

pytestmark = pytest.mark.gpu

GPU_CANDIDATES = ("bf16", "fp16", "int8", "w8a8", "int4", "fp8", "nf4", "int4-gptq", "int4-awq")
CALIBRATION = [f"{it.prompt} {it.choices[it.answer]}" for it in load_dataset(EXAMPLES / "piqa-300.jsonl", limit=16).items]


@pytest.mark.parametrize("name", GPU_CANDIDATES)
def test_every_candidate_on_the_gpu(tiny_llama, tmp_path, name):
    import torch

    from quantselect.engines import measure
    from quantselect.engines.quantize import availability, load_candidate

    config = CATALOG[name]
    reason = availability(config)
    assert reason is None, reason  # on a GPU machine every candidate must run (fp8: compute capability >= 8.9)
    base = load_candidate(str(tiny_llama), CATALOG["baseline"], "cuda")
    lm = load_candidate(str(tiny_llama), config, "cuda", artifacts_dir=str(tmp_path),
                        calibration=CALIBRATION if config.calibrated else None)
    assert lm.device == "cuda" and (lm.artifact_path is not None or name in ("bf16", "fp16"))
    x = torch.arange(1, 33, device="cuda").unsqueeze(0)
    with torch.inference_mode():
        ref, out = base.model(x).logits.float(), lm.model(x).logits.float()
    assert torch.isfinite(out).all()
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.9
    # decoding works (eager and short here: the compiled engine of every candidate is measured by
    # benchmarks/precision_matrix.py, and one compile per candidate would not fit the check's minutes)
    assert measure.decode_tokens_per_second(lm.model, lm.tokenizer, new_tokens=4, repeats=1) > 0


@pytest.mark.parametrize("name", ["bf16", "int4-gptq", "bf16:kv_cache=fp8"])
def test_the_compiled_serving_engine_measures_on_the_gpu(tiny_llama, tmp_path, name):
    """Static-cache generation compiled: by transformers itself (bf16), and forced for a quantizer
    it leaves uncompiled (GPTQ, with GPTQModel's Triton kernel chosen at reload: no nvcc build); the
    fp8 KV cache's rounding compiles into the attention."""
    from quantselect.domain.candidates import parse_candidate
    from quantselect.engines import measure
    from quantselect.engines.quantize import load_candidate

    config = parse_candidate(name).config
    lm = load_candidate(str(tiny_llama), config, "cuda", artifacts_dir=str(tmp_path),
                        calibration=CALIBRATION if config.calibrated else None)
    speed = measure.throughput(lm.model, lm.tokenizer, new_tokens=16)
    assert "compiled" in speed.engine and "eager" not in speed.engine, speed.engine
    assert speed.decode_b1 > 0 and speed.decode_b16 > speed.decode_b1
    if name == "int4-gptq":
        assert "forced for gptq" in speed.engine and "Triton" in speed.engine, speed.engine


def test_multiple_choice_scoring_on_the_gpu_matches_the_padded_path(tiny_llama, monkeypatch):
    """The unpadded rows, the batch's shared prefix run once and the blocked vocabulary projection on
    CUDA (fp32, so that only the method can differ) against padded rows through the model's own path."""
    from quantselect.engines import evaluate as ev
    from quantselect.engines.quantize import load_candidate

    lm = load_candidate(str(tiny_llama), CATALOG["baseline"], "cuda")
    model = lm.model.float()
    items = load_dataset(EXAMPLES / "sequences-1000.jsonl", limit=64).items  # "Continue the sequence:" each
    assert ev._unpadded_supported(model)
    fast = ev.score_multiple_choice(model, lm.tokenizer, items)
    monkeypatch.setattr(ev, "_unpadded_supported", lambda m: False)
    padded = ev.score_multiple_choice(model, lm.tokenizer, items)
    for a, b in zip(fast, padded):
        assert a.choice_logprobs == pytest.approx(b.choice_logprobs, abs=1e-3)


def test_the_servers_compiled_static_cache_decodes_like_the_dynamic_cache(tiny_llama):
    """A GPU replica's engine: the one-token step compiled with CUDA graphs over a static cache reused
    across requests (fp32, so that only the engine can differ)."""
    import torch

    from quantselect.engines.decode import Decoder
    from quantselect.engines.quantize import load_candidate

    lm = load_candidate(str(tiny_llama), CATALOG["baseline"], "cuda")
    model = lm.model.float()
    static, dynamic = Decoder(model, static=True, max_len=128), Decoder(model, static=False)
    static.warm_up()
    for prompt in ("Once upon a time", "The capital of France is"):
        ids = lm.tokenizer(prompt)["input_ids"]
        runs = []
        for decoder in (static, dynamic):
            out = []
            with torch.inference_mode():
                logits = decoder.prefill(ids)
                for _ in range(16):
                    out.append(int(logits.argmax()))
                    logits = decoder.step(out[-1])
            runs.append(out)
        assert runs[0] == runs[1], prompt
    assert static.compiled  # torch.compile took the model: no fallback to eager


def test_the_batched_engine_decodes_each_row_like_the_dynamic_cache_on_the_gpu(tiny_llama):
    """The server's batch on a GPU (``engine: dynamic``, and requests longer than the static cache):
    two sequences, the second joining a step later, each greedy-decodes as it does alone."""
    import torch

    from quantselect.engines.decode import BatchDecoder, Decoder
    from quantselect.engines.quantize import load_candidate

    lm = load_candidate(str(tiny_llama), CATALOG["baseline"], "cuda")
    model = lm.model.float()
    prompts = [lm.tokenizer(p)["input_ids"] for p in ("Once upon a time", "The capital of France is a city")]
    alone = []
    with torch.inference_mode():
        for ids in prompts:
            d, out = Decoder(model, static=False), []
            logits = d.prefill(ids)
            for _ in range(12):
                out.append(int(logits.argmax()))
                logits = d.step(out[-1])
            alone.append(out)
        batch, outs = BatchDecoder(model), [[], []]
        outs[0].append(int(batch.add(prompts[:1])[0].argmax()))
        outs[1].append(int(batch.add(prompts[1:])[0].argmax()))
        while len(outs[1]) < 12:
            logits = batch.step([o[-1] for o in outs])
            for o, row in zip(outs, logits):
                o.append(int(row.argmax()))
    assert outs[0][:12] == alone[0] and outs[1] == alone[1]


def test_rays_type_of_this_gpu_finds_its_results_and_never_overstates_its_memory():
    """The type Ray gives this node's GPU names the device results are stored with as whole words
    (so that a cached result measured here is reused here, and only on this GPU), and the memory
    packing assumes for it is not more than the GPU has (Ray's "A100" may be the 40 GB card)."""
    import re

    import torch
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    from quantselect.domain.gpus import accelerator_memory_gib
    from quantselect.orchestration.cluster import device_patterns

    kind = NvidiaGPUAcceleratorManager.get_current_node_accelerator_type()
    device = f"cuda:{torch.cuda.get_device_name()}"
    patterns = device_patterns([{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0, f"accelerator_type:{kind}": 1.0}}])
    like = [re.fullmatch(re.escape(p).replace("%", ".*").replace("_", "."), device, re.IGNORECASE) for p in patterns]
    assert any(like), (kind, device, patterns)
    gib = accelerator_memory_gib(kind)
    total = torch.cuda.get_device_properties(0).total_memory
    assert gib is None or gib * 2**30 <= 1.05 * total, (kind, gib, total)  # the table's figure, give or take
