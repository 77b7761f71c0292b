"""The ``quantselect`` command line. Parsing and rendering only: the work is in ``service``.

Imports stay light at module level (no torch, ray, sqlalchemy, fastapi) so ``--help`` is fast.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

import click

from quantselect.domain.candidates import BASELINE
from quantselect.domain.dataset import METRICS as METRICS_BY_KIND
from quantselect.domain.dataset import FieldMapping
from quantselect.domain.durations import format_duration as _duration
from quantselect.domain.durations import parse_duration
from quantselect.domain.results import (
    CANCELLED, DEFAULT_CALIBRATION_SAMPLES, DEFAULT_CONFIDENCE, DEFAULT_POLICY, DEFAULT_THRESHOLD, FAILED, FINISHED,
    JOB_STATUSES, POLICIES, QUEUED, RUNNING, SUCCEEDED, phase_count,
)
from quantselect.errors import InputError, QuantselectError


METRICS = tuple(dict.fromkeys(m for metrics in METRICS_BY_KIND.values() for m in metrics))


class Group(click.Group):
    """Turns our errors into one-line messages and exit codes (2 for bad input), no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except QuantselectError as e:
            err = click.ClickException(str(e))
            err.exit_code = e.exit_code
            raise err from None
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except BrokenPipeError:  # `quantselect results JOB | head`: the reader has all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
            raise click.exceptions.Exit(141) from None  # as a shell reports a command SIGPIPE ended
        except Exception as e:
            if os.environ.get("QUANTSELECT_DEBUG"):
                raise
            msg = " ".join(str(e).split())[:300]
            raise click.ClickException(f"internal error: {type(e).__name__}: {msg} (QUANTSELECT_DEBUG=1 shows the traceback)") from None


def _service():
    from quantselect.service import Service

    return Service()


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(cls=Group)
@click.version_option(package_name="quantselect")
def cli() -> None:
    """Which precision should I deploy? quantselect quantizes candidates of your model in parallel on
    Ray, measures each on your own task, recommends the cheapest that keeps quality, and serves it.

    State lives under $QUANTSELECT_HOME (default ~/.quantselect); the database is
    $QUANTSELECT_DB_URL (default SQLite under the home); $QUANTSELECT_RAY_ADDRESS joins a Ray
    cluster (unset: $RAY_ADDRESS, else a local one)."""
    # Libraries' import-time notes a user cannot act on: torchao's CUDA-only extensions that do not
    # load on a CPU, torch's deprecation notes about torchao's enums. Errors still show.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Libraries' tqdm bars (transformers dequantizing a GGUF file, loading and writing weights) are
    # redrawn with carriage returns: in a log or a pipe they are one endless line. Our own progress
    # lines say the same. tqdm reads this when it is imported, which the commands do lazily, after
    # this; Ray workers started from here inherit it.
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")


class Progress:
    """One line per candidate event: a new phase, every quarter of its items (of its layers while
    GPTQ / AWQ quantize), and at least every ``every`` seconds while they move, with the rate and the
    time left. A phase where nothing moves (quantizing an 8B model with GPTQ takes many minutes,
    compiling a GPU engine some) still gets a line every ``2 * every`` seconds, saying how long it
    has run; candidates silent at the same time share one such line."""

    def __init__(self, every: float = 60.0, clock: Any = time.monotonic) -> None:
        self.clock, self.every = clock, every
        self.t0 = clock()
        self.seen: dict[str, tuple[str, int, int, float]] = {}  # name -> phase, quarter, done, printed at
        self.began: dict[str, tuple[str, int, float]] = {}  # name -> phase, done, time first seen in it
        self.width = 10  # the name column: the longest candidate name seen (int4-gptq:group_size=64)

    def status(self, text: str) -> None:
        click.echo(f"[{self.clock() - self.t0:6.1f}s] {text}")

    def update(self, snapshot: dict[str, tuple[str, int, int]]) -> None:
        now = self.clock()
        self.width = max([self.width, *map(len, snapshot)])
        quiet: list[tuple[str, str, str]] = []  # (name, phase, count) of each candidate where nothing moved
        for name, (phase, done, total) in sorted(snapshot.items()):
            if phase in (SUCCEEDED, FAILED):
                continue
            if self.began.get(name, ("",))[0] != phase:
                self.began[name] = (phase, done, now)
            quarter = (4 * done // total) if total else 0
            last = self.seen.get(name)
            count = f" {phase_count(phase, done, total)}".rstrip()
            if last is None or last[:2] != (phase, quarter) or (done != last[2] and now - last[3] >= self.every):
                self.seen[name] = (phase, quarter, done, now)
                self.status(f"{name:<{self.width}} {phase:<11}{count}{self._pace(name, phase, done, total, now)}".rstrip())
            elif now - last[3] >= self.every:
                quiet.append((name, phase, count))
        self._heartbeat(quiet, now)

    def _heartbeat(self, quiet: list[tuple[str, str, str]], now: float) -> None:
        """Where nothing moved, still say that it runs and for how long: once one candidate has been
        silent ``2 * every`` seconds, every candidate silent for ``every`` is named, in one line when
        there are several (eight GPTQ runs on eight GPUs give one line every few minutes, not eight)."""
        if not any(now - self.seen[name][3] >= 2 * self.every for name, _, _ in quiet):
            return
        for name, _, _ in quiet:
            self.seen[name] = (*self.seen[name][:3], now)
        since = {name: _duration(now - self.began[name][2]) for name, _, _ in quiet}
        if len(quiet) == 1:
            [(name, phase, count)] = quiet
            return self.status(f"{name:<{self.width}} {phase:<11}{count}, {since[name]} in this phase")
        self.status("still running: " + "; ".join(f"{name} {phase}{count}, {since[name]} in this phase"
                                                 for name, phase, count in quiet))

    def _pace(self, name: str, phase: str, done: int, total: int, now: float) -> str:
        """``, 4.2 items/s, ~3m10s left``: from the items scored since the phase began (items carried
        over from an interrupted run do not count), once there are some to go by."""
        _, first, since = self.began[name]
        if phase not in ("evaluating", "quantizing") or done <= first or now - since < 1 or done >= total:
            return ""
        rate = (done - first) / (now - since)
        if phase == "quantizing":
            return f", {_duration(1 / rate)} a layer, ~{_duration((total - done) / rate)} left"
        return f", {rate:.3g} items/s, ~{_duration((total - done) / rate)} left"

    def outcome(self, r: Any) -> None:
        self.width = max(self.width, len(r.name))
        if r.status == SUCCEEDED and r.reused_from:
            self.status(f"{r.name:<{self.width}} reused      score {r.score:.3f}, stored by job {r.reused_from} (--no-cache to rerun)")
        elif r.status == SUCCEEDED:
            early = r.early_stop or {}
            note = (f", settled '{early['decision']}' after {r.n_items} items (early stop)"
                    if early.get("stopped_early") else "")
            self.status(f"{r.name:<{self.width}} done        score {r.score:.3f}, {r.eval_seconds:.0f}s evaluating{note}")
        elif r.status == CANCELLED:
            self.status(f"{r.name:<{self.width}} cancelled   {r.error}")
        else:
            self.status(f"{r.name:<{self.width}} FAILED      {r.error}")


def _run_and_report(svc: Any, job_id: str, deploy: bool, resume: bool = False) -> None:
    from quantselect.service import Events

    progress = Progress()
    try:
        job = svc.run_job(job_id, Events(on_progress=progress.update, on_outcome=progress.outcome,
                                         on_status=progress.status), resume=resume)
    except KeyboardInterrupt:
        click.echo(f"\nJob {job_id} interrupted: its workers are stopped; `quantselect resume {job_id}` continues it, "
                   "keeping finished candidates and the items already scored", err=True)
        raise click.exceptions.Exit(130) from None  # as a shell reports a command SIGINT ended
    if job.status == CANCELLED:
        raise QuantselectError(f"job {job_id} was cancelled; `quantselect resume {job_id}` continues it")
    _print_results(svc, job_id)
    if deploy:
        _deployment_outcome(svc.get_job(job_id))


def _deployment_outcome(job: Any) -> None:
    """After a succeeded job's results: where it is served, or (it asked to be and was not) why, an
    error: a script waiting on it must not go on as if it were served."""
    if job.deploy and job.deploy_error:  # the results stand; what to do next is in the message
        why = job.deploy_error.removeprefix(f"job {job.id}: ")
        raise QuantselectError(f"job {job.id} succeeded but was not deployed: {why} "
                               f"(`quantselect deploy {job.id} --candidate NAME` serves one)")
    if job.base_url:
        _print_deployment(job.base_url, job.deployed_candidate, job.model_path)


def _print_results(svc: Any, job_id: str, threshold: float | None = None, markdown: bool = False) -> None:
    from quantselect.render import recommendation_text, results_table

    job, rows, rec = svc.results_table(job_id, threshold)
    head = f"Job {job.id} ({job.status}): {job.model} on {job.dataset_source} ({job.n_items} items, {job.metric})"
    click.echo(f"**{head}**\n" if markdown else f"\n{head}\n")
    click.echo(results_table(rows, markdown=markdown))
    click.echo()
    text = recommendation_text(rec, {r["throughput_engine"] for r in rows})
    click.echo(f"```\n{text}\n```" if markdown else text)


def _print_deployment(url: str | None, candidate: str | None, model_path: str | None = None) -> None:
    from quantselect.engines.models import has_chat_template

    model = url.rstrip("/").split("/")[-2] if url else ""
    click.echo(f"\nServing {candidate} at {url}  (OpenAI-compatible)")
    click.echo("Try it:")
    # a model without a chat template (a base model) answers chat with a 400: show it a completion
    chat = has_chat_template(model_path) is not False if model_path else True
    route, asked = ("chat/completions", {"messages": [{"role": "user", "content": "What is the capital of France?"}]}) \
        if chat else ("completions", {"prompt": "The capital of France is"})
    body = json.dumps({"model": model, **asked, "max_tokens": 32, "temperature": 0})
    from quantselect.settings import get_settings, is_loopback

    settings = get_settings()
    key = ' -H "Authorization: Bearer $QUANTSELECT_SERVE_API_KEY"' if settings.serve_api_key else ""
    click.echo(f"  curl -s {url}/{route} -H 'Content-Type: application/json'{key} -d '{body}'")
    if not key and not is_loopback(settings.serve_host):
        click.echo(f"warning: it answers whoever reaches {settings.serve_host}:{settings.serve_port}: set "
                   "QUANTSELECT_SERVE_API_KEY and deploy again to ask its clients for a key", err=True)
    if candidate and ":kv_cache=" in candidate:
        click.echo("Its fp8 KV cache is emulated here (answers as evaluated, the memory of a 16-bit cache); "
                   "vLLM's --kv-cache-dtype fp8 stores it in 8 bits.")


@cli.command()
@click.option("--deploy", is_flag=True, help="Serve the recommended candidate when the job is done.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Items of the example dataset to use (default 60).")
@click.option("--no-cache", is_flag=True, help="Run every candidate again even when an earlier demo stored its result.")
def demo(deploy: bool, limit: int | None, no_cache: bool) -> None:
    """Run the whole job on the embedded default: a local Ray, SQLite, the bundled
    SmolLM2-135M-Instruct model and 60 PIQA items from examples/."""
    svc = _service()
    req = svc.demo_request(deploy=deploy) if limit is None else svc.demo_request(deploy=deploy, limit=limit)
    req.use_cache = not no_cache
    job = svc.submit(req)
    _announce(job)
    _run_and_report(svc, job.id, deploy)


@cli.command()
@click.argument("model")
@click.argument("dataset", type=click.Path(dir_okay=False))
@click.option("--threshold", type=float, default=DEFAULT_THRESHOLD, show_default=True,
              help="Minimum quality relative to the baseline, in (0, 1.5].")
@click.option("--candidates", default=None, help="Comma-separated candidate names (see `quantselect candidates`).")
@click.option("--target-gpu", default=None,
              help="GPU the model will be served on, for the cost per 1M tokens: H100-80GB (default), A100-80GB, "
                   "L40S, L4, A10G, RTX-4090. Estimated from a roofline unless measured on that GPU.")
@click.option("--gpu-hour-usd", type=float, default=None,
              help="Price of one target GPU-hour (default: the price table's, see `quantselect gpus`).")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="GPTQ/AWQ calibration samples (.txt one per line, or .jsonl); default: split off the dataset.")
@click.option("--calibration-samples", type=int, default=DEFAULT_CALIBRATION_SAMPLES, show_default=True,
              help="GPTQ/AWQ calibration samples (held out of the evaluation when taken from the dataset).")
@click.option("--map", "mapping", multiple=True, metavar="KEY=VALUE",
              help="Read another dataset shape: prompt=TEMPLATE|FIELD, text=F, messages=F, choices=F1,F2, "
                   "answer=F, reference=F, category=F.")
@click.option("--labels", type=click.Path(dir_okay=False), default=None, help="File with one answer index per line.")
@click.option("--metric", type=click.Choice(METRICS), default=None,
              help="Scoring (default: accuracy for multiple choice; final_number when references hold '####', "
                   "else exact_match; top1_agreement for prompts without labels).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N items.")
@click.option("--sample", type=click.IntRange(min=1), default=None,
              help="Use a random N of the items (seeded: the same N every time), not the first N.")
@click.option("--address", default=None,
              help="Ray dashboard address (http://HOST:8265): run the driver there via the Jobs API. An absolute "
                   "MODEL path not found here is checked by the driver on the cluster.")
@click.option("--wait/--no-wait", default=None, help="Wait for the job (the default without --address).")
@click.option("--deploy", is_flag=True, help="Serve the recommended candidate when the job is done.")
@click.option("--confidence", type=float, default=DEFAULT_CONFIDENCE, show_default=True,
              help="Confidence of the intervals and verdicts (pass / fail / inconclusive).")
@click.option("--policy", type=click.Choice(POLICIES), default=DEFAULT_POLICY, show_default=True,
              help="Who qualifies: the point estimate meets the threshold, or the interval's lower bound does.")
@click.option("--early-stop/--no-early-stop", default=False, show_default=True,
              help="Stop each candidate once an anytime-valid test settles its verdict (the baseline runs first).")
@click.option("--max-new-tokens", type=int, default=None,
              help="Generation: most tokens per answer (default per metric: 32 exact_match, 64 substring, 256 "
                   "final_number; 0 for texts: label-free metrics then score the prompt's own tokens).")
@click.option("--stop", "stop", multiple=True, metavar="TEXT",
              help="Generation: cut the answer at TEXT (repeatable; default per metric, e.g. a newline for exact_match).")
@click.option("--no-stop", is_flag=True, help="Generation: no stop strings at all.")
@click.option("--chat-template", is_flag=True, help="Generation: wrap each prompt in the model's chat template.")
@click.option("--no-cache", is_flag=True,
              help="Run every candidate even when a stored result of the same model, data, config and settings exists.")
@click.option("--candidate-timeout", default=None, metavar="DURATION",
              help="Stop and fail any candidate still running after this long (90m, 6h, 1h30m), freeing its GPU; "
                   "the others run on. Default: the driver's QUANTSELECT_CANDIDATE_TIMEOUT, if set.")
@click.option("--notify", default=None, metavar="URL",
              help="Post the job's end (one line of text and the job as JSON) to this webhook: Slack, Mattermost, "
                   "Teams, a CI.")
@click.option("--dry-run", is_flag=True,
              help="Check everything and say what would run (items, calibration hold-out, memory per candidate, "
                   "what runs here, what a stored result spares); submit nothing.")
def submit(model: str, dataset: str, threshold: float, candidates: str | None, target_gpu: str | None,
           gpu_hour_usd: float | None, calibration: str | None, calibration_samples: int, mapping: tuple[str, ...], labels: str | None, metric: str | None, limit: int | None,
           sample: int | None, address: str | None, wait: bool | None, deploy: bool, confidence: float, policy: str,
           early_stop: bool, max_new_tokens: int | None, stop: tuple[str, ...], no_stop: bool,
           chat_template: bool, no_cache: bool, candidate_timeout: str | None, notify: str | None, dry_run: bool) -> None:
    """Evaluate candidates of MODEL (a Hugging Face folder, a Hub id such as Qwen/Qwen2.5-0.5B-Instruct,
    a .gguf file or `demo`) on DATASET (JSONL, a JSON array, CSV or Parquet: a file here, or one of a
    Hub dataset, hf://datasets/OWNER/NAME[@REVISION]/PATH, as are --labels and --calibration)."""
    from quantselect.engines.models import hub_id, hub_identity
    from quantselect.service import SubmitRequest, model_is_here

    if wait is False and not address:
        raise InputError("--no-wait needs --address: without it the job runs in this process")
    if stop and no_stop:
        raise InputError("give --stop or --no-stop, not both")
    if candidates is not None and not candidates.replace(",", "").strip():  # an empty shell variable
        raise InputError("--candidates is empty: name candidates (see `quantselect candidates`) or leave the option "
                         "out for the default set")
    if address:  # before the job is written (and checked alike by a dry run)
        from quantselect.orchestration.cluster import check_jobs_address

        check_jobs_address(address)
    svc = _service()
    req = SubmitRequest(model=model, dataset=dataset, mapping=FieldMapping.parse(mapping, labels), metric=metric,
                        limit=limit, sample=sample, threshold=threshold, gpu_hour_usd=gpu_hour_usd,
                        target_gpu=target_gpu,
                        calibration=calibration, calibration_samples=calibration_samples, deploy=deploy,
                        candidates=candidates.split(",") if candidates is not None else None,
                        confidence=confidence, policy=policy, early_stop=early_stop,
                        max_new_tokens=max_new_tokens, stop=[] if no_stop else ([_unescape(x) for x in stop] or None),
                        chat_template=chat_template, use_cache=not no_cache, model_on_cluster=bool(address),
                        candidate_timeout=parse_duration(candidate_timeout, "--candidate-timeout") if candidate_timeout else None,
                        notify=notify)
    if dry_run:
        from quantselect.render import preview_text

        return click.echo(preview_text(svc.preview(req)))
    job = svc.submit(req)
    _announce(job)
    if address and not model_is_here(job.model_path):
        if hub_id(job.model):
            pin = hub_identity(job.model_path)
            click.echo(f"{job.model}: a Hub id, " + (f"pinned to {pin}" if pin else "not pinned (offline, or the Hub "
                                                     "could not be reached from here or was down)") + "; the job's driver downloads it on the cluster")
        else:
            click.echo(f"{job.model}: not on this machine; the job's driver reads and checks it on the cluster")
    if address:
        sid = svc.submit_remote(job.id, address)
        click.echo(f"Submitted to the Ray cluster at {address} as Ray job {sid}")
        _warn_of_the_password(svc)
        if wait:
            _wait_remote(svc, job.id, address, sid)
        return
    _run_and_report(svc, job.id, deploy)


def _warn_of_the_password(svc: Any) -> None:
    """The driver got the database URL as a variable of its Ray job, which the dashboard shows."""
    from quantselect.db.engine import has_password

    if has_password(svc.settings.db_url):
        click.echo("warning: the database URL went to the cluster with its password, and the Ray dashboard shows a "
                   "job's variables: leave the password out of QUANTSELECT_DB_URL and give it as PGPASSWORD or in "
                   "~/.pgpass, here and on the nodes (cluster/README.md)", err=True)


def _unescape(text: str) -> str:
    """`--stop '\\n'` means a newline, as a shell user would type it."""
    from quantselect.domain.dataset import unescape

    return unescape(text, f"--stop {text!r}")


def _wait_remote(svc: Any, job_id: str, address: str, sid: str) -> None:
    """`--address --wait`: the driver's own output on the cluster as it comes (its progress lines,
    then the results or its error, as a local run prints them), and its exit status."""
    status = svc.follow_remote(address, sid, lambda text: click.echo(text, nl=False))
    svc.check_remote_driver(svc.get_job(job_id))  # one that never claimed the job fails it, saying why
    if status != "SUCCEEDED":
        raise QuantselectError(f"the driver of job {job_id} on the cluster (Ray job {sid}) ended {status.lower()}; "
                               f"`quantselect status {job_id}` says where the job stands")


_COUNT = re.compile(r"(\d+)/(\d+)")


class _Changes:
    """Which changed lines of `status` --follow prints, as the local progress does: a new status or
    phase at once, a count (items, layers, steps) at each quarter, and otherwise at most one line a
    minute per line that keeps moving (a running candidate's phase is stored every few seconds:
    eight of them would print a line or two a second)."""

    def __init__(self, lines: dict[str, str], now: float, every: float = 60.0) -> None:
        self.every = every
        self.printed = {key: (line, now) for key, line in lines.items()}

    def printed_lines(self) -> list[str]:
        return [line for line, _ in self.printed.values()]

    def worth_printing(self, lines: dict[str, str], now: float) -> list[str]:
        out = []
        for key, line in lines.items():
            last, at = self.printed.get(key, (None, now))
            if line != last and (last is None or _coarse(line) != _coarse(last) or now - at >= self.every):
                self.printed[key] = (line, now)
                out.append(line)
        return out


def _coarse(line: str) -> str:
    """The line with each count ``done/total`` as its quarter."""
    return _COUNT.sub(lambda m: f"q{4 * int(m[1]) // int(m[2])}" if int(m[2]) else m[0], line)


def _follow(svc: Any, job_id: str, every: float = 2.0) -> None:
    """What `status` shows, then a line per change until the job is settled, then its results (an
    error, exit non-zero, unless it succeeded): `status --follow`."""
    job, note = svc.check_remote_driver(svc.get_job(job_id))
    changes = _Changes(_status_lines(svc, job, note), time.monotonic())
    click.echo("\n".join(changes.printed_lines()))
    start = time.monotonic()
    while not _settled(svc, job):
        time.sleep(every)
        job, note = svc.check_remote_driver(svc.get_job(job_id))  # a driver on a cluster that died unseen
        for line in changes.worth_printing(_status_lines(svc, job, note), time.monotonic()):
            click.echo(f"[{time.monotonic() - start:7.1f}s] {line.strip()}")
    if job.status == SUCCEEDED and not svc.driver_silent_for(job):
        _print_results(svc, job_id)
        _deployment_outcome(job)
    elif job.status == SUCCEEDED:
        raise QuantselectError(f"job {job_id} succeeded but was not deployed: its driver is gone")
    elif job.status == RUNNING:
        raise QuantselectError(f"job {job_id}: its driver is gone; `quantselect resume {job_id}` continues it")
    elif svc.queued_by_a_server_gone(job):
        raise QuantselectError(f"job {job_id}: queued by an API server that stopped before starting it; the next "
                               f"`quantselect api` on this database runs it, or `quantselect resume {job_id}` here")
    else:
        raise QuantselectError(f"job {job_id} {job.status}" + (f": {job.error}" if job.error else ""))


@cli.command("run-job", hidden=True)
@click.argument("job_id", metavar="JOB")
@click.option("--resume", is_flag=True, help="Continue a job whose driver died.")
def run_job(job_id: str, resume: bool) -> None:
    """Run a stored job (the driver; used by the Ray Jobs API entrypoint)."""
    svc = _service()
    _run_and_report(svc, job_id, deploy=svc.get_job(job_id).deploy, resume=resume)


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("--address", default=None, help="Ray dashboard address (http://HOST:8265): run the driver there via the Jobs API.")
@click.option("--wait/--no-wait", default=None, help="Wait for the job (the default without --address).")
def resume(job_id: str, address: str | None, wait: bool | None) -> None:
    """Continue JOB after its driver died (or it failed or was cancelled): succeeded candidates are
    kept, per-item results already stored are not scored again, the rest run."""
    svc = _service()
    if wait is False and not address:
        raise InputError("--no-wait needs --address: without it the job runs in this process")
    if address:
        from quantselect.orchestration.cluster import check_jobs_address

        check_jobs_address(address)
        sid = svc.submit_remote(job_id, address, resume=True)
        click.echo(f"Resumed job {job_id} on the Ray cluster at {address} as Ray job {sid}")
        _warn_of_the_password(svc)
        if wait:
            _wait_remote(svc, job_id, address, sid)
        return
    _run_and_report(svc, job_id, deploy=svc.get_job(job_id).deploy, resume=True)


@cli.command()
@click.argument("job_ids", nargs=-1, required=True, metavar="JOB...")
def delete(job_ids: tuple[str, ...]) -> None:
    """Delete finished jobs: their records, results and per-item results. A queued or running job
    is refused (cancel it first), and so is a served one (undeploy it first); quantized models stay
    on disk until `cache prune` (which then sees no job using them)."""
    from quantselect.errors import NotFoundError

    svc = _service()
    job_ids = tuple(dict.fromkeys(job_ids))  # `delete A A`: A once
    unknown = []
    for job_id in job_ids:  # all looked up first: a typo among them deletes nothing, rather than those before it
        try:
            svc.get_job(job_id)
        except NotFoundError:
            unknown.append(job_id)
    if unknown:
        raise NotFoundError(f"job{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} not found: nothing "
                            "deleted (`quantselect jobs` lists them)")
    for job_id in job_ids:
        svc.delete(job_id)
        click.echo(f"Deleted job {job_id}.")


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("--candidate", "candidates", multiple=True, metavar="NAME",
              help="Cancel only this candidate (repeatable): the job goes on without it.")
def cancel(job_id: str, candidates: tuple[str, ...]) -> None:
    """Cancel JOB: its driver stops its workers within seconds (freeing their GPUs) and marks it cancelled.
    With --candidate, only those candidates: the others run on, and a resume leaves them cancelled."""
    svc = _service()
    if candidates:
        return _cancel_candidates(svc, job_id, tuple(dict.fromkeys(candidates)))  # `--candidate a --candidate a`: once
    job = svc.cancel(job_id)
    if job.status == CANCELLED:
        click.echo(f"Job {job_id}: cancelled")
    else:
        click.echo(f"Job {job_id}: cancel requested; its driver ({job.driver}) stops it within seconds")


def _cancel_candidates(svc: Any, job_id: str, names: tuple[str, ...]) -> None:
    """Several are all looked up first: a cancel cannot be undone, so a typo, the baseline or one
    finished among them cancels none, rather than those before it (one alone: the service says why)."""
    from quantselect.domain.results import PENDING
    from quantselect.errors import ConflictError, NotFoundError

    if len(names) > 1 and svc.get_job(job_id).status not in FINISHED:  # a finished job: the first says so
        status = {r.name: r.status for r in svc.results(job_id)}
        unknown = [repr(n) for n in names if n not in status]
        if unknown:
            raise NotFoundError(f"job {job_id} has no candidate {', '.join(unknown)}: nothing cancelled "
                                f"(`quantselect status {job_id}` lists them)")
        refused = [f"{n} (the baseline: `quantselect cancel {job_id}` cancels the whole job)" if n == BASELINE
                   else f"{n} (already {status[n]})" for n in names if n == BASELINE or status[n] not in (PENDING, RUNNING)]
        if refused:
            raise ConflictError(f"job {job_id}: cannot cancel {', '.join(refused)}: nothing cancelled")
    for name in names:
        svc.cancel_candidate(job_id, name)
        click.echo(f"Job {job_id}: {name} cancelled; its driver stops its worker within seconds, the others run on")


@cli.command()
@click.option("--status", "statuses", multiple=True, type=click.Choice(JOB_STATUSES),
              help="Only jobs in this status (repeatable).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the N newest.")
@click.option("--before", default=None, metavar="JOB",
              help="Only the jobs after JOB (older, in this order): the next page after one that ended with JOB.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def jobs(statuses: tuple[str, ...], limit: int | None, before: str | None, fmt: str) -> None:
    """List jobs, newest first."""
    from quantselect.render import table

    all_jobs = _service().list_jobs(limit, statuses, before)
    if fmt == "json":
        return _echo_json([j.to_dict() for j in all_jobs])
    click.echo(table(["id", "status", "model", "dataset", "items", "metric", "candidates", "recommended", "created"],
                     [[j.id, j.status, j.model, j.dataset_source, j.n_items, j.metric, ",".join(j.candidate_names),
                       _answer(j.recommended), j.created_at.strftime("%Y-%m-%d %H:%M:%S")] for j in all_jobs]))
    if limit and len(all_jobs) == limit:  # a full page: there may be more
        status_args = "".join(f" --status {s}" for s in statuses)
        click.echo(f"More: quantselect jobs --limit {limit}{status_args} --before {all_jobs[-1].id}", err=True)


def _answer(recommended: dict[str, Any] | None) -> str:
    """A succeeded job's answer in a few words: ``int4 (99.1%, $0.042/1M)``, or ``none >= 97%``."""
    if not recommended:
        return ""
    if recommended["candidate"] is None:
        return f"none >= {recommended['threshold']:.0%}"
    rel, cost = recommended.get("relative_score"), recommended.get("cost_per_1m_tokens_usd")
    notes = ([f"{rel:.1%}"] if rel is not None else []) + ([f"${cost:.3g}/1M"] if cost else [])
    return recommended["candidate"] + (f" ({', '.join(notes)})" if notes else "")


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("--follow", "-f", is_flag=True,
              help="Keep watching a job that runs elsewhere (a cluster, the API server): print each change as "
                   "it happens, then the results; exits non-zero unless the job succeeded.")
@click.option("--every", type=float, default=2.0, show_default=True, metavar="SECONDS",
              help="With --follow: how often to look, from 0.1 to 3600.")
def status(job_id: str, follow: bool, every: float) -> None:
    """A job's status and its candidates' statuses."""
    if not 0.1 <= every <= 3600:  # nan and inf too (which a FloatRange lets through, or says in three lines)
        raise InputError(f"--every {every}: give the seconds between looks, from 0.1 to 3600")
    svc = _service()
    if follow:
        return _follow(svc, job_id, every)
    job, note = svc.check_remote_driver(svc.get_job(job_id))
    click.echo("\n".join(_status_lines(svc, job, note).values()))


def _settled(svc: Any, job: Any) -> bool:
    """Nothing more will happen unless somebody acts: the job ended (and its deployment, if it asked
    for one), or its driver is gone, or the API server that queued it."""
    return (job.status in FINISHED and not job.stage) or svc.driver_silent_for(job) is not None \
        or svc.queued_by_a_server_gone(job)


def _status_lines(svc: Any, job: Any, note: str | None = None) -> dict[str, str]:
    """What `status` prints, keyed (the job, each candidate, its deployment) so that --follow can
    print what changed; ``note``: why the cluster running its driver could not be asked about it."""
    lines = {}
    silent = svc.driver_silent_for(job)
    if silent is not None and job.status == SUCCEEDED:
        lines["job"] = (f"Job {job.id}: succeeded, but its driver ({job.driver}) was gone before it was deployed (not "
                        f"heard from for {_duration(silent)}); `quantselect deploy {job.id}` serves it")
    elif svc.queued_by_a_server_gone(job):
        lines["job"] = (f"Job {job.id}: queued by the API server {job.driver}, which stopped before starting it; the "
                        f"next `quantselect api` on this database runs it, or `quantselect resume {job.id}` here")
    elif silent is not None:
        lines["job"] = (f"Job {job.id}: running, but its driver ({job.driver}) has not been heard from for "
                        f"{_duration(silent)}: it is gone; `quantselect resume {job.id}` continues the job")
    else:
        lines["job"] = (f"Job {job.id}: {job.status}" + (f" ({job.error})" if job.error else "")
                        + (f": {job.stage}" if job.stage else ""))
    stored = svc.items_stored(job.id)
    for r in svc.results(job.id):
        notes = [f"reused from job {r.reused_from}"] if r.reused_from else []
        if r.status in (QUEUED, RUNNING) and stored.get(r.name):
            notes.append(f"{stored[r.name]}/{job.n_items} items scored and stored")
        notes += [f"{r.attempts} attempts"] if (r.attempts or 0) > 1 else []
        notes += [f"{r.items_carried} items carried over from an interrupted run"] if r.items_carried else []
        doing = f": {r.phase}" if r.status == RUNNING and r.phase else ""
        lines[f"candidate {r.name}"] = (f"  {r.name:<10} {r.status}{doing}" + (f" ({', '.join(notes)})" if notes else "")
                                        + (f": {r.error}" if r.error else ""))
    if job.base_url:
        lines["deployment"] = f"  deployed {job.deployed_candidate} at {job.base_url}"
    elif job.deploy_error:
        lines["deployment"] = f"  not deployed: {job.deploy_error}"
    if note:
        lines["cluster"] = f"  {note}"
    return lines


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv", "markdown"]), default="table",
              show_default=True, help="csv: one row per candidate (or item), every field; markdown: the table and "
                                      "the recommendation to paste into a pull request or an issue.")
@click.option("--items", "with_items", is_flag=True,
              help="Export every per-item result instead: JSON, or CSV with --format csv.")
def results(job_id: str, fmt: str, with_items: bool) -> None:
    """Measurements per candidate (quality, memory, speed, cost)."""
    if with_items and fmt in ("table", "markdown") and \
            click.get_current_context().get_parameter_source("fmt") != click.core.ParameterSource.DEFAULT:
        raise InputError(f"--items exports JSON or CSV, not {fmt}: give --format json or csv, or leave --format out "
                         "(JSON)")
    svc = _service()
    if with_items:
        items = svc.item_results(job_id)
        rows = [{"candidate": name, **i.to_dict()} for name, rows in items.items() for i in rows]
        return _echo_csv(rows) if fmt == "csv" else _echo_json(rows)
    if fmt == "json":
        return _echo_json(svc.results_table(job_id)[1])
    if fmt == "csv":
        return _echo_csv(svc.results_table(job_id)[1])
    _print_results(svc, job_id, markdown=fmt == "markdown")


def _echo_csv(rows: list[dict[str, Any]]) -> None:
    """Rows as CSV with a header of every field any row has; lists and objects as JSON text."""
    import csv
    import io

    fields = list(dict.fromkeys(k for r in rows for k in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v, default=str) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    click.echo(out.getvalue(), nl=False)


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("--threshold", type=float, default=None, help="Recompute for another threshold (default: the job's).")
@click.option("--confidence", type=float, default=None, help="Recompute at another confidence (default: the job's).")
@click.option("--policy", type=click.Choice(POLICIES), default=None, help="Recompute under another policy (default: the job's).")
@click.option("--target-gpu", default=None, help="Cost for another deployment GPU (default: the job's).")
@click.option("--gpu-hour-usd", type=float, default=None, help="Another price of one target GPU-hour.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def recommend(job_id: str, threshold: float | None, confidence: float | None, policy: str | None,
              target_gpu: str | None, gpu_hour_usd: float | None, fmt: str) -> None:
    """The cheapest candidate that meets the threshold, from stored per-item results (nothing
    re-evaluated), with its confidence interval and verdict."""
    from quantselect.render import recommendation_text

    svc = _service()
    rec = svc.recommend(job_id, threshold, confidence, policy, target_gpu, gpu_hour_usd)
    if fmt == "json":
        return _echo_json(rec.to_dict())
    click.echo(recommendation_text(rec, set()))


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.argument("candidate")
@click.option("--against", default=BASELINE, show_default=True, help="The candidate to compare with.")
@click.option("--limit", type=click.IntRange(min=0), default=10, show_default=True,
              help="Items shown each way (worse, better).")
@click.option("--format", "fmt", type=click.Choice(["text", "table", "json"]), default="text", show_default=True,
              help="table: the same as text (the word the other commands use).")
def compare(job_id: str, candidate: str, against: str, limit: int, fmt: str) -> None:
    """The items CANDIDATE scored differently from the baseline (or --against), worst drops first:
    each prompt, what was expected, and what each one answered."""
    from quantselect.render import comparison_text

    c = _service().compare(job_id, candidate, against, limit)
    if fmt == "json":
        return _echo_json(c.to_dict())
    click.echo(comparison_text(c))


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("--candidate", default=None, help="Serve this candidate instead of the recommended one.")
@click.option("--engine", type=click.Choice(["static", "dynamic"]), default=None,
              help="Decoding: static (a static KV cache, compiled on a GPU, one request at a time; the GPU "
                   "default) or dynamic (up to 16 requests batched; the CPU default).")
def deploy(job_id: str, candidate: str | None, engine: str | None) -> None:
    """Serve a job's recommended candidate (Ray Serve, OpenAI-compatible). A candidate of the job
    served before is stopped once the new one answers."""
    svc = _service()
    url = svc.deploy(job_id, candidate, engine)
    job = svc.get_job(job_id)
    _print_deployment(url, job.deployed_candidate, job.model_path)


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--candidate", default=None, help="Export this candidate instead of the recommended one.")
def export(job_id: str, dest: str, candidate: str | None) -> None:
    """Write a job's recommended candidate to the new folder DEST in the Hugging Face layout (for
    vLLM, transformers, the Hub), with a model card holding the evidence it was chosen on."""
    name, out = _service().export(job_id, dest, candidate)
    click.echo(f"Exported {name} of job {job_id} to {out} (README.md: the evidence).")


@cli.command()
@click.argument("job_id", metavar="JOB")
def undeploy(job_id: str) -> None:
    """Stop serving a job's deployed candidate (the local Ray head keeps running: `ray stop` ends it)."""
    click.echo(f"Stopped serving {_service().undeploy(job_id)}.")


@cli.command()
@click.argument("model")
@click.option("--gpu", "--target-gpu", "gpu", default=None, help="Target GPU: H100-80GB (default), A100-80GB, L40S, L4, A10G, RTX-4090.")
@click.option("--gpu-memory", default=None, help="Or its memory, e.g. 24GiB.")
@click.option("--context", type=click.IntRange(min=1), default=None, help="Tokens of context per sequence (default: min(model's, 8192)).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Sequences served at once.")
@click.option("--kv-cache", type=click.Choice(["bf16", "fp16", "fp8"]), default="bf16", show_default=True,
              help="KV-cache precision of the serving engine (fp8: vLLM's --kv-cache-dtype fp8, half the memory).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def plan(model: str, gpu: str | None, gpu_memory: str | None, context: int | None, batch: int, kv_cache: str,
         fmt: str) -> None:
    """Will MODEL fit? Weight and KV-cache memory per precision and the GPUs it needs, from its
    config.json alone (no weights needed; of a Hub id only config.json is downloaded), or a .gguf
    file's header."""
    from quantselect.domain.planner import GIB, gpus_needed_text
    from quantselect.render import table

    out = _service().plan(model, gpu, gpu_memory, context, batch, kv_cache)
    if fmt == "json":
        return _echo_json(out)
    click.echo(f"{model}: {out['params'] / 1e9:.2f} B parameters; {out['gpu']} ({out['gpu_memory_bytes'] / GIB:.1f} GiB), "
               f"context {out['context']}, batch {out['batch']}, {kv_cache} KV cache")
    click.echo(table(["precision", "weights", "KV cache", "total", "GPUs", "what"],
                     [[r["precision"], f"{r['weight_bytes'] / GIB:.1f} GiB", f"{r['kv_cache_bytes'] / GIB:.1f} GiB",
                       f"{r['total_bytes'] / GIB:.1f} GiB", gpus_needed_text(r["gpus"]), r["description"]]
                      for r in out["precisions"]]))
    for note in out["notes"]:
        click.echo(f"note: {note}")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. 127.0.0.1: this machine only; 0.0.0.0: every interface (set "
                   "QUANTSELECT_API_TOKEN).")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True,
              help="Port to listen on (one in use is refused before anything starts).")
def api(host: str, port: int) -> None:
    """Serve the REST API (OpenAPI docs at /docs). With $QUANTSELECT_API_TOKEN set, every request
    but /healthz and the docs must carry it: `Authorization: Bearer TOKEN`; without it, on
    127.0.0.1, only requests to 127.0.0.1, localhost or [::1] are answered, and to the names in
    $QUANTSELECT_API_HOSTS too (no web page reaches it by DNS rebinding)."""
    import uvicorn

    from quantselect.api.app import create_app
    from quantselect.settings import is_loopback

    _check_listen(host, port)  # before uvicorn: its start-up joins (or starts, lasting) a local Ray head first
    svc = _service()
    if svc.settings.api_token:
        click.echo("Every request but /healthz and the docs must carry `Authorization: Bearer $QUANTSELECT_API_TOKEN`.",
                   err=True)
    elif not is_loopback(host):
        click.echo(f"warning: serving on {host}:{port} with no QUANTSELECT_API_TOKEN: whoever reaches this port can "
                   "submit and delete jobs and read their datasets; set one (`openssl rand -hex 32`)", err=True)
    if svc.settings.api_paths is None and not is_loopback(host):
        click.echo("warning: requests may name any file this server can read as a dataset (and read it back in "
                   "their results); QUANTSELECT_API_PATHS=/data:/models limits them to those folders", err=True)
    uvicorn.run(create_app(svc, listen=host), host=host, port=port, log_level="info")


def _check_listen(host: str, port: int) -> None:
    """Bind (host, port) as uvicorn will, and let go: a name that does not resolve, an address not
    this machine's, a port in use or one only root may take is one line, exit 2, with nothing started."""
    import errno
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:  # uvicorn's choice of family
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port left in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as e:
            why = e.strerror or str(e)
            if e.errno == errno.EADDRINUSE:
                raise InputError(f"--port {port}: address already in use on {host}; give another port") from None
            if e.errno == errno.EACCES:
                raise InputError(f"--port {port}: {why} (ports below 1024 need root); give another port") from None
            raise InputError(f"--host {host}: cannot listen there: {why}") from None


@cli.group()
def db() -> None:
    """Database maintenance."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply the Alembic migrations to $QUANTSELECT_DB_URL."""
    from quantselect.db import current_revision, upgrade
    from quantselect.settings import get_settings

    settings = get_settings()
    if settings.db_url.startswith("sqlite:///"):
        settings.ensure_home()
    upgrade(settings.db_url)
    click.echo(f"database at revision {current_revision(settings.db_url)}")


@cli.group()
def cache() -> None:
    """What is kept on disk to spare work: quantized models and reference outputs (the artifacts
    folder) and GGUF models converted to safetensors (the models folder)."""


@cache.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def cache_list(fmt: str) -> None:
    """Everything in the cache, oldest use first: size, when last used, the jobs that point at it."""
    from quantselect.render import cache_table

    svc = _service()
    entries = svc.cache_entries()
    if fmt == "json":
        return _echo_json([e.to_dict() for e in entries])
    click.echo(cache_table(entries, f"{svc.settings.artifacts_dir} and {svc.settings.models_dir}"))


@cache.command("prune")
@click.argument("keys", nargs=-1)
@click.option("--older-than", default=None, metavar="AGE", help="Only what was last used longer ago, e.g. 30d, 12h, 2w.")
@click.option("--all", "everything", is_flag=True, help="Everything (still keeping what is served or in use).")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
def cache_prune(keys: tuple[str, ...], older_than: str | None, everything: bool, dry_run: bool) -> None:
    """Remove cache entries: the KEYs `cache list` shows, or --all, optionally only those unused for
    --older-than AGE. What a deployment serves and what a running job may use is kept. Stored results
    stay valid; a later job quantizes or converts again what it needs."""
    from quantselect.render import entries_text, fmt_bytes

    plan = _service().prune_cache(keys, older_than, everything, dry_run)
    verb = "Would remove" if dry_run else "Removed"
    for e in plan.remove:
        click.echo(f"{verb} {e.kind} {e.key} ({fmt_bytes(e.size_bytes)})")
    for e, why in plan.keep:
        click.echo(f"Kept {e.kind} {e.key}: {why}")
    click.echo(f"{verb} {entries_text(plan.remove)}.")


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def candidates(fmt: str) -> None:
    """Every candidate, its parameters, whether it can run on this machine, and why not.

    Change a parameter with NAME:key=value; add kv_cache=fp8 to any candidate to measure it with an
    fp8 KV cache; add a checkpoint quantized elsewhere with LABEL=PATH. For example:

    \b
      --candidates int4-gptq:group_size=64,int4:group_size=64
      --candidates int8,hub-awq=/models/llama-awq
    """
    from quantselect.render import table

    rows = _service().candidates()
    if fmt == "json":
        return _echo_json(rows)
    click.echo(table(["candidate", "available", "default", "parameters", "description / why not"],
                     [[r["name"], "yes" if r["available"] else "no", "yes" if r["default"] else "",
                       " ".join(f"{k}={v}" for k, v in r["parameters"].items()) or "-",
                       r["description"] if r["available"] else r["reason"]] for r in rows]))
    click.echo("\nEvery candidate also takes kv_cache=fp8: evaluated with its keys and values rounded as an fp8 KV "
               "cache stores them (vLLM's --kv-cache-dtype fp8), and costed with that cache, e.g. "
               "--candidates int4-gptq,int4-gptq:kv_cache=fp8 (a checkpoint: hub-awq=/models/llama-awq:kv_cache=fp8)")
    click.echo("Also LABEL=PATH: a checkpoint quantized elsewhere (AWQ, GPTQ, bitsandbytes, torchao, fp8 or plain, "
               "or a .gguf file; a folder may be named by its Hub id), evaluated as it is, e.g. --candidates "
               "int8,hub-awq=/models/llama-awq,q4km=/models/llama.Q4_K_M.gguf")


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def doctor(fmt: str) -> None:
    """Check this machine's set-up: the database, disk space, Ray, GPUs, libraries, the candidates it
    can run, the Hugging Face Hub and access. Changes nothing; exits 1 when a job would fail. Paste
    its output into a bug report."""
    from quantselect.render import table

    report = _service().doctor()
    if fmt == "json":
        _echo_json(report)
    else:
        click.echo(f"quantselect {report['quantselect']}, Python {report['python']}, {report['platform']}")
        click.echo(table(["check", "status", "detail"], [[c["name"], c["status"], c["detail"]] for c in report["checks"]]))
    if report["failed"]:
        sys.exit(1)


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def gpus(fmt: str) -> None:
    """The target GPUs costs are quoted for: memory, bandwidth, peak compute, price per hour."""
    from quantselect.domain.gpus import GPUS
    from quantselect.render import table

    if fmt == "json":
        return _echo_json([g.to_dict() for g in GPUS.values()])
    click.echo(table(["gpu", "memory GiB", "bandwidth TB/s", "bf16 TFLOP/s", "int8 TOP/s", "fp8 TFLOP/s",
                      "capability", "$/hour"],
                     [[g.name, g.memory_gib, g.bandwidth_tbs, g.bf16_tflops, g.int8_tops, g.fp8_tflops or "-",
                       ".".join(map(str, g.capability)), f"{g.usd_per_hour:.2f}"] for g in GPUS.values()]))
    click.echo("Prices are indicative on-demand prices per GPU-hour; give yours with --gpu-hour-usd.")


def _announce(job: Any) -> None:
    click.echo(f"Job {job.id}: {job.n_items} items of {job.dataset_source} (metric {job.metric}), "
               f"candidates {', '.join(job.candidate_names)}"
               + (f"; each may run {_duration(job.candidate_timeout)} at most" if job.candidate_timeout else ""))


def main() -> None:
    cli(prog_name="quantselect")


if __name__ == "__main__":
    sys.exit(main())
