"""`quantselect plan`: memory per precision and GPUs needed, from real config.json files of
Llama-3.1-8B/70B, Mistral-7B and Qwen2.5-72B (no weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantselect.cli import cli
from quantselect.domain.planner import GIB, PRECISIONS, parse_memory, plan, shape_from_config
from quantselect.errors import InputError

CONFIGS = Path(__file__).parent / "data" / "configs"


def shape(name):
    return shape_from_config(json.loads((CONFIGS / f"{name}.json").read_text()))


@pytest.mark.parametrize("name, published", [("llama-3.1-8b", 8.03e9), ("llama-3.1-70b", 70.55e9),
                                             ("mistral-7b-v0.1", 7.24e9), ("qwen2.5-72b", 72.71e9)])
def test_parameter_counts_match_the_published_sizes(name, published):
    assert shape(name).params == pytest.approx(published, rel=0.005)


def test_70b_needs_two_h100s_in_bf16_and_one_in_4_bit():
    rows = {r.precision: r for r in plan(shape("llama-3.1-70b"), 79.6 * GIB, context=8192, batch=1)}
    assert rows["bf16"].gpus == 2 and not rows["bf16"].fits_one_gpu
    assert rows["int4"].gpus == 1 and rows["nf4"].gpus == 1
    # Weight bytes shrink with the precision, overhead included.
    sizes = [rows[p].weight_bytes for p in ("bf16", "int8", "int4")]
    assert sizes == sorted(sizes, reverse=True)
    assert rows["int4"].weight_bytes > 70.55e9 * 0.5  # scales, zero points and 16-bit embeddings on top
    # KV cache: 2 x 80 layers x 8 KV heads x 128 x 8192 tokens x 2 bytes.
    assert rows["bf16"].kv_cache_bytes == 2 * 80 * 8 * 128 * 8192 * 2


def test_long_context_and_batch_grow_the_kv_cache_until_more_gpus_are_needed():
    s = shape("qwen2.5-72b")
    small = {r.precision: r for r in plan(s, 79.6 * GIB, context=4096, batch=1)}
    big = {r.precision: r for r in plan(s, 79.6 * GIB, context=32768, batch=16)}
    assert big["int4"].kv_cache_bytes == 128 * small["int4"].kv_cache_bytes
    assert small["int4"].gpus == 1 and big["int4"].gpus > 1


def test_an_fp8_kv_cache_halves_it_and_can_halve_the_gpus():
    """Llama-3.1-70B at 128k tokens x 4: 80 layers x 8 KV heads x 128 x 2 (K and V) per token."""
    s = shape("llama-3.1-70b")
    bf16 = {r.precision: r for r in plan(s, 79.6 * GIB, context=131072, batch=4)}
    fp8 = {r.precision: r for r in plan(s, 79.6 * GIB, context=131072, batch=4, kv_cache="fp8")}
    assert bf16["int4"].kv_cache_bytes == 80 * 8 * 128 * 2 * 2 * 131072 * 4 == 160 * GIB
    assert fp8["int4"].kv_cache_bytes == 80 * GIB and fp8["int4"].weight_bytes == bf16["int4"].weight_bytes
    assert (bf16["int4"].gpus, fp8["int4"].gpus) == (4, 2)
    out = json.loads(CliRunner().invoke(cli, ["plan", str(CONFIGS / "llama-3.1-70b.json"), "--context", "131072",
                                              "--batch", "4", "--kv-cache", "fp8", "--format", "json"]).output)
    assert out["kv_cache"] == "fp8" and out["precisions"][0]["kv_cache_bytes"] == 80 * GIB
    with pytest.raises(InputError, match="KV cache dtype 'int2' must be one of"):
        plan(s, 79.6 * GIB, context=8, batch=1, kv_cache="int2")


def test_cli_table_and_json(tmp_path):
    model = tmp_path / "mistral"
    model.mkdir()
    (model / "config.json").write_text((CONFIGS / "mistral-7b-v0.1.json").read_text())
    res = CliRunner().invoke(cli, ["plan", str(model), "--gpu", "L4"])
    assert res.exit_code == 0, res.output
    assert "7.24 B parameters" in res.output and "fits on 1" in res.output
    out = json.loads(CliRunner().invoke(cli, ["plan", str(CONFIGS / "llama-3.1-70b.json"), "--gpu-memory", "24GiB",
                                              "--format", "json"]).output)
    assert [r["precision"] for r in out["precisions"]] == list(PRECISIONS)
    assert {r["precision"]: r["gpus"] for r in out["precisions"]}["bf16"] == 8
    small = CliRunner().invoke(cli, ["plan", str(CONFIGS / "llama-3.1-70b.json"), "--gpu-memory", "16GiB"]).output
    assert "does not fit on 8" in small  # bf16 on 8 x 16 GiB
    long = CliRunner().invoke(cli, ["plan", str(CONFIGS / "llama-3.1-8b.json"), "--context", "262144"])
    assert long.exit_code == 0 and long.output.splitlines()[-1].startswith(
        "note: context 262,144 is beyond the model's max_position_embeddings (131,072)"), long.output
    assert not [line for line in small.splitlines() if line.startswith("note:")]


@pytest.mark.parametrize("args, message", [
    (["/no/such/model"], "no config.json there"),
    ([str(CONFIGS / "llama-3.1-8b.json"), "--gpu", "B200"], "unknown target GPU 'B200'"),
    ([str(CONFIGS / "llama-3.1-8b.json"), "--gpu-memory", "lots"], "expected a size"),
    ([str(CONFIGS / "llama-3.1-8b.json"), "--gpu", "L4", "--gpu-memory", "24GiB"], "not both"),
    ([str(CONFIGS / "llama-3.1-8b.json"), "--context", "100000000"], "more than the planner takes"),
])
def test_bad_input_is_one_line_exit_2(args, message):
    res = CliRunner().invoke(cli, ["plan", *args])
    assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_config_without_the_needed_fields_names_the_field():
    with pytest.raises(InputError, match="'num_attention_heads'"):
        shape_from_config({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 10})
    assert parse_memory("80GB") == 80e9 and parse_memory("24") == 24 * GIB


def test_a_gguf_file_is_planned_and_checked_from_its_header(demo_model_dir, demo_q4_0_gguf, tmp_path):
    """No conversion needed: the GGUF header gives the shape transformers' own conversion of the file
    gives (the bundled SmolLM2: 30 layers, hidden 576, 9/3 heads, tied embeddings), so `plan`
    reads a .gguf file (with a row for the file as it is), and a group size that does not divide
    its widths is refused at submit."""
    from quantselect.engines.models import model_config_here
    from quantselect.service import Service, SubmitRequest

    converted = shape_from_config(json.loads((demo_model_dir / "config.json").read_text()))
    cfg, where = model_config_here(str(demo_q4_0_gguf))
    assert shape_from_config(cfg, where) == converted and cfg["model_type"] == "llama"
    by_header = json.loads(CliRunner().invoke(cli, ["plan", str(demo_q4_0_gguf), "--format", "json"]).output)
    by_config = json.loads(CliRunner().invoke(cli, ["plan", str(demo_model_dir), "--format", "json"]).output)
    assert by_header["precisions"][:-1] == by_config["precisions"] and by_header["params"] == converted.params
    mine = by_header["precisions"][-1]  # the file itself: its tensors' bytes, exactly
    assert mine["precision"] == "Q4_0 (this file)" and "4.5 bits per weight" in mine["description"]
    from gguf import GGUFReader

    assert mine["weight_bytes"] == sum(int(t.n_bytes) for t in GGUFReader(str(demo_q4_0_gguf)).tensors)
    assert 0.95 * demo_q4_0_gguf.stat().st_size < mine["weight_bytes"] < demo_q4_0_gguf.stat().st_size  # the rest: header
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really")
    res = CliRunner().invoke(cli, ["plan", str(bad)])
    assert res.exit_code == 2 and "broken.gguf: not a readable GGUF file" in res.output
    items = [{"prompt": f"q{i}", "reference": "a"} for i in range(40)]
    with pytest.raises(InputError, match="group size 128 does not divide the model's hidden size 576"):
        Service().build_spec(SubmitRequest(model=str(demo_q4_0_gguf), items=items, candidates=["int4-gptq"]))


# google/gemma-2-9b's config.json: it omits tie_word_embeddings, which Gemma ties by default.
GEMMA2_9B = {"architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "head_dim": 256,
             "hidden_act": "gelu_pytorch_tanh", "hidden_size": 3584, "intermediate_size": 14336,
             "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 16,
             "num_hidden_layers": 42, "num_key_value_heads": 8, "query_pre_attn_scalar": 256,
             "sliding_window": 4096, "vocab_size": 256000}


def test_tied_embeddings_default_by_model_type_and_come_from_the_wrapper_config():
    gemma = shape_from_config(GEMMA2_9B)
    assert gemma.tied and gemma.params == pytest.approx(9.24e9, rel=0.005)  # published: 9.24B
    assert not shape_from_config({**GEMMA2_9B, "tie_word_embeddings": False}).tied  # an explicit value wins
    assert not shape_from_config({**GEMMA2_9B, "model_type": "llama"}).tied  # Llama, Mistral, Qwen: untied
    # A multimodal wrapper: the outer config holds the flag (the top-level model owns the output head).
    text = {**GEMMA2_9B, "model_type": "gemma3_text"}
    assert shape_from_config({"model_type": "gemma3", "text_config": text}).tied
    llama = {**GEMMA2_9B, "model_type": "llama"}
    assert shape_from_config({"model_type": "llava", "tie_word_embeddings": True, "text_config": llama}).tied
    assert not shape_from_config({"model_type": "gemma3", "tie_word_embeddings": False, "text_config": text}).tied
    assert shape_from_config({"model_type": "llava", "text_config": {**llama, "tie_word_embeddings": True}}).tied


# Published config.json files (the fields the planner reads; the rest left out).
MIXTRAL_8X7B = {"architectures": ["MixtralForCausalLM"], "hidden_act": "silu", "hidden_size": 4096,
                "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
                "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8,
                "num_local_experts": 8, "sliding_window": None, "tie_word_embeddings": False, "vocab_size": 32000}
QWEN3_30B_A3B = {"architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "decoder_sparse_step": 1,
                 "head_dim": 128, "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960,
                 "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
                 "moe_intermediate_size": 768, "num_attention_heads": 32, "num_experts": 128,
                 "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "sliding_window": None,
                 "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936}
QWEN15_MOE_A27B = {"architectures": ["Qwen2MoeForCausalLM"], "decoder_sparse_step": 1, "hidden_size": 2048,
                   "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21,
                   "model_type": "qwen2_moe", "moe_intermediate_size": 1408, "num_attention_heads": 16,
                   "num_experts": 60, "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 16,
                   "shared_expert_intermediate_size": 5632, "sliding_window": 32768, "tie_word_embeddings": False,
                   "use_sliding_window": False, "vocab_size": 151936}
# DeepSeek-V2-Lite: one dense layer, then 64 routed + 2 shared experts; Multi-head Latent Attention
# without a query compression (q_lora_rank null: one q_proj).
DEEPSEEK_V2_LITE = {"architectures": ["DeepseekV2ForCausalLM"], "first_k_dense_replace": 1, "hidden_size": 2048,
                    "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
                    "model_type": "deepseek_v2", "moe_intermediate_size": 1408, "moe_layer_freq": 1,
                    "n_routed_experts": 64, "n_shared_experts": 2, "num_attention_heads": 16,
                    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
                    "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                    "tie_word_embeddings": False, "v_head_dim": 128, "vocab_size": 102400}


@pytest.mark.parametrize("cfg, published, active", [(MIXTRAL_8X7B, 46.7e9, 12.9e9), (QWEN3_30B_A3B, 30.5e9, 3.3e9),
                                                    (QWEN15_MOE_A27B, 14.3e9, 2.7e9), (DEEPSEEK_V2_LITE, 15.7e9, None)])
def test_a_mixture_of_experts_counts_every_expert_in_memory_and_the_top_k_as_active(cfg, published, active):
    s = shape_from_config(cfg)
    assert s.params == pytest.approx(published, rel=0.02)
    if active:  # (DeepSeek's published 2.4B active leaves out the input embedding)
        assert s.active_params == pytest.approx(active, rel=0.05)


def test_mixtral_needs_two_h100s_in_bf16_and_a_whole_gpu_per_candidate():
    from quantselect.domain.candidates import CATALOG, BASELINE
    from quantselect.domain.planner import candidate_need, gpu_request

    rows = {r.precision: r for r in plan(shape_from_config(MIXTRAL_8X7B), 79.6 * GIB, context=8192, batch=1)}
    assert rows["bf16"].weight_bytes > 86 * GIB and rows["bf16"].gpus == 2 and rows["int4"].gpus == 1
    need = candidate_need(shape_from_config(MIXTRAL_8X7B), CATALOG[BASELINE])
    assert gpu_request(need, 79.6 * GIB, 8).gpus == 2.0  # was a quarter of one H100: out of memory


def test_a_group_size_must_divide_the_experts_width():
    from quantselect.domain.candidates import parse_candidate
    from quantselect.domain.planner import check_candidate

    c = parse_candidate("int4-gptq:group_size=256")
    with pytest.raises(InputError, match="does not divide the model's expert intermediate size 1408 "
                                         r"\(group_size=128 fits\)"):
        check_candidate(c.name, c.config, shape_from_config(QWEN15_MOE_A27B), "qwen2_moe")
    check_candidate(c.name, c.config, shape_from_config(QWEN3_30B_A3B), "qwen3_moe")  # experts of 768 = 3 x 256


# google/gemma-3-27b-it and gemma-3-4b-it: the language model's config inside a multimodal wrapper
# leaves out what Gemma3TextConfig defaults (the 4B gives no heads, head dim or vocabulary at all).
GEMMA3_27B = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": {"head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504,
                              "model_type": "gemma3_text", "num_attention_heads": 32, "num_hidden_layers": 62,
                              "num_key_value_heads": 16, "query_pre_attn_scalar": 168,
                              "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}}
GEMMA3_4B = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
             "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                             "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                             "sliding_window": 1024}}


def test_sliding_window_layers_hold_only_their_window_of_kv_cache():
    """Gemma-3: 5 of 6 layers attend to the last 1,024 tokens; Gemma-2: every other layer to 4,096;
    Mistral-7B-v0.1: every layer to 4,096; Qwen2.5 turns its window off (use_sliding_window false)."""
    per_token_layer = 2 * 16 * 128 * 2  # K and V, 16 KV heads x 128, 16-bit
    g3 = plan(shape_from_config(GEMMA3_27B), 79.6 * GIB, context=131072, batch=1)[0]
    assert g3.kv_cache_bytes == (10 * 131072 + 52 * 1024) * per_token_layer  # 10 global layers of 62
    assert g3.kv_cache_bytes / GIB == pytest.approx(10.4, abs=0.05)
    g2 = plan(shape_from_config(GEMMA2_9B), 79.6 * GIB, context=8192, batch=2)[0]
    assert g2.kv_cache_bytes == 2 * 8 * 256 * 2 * (21 * 8192 + 21 * 4096) * 2
    mistral = plan(shape("mistral-7b-v0.1"), 79.6 * GIB, context=32768, batch=1)[0]
    assert mistral.kv_cache_bytes == 2 * 32 * 8 * 128 * 4096 * 2
    qwen = plan(shape("qwen2.5-72b"), 79.6 * GIB, context=32768, batch=1)[0]
    assert qwen.kv_cache_bytes == 2 * 80 * 8 * 128 * 32768 * 2
    explicit = {**GEMMA2_9B, "layer_types": ["full_attention"] * 40 + ["sliding_attention"] * 2}
    assert plan(shape_from_config(explicit), 79.6 * GIB, context=8192, batch=1)[0].kv_cache_bytes == \
        2 * 8 * 256 * 2 * (40 * 8192 + 2 * 4096)


@pytest.mark.parametrize("cfg, published", [
    (GEMMA3_4B, 3.88e9),  # the language model of the 4.3B (its vision tower is ~0.42B)
    (GEMMA3_27B, 27.0e9),
    ({"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_inner": None, "n_layer": 12, "n_positions": 1024,
      "vocab_size": 50257}, 124.4e6),
    ({"model_type": "opt", "hidden_size": 768, "ffn_dim": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
      "vocab_size": 50272, "max_position_embeddings": 2048, "word_embed_proj_dim": 768}, 125.2e6),
    # bigcode/starcoder: multi-query attention (one KV head), a non-gated MLP, tied embeddings
    ({"model_type": "gpt_bigcode", "multi_query": True, "n_embd": 6144, "n_head": 48, "n_inner": 24576,
      "n_layer": 40, "n_positions": 8192, "vocab_size": 49152}, 15.5e9),
    ({"model_type": "starcoder2", "hidden_act": "gelu_pytorch_tanh", "hidden_size": 3072, "intermediate_size": 12288,
      "num_hidden_layers": 30, "num_attention_heads": 24, "num_key_value_heads": 2, "vocab_size": 49152,
      "use_bias": True, "sliding_window": 4096}, 3.03e9),
    ({"model_type": "phi", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 32,
      "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 51200, "tie_word_embeddings": False}, 2.78e9),
    ({"model_type": "gpt_neox", "hidden_size": 6144, "intermediate_size": 24576, "num_hidden_layers": 44,
      "num_attention_heads": 64, "vocab_size": 50432, "tie_word_embeddings": False}, 20.55e9),
])
def test_fields_a_family_leaves_to_its_defaults_and_non_gated_mlps(cfg, published):
    assert shape_from_config(cfg).params == pytest.approx(published, rel=0.02)


def test_gemma3_text_defaults_and_multi_query_kv_heads():
    s = shape_from_config(GEMMA3_4B)
    assert (s.heads, s.kv_heads, s.head_dim, s.vocab, s.tied) == (8, 4, 256, 262208, True)
    starcoder = shape_from_config({"model_type": "gpt_bigcode", "multi_query": True, "n_embd": 6144, "n_head": 48,
                                   "n_layer": 40, "vocab_size": 49152})
    assert starcoder.kv_heads == 1 and starcoder.intermediate == 4 * 6144  # n_inner omitted: 4 x hidden
    with pytest.raises(InputError, match="'intermediate_size'"):  # no family default to fall back on
        shape_from_config({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 10})


# deepseek-ai/DeepSeek-V3 and moonshotai/Kimi-K2-Instruct (the DeepseekV3 architecture): Multi-head Latent
# Attention (kv_lora_rank, qk_rope_head_dim), 256 / 384 routed experts and one shared, dense first layers.
DEEPSEEK_V3 = {"architectures": ["DeepseekV3ForCausalLM"], "first_k_dense_replace": 3, "hidden_size": 7168,
               "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
               "model_type": "deepseek_v3", "moe_intermediate_size": 2048, "moe_layer_freq": 1,
               "n_routed_experts": 256, "n_shared_experts": 1, "num_attention_heads": 128, "num_experts_per_tok": 8,
               "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
               "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "tie_word_embeddings": False,
               "v_head_dim": 128, "vocab_size": 129280}
KIMI_K2 = {**DEEPSEEK_V3, "first_k_dense_replace": 1, "max_position_embeddings": 131072, "model_type": "kimi_k2",
           "n_routed_experts": 384, "num_attention_heads": 64, "num_key_value_heads": 64,
           "num_nextn_predict_layers": 0, "vocab_size": 163840}


def test_multi_head_latent_attention_caches_its_latent_and_counts_its_low_rank_projections():
    """The cache holds, per token and layer, the kv_lora_rank latent and the rope key all heads share
    (512 + 64 values), as vLLM and SGLang store it, not K and V of 128 heads; the weights are
    q_a_proj/q_b_proj (one q_proj without q_lora_rank), kv_a_proj_with_mqa, kv_b_proj and o_proj."""
    v3 = shape_from_config(DEEPSEEK_V3)
    # 671B: the model transformers and vLLM load; the Hub's 685B adds the 14B multi-token-prediction
    # module (num_nextn_predict_layers), which they skip unless asked to speculate with it
    assert v3.params == pytest.approx(671e9, rel=0.002)
    assert v3.active_params == pytest.approx(37.5e9, rel=0.01)  # published: 37B activated
    kimi = shape_from_config(KIMI_K2)
    assert kimi.params == pytest.approx(1.03e12, rel=0.01) and kimi.active_params == pytest.approx(32.9e9, rel=0.01)
    assert v3.linear_params - v3.active_linear_params == 58 * 248 * 3 * 7168 * 2048  # routed experts not taken
    row = plan(v3, 79.6 * GIB, context=131072, batch=1)[0]
    assert row.kv_cache_bytes == 61 * (512 + 64) * 131072 * 2  # 8.6 GiB, not 2 x 128 heads x 56 per layer
    lite = plan(shape_from_config(DEEPSEEK_V2_LITE), 79.6 * GIB, context=32768, batch=1)[0]
    assert lite.kv_cache_bytes == 27 * 576 * 32768 * 2  # 7x less than 16 heads of K and V of 128
    # Tensor parallelism splits the heads, not the one latent: every GPU holds all of the cache. In
    # int4, 1/8 of the weights (42 GiB) leaves room for 3 sequences of 128k tokens, not 4.
    three, four = (plan(v3, 79.6 * GIB, context=131072, batch=b)[3] for b in (3, 4))
    assert three.precision == "int4" and (three.gpus, four.gpus) == (8, None)
    assert (four.weight_bytes + four.kv_cache_bytes) / 8 < 79.6 * GIB * 0.9 - GIB  # it would, split 8 ways


# meta-llama/Llama-4-Scout-17B-16E and Llama-4-Maverick-17B-128E: multimodal wrappers whose language model
# uses chunked local attention on 3 layers of 4 (no_rope_layers 1), with one shared expert beside the
# routed ones; intermediate_size is an expert's width, intermediate_size_mlp a dense layer's.
LLAMA4_SCOUT = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "tie_word_embeddings": False,
                "text_config": {"attention_bias": False, "attention_chunk_size": 8192, "head_dim": 128,
                                "hidden_size": 5120, "interleave_moe_layer_step": 1, "intermediate_size": 8192,
                                "intermediate_size_mlp": 16384, "max_position_embeddings": 262144,
                                "model_type": "llama4_text", "moe_layers": list(range(48)),
                                "no_rope_layers": [1, 1, 1, 0] * 12, "num_attention_heads": 40,
                                "num_experts_per_tok": 1, "num_hidden_layers": 48, "num_key_value_heads": 8,
                                "num_local_experts": 16, "use_qk_norm": True, "vocab_size": 202048}}
LLAMA4_MAVERICK = {**LLAMA4_SCOUT, "text_config": {
    **LLAMA4_SCOUT["text_config"], "interleave_moe_layer_step": 2, "max_position_embeddings": 1048576,
    "moe_layers": list(range(1, 48, 2)), "num_local_experts": 128, "use_qk_norm": False}}


def test_llama4_chunked_attention_layers_keep_one_chunk_and_its_experts_include_a_shared_one():
    scout, maverick = shape_from_config(LLAMA4_SCOUT), shape_from_config(LLAMA4_MAVERICK)
    # The language models; their 0.87B vision encoder makes Scout's published 109B (108.6B on the Hub)
    assert scout.params == pytest.approx(107.77e9, rel=0.001) and maverick.params == pytest.approx(400.7e9, rel=0.002)
    assert scout.active_params == pytest.approx(17.2e9, rel=0.01)  # published: 17B active
    assert maverick.active_params == pytest.approx(17.2e9, rel=0.01)  # half its layers dense, twice as wide
    per_token_layer = 2 * 8 * 128 * 2
    long = plan(scout, 79.6 * GIB, context=131072, batch=1)[0]
    assert long.kv_cache_bytes == (12 * 131072 + 36 * 8192) * per_token_layer  # 12 global layers of 48
    assert plan(scout, 79.6 * GIB, context=4096, batch=1)[0].kv_cache_bytes == 48 * 4096 * per_token_layer
    # No chunk size: every layer global; no no_rope_layers: Llama4TextConfig's default, a global one in 4.
    unchunked = {**LLAMA4_SCOUT, "text_config": {**LLAMA4_SCOUT["text_config"], "attention_chunk_size": None}}
    assert plan(shape_from_config(unchunked), 79.6 * GIB, context=131072, batch=1)[0].kv_cache_bytes == \
        48 * 131072 * per_token_layer
    default = {**LLAMA4_SCOUT, "text_config": {**LLAMA4_SCOUT["text_config"], "no_rope_layers": []}}
    assert shape_from_config(default) == scout


def _gguf(path: Path, arch: str, kv: dict[str, object], tensors: tuple[str, ...]) -> Path:
    """A GGUF file of llama.cpp's metadata keys for ``arch`` and a tiny tensor of each name (the reader
    looks for output.weight, an untied head, and blk.0.attn_q.bias, attention biases)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        add = getattr(writer, f"add_{key}")
        add(value)
    for name in ("token_embd.weight", *tensors):
        writer.add_tensor(name, np.zeros((1, 8), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return path


# openai/gpt-oss-20b: sliding layers alternate with full ones, attention biases, 32 experts of 2,880
GPT_OSS_20B = {"architectures": ["GptOssForCausalLM"], "attention_bias": True, "head_dim": 64, "hidden_size": 2880,
               "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
               "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
               "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
               "sliding_window": 128, "tie_word_embeddings": False, "vocab_size": 201088}
# What llama.cpp's convert_hf_to_gguf.py writes for the configs above (its set_gguf_parameters).
GGUF_OF = {
    "qwen3-30b-a3b": (QWEN3_30B_A3B, "qwen3moe", {
        "block_count": 48, "context_length": 40960, "embedding_length": 2048, "feed_forward_length": 6144,
        "head_count": 32, "head_count_kv": 4, "key_length": 128, "value_length": 128, "vocab_size": 151936,
        "expert_count": 128, "expert_used_count": 8, "expert_feed_forward_length": 768}),
    "mixtral-8x7b": (MIXTRAL_8X7B, "llama", {  # a llama with experts as wide as feed_forward_length
        "block_count": 32, "context_length": 32768, "embedding_length": 4096, "feed_forward_length": 14336,
        "head_count": 32, "head_count_kv": 8, "vocab_size": 32000, "expert_count": 8, "expert_used_count": 2}),
    "qwen1.5-moe-a2.7b": (QWEN15_MOE_A27B, "qwen2moe", {
        "block_count": 24, "context_length": 8192, "embedding_length": 2048, "feed_forward_length": 5632,
        "head_count": 16, "head_count_kv": 16, "vocab_size": 151936, "expert_count": 60, "expert_used_count": 4,
        "expert_feed_forward_length": 1408, "expert_shared_feed_forward_length": 5632}),
    "deepseek-v2-lite": (DEEPSEEK_V2_LITE, "deepseek2", {  # MLA written as llama.cpp's MQA of 576-wide keys
        "block_count": 27, "context_length": 163840, "embedding_length": 2048, "feed_forward_length": 10944,
        "head_count": 16, "head_count_kv": 1, "vocab_size": 102400, "leading_dense_block_count": 1,
        "kv_lora_rank": 512, "key_length": 576, "value_length": 512, "key_length_mla": 192, "value_length_mla": 128,
        "rope_dimension_count": 64, "expert_feed_forward_length": 1408, "expert_count": 64,
        "expert_shared_count": 2, "expert_used_count": 6}),
    "gemma-2-9b": (GEMMA2_9B, "gemma2", {
        "block_count": 42, "context_length": 8192, "embedding_length": 3584, "feed_forward_length": 14336,
        "head_count": 16, "head_count_kv": 8, "key_length": 256, "value_length": 256, "vocab_size": 256000,
        "sliding_window": 4096}),
    "gpt-oss-20b": (GPT_OSS_20B, "gpt-oss", {  # llama.cpp knows its layers alternate: no pattern written
        "block_count": 24, "context_length": 131072, "embedding_length": 2880, "feed_forward_length": 2880,
        "head_count": 64, "head_count_kv": 8, "key_length": 64, "value_length": 64, "vocab_size": 201088,
        "expert_count": 32, "expert_used_count": 4, "expert_feed_forward_length": 2880, "sliding_window": 128}),
}


@pytest.mark.parametrize("name", GGUF_OF)
def test_a_gguf_header_plans_its_experts_latent_attention_and_sliding_window_as_its_config_does(name, tmp_path):
    """A mixture of experts' GGUF (expert_count, expert_used_count, expert_feed_forward_length, shared
    experts, leading dense blocks), DeepSeek's MLA ranks and a sliding window are read from the header:
    the file is planned as its config.json is, not as a dense model."""
    from quantselect.engines.gguf_header import model_config, read_file_header

    hf, arch, kv = GGUF_OF[name]
    tensors = ("output.weight", "blk.0.attn_q.bias") if hf.get("attention_bias") or arch == "qwen2moe" else \
        () if arch == "gemma2" else ("output.weight",)
    path = _gguf(tmp_path / f"{name}.gguf", arch, kv, tensors)
    header, config = shape_from_config(model_config(read_file_header(path))), shape_from_config(hf)
    assert (header.params, header.active_params) == (config.params, config.active_params)
    for context in (4096, 32768):
        assert header.kv_cache_bytes(context, 1) == config.kv_cache_bytes(context, 1)


def test_a_context_past_any_model_is_refused_and_past_this_model_is_a_note():
    from quantselect.domain.planner import MAX_CONTEXT, plan_notes

    llama = shape("llama-3.1-8b")  # max_position_embeddings 131072
    assert plan_notes(llama, 131072) == []
    assert plan_notes(llama, 262144) == ["context 262,144 is beyond the model's max_position_embeddings (131,072): "
                                         "it needs its RoPE scaled further (e.g. YaRN), and quality may drop"]
    [mla] = plan_notes(shape_from_config(DEEPSEEK_V3), 8192)
    assert mla.startswith("KV cache: Multi-head Latent Attention's compressed latent (512 + 64 values per token and "
                          "layer), as vLLM and SGLang store it")
    assert plan(llama, 79.6 * GIB, context=MAX_CONTEXT, batch=1)[0].kv_cache_bytes == 32 * 8 * 128 * 2 * 2 * 2**24
    with pytest.raises(InputError, match=r"^context 16,777,217 tokens is more than the planner takes \(16,777,216"):
        plan(llama, 79.6 * GIB, context=MAX_CONTEXT + 1, batch=1)
    res = CliRunner().invoke(cli, ["plan", str(CONFIGS / "llama-3.1-8b.json"), "--context", "1000000000"])
    assert res.exit_code == 2 and "more than the planner takes" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


def test_an_mla_config_without_v_head_dim_takes_the_width_per_head():
    """MiniCPM3-4B's config.json (its published fields) has MLA's ranks but no v_head_dim: its model
    derives it as hidden_size / heads, and so does the planner (it was refused as a missing field)."""
    cfg = {"architectures": ["MiniCPM3ForCausalLM"], "model_type": "minicpm3", "hidden_size": 2560,
           "intermediate_size": 6400, "num_attention_heads": 40, "num_hidden_layers": 62, "num_key_value_heads": 40,
           "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "q_lora_rank": 768, "kv_lora_rank": 256,
           "vocab_size": 73448, "max_position_embeddings": 32768}
    shape = shape_from_config(cfg)
    assert shape.head_dim == 64 and shape.params == pytest.approx(4.07e9, rel=0.01)  # published: 4B
    assert shape.kv_cache_bytes(32768, 1) == 62 * (256 + 32) * 32768 * 2
