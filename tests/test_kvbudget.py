"""The serving batch's KV cache budget on models whose sliding-window layers keep only their window
(Gemma 2/3: 5 of 6 layers; Mistral v0.1, gpt-oss, ...): counted as the cache really holds them."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace as Row

import pytest

from quantselect.domain.candidates import CATALOG

WINDOW = 8


@pytest.fixture(scope="module")
def tiny_gemma(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """A random Gemma 3 text model: layers 1-5 slide over 8 tokens, layer 6 attends to all of them."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=WINDOW,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    assert model.config.layer_types.count("sliding_attention") == 5
    out = tmp_path_factory.mktemp("gemma")
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_a_sliding_window_model_s_batch_admits_what_its_cache_really_holds(tiny_gemma):
    """Budget 30 tokens (as if every layer kept each one): a row 100 wide costs its full layer 100
    tokens and each sliding layer only its window, ~23 -- one fits (it was refused: 100 > 30), two do not.
    Its prompt counts in full (while it is read, a sliding layer holds the whole prompt): 20 do, 31 not.
    Decoded for real, the cache holds what the budget counted (a sliding layer keeps one token less
    than its window between steps), within the budget."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantselect.engines.decode import BatchDecoder, cache_bytes
    from quantselect.serving.app import _Batch

    model = AutoModelForCausalLM.from_pretrained(str(tiny_gemma))
    batch = _Batch(model, threading.Lock(), 16, tokens=30)
    cost = batch.cost
    assert not batch.plain  # sliding layers: no row joins a running batch (BatchDecoder.can_add)
    assert cost.per_token == 6 * 2 * 2 * 16 * 4  # every layer's K and V below the window, fp32
    assert cost.windows == ((WINDOW, 5 * 2 * 2 * 16 * 4),)
    row = Row(ids=[5] * 20, out=[], max_tokens=80)
    assert batch.fits([row]) and not batch.fits([row, row])
    assert not batch.fits([Row(ids=[5] * 31, out=[], max_tokens=1)])  # its prefill alone holds 31 tokens' worth
    assert batch.longest == (30 * cost.per_token - 5 * 256 * WINDOW) // 256  # 140: the full layer's tokens

    decoder = BatchDecoder(model)
    with torch.inference_mode():
        decoder.add([[5] * 40])
        for _ in range(59):
            decoder.step([1])
        width, held = decoder._mask.shape[1], cache_bytes(decoder._cache)
    assert width == 99
    slack = sum(b for _, b in cost.windows)  # the one token each sliding layer keeps fewer
    assert cost.row_bytes(width) - slack <= held <= cost.row_bytes(width) + cost.per_row, (held, cost)
    assert held <= batch.tokens * cost.per_token + cost.per_row


def test_a_long_request_on_a_sliding_window_model_is_served_and_the_400_counts_the_same(tiny_gemma):
    """The request limit uses the batch's cost model: 20 + 120 tokens fit a 30-token budget (the
    longest sequence it holds is 140), 20 + 121 is refused naming that, and so is a prompt over 30
    tokens (read, it holds every layer's keys); without max_tokens the answer is cut to what the budget
    leaves. The long one decodes on the batch past its window."""
    import quantselect.serving.app as app
    from quantselect.serving.app import ApiError, CompletionRequest

    server_class = next(c for c in app.QuantizedModelServer.func_or_class.__mro__ if "_chat_ids" in vars(c))
    server = server_class("gemma", str(tiny_gemma), CATALOG["baseline"].to_dict(), kv_cache_tokens=30)
    assert server.static is None and server.batch.tokens == 30
    assert server._limit([5] * 20, 120) == 120 and server._limit([5] * 20, None) == 120
    with pytest.raises(ApiError) as e:
        server._limit([5] * 20, 121)
    assert e.value.status == 400 and e.value.code == "context_length_exceeded" and e.value.message == (
        "This request needs 141 tokens of KV cache (20 of prompt, 121 to generate); this replica holds 140: "
        "ask for fewer max_tokens or a shorter prompt.")
    with pytest.raises(ApiError) as e:
        server._limit([5] * 31, 1)
    assert e.value.status == 400 and e.value.code == "context_length_exceeded" and e.value.message == (
        "This request's prompt of 31 tokens needs more KV cache while it is read than this replica holds "
        "(30 tokens): send a shorter prompt.")
    seq = server._start([5] * 20, CompletionRequest(prompt="x", temperature=0, max_tokens=60), 60)
    *_, (_, reason, used) = seq.results()
    assert reason in ("length", "stop") and 1 <= used <= 60 and server.batch.peak == 1


def test_a_model_whose_every_layer_slides_holds_rows_of_any_length():
    """Mistral v0.1: every layer keeps only its window, so a row's cache stops growing there; the
    budget bounds the rows, not their length (the context does), and their prompts as they are read."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from quantselect.serving.app import _Batch

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                             sliding_window=WINDOW)).eval()
    batch = _Batch(model, threading.Lock(), 16, tokens=30)
    assert batch.cost.windows == ((WINDOW, batch.cost.per_token),) and batch.longest == 1 << 40
    long = Row(ids=[5] * 8, out=[], max_tokens=200)
    assert batch.fits([long] * 3) and not batch.fits([long] * 4)  # 3 rows x 8 tokens of 30 (prompts, then windows)
    assert not batch.fits([Row(ids=[5] * 31, out=[], max_tokens=1)])  # a prompt is held whole while it is read


def test_long_prompts_join_the_batch_in_prefill_passes_of_bounded_size(tiny_llama, monkeypatch):
    """Prompts that arrive together are prefilled together up to PREFILL_TOKENS (rows x the widest);
    the rest join at the next step, where rows can join a running batch (one pass of 16 long prompts
    would need activations the KV budget leaves no room for). A prompt longer than the bound goes alone."""
    import quantselect.serving.app as app
    from quantselect.serving.app import _Batch, _Sampling, _Sequence
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(app, "PREFILL_TOKENS", 100)
    batch = _Batch(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), threading.Lock(), 16, tokens=10_000)
    assert batch.plain
    passes, add = [], batch.decoder.add
    batch.decoder.add = lambda prompts: passes.append([len(p) for p in prompts]) or add(prompts)  # records, then adds
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    seqs = [_Sequence(tok, set(), [5] * n, _Sampling(temperature=0), 6, "cpu") for n in (40, 40, 40, 30, 120, 10)]
    with batch.lock:  # the first is taken in and waits for the lock to prefill; the rest arrive meanwhile
        batch.submit(seqs[0])
        while not batch.waiting.empty():
            pass
        for seq in seqs[1:]:
            batch.submit(seq)
    for seq in seqs:
        assert [r for r in seq.results()][-1][2] == 6  # every answer ran to its 6 tokens
    # in arrival order, each pass within the bound but for one alone (the 120), and prompts did share passes
    assert [n for p in passes for n in p] == [40, 40, 40, 30, 120, 10], passes
    assert all(len(p) == 1 or len(p) * max(p) <= 100 for p in passes) and [120] in passes, passes
    assert any(len(p) > 1 for p in passes), passes  # (without the bound: 40, then the other five at once)
