"""The CLI through click's runner, on a real local Ray (logical GPUs), real SQLite, real models."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from datetime import datetime

import pytest
from click.testing import CliRunner

from quantselect.cli import cli
from tests.fixtures.common import EXAMPLES, REPO

RESULT_FIELDS = {"name", "config", "status", "score", "relative_score", "passed", "weight_bytes", "peak_memory_bytes",
                 "quantize_seconds", "tokens_per_second", "cost_per_1m_tokens_usd", "error"}


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def job_count() -> int:
    from quantselect.service import Service

    svc = Service()
    try:
        return len(svc.list_jobs())
    finally:
        svc.close()


def test_import_and_help_stay_light():
    code = ("import sys, quantselect, quantselect.cli; "
            "print(','.join(m for m in ('torch','ray','transformers','sqlalchemy','fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == ""
    help_out = subprocess.run([sys.executable, "-m", "quantselect", "--help"], capture_output=True, text=True, cwd=REPO)
    assert help_out.returncode == 0
    for command in ("demo", "submit", "jobs", "status", "results", "recommend", "compare", "deploy", "undeploy",
                    "api", "db", "candidates", "plan", "gpus", "doctor"):
        assert command in help_out.stdout
    # Rendering the help (a default or a choice list computed from the cluster, the catalog, the
    # engines...) must not import them either: each command's, then what got imported.
    code = ("import contextlib, io, sys; from quantselect.cli import cli\n"
            "for args in ([], ['submit'], ['api'], ['deploy'], ['demo'], ['plan']):\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out):\n"
            "        try:\n"
            "            cli.main([*args, '--help'], prog_name='quantselect', standalone_mode=False)\n"
            "        except SystemExit:\n"
            "            pass\n"
            "    assert out.getvalue().startswith(' '.join(['Usage: quantselect', *args])), (args, out.getvalue())\n"
            "print(','.join(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr[-2000:]


def test_output_a_pipe_cuts_short_ends_quietly():
    """`quantselect results JOB | head`: once the reader has gone, the command stops without an
    error message, with the status a shell gives a command SIGPIPE ended."""
    p = subprocess.Popen([sys.executable, "-m", "quantselect", "gpus"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=REPO)
    p.stdout.close()  # the reader is gone before the first line is written
    err = p.stderr.read()
    assert (p.wait(), err) == (141, b"")


def test_jobs_lists_the_newest_first_filtered_by_status_and_count(tiny_llama):
    from quantselect.service import Service, SubmitRequest

    svc = Service()
    req = SubmitRequest(model=str(tiny_llama), items=[{"prompt": f"q{i}", "reference": "a"} for i in range(12)],
                        candidates=["int8"])
    a, b, c = (svc.submit(req) for _ in range(3))  # queued: created, not run
    svc.repo.finish_job(a.id, "failed", error="on purpose")
    svc.repo.finish_job(c.id, "succeeded")

    def ids(*args: str) -> list[str]:
        res = run("jobs", "--format", "json", *args)
        assert res.exit_code == 0, res.output
        return [j["id"] for j in json.loads(res.output)]

    assert ids() == [c.id, b.id, a.id]
    assert ids("--limit", "2") == [c.id, b.id]
    assert ids("--status", "failed", "--status", "queued") == [b.id, a.id]
    assert ids("--status", "running") == []
    res = run("jobs", "--status", "done")
    assert res.exit_code == 2 and "Invalid value for '--status'" in res.output
    # the next page: the jobs after the last one shown, however many were submitted meanwhile
    svc.submit(req)
    assert ids("--limit", "2", "--before", b.id) == [a.id]
    assert ids("--status", "queued", "--before", c.id) == [b.id]
    res = run("jobs", "--limit", "1")
    assert res.output.splitlines()[-1] == f"More: quantselect jobs --limit 1 --before {ids('--limit', '1')[0]}"
    assert "More:" not in run("jobs", "--before", b.id).output
    res = run("jobs", "--before", "nope")
    assert res.exit_code == 2 and res.output.splitlines() == [
        "Error: before='nope': no such job (deleted meanwhile?); give the id of the last job of the page before"]


def test_status_says_when_a_running_jobs_driver_is_gone(tiny_llama):
    """A driver killed with its job running (kill -9, a lost machine) leaves the job 'running';
    `status` tells it apart by the driver's heartbeat, and says what to do."""
    from datetime import datetime, timedelta

    from sqlalchemy import text

    from quantselect.service import Service, SubmitRequest

    svc = Service()
    job = svc.submit(SubmitRequest(model=str(tiny_llama), items=[{"prompt": f"q{i}", "reference": "a"}
                                                                 for i in range(12)], candidates=["int8"]))
    svc.claim(job.id)  # this process is its driver now, and has just been heard from
    svc.repo.set_job_stage(job.id, "running 2 candidate(s) on Ray")
    assert run("status", job.id).output.splitlines()[0] == f"Job {job.id}: running: running 2 candidate(s) on Ray"
    with svc.repo.engine.begin() as conn:  # its last heartbeat, ten minutes ago
        conn.execute(text("UPDATE jobs SET heartbeat_at = :t WHERE id = :id"),
                     {"t": datetime.utcnow() - timedelta(minutes=10), "id": job.id})
    line = run("status", job.id).output.splitlines()[0]
    assert line.startswith(f"Job {job.id}: running, but its driver ({svc.get_job(job.id).driver}) has not been heard "
                           "from for 10m00s: it is gone; `quantselect resume") and line.endswith("continues the job")


def test_candidates_lists_availability():
    res = run("candidates", "--format", "json")
    rows = {r["name"]: r for r in json.loads(res.output)}
    for name in ("baseline", "bf16", "int8", "w8a8", "int4"):
        assert rows[name]["available"], rows[name]
    assert rows["fp8"]["available"] is False and "compute capability" in rows["fp8"]["reason"]
    for name in ("nf4", "int4-gptq", "int4-awq"):  # installed by the set-up: they run on CPU
        assert rows[name]["available"], rows[name]
    assert rows["int4-gptq"]["parameters"] == {"bits": 4, "group_size": 128} and rows["int4-gptq"]["calibrated"]


def test_db_upgrade_creates_the_schema(qs_home):
    res = run("db", "upgrade")
    assert res.exit_code == 0 and "revision" in res.output
    assert (qs_home / "quantselect.db").exists()


@pytest.fixture
def bad_files(tmp_path):
    files = {
        "malformed": ['{"prompt": "a", "choices": ["x", "y"], "answer": 0}', '{"prompt": oops}'],
        "empty": [],
        "out_of_range": ['{"prompt": "a", "choices": ["x", "y"], "answer": 0}', '{"prompt": "b", "choices": ["x", "y"], "answer": 5}'],
        "calibration_empty": [],
    }
    paths = {}
    for name, lines in files.items():
        p = tmp_path / f"{name}.jsonl"
        p.write_text("\n".join(lines))
        paths[name] = str(p)
    return paths


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("missing", [], "dataset file not found"),
        ("malformed", [], "malformed.jsonl:2: malformed JSON"),
        ("empty", [], "empty.jsonl: the dataset is empty"),
        ("out_of_range", [], "out_of_range.jsonl:2: field 'answer' is 5, out of range"),
        ("good", ["--candidates", "int8,int5"], "unknown candidate 'int5'"),
        ("good", ["--confidence", "1.2"], "confidence 1.2 must be in [0.5, 1)"),
        ("good", ["--threshold", "0"], "threshold 0.0 must be in (0, 1.5]"),
        ("good", ["--threshold", "1.6"], "threshold 1.6 must be in (0, 1.5]"),
        ("bad_model", [], "model path does not exist"),
        ("good", ["--candidates", "int4-gptq:group_size=0"], "gptq group_size 0 must be one of 16, 32, 64, 128, 256"),
        ("good", ["--candidates", "int4-gptq:bits=5"], "gptq bits 5 must be one of 2, 3, 4, 8"),
        ("good", ["--candidates", "int4:group_size=256"], "group size 256 does not divide the model's hidden size 128"),
        ("good", ["--candidates", "int4-gptq", "--calibration", "EMPTY"], "holds no samples"),
        ("good", ["--candidates", "int4-gptq", "--limit", "40", "--calibration-samples", "30"],
         "--calibration-samples 30 would leave 10 of 40 items"),
        ("good", ["--candidates", "int4-gptq", "--calibration-samples", "0"], "calibration-samples 0 must be between"),
        ("good", ["--calibration", "EMPTY"], "only used by int4-gptq / int4-awq"),
        ("good", ["--target-gpu", "B300"], "unknown target GPU 'B300'"),
        ("good", ["--gpu-hour-usd", "-1"], "gpu-hour price -1.0 must be a positive"),
        ("no_weights", [], "folder has no weights"),
        ("not_causal", [], "is not a causal language model"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_llama, bad_files, tmp_path, case, extra, message):
    if case in ("no_weights", "not_causal"):
        folder = tmp_path / case
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
        if case == "not_causal":
            (folder / "model.safetensors").write_bytes(b"")
        model = str(folder)
        case = "good"
    elif case == "bad_model":
        model = str(tmp_path / "no-such-model")
    else:
        model = str(tiny_llama)
    extra = [bad_files["calibration_empty"] if x == "EMPTY" else x for x in extra]
    dataset = {"missing": str(tmp_path / "nope.jsonl"), "good": str(EXAMPLES / "piqa-300.jsonl"),
               "bad_model": str(EXAMPLES / "piqa-300.jsonl")}.get(case) or bad_files[case]
    run("db", "upgrade")
    before = job_count()
    res = CliRunner().invoke(cli, ["submit", model, dataset, *extra])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert job_count() == before


def test_submit_runs_candidates_in_parallel_one_per_gpu_and_stores_results(ray_cluster, tiny_llama):
    res = run("submit", str(tiny_llama), str(EXAMPLES / "piqa-300.jsonl"), "--limit", "12",
              "--candidates", "int8,int4,bf16", "--threshold", "0.5", "--gpu-hour-usd", "3.0")
    assert res.exit_code == 0, res.output
    job_id = res.output.split()[1].rstrip(":")
    assert "Recommendation" in res.output and "baseline" in res.output

    from quantselect.domain.candidates import CATALOG, config_from_dict

    rows = json.loads(run("results", job_id, "--format", "json").output)
    assert [r["name"] for r in rows] == ["baseline", "int8", "int4", "bf16"]
    for r in rows:
        assert RESULT_FIELDS <= set(r), set(r) ^ RESULT_FIELDS
        assert r["status"] == "succeeded", r
        assert 0 <= r["score"] <= 1 and r["weight_bytes"] > 0 and r["peak_memory_bytes"] > 0
        assert r["tokens_per_second"] > 0 and r["cost_per_1m_tokens_usd"] > 0
        assert len(r["gpu_ids"]) == 1, "each candidate holds exactly one (logical) GPU"
        assert config_from_dict(r["config"]) == CATALOG[r["name"]]  # what a Serve config's args.config takes
    base = rows[0]
    assert base["relative_score"] == pytest.approx(1.0)
    sizes = {r["name"]: r["weight_bytes"] for r in rows}
    assert sizes["int8"] < sizes["baseline"] and sizes["int4"] < sizes["baseline"]

    # Two logical GPUs: some pair of candidates ran at the same time, on different GPUs.
    spans = [(datetime.fromisoformat(r["started_at"]), datetime.fromisoformat(r["finished_at"]), r["gpu_ids"][0])
             for r in rows]
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:] if a[0] < b[1] and b[0] < a[1]]
    assert overlapping, spans
    assert all(a[2] != b[2] for a, b in overlapping), "concurrent candidates must not share a GPU"

    items = json.loads(run("results", job_id, "--items").output)
    assert len(items) == 4 * 12 and {"candidate", "index", "correct", "prediction", "choice_logprobs"} <= set(items[0])
    # compare: the items int4 got wrong where the baseline was right, from the same stored items.
    right = {(i["candidate"], i["index"]): i["correct"] for i in items}
    worse = [n for n in range(12) if right["baseline", n] and not right["int4", n]]
    cmp = json.loads(run("compare", job_id, "int4", "--format", "json").output)
    assert cmp["n_items"] == 12 and [d["index"] for d in cmp["worse"]] == worse and cmp["n_worse"] == len(worse)
    assert run("compare", job_id, "int4").output.startswith(f"int4 against baseline on 12 items (accuracy): "
                                                           f"{len(worse)} worse")
    bad = CliRunner().invoke(cli, ["compare", job_id, "nope"])
    assert bad.exit_code != 0 and "no candidate 'nope'" in bad.output

    rec = json.loads(run("recommend", job_id, "--threshold", "0.01", "--format", "json").output)
    assert rec["chosen"] is not None and rec["threshold"] == 0.01
    assert rec["policy"] == "point" and rec["confidence"] == 0.95
    for c in rec["candidates"]:  # paired evidence from the stored items
        assert c["n_items"] == 12 and c["ci_low"] <= c["relative_score"] <= c["ci_high"], c
        assert c["verdict"] in ("pass", "fail", "inconclusive")
    strict_policy = json.loads(run("recommend", job_id, "--threshold", "0.9", "--policy", "lower-bound",
                                   "--confidence", "0.9", "--format", "json").output)
    assert strict_policy["policy"] == "lower-bound" and strict_policy["confidence"] == 0.9
    assert all(c["passed"] == (c["ci_low"] >= 0.9) for c in strict_policy["candidates"])
    strict = json.loads(run("recommend", job_id, "--threshold", "1.5", "--format", "json").output)
    assert strict["chosen"] is None and all(c["reason"] for c in strict["candidates"])

    listing = json.loads(run("jobs", "--format", "json").output)
    assert [j["id"] for j in listing] == [job_id] and listing[0]["status"] == "succeeded"
    own = json.loads(run("recommend", job_id, "--format", "json").output)  # the job's own settings
    chosen = next((c for c in own["candidates"] if c["name"] == own["chosen"]), {})
    assert listing[0]["recommended"] == {"candidate": own["chosen"], "threshold": 0.5,
                                         "relative_score": chosen.get("relative_score"),
                                         "cost_per_1m_tokens_usd": chosen.get("cost_per_1m_tokens_usd")}, listing[0]
    assert (f"{own['chosen']} ({chosen['relative_score']:.1%}, $" if chosen else "none >= 50%") in run("jobs").output
    assert "succeeded" in run("status", job_id).output
    table = run("results", job_id).output
    assert "int4" in table and "Recommendation" in table
    md = run("results", job_id, "--format", "markdown").output
    assert md.startswith(f"**Job {job_id} (succeeded)") and "| candidate | status | items |" in md
    assert sum(line.startswith("| int") for line in md.splitlines()) == 2 and "```\nRecommendation" in md
    flat = list(csv.DictReader(io.StringIO(run("results", job_id, "--format", "csv").output)))
    assert [r["name"] for r in flat] == [r["name"] for r in rows]
    assert [float(r["score"]) for r in flat] == [r["score"] for r in rows]
    assert json.loads(flat[1]["gpu_ids"]) == rows[1]["gpu_ids"]
    per_item = list(csv.DictReader(io.StringIO(run("results", job_id, "--items", "--format", "csv").output)))
    assert len(per_item) == len(items) and json.loads(per_item[0]["choice_logprobs"]) == items[0]["choice_logprobs"]
    # A dry run of the same submission with one more candidate: what a stored result spares.
    dry = run("submit", str(tiny_llama), str(EXAMPLES / "piqa-300.jsonl"), "--limit", "12",
              "--candidates", "int8,int4,bf16,w8a8", "--threshold", "0.5", "--gpu-hour-usd", "3.0", "--dry-run")
    stored = {line.split()[0]: line.rstrip().endswith("reused (same inputs)") for line in dry.output.splitlines()
              if line.split() and line.split()[0] in ("baseline", "int8", "int4", "bf16", "w8a8")}
    assert stored == {"baseline": True, "int8": True, "int4": True, "bf16": True, "w8a8": False}, dry.output
    assert job_count() == 1


def test_submit_deploy_that_cannot_deploy_shows_the_results_then_says_why(ray_cluster, tiny_llama):
    """The job succeeded: its results are printed and stored; the deployment it asked for did not
    happen (a random model scores 0 on GSM8K: nothing to recommend), which is the one-line error."""
    res = CliRunner().invoke(cli, ["submit", str(tiny_llama), str(EXAMPLES / "gsm8k-50.jsonl"), "--limit", "4",
                                   "--max-new-tokens", "8", "--candidates", "int8", "--deploy"])
    job_id = res.output.split()[1].rstrip(":")
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    assert "Recommendation" in res.output and "int8" in res.output, res.output
    assert res.output.rstrip().splitlines()[-1] == (
        f"Error: job {job_id} succeeded but was not deployed: no recommendation: the baseline scores 0 "
        f"on this task, so there is nothing to keep; name the candidate to use (`quantselect deploy {job_id} "
        "--candidate NAME` serves one)"), res.output
    shown = run("status", job_id).output
    assert shown.startswith(f"Job {job_id}: succeeded\n") and "  not deployed: job " in shown, shown
    # so does the driver a cluster runs (`submit --address`: `run-job`), whose exit status --wait reports
    from quantselect.service import Service

    svc = Service()
    again = svc.repo.create_job(svc.repo.get_job_spec(job_id)).id
    res = CliRunner().invoke(cli, ["run-job", again])
    assert res.exit_code == 1 and res.output.rstrip().splitlines()[-1].startswith(
        f"Error: job {again} succeeded but was not deployed: no recommendation"), res.output


def test_dry_run_says_what_would_run_and_submits_nothing(tiny_llama):
    res = run("submit", str(tiny_llama), str(EXAMPLES / "piqa-300.jsonl"), "--limit", "60",
              "--candidates", "int8,int4-gptq:group_size=64,fp8", "--calibration-samples", "12", "--dry-run")
    assert res.exit_code == 0, res.output
    out = res.output
    assert out.startswith("Dry run: nothing submitted, nothing run.")
    assert "Data: 48 items of" in out and "(multiple_choice, metric accuracy); 12 more items held out" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()}
    gptq = "int4-gptq:group_size=64"
    assert "bits=4 group_size=64" in rows[gptq] and "no: fp8 needs a CUDA GPU" in rows["fp8"]
    weights = {n: float(rows[n].split("MiB")[0].split()[-1]) for n in ("baseline", "int8", gptq)}
    assert weights[gptq] < weights["int8"] < weights["baseline"]
    assert job_count() == 0
    bad = CliRunner().invoke(cli, ["submit", str(tiny_llama), str(EXAMPLES / "piqa-300.jsonl"), "--dry-run",
                                   "--candidates", "int4:group_size=256"])
    assert bad.exit_code == 2 and "group size 256 does not divide" in bad.output and job_count() == 0


def test_unknown_job_is_a_clear_error():
    res = CliRunner().invoke(cli, ["status", "nope"])
    assert res.exit_code == 2 and "job 'nope' not found" in res.output
    for args in (["deploy", "nope"], ["undeploy", "nope"]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2 and "not found" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["deploy", "nope", "--engine", "fast"])
    assert res.exit_code == 2 and "'fast' is not one of 'static', 'dynamic'" in res.output
    res = CliRunner().invoke(cli, ["recommend", "nope"])
    assert res.exit_code == 2 and "not found" in res.output


def test_progress_lines_give_the_rate_and_the_time_left(capsys):
    from quantselect.cli import Progress

    now = [0.0]
    p = Progress(every=60, clock=lambda: now[0])

    def at(t: float, **snapshot) -> list[str]:
        now[0] = t
        p.update(snapshot)
        return [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines()]

    assert at(0, int8=("quantizing", 0, 0)) == ["int8       quantizing"]  # no count: int8 takes seconds
    assert at(5, int8=("evaluating", 100, 1000)) == ["int8       evaluating  100/1000 items"]  # carried over: no rate yet
    assert at(15, int8=("evaluating", 200, 1000)) == []  # same quarter, under a minute: quiet
    # A new quarter: 150 items in 20 s since evaluating began (the 100 carried items do not count).
    assert at(25, int8=("evaluating", 250, 1000)) == ["int8       evaluating  250/1000 items, 7.5 items/s, ~1m40s left"]
    assert at(80, int8=("evaluating", 300, 1000)) == []  # 55 s since the last line
    # A minute without a line while items move: a line anyway (a long job is never silent for long).
    assert at(86, int8=("evaluating", 310, 1000)) == ["int8       evaluating  310/1000 items, 2.59 items/s, ~4m26s left"]
    assert at(200, int8=("evaluating", 310, 1000)) == []  # nothing moved for under two minutes: quiet
    # Nothing moved for two minutes (a long GPTQ quantization, a slow batch): a line that it still runs.
    assert at(206, int8=("evaluating", 310, 1000)) == ["int8       evaluating  310/1000 items, 3m21s in this phase"]
    assert at(300, int8=("evaluating", 310, 1000)) == []
    # Measuring counts its steps, by name: on a GPU the first decode compiles its engine for a while.
    assert at(310, int8=("measuring", 0, 3)) == ["int8       measuring   prefill (1/3)"]
    assert at(312, int8=("measuring", 1, 3)) == ["int8       measuring   decode at batch 1 (2/3)"]
    assert at(433, int8=("measuring", 1, 3)) == ["int8       measuring   decode at batch 1 (2/3), 2m03s in this phase"]
    assert at(440, int8=("measuring", 2, 3)) == ["int8       measuring   decode at batch 16 (3/3)"]
    # GPTQ and AWQ count their layers while they quantize: the time a layer takes, and what is left.
    assert at(0, gptq=("quantizing", 0, 0)) == ["gptq       quantizing"]
    assert at(10, gptq=("quantizing", 0, 32)) == []
    assert at(130, gptq=("quantizing", 0, 32)) == ["gptq       quantizing  0/32 layers, 2m10s in this phase"]
    assert at(250, gptq=("quantizing", 8, 32)) == ["gptq       quantizing  8/32 layers, 31s a layer, ~12m30s left"]
    # A name longer than the column widens it for every line after, so that the phases stay aligned.
    long = "int4-gptq:group_size=64"
    assert at(500, **{long: ("quantizing", 0, 0), "w8a8": ("evaluating", 0, 100)}) == [
        f"{long} quantizing", f"{'w8a8':<{len(long)}} evaluating  0/100 items"]
    # Several candidates where nothing moves: one line names them all, not one line each.
    both = {long: ("quantizing", 0, 0), "w8a8": ("evaluating", 0, 100)}
    assert at(590, **both) == []
    assert at(620, **both) == [f"still running: {long} quantizing, 2m00s in this phase; "
                               "w8a8 evaluating 0/100 items, 2m00s in this phase"]
    assert at(700, **both) == []


def test_library_progress_bars_stay_out_of_a_log():
    """transformers' tqdm bars (dequantizing a GGUF file, loading weights) redraw with carriage
    returns: outside a terminal the CLI turns them off, before the libraries are imported."""
    code = ("from quantselect.cli import cli; cli(['gpus'], standalone_mode=False); "
            "from tqdm.auto import tqdm; [i for i in tqdm(range(3), desc='a library bar')]")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 0 and "H100" in out.stdout, out.stderr
    assert "a library bar" not in out.stderr


def test_delete_forgets_finished_jobs_and_refuses_a_running_or_served_one(tiny_llama):
    """`quantselect delete`: a finished job goes with its results and items; a queued or running
    job must be cancelled first, a served one undeployed first, and nothing is removed then."""
    from quantselect.service import Service, SubmitRequest

    svc = Service()
    items = [{"prompt": f"q{i}", "choices": ["a", "b"], "answer": 0} for i in range(4)]
    jobs = [svc.submit(SubmitRequest(model=str(tiny_llama), items=items, candidates=["int8"])) for _ in range(3)]
    queued, served, done = (j.id for j in jobs)
    res = CliRunner().invoke(cli, ["delete", queued])
    assert res.exit_code == 2 and res.output.strip() == f"Error: job {queued} is queued: cancel it first (quantselect cancel {queued})"
    svc.repo.set_job_status(served, "succeeded")
    svc.repo.set_deployment(served, "int8", "http://127.0.0.1:8000/models/x/v1")
    res = CliRunner().invoke(cli, ["delete", served])
    assert res.exit_code == 2 and f"serves int8: stop it first (quantselect undeploy {served})" in res.output
    svc.repo.set_job_status(done, "failed", error="boom")
    assert run("delete", done).output == f"Deleted job {done}.\n"
    assert sorted(j.id for j in svc.list_jobs()) == sorted([queued, served])
    res = CliRunner().invoke(cli, ["delete", done])
    assert res.exit_code == 2 and f"job '{done}' not found" in res.output
    assert CliRunner().invoke(cli, ["delete"]).exit_code == 2  # a job id is required


@pytest.mark.parametrize("name, value, message", [
    ("QUANTSELECT_MAX_RETRIES", "abc", "give a whole number (default 1)"),
    ("QUANTSELECT_SERVE_PORT", "70000", "give a whole number from 1 to 65535"),
    ("QUANTSELECT_HEARTBEAT_STALE_SECONDS", "soon", "give a number (default 30.0)"),
    ("QUANTSELECT_STREAM_CHUNK", "0", "give a whole number of at least 1"),
    ("QUANTSELECT_GPU_MEMORY", "80 GB.", "expected one GPU's memory, such as 80GiB or 24GB"),
    ("QUANTSELECT_CANDIDATE_TIMEOUT", "soon", "give a duration such as 90m, 6h, 1h30m or 45s"),
])
def test_a_bad_setting_is_one_line_that_names_it(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    res = CliRunner().invoke(cli, ["jobs"])
    assert res.exit_code == 2 and res.output == f"Error: {name}={value!r}: {message}\n", res.output


def test_durations_read_and_print_the_way_people_write_them():
    """One parser for QUANTSELECT_CANDIDATE_TIMEOUT, --candidate-timeout (REST candidate_timeout) and
    --older-than."""
    from quantselect.domain.durations import format_duration, parse_duration
    from quantselect.errors import InputError
    from quantselect.settings import get_settings

    for text, seconds in (("90", 90), ("45s", 45), ("90m", 5400), ("6h", 21600), ("1h30m", 5400), ("1.5h", 5400),
                          (" 6 H ", 21600), ("30d", 30 * 86400), ("2w", 14 * 86400)):
        assert parse_duration(text, "x") == seconds, text
        assert get_settings({"QUANTSELECT_CANDIDATE_TIMEOUT": text}).candidate_timeout_seconds == seconds, text
    assert get_settings({}).candidate_timeout_seconds is None
    for bad in ("d", "-1d", "3x", "", "1h30", "0s"):
        with pytest.raises(InputError, match=r"^x="):
            parse_duration(bad, "x")
    with pytest.raises(InputError, match=r"^--older-than='30': give a duration such as 30d"):
        parse_duration("30", "--older-than", bare_seconds=False)  # 30 what? (as seconds it could prune everything)
    assert [format_duration(s) for s in (45, 190, 7500)] == ["45s", "3m10s", "2h05m"]


def test_a_job_s_own_candidate_timeout_is_stored_and_wins_over_the_driver_s(tiny_llama, monkeypatch, capsys):
    """`submit --candidate-timeout` (REST candidate_timeout): stored with the job, said when it is
    submitted, and the limit its driver enforces instead of QUANTSELECT_CANDIDATE_TIMEOUT (enforcement
    itself: test_faults); a bad one is a one-line error and nothing is submitted."""
    from dataclasses import replace

    from quantselect.cli import _announce
    from quantselect.service import Service, SubmitRequest

    monkeypatch.setenv("QUANTSELECT_CANDIDATE_TIMEOUT", "6h")
    svc = Service()
    job = svc.submit(SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=4,
                                   candidates=["int8"], candidate_timeout=5400))
    assert job.candidate_timeout == 5400 and svc.get_job(job.id).to_dict()["candidate_timeout_seconds"] == 5400
    spec = svc.repo.get_job_spec(job.id)
    assert svc._candidate_timeout(spec) == {"candidate_timeout": 5400, "timeout_source": "the job's candidate timeout"}
    assert svc._candidate_timeout(replace(spec, candidate_timeout=None)) == {"candidate_timeout": 6 * 3600}
    _announce(job)
    assert capsys.readouterr().out.endswith("candidates baseline, int8; each may run 1h30m at most\n")
    bad = CliRunner().invoke(cli, ["submit", str(tiny_llama), str(EXAMPLES / "piqa-300.jsonl"),
                                   "--candidate-timeout", "soon"])
    assert bad.exit_code == 2 and bad.output == ("Error: --candidate-timeout='soon': give a duration such as 90m, 6h, "
                                                 "1h30m or 45s\n"), bad.output
    assert [j.id for j in svc.list_jobs()] == [job.id]


def test_status_follow_prints_each_change_then_the_results(ray_cluster, tiny_llama):
    """`status JOB --follow` on a job another process drives (here a thread, as the API server does):
    the first state, then a line per change, then the results table; exit 0."""
    import threading

    from quantselect.service import Service, SubmitRequest

    svc = Service()
    job = svc.submit(SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=8,
                                   candidates=["int8"], threshold=0.5))
    driver = threading.Timer(1.0, svc.run_job, args=(job.id,))  # starts once --follow watches
    driver.start()
    try:
        res = CliRunner().invoke(cli, ["status", job.id, "--follow", "--every", "0.2"])
    finally:
        driver.join(timeout=300)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    # the first state: queued, or already preparing (the driver's timer may win on a loaded machine)
    assert re.match(f"Job {job.id}: (queued|running: preparing the model)$", lines[0]), lines
    assert lines[1].split() == ["baseline", "pending"], lines
    changes = [line.split("] ", 1)[1] for line in lines if line.startswith("[")]
    assert f"Job {job.id}: succeeded" in changes and changes.index("baseline   succeeded") > 0, changes
    assert any(c.startswith(f"Job {job.id}: running") for c in changes), changes
    assert "int8       succeeded" in changes and "Recommendation" in res.output, res.output


def test_status_follow_prints_a_moving_count_at_each_quarter_or_once_a_minute():
    """A running candidate's stored phase moves every few seconds; --follow prints a new status or
    phase at once, a count at each quarter, and otherwise one line a minute per candidate."""
    from quantselect.cli import _Changes

    changes = _Changes({"job": "Job j: running", "candidate a": "  a running: evaluating 0/600 items"}, 1000.0)
    seen = []
    for t, done in enumerate(range(0, 600, 10), start=1):  # 10 items a second
        seen += [(t, line) for line in changes.worth_printing(
            {"job": "Job j: running", "candidate a": f"  a running: evaluating {done}/600 items"}, 1000.0 + t)]
    assert seen == [(16, "  a running: evaluating 150/600 items"), (31, "  a running: evaluating 300/600 items"),
                    (46, "  a running: evaluating 450/600 items")]
    slow = [changes.worth_printing({"candidate a": f"  a running: evaluating {452 + i}/600 items"}, 1046.0 + i)
            for i in range(1, 100)]
    assert [i + 1 for i, lines in enumerate(slow) if lines] == [60], slow  # a minute after the last one
    assert changes.worth_printing({"candidate a": "  a running: measuring prefill (1/3)"}, 1146.0) == [
        "  a running: measuring prefill (1/3)"]
    assert changes.worth_printing({"candidate a": "  a running: measuring decode at batch 1 (2/3)"}, 1147.0) == [
        "  a running: measuring decode at batch 1 (2/3)"]
    assert changes.worth_printing({"candidate a": "  a succeeded", "deployment": "  deployed a at x"}, 1148.0) == [
        "  a succeeded", "  deployed a at x"]
    assert changes.worth_printing({"candidate a": "  a succeeded", "deployment": "  deployed a at x"}, 1149.0) == []


def test_status_follow_ends_on_a_failed_job_or_a_driver_that_is_gone(tiny_llama, monkeypatch):
    from quantselect.service import Service, SubmitRequest

    monkeypatch.setenv("QUANTSELECT_HEARTBEAT_STALE_SECONDS", "1")
    svc = Service()
    req = SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=4, candidates=["int8"])
    failed = svc.submit(req)
    svc.repo.finish_job(failed.id, "failed", error="the baseline failed, nothing to compare with: boom")
    res = CliRunner().invoke(cli, ["status", failed.id, "--follow"])
    assert res.exit_code == 1 and res.output.splitlines()[-1] == (
        f"Error: job {failed.id} failed: the baseline failed, nothing to compare with: boom"), res.output
    gone = svc.submit(req)
    svc.repo.claim_job(gone.id, driver="elsewhere:4242", stale_after=1)  # and never heard from again
    res = CliRunner().invoke(cli, ["status", gone.id, "--follow", "--every", "0.2"])
    assert res.exit_code == 1, res.output
    assert re.search(r"its driver \(elsewhere:4242\) has not been heard from for \d+s: it is gone", res.output), res.output
    assert res.output.splitlines()[-1] == (f"Error: job {gone.id}: its driver is gone; "
                                            f"`quantselect resume {gone.id}` continues it"), res.output


def test_status_of_a_job_whose_cluster_does_not_answer_says_so_and_leaves_it_queued(tiny_llama):
    """`submit --address` stored the Ray job driving the job; `status` asks that cluster whether the
    driver still lives (tests/test_remote.py), and when it cannot be reached says so in one line,
    failing nothing."""
    from tests.fixtures.ray_cluster import free_port
    from quantselect.service import Service, SubmitRequest

    svc = Service()
    job = svc.submit(SubmitRequest(model=str(tiny_llama), items=[{"prompt": f"q{i}", "reference": "a"}
                                                                 for i in range(12)], candidates=["int8"]))
    address = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    svc.repo.set_ray_submission(job.id, address, f"quantselect-{job.id}")
    res = run("status", job.id)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == f"Job {job.id}: queued"
    assert lines[-1].startswith(f"  cannot ask the Ray cluster at {address} about the job's driver, Ray job "
                                f"quantselect-{job.id}: "), res.output
    assert svc.get_job(job.id).status == "queued"


def test_stop_strings_keep_their_characters_and_a_bad_escape_is_an_input_error(tiny_llama):
    from quantselect.cli import _unescape

    assert _unescape("Réponse :\\n") == "Réponse :\n" and _unescape("答案\\t") == "答案\t"  # (was mojibake)
    res = run("submit", str(tiny_llama), str(EXAMPLES / "piqa-300.jsonl"), "--stop", "a\\", "--dry-run")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert res.output.strip() == ("Error: --stop 'a\\\\': \\ at end of string; write a backslash as \\\\ "
                                  "(escapes: \\n, \\t, \\\\)"), res.output


def test_settings_that_would_mislead_are_refused_or_made_absolute(tmp_path, monkeypatch):
    """A relative QUANTSELECT_HOME is made absolute (else each working directory had its own database);
    a number that is not finite, an '@' left in the database password, a non-ASCII token: one line each,
    naming the variable (and not showing the password)."""
    from quantselect.errors import InputError
    from quantselect.settings import get_settings

    monkeypatch.chdir(tmp_path)
    s = get_settings({"QUANTSELECT_HOME": "qs", "QUANTSELECT_ARTIFACTS_DIR": " arts "})
    assert s.home == tmp_path / "qs" and s.db_url == f"sqlite:///{tmp_path / 'qs' / 'quantselect.db'}"
    assert s.artifacts_dir == tmp_path / "arts"
    for name in ("QUANTSELECT_HEARTBEAT_STALE_SECONDS", "QUANTSELECT_DB_RETRY_SECONDS"):
        for value in ("nan", "inf"):
            with pytest.raises(InputError, match=f"^{name}='{value}': give a number"):
                get_settings({name: value})
    with pytest.raises(InputError, match=r"^QUANTSELECT_DB_URL: its user or password holds an '@'") as e:
        get_settings({"QUANTSELECT_DB_URL": "postgresql://alice:hunter@2024pass@db:5432/qs"})
    assert "2024pass" not in str(e.value)
    assert get_settings({"QUANTSELECT_DB_URL": "postgresql://alice:p%40ss@db/qs"}).db_url.endswith("@db/qs")
    with pytest.raises(InputError, match="^QUANTSELECT_API_TOKEN: give a token of ASCII"):
        get_settings({"QUANTSELECT_API_TOKEN": "clé-secrète-de-vingt-caractères"})


def test_a_dashboard_url_as_the_ray_address_is_a_one_line_error():
    """Ray's Jobs docs set RAY_ADDRESS=http://HEAD:8265; ray.init takes no such address (a ValueError,
    shown as an internal error)."""
    from quantselect.errors import QuantselectError
    from quantselect.orchestration.cluster import connect
    from quantselect.settings import get_settings

    with pytest.raises(QuantselectError, match=r"^Ray address http://127\.0\.0\.1:8265 is a dashboard URL: give HOST:6379"):
        connect(get_settings({"QUANTSELECT_RAY_ADDRESS": "http://127.0.0.1:8265"}))
