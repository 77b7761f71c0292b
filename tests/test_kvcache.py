"""``NAME:kv_cache=fp8``: a candidate evaluated with its keys and values rounded as vLLM's fp8 KV
cache stores them, costed with that cache, and sharing its quantized weights with its 16-bit-cache
twin. On the real SmolLM2, the tiny families and a real job."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from quantselect.cli import cli
from quantselect.domain import cost
from quantselect.domain.candidates import CATALOG, BASELINE, parse_candidate, resolve_candidates
from quantselect.domain.dataset import Item
from quantselect.domain.results import SUCCEEDED, CandidateResult
from quantselect.engines import evaluate as ev
from quantselect.engines import kvcache
from quantselect.engines.quantize import load_candidate
from quantselect.errors import InputError
from tests.fixtures.common import EXAMPLES
from tests.test_cost import shape
from tests.test_evaluate_mc import alone


def test_kv_cache_is_a_parameter_of_every_candidate_that_leaves_the_others_keys_alone():
    c = parse_candidate("int4-gptq:kv_cache=fp8")
    assert c.name == "int4-gptq:kv_cache=fp8" and c.config.kv_cache == "fp8" and c.config.kv_bytes() == 1
    assert c.config.weights_only() == CATALOG["int4-gptq"]  # the same quantized weights
    assert c.config.to_dict()["_data"] == {"kv_cache": "fp8", "bits": 4, "group_size": 128}
    # Configs without it serialize as they always have: stored results and artifacts keep their keys.
    assert CATALOG["int8"].to_dict() == {"_type": "int8_weight_only", "_version": 1, "_data": {}}
    assert CATALOG["int4-gptq"].parameters() == {"bits": 4, "group_size": 128}
    names = [x.name for x in resolve_candidates(["int8", "int8:kv_cache=fp8", "baseline:kv_cache=fp8"])]
    assert names == [BASELINE, "int8", "int8:kv_cache=fp8", "baseline:kv_cache=fp8"]
    with pytest.raises(InputError, match=r"candidate 'int8:kv_cache=int4': kv_cache 'int4' must be fp8"):
        parse_candidate("int8:kv_cache=int4")


def test_an_fp8_kv_cache_halves_the_caches_bytes_in_the_cost_and_is_never_costed_from_its_emulation():
    h100, llama = cost.gpu("H100"), shape("llama-3.1-8b")
    int4 = cost.serving_cost(CATALOG["int4-gptq"], llama, h100, 2.5, context=32768)
    kv8 = cost.serving_cost(parse_candidate("int4-gptq:kv_cache=fp8").config, llama, h100, 2.5, context=32768)
    assert kv8.weight_bytes == int4.weight_bytes
    assert kv8.usd_per_1m_tokens < 0.7 * int4.usd_per_1m_tokens  # at 32k tokens the cache dominates the reads
    big = cost.serving_cost(CATALOG["int4-gptq"], shape("llama-3.1-70b"), h100, 2.5, context=32768)
    big8 = cost.serving_cost(parse_candidate("int4-gptq:kv_cache=fp8").config, shape("llama-3.1-70b"), h100, 2.5,
                             context=32768)
    assert (big.throughput.gpus, big8.throughput.gpus) == (4, 2)  # 16 x 32k tokens: 172 GB of cache, or 86
    measured = CandidateResult("int8:kv_cache=fp8", parse_candidate("int8:kv_cache=fp8").config.to_dict(), SUCCEEDED,
                               decode_tokens_per_second_b16=900.0, device="cuda:NVIDIA H100 80GB HBM3",
                               throughput_engine="transformers generate, static cache compiled (torch.compile) on cuda")
    assert cost.measured_on(measured, h100) is None
    measured.config = CATALOG["int8"].to_dict()
    assert cost.measured_on(measured, h100) is not None


def test_the_rounding_is_fp8_e4m3_saturating_and_idempotent():
    import torch

    x = torch.tensor([0.0, 1e-4, 0.0173, -0.3, 1.0, 3.14159, -447.0, 500.0, -1e6, 2.0**-9])
    r = kvcache._round_fp8(x)
    assert torch.equal(r[:7], x[:7].to(torch.float8_e4m3fn).float())
    assert r[7] == 448.0 and r[8] == -448.0  # saturated, not NaN
    assert torch.equal(kvcache._round_fp8(r), r)
    assert r[3] != x[3] and r[4] == 1.0  # 3 mantissa bits


def test_the_attention_of_every_family_reads_rounded_keys_and_values(tiny_models, demo_model_dir):
    """The candidate's logits move off its 16-bit-cache twin's; scoring through the packed, unpadded
    path rounds exactly as a plain forward pass does; generation runs with the cache."""
    import torch

    items = [Item("Question: which is heavier?\nAnswer:", ("a brick of lead", "a brick of foam", "a feather"), 0),
             Item("Pick one:", ("yes", "no"), 1)]
    x = torch.arange(1, 33).unsqueeze(0)
    for family, path in {**tiny_models, "smollm2": demo_model_dir}.items():
        plain = load_candidate(str(path), CATALOG["bf16"], "cpu")
        fp8 = load_candidate(str(path), parse_candidate("bf16:kv_cache=fp8").config, "cpu")
        assert fp8.model.config._attn_implementation == "quantselect_kv_fp8_sdpa"
        assert ev._unpadded_supported(fp8.model), family
        with torch.inference_mode():
            a, b = plain.model(x).logits.float(), fp8.model(x).logits.float()
            out = fp8.model.generate(x[:, :8], max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 12)
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        assert 0.8 < cos < 0.99999 and not torch.equal(a, b), (family, cos)
        scored, twin = (ev.score_multiple_choice(m.model, m.tokenizer, items) for m in (fp8, plain))
        packed_gap = rounding_gap = 0.0
        for item, s, t in zip(items, scored, twin):
            for j, choice in enumerate(item.choices):
                c, k = ev._encode_pair(fp8.tokenizer, item.prompt, " " + choice)
                packed_gap = max(packed_gap, abs(s.choice_logprobs[j] - alone(fp8.model, fp8.tokenizer, c, k)))
                rounding_gap = max(rounding_gap, abs(s.choice_logprobs[j] - t.choice_logprobs[j]))
        # Rounding flips where tiny float differences cross a step, so the paths agree closely, not exactly.
        assert packed_gap < 0.25 * rounding_gap, (family, packed_gap, rounding_gap)


def test_a_job_scores_both_caches_on_one_quantized_model_and_exports_the_serving_line(ray_cluster, tiny_llama, tmp_path):
    res = CliRunner().invoke(cli, ["submit", str(tiny_llama), str(EXAMPLES / "piqa-300.jsonl"), "--limit", "16",
                                   "--candidates", "int8,int8:kv_cache=fp8", "--threshold", "0.5"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    job_id = res.output.split()[1].rstrip(":")
    rows = {r["name"]: r for r in json.loads(CliRunner().invoke(cli, ["results", job_id, "--format", "json"]).output)}
    int8, fp8 = rows["int8"], rows["int8:kv_cache=fp8"]
    assert int8["status"] == fp8["status"] == SUCCEEDED
    assert int8["artifact_path"] == fp8["artifact_path"] is not None  # quantized once
    assert "fp8 KV cache emulated in 16 bits" in fp8["throughput_engine"]
    assert "emulated" not in int8["throughput_engine"]
    assert fp8["cost_per_1m_tokens_usd"] < int8["cost_per_1m_tokens_usd"]
    res = CliRunner().invoke(cli, ["export", job_id, str(tmp_path / "out"), "--candidate", "int8:kv_cache=fp8"])
    assert res.exit_code == 0, res.output
    assert "--kv-cache-dtype fp8" in (tmp_path / "out" / "README.md").read_text()

