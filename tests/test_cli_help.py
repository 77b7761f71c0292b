"""The CLI as its help and README describe it (click's runner, real SQLite, real tiny models; no Ray
started: jobs are written to the database and moved along with the repository, as a driver would)."""

from __future__ import annotations

import json

import click
import pytest

from quantselect.cli import cli
from quantselect.domain.dataset import FieldMapping
from quantselect.errors import InputError
from quantselect.settings import get_settings
from tests.test_cli_inputs import refused, run


def one_line_error(res, start: str) -> str:
    line = refused(res, start)  # the one-line exit-2 refusal, and click's "Error: " before it
    assert line.startswith(f"Error: {start}"), res.output
    return line


def words(text: str) -> str:
    """Help text with click's line wrapping undone."""
    return " ".join(text.split())


def _job(tiny_llama, **kwargs):
    from quantselect.service import Service, SubmitRequest

    svc = Service()
    items = [{"prompt": f"q{i}", "choices": ["a", "b"], "answer": 0} for i in range(4)]
    return svc, svc.submit(SubmitRequest(model=str(tiny_llama), items=items, **kwargs))


def test_status_follow_fails_when_the_deployment_the_job_asked_for_failed_and_shows_one_that_is_served(tiny_llama):
    """As `submit --deploy` does: a job that succeeded but was not deployed is an error (a script
    waiting on it must not go on as if it were served); one that was served says where."""
    svc, job = _job(tiny_llama, candidates=["int8"], deploy=True)
    svc.repo.finish_job(job.id, "succeeded")
    svc.repo.set_deploy_error(job.id, f"job {job.id}: no candidate met the threshold")
    res = run("status", job.id, "--follow")
    assert res.exit_code == 1, res.output
    assert res.output.splitlines()[-1] == (f"Error: job {job.id} succeeded but was not deployed: no candidate met the "
                                           f"threshold (`quantselect deploy {job.id} --candidate NAME` serves one)")
    svc, served = _job(tiny_llama, candidates=["int8"], deploy=True)
    svc.repo.finish_job(served.id, "succeeded")
    svc.repo.set_deployment(served.id, "int8", "http://127.0.0.1:8000/models/x/v1")
    res = run("status", served.id, "--follow")
    assert res.exit_code == 0, res.output
    assert "Serving int8 at http://127.0.0.1:8000/models/x/v1" in res.output, res.output


def test_cancel_of_several_candidates_checks_them_all_before_cancelling_any(tiny_llama):
    """A cancel cannot be undone: a typo, the baseline or a finished candidate among several cancels
    none of them; a name given twice is cancelled once."""
    svc, job = _job(tiny_llama, candidates=["int8", "int4", "w8a8"])
    svc.cancel_candidate(job.id, "w8a8")

    def statuses() -> dict[str, str]:
        return {r.name: r.status for r in svc.results(job.id)}

    before = statuses()
    line = one_line_error(run("cancel", job.id, "--candidate", "int8", "--candidate", "nope", "--candidate", "nix"),
                          f"job {job.id} has no candidate 'nope', 'nix': nothing cancelled")
    assert f"`quantselect status {job.id}`" in line
    one_line_error(run("cancel", job.id, "--candidate", "int8", "--candidate", "baseline"),
                   f"job {job.id}: cannot cancel baseline (the baseline: `quantselect cancel {job.id}` cancels the "
                   "whole job): nothing cancelled")
    one_line_error(run("cancel", job.id, "--candidate", "int8", "--candidate", "w8a8"),
                   f"job {job.id}: cannot cancel w8a8 (already cancelled): nothing cancelled")
    assert statuses() == before
    res = run("cancel", job.id, "--candidate", "int8", "--candidate", "int4", "--candidate", "int8")
    assert res.exit_code == 0, res.output
    assert [line.split(";")[0] for line in res.output.splitlines()] == [f"Job {job.id}: int8 cancelled",
                                                                         f"Job {job.id}: int4 cancelled"]
    assert statuses() == {**before, "int8": "cancelled", "int4": "cancelled"}
    # one name alone: the service's own answer, as before
    assert "is already cancelled" in run("cancel", job.id, "--candidate", "int8").output


@pytest.mark.parametrize("every", ["nan", "inf", "1e400", "-inf", "0.05", "3601"])
def test_status_every_is_a_finite_number_of_seconds_from_a_tenth_to_an_hour(every):
    one_line_error(run("status", "any", "--follow", "--every", every), f"--every {float(every)}: give the seconds "
                   "between looks, from 0.1 to 3600")


def test_status_every_in_range_is_taken():
    res = run("status", "nope", "--follow", "--every", "3600")
    assert res.exit_code == 2 and "job 'nope' not found" in res.output, res.output


def test_a_map_key_given_twice_is_refused_not_the_last_kept(tiny_llama, tmp_path):
    with pytest.raises(InputError) as e:
        FieldMapping.parse(["prompt=Q: {q}", "answer=a", "prompt=q"])
    assert str(e.value) == "--map prompt= given twice ('prompt=Q: {q}', 'prompt=q'): give it once"
    with pytest.raises(InputError, match=r"^--map choices= given twice \('choices=a', 'choices=b'\): give it once "
                                         r"\(choices=F1,F2 takes every choice\)$"):
        FieldMapping.parse(["choices=a", "choices=b"])
    assert FieldMapping.parse(["choices=a,b", "answer=label"]).choices == ("a", "b")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"q": f"q{i}", "a": "x"}) + "\n" for i in range(4)))
    one_line_error(run("submit", str(tiny_llama), str(data), "--map", "prompt=q", "--map", "prompt={q}"),
                   "--map prompt= given twice")
    assert run("jobs", "--format", "json").output.strip() == "[]"  # nothing written


KERNELS = ("QUANTSELECT_GPTQ_CUDA_KERNEL", "QUANTSELECT_AWQ_CUDA_KERNEL")


@pytest.mark.parametrize("name, value, stored", [
    (KERNELS[0], "marlin", "marlin"), (KERNELS[0], " GPTQ_Marlin ", "gptq_marlin"), (KERNELS[0], "auto", "auto"),
    (KERNELS[1], "Marlin", "marlin"), (KERNELS[1], "gemm_triton", "gemm_triton"), (KERNELS[1], "", None),
])
def test_the_cuda_kernel_settings_are_read_lower_cased(name, value, stored):
    settings = get_settings({name: value})
    assert getattr(settings, name.removeprefix("QUANTSELECT_").lower()) == stored


@pytest.mark.parametrize("name, value", [(KERNELS[0], "marlinn"), (KERNELS[0], "gemm_triton"),
                                         (KERNELS[1], "gptq_marlin"), (KERNELS[1], "exllama_v1")])
def test_a_cuda_kernel_that_is_none_is_one_line_naming_the_setting_and_the_choices(monkeypatch, name, value):
    """Checked as the settings are read (on the machine that submits, and by the driver), not when a
    worker loads the artifact after quantizing it on a GPU for many minutes."""
    monkeypatch.setenv(name, value)
    line = one_line_error(run("jobs"), f"{name}={value!r}: give one of ")
    assert ("gptq_triton, gptq_marlin" if "GPTQ" in name else "gemm_triton, gemm, marlin") in line
    assert line.endswith(f", or unset it for {'gptq_triton' if 'GPTQ' in name else 'gemm_triton'}"), line


def test_the_worker_loads_with_the_kernel_named_as_checked(tmp_path, monkeypatch):
    """The worker still reads its own environment (a driver on a cluster hands its QUANTSELECT_* on)."""
    from quantselect.engines.quantize import gptqmodel_reload_kwargs

    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq", "bits": 4}}))
    monkeypatch.setenv("QUANTSELECT_AWQ_CUDA_KERNEL", " Marlin ")
    assert gptqmodel_reload_kwargs(tmp_path, "cuda")["quantization_config"].backend == "marlin"
    monkeypatch.setenv("QUANTSELECT_AWQ_CUDA_KERNEL", "marlinn")
    with pytest.raises(InputError, match="^QUANTSELECT_AWQ_CUDA_KERNEL='marlinn': give one of "):
        gptqmodel_reload_kwargs(tmp_path, "cuda")


def test_api_help_says_what_the_token_guards_and_what_host_and_port_mean():
    out = words(run("api", "--help").output)
    assert "every request but /healthz and the docs must carry it" in out, out
    assert "and to the names in $QUANTSELECT_API_HOSTS too" in out, out
    assert "--host TEXT Address to listen on. 127.0.0.1: this machine only; 0.0.0.0: every interface (set " \
           "QUANTSELECT_API_TOKEN)." in out, out
    assert "--port INTEGER RANGE Port to listen on" in out, out


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def test_every_job_argument_is_called_job_in_the_usage_line():
    named = []
    for path, command in _commands(cli):
        if any(p.name in ("job_id", "job_ids") for p in command.params):
            usage = run(*path, "--help").output.splitlines()[0]
            assert " JOB" in usage and "JOB_ID" not in usage, usage
            named.append(path[-1])
    assert {"status", "results", "recommend", "compare", "deploy", "undeploy", "export", "resume", "cancel",
            "delete"} <= set(named), named


def test_compare_takes_table_as_text_and_plan_takes_target_gpu(tiny_llama):
    svc, job = _job(tiny_llama, candidates=["int8"])
    text, table = (run("compare", job.id, "int8", "--format", f) for f in ("text", "table"))
    assert "Invalid value" not in table.output and (table.exit_code, table.output) == (text.exit_code, text.output)
    by_gpu = run("plan", str(tiny_llama), "--gpu", "L4")
    assert by_gpu.exit_code == 0 and "L4" in by_gpu.output, by_gpu.output
    assert run("plan", str(tiny_llama), "--target-gpu", "L4").output == by_gpu.output


def test_top_help_names_ray_address_and_candidates_help_keeps_its_examples_whole():
    assert "$QUANTSELECT_RAY_ADDRESS joins a Ray cluster (unset: $RAY_ADDRESS, else a local one)" in \
        words(run("--help").output)
    lines = [line.strip() for line in run("candidates", "--help").output.splitlines()]
    assert "--candidates int4-gptq:group_size=64,int4:group_size=64" in lines
    assert "--candidates int8,hub-awq=/models/llama-awq" in lines
