"""Task data and model configs a user gets slightly wrong: a stray quote in a CSV, a labels file with
a line too many, one GSM8K answer line mistyped, a number or a nesting too big for Python's parser, a
config.json field of the wrong type, a Hub dataset while the Hub is out of reach. Each is a one-line
input error naming the file, the line and the field -- never a silently wrong dataset, an internal
error, or half a minute of retries. Real files, the real loader and CLI (no Ray)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantselect.cli import cli
from quantselect.domain.dataset import FieldMapping, load_calibration_file, load_dataset
from quantselect.errors import InputError

TINY_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128, "vocab_size": 100}


def _error(call, *args, **kwargs) -> str:
    with pytest.raises(InputError) as e:
        call(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def _csv(tmp_path: Path, rows: list[str], name: str = "d.csv") -> Path:
    p = tmp_path / name
    p.write_text("prompt,reference\n" + "".join(f"{r}\n" for r in rows))
    return p


# ---- 1. CSV: a stray quote, a long cell ------------------------------------------------------------

def test_a_stray_quote_in_a_csv_is_an_error_not_two_rows_merged(tmp_path):
    rows = [f'"Q{i}",{i}' for i in range(41)]
    rows[10] = '"unterminated,5'  # line 12: the lenient reader ran on to the next quote, one item fewer
    p = _csv(tmp_path, rows)
    assert _error(load_dataset, p) == (f"{p}:12: malformed CSV (',' expected after '\"' on line 13); a cell that "
                                       'starts with a quote ends with one, and a quote inside it is doubled ("")')
    rows = [f"Q{i},{i}" for i in range(30)] + ['"Q unterminated,5']  # at the end of the file
    assert _error(load_dataset, _csv(tmp_path, rows)).startswith(f"{p}:32: malformed CSV (unexpected end of data)")
    # a quote inside an unquoted cell, and a doubled one inside a quoted cell, are what CSV allows
    ds = load_dataset(_csv(tmp_path, ['a 5" screen,1', '"say ""hi"", then go",2']))
    assert [i.prompt for i in ds.items] == ['a 5" screen', 'say "hi", then go']


def test_a_csv_cell_may_hold_a_long_document(tmp_path):
    long = "word " * 60_000  # 300,000 characters: over the csv module's default limit of 131,072
    ds = load_dataset(_csv(tmp_path, [f'"{long}",1', "Q,2"]))
    assert len(ds) == 2 and ds.items[0].prompt == long


# ---- 2. a labels file with more (or fewer) lines than the dataset has items -------------------------

def test_a_labels_file_must_have_one_label_per_item(tmp_path):
    data = tmp_path / "valid.jsonl"
    data.write_text("".join(json.dumps({"goal": f"g{i}", "sol1": "a", "sol2": "b"}) + "\n" for i in range(10)))
    labels = tmp_path / "labels.lst"

    def load(lines: list[str], **kw):
        labels.write_text("".join(f"{x}\n" for x in lines))
        return load_dataset(data, FieldMapping.parse(["prompt=goal", "choices=sol1,sol2"], str(labels)), **kw)

    good = [str(i % 2) for i in range(10)]
    assert [i.answer for i in load(good, limit=4).items] == [0, 1, 0, 1]
    # a line added (a label shifted onto every later item), the file doubled, a line left out; a
    # limit cuts the items after the labels are matched with all of them
    for lines in (good[:3] + ["1"] + good[3:], good + good, good[:9]):
        for limit in (None, 4):
            assert _error(load, lines, limit=limit) == (
                f"{labels}: {len(lines)} labels for 10 items: one label per line, in the dataset's order")
    assert _error(load, good[:4] + ["9" * 5000] + good[5:]) == (
        f"{labels}:5: label '{'9' * 40}' is not an integer (a choice's index)")


# ---- 3. GSM8K: one answer line mistyped -------------------------------------------------------------

def test_one_mistyped_gsm8k_answer_line_is_an_error_not_another_metric(tmp_path):
    items = [{"question": f"q{i}", "answer": f"2 + {i} = {2 + i}\n#### {2 + i}"} for i in range(10)]
    items[6]["answer"] = "2 + 6 = 8\n### 8"
    p = tmp_path / "gsm8k.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in items))
    mapping = FieldMapping.parse(["prompt=question", "reference=answer"])
    assert _error(load_dataset, p, mapping) == (
        f"{p}:7: reference ending '2 + 6 = 8\\n### 8' has no '####' answer line, which 9 of 10 references have; "
        "fix it, or choose the scoring with --metric")
    assert load_dataset(p, mapping, metric="final_number").metric == "final_number"  # said: scored so
    items[6]["answer"] += "\n#### 8"
    p.write_text("".join(json.dumps(x) + "\n" for x in items))
    assert load_dataset(p, mapping).metric == "final_number"
    # references that mostly lack it are short answers, as before: exact match
    p.write_text("".join(json.dumps({"question": f"q{i}", "answer": "#### 1" if i < 3 else "Paris"}) + "\n"
                         for i in range(10)))
    assert load_dataset(p, mapping).metric == "exact_match"


# ---- 4. numbers and nesting too big for Python's parser; config.json fields of the wrong type -------

def test_a_huge_integer_or_a_deep_nesting_names_the_file_line_and_field(tmp_path):
    item = {"prompt": "q", "choices": ["a", "b"], "answer": 0}
    huge = "7" * 5000  # int() refuses over 4300 digits (sys.get_int_max_str_digits)
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(item) + "\n" + json.dumps(item).replace('"answer": 0', f'"answer": {huge}') + "\n")
    assert _error(load_dataset, p) == (
        f"{p}:2: field 'answer' holds a number of 5000 digits, more than the 4300 that can be read; quote it if it is text")
    arr = tmp_path / "d.json"
    arr.write_text("[\n" + json.dumps(item) + ",\n" + json.dumps(item).replace('"answer": 0', f'"answer": {huge}') + "\n]")
    assert _error(load_dataset, arr).startswith(f"{arr}:3: field 'answer' holds a number of 5000 digits")
    c = tmp_path / "d.csv"
    c.write_text(f"prompt,choices,answer\nq,\"[\"\"a\"\", \"\"b\"\"]\",{huge}\n")
    assert _error(load_dataset, c) == f"{c}:2: field 'answer' must be the integer index of the right choice"
    deep = tmp_path / "deep.jsonl"
    deep.write_text(json.dumps(item) + "\n" + '{"prompt": "q", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    assert _error(load_dataset, deep).startswith(f"{deep}:2: JSON nested too deeply to read")


def _model_folder(where: Path, **config) -> Path:
    """A model folder check_model accepts, its config.json changed by ``config``."""
    import numpy as np
    from safetensors.numpy import save_file

    where.mkdir()
    (where / "config.json").write_text(json.dumps({**TINY_CONFIG, **config}))
    (where / "tokenizer.json").write_text('{"version": "1.0"}')
    save_file({"lm_head.weight": np.zeros((100, 64), dtype=np.float32)}, str(where / "model.safetensors"))
    return where


@pytest.mark.parametrize("config, says", [
    ({"model_type": ["llama"]}, "field 'model_type' must be a string, such as \"llama\""),
    ({"model_type": {"a": 1}}, "field 'model_type' must be a string, such as \"llama\""),
    ({"architectures": "LlamaForCausalLM"}, "field 'architectures' must be a list of class names"),
    ({"text_config": [1]}, "field 'text_config' is not a JSON object"),
    ({"text_config": None}, "field 'text_config' is not a JSON object"),
])
def test_a_config_field_of_the_wrong_type_is_one_line_at_submit_and_in_plan(tmp_path, config, says):
    from quantselect.domain.planner import shape_from_config
    from quantselect.engines.models import check_model

    model = _model_folder(tmp_path / "m", **config)
    said = _error(check_model, str(model))
    assert said.startswith(f"{model}/config.json: {says}"), said
    data = _csv(tmp_path, [f"Q{i},{i}" for i in range(30)])
    res = CliRunner().invoke(cli, ["submit", str(model), str(data), "--dry-run"])
    assert res.exit_code == 2 and res.output == f"Error: {said}\n", res.output
    if "model_type" in config:  # the planner reads the rest (a list is no key of its tables)
        assert _error(shape_from_config, {**TINY_CONFIG, **config}, "c.json") == f"c.json: {says}"
        res = CliRunner().invoke(cli, ["plan", str(model)])
        assert res.exit_code == 2 and res.output == f"Error: {model}/config.json: {says}\n", res.output
    assert check_model(str(_model_folder(tmp_path / "good")))  # the same folder, well typed


def test_a_model_config_that_is_not_json_says_so(tmp_path):
    from quantselect.engines.models import check_model

    model = _model_folder(tmp_path / "m")
    (model / "config.json").write_text('{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert _error(check_model, str(model)).startswith(f"{model}/config.json: not a readable JSON config")
    (model / "config.json").write_text("[1, 2]")
    assert _error(check_model, str(model)) == f"{model}/config.json: not a JSON object"


# ---- 6. a Hub dataset while the Hub is out of reach or down -----------------------------------------

def test_a_hub_dataset_out_of_reach_fails_in_one_line_at_once(fake_hub, monkeypatch, tmp_path, caplog):
    """hf_hub_download retries a Hub out of reach 5 times (~25 s, a warning each) before saying so;
    asked once first, the cache or the error answers at once."""
    from huggingface_hub import constants

    from quantselect.engines.models import hub_data_file
    from tests.fixtures.common import put_in_hub_cache

    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "d.jsonl").write_text('{"prompt": "q"}\n')
    cached = put_in_hub_cache(tmp_path / "here", "acme/cached", repo_type="dataset")
    fake_hub.down(503)  # the Hub answers that it cannot answer now
    assert hub_data_file("hf://datasets/acme/cached/d.jsonl") == cached / "d.jsonl"
    started = time.monotonic()
    assert _error(hub_data_file, "hf://datasets/acme/gone/d.jsonl").startswith(
        "hf://datasets/acme/gone/d.jsonl: downloading it from the Hugging Face Hub failed: Server error '503")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    caplog.set_level(logging.INFO, logger="huggingface_hub")
    assert hub_data_file("hf://datasets/acme/cached/d.jsonl") == cached / "d.jsonl"
    assert _error(hub_data_file, "hf://datasets/acme/gone/d.jsonl") == (
        "hf://datasets/acme/gone/d.jsonl: not here, and the Hugging Face Hub cannot be reached to download it: "
        "ConnectError: [Errno 111] Connection refused; download it where the Hub can be reached (the cache is "
        "HF_HUB_CACHE), or give a file")
    assert time.monotonic() - started < 10  # the client's retries: 1 + 2 + 4 + 8 + 8 s of sleep each
    assert not [r.message for r in caplog.records if "Retrying" in r.message]


# ---- 7. messages: malformed JSON, a .json file holding one object, a URL ----------------------------

def test_what_is_not_a_dataset_file_is_said_as_such(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "q", "reference": "a"}\n{"prompt": "an unterminated string}\n')
    assert _error(load_dataset, p) == f"{p}:2: malformed JSON (Unterminated string starting at column 12)"
    item = {"prompt": "q", "choices": ["a", "b"], "answer": 0}
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"items": [item] * 3}))
    assert _error(load_dataset, obj) == (f"{obj}: one JSON object; expected a JSON array of items (or JSON Lines, an "
                                         "item a line); are the items its 'items'? give that list")
    obj.write_text(json.dumps(item, indent=2))  # one item over several lines
    assert _error(load_dataset, obj).startswith(f"{obj}: one JSON object; expected a JSON array of items")
    obj.write_text(json.dumps(item) + "\n" + json.dumps(item) + "\n")  # JSON Lines named .json: as it was
    assert len(load_dataset(obj)) == 2
    obj.write_text(json.dumps({"prompt": "q", "messages_log": [{"a": 1}], "reference": "x"}))  # one item on one line
    assert len(load_dataset(obj)) == 1
    url = "https://example.com/x.jsonl"
    assert _error(load_dataset, url) == (f"{url}: URLs are not read (dataset): download it, or give a file of a Hub "
                                         "dataset, hf://datasets/OWNER/NAME/PATH")
    assert _error(load_dataset, obj, FieldMapping.parse(["prompt=prompt"], "s3://bucket/labels.lst")).startswith(
        "s3://bucket/labels.lst: URLs are not read (labels)")
    assert _error(load_calibration_file, "http://example.com/c.txt").startswith(
        "http://example.com/c.txt: URLs are not read (calibration)")
    res = CliRunner().invoke(cli, ["submit", "demo", url, "--dry-run"])
    assert res.exit_code == 2 and res.output.startswith(f"Error: {url}: URLs are not read"), res.output


# ---- 8. an over-long model path on a cluster; a checkpoint's config of the wrong types ---------------

def test_an_overlong_model_path_for_a_cluster_is_one_line(tmp_path):
    data = _csv(tmp_path, [f"Q{i},{i}" for i in range(30)])
    long = str(tmp_path / ("z" * 5000))
    res = CliRunner().invoke(cli, ["submit", "--address", "http://127.0.0.1:8265", "--dry-run", long, str(data)])
    assert res.exit_code == 2 and "cannot read it (File name too long)" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and len(res.output) < 400


def test_a_checkpoint_quantization_config_of_the_wrong_types_names_the_field():
    from quantselect.domain.candidates import checkpoint_quantization
    from quantselect.service import _shape, _vocab

    where = "ckpt/config.json"
    for q, says in [([1], "field 'quantization_config' is [1], not a JSON object"),
                    ("gptq", "field 'quantization_config' is 'gptq', not a JSON object"),
                    ({"quant_method": "gptq", "bits": 4, "group_size": "abc"},
                     "field 'quantization_config.group_size' is 'abc', not an integer"),
                    ({"quant_method": "gptq", "bits": "four"}, "field 'quantization_config.bits' is 'four', not an integer"),
                    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": [4]}}},
                     "field 'quantization_config.config_groups.g.weights' is [4], not a JSON object"),
                    ({"quant_method": "torchao", "quant_type": {"default": {"_type": "Int4WeightOnlyConfig",
                                                                            "_data": {"group_size": [64]}}}},
                     "field 'quantization_config.quant_type.default._data.group_size' is [64], not an integer")]:
        assert _error(checkpoint_quantization, {"quantization_config": q}, where) == f"{where}: {says}"
    assert checkpoint_quantization({"quantization_config": {"quant_method": "gptq", "bits": "4", "group_size": "128"}}) \
        == ("gptq", 4, 128)
    assert checkpoint_quantization({"text_config": [1]}) == ("none", 16, 0)
    # the shape compared with the model's: a text_config that is no object is no shape (refused where it is read)
    assert _vocab({"text_config": None}) is None and _shape({"text_config": [1]})["hidden_size"] is None


# ---- 5. a checkpoint folder whose config.json names no model --------------------------------------

@pytest.mark.parametrize("config, says", [
    ({}, "field 'model_type' is missing; is this a Hugging Face model folder?"),
    ({"hidden_size": 576}, "field 'model_type' is missing"),
    ({"model_type": ["llama"]}, "field 'model_type' must be a string"),
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "architecture BertForMaskedLM is not a causal"),
])
def test_a_checkpoint_folder_is_checked_as_the_model_is(tmp_path, config, says):
    """A checkpoint candidate's config.json is checked as the job's model's is, at submit: it was listed
    (method none, 16 bits) and failed only when the job ran."""
    data = _csv(tmp_path, [f"Q{i},{i}" for i in range(30)])
    model = _model_folder(tmp_path / "model")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(config))
    res = CliRunner().invoke(cli, ["submit", str(model), str(data), "--dry-run", "--candidates", f"x={ckpt}"])
    assert res.exit_code == 2 and res.output.startswith(f"Error: candidate x: {ckpt}/config.json: {says}"), res.output
    assert len(res.output.strip().splitlines()) == 1
    (ckpt / "config.json").write_text(json.dumps({**TINY_CONFIG, "quantization_config": {"quant_method": "gptq",
                                                                                          "bits": "four"}}))
    res = CliRunner().invoke(cli, ["submit", str(model), str(data), "--dry-run", "--candidates", f"x={ckpt}"])
    assert res.exit_code == 2 and res.output == (f"Error: candidate x: {ckpt}/config.json: field "
                                                 "'quantization_config.bits' is 'four', not an integer\n"), res.output
    (ckpt / "config.json").write_text(json.dumps(TINY_CONFIG))
    res = CliRunner().invoke(cli, ["submit", str(model), str(data), "--dry-run", "--candidates", f"x={ckpt}"])
    assert res.exit_code == 0 and f"x: a checkpoint read from {ckpt}" in res.output, res.output


def test_a_config_nested_too_deep_is_one_line_in_plan_and_for_a_checkpoint(tmp_path):
    data = _csv(tmp_path, [f"Q{i},{i}" for i in range(30)])
    deep = _model_folder(tmp_path / "deep")
    (deep / "config.json").write_text('{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    for args in (["plan", str(deep)], ["submit", str(_model_folder(tmp_path / "model")), str(data), "--dry-run",
                                       "--candidates", f"x={deep}"]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
        assert "internal error" not in res.output and str(deep) in res.output, res.output
