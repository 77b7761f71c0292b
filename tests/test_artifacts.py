"""Quantized models saved in the Hugging Face layout, reloaded, checked, and reused by key."""

from __future__ import annotations

import json

import pytest

from quantselect.domain.candidates import CATALOG, parse_candidate
from quantselect.engines import artifacts
from quantselect.engines.quantize import load_candidate


def logits(lm):
    """The logits of a LoadedModel, or of a bare model."""
    import torch

    with torch.inference_mode():
        model = lm.model if hasattr(lm, "tokenizer") else lm  # a causal LM's own .model is its trunk
        return model(torch.arange(1, 33).unsqueeze(0)).logits.float()


@pytest.mark.parametrize("name", ["int8", "int4", "int3"])
def test_round_trip_gives_the_same_outputs_and_a_second_job_reuses_it(tiny_llama, tmp_path, name):
    import torch

    in_memory = load_candidate(str(tiny_llama), CATALOG[name], "cpu")  # no artifact: quantized in memory
    saved = load_candidate(str(tiny_llama), CATALOG[name], "cpu", artifacts_dir=str(tmp_path))
    assert saved.artifact_path and not saved.reused and saved.disk_bytes > 0
    folder = tmp_path / saved.artifact_path.rsplit("/", 1)[-1]
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"  # the standard layout
    assert any(folder.glob("*.safetensors")) and (folder / "tokenizer.json").is_file()
    assert torch.equal(logits(saved), logits(in_memory))  # what is evaluated is what was saved
    again = load_candidate(str(tiny_llama), CATALOG[name], "cpu", artifacts_dir=str(tmp_path))
    assert again.reused and again.artifact_path == saved.artifact_path
    assert again.quantize_seconds == pytest.approx(saved.quantize_seconds)  # the original cost, not 0
    assert torch.equal(logits(again), logits(saved))
    # an artifact loads as a model path too (serving does that)
    served = load_candidate(saved.artifact_path, CATALOG[name], "cpu")
    assert torch.equal(logits(served), logits(saved))


def test_another_config_or_calibration_gets_another_key(tiny_llama):
    a = artifacts.key(tiny_llama, CATALOG["int4"].config if hasattr(CATALOG["int4"], "config") else CATALOG["int4"], None, "cpu")
    b = artifacts.key(tiny_llama, parse_candidate("int4:group_size=64").config, None, "cpu")
    c = artifacts.key(tiny_llama, CATALOG["int4-gptq"], ["one sample"], "cpu")
    d = artifacts.key(tiny_llama, CATALOG["int4-gptq"], ["another sample"], "cpu")
    assert len({a, b, c, d}) == 4
    assert a == artifacts.key(tiny_llama, CATALOG["int4"], None, "cpu")


def test_an_edited_chat_template_or_generation_config_makes_a_new_artifact(tiny_llama, tmp_path):
    """The artifact saves the tokenizer, chat template and generation config, and scoring and serving
    it read them from there: after the user edits the model's, the old artifact must not be reused."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    root = str(tmp_path / "artifacts")
    first = load_candidate(str(model), CATALOG["int8"], "cpu", artifacts_dir=root)
    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    (model / "chat_template.jinja").write_text(template)
    edited = load_candidate(str(model), CATALOG["int8"], "cpu", artifacts_dir=root)
    assert not edited.reused and edited.artifact_path != first.artifact_path
    assert edited.tokenizer.chat_template == template
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.3, "do_sample": True}))
    again = load_candidate(str(model), CATALOG["int8"], "cpu", artifacts_dir=root)
    assert not again.reused and again.model.generation_config.temperature == 0.3
    assert load_candidate(str(model), CATALOG["int8"], "cpu", artifacts_dir=root).reused  # nothing edited since


def test_an_artifact_that_reloads_with_missing_weights_fails_loudly(tiny_llama, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    saved = load_candidate(str(tiny_llama), CATALOG["int8"], "cpu", artifacts_dir=str(tmp_path))
    weights = next(iter((tmp_path / saved.artifact_path.rsplit("/", 1)[-1]).glob("*.safetensors")))
    tensors = load_file(str(weights))
    kept = {k: v for k, v in tensors.items() if "q_proj" not in k}
    assert len(kept) < len(tensors)
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    save_file(kept, str(weights), metadata=metadata)
    # transformers now fills q_proj with random values and only prints a table: we must refuse it
    with pytest.raises(artifacts.ArtifactMismatch, match="does not load back whole: .*q_proj"):
        load_candidate(str(tiny_llama), CATALOG["int8"], "cpu", artifacts_dir=str(tmp_path))


def test_an_artifact_whose_weights_changed_fails_the_probe(tiny_llama, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    saved = load_candidate(str(tiny_llama), CATALOG["int8"], "cpu", artifacts_dir=str(tmp_path))
    weights = next(iter((tmp_path / saved.artifact_path.rsplit("/", 1)[-1]).glob("*.safetensors")))
    tensors = load_file(str(weights))
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    scales = [k for k in tensors if "scale" in k and "proj" in k]
    assert scales
    for k in scales:  # every key still there, the values not what was saved
        tensors[k] = tensors[k] * 3
    save_file(tensors, str(weights), metadata=metadata)
    with pytest.raises(artifacts.ArtifactMismatch, match="reloads with different outputs"):
        load_candidate(str(tiny_llama), CATALOG["int8"], "cpu", artifacts_dir=str(tmp_path))


def test_unquantized_and_unsavable_candidates_make_no_artifact(tiny_llama, tmp_path):
    root = tmp_path / "artifacts"
    for name in ("baseline", "bf16", "w8a8"):  # the base model itself; fbgemm's packed weights on CPU
        lm = load_candidate(str(tiny_llama), CATALOG[name], "cpu", artifacts_dir=str(root))
        assert lm.artifact_path is None and not lm.reused
    assert not root.exists() or not [p for p in root.iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize("name,kernel,forced", [("int4-gptq", "gptq_torch", "TorchLinear"),
                                                ("int4-awq", "torch_awq", "AwqTorchLinear")])
def test_gptq_and_awq_artifacts_reload_with_the_kernel_chosen_for_the_device(tiny_llama, tmp_path, monkeypatch, name,
                                                                           kernel, forced):
    """On a GPU, GPTQModel's own choice would build kernels with nvcc at load time (and, for GPTQ,
    download CUTLASS first): the reload names a kernel that needs no build. Here the mechanism is
    checked on CPU with a kernel that runs there: transformers takes the named kernel, and the
    bits and group size still come from the saved config, so the outputs stay the artifact's."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantselect.engines.quantize import CUDA_KERNELS, gptqmodel_reload_kwargs

    calibration = [f"sample {i}: the quick brown fox jumps over the lazy dog" for i in range(8)]
    saved = load_candidate(str(tiny_llama), CATALOG[name], "cpu", artifacts_dir=str(tmp_path), calibration=calibration)
    folder = saved.artifact_path
    assert gptqmodel_reload_kwargs(folder, "cpu") == {}  # on CPU GPTQModel's own choice builds nothing
    method = "gptq" if name == "int4-gptq" else "awq"
    assert gptqmodel_reload_kwargs(folder, "cuda")["quantization_config"].backend == CUDA_KERNELS[method]
    monkeypatch.setenv(f"QUANTSELECT_{method.upper()}_CUDA_KERNEL", kernel)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=saved.model.dtype,
                                                 **gptqmodel_reload_kwargs(folder, "cuda")).eval()
    from quantselect.engines.measure import kernels

    assert kernels(model) == f", kernels {forced}"
    assert torch.allclose(logits(model), logits(saved), atol=2e-2, rtol=0)
