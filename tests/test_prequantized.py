"""Checkpoints quantized elsewhere (``LABEL=PATH``): a real GPTQ folder written by GPTQModel (without
quantselect's own metadata, as a published release comes) and a plain copy of the model, parsed,
resolved at submit with one-line errors, loaded as they are, and evaluated in a real job."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantselect.cli import cli
from quantselect.domain.candidates import CATALOG, Prequantized, checkpoint_quantization, parse_candidate
from quantselect.engines import artifacts
from quantselect.engines.quantize import load_candidate
from quantselect.render import preview_text
from quantselect.domain.results import CANCELLED_ALONE
from quantselect.errors import InputError
from quantselect.service import Service, SubmitRequest
from tests.fixtures.common import EXAMPLES, put_in_hub_cache

CALIBRATION = [f"sample {i}: the quick brown fox jumps over the lazy dog" for i in range(8)]


def _submit(model: str, candidates: str) -> tuple[str, dict[str, dict]]:
    """A real job on 12 PIQA items through the CLI: its id and its results by candidate."""
    res = CliRunner().invoke(cli, ["submit", model, str(EXAMPLES / "piqa-300.jsonl"), "--limit", "12",
                                   "--candidates", candidates, "--threshold", "0.5"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    job_id = res.output.split()[1].rstrip(":")
    rows = json.loads(CliRunner().invoke(cli, ["results", job_id, "--format", "json"]).output)
    return job_id, {r["name"]: r for r in rows}


@pytest.fixture(scope="module")
def gptq_release(tiny_llama, tmp_path_factory):
    """A GPTQ checkpoint as it would be downloaded: GPTQModel's folder, without quantselect.json."""
    root = tmp_path_factory.mktemp("made")
    saved = load_candidate(str(tiny_llama), parse_candidate("int4-gptq:group_size=32").config, "cpu",
                           artifacts_dir=str(root), calibration=CALIBRATION)
    release = tmp_path_factory.mktemp("hub") / "tiny-llama-gptq"
    shutil.copytree(saved.artifact_path, release)
    (release / artifacts.MARKER).unlink()
    return release, saved


def test_label_equals_path_is_a_checkpoint_and_its_quantization_comes_from_its_config():
    c = parse_candidate("hub-awq=/models/llama-awq")
    assert c.name == "hub-awq" and c.config == Prequantized(path="/models/llama-awq")
    for spec, message in [("int8=/x", "not a catalogue name"), ("My Model=/x", "must be lower case"),
                          ("hub=", "give the checkpoint's folder")]:
        with pytest.raises(InputError, match=message):
            parse_candidate(spec)
    assert parse_candidate("int4-gptq:group_size=64").name == "int4-gptq:group_size=64"  # still a catalogue entry
    from quantselect.domain.candidates import resolve_candidates

    with pytest.raises(InputError, match=r"candidate 'hub' is given twice, for /a and /b: give each checkpoint its own"):
        resolve_candidates(["hub=/a", "int8", "hub=/b"])
    assert [c.name for c in resolve_candidates(["hub=/a", "int8", "hub=/a", "int8"])] == ["baseline", "hub", "int8"]
    fp8kv = parse_candidate("hub-awq=/models/llama-awq:kv_cache=fp8")  # the same release with an fp8 KV cache
    assert fp8kv.name == "hub-awq:kv_cache=fp8" and fp8kv.config == Prequantized(path="/models/llama-awq", kv_cache="fp8")
    for spec, message in [("hub=/x:kv_cache=int4", "kv_cache 'int4' must be fp8"),
                          ("hub=/x:kv_cache=", r"kv_cache= needs a value \(fp8\)"),
                          ("q4=/x/m.Q4_0.gguf:kv_cache=fp8", "a .gguf file is served by llama.cpp")]:
        with pytest.raises(InputError, match=message):
            parse_candidate(spec)
    q = lambda **kw: checkpoint_quantization({"quantization_config": kw})  # noqa: E731
    assert q(quant_method="gptq", bits=4, group_size=128) == ("gptq", 4, 128)
    assert q(quant_method="gptq", bits=4, group_size=-1) == ("gptq", 4, 0)  # per channel
    assert q(quant_method="awq", bits=4, group_size=128) == ("awq", 4, 128)
    assert q(quant_method="bitsandbytes", load_in_4bit=True) == ("bitsandbytes", 4, 64)
    assert q(quant_method="fbgemm_fp8") == ("fbgemm_fp8", 8, 0)
    assert q(quant_method="compressed-tensors", config_groups={"group_0": {"weights": {"num_bits": 4, "group_size": 128}}}) \
        == ("compressed-tensors", 4, 128)
    assert checkpoint_quantization({"torch_dtype": "bfloat16"}) == ("none", 16, 0)
    awq = Prequantized("/x", "awq", 4, 128)
    assert awq.bytes_per_weight() == CATALOG["int4-awq"].bytes_per_weight() and awq.compute == "bf16"
    assert Prequantized("/x", "fp8", 8, 0).compute == "fp8" and Prequantized("/x").bytes_per_weight() == 2.0


def test_a_torchao_checkpoint_is_read_by_its_config_type():
    """What transformers' TorchAoConfig writes into config.json: int4 was read as 8-bit, fp8 as
    computed in bf16 (and offered on hardware without fp8)."""
    import torch
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8DynamicActivationInt4WeightConfig,
                                      Float8WeightOnlyConfig,
                                      Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
                                      IntxWeightOnlyConfig, PerRow)
    from torchao.quantization.granularity import PerAxis, PerGroup
    from transformers import TorchAoConfig

    from quantselect.domain.candidates import COMPRESSED_FP8, TORCHAO_FP8
    from quantselect.engines.quantize import availability

    def read(config):  # as config.json holds it
        return checkpoint_quantization({"quantization_config": json.loads(TorchAoConfig(quant_type=config).to_json_string())})

    assert read(Int4WeightOnlyConfig(group_size=64)) == ("torchao", 4, 64)
    assert read(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))) == ("torchao", 4, 32)
    assert read(IntxWeightOnlyConfig(weight_dtype=torch.int3, granularity=PerAxis(0))) == ("torchao", 3, 0)
    assert read(Int8WeightOnlyConfig()) == read(Int8DynamicActivationInt8WeightConfig()) == ("torchao", 8, 0)
    assert read(Float8WeightOnlyConfig()) == ("torchao", 8, 0)  # fp8 weights, computed in bf16
    assert read(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())) == (TORCHAO_FP8, 8, 0)
    assert read(Float8DynamicActivationInt4WeightConfig()) == (TORCHAO_FP8, 4, 128)  # int4 weights, fp8 activations
    fp8 = Prequantized("/x", TORCHAO_FP8, 8, 0)
    assert fp8.compute == "fp8" and "compute capability >= 8.9" in availability(fp8)  # no such GPU here
    int4 = Prequantized("/x", "torchao", 4, 64)
    assert int4.bytes_per_weight() == pytest.approx(0.5 + 4 / 64) and int4.compute == "bf16"
    # llm-compressor's FP8 (compressed-tensors, fp8 weights and activations) is computed in fp8 too; its
    # W8A16 (fp8 weights only) and int W4A16 in bf16
    fp8_group = {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                 "input_activations": {"num_bits": 8, "type": "float", "dynamic": True}}
    ct = {"quant_method": "compressed-tensors", "config_groups": {"group_0": fp8_group}}
    assert checkpoint_quantization({"quantization_config": ct}) == (COMPRESSED_FP8, 8, 0)
    assert Prequantized("/x", COMPRESSED_FP8, 8, 0).compute == "fp8"
    assert availability(Prequantized("/x", COMPRESSED_FP8, 8, 0)).startswith("needs compressed-tensors")  # not here
    ct["config_groups"]["group_0"] = {"weights": fp8_group["weights"]}
    assert checkpoint_quantization({"quantization_config": ct}) == ("compressed-tensors", 8, 0)
    ct["config_groups"]["group_0"] = {"weights": {"num_bits": 4, "type": "int", "group_size": 128}}
    assert checkpoint_quantization({"quantization_config": ct}) == ("compressed-tensors", 4, 128)
    with pytest.raises(InputError, match="torchao checkpoint of 'int4_weight_only': its bits per weight are unknown"):
        checkpoint_quantization({"quantization_config": {"quant_method": "torchao", "quant_type": "int4_weight_only"}})


def test_an_already_quantized_model_is_refused_as_the_jobs_model_and_taken_as_a_candidate(tiny_llama, tmp_path):
    """Given as the job's model, a quantized folder (a quantselect artifact, or an exported torchao
    folder) would make every candidate that same quantized model; it is refused, saying how to
    evaluate it. As a candidate it is what `LABEL=PATH` is for; a GGUF file, dequantized on load,
    stays a model."""
    from quantselect.engines.models import check_model, demo_gguf_path

    saved = load_candidate(str(tiny_llama), CATALOG["int8"], "cpu", artifacts_dir=str(tmp_path / "artifacts"))
    exported = tmp_path / "int8-export"
    shutil.copytree(saved.artifact_path, exported)
    (exported / artifacts.MARKER).unlink()
    items = [{"prompt": f"q{i}", "reference": "a"} for i in range(4)]
    for folder in (saved.artifact_path, str(exported)):
        with pytest.raises(InputError, match=re.escape(f"{folder}: already quantized (torchao); give the original "
                                                       f"model, and evaluate this one as a candidate LABEL={folder}")):
            Service().build_spec(SubmitRequest(model=folder, items=items))
        assert check_model(folder, quantized=True) == str(Path(folder).resolve())  # a checkpoint candidate
    [_, cand] = Service().build_spec(SubmitRequest(model=str(tiny_llama), items=items,
                                                   candidates=[f"mine={exported}"])).candidates
    assert (cand.config.method, cand.config.bits) == ("torchao", 8)
    assert check_model(str(demo_gguf_path())) == str(demo_gguf_path())  # a quantized GGUF: dequantized, a model
    assert check_model(str(tiny_llama)) == str(tiny_llama.resolve())


def test_submit_reads_the_checkpoint_and_refuses_what_cannot_be_one(tiny_llama, gptq_release, tmp_path):
    release, _ = gptq_release
    svc = Service()
    items = [{"prompt": f"q{i}", "reference": "a"} for i in range(20)]

    def spec(*candidates):
        return svc.build_spec(SubmitRequest(model=str(tiny_llama), items=items, candidates=list(candidates)))

    [_, mine] = spec(f"mine={release}").candidates
    assert mine.config == Prequantized(path=str(release.resolve()), method="gptq", bits=4, group_size=32)
    # Named by its Hub id: read from its snapshot in the Hugging Face cache, pinned to that commit.
    snapshot = put_in_hub_cache(release, "acme/tiny-llama-gptq")
    [_, hub] = spec("mine=acme/tiny-llama-gptq").candidates
    pin = f"acme/tiny-llama-gptq@{snapshot.name}"
    assert hub.config == Prequantized(path=pin, method="gptq", bits=4, group_size=32)
    dry = svc.preview(SubmitRequest(model=str(tiny_llama), items=items, candidates=["mine=acme/tiny-llama-gptq"]))
    assert dry["candidates"][1]["config"]["_data"]["path"] == pin
    assert f"\nmine: a checkpoint read from {pin}" in preview_text(dry)
    with pytest.raises(InputError, match=r"candidate gone: .*/nowhere: no such checkpoint folder"):
        spec(f"gone={tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="candidate empty: .* not a Hugging Face model folder"):
        spec(f"empty={tmp_path / 'empty'}")
    other = tmp_path / "other-model"
    shutil.copytree(release, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 1}))
    with pytest.raises(InputError, match=r"candidate other: .* has a vocabulary of \d+ tokens and the model \d+"):
        spec(f"other={other}")
    # the 8B and 70B of a family share a vocabulary: a checkpoint of another depth or width is refused too
    (other / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] * 2}))
    with pytest.raises(InputError, match=rf"candidate other: .* has {cfg['num_hidden_layers'] * 2} layers and the "
                                         rf"model {cfg['num_hidden_layers']} layers: not a checkpoint of the same"):
        spec(f"other={other}")
    # Llama-2-7B and Mistral-7B share vocabulary size, depth and width, not their MLP or key/value heads
    (other / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] * 2,
                                                   "num_key_value_heads": cfg["num_attention_heads"]}))
    with pytest.raises(InputError, match=rf"has MLP width {cfg['intermediate_size'] * 2}, "
                                         rf"{cfg['num_attention_heads']} key/value heads and the model MLP width "
                                         rf"{cfg['intermediate_size']}, {cfg['num_key_value_heads']} key/value heads"):
        spec(f"other={other}")
    # The cache key follows the folder's files: a checkpoint replaced in place is evaluated again.
    from quantselect.service import cache_keys

    before = cache_keys(spec(f"mine={release}"))["mine"]
    (release / "note.txt").write_text("a new file in the release")
    assert cache_keys(spec(f"mine={release}"))["mine"] != before
    (release / "note.txt").unlink()


def test_a_checkpoint_named_by_its_hub_id_is_read_on_its_config_at_submit_and_fetched_by_the_driver(
        ray_cluster, tiny_llama, gptq_release, tmp_path):
    """`--candidates hub=org/model-GPTQ`, submitted from a laptop to a cluster: where the job is
    submitted, only config.json is downloaded, and the candidate is pinned to the commit read; the
    driver fetches that commit's weights on its machine and records the snapshot, which `export` and
    `deploy` read. One that cannot be fetched fails its candidate, saying where, and the others run;
    submitted again, the others' results are reused and only it runs. The cache key names the
    commit, so it is the same on every machine and before and after the fetch."""
    release, _ = gptq_release
    (tmp_path / "cfg").mkdir()
    shutil.copy(release / "config.json", tmp_path / "cfg")
    snapshot = put_in_hub_cache(tmp_path / "cfg", "acme/gptq-later")  # as `hf download acme/gptq-later config.json`
    svc = Service()
    req = SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=8,
                        candidates=["int8", "hub=acme/gptq-later"], threshold=0.5)
    first = svc.submit(req)
    hub = svc.repo.get_job_spec(first.id).candidates[2].config
    assert (hub.path, hub.method, hub.bits, hub.group_size) == (f"acme/gptq-later@{snapshot.name}", "gptq", 4, 32)
    assert all(svc.repo.cache_keys(first.id).values())
    assert svc.run_job(first.id).status == "succeeded"
    results = {r.name: r for r in svc.results(first.id)}
    assert {n: r.status for n, r in results.items()} == {"baseline": "succeeded", "int8": "succeeded", "hub": "failed"}
    assert re.fullmatch(rf"not fetched on the driver's machine \(.+\): acme/gptq-later@{snapshot.name}: .+: "
                        r"folder has no weights.*", results["hub"].error), results["hub"].error
    assert svc.repo.get_job_spec(first.id).candidates[2].config.path == hub.path  # no snapshot recorded
    shown = CliRunner().invoke(cli, ["status", first.id]).output
    assert "not fetched on the driver's machine" in shown, shown
    dropped = svc.submit(req)  # one cancelled on its own before its driver starts: not fetched, left cancelled
    svc.cancel_candidate(dropped.id, "hub")
    assert svc.run_job(dropped.id).status == "succeeded"
    assert {r.name: (r.status, r.error) for r in svc.results(dropped.id)}["hub"] == ("cancelled", CANCELLED_ALONE)
    put_in_hub_cache(release, "acme/gptq-later")  # the rest of the commit, fetched on the driver's machine
    job = svc.submit(req)
    assert svc.repo.cache_keys(job.id) == svc.repo.cache_keys(first.id)
    assert svc.run_job(job.id).status == "succeeded"
    assert svc.repo.get_job_spec(job.id).candidates[2].config.path == str(snapshot)
    results = {r.name: r for r in svc.results(job.id)}
    assert {n: (r.status, r.reused_from) for n, r in results.items()} == {
        "baseline": ("succeeded", first.id), "int8": ("succeeded", first.id), "hub": ("succeeded", None)}
    again = svc.submit(req)  # the same commit: the same keys, the results reused
    assert svc.run_job(again.id).status == "succeeded"
    assert {r.name: r.reused_from for r in svc.results(again.id)} == {"baseline": first.id, "int8": first.id, "hub": job.id}
    _, out = svc.export(job.id, str(tmp_path / "export"), "hub")
    assert (out / "model.safetensors").read_bytes() == (release / "model.safetensors").read_bytes()


def test_a_checkpoint_loads_as_it_is_and_a_broken_one_fails_loudly(tiny_llama, gptq_release, tmp_path):
    import torch

    release, saved = gptq_release
    probe = torch.arange(1, 33).unsqueeze(0)
    config = Prequantized(path=str(release), method="gptq", bits=4, group_size=32)
    loaded = load_candidate(str(tiny_llama), config, "cpu")
    with torch.inference_mode():
        assert torch.equal(loaded.model(probe).logits, saved.model(probe).logits)  # the very weights GPTQModel wrote
    assert loaded.artifact_path == str(release) and loaded.engine == "prequantized (gptq, 4-bit)"
    assert loaded.quantize_seconds == 0.0 and loaded.disk_bytes > 0
    fp8kv = load_candidate(str(tiny_llama), Prequantized(path=str(release), method="gptq", bits=4, group_size=32,
                                                         kv_cache="fp8"), "cpu")
    with torch.inference_mode():
        assert not torch.equal(fp8kv.model(probe).logits, saved.model(probe).logits)  # its attention reads fp8 K/V
    # A plain checkpoint (another copy of the model) is the baseline's weights.
    plain = tmp_path / "plain"
    shutil.copytree(tiny_llama, plain)
    base = load_candidate(str(tiny_llama), CATALOG["baseline"], "cpu")
    same = load_candidate(str(tiny_llama), Prequantized(path=str(plain)), "cpu")
    with torch.inference_mode():
        assert torch.equal(same.model(probe).logits, base.model(probe).logits)
    # A release missing a weight is refused, not filled with random values.
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(release, broken)
    weights = next(broken.glob("*.safetensors"))
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if "layers.0.mlp" not in k}, str(weights), metadata={"format": "pt"})
    with pytest.raises(artifacts.ArtifactMismatch, match="does not load back whole"):
        load_candidate(str(tiny_llama), Prequantized(path=str(broken), method="gptq", bits=4, group_size=32), "cpu")


TEXT = "the cat sat on a mat"


def _odd_tokenizer(release, dest):
    """A copy of ``release`` whose tokenizer gives two tokens each other's ids, with another chat template."""
    shutil.copytree(release, dest)
    tok = json.loads((dest / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["Ġthe"], vocab["Ġa"] = vocab["Ġa"], vocab["Ġthe"]
    (dest / "tokenizer.json").write_text(json.dumps(tok))
    (dest / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    return dest


def test_a_checkpoint_is_scored_with_the_models_tokenizer_and_chat_template(tiny_llama, gptq_release, tmp_path):
    """What is compared is weights: a release whose tokenizer differs (here two tokens' ids swapped
    and another chat template, as transformers' reading of a GGUF file's vocabulary can differ from
    the model's tokenizer) is scored -- and served -- with the model's."""
    from transformers import AutoTokenizer

    release, _ = gptq_release
    odd = _odd_tokenizer(release, tmp_path / "odd-tokenizer")
    text, chat = TEXT, [{"role": "user", "content": "hi"}]
    model_tok, own_tok = AutoTokenizer.from_pretrained(str(tiny_llama)), AutoTokenizer.from_pretrained(str(odd))
    assert own_tok(text).input_ids != model_tok(text).input_ids  # the release's own tokenizer does differ
    loaded = load_candidate(str(tiny_llama), Prequantized(path=str(odd), method="gptq", bits=4, group_size=32), "cpu")
    assert loaded.tokenizer(text).input_ids == model_tok(text).input_ids
    assert (loaded.tokenizer.apply_chat_template(chat, tokenize=False)
            == model_tok.apply_chat_template(chat, tokenize=False) != "[hi]")


def test_a_job_evaluates_a_checkpoint_beside_the_candidates_it_quantizes_then_serves_and_exports_it(
        ray_cluster, serve_port, monkeypatch, tiny_llama, gptq_release, tmp_path):
    """End to end, with a release whose own tokenizer differs from the model's: it is scored, served
    and exported with the model's, the pair whose quality was measured."""
    import openai
    from transformers import AutoTokenizer

    from quantselect.engines.evaluate import generate
    from quantselect.serving.deploy import undeploy

    release = _odd_tokenizer(gptq_release[0], tmp_path / "tiny-llama-gptq")
    job_id, rows = _submit(str(tiny_llama), f"int8,hub-gptq={release},hub-gptq={release}:kv_cache=fp8")
    hub, fp8kv = rows["hub-gptq"], rows["hub-gptq:kv_cache=fp8"]
    assert hub["status"] == "succeeded" and hub["n_items"] == 12 and hub["artifact_path"] == str(release.resolve())
    assert fp8kv["status"] == "succeeded" and fp8kv["artifact_path"] == hub["artifact_path"]
    assert "fp8 KV cache emulated" in fp8kv["throughput_engine"]
    assert fp8kv["cost_per_1m_tokens_usd"] < hub["cost_per_1m_tokens_usd"]  # its cache counted at one byte
    assert hub["quantize_seconds"] == 0.0 and hub["tokens_per_second"] > 0
    # Costed as the 4-bit checkpoint it is (weights on the target below the baseline's, and int8's).
    assert hub["cost_per_1m_tokens_usd"] < rows["int8"]["cost_per_1m_tokens_usd"] < rows["baseline"]["cost_per_1m_tokens_usd"]
    assert release.is_dir() and not (release / artifacts.MARKER).exists()  # the user's folder is left as it was

    # Deployed through the CLI, it serves the checkpoint's weights with the model's tokenizer: the
    # greedy answer is the one the checkpoint gives loaded here.
    monkeypatch.setenv("QUANTSELECT_SERVE_PORT", str(serve_port))
    res = CliRunner().invoke(cli, ["deploy", job_id, "--candidate", "hub-gptq"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    url = next(w for w in res.output.split() if w.startswith("http"))
    local = load_candidate(str(tiny_llama), Prequantized(path=str(release), method="gptq", bits=4, group_size=32), "cpu")
    [(ids, text, _)] = generate(local.model, local.tokenizer, [local.tokenizer(TEXT).input_ids], 8)
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
    served = client.completions.create(model=client.models.list().data[0].id, prompt=TEXT, max_tokens=8, temperature=0)
    try:
        assert (served.usage.prompt_tokens, served.choices[0].text, served.usage.completion_tokens) == (
            len(local.tokenizer(TEXT).input_ids), text, len(ids))
    finally:
        undeploy(url.rstrip("/").split("/")[-2])

    # Exported: the checkpoint's weights, the model's tokenizer, and a card that says so.
    _, out = Service().export(job_id, str(tmp_path / "export"), "hub-gptq")
    model_tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    assert AutoTokenizer.from_pretrained(str(out))(TEXT).input_ids == model_tok(TEXT).input_ids
    assert not (out / "chat_template.jinja").exists() or "[{{" not in (out / "chat_template.jinja").read_text()
    assert (out / "model.safetensors").read_bytes() == (release / "model.safetensors").read_bytes()
    assert f"Its tokenizer is that of `{tiny_llama}`" in (out / "README.md").read_text()


def test_a_gguf_release_is_read_at_submit_and_loads_exactly_as_stored(demo_model_dir, demo_q4_0_gguf, tiny_llama,
                                                                      tmp_path):
    """A .gguf file (llama.cpp / Ollama) as a candidate: its type and bits per weight come from its
    header; its weights are the ones llama.cpp stores, dequantized (the same as transformers' own
    GGUF loader gives), not the baseline's; its size on disk is the file's."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantselect.engines.models import gguf_quantization

    q = gguf_quantization(demo_q4_0_gguf)
    assert (q["file_type"], q["bits"], q["bits_per_weight"], q["vocab_size"]) == ("Q4_0", 4, 4.5, 49152)
    svc = Service()
    items = [{"prompt": f"q{i}", "reference": "a"} for i in range(20)]
    [_, q40] = svc.build_spec(SubmitRequest(model="demo", items=items, candidates=[f"q40={demo_q4_0_gguf}"])).candidates
    assert q40.config == Prequantized(path=str(demo_q4_0_gguf), method="gguf", bits=4, group_size=0,
                                      file_type="Q4_0", bits_per_weight=4.5)
    assert q40.config.bytes_per_weight() == 4.5 / 8 and q40.config.weight_bits == 4.5
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    for path, message in [(bad, r"broken.gguf: not a readable GGUF file"),
                          (other, r"weights.bin: a checkpoint is a Hugging Face model folder or a .gguf file")]:
        with pytest.raises(InputError, match=message):
            svc.build_spec(SubmitRequest(model="demo", items=items, candidates=[f"x={path}"]))
    # SmolLM2's vocabulary, but not its shape: the tiny Llama shares the tokenizer, not the model
    with pytest.raises(InputError, match=r"candidate q40: .*Q4_0.gguf has 30 layers, width 576, .* and the model 2 "
                                         r"layers, width 128, .*: not a checkpoint of the same model"):
        svc.build_spec(SubmitRequest(model=str(tiny_llama), items=items, candidates=[f"q40={demo_q4_0_gguf}"]))

    probe = torch.arange(1, 33).unsqueeze(0)
    loaded = load_candidate(str(demo_model_dir), q40.config, "cpu", models_dir=str(tmp_path / "models"))
    assert loaded.disk_bytes == demo_q4_0_gguf.stat().st_size and "gguf Q4_0" in loaded.engine
    direct = AutoModelForCausalLM.from_pretrained(str(demo_q4_0_gguf.parent), gguf_file=demo_q4_0_gguf.name,
                                                  dtype=torch.float32).eval()
    base = load_candidate(str(demo_model_dir), CATALOG["baseline"], "cpu")
    with torch.inference_mode():
        mine = loaded.model(probe).logits
        assert torch.equal(mine, direct(probe).logits)
        assert not torch.allclose(mine, base.model(probe).logits, atol=1e-3)  # Q4_0 is not the Q4_1 it came from

    # the demo's own file named as a path is the demo: its converted folder is shared, not made again
    from quantselect.engines.models import demo_gguf_path, resolve_model

    assert resolve_model(str(demo_gguf_path()), demo_model_dir.parent) == demo_model_dir


def test_a_job_scores_a_gguf_release_costs_it_by_its_bits_and_exports_it_for_llama_cpp(ray_cluster, demo_q4_0_gguf,
                                                                                        tmp_path):
    from quantselect.errors import ConflictError

    job_id, rows = _submit("demo", f"int8,q40={demo_q4_0_gguf}")
    q40 = rows["q40"]
    assert q40["status"] == "succeeded" and q40["n_items"] == 12 and q40["quantize_seconds"] == 0.0
    assert q40["disk_bytes"] == q40["weight_bytes"] == demo_q4_0_gguf.stat().st_size  # what llama.cpp maps
    assert q40["weight_bytes"] < rows["int8"]["weight_bytes"]
    assert "(GGUF Q4_0 dequantized, not llama.cpp)" in q40["throughput_engine"]
    # Never costed from its dense stand-in's speed: the roofline estimate, from 4.5 bits per weight.
    assert "estimated" in q40["cost_source"]
    assert q40["cost_per_1m_tokens_usd"] < rows["int8"]["cost_per_1m_tokens_usd"] < rows["baseline"]["cost_per_1m_tokens_usd"]
    svc = Service()
    # Its dequantized folder is in use by the job: a prune keeps it unless named.
    [entry] = [e for e in svc.cache_entries() if e.model == str(demo_q4_0_gguf)]
    assert job_id in entry.jobs
    with pytest.raises(ConflictError, match=r"q40 is a GGUF file, run by llama.cpp \(llama-server -m .*Q4_0.gguf\)"):
        svc.deploy(job_id, "q40")
    _, out = svc.export(job_id, str(tmp_path / "export"), "q40")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", demo_q4_0_gguf.name, "quantselect-evidence.json"]
    assert (out / demo_q4_0_gguf.name).read_bytes() == demo_q4_0_gguf.read_bytes()
    card = (out / "README.md").read_text()
    assert "library_name: gguf" in card and f"llama-server -m {out}/{demo_q4_0_gguf.name}" in card
    assert "Its quality was scored with the tokenizer and chat template of `demo`" in card
