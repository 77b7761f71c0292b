"""Label-free quality on the real SmolLM2: prompts-only datasets, the baseline's Reference, and the
candidate scores against it (top-1 agreement, KL similarity, output match): 1 for the baseline
itself, high for int8, low for a damaged model; slices score as the whole."""

from __future__ import annotations

import math
import pickle
from dataclasses import replace

import pytest

from quantselect.domain.candidates import CATALOG
from quantselect.domain.dataset import LABEL_FREE_METRICS, PROMPTS, load_dataset, parse_records
from quantselect.engines import evaluate as ev
from quantselect.engines import labelfree as lf
from quantselect.engines.quantize import load_candidate
from quantselect.errors import InputError
from tests.fixtures.common import EXAMPLES

PROMPT_TEXTS = ["The capital of France is", "Write a haiku about the sea.", "Explain why the sky is blue.",
                "List three fruits:", "def fibonacci(n):", "Translate 'good morning' to French:"]
N_NEW = 12


def dataset(metric: str = "top1_agreement"):
    return parse_records([{"prompt": p} for p in PROMPT_TEXTS], metric=metric, max_new_tokens=N_NEW)


@pytest.fixture(scope="module")
def base(demo_model_dir):
    return load_candidate(str(demo_model_dir), CATALOG["baseline"], "cpu")


@pytest.fixture(scope="module")
def reference(base):
    return lf.build_reference(base.model, base.tokenizer, dataset())


@pytest.fixture(scope="module")
def int8(demo_model_dir):
    return load_candidate(str(demo_model_dir), CATALOG["int8"], "cpu")


def scores(lm, reference, metric, ds=None):
    results = ev.evaluate(lm.model, lm.tokenizer, ds or dataset(metric), reference=reference)
    return [r.score for r in results], results


def test_a_prompts_only_dataset_loads_with_top1_agreement(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"prompt": "Tell me a joke."}\n{"prompt": "Summarize: the cat sat.", "category": "summary"}\n')
    ds = load_dataset(p)
    assert (ds.kind, ds.metric, ds.max_new_tokens, ds.stop, len(ds)) == (PROMPTS, "top1_agreement", 64, (), 2)
    assert lf.needs_reference(ds) and not lf.needs_reference(parse_records([{"prompt": "q", "reference": "a"}]))
    for metric in LABEL_FREE_METRICS:
        assert load_dataset(p, metric=metric).metric == metric
        # Generation datasets may be scored label-free too (their references are ignored).
        assert parse_records([{"prompt": "q", "reference": "a"}], metric=metric).metric == metric
    example = load_dataset(EXAMPLES / "gsm8k-prompts-50.jsonl")
    assert (example.kind, example.metric, len(example)) == (PROMPTS, "top1_agreement", 50)
    with pytest.raises(InputError, match="does not fit a prompts-only dataset"):
        load_dataset(p, metric="exact_match")
    with pytest.raises(InputError, match="does not fit a multiple-choice"):
        parse_records([{"prompt": "p", "choices": ["a", "b"], "answer": 0}], metric="kl_similarity")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(InputError, match=r"mixed.jsonl:2: a prompts-only .* item in a generation dataset"):
        load_dataset(mixed)
    with pytest.raises(InputError, match=r"items\[0\]: an item with an 'answer' needs 'choices'"):
        parse_records([{"prompt": "a", "answer": 1}])


def test_coarsened_kl_never_exceeds_the_full_kl():
    import torch

    torch.manual_seed(0)
    base = torch.log_softmax(torch.randn(64, 50) * 2, dim=-1)
    cand = torch.log_softmax(base + 0.5 * torch.randn(64, 50), dim=-1)
    full = (base.double().exp() * (base.double() - cand.double())).sum(-1)
    for k in (1, 5, 20, 50):
        lp, ids = base.topk(k, dim=-1)
        kl, agree = lf.position_scores(cand, ids, lp)
        assert (kl <= full + 1e-6).all()
        if k == 50:  # every token kept: the full KL
            assert kl.tolist() == pytest.approx(full.tolist(), abs=1e-6)
        else:
            assert (kl < full - 1e-4).any()  # coarser: smaller
        assert agree.tolist() == (cand.argmax(-1) == base.argmax(-1)).tolist()
    lp, ids = base.topk(20, dim=-1)
    kl, agree = lf.position_scores(base, ids, lp)
    assert kl.abs().max().item() < 1e-6 and agree.all()


def test_the_baseline_against_itself_scores_exactly_one(base, reference):
    assert len(reference) == len(PROMPT_TEXTS)
    for ref in reference.items:
        assert 1 <= len(ref.tokens) - ref.n_prompt <= N_NEW and ref.top_ids.shape == (len(ref.tokens) - 1, lf.TOP_K)
        assert (ref.top_logprobs[:, :-1] >= ref.top_logprobs[:, 1:]).all()  # most likely first
        # The reference's top-1 at each continuation position is the greedy token that followed.
        cont = slice(ref.n_prompt - 1, len(ref.tokens) - 1)
        assert (ref.top_ids[cont, 0] == ref.tokens[ref.n_prompt:]).all()
    for metric in LABEL_FREE_METRICS:
        values, results = scores(base, reference, metric)
        assert values == [1.0] * len(PROMPT_TEXTS), metric
        assert all(r.correct and r.prediction["mean_kl"] == 0.0 for r in results)
    own = reference.baseline_results(dataset("baseline_match"))
    assert [r.score for r in own] == [1.0] * len(PROMPT_TEXTS)
    assert [r.prediction["output"] for r in own] == [r.text for r in reference.items]


def test_int8_scores_high_but_below_one(int8, reference):
    top1, _ = scores(int8, reference, "top1_agreement")
    kl_sim, results = scores(int8, reference, "kl_similarity")
    assert all(0 <= s <= 1 for s in top1 + kl_sim)
    assert sum(top1) / len(top1) >= 0.85 and min(kl_sim) >= 0.98, (top1, kl_sim)
    assert min(kl_sim) < 1  # really quantized: not the baseline
    for r, s in zip(results, kl_sim):
        assert r.prediction["kl_similarity"] == s == pytest.approx(math.exp(-r.prediction["mean_kl"]))
        assert 0 < r.prediction["mean_kl"] < 0.02


def test_a_damaged_model_scores_much_lower(demo_model_dir, reference, int8):
    import torch

    damaged = load_candidate(str(demo_model_dir), CATALOG["baseline"], "cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in damaged.model.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(torch.randn_like(p) * p.std() * 0.1)  # 10% noise on every projection
    top1, _ = scores(damaged, reference, "top1_agreement")
    kl_sim, _ = scores(damaged, reference, "kl_similarity")
    matched, _ = scores(damaged, reference, "baseline_match")
    int8_top1, _ = scores(int8, reference, "top1_agreement")
    assert sum(top1) / len(top1) < sum(int8_top1) / len(int8_top1) - 0.2, (top1, int8_top1)
    assert sum(kl_sim) / len(kl_sim) < 0.8 and min(kl_sim) > 0, kl_sim  # graded, not all-or-nothing
    assert sum(matched) < len(matched) and set(matched) <= {0.0, 1.0}


def test_slices_score_as_the_whole(int8, reference):
    ds = dataset("kl_similarity")
    whole = ev.evaluate(int8.model, int8.tokenizer, ds, reference=reference)
    parts = []
    for start, stop in ((0, 2), (2, 6)):
        part = ev.evaluate(int8.model, int8.tokenizer, ds.slice(start, stop), reference=reference.slice(start, stop))
        assert [r.index for r in part] == list(range(stop - start))
        parts += part
    for a, b in zip(whole, parts):
        assert a.score == pytest.approx(b.score, abs=1e-5)
        assert a.prediction["top1_agreement"] == pytest.approx(b.prediction["top1_agreement"])
    with pytest.raises(ValueError, match="slice both alike"):
        ev.evaluate(int8.model, int8.tokenizer, ds.slice(0, 2), reference=reference)
    with pytest.raises(ValueError, match="another prompt"):
        ev.evaluate(int8.model, int8.tokenizer, ds.slice(2, 4), reference=reference.slice(0, 2))
    with pytest.raises(ValueError, match="other generation settings"):
        ev.evaluate(int8.model, int8.tokenizer, ds, max_new_tokens=N_NEW + 1, reference=reference)
    with pytest.raises(ValueError, match="build its reference first"):
        ev.evaluate(int8.model, int8.tokenizer, ds)


def test_the_reference_is_compact_and_picklable(reference):
    back = pickle.loads(pickle.dumps(reference))
    assert [r.text for r in back.items] == [r.text for r in reference.items]
    assert all((a.top_ids == b.top_ids).all() and (a.top_logprobs == b.top_logprobs).all()
               for a, b in zip(back.items, reference.items))
    positions = sum(len(r.tokens) - 1 for r in reference.items)
    assert len(pickle.dumps(reference)) < positions * lf.TOP_K * 8 + 4096 * len(reference)



def test_the_reference_is_saved_and_loaded_whole(reference, tmp_path):
    path = tmp_path / "refs" / "key.npz"
    reference.save(path)
    back = lf.Reference.load(path)
    assert (back.top_k, back.settings, len(back)) == (reference.top_k, reference.settings, len(reference))
    for a, b in zip(back.items, reference.items):
        assert (a.n_prompt, a.text, a.truncated, a.digest) == (b.n_prompt, b.text, b.truncated, b.digest)
        assert (a.tokens == b.tokens).all() and (a.top_ids == b.top_ids).all() and (a.top_logprobs == b.top_logprobs).all()
        assert (a.token_logprobs == b.token_logprobs).all()
    assert [p.name for p in path.parent.iterdir()] == ["key.npz"]  # no temporary file left
    # A reference saved before the next tokens' log-probabilities were kept loads without them.
    old = lf.Reference([lf.ReferenceItem(**{**i.__dict__, "token_logprobs": None}) for i in reference.items],
                       reference.top_k, reference.settings)
    old.save(path)
    back = lf.Reference.load(path)
    assert all(i.token_logprobs is None for i in back.items)
    own = back.baseline_results(dataset())
    assert [r.score for r in own] == [1.0] * len(PROMPT_TEXTS) and "perplexity" not in own[0].prediction


TEXTS = ["The quick brown fox jumps over the lazy dog. It was a sunny day in the park.",
         "Paris is the capital of France, and Berlin is the capital of Germany.",
         "def add(a, b):\n    return a + b\n"]


def test_a_text_corpus_is_scored_on_its_own_tokens_with_perplexity(base, int8):
    """{"text"} items: no generation; the baseline's distributions over the text itself (llama.cpp's
    KL-divergence check), and each model's perplexity of the text."""
    import torch

    ds = parse_records([{"text": t} for t in TEXTS])
    assert (ds.kind, ds.metric, ds.max_new_tokens) == (PROMPTS, "top1_agreement", 0)
    ref = lf.build_reference(base.model, base.tokenizer, ds)
    for text, r in zip(TEXTS, ref.items):
        want = base.tokenizer(text)["input_ids"]
        assert r.tokens.tolist() == want and r.n_prompt == len(want) and r.text == ""  # nothing generated
    own = ref.baseline_results(ds)
    assert [r.score for r in own] == [1.0] * 3
    for text, r in zip(TEXTS, own):  # the perplexity transformers' own loss gives
        ids = torch.tensor([base.tokenizer(text)["input_ids"]])
        with torch.inference_mode():
            loss = base.model(ids, labels=ids).loss.item()
        assert r.prediction["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
        assert r.prediction["n_tokens"] == ids.shape[1] - 1
    same = ev.evaluate(base.model, base.tokenizer, ds, reference=ref)
    assert [r.score for r in same] == [1.0] * 3
    assert [r.prediction["perplexity"] for r in same] == pytest.approx([r.prediction["perplexity"] for r in own], rel=1e-5)
    quant = ev.evaluate(int8.model, int8.tokenizer, replace(ds, metric="kl_similarity"), reference=ref)
    assert all(0.5 < r.score < 1 and r.prediction["mean_kl"] > 0 for r in quant)
    assert [r.prediction["perplexity"] for r in quant] != pytest.approx([r.prediction["perplexity"] for r in own])
    from quantselect.domain.selection import perplexity

    total = sum(r.prediction["nll"] for r in own) / sum(r.prediction["n_tokens"] for r in own)
    assert perplexity(own) == pytest.approx(math.exp(total)) and perplexity([]) is None
    with pytest.raises(InputError, match=r"items\[0\]: the text is a single token"):
        lf.build_reference(base.model, base.tokenizer, parse_records([{"text": "Hi"}]))
    with pytest.raises(InputError, match="max-new-tokens 0 scores only the text given"):
        parse_records([{"text": t} for t in TEXTS], metric="baseline_match")


@pytest.mark.parametrize("family", ["granite", "cohere"])
def test_the_reference_holds_the_models_own_log_probabilities(tiny_tokenizer_dir, tmp_path, family):
    """Granite's and Cohere's forward scale the head's logits; the reference must see them scaled."""
    import torch

    from tests.test_evaluate_mc import scaled_head_model

    lm = scaled_head_model(family, tiny_tokenizer_dir, tmp_path)
    ds = parse_records([{"text": "The quick brown fox jumps over the lazy dog."}])
    [ref] = lf.build_reference(lm.model, lm.tokenizer, ds).items
    with torch.inference_mode():
        logits = lm.model(torch.tensor(ref.tokens[None], dtype=torch.long)).logits[0, :-1].float()
    want = torch.log_softmax(logits, dim=-1)
    top = want.topk(ref.top_ids.shape[1], dim=-1).values
    assert torch.allclose(torch.from_numpy(ref.top_logprobs), top, atol=1e-4), family
    following = torch.from_numpy(ref.tokens[1:].astype("int64"))
    assert torch.allclose(torch.from_numpy(ref.token_logprobs), want.gather(1, following[:, None])[:, 0], atol=1e-4)


def test_a_candidate_with_nan_logits_scores_zero_and_stores_no_nan(tiny_llama):
    """An overflowing candidate (fp16 inf, NaN logits) is as far from the baseline as can be; NaN or
    inf in the item's prediction would be stored as JSON that PostgreSQL rejects."""
    import json

    import torch

    from quantselect.domain.selection import perplexity

    base = load_candidate(str(tiny_llama), CATALOG["baseline"], "cpu")
    broken = load_candidate(str(tiny_llama), CATALOG["baseline"], "cpu")
    with torch.no_grad():
        broken.model.base_model.norm.weight.fill_(float("nan"))
    ds = parse_records([{"text": t} for t in TEXTS], metric="kl_similarity")
    ref = lf.build_reference(base.model, base.tokenizer, ds)
    for metric in ("kl_similarity", "top1_agreement"):
        results = ev.evaluate(broken.model, broken.tokenizer, replace(ds, metric=metric), reference=ref)
        assert [r.score for r in results] == [0.0] * len(TEXTS), metric
        for r in results:
            json.dumps(r.prediction, allow_nan=False)
            assert r.prediction["kl_similarity"] == 0.0 and r.prediction["mean_kl"] is None
            assert r.prediction["perplexity"] is None and "nll" not in r.prediction
        assert perplexity(results) is None
