"""Real quantization and evaluation of real models: tiny random Llama/Mistral/Qwen2 models for every
CPU candidate, the bundled SmolLM2-135M-Instruct for the quality path."""

from __future__ import annotations

import pytest

from quantselect.domain.candidates import CATALOG, Fp8Dynamic
from quantselect.domain.dataset import load_dataset, parse_records
from quantselect.engines import evaluate as ev
from quantselect.engines.quantize import availability, load_candidate, weight_bytes
from quantselect.errors import InputError
from tests.fixtures.common import EXAMPLES
from tests.fixtures.models import FAMILIES

CPU_CANDIDATES = ("baseline", "bf16", "int8", "w8a8", "int4", "nf4", "int4-gptq", "int4-awq")
CALIBRATION = [f"{it.prompt} {it.choices[it.answer]}" for it in load_dataset(EXAMPLES / "piqa-300.jsonl", limit=16).items]


@pytest.fixture(scope="module")
def baseline_logits(tiny_models):
    import torch

    out = {}
    for family, path in tiny_models.items():
        lm = load_candidate(str(path), CATALOG["baseline"], "cpu")
        with torch.inference_mode():
            out[family] = lm.model(torch.arange(1, 33).unsqueeze(0)).logits.float()
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", CPU_CANDIDATES)
def test_every_cpu_candidate_quantizes_each_family(tiny_models, baseline_logits, family, name):
    import torch

    config = CATALOG[name]
    if name == "int4-awq" and family == "gemma":  # refused before any work, saying why
        with pytest.raises(InputError, match="AWQ cannot run Gemma 3"):
            load_candidate(str(tiny_models[family]), config, "cpu", calibration=CALIBRATION)
        return
    layers: list[tuple[int, int]] = []
    lm = load_candidate(str(tiny_models[family]), config, "cpu", calibration=CALIBRATION if config.calibrated else None,
                        progress=lambda done, total: layers.append((done, total)))
    # GPTQ and AWQ go layer by layer and say so (the CLI prints "quantizing 12/32 layers, ...")
    n = lm.model.config.get_text_config().num_hidden_layers
    assert layers == ([(i, n) for i in range(n + 1)] if config.calibrated else []), layers
    with torch.inference_mode():
        logits = lm.model(torch.arange(1, 33).unsqueeze(0)).logits.float()
    ref = baseline_logits[family]
    assert torch.isfinite(logits).all()
    cos = torch.nn.functional.cosine_similarity(logits.flatten(), ref.flatten(), dim=0).item()
    if name == "baseline":
        assert torch.equal(logits, ref)
    else:
        # Really quantized: close to the reference, but not identical to it.
        assert 0.9 < cos and not torch.equal(logits, ref), cos
    if name not in ("baseline", "bf16"):
        body_linear = [m for n, m in lm.model.named_modules() if n.endswith("q_proj")][0]
        assert type(body_linear).__name__ != "Linear" or type(body_linear.weight).__name__ != "Parameter" or \
            type(body_linear.weight.data).__name__ != "Tensor", "the projection was not quantized"


def test_quantized_weights_are_smaller(demo_model_dir):
    sizes = {n: weight_bytes(load_candidate(str(demo_model_dir), CATALOG[n], "cpu").model)
             for n in ("baseline", "bf16", "int8", "int4")}
    assert sizes["bf16"] == pytest.approx(sizes["baseline"] / 2, rel=0.01)
    assert sizes["int8"] < sizes["bf16"] and sizes["int4"] < sizes["bf16"]


def test_nf4_weight_bytes_count_its_quantization_state(tiny_llama):
    """bitsandbytes keeps each 4-bit layer's absmax (one per block of 64) and codebooks beside the
    packed weight, not as parameters: they are counted as bitsandbytes saves them."""
    import torch

    base = load_candidate(str(tiny_llama), CATALOG["baseline"], "cpu").model
    nf4 = load_candidate(str(tiny_llama), CATALOG["nf4"], "cpu").model
    states = [p.quant_state for p in nf4.parameters() if getattr(p, "quant_state", None) is not None]
    linear = sum(m.weight.numel() for n, m in base.named_modules()
                 if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    assert states and sum(q.shape.numel() for q in states) == linear
    saved = sum(t.numel() * t.element_size() for q in states for k, t in q.as_dict(packed=True).items()
                if isinstance(t, torch.Tensor) and not k.startswith("quant_state."))  # not its JSON blob
    offsets = sum(q.offset.numel() * q.offset.element_size() for q in states)  # kept in that blob when saved
    assert weight_bytes(nf4) == weight_bytes(base) - linear * 4 + linear // 2 + saved + offsets


def test_quality_path_on_the_bundled_model(demo_model_dir):
    """SmolLM2 answers PIQA well above chance; int8 weight-only keeps nearly all its answers."""
    items = load_dataset(EXAMPLES / "piqa-300.jsonl", limit=40)
    base = load_candidate(str(demo_model_dir), CATALOG["baseline"], "cpu")
    base_results = ev.evaluate(base.model, base.tokenizer, items)
    acc = sum(r.correct for r in base_results) / len(base_results)
    assert acc >= 0.55, acc
    assert all(len(r.choice_logprobs) == 2 and max(r.choice_logprobs) < 0 for r in base_results)
    q = load_candidate(str(demo_model_dir), CATALOG["int8"], "cpu")
    q_results = ev.evaluate(q.model, q.tokenizer, items)
    agree = sum(a.prediction == b.prediction for a, b in zip(base_results, q_results)) / len(items)
    assert agree >= 0.9, agree


def test_batching_does_not_change_scores(demo_model_dir, monkeypatch):
    items = load_dataset(EXAMPLES / "piqa-300.jsonl", limit=6).items
    lm = load_candidate(str(demo_model_dir), CATALOG["baseline"], "cpu")
    batched = ev.score_multiple_choice(lm.model, lm.tokenizer, items)
    monkeypatch.setitem(ev.TOKENS_PER_BATCH, "cpu", 1)  # one sequence per forward pass
    single = ev.score_multiple_choice(lm.model, lm.tokenizer, items)
    for a, b in zip(batched, single):
        assert a.prediction == b.prediction
        assert a.choice_logprobs == pytest.approx(b.choice_logprobs, abs=1e-3)


def test_generation_and_its_metrics(demo_model_dir):
    lm = load_candidate(str(demo_model_dir), CATALOG["baseline"], "cpu")
    ds = parse_records([{"prompt": "The capital of France is", "reference": "Paris"},
                        {"prompt": "Two plus two equals", "reference": "4"}], metric="exact_match")
    results = ev.evaluate(lm.model, lm.tokenizer, ds, max_new_tokens=4)
    assert "Paris" in results[0].prediction
    assert ev.final_number_match("so the answer is 1,234.", "#### 1234")
    assert not ev.final_number_match("no number here", "#### 5")
    assert ev.exact_match("The Paris.", "paris")
    assert not ev.exact_match("Lyon", "Paris")


def test_fp8_says_why_it_cannot_run_on_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("GPU present: fp8 availability depends on the compute capability")
    assert "compute capability" in availability(Fp8Dynamic())


def test_calibrated_and_nf4_candidates_on_the_bundled_model(demo_model_dir, tmp_path):
    """GPTQ and AWQ (GPTQModel, 8 calibration samples, group size 64: SmolLM2's hidden size 576 is no
    multiple of 128) and NF4 on the real model: smaller, saved and reloaded, and mostly the
    baseline's answers on PIQA items they were not calibrated on."""
    from quantselect.domain.candidates import parse_candidate

    items = load_dataset(EXAMPLES / "piqa-300.jsonl", limit=12).items
    calibration = [f"{it.prompt} {it.choices[it.answer]}" for it in load_dataset(EXAMPLES / "piqa-300.jsonl").items[-8:]]
    base = load_candidate(str(demo_model_dir), CATALOG["baseline"], "cpu")
    base_results = ev.score_multiple_choice(base.model, base.tokenizer, items)
    base_bytes = weight_bytes(base.model)
    for spec in ("int4-gptq:group_size=64", "int4-awq:group_size=64", "nf4"):
        config = parse_candidate(spec).config
        lm = load_candidate(str(demo_model_dir), config, "cpu", artifacts_dir=str(tmp_path),
                            calibration=calibration if config.calibrated else None)
        assert lm.artifact_path and lm.disk_bytes < base_bytes / 2, spec
        results = ev.score_multiple_choice(lm.model, lm.tokenizer, items)
        agree = sum(a.prediction == b.prediction for a, b in zip(base_results, results)) / len(items)
        assert agree >= 0.6, (spec, agree)


def test_a_quantizer_transformers_leaves_uncompiled_is_compiled_for_the_gpu_measurement_and_named(tiny_llama):
    """transformers compiles static-cache decoding only for quantizers it calls compileable; for the
    others (bitsandbytes, GPTQ, AWQ) the GPU measurement lets it compile and says so in the engine
    name, with the kernel classes the model runs, and puts the quantizer back afterwards."""
    from quantselect.engines import measure

    lm = load_candidate(str(tiny_llama), CATALOG["nf4"], "cpu")
    quantizer = lm.model.hf_quantizer
    assert not quantizer.is_compileable  # if transformers changes this, the forcing is no longer needed
    with measure._compile_allowed(lm.model) as note:
        assert lm.model.hf_quantizer.is_compileable and note == ", forced for bitsandbytes"
        assert lm.model.hf_quantizer.quantization_config is quantizer.quantization_config
    assert lm.model.hf_quantizer is quantizer
    assert measure.kernels(lm.model) == ", kernels Linear4bit"
    plain = load_candidate(str(tiny_llama), CATALOG["int8"], "cpu")  # torchao: transformers compiles it itself
    with measure._compile_allowed(plain.model) as note:
        assert note == ""
    assert measure.kernels(plain.model) == ""  # torchao's tensors live in plain nn.Linear layers
    speed = measure.throughput(lm.model, lm.tokenizer, new_tokens=4)
    assert speed.engine == "transformers generate (eager) on cpu, kernels Linear4bit" and speed.decode_b1 > 0


def test_a_candidate_reports_each_phase_and_each_measuring_step(tiny_llama):
    """What a candidate's worker reports, in order, as the CLI's progress lines and the REST job show
    it: quantizing, its items as they are scored, then each step of its speed measurement by number
    (``MEASURE_STEPS``: a GPU compiles its engine in the first decode), then its end."""
    from quantselect.domain.candidates import Candidate
    from quantselect.domain.results import MEASURE_STEPS
    from quantselect.engines.worker import run_candidate

    seen: list[tuple[str, int, int]] = []
    result = run_candidate(str(tiny_llama), Candidate("int8", CATALOG["int8"]),
                           load_dataset(EXAMPLES / "piqa-300.jsonl", limit=8), report=lambda *p: seen.append(p))
    assert result.status == "succeeded", result.error
    phases = list(dict.fromkeys(phase for phase, _, _ in seen))
    assert phases == ["quantizing", "evaluating", "measuring", "succeeded"], seen
    assert [p for p in seen if p[0] == "measuring"] == [("measuring", i, len(MEASURE_STEPS)) for i in range(3)]
    assert seen[-1] == ("succeeded", 8, 8)
