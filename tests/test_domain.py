"""Pure domain logic: dataset loading and validation, candidate resolution, the recommendation."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from quantselect.domain.candidates import (
    BASELINE, Candidate, Int4WeightOnly, LowBitWeightOnly, config_from_dict, resolve_candidates,
)
from quantselect.domain.dataset import GENERATION, MULTIPLE_CHOICE, FieldMapping, load_dataset, parse_records
from quantselect.domain.results import FAILED, SUCCEEDED, CandidateResult, cost_per_1m_tokens, validate_threshold
from quantselect.domain.selection import recommend
from quantselect.errors import InputError
from tests.fixtures.common import EXAMPLES, SHARED


def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_canonical_multiple_choice_and_generation(tmp_path):
    mc = load_dataset(EXAMPLES / "piqa-300.jsonl")
    assert mc.kind == MULTIPLE_CHOICE and len(mc) == 300 and mc.metric == "accuracy"
    gen = load_dataset(EXAMPLES / "gsm8k-50.jsonl")
    assert gen.kind == GENERATION and gen.metric == "exact_match" and gen.items[0].category == "math"
    assert load_dataset(EXAMPLES / "gsm8k-50.jsonl", metric="final_number").metric == "final_number"


def test_piqa_through_field_mapping_matches_the_converted_example():
    mapping = FieldMapping.parse(["prompt=Question: {goal}\\nAnswer:", "choices=sol1,sol2"],
                                 labels_file=str(SHARED / "datasets/piqa/valid-labels.lst"))
    raw = load_dataset(SHARED / "datasets/piqa/valid.jsonl", mapping, limit=300)
    assert raw.items == load_dataset(EXAMPLES / "piqa-300.jsonl").items


def test_gsm8k_through_field_mapping_uses_final_number():
    mapping = FieldMapping.parse(["prompt=question", "reference=answer"])
    ds = load_dataset(SHARED / "datasets/gsm8k/test.jsonl", mapping, limit=5)
    assert ds.kind == GENERATION and ds.metric == "final_number" and "####" in ds.items[0].reference


def test_a_text_corpus_through_field_mapping(tmp_path):
    """A corpus whose text sits under another name, or a text corpus with a mapped category, stays a
    corpus (scored on its own tokens, nothing generated) instead of failing for want of a prompt."""
    p = tmp_path / "wiki.jsonl"
    p.write_text('{"content": "The cat sat on the mat.", "topic": "pets"}\n'
                 '{"content": "Rain fell all night.", "topic": "weather"}\n')
    ds = load_dataset(p, FieldMapping.parse(["text=content", "category=topic"]))
    assert [i.prompt for i in ds.items] == ["The cat sat on the mat.", "Rain fell all night."]
    assert [i.category for i in ds.items] == ["pets", "weather"] and ds.max_new_tokens == 0
    q = tmp_path / "texts.jsonl"
    q.write_text('{"text": "The cat sat on the mat.", "topic": "pets"}\n')
    ds = load_dataset(q, FieldMapping.parse(["category=topic"]))
    assert ds.items[0].prompt == "The cat sat on the mat." and ds.max_new_tokens == 0
    with pytest.raises(InputError, match="give one of prompt=, text= or messages="):
        FieldMapping.parse(["text=content", "prompt=content"]).apply({"content": "x"}, "d.jsonl:1")
    with pytest.raises(InputError, match=r"wiki.jsonl:1: missing field 'body'"):
        load_dataset(p, FieldMapping.parse(["text=body"]))


def test_csv_is_accepted(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('prompt,choices,answer\nSky is,"[""blue"", ""green""]",0\n')
    ds = load_dataset(p)
    assert ds.items[0].choices == ("blue", "green") and ds.items[0].answer == 0


def test_parquet_and_json_arrays_are_accepted(tmp_path):
    """Parquet is how Hugging Face stores datasets: list columns and null cells load as in JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (EXAMPLES / "piqa-300.jsonl").read_text().splitlines()[:5]]
    rows[1]["category"] = None  # a null cell: a missing field
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "piqa.parquet")
    ds = load_dataset(tmp_path / "piqa.parquet", limit=4)
    want = load_dataset(EXAMPLES / "piqa-300.jsonl", limit=4)
    assert ds.items[1].category is None and ds.items[0].category == want.items[0].category
    assert [(it.prompt, it.choices, it.answer) for it in ds.items] == [(it.prompt, it.choices, it.answer)
                                                                        for it in want.items]
    chats = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "chat.parquet")
    assert load_dataset(tmp_path / "chat.parquet").items[0].reference == "Hello"
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="bad.parquet: not a readable Parquet file"):
        load_dataset(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "choices": ["x", "y"], "answer": 5}]), tmp_path / "oob.parquet")
    with pytest.raises(InputError, match=r"oob.parquet\[0\]: field 'answer' is 5, out of range"):
        load_dataset(tmp_path / "oob.parquet")
    # A .json file holding one array of items.
    (tmp_path / "items.json").write_text(json.dumps(rows[:3], indent=2))
    assert [it.prompt for it in load_dataset(tmp_path / "items.json").items] == [r["prompt"] for r in rows[:3]]
    (tmp_path / "broken.json").write_text('[{"prompt": "a"},\n {"prompt": ]')
    with pytest.raises(InputError, match="broken.json:2: malformed JSON"):
        load_dataset(tmp_path / "broken.json")


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a", "choices": ["x", "y"], "answer": 0}', '{"prompt": "b", "choices": '], "d.jsonl:2: malformed JSON"),
        (['{"prompt": "a", "choices": ["x", "y"], "answer": 2}'], "d.jsonl:1: field 'answer' is 2, out of range"),
        (['{"prompt": "a", "choices": ["x", ""], "answer": 0}'], "d.jsonl:1: field 'choices' has an empty"),
        (['{"prompt": "", "reference": "x"}'], "d.jsonl:1: field 'prompt'"),
        (['{"prompt": "a", "answer": 0}'], "d.jsonl:1: an item with an 'answer' needs 'choices'"),
        ([""], "the dataset is empty"),
        (['{"prompt": "a", "reference": "1"}', '{"prompt": "a", "choices": ["x", "y"], "answer": 0}'], "d.jsonl:2: a multiple_choice item"),
    ],
)
def test_bad_datasets_name_file_line_and_field(tmp_path, lines, message):
    p = write(tmp_path, "d.jsonl", lines)
    with pytest.raises(InputError) as e:
        load_dataset(p)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_bad_utf8(tmp_path):
    with pytest.raises(InputError, match="dataset file not found"):
        load_dataset(tmp_path / "nope.jsonl")
    p = tmp_path / "b.jsonl"
    p.write_bytes(b'{"prompt": "a", "reference": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(InputError, match=r"b.jsonl:2: not valid UTF-8"):
        load_dataset(p)


def test_metric_must_fit_the_dataset():
    with pytest.raises(InputError, match="does not fit a multiple-choice"):
        parse_records([{"prompt": "a", "choices": ["x", "y"], "answer": 0}], metric="exact_match")


def test_bad_mapping_option():
    with pytest.raises(InputError, match="--map 'question'"):
        FieldMapping.parse(["question"])


def test_candidates_resolution_and_serialization():
    cands = resolve_candidates(["int8", "bf16", "int8"])
    assert [c.name for c in cands] == [BASELINE, "int8", "bf16"]  # baseline always first, no duplicates
    with pytest.raises(InputError, match="unknown candidate 'int5'"):
        resolve_candidates(["int5"])
    with pytest.raises(InputError, match="bits 5 must be one of 2, 3"):
        LowBitWeightOnly(bits=5)
    c = Candidate("int4", Int4WeightOnly(group_size=64))
    assert Candidate.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(InputError, match="unknown candidate config type"):
        config_from_dict({"_type": "os.system", "_version": 1, "_data": {}})
    with pytest.raises(InputError, match="group_size 0"):
        Int4WeightOnly(group_size=0)


def test_a_half_precision_candidate_stored_at_float32_reads_back_as_the_full_precision_it_was():
    # before half precision took only bfloat16/float16, a job could store dtype=float32: it must still load
    from quantselect.domain.candidates import FullPrecision, HalfPrecision

    old = {"_type": "half_precision", "_version": 1, "_data": {"dtype": "float32", "kv_cache": "fp8"}}
    assert config_from_dict(old) == FullPrecision(kv_cache="fp8")
    assert config_from_dict(HalfPrecision("float16").to_dict()) == HalfPrecision("float16")
    for dtype in ("float64", "double", "torch.float32", "FP32"):  # any torch dtype was taken then
        assert config_from_dict({"_type": "half_precision", "_version": 1, "_data": {"dtype": dtype}}) == FullPrecision()
    for dtype, read in (("BF16", "bfloat16"), ("torch.float16", "float16"), ("half", "float16")):
        assert config_from_dict({"_type": "half_precision", "_version": 1, "_data": {"dtype": dtype}}) == HalfPrecision(read)


@pytest.mark.parametrize("t", [0, -0.1, 1.51])
def test_threshold_range(t):
    with pytest.raises(InputError, match="must be in"):
        validate_threshold(t)


def result(name, score, tps, mem=100, status=SUCCEEDED, error=None):
    return CandidateResult(name=name, config={}, status=status, score=score, tokens_per_second=tps,
                           peak_memory_bytes=mem, error=error)


def test_recommendation_picks_cheapest_passing_and_explains_the_rest():
    results = [
        result(BASELINE, 0.80, 100, mem=400),
        result("bf16", 0.80, 150, mem=200),
        result("int8", 0.79, 200, mem=150),  # 0.9875 relative: passes 0.98
        result("int4", 0.70, 300, mem=100),  # fails quality
        result("w8a8", None, None, status=FAILED, error="out of memory"),
    ]
    rec = recommend(results, 0.98, 2.0)
    assert rec.chosen == "int8"
    assert "below the threshold" in rec.verdict("int4").reason
    assert "out of memory" in rec.verdict("w8a8").reason
    assert "costs" in rec.verdict("bf16").reason
    # Recomputed for another threshold from the same results: nothing re-evaluated.
    assert recommend(results, 0.85, 2.0).chosen == "int4"
    assert recommend(results, 1.01, 2.0).chosen is None


def test_ties_on_cost_break_on_memory_and_failed_baseline_gives_no_pick():
    results = [result(BASELINE, 0.5, 100, mem=400), result("a", 0.5, 100, mem=300), result("b", 0.5, 100, mem=200)]
    assert recommend(results, 0.98, 1.0).chosen == "b"
    failed = [result(BASELINE, None, None, status=FAILED, error="boom"), result("a", 0.5, 100)]
    rec = recommend(failed, 0.98, 1.0)
    assert rec.chosen is None and "baseline" in rec.message


def test_cost_per_million_tokens():
    assert cost_per_1m_tokens(3.6, 1000) == pytest.approx(1.0)
    assert cost_per_1m_tokens(3.6, None) is None


def test_a_jobs_end_in_one_line_for_a_chat_channel():
    from quantselect.domain.results import Job, end_notice

    from datetime import datetime

    job = Job(id="abc", status="succeeded", model="llama", model_path="/m", dataset_source="tasks.jsonl",
              dataset_kind="multiple_choice", created_at=datetime(2026, 12, 7), updated_at=datetime(2026, 12, 7),
              metric="accuracy", n_items=10, threshold=0.98, gpu_hour_usd=3.0, deploy=False, candidate_names=[],
              recommended={"candidate": "int4", "threshold": 0.98, "relative_score": 0.9912, "cost_per_1m_tokens_usd": 0.04213})
    assert end_notice(job) == ("quantselect job abc (llama on tasks.jsonl) succeeded: int4 recommended, 99.1% of the "
                               "baseline's quality, $0.04213 per 1M tokens")
    none = {"candidate": None, "threshold": 0.98, "relative_score": None, "cost_per_1m_tokens_usd": None}
    assert end_notice(replace(job, recommended=none, base_url="http://h:8000/models/x/v1")) == (
        "quantselect job abc (llama on tasks.jsonl) succeeded: no candidate keeps 98% of the baseline's quality; "
        "served at http://h:8000/models/x/v1")
    assert end_notice(replace(job, status="cancelled", error="cancelled by request")).endswith(") cancelled: cancelled by request")


def test_csv_multiline_cells_crlf_and_line_numbers(tmp_path):
    """A quoted cell keeps its line breaks (CRLF too); errors name the line the row starts on."""
    p = tmp_path / "d.csv"
    p.write_bytes(b'prompt,reference\r\n"Line one\r\nline two",x\r\n\r\nb,c\r\n"multi\nline",\r\n')
    with pytest.raises(InputError, match=r"d.csv:6: field 'reference' must be a non-empty string"):
        load_dataset(p)
    ds = load_dataset(p, limit=2)
    assert [(i.prompt, i.reference) for i in ds.items] == [("Line one\r\nline two", "x"), ("b", "c")]


def test_csv_rows_must_have_the_headers_fields(tmp_path):
    """An unquoted comma would shift every later column; a short row would leave a column unset."""
    p = tmp_path / "d.csv"
    p.write_text('prompt,reference\nWhat is 1,5?,1.5\n')
    with pytest.raises(InputError, match=r"d.csv:2: 3 fields where the header has 2; quote cells that contain commas"):
        load_dataset(p)
    p.write_text('prompt,choices,answer\nSky is,"[""blue"", ""green""]"\n')
    with pytest.raises(InputError, match=r"d.csv:2: 2 fields where the header has 3; no 'answer'"):
        load_dataset(p)


def test_a_byte_order_mark_is_ignored(tmp_path):
    """Excel's "CSV UTF-8" and some editors start the file with a BOM."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "d.csv").write_bytes(bom + b"prompt,reference\nSky is,blue\n")
    (tmp_path / "d.jsonl").write_bytes(bom + b'{"prompt": "Sky is", "reference": "blue"}\n')
    (tmp_path / "d.json").write_bytes(bom + b'[{"prompt": "Sky is", "reference": "blue"}]')
    for name in ("d.csv", "d.jsonl", "d.json"):
        assert load_dataset(tmp_path / name).items[0].reference == "blue"
    (tmp_path / "b.jsonl").write_bytes(bom + b'{"prompt": "a", "reference": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(InputError, match=r"b.jsonl:2: not valid UTF-8"):
        load_dataset(tmp_path / "b.jsonl")
    from quantselect.domain.dataset import load_calibration_file

    (tmp_path / "c.txt").write_bytes(bom + "Hello there\n".encode())
    assert load_calibration_file(tmp_path / "c.txt") == ["Hello there"]


def test_jsonl_lines_split_only_at_newlines(tmp_path):
    """U+2028, U+2029 and U+0085 are legal raw inside a JSON string; str.splitlines splits at them."""
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a\u2028b\u0085c", "reference": "x\u2029y"}\r\n{"prompt": "d", "reference": "e"}\n',
                 encoding="utf-8")
    ds = load_dataset(p)
    assert [(i.prompt, i.reference) for i in ds.items] == [("a\u2028b\u0085c", "x\u2029y"), ("d", "e")]
    from quantselect.domain.dataset import load_calibration_file

    (tmp_path / "c.txt").write_text("one\u2028still one\ntwo\n", encoding="utf-8")
    assert load_calibration_file(tmp_path / "c.txt") == ["one\u2028still one", "two"]


def test_map_prompt_keeps_non_ascii_and_rejects_a_stray_backslash():
    assert FieldMapping.parse(["prompt=Frage: {q}\\nAntwort (é, 中文):"]).prompt == "Frage: {q}\nAntwort (é, 中文):"
    with pytest.raises(InputError, match=r"--map 'prompt=\{q\}\\\\': \\ at end of string; write a backslash as"):
        FieldMapping.parse(["prompt={q}\\"])


@pytest.mark.parametrize("template", ["{q} }", "{}", "{0}", "{q.x}", "{q:d}"])
def test_a_broken_prompt_template_names_file_line_and_template(tmp_path, template):
    p = write(tmp_path, "d.jsonl", ['{"q": "a", "reference": "x"}'])
    with pytest.raises(InputError) as e:
        load_dataset(p, FieldMapping.parse([f"prompt={template}"]))
    assert f"d.jsonl:1: prompt template {template!r} cannot be filled" in str(e.value)


@pytest.mark.parametrize("answer", ["--1", "²", "1.0"])
def test_a_non_integer_answer_string_is_an_input_error(answer):
    with pytest.raises(InputError, match=r"items\[0\]: field 'answer' must be the integer index"):
        parse_records([{"prompt": "a", "choices": ["x", "y"], "answer": answer}])
    assert parse_records([{"prompt": "a", "choices": ["x", "y"], "answer": " 1 "}]).items[0].answer == 1


@pytest.mark.parametrize("text, number", [
    ("-3", "-3"), (" -3", "-3"), ("####-5", "-5"), ("#### -5", "-5"), ("x = .5", "0.5"), ("-.25", "-0.25"),
    ("5-3", "3"), ("a-3", "3"), ("f(2)-1", "1"), ("#### 1,234", "1234"), ("costs 0.5.", "0.5"),
    ("No.5", "5"), ("pages 1..5", "5"), ("v1.2.3", "3"),  # a point after a word or a point is no decimal's
])
def test_final_number_signs_and_leading_point(text, number):
    from decimal import Decimal

    from quantselect.domain.dataset import final_number

    assert final_number(text) == Decimal(number)


def test_final_number_match_keeps_a_leading_minus():
    from quantselect.domain.dataset import final_number_match

    assert final_number_match("The answer is -3", "-3") and not final_number_match("3", "-3")
    assert not final_number_match("5", "####-5") and final_number_match("#### -5", "####-5")
