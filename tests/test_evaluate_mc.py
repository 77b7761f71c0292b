"""Multiple-choice scoring against lm-evaluation-harness's semantics, on the real SmolLM2 and the tiny
models: acc vs acc_norm, tokens cut at the context/continuation boundary, the shared-context
(packed) path against each full sequence scored alone, and batch-size invariance."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from quantselect.domain.candidates import CATALOG
from quantselect.domain.dataset import Item, load_dataset, parse_records
from quantselect.engines import evaluate as ev
from quantselect.engines.quantize import load_candidate
from quantselect.errors import InputError
from tests.fixtures.common import EXAMPLES


@pytest.fixture(scope="module")
def smol(demo_model_dir):
    return load_candidate(str(demo_model_dir), CATALOG["baseline"], "cpu")


@pytest.fixture(scope="module")
def piqa_items():
    return load_dataset(EXAMPLES / "piqa-300.jsonl", limit=8).items


def alone(model, tokenizer, context: list[int], continuation: list[int]) -> float:
    """The log-likelihood of one continuation, its full sequence scored alone (no batch, no packing)."""
    import torch

    with torch.inference_mode():
        logits = model(torch.tensor([context + continuation[:-1]])).logits[0].float()
    lp = torch.log_softmax(logits[len(context) - 1:], dim=-1)
    return sum(lp[k, t].item() for k, t in enumerate(continuation))


def test_predict_acc_and_acc_norm():
    assert ev.predict([-10.0, -12.0], ["a", "a much longer choice"]) == 0
    assert ev.predict([-10.0, -12.0], ["a", "a much longer choice"], norm=True) == 1
    assert ev.predict([-3.0, -3.0], ["ab", "cd"], norm=True) == 0  # ties go to the first, as np.argmax


def test_accuracy_norm_differs_from_accuracy_where_lengths_differ(smol):
    # A short unlikely answer beats a long sensible one in total, not per character.
    records = [{"prompt": "Question: What color is the sky?\nAnswer:",
                "choices": ["no", "The sky is blue on a clear day because of Rayleigh scattering"], "answer": 1}]
    acc = ev.evaluate(smol.model, smol.tokenizer, parse_records(records))
    norm = ev.evaluate(smol.model, smol.tokenizer, parse_records(records, metric="accuracy_norm"))
    assert acc[0].choice_logprobs == pytest.approx(norm[0].choice_logprobs)
    lp, choices = acc[0].choice_logprobs, records[0]["choices"]
    assert lp[0] > lp[1] and lp[0] / len(choices[0]) < lp[1] / len(choices[1])
    assert (acc[0].prediction, acc[0].correct) == (0, False)
    assert (norm[0].prediction, norm[0].correct) == (1, True)


def test_dataset_metric_accuracy_norm_is_accepted_for_multiple_choice_only():
    item = {"prompt": "p", "choices": ["a", "b"], "answer": 0}
    assert parse_records([item], metric="accuracy_norm").metric == "accuracy_norm"
    assert parse_records([item]).metric == "accuracy"
    with pytest.raises(InputError, match="accuracy_norm"):
        parse_records([item], metric="exact_match")
    with pytest.raises(InputError):
        parse_records([{"prompt": "p", "reference": "r"}], metric="accuracy_norm")


def test_a_prompt_ending_in_a_space_scores_as_the_prompt_without_it(smol):
    tok = smol.tokenizer
    ctx, cont = ev._encode_pair(tok, "The capital of France is ", "Paris")
    assert ctx == tok("The capital of France is")["input_ids"]
    assert cont == tok(" Paris", add_special_tokens=False)["input_ids"]  # the space joins the word
    items = [Item("The capital of France is ", ("Paris", "Rome"), 0), Item("The capital of France is", ("Paris", "Rome"), 0)]
    spaced, plain = ev.score_multiple_choice(smol.model, tok, items)
    assert spaced.choice_logprobs == pytest.approx(plain.choice_logprobs, abs=1e-4)


def test_a_choice_that_merges_with_the_previous_token_is_cut_as_lm_eval_cuts_it(smol):
    tok = smol.tokenizer
    # "un" + "believable" encodes differently whole: the context stays the prompt encoded alone and
    # the continuation is what follows it in the whole encoding (lm-eval's _encode_pair).
    ctx, cont = ev._encode_pair(tok, "The story was un", "believable")
    whole = tok("The story was unbelievable")["input_ids"]
    assert ctx == tok("The story was un")["input_ids"]
    assert ctx + cont != whole and cont == whole[len(ctx):]
    # Scoring sums the log-likelihood of exactly the tokens _encode_pair gives (delimiter " " added).
    item = Item("The story was un", ("believable", "happy"), 0)
    [result] = ev.score_multiple_choice(smol.model, tok, [item])
    for j, choice in enumerate(item.choices):
        c, k = ev._encode_pair(tok, item.prompt, " " + choice)
        assert result.choice_logprobs[j] == pytest.approx(alone(smol.model, tok, c, k), abs=1e-3)


def test_shared_context_matches_each_full_sequence_scored_alone(smol, piqa_items):
    tok = smol.tokenizer
    results = ev.score_multiple_choice(smol.model, tok, piqa_items)
    rows = ev._rows(tok, piqa_items, ev._max_length(smol.model), ev._pack_length(smol.model))
    assert len(rows) == len(piqa_items) and any(r.common for r in rows)  # packed, with shared choice prefixes
    for item, result in zip(piqa_items, results):
        for j, choice in enumerate(item.choices):
            c, k = ev._encode_pair(tok, item.prompt, " " + choice)
            assert result.choice_logprobs[j] == pytest.approx(alone(smol.model, tok, c, k), abs=1e-3)


def test_batch_size_and_packing_do_not_change_scores(smol, piqa_items, monkeypatch):
    tok = smol.tokenizer
    batched = ev.score_multiple_choice(smol.model, tok, piqa_items)
    monkeypatch.setitem(ev.TOKENS_PER_BATCH, "cpu", 1)  # one row per forward pass
    one_by_one = ev.score_multiple_choice(smol.model, tok, piqa_items)
    monkeypatch.setitem(ev.TOKENS_PER_BATCH, "cpu", 2048)
    monkeypatch.setattr(ev, "_unpadded_supported", lambda model: False)  # padded rows through the model
    padded = ev.score_multiple_choice(smol.model, tok, piqa_items)
    monkeypatch.setattr(ev, "_pack_length", lambda model: 0)  # one row per choice, the model's own mask
    unpacked = ev.score_multiple_choice(smol.model, tok, piqa_items)
    for a, b, c, d in zip(batched, one_by_one, padded, unpacked):
        assert a.prediction == b.prediction == c.prediction == d.prediction
        for other in (b, c, d):
            assert a.choice_logprobs == pytest.approx(other.choice_logprobs, abs=1e-3)


def test_unpadded_rows_give_the_hidden_states_of_padded_rows_in_every_family(tiny_models, demo_model_dir):
    """The batch as one unpadded sequence (attention on rows only), with and without a shared prefix
    run once, against the same rows padded, token by token, for packed rows of several lengths."""
    import torch

    mixed = [Item("Question: which is heavier?\nAnswer:", ("a brick of lead", "a brick of foam", "a feather"), 0),
             Item("Pick one:", ("yes", "no"), 1),
             Item("A much longer question that takes many more tokens than the others do?\nAnswer:",
                  ("the first of the two answers", "the second"), 0)]
    instructed = [Item(f"Answer with the name of the colour, in one word. Question: {q}\nAnswer:", c, 0)
                  for q, c in [("what colour is the sky on a clear day?", ("blue", "green")),
                               ("grass?", ("green", "red", "a deep shade of purple")),
                               ("what colour is fresh snow, when it has just fallen?", ("white", "black"))]]
    for family, path in {**tiny_models, "smollm2": demo_model_dir}.items():
        lm = load_candidate(str(path), CATALOG["baseline"], "cpu")
        assert ev._unpadded_supported(lm.model), family
        for items, shares in ((mixed, False), (instructed, True)):
            rows = sorted(ev._rows(lm.tokenizer, items, ev._max_length(lm.model), ev._pack_length(lm.model)),
                          key=lambda r: -len(r))
            skip = ev._batch_prefix(rows)
            assert (skip > 3) == shares, (family, skip)
            ids, pos, mask, _, _ = ev._pack_batch(rows, lm.model.dtype, own_mask=False)
            lengths = [len(r) for r in rows]
            assert len(set(lengths)) > 1  # there is padding to leave out
            u_ids, u_pos, u_mask, _, _ = ev._pack_batch(rows, lm.model.dtype, own_mask=False, skip=skip)
            with torch.inference_mode():
                hidden, where = ev._forward_unpadded(lm.model, u_ids, u_pos, u_mask, [n - skip for n in lengths],
                                                     torch.device("cpu"), prefix=rows[0].shared[:skip])
                padded = lm.model.base_model(input_ids=ids, position_ids=pos, attention_mask=mask).last_hidden_state
            assert hidden.shape[0] == sum(lengths) - (len(rows) - 1) * skip
            assert torch.allclose(hidden[:skip], padded[0, :skip], atol=1e-4), family
            for b, n in enumerate(lengths):
                width = u_ids.shape[1]
                got = hidden[where[b * width: b * width + n - skip]]
                assert torch.allclose(got, padded[b, skip:n], atol=1e-4), (family, shares)


def test_the_vocabulary_projection_in_blocks_equals_one_log_softmax(monkeypatch):
    import torch

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 1000, bias=True)
    hidden, targets = torch.randn(37, 16), torch.randint(0, 1000, (37,))
    monkeypatch.setitem(ev.HEAD_BLOCK, "cpu", (8, 128))  # blocks that split rows and vocabulary unevenly
    for softcap, scaling in ((None, None), (3.0, None), (None, 4.0)):
        logits = head(hidden)
        if scaling:
            logits = logits / scaling
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        expected = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
        model = SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=softcap, logits_scaling=scaling))
        with torch.inference_mode():
            got = ev._target_logprobs(hidden, head, targets, ev.final_logits(model), torch.device("cpu"))
        assert torch.allclose(got, expected, atol=1e-5)


def test_every_tiny_family_packs_as_it_scores_alone(tiny_models):
    items = [Item("Question: which is heavier?\nAnswer:", ("a brick of lead", "a brick of foam", "a feather"), 0),
             Item("Pick one:", ("yes", "no"), 1)]
    for family, path in tiny_models.items():
        lm = load_candidate(str(path), CATALOG["baseline"], "cpu")
        results = ev.score_multiple_choice(lm.model, lm.tokenizer, items)
        for item, result in zip(items, results):
            for j, choice in enumerate(item.choices):
                c, k = ev._encode_pair(lm.tokenizer, item.prompt, " " + choice)
                assert result.choice_logprobs[j] == pytest.approx(alone(lm.model, lm.tokenizer, c, k), abs=1e-3), family


def test_a_context_too_long_for_the_model_is_cut_from_the_left(tiny_llama):
    lm = load_candidate(str(tiny_llama), CATALOG["baseline"], "cpu")
    limit = ev._max_length(lm.model)  # 512 positions in the tiny config
    item = Item("word " * (limit + 50) + "Answer:", ("yes", "no thanks"), 0)
    [result] = ev.score_multiple_choice(lm.model, lm.tokenizer, [item])
    for j, choice in enumerate(item.choices):
        c, k = ev._encode_pair(lm.tokenizer, item.prompt, " " + choice)
        c = c[-(limit + 1 - len(k)):]  # lm-eval: (context + continuation)[-(max_length + 1):][:-1]
        assert len(c) + len(k) - 1 == limit
        assert result.choice_logprobs[j] == pytest.approx(alone(lm.model, lm.tokenizer, c, k), abs=1e-3)


@pytest.mark.parametrize("family", ["gemma", "mistral"])
def test_items_longer_than_a_sliding_window_score_as_the_model_scores_them(tiny_tokenizer_dir, tmp_path, family):
    """Rows longer than the sliding window go one per choice through our unpadded attention: the
    sliding layers (Gemma 3's local ones, every Mistral layer) must still see only the window."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=8,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if family == "gemma":  # one local (sliding) layer, one global
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=16,
                                                   layer_types=["sliding_attention", "full_attention"]))
    else:
        model = MistralForCausalLM(MistralConfig(**common))
    torch.manual_seed(0)
    for p in model.parameters():  # large enough weights that attention is far from uniform
        torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    lm = load_candidate(str(tmp_path), CATALOG["baseline"], "cpu")
    assert ev._unpadded_supported(lm.model)
    items = [Item("The quick brown fox jumps over the lazy dog, and then it runs far away. Answer:",
                  ("the fox ran off into the woods", "the dog"), 0),
             Item("Pick:", ("yes", "no"), 1)]
    rows = ev._rows(lm.tokenizer, items, ev._max_length(lm.model), ev._pack_length(lm.model))
    assert max(len(r) for r in rows) > 2 * 8  # longer than the window
    assert ev._batch_prefix([r for r in rows if r.item == 0]) > 8  # the first item's choices share a long prefix
    for unpadded, subset in ((True, items), (True, items[:1]), (False, items)):
        if not unpadded:
            lm.model.config._attn_implementation = "eager"  # the padded rows, the model's own mask
        results = ev.score_multiple_choice(lm.model, lm.tokenizer, subset)
        for item, result in zip(subset, results):
            for j, choice in enumerate(item.choices):
                c, k = ev._encode_pair(lm.tokenizer, item.prompt, " " + choice)
                assert result.choice_logprobs[j] == pytest.approx(alone(lm.model, lm.tokenizer, c, k), abs=1e-3), \
                    (family, unpadded, len(subset), j)


def scaled_head_model(family: str, tokenizer_dir, out):
    """A tiny random model whose forward scales the head's logits: Granite divides them by
    ``logits_scaling``, Cohere multiplies them by ``logit_scale``."""
    import torch
    from transformers import AutoTokenizer, CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    if family == "granite":
        model = GraniteForCausalLM(GraniteConfig(**common, logits_scaling=4.0))
    else:
        model = CohereForCausalLM(CohereConfig(**common, logit_scale=0.25))
    for p in model.parameters():  # logits far from uniform, so a scale shows
        torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return load_candidate(str(out), CATALOG["baseline"], "cpu")


@pytest.mark.parametrize("family", ["granite", "cohere"])
def test_a_scaled_head_scores_as_the_models_own_logits(tiny_tokenizer_dir, tmp_path, family):
    lm = scaled_head_model(family, tiny_tokenizer_dir, tmp_path)
    items = [Item("Question: which is heavier?\nAnswer:", ("a brick of lead", "a feather"), 0)]
    [result] = ev.score_multiple_choice(lm.model, lm.tokenizer, items)
    for j, choice in enumerate(items[0].choices):
        c, k = ev._encode_pair(lm.tokenizer, items[0].prompt, " " + choice)
        assert result.choice_logprobs[j] == pytest.approx(alone(lm.model, lm.tokenizer, c, k), abs=1e-3), family
