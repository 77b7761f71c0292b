"""Generation tasks: the text metrics (on hand cases and on the real GSM8K references), generation
settings on the dataset, and batched greedy generation on the real SmolLM2 and a tiny Llama: left
padding, stop strings, max new tokens, the chat template, prompts cut to fit the context."""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal

import pytest

from quantselect.domain.candidates import CATALOG
from quantselect.domain.dataset import (
    DEFAULT_MAX_NEW_TOKENS,
    GENERATION,
    FieldMapping,
    Item,
    TaskDataset,
    exact_match,
    final_number,
    final_number_match,
    load_dataset,
    parse_records,
    substring_match,
)
from quantselect.engines import evaluate as ev
from quantselect.engines.quantize import load_candidate
from quantselect.errors import InputError
from tests.fixtures.common import SHARED

PROMPTS = ["The capital of France is", "Question: What is 2+2?\nAnswer:",
           "Once upon a time, in a land far away, there lived a", "Hi", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def smol(demo_model_dir):
    return load_candidate(str(demo_model_dir), CATALOG["baseline"], "cpu")


def alone(lm, prompt: str, max_new_tokens: int) -> list[int]:
    """transformers' own greedy decoding of one unpadded prompt."""
    import torch

    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
    with torch.inference_mode():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


# --- metrics --------------------------------------------------------------------------------------


def test_text_metrics_on_hand_cases():
    assert exact_match("The Paris.", "paris") and exact_match("\n Paris\nand more", "Paris")
    assert not exact_match("Lyon", "Paris") and not exact_match("Paris is nice", "Paris")
    assert substring_match("The capital is Paris, of course.", "paris")
    assert not substring_match("Parisian food", "Paris")  # whole words only
    assert not substring_match("It is 14.", "4") and substring_match("It is 4.", "4")
    # A reference that is only an article keeps it: the letter answer "A".
    assert exact_match("A.", "A") and not exact_match("", "A") and not exact_match("B", "A")
    assert substring_match("The answer is A.", "A") and not substring_match("an apple", "A")
    assert final_number("so the answer is 1,234.") == Decimal(1234)
    assert final_number("#### 1,234") == final_number("1234.00") == Decimal(1234)
    assert final_number("It fell by -10 degrees") == Decimal(-10)
    assert final_number("5-3=2") == Decimal(2)  # a hyphen after a word is no minus sign
    assert final_number("costs $0.50 each") == Decimal("0.5")
    assert final_number("First 3, then 4.\n#### 18\nThe answer is: 1") == Decimal(18)  # after ####, first
    assert final_number("1,5 and 12,34") == Decimal(34)  # not thousands groups: separate numbers
    assert final_number("总共18个") == Decimal(18)
    assert final_number("no number here") is None
    assert final_number_match("so the answer is 1,234.", "#### 1234")
    assert not final_number_match("no number here", "#### 5") and not final_number_match("6", "#### 5")


def test_final_number_reads_every_real_gsm8k_reference():
    lines = (SHARED / "datasets/gsm8k/test.jsonl").read_text().splitlines()
    answers = [json.loads(line)["answer"] for line in lines]
    assert len(answers) == 1319
    seen = set()
    for answer in answers:
        tail = answer.rsplit("####", 1)[1].strip()
        want = Decimal(tail.replace(",", ""))
        assert final_number(answer) == want, answer
        # A model's answer in other spellings matches; a different number does not.
        n = int(want)
        assert final_number_match(f"The answer is {n:,}.", answer)
        assert final_number_match(f"so {n} dollars\n#### {n}", answer)
        assert not final_number_match(f"The answer is {n + 1}.", answer)
        seen |= {"comma" if "," in tail else "", "negative" if tail.startswith("-") else ""}
    assert {"comma", "negative"} <= seen  # the file holds "#### 1,450,000" and "#### -10"
    ds = load_dataset(SHARED / "datasets/gsm8k/test.jsonl", FieldMapping.parse(["prompt=question", "reference=answer"]))
    assert ds.metric == "final_number" and ds.max_new_tokens == 256 and ds.stop == ("Question:",)


def test_a_metric_that_cannot_score_an_item_names_it(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "reference": "#### 5"}\n{"prompt": "b", "reference": "Paris"}\n')
    with pytest.raises(InputError, match=r"d.jsonl:2: reference 'Paris' holds no number for metric final_number"):
        load_dataset(p, metric="final_number")
    assert load_dataset(p, metric="substring").metric == "substring"
    with pytest.raises(InputError, match=r"items\[1\]: reference '\.\.\.' is empty once normalized"):
        parse_records([{"prompt": "a", "reference": "x"}, {"prompt": "b", "reference": "..."}], metric="exact_match")
    with pytest.raises(InputError, match=r"items\[0\]: .*final_number"):  # built directly, not loaded
        TaskDataset(GENERATION, "final_number", (Item("p", reference="none"),))
    mc = [{"prompt": "p", "choices": ["a", "b"], "answer": 0}]
    with pytest.raises(InputError, match="does not fit a multiple-choice"):
        parse_records(mc, metric="substring")
    with pytest.raises(InputError, match="chat-template applies to generation and prompts"):
        parse_records(mc, chat_template=True)


def test_generation_settings_validate_default_and_round_trip():
    gen = [{"prompt": "Q", "reference": "A"}]
    ds = parse_records(gen)
    assert (ds.metric, ds.max_new_tokens, ds.stop, ds.chat_template) == ("exact_match", 32, ("\n",), False)
    assert parse_records(gen, metric="substring").max_new_tokens == DEFAULT_MAX_NEW_TOKENS["substring"]
    with pytest.raises(InputError, match="max-new-tokens 0"):
        parse_records(gen, max_new_tokens=0)
    with pytest.raises(InputError, match="stop sequence ''"):
        parse_records(gen, stop=["\n", ""])
    custom = parse_records(gen * 5, metric="substring", max_new_tokens=7, stop=["END", "\n\n"],
                           chat_template=True)
    back = TaskDataset.from_dict(json.loads(json.dumps(custom.to_dict())))
    assert back == custom and back.stop == ("END", "\n\n") and back.chat_template
    part = custom.slice(1, 3)
    assert len(part) == 2 and part.items == custom.items[1:3]
    assert (part.max_new_tokens, part.stop, part.chat_template, part.metric) == (7, ("END", "\n\n"), True, "substring")
    # A dataset stored before the settings existed loads with the defaults.
    old = {"kind": "generation", "metric": "final_number", "source": "x",
           "items": [{"prompt": "Q", "reference": "#### 3"}]}
    assert TaskDataset.from_dict(old).max_new_tokens == 256


def test_stop_index_skips_the_outputs_leading_whitespace():
    assert ev.stop_index("\n\n18\nmore", ["\n"]) == 4
    assert ev.stop_index("  \n", ["\n"]) is None  # nothing but whitespace yet: keep going
    assert ev.stop_index("a Question: b END", ["END", "Question:"]) == 2


# --- generation on real models --------------------------------------------------------------------


def test_batched_left_padded_generation_equals_each_prompt_alone(smol):
    ids = [smol.tokenizer(p)["input_ids"] for p in PROMPTS]
    assert len({len(i) for i in ids}) == len(ids)  # all lengths differ: every row but one is padded
    batched = ev.generate(smol.model, smol.tokenizer, ids, 8)
    for prompt, (out, text, how) in zip(PROMPTS, batched):
        want = alone(smol, prompt, 8)
        assert out == want[: len(out)] and how in ("eos", "length"), prompt
        if how == "length":
            assert len(out) == 8 and out == want
        assert text == smol.tokenizer.decode(out, skip_special_tokens=True)


def test_stop_strings_cut_the_output_and_end_generation_early(smol):
    prompt = "Once upon a time, in a land far away, there lived a"
    [(free_ids, free_text, how)] = ev.generate(smol.model, smol.tokenizer, [smol.tokenizer(prompt)["input_ids"]], 24)
    assert how == "length" and len(free_ids) == 24  # max_new_tokens respected
    words = free_text.split()
    stop = " " + words[3]  # a string the free output reaches after a few words
    cut = free_text.index(stop)
    [(ids, text, how)] = ev.generate(smol.model, smol.tokenizer, [smol.tokenizer(prompt)["input_ids"]], 24, [stop])
    assert how == "stop" and text == free_text[:cut]
    assert ids == free_ids[: len(ids)] and len(ids) < 24
    assert stop in smol.tokenizer.decode(ids) and stop not in smol.tokenizer.decode(ids[:-1])
    # Through evaluate: the dataset's stop strings and max_new_tokens, the output stored per item.
    ds = parse_records([{"prompt": prompt, "reference": "dragon"}], metric="substring", stop=[stop], max_new_tokens=24)
    [result] = ev.evaluate(smol.model, smol.tokenizer, ds)
    assert result.prediction == free_text[:cut] and not result.truncated
    [short] = ev.evaluate(smol.model, smol.tokenizer, ds, max_new_tokens=2)  # the override
    [two] = ev.generate_outputs(smol.model, smol.tokenizer, replace(ds, max_new_tokens=2))
    assert short.prediction == two.text and len(two.output_ids) == 2 and free_text.startswith(two.text)


def test_the_chat_template_wraps_prompts_when_asked(smol, tiny_llama):
    from transformers import AutoTokenizer

    ds = parse_records([{"prompt": "What is the capital of France? Answer in one word.", "reference": "Paris"}],
                       metric="substring", chat_template=True)
    [ids], [cut] = ev.encode_prompts(smol.model, smol.tokenizer, ds)
    templated = smol.tokenizer.apply_chat_template([{"role": "user", "content": ds.items[0].prompt}],
                                                   add_generation_prompt=True, tokenize=False)
    assert ids == smol.tokenizer(templated, add_special_tokens=False)["input_ids"] and not cut
    assert smol.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    [plain], _ = ev.encode_prompts(smol.model, smol.tokenizer, parse_records([{"prompt": "x", "reference": "y"}]))
    assert plain == smol.tokenizer("x")["input_ids"]
    [out] = ev.generate_outputs(smol.model, smol.tokenizer, ds)
    assert out.stopped == "eos" and "Paris" in out.text  # the instruct model answers and ends its turn
    [result] = ev.evaluate(smol.model, smol.tokenizer, ds)
    assert result.correct and result.score == 1.0
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    tok.chat_template = None
    lm = load_candidate(str(tiny_llama), CATALOG["baseline"], "cpu")
    with pytest.raises(InputError, match="no chat template"):
        ev.evaluate(lm.model, tok, ds)


def test_a_prompt_too_long_for_the_context_is_cut_from_the_left_and_flagged(tiny_llama):
    lm = load_candidate(str(tiny_llama), CATALOG["baseline"], "cpu")
    limit = ev._max_length(lm.model)  # 512 positions in the tiny config
    long_prompt = "one two three " * 200 + "end"
    ds = parse_records([{"prompt": long_prompt, "reference": "x"}, {"prompt": "short", "reference": "x"}],
                       metric="substring", max_new_tokens=6, stop=["zzzz"])
    (long_ids, short_ids), flags = ev.encode_prompts(lm.model, lm.tokenizer, ds)
    assert flags == [True, False] and len(long_ids) == limit - 6
    assert long_ids == lm.tokenizer(long_prompt)["input_ids"][-(limit - 6):]  # the end of the prompt kept
    results = ev.evaluate(lm.model, lm.tokenizer, ds)
    assert [r.truncated for r in results] == [True, False]
    with pytest.raises(InputError, match="leaves no room for a prompt"):
        ev.evaluate(lm.model, lm.tokenizer, ds, max_new_tokens=limit)
    # Multiple choice: a context cut from the left flags its item too.
    items = [Item("word " * (limit + 50) + "Answer:", ("yes", "no"), 0), Item("Pick:", ("yes", "no"), 1)]
    assert [r.truncated for r in ev.score_multiple_choice(lm.model, lm.tokenizer, items)] == [True, False]
