"""Task data as conversations (OpenAI ``messages``, ShareGPT ``conversations``): parsing and its
one-line errors, the default metric, rendering through the real SmolLM2 chat template, label-free
scoring of conversations, and GPTQ calibrated on conversations rendered as the model sees them."""

from __future__ import annotations

import json

import pytest

from quantselect.domain.candidates import CATALOG, parse_candidate
from quantselect.domain.dataset import (
    GENERATION,
    PROMPTS,
    FieldMapping,
    TaskDataset,
    calibration_samples,
    load_dataset,
    parse_records,
)
from quantselect.engines import artifacts
from quantselect.engines import evaluate as ev
from quantselect.engines import labelfree as lf
from quantselect.engines.quantize import calibration_texts, load_candidate
from quantselect.errors import InputError
from quantselect.service import Service, SubmitRequest
from tests.fixtures.common import EXAMPLES

SYSTEM = {"role": "system", "content": "You answer in one word."}
ASK = {"role": "user", "content": "What is the capital of France?"}


def write(tmp_path, records, name="chat.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return p


@pytest.fixture(scope="module")
def smol(demo_model_dir):
    return load_candidate(str(demo_model_dir), CATALOG["baseline"], "cpu")


def test_conversations_load_in_openai_and_sharegpt_form(tmp_path):
    p = write(tmp_path, [
        {"messages": [SYSTEM, ASK, {"role": "assistant", "content": "Paris"}], "category": "geo"},
        {"conversations": [{"from": "human", "value": "2 + 2?"}, {"from": "gpt", "value": "4"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Capital of "},
                                                   {"type": "text", "text": "Italy?"}]}], "reference": "Rome"},
    ])
    ds = load_dataset(p)
    assert (ds.kind, ds.metric, ds.chat_template, len(ds)) == (GENERATION, "exact_match", True, 3)
    first, second, third = ds.items
    assert first.messages == (("system", "You answer in one word."), ("user", "What is the capital of France?"))
    assert (first.reference, first.category) == ("Paris", "geo")  # the trailing assistant turn is the reference
    assert first.prompt == "system: You answer in one word.\n\nuser: What is the capital of France?"
    assert second.messages == (("user", "2 + 2?"),) and second.reference == "4"
    assert third.messages == (("user", "Capital of Italy?"),) and third.reference == "Rome"
    # Stored and read back whole (the job row holds the dataset as JSON).
    back = TaskDataset.from_dict(json.loads(json.dumps(ds.to_dict())))
    assert back == ds and "prompt" not in ds.to_dict()["items"][0]
    developer = parse_records([{"messages": [{"role": "developer", "content": "Be brief."}, ASK]}])
    assert developer.items[0].messages[0] == ("system", "Be brief.")  # OpenAI's newer name for it
    # No reply: a prompts item, scored against the baseline.
    prompts = parse_records([{"messages": [SYSTEM, ASK]}])
    assert (prompts.kind, prompts.metric, prompts.chat_template) == (PROMPTS, "top1_agreement", True)
    # In a CSV cell, as JSON.
    csv_file = tmp_path / "chat.csv"
    csv_file.write_text('messages,category\n"[{""role"": ""user"", ""content"": ""Hi""}]",greeting\n')
    assert load_dataset(csv_file).items[0].messages == (("user", "Hi"),)
    # Another field name through --map.
    mapped = write(tmp_path, [{"dialog": [ASK, {"role": "assistant", "content": "Paris"}]}], "mapped.jsonl")
    ds = load_dataset(mapped, FieldMapping.parse(["messages=dialog"]))
    assert ds.items[0].messages == (("user", ASK["content"]),) and ds.items[0].reference == "Paris"
    # ShareGPT with another field mapped (here the category).
    share = write(tmp_path, [{"conversations": [{"from": "human", "value": "Hi"}], "topic": "greeting"}], "share.jsonl")
    ds = load_dataset(share, FieldMapping.parse(["category=topic"]))
    assert ds.items[0].messages == (("user", "Hi"),) and ds.items[0].category == "greeting"


def test_the_default_metric_of_conversations_follows_their_replies():
    short = [{"messages": [ASK, {"role": "assistant", "content": "Paris"}]}]
    long = [{"messages": [ASK, {"role": "assistant", "content": "The capital of France is Paris, of course."}]}]
    gsm = [{"messages": [ASK, {"role": "assistant", "content": "2 + 2 = 4\n#### 4"}]}]
    assert parse_records(short).metric == "exact_match"
    # A long reply in a chat log is a sample, not the one right answer: scored against the baseline.
    assert parse_records(short + long).metric == "top1_agreement"
    assert parse_records(gsm).metric == "final_number"
    example = load_dataset(EXAMPLES / "gsm8k-chat-50.jsonl")  # GSM8K's worked answers as the assistant's turns
    assert (example.kind, example.metric, len(example), example.chat_template) == (GENERATION, "final_number", 50, True)
    assert parse_records(short + long, metric="substring").metric == "substring"  # asked for: kept
    # Prompts with long references keep exact_match: the rule is for conversations only.
    assert parse_records([{"prompt": "q", "reference": "a long reference of many many words"}]).metric == "exact_match"


@pytest.mark.parametrize("record,message", [
    ({"messages": []}, r"chat.jsonl:2: field 'messages' must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"chat.jsonl:2: messages\[0\]: role 'robot' must be one of"),
    ({"messages": [{"role": "user", "content": "  "}]}, r"chat.jsonl:2: messages\[0\]: 'content' must be a non-empty"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     r"chat.jsonl:2: messages\[0\]: only text content parts"),
    ({"messages": [SYSTEM]}, r"chat.jsonl:2: field 'messages' must end with a user message"),
    ({"messages": [ASK, {"role": "assistant", "content": "Paris"}], "reference": "Paris"},
     r"chat.jsonl:2: the answer is the last assistant message or 'reference', not both"),
    ({"messages": [ASK], "prompt": "x"}, r"chat.jsonl:2: give 'prompt' or 'messages', not both"),
    ({"messages": [ASK], "choices": ["a", "b"], "answer": 0}, r"chat.jsonl:2: a conversation item"),
    ({"prompt": "plain", "reference": "x"}, r"chat.jsonl:2: a prompt item in a dataset of conversations"),
])
def test_a_bad_conversation_is_one_line_naming_file_line_and_field(tmp_path, record, message):
    good = {"messages": [ASK, {"role": "assistant", "content": "Paris"}]}
    with pytest.raises(InputError, match=message):
        load_dataset(write(tmp_path, [good, record]))


def test_conversations_are_rendered_through_the_chat_template(smol, tiny_llama):
    from transformers import AutoTokenizer

    turns = [SYSTEM, {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}, ASK]
    ds = parse_records([{"messages": turns, "reference": "Paris"}], metric="substring", max_new_tokens=16)
    [ids], [cut] = ev.encode_prompts(smol.model, smol.tokenizer, ds)
    want = smol.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert ids == smol.tokenizer(want, add_special_tokens=False)["input_ids"] and not cut
    text = smol.tokenizer.decode(ids)
    assert "You answer in one word." in text and "Blue." in text and text.endswith("<|im_start|>assistant\n")
    [result] = ev.evaluate(smol.model, smol.tokenizer, ds)
    assert result.correct and "Paris" in result.prediction  # the instruct model answers the last turn
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    tok.chat_template = None
    with pytest.raises(InputError, match="conversations .* no chat template"):
        ev.encode_prompts(smol.model, tok, ds)


def test_a_conversation_dataset_needs_a_model_with_a_chat_template(tiny_llama, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in tiny_llama.iterdir():
        if f.is_file():
            (plain / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    for name in ("chat_template.jinja", "chat_template.json"):
        (plain / name).unlink(missing_ok=True)
    items = [{"messages": [ASK, {"role": "assistant", "content": "Paris"}]}] * 30
    with pytest.raises(InputError, match="no chat template to render the dataset's conversations"):
        Service().build_spec(SubmitRequest(model=str(plain), items=items, candidates=["int8"]))
    assert Service().build_spec(SubmitRequest(model=str(tiny_llama), items=items, candidates=["int8"])).dataset.chat_template


def test_conversations_score_label_free_against_the_baseline(smol):
    ds = parse_records([{"messages": [SYSTEM, ASK]}, {"messages": [{"role": "user", "content": "Say hello."}]}],
                       max_new_tokens=8)
    reference = lf.build_reference(smol.model, smol.tokenizer, ds)
    results = ev.evaluate(smol.model, smol.tokenizer, ds, reference=reference)
    assert [r.score for r in results] == [1.0, 1.0]
    # The reference is tied to the conversation, not to its flattened text: plain prompts of the same
    # text (in the chat template, as one user turn) are other items, and are refused.
    other = parse_records([{"prompt": it.prompt} for it in ds.items], max_new_tokens=8, chat_template=True)
    assert [it.prompt for it in other.items] == [it.prompt for it in ds.items]
    with pytest.raises(ValueError, match="the reference was built for another prompt"):
        ev.evaluate(smol.model, smol.tokenizer, other, reference=reference)


def test_gptq_calibrates_on_conversations_rendered_as_the_model_sees_them(tiny_llama, tmp_path):
    import torch

    ds = parse_records([{"messages": [SYSTEM, {"role": "user", "content": f"What is {i} + {i}?"},
                                      {"role": "assistant", "content": str(2 * i)}]} for i in range(8)])
    samples = calibration_samples(ds.items)
    assert samples[0] == [SYSTEM, {"role": "user", "content": "What is 0 + 0?"}, {"role": "assistant", "content": "0"}]
    # --chat-template on plain prompts calibrates through the template too; without it, plain text.
    prompt_items = parse_records([{"prompt": "Hi", "reference": "Hello"}]).items
    assert calibration_samples(prompt_items, chat_template=True) == [[{"role": "user", "content": "Hi"},
                                                                    {"role": "assistant", "content": "Hello"}]]
    assert calibration_samples(prompt_items) == ["Hi Hello"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    rendered = calibration_texts(tok, samples)
    assert rendered[0] == tok.apply_chat_template(samples[0], tokenize=False) and "What is 0 + 0?" in rendered[0]
    # Quantizing on the conversations equals quantizing on their rendered text, and not on the raw
    # flattening: the worker renders them through the template.
    config = parse_candidate("int4-gptq:group_size=32").config
    probe = torch.arange(1, 33).unsqueeze(0)

    def logits(calibration):
        lm = load_candidate(str(tiny_llama), config, "cpu", calibration=calibration)
        with torch.inference_mode():
            return lm.model(probe).logits.float()

    assert torch.equal(logits(samples), logits(rendered))
    assert not torch.equal(logits(samples), logits([f"{it.prompt} {it.reference}" for it in ds.items]))
    # The artifact key: conversations hash as JSON; text samples keep the keys they always had.
    import hashlib

    assert artifacts._calibration_digest(["a", "b"]) == hashlib.sha256(b"a\x00b").hexdigest()
    assert artifacts.key(tiny_llama, config, samples, "cpu") != artifacts.key(tiny_llama, config, rendered, "cpu")
