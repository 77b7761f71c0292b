"""Target-GPU cost model: price table, roofline estimates labelled as such, measurements on the
target replacing them, candidates that cannot run on the target, and candidate parameters."""

from __future__ import annotations

import json

import pytest

from quantselect.domain import cost, planner
from quantselect.domain.candidates import CATALOG, BASELINE, Prequantized, parse_candidate, resolve_candidates
from quantselect.domain.results import SUCCEEDED, CandidateResult
from quantselect.domain.selection import recommend
from quantselect.errors import InputError
from tests.fixtures.common import REPO

CONFIGS = REPO / "tests" / "data" / "configs"


def shape(name: str) -> planner.Shape:
    return planner.shape_from_config(json.loads((CONFIGS / f"{name}.json").read_text()))


def test_bf16_8b_on_h100_matches_the_measured_bandwidth_bound():
    # DESIGN: an 8B bf16 model decodes ~175 tokens/s at batch 1 on an H100 (~78 % of the limit).
    h100 = cost.gpu("H100")
    sc = cost.serving_cost(CATALOG[BASELINE], shape("llama-3.1-8b"), h100, 2.5, batch=1)
    assert sc.throughput.source == "estimated" and "roofline" in sc.throughput.basis
    assert 150 < sc.throughput.tokens_per_second < 200


def test_fewer_bytes_per_weight_cost_less_when_decode_is_memory_bound():
    h100 = cost.gpu("H100-80GB")
    costs = {n: cost.serving_cost(CATALOG[n], shape("llama-3.1-8b"), h100, 2.5).usd_per_1m_tokens
             for n in ("baseline", "int8", "int4", "int4-gptq", "nf4")}
    assert costs["int4-gptq"] < costs["int4"] < costs["int8"] < costs["baseline"]
    # cost = price x GPUs / tokens per hour
    sc = cost.serving_cost(CATALOG["int8"], shape("llama-3.1-8b"), h100, 2.5)
    assert sc.usd_per_1m_tokens == pytest.approx(2.5 / (sc.throughput.tokens_per_second * 3600) * 1e6)


def test_a_70b_model_needs_several_gpus_at_bf16_and_pays_for_them():
    h100 = cost.gpu("H100")
    bf16 = cost.serving_cost(CATALOG["bf16"], shape("llama-3.1-70b"), h100, 2.5)
    int4 = cost.serving_cost(CATALOG["int4-gptq"], shape("llama-3.1-70b"), h100, 2.5)
    assert bf16.throughput.gpus == 2 and int4.throughput.gpus == 1  # 141 GB of bf16 weights
    assert "2x H100-80GB" in bf16.throughput.basis
    assert cost.serving_cost(CATALOG["bf16"], shape("llama-3.1-70b"), cost.gpu("L4"), 0.5).throughput.gpus == 8
    assert cost.serving_cost(CATALOG["baseline"], shape("llama-3.1-70b"), cost.gpu("L4"), 0.5,
                             batch=256).note == "does not fit on 8x L4 at batch 256"


def test_fp8_cannot_run_on_an_a100_and_is_not_recommended_there():
    a100 = cost.gpu("a100")
    sc = cost.serving_cost(CATALOG["fp8"], shape("mistral-7b-v0.1"), a100, 1.6)
    assert not sc.runs_on_target and "compute capability" in sc.note and sc.usd_per_1m_tokens is None
    results = [CandidateResult(BASELINE, CATALOG[BASELINE].to_dict(), SUCCEEDED, score=0.8),
               CandidateResult("fp8", CATALOG["fp8"].to_dict(), SUCCEEDED, score=0.8)]
    costs = {BASELINE: cost.serving_cost(CATALOG[BASELINE], shape("mistral-7b-v0.1"), a100, 1.6), "fp8": sc}
    rec = recommend(results, 0.98, costs, target_gpu=a100.name)
    assert rec.chosen == BASELINE and "cannot run on the target" in rec.verdict("fp8").reason
    assert rec.verdict(BASELINE).cost_source == "estimated" and rec.to_dict()["target_gpu"] == "A100-80GB"


def test_a_measurement_on_the_target_replaces_the_estimate_but_eager_and_cpu_never_do():
    h100 = cost.gpu("H100")
    base = dict(name="int8", config=CATALOG["int8"].to_dict(), status=SUCCEEDED, decode_tokens_per_second_b16=900.0)
    compiled = CandidateResult(**base, device="cuda:NVIDIA H100 80GB HBM3",
                               throughput_engine="transformers generate, static cache compiled (torch.compile) on cuda")
    m = cost.measured_on(compiled, h100)
    assert m is not None and m.source == "measured" and m.tokens_per_second == 900.0
    assert cost.serving_cost(CATALOG["int8"], shape("llama-3.1-8b"), h100, 2.5, m).throughput.source == "measured"
    assert cost.measured_on(compiled, cost.gpu("L4")) is None  # another GPU type: estimate
    eager = CandidateResult(**base, device="cuda:NVIDIA H100 80GB HBM3", throughput_engine="transformers generate (eager) on cuda")
    assert cost.measured_on(eager, h100) is None
    cpu = CandidateResult(**base, device="cpu", throughput_engine="transformers generate (eager) on cpu")
    assert cost.measured_on(cpu, h100) is None
    # A GGUF file runs in llama.cpp; what was measured here is its dense stand-in: never its cost.
    gguf = Prequantized("/m.Q4_K_M.gguf", "gguf", 4, 0, "Q4_K_M", 4.85)
    stand_in = CandidateResult(**{**base, "name": "q4km", "config": gguf.to_dict()}, device="cuda:NVIDIA H100 80GB HBM3",
                               throughput_engine=compiled.throughput_engine)
    assert cost.measured_on(stand_in, h100) is None
    est = cost.serving_cost(gguf, shape("llama-3.1-8b"), h100, 2.5, None)
    assert est.throughput.source.startswith("estimated")
    q4_0 = cost.serving_cost(Prequantized("/m.Q4_0.gguf", "gguf", 4, 0, "Q4_0", 4.5), shape("llama-3.1-8b"), h100, 2.5,
                             None)
    int4 = cost.serving_cost(CATALOG["int4"], shape("llama-3.1-8b"), h100, 2.5, None)  # 4 + 32/32 bits
    assert q4_0.weight_bytes < est.weight_bytes < int4.weight_bytes  # by the bits per weight read from each file
    assert q4_0.usd_per_1m_tokens < est.usd_per_1m_tokens < int4.usd_per_1m_tokens


def test_a_throughput_measured_over_several_gpus_is_priced_for_all_of_them():
    """A candidate too large for one GPU ran with its layers split over the placement group's GPUs:
    its tokens per second cost that many GPU-hours."""
    h100 = cost.gpu("H100")
    engine = "transformers generate, static cache compiled (torch.compile) on cuda"
    base = dict(name="bf16", config=CATALOG["bf16"].to_dict(), status=SUCCEEDED, decode_tokens_per_second_b16=900.0,
                device="cuda:NVIDIA H100 80GB HBM3", throughput_engine=engine)
    one = cost.measured_on(CandidateResult(**base, gpu_ids=["0"]), h100)
    two = cost.measured_on(CandidateResult(**base, gpu_ids=["0", "1"]), h100)
    assert one.gpus == 1 and cost.measured_on(CandidateResult(**base), h100).gpus == 1  # a local run: one device
    assert two.gpus == 2 and "layers split over 2 GPUs" in two.basis
    assert cost.cost_per_1m_tokens(2.5, two) == pytest.approx(2 * cost.cost_per_1m_tokens(2.5, one))
    sc = cost.serving_cost(CATALOG["bf16"], shape("llama-3.1-70b"), h100, 2.5, two)
    assert sc.usd_per_1m_tokens == pytest.approx(2 * 2.5 / (900.0 * 3600) * 1e6)


def test_a_ranking_across_measured_and_estimated_costs_says_so():
    """A measurement (batch 16 of short prompts) and a roofline estimate (a 1,024-token context) are not
    the same figure: a recommendation that compared both warns, one that compared one kind does not."""
    h100 = cost.gpu("H100")
    engine = "transformers generate, static cache compiled (torch.compile) on cuda"
    results = [CandidateResult(BASELINE, CATALOG[BASELINE].to_dict(), SUCCEEDED, score=0.8),
               CandidateResult("int8", CATALOG["int8"].to_dict(), SUCCEEDED, score=0.8, decode_tokens_per_second_b16=900.0,
                               device="cuda:NVIDIA H100 80GB HBM3", throughput_engine=engine),
               CandidateResult("int4", CATALOG["int4"].to_dict(), SUCCEEDED, score=0.8)]
    measured = cost.measured_on(results[1], h100)

    def costs(int8_measured):
        return {r.name: cost.serving_cost(CATALOG[r.name], shape("llama-3.1-8b"), h100, 2.5,
                                          measured if int8_measured and r.name == "int8" else None) for r in results}

    mixed = recommend(results, 0.9, costs(True), target_gpu=h100.name)
    assert mixed.verdict("int8").cost_source == "measured" and mixed.verdict("int4").cost_source == "estimated"
    assert [w for w in mixed.warnings if w.startswith("the costs compared mix measurements (int8: batch 16 of short "
                                                      "prompts) and roofline estimates (baseline, int4: ")], mixed.warnings
    assert not [w for w in recommend(results, 0.9, costs(False), target_gpu=h100.name).warnings if "mix" in w]


def test_gpu_names_and_device_strings():
    assert cost.gpu("rtx 4090").name == "RTX-4090" and cost.gpu(None).name == "H100-80GB"
    with pytest.raises(InputError, match="unknown target GPU 'B300'"):
        cost.gpu("B300")
    assert cost.gpu_of_device("cuda:NVIDIA A100-SXM4-80GB").name == "A100-80GB"
    assert cost.gpu_of_device("cuda:NVIDIA A100-SXM4-40GB") is None
    assert cost.gpu_of_device("cuda:NVIDIA L4").name == "L4"
    assert cost.gpu_of_device("cpu") is None


def test_candidate_parameters_are_validated_with_the_field_named():
    c = parse_candidate("int4-gptq:group_size=64")
    assert c.name == "int4-gptq:group_size=64" and c.config.group_size == 64 and c.config.calibrated
    assert parse_candidate("int4-gptq:group_size=128").name == "int4-gptq"  # the default, spelled out
    assert parse_candidate("int4:group_size=64").config.bytes_per_weight() == pytest.approx(0.5 + 4 / 64)
    for bad, msg in [("int4-gptq:group_size=0", "group_size 0 must be one of"),
                     ("int4-gptq:bits=5", "bits 5 must be one of 2, 3, 4, 8"),
                     ("int4-awq:bits=3", "bits 3 must be one of 4"),
                     ("int4:bits=4", "unknown parameter 'bits'"),
                     ("int8:group_size=32", "parameters of int8: kv_cache"),
                     ("nf4:double_quant=maybe", "not a valid bool"),
                     ("int4:group_size", "must be key=value"),
                     ("bf16:dtype=float32", "dtype 'float32' must be bfloat16 or float16"),  # was priced as 2 bytes
                     ("bf16:dtype=int8", "dtype 'int8' must be bfloat16 or float16")]:  # failed in the worker
        with pytest.raises(InputError, match=msg):
            parse_candidate(bad)
    # the usual spellings are torch's names (bf16 failed in the worker; a job stored with half reads back)
    assert parse_candidate("bf16:dtype=bf16").config.dtype == "bfloat16" and parse_candidate("fp16:dtype=half").config.dtype == "float16"
    names = [c.name for c in resolve_candidates(["int4", "int4:group_size=64", "int4:group_size=32"])]
    assert names == [BASELINE, "int4", "int4:group_size=64"]


# Mistral-Large-2407's shape: 123B parameters; bf16 needs ~229 GiB, more than 8 L4s hold.
MISTRAL_LARGE = {"model_type": "mistral", "hidden_size": 12288, "intermediate_size": 28672, "num_hidden_layers": 88,
                 "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32768,
                 "tie_word_embeddings": False}


def test_a_candidate_that_fits_on_no_8_target_gpus_is_not_recommended_and_the_message_says_why():
    s, l4 = planner.shape_from_config(MISTRAL_LARGE), cost.gpu("L4")
    bf16 = cost.serving_cost(CATALOG[BASELINE], s, l4, 0.5)
    int4 = cost.serving_cost(CATALOG["int4"], s, l4, 0.5)
    assert not bf16.runs_on_target and bf16.note == "does not fit on 8x L4 at batch 16" and bf16.weight_bytes
    assert int4.runs_on_target and int4.usd_per_1m_tokens is not None
    results = [CandidateResult(BASELINE, CATALOG[BASELINE].to_dict(), SUCCEEDED, score=0.8),
               CandidateResult("int4", CATALOG["int4"].to_dict(), SUCCEEDED, score=0.6)]
    rec = recommend(results, 0.98, {BASELINE: bf16, "int4": int4}, target_gpu=l4.name)
    assert rec.chosen is None
    assert "cannot run on the target: does not fit on 8x L4" in rec.verdict(BASELINE).reason
    assert rec.message == ("no candidate that can run on L4 meets the threshold 0.980 under the point policy; "
                           "those that meet it cannot run there (baseline: does not fit on 8x L4 at batch 16)")
    alone = recommend(results[:1], 0.98, {BASELINE: bf16}, target_gpu=l4.name)
    assert alone.chosen is None
    assert alone.message == "no candidate can run on L4: baseline: does not fit on 8x L4 at batch 16"


def test_a_decode_step_reads_the_output_head_but_not_the_input_embedding_table():
    """A step gathers a few rows of an untied input embedding: tied or not, the bytes read per step
    are the same (the output head's table), while the untied model needs more memory."""
    from dataclasses import replace

    h100, untied = cost.gpu("H100"), shape("llama-3.1-8b")
    tied = replace(untied, tied=True)
    a = cost.serving_cost(CATALOG[BASELINE], untied, h100, 2.5, batch=1)
    b = cost.serving_cost(CATALOG[BASELINE], tied, h100, 2.5, batch=1)
    assert a.weight_bytes - b.weight_bytes == untied.vocab * untied.hidden * 2
    assert a.throughput.tokens_per_second == pytest.approx(b.throughput.tokens_per_second)
    step = (a.weight_bytes - untied.vocab * untied.hidden * 2
            + cost.SERVING_CONTEXT * 2 * untied.layers * untied.kv_heads * untied.head_dim * 2)
    assert a.throughput.tokens_per_second == pytest.approx(3.35e12 * cost.BANDWIDTH_EFFICIENCY / step)


@pytest.mark.parametrize("device, name", [
    ("cuda:NVIDIA H100 80GB HBM3", "H100-80GB"), ("cuda:NVIDIA A100 80GB PCIe", "A100-80GB"),
    ("cuda:NVIDIA A100-SXM4-80GB", "A100-80GB"), ("cuda:NVIDIA L40S", "L40S"), ("cuda:NVIDIA L4", "L4"),
    ("cuda:NVIDIA A10G", "A10G"), ("cuda:NVIDIA GeForce RTX 4090", "RTX-4090"),
    ("cuda:NVIDIA L40", None), ("cuda:NVIDIA A10", None), ("cuda:NVIDIA RTX A6000", None),
    ("cuda:NVIDIA H100 PCIe", None), ("cuda:NVIDIA A100-SXM4-40GB", None),
])
def test_device_names_match_the_table_by_whole_words(device, name):
    spec = cost.gpu_of_device(device)
    assert (spec.name if spec else None) == name


def test_rtx_4090_int8_peak_is_the_dense_tensor_figure():
    # Ada whitepaper, GeForce RTX 4090: 660.6 dense INT8 TOPS (1321.2 with sparsity); bf16 165.2, fp8 330.3
    # (FP32 accumulate, half rate on GeForce)
    spec = cost.gpu("4090")
    assert (spec.bf16_tflops, spec.int8_tops, spec.fp8_tflops) == (165, 660, 330)


def test_a_mixture_of_experts_reads_the_experts_its_batch_routes_to_and_computes_the_top_k():
    """Mixtral-8x7B: 46.7B weights in memory (two H100s in bf16); a batch-1 decode step reads 2 of the
    8 experts of each layer and computes with 12.9B parameters; at batch 16 it reads all of them."""
    from tests.test_planner import MIXTRAL_8X7B

    s, h100 = planner.shape_from_config(MIXTRAL_8X7B), cost.gpu("H100")
    expert = 3 * s.hidden * s.expert_intermediate
    one = cost.serving_cost(CATALOG[BASELINE], s, h100, 2.5, batch=1)
    assert one.throughput.gpus == 2 and one.weight_bytes == pytest.approx(2 * s.params)
    step = one.weight_bytes - s.vocab * s.hidden * 2 - 6 * 32 * expert * 2 + cost.SERVING_CONTEXT * 32 * 8 * 128 * 2 * 2
    assert one.throughput.tokens_per_second == pytest.approx(2 * 3.35e12 * cost.BANDWIDTH_EFFICIENCY / step)
    sixteen = cost.serving_cost(CATALOG[BASELINE], s, h100, 2.5)
    step16 = sixteen.weight_bytes - s.vocab * s.hidden * 2 + 16 * cost.SERVING_CONTEXT * 32 * 8 * 128 * 2 * 2
    assert sixteen.throughput.tokens_per_second == pytest.approx(16 * 2 * 3.35e12 * cost.BANDWIDTH_EFFICIENCY / step16)
    assert s.active_params == pytest.approx(12.9e9, rel=0.02)


def test_the_cost_kv_cache_of_sliding_window_layers_is_their_window():
    """At a 4,096-token serving context, Gemma-3-27B's 52 sliding layers hold 1,024 tokens each."""
    from tests.test_planner import GEMMA3_27B

    s, h100 = planner.shape_from_config(GEMMA3_27B), cost.gpu("H100")
    sc = cost.serving_cost(CATALOG[BASELINE], s, h100, 2.5, batch=1, context=4096)
    kv = (10 * 4096 + 52 * 1024) * 2 * 16 * 128 * 2  # bytes of one sequence's cache
    attention = 4.0 * 32 * 128 * (10 * 4096 + 52 * 1024)
    t_mem = (sc.weight_bytes + kv) / (3.35e12 * cost.BANDWIDTH_EFFICIENCY)  # tied: the whole table is the head
    t_flops = (2.0 * (s.linear_params + s.vocab * s.hidden) + attention) / (989e12 * cost.COMPUTE_EFFICIENCY)
    assert sc.throughput.tokens_per_second == pytest.approx(1 / max(t_mem, t_flops))
