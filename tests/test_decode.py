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


@pytest.mark.parametrize("family", [*FAMILIES, "smollm2"])
def test_a_batch_decodes_each_row_as_if_it_were_alone(tiny_models, demo_model_dir, family):
    """Rows join a running batch (left-padded, caches merged) and leave it, and each row's logits are
    those of its sequence decoded alone with the dynamic cache."""
    import torch

    from quantselect.engines.decode import BatchDecoder

    path = demo_model_dir if family == "smollm2" else tiny_models[family]
    lm = load_candidate(str(path), CATALOG["baseline"], "cpu")
    texts = ("Once upon a time", "The capital of France is", "1, 2, 3,", "A much longer prompt than the others, with commas")
    prompts = [lm.tokenizer(p)["input_ids"] for p in texts]
    alone = []
    for ids in prompts:  # each sequence alone: 12 greedy tokens and the logits before each of them
        d, logits, toks = Decoder(lm.model, static=False), [], []
        with torch.inference_mode():
            x = d.prefill(ids)
            for _ in range(12):
                logits.append(x)
                toks.append(int(x.argmax()))
                x = d.step(toks[-1])
        alone.append((logits, toks))

    batch = BatchDecoder(lm.model)
    rows: list[int] = []  # the sequence each row decodes
    done = [0] * len(prompts)  # tokens fed to each sequence so far
    joins = {0: [0, 1], 3: [2], 5: [3]}  # step -> sequences joining then (two at once, then one by one)
    with torch.inference_mode():
        for t in range(30):
            new = joins.get(t, [])
            if new and (batch.can_add() or not rows):
                logits = batch.add([prompts[s] for s in new])
                rows += new
                for r, s in enumerate(new):
                    torch.testing.assert_close(logits[r], alone[s][0][0], atol=2e-4, rtol=2e-4)
            elif new:  # not mergeable: they join when the batch is empty
                joins[t + 1] = joins.get(t + 1, []) + new
                new = []
            if not new and rows:
                logits = batch.step([alone[s][1][done[s]] for s in rows])
                for r, s in enumerate(rows):
                    done[s] += 1
                    if done[s] < 12:
                        torch.testing.assert_close(logits[r], alone[s][0][done[s]], atol=2e-4, rtol=2e-4)
                keep = [r for r, s in enumerate(rows) if done[s] < 11 - s]  # they finish at different steps
                batch.keep(keep)
                rows = [rows[r] for r in keep]
    assert all(done) and batch.rows == 0


def test_a_row_leaves_the_batch_of_a_hybrid_linear_attention_model():
    """Qwen3-Next, Qwen3.5, Jamba, Falcon-H1...: their cache also holds each row's conv and recurrent
    states, which a row leaving must take along (``batch_select_indices`` raised for those layers,
    failing every answer of the batch). Each row goes on as it does alone."""
    import torch
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    from quantselect.engines.decode import BatchDecoder

    cfg = Qwen3NextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2,
                          linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=32, shared_expert_intermediate_size=32, max_position_embeddings=256,
                          layer_types=["linear_attention", "full_attention"])
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(cfg).eval()
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]  # the first left-padded in the batch
    alone = []
    with torch.inference_mode():
        for ids in prompts:
            d, x, logits = Decoder(model, static=False), None, []
            x = d.prefill(ids)
            for _ in range(3):
                logits.append(x)
                x = d.step(int(x.argmax()))
            alone.append(logits)
        for leaving in (0, 1):
            batch = BatchDecoder(model)
            batch.add(prompts)
            batch.step([int(alone[s][0].argmax()) for s in (0, 1)])
            stays = 1 - leaving
            batch.keep([stays])
            torch.testing.assert_close(batch.step([int(alone[stays][1].argmax())])[0], alone[stays][2], atol=2e-4, rtol=2e-4)


def test_a_multimodal_wrappers_context_is_its_text_configs():
    """Gemma 3 loads as a ForConditionalGeneration whose config has no max_position_embeddings of its
    own: the server took no limit (2^30 tokens) and the scorer lm-eval's 2,048."""
    from types import SimpleNamespace

    from transformers import Gemma3Config

    from quantselect.engines.evaluate import _max_length

    assert _max_length(SimpleNamespace(config=Gemma3Config())) == 131072


@pytest.mark.parametrize("family", [*FAMILIES, "qwen3_next"])
def test_a_batch_holds_the_kv_cache_it_measures_per_token(tiny_models, family):
    """What the server's KV cache budget counts with, measured on the model: the bytes a row's cache
    grows by per token (the planner's count from its config: K and V of each KV head in each
    attention layer, at the model's dtype) and those it holds whatever its length (a hybrid's
    linear-attention states); a batch of left-padded rows holds at most rows x (width x the first + the second)."""
    import torch

    from quantselect.domain import planner
    from quantselect.engines.decode import BatchDecoder, cache_bytes

    if family == "qwen3_next":
        from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

        torch.manual_seed(0)
        model = Qwen3NextForCausalLM(Qwen3NextConfig(
            vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
            linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, layer_types=["linear_attention", "full_attention"])).eval()
        attention_layers = 1
    else:
        model = load_candidate(str(tiny_models[family]), CATALOG["baseline"], "cpu").model
        attention_layers = model.config.num_hidden_layers
    batch = BatchDecoder(model)
    per_token, per_row, plain = batch.kv_cache_growth()
    shape = planner.shape_from_config(model.config.to_dict())
    assert per_token == shape.kv_per_token_layer * attention_layers * model.dtype.itemsize, family
    assert plain == (family in ("llama", "qwen2", "qwen3")) and (per_row == 0 if plain else per_row > 0), family
    assert batch.rows == 0
    with torch.inference_mode():
        batch.add([[5] * 3, [6] * 9])
        if plain:  # (the others take no row into a running batch)
            batch.add([[7] * 5])
        for _ in range(4):
            batch.step([1] * batch.rows)
        batch.keep(list(range(1, batch.rows)))
        held, grown = cache_bytes(batch._cache), batch.rows * batch._mask.shape[1] * per_token
    # (a sliding-window layer's cache also holds its window as a tensor: the same in every batch)
    assert held == grown if plain else grown < held <= grown + batch.rows * per_row, (family, held, grown, per_row)


def test_the_memory_a_cgroup_leaves_is_read_on_v1_and_v2_up_its_path(tmp_path):
    """A container's limit bounds the serving batch's budget: the least room over the process's cgroup
    and those above it, page cache counted free; cgroup v2 (one hierarchy) and v1 (the memory
    controller's own), as /proc/self/cgroup names them; none when no level sets a limit."""
    from quantselect.engines.decode import cgroup_room

    def cgroup(folder, limit, used, inactive, v1=False):
        folder.mkdir(parents=True, exist_ok=True)
        names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file") if v1 else \
            ("memory.max", "memory.current", "inactive_file")
        (folder / names[0]).write_text(f"{limit}\n")
        (folder / names[1]).write_text(f"{used}\n")
        (folder / "memory.stat").write_text(f"active_file 5\n{names[2]} {inactive}\n")

    v2, proc = tmp_path / "v2", tmp_path / "cgroup"
    cgroup(v2, "max", 50 << 30, 0)  # the root: no limit
    cgroup(v2 / "kubepods.slice", 16 << 30, 10 << 30, 1 << 30)  # the pod's limit: 7 GiB left
    cgroup(v2 / "kubepods.slice" / "ray", "max", 9 << 30, 1 << 30)  # none of its own
    proc.write_text("0::/kubepods.slice/ray\n")
    assert cgroup_room(str(proc), str(v2)) == 7 << 30
    proc.write_text("0::/\n")  # in a cgroup namespace: the root folder is its own cgroup
    assert cgroup_room(str(proc), str(v2)) is None
    v1 = tmp_path / "v1"
    cgroup(v1 / "memory", 9223372036854771712, 1 << 30, 0, v1=True)  # v1's "no limit"
    cgroup(v1 / "memory" / "docker" / "abc", 4 << 30, 3 << 30, 1 << 29, v1=True)
    proc.write_text("4:memory:/docker/abc\n3:cpuset:/\n")
    assert cgroup_room(str(proc), str(v1)) == (1 << 30) + (1 << 29)
    assert cgroup_room(str(tmp_path / "none"), str(v1)) is None
