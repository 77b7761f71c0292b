"""Paths and names a user gives, through the REST API (the real app in this process, no Ray) and the
CLI: a name too long for the file system, a Hub name with a '..' segment, a config.json that is no
JSON object, a model folder without a tokenizer or with unreadable weights. Each is a one-line input
error naming what to fix -- a 422 or exit status 2 -- never a 500 or a job that fails later."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from quantselect.cli import cli
from quantselect.errors import InputError

TINY_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 100}


@pytest.fixture
def folder(tmp_path) -> Path:
    """The folder the server reads (QUANTSELECT_API_PATHS), with a small task dataset in it."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "mc.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "choices": ["a", "b"], "answer": i % 2}) + "\n"
                                           for i in range(30)))
    return data


@pytest.fixture
def api(folder, monkeypatch):
    from quantselect.api.app import create_app

    monkeypatch.setenv("QUANTSELECT_API_PATHS", str(folder))
    with TestClient(create_app(connect_ray=False), base_url="http://localhost") as c:
        yield c


def _refused(res, *says: str) -> str:
    assert res.status_code == 422, res.text
    detail = res.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and all(s in detail for s in says), detail
    return detail


def _model_folder(where: Path, tokenizer: bool = True, weights: bytes | None = None) -> Path:
    """A model folder: a tiny Llama config, a tokenizer file unless told not to, and weights (a
    small real safetensors file unless ``weights`` gives its bytes)."""
    import numpy as np
    from safetensors.numpy import save_file

    where.mkdir()
    (where / "config.json").write_text(json.dumps(TINY_CONFIG))
    if tokenizer:
        (where / "tokenizer.json").write_text('{"version": "1.0"}')
    if weights is None:
        save_file({"lm_head.weight": np.zeros((100, 64), dtype=np.float32)}, str(where / "model.safetensors"))
    else:
        (where / "model.safetensors").write_bytes(weights)
    return where


# ---- 1. a name too long for the file system (ENAMETOOLONG) ---------------------------------------

def test_an_overlong_path_is_a_422_naming_the_field(api, folder):
    long = str(folder / ("z" * 5000))
    base = {"model": "demo", "dataset": str(folder / "mc.jsonl")}
    for body, field in [({"dataset": long}, "dataset "), ({"labels": long}, "labels "),
                        ({"calibration": long, "candidates": ["int4-gptq:group_size=64"]}, "calibration "),
                        ({"model": long}, "model "), ({"candidates": ["x=" + long]}, "candidate x: ")]:
        detail = _refused(api.post("/api/v1/jobs/preview", json={**base, **body}), field,
                          ": cannot read it (File name too long)")
        assert len(detail) < 400, detail  # the path shortened, not 5000 characters back
    detail = _refused(api.get("/api/v1/plan", params={"model": long}), "model ", ": cannot read it (File name too long)")
    assert len(detail) < 400


def test_an_overlong_path_is_one_line_on_the_cli_too(tmp_path):
    long = str(tmp_path / ("q" * 5000))
    res = CliRunner().invoke(cli, ["plan", long])
    assert res.exit_code == 2 and "cannot read it (File name too long)" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["plan", "owner/" + "n" * 300])  # a relative name: looked for here first
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output


# ---- 2. a '..' (or '.', or empty) segment in a Hub name ------------------------------------------

def test_a_dot_segment_in_a_hub_name_is_a_422(api, folder):
    base = {"model": "demo", "dataset": str(folder / "mc.jsonl")}
    for body, name in [({"dataset": "hf://datasets/o/n/../../../../etc/passwd"}, "hf://datasets/o/n/../../../../etc/passwd"),
                       ({"dataset": "hf://datasets/o/n/a//b.jsonl"}, "hf://datasets/o/n/a//b.jsonl"),
                       ({"dataset": "hf://datasets/o/n@../x.jsonl"}, "hf://datasets/o/n@../x.jsonl"),
                       ({"model": "owner/name/../x.gguf"}, "owner/name/../x.gguf"),
                       ({"model": "owner/name@../../main"}, "owner/name@../../main"),
                       ({"candidates": ["q=owner/name/../../x.gguf"]}, "owner/name/../../x.gguf")]:
        _refused(api.post("/api/v1/jobs/preview", json={**base, **body}), name, "'.', '..' or empty")
    _refused(api.get("/api/v1/plan", params={"model": "owner/name/../../x.gguf"}), "'.', '..' or empty")


def test_a_hub_file_name_the_hub_client_refuses_is_an_input_error():
    """What the Hub client itself refuses as a file name (a backslashed '..', a drive) is an input
    error too, whatever our own check lets through."""
    from quantselect.engines.models import hub_data_file

    for name in ("hf://datasets/o/n/a\\..\\b.jsonl", "hf://datasets/o/n/C:x.jsonl"):
        with pytest.raises(InputError, match="not a file name the Hugging Face Hub takes"):
            hub_data_file(name)


# ---- 3. a config.json that is not a JSON object --------------------------------------------------

@pytest.mark.parametrize("config", ["[1, 2]", "null", '{"text_config": [1]}'])
def test_a_config_that_is_not_a_json_object_is_a_422(api, folder, config):
    model = folder / "m"
    model.mkdir()
    (model / "config.json").write_text(config)
    _refused(api.get("/api/v1/plan", params={"model": str(model)}), "config.json", "not a JSON object")
    # a checkpoint candidate's config.json too (null: read as no config at all)
    _refused(api.post("/api/v1/jobs/preview", json={"model": "demo", "dataset": str(folder / "mc.jsonl"),
                                                    "candidates": [f"ckpt={model}"]}),
             f"candidate ckpt: {model}", "no readable config.json" if config == "null" else "not a JSON object")


# ---- 4. a model folder that cannot be loaded ---------------------------------------------------------

def test_a_model_folder_without_a_tokenizer_or_with_unreadable_weights_is_refused(tmp_path):
    from quantselect.engines.models import check_model

    good = _model_folder(tmp_path / "good")
    assert check_model(str(good)) == str(good)
    with pytest.raises(InputError, match=r"no-tok: folder has no tokenizer \(tokenizer.json"):
        check_model(str(_model_folder(tmp_path / "no-tok", tokenizer=False)))
    with pytest.raises(InputError, match=r"empty/model.safetensors: not a readable safetensors file \(empty"):
        check_model(str(_model_folder(tmp_path / "empty", weights=b"")))
    truncated = (good / "model.safetensors").read_bytes()[:-100]
    with pytest.raises(InputError, match=r"cut/model.safetensors: not a readable safetensors file \(truncated"):
        check_model(str(_model_folder(tmp_path / "cut", weights=truncated)))
    with pytest.raises(InputError, match=r"junk/model.safetensors: not a readable safetensors file"):
        check_model(str(_model_folder(tmp_path / "junk", weights=b"not a safetensors file")))
    # a checkpoint is scored with the model's tokenizer: it need not have one
    assert check_model(str(_model_folder(tmp_path / "ckpt", tokenizer=False)), quantized=True)
    # other tokenizers transformers reads: SentencePiece's model, a BPE vocabulary and its merges
    for files in (["tokenizer.model"], ["vocab.json", "merges.txt"]):
        other = _model_folder(tmp_path / files[0], tokenizer=False)
        for f in files:
            (other / f).write_text("x")
        assert check_model(str(other))


def test_a_model_folder_without_a_tokenizer_is_refused_at_submit(api, folder):
    model = _model_folder(folder / "adir", tokenizer=False)
    _refused(api.post("/api/v1/jobs/preview", json={"model": str(model), "dataset": str(folder / "mc.jsonl")}),
             f"{model}: folder has no tokenizer")


def test_the_demo_and_the_tiny_test_models_pass(demo_model_dir, tiny_models):
    from quantselect.engines.models import check_model

    assert check_model("demo") == "demo"
    for path in (demo_model_dir, *tiny_models.values()):
        assert check_model(str(path)) == str(path)
