"""Jobs, candidate outcomes and per-item results as plain data."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from quantselect.domain.candidates import Candidate
from quantselect.domain.dataset import TaskDataset

# Job statuses: queued -> running -> succeeded / failed / cancelled
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
JOB_STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
# Candidate statuses: pending -> running -> succeeded / failed / cancelled
PENDING = "pending"
# The error of a candidate cancelled on its own (`cancel JOB --candidate NAME`) while the job runs on:
# a resumed job leaves it cancelled, where one cancelled with its job runs again.
CANCELLED_ALONE = "cancelled on its own, by request"


def cancelled_alone(status: str, error: str | None) -> bool:
    return status == CANCELLED and error == CANCELLED_ALONE


# A candidate's "measuring" phase counts these steps (its progress (done, total) is (step, 3)): on a GPU
# the first decode compiles the static-cache engine, which can take a minute.
MEASURE_STEPS = ("prefill", "decode at batch 1", "decode at batch 16")


def phase_count(phase: str, done: int, total: int) -> str:
    """How far a candidate is in its phase: GPTQ / AWQ count layers while they quantize (the other
    methods take seconds and count nothing), measuring names its step, the rest count items."""
    if not total:
        return ""
    if phase == "measuring" and total == len(MEASURE_STEPS) and 0 <= done < total:
        return f"{MEASURE_STEPS[done]} ({done + 1}/{total})"
    return f"{done}/{total} {'layers' if phase == 'quantizing' else 'items'}"


def phase_text(phase: str, done: int, total: int) -> str:
    """``evaluating 120/600 items``, ``measuring decode at batch 1 (2/3)``, ``quantizing``."""
    return f"{phase} {phase_count(phase, done, total)}".rstrip()


DEFAULT_THRESHOLD = 0.98
DEFAULT_CONFIDENCE = 0.95
# How a candidate qualifies: its point estimate of relative quality meets the threshold, or the
# lower bound of its confidence interval does (stricter: no candidate rides on luck).
POLICIES = ("point", "lower-bound")
DEFAULT_POLICY = "point"
DEFAULT_GPU_HOUR_USD = 2.50  # a typical on-demand price for one H100-class GPU-hour
DEFAULT_CALIBRATION_SAMPLES = 32  # GPTQ/AWQ calibration samples split off the task data by default
MIN_EVAL_ITEMS = 20  # items that must stay for evaluation after the calibration split
MAX_CALIBRATION_SAMPLES = 4096


def validate_calibration_samples(n: int) -> int:
    from quantselect.errors import InputError

    if not (1 <= n <= MAX_CALIBRATION_SAMPLES):
        raise InputError(f"calibration-samples {n} must be between 1 and {MAX_CALIBRATION_SAMPLES}")
    return int(n)


def validate_threshold(t: float) -> float:
    from quantselect.errors import InputError

    if not (0 < t <= 1.5):
        raise InputError(f"threshold {t} must be in (0, 1.5] (quality relative to the baseline, e.g. 0.98)")
    return float(t)


def validate_confidence(c: float) -> float:
    from quantselect.errors import InputError

    if not (0.5 <= c < 1):
        raise InputError(f"confidence {c} must be in [0.5, 1), e.g. 0.95")
    return float(c)


def validate_policy(p: str) -> str:
    from quantselect.errors import InputError

    if p not in POLICIES:
        raise InputError(f"policy {p!r} must be one of {', '.join(POLICIES)}")
    return p


def validate_notify(url: str | None, hosts: tuple[str, ...] | None = None) -> str | None:
    """A webhook URL a job posts its end to: http or https, with a host; one of ``hosts`` when given
    (``QUANTSELECT_NOTIFY_HOSTS``), and never a link-local or cloud metadata address. Errors name it
    as ``shown_url`` does: the URL is a secret (a Slack or Teams hook's path is its token)."""
    from urllib.parse import urlsplit

    from quantselect.errors import ForbiddenError, InputError

    if url is None:
        return None
    shown = shown_url(url)
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:  # also urlsplit's, on a bracketed host that is no IPv6 address
        parts, host = None, None
    if parts is None or parts.scheme not in ("http", "https") or not host:
        raise InputError(f"notify {shown!r}: give an http(s) URL to post the job's end to, such as "
                         "https://hooks.slack.com/services/T000/B000/XXXX")
    # urllib connects to the host %-decoded, after these checks read it encoded. A user and password
    # may be escaped (a password's '@' or ':' must be): post_json sends them apart, never connecting by them
    if "%" in parts.netloc.rpartition("@")[2]:
        raise InputError(f"notify {shown!r}: write its host without %-escapes")
    if metadata_address(host):
        raise ForbiddenError(f"notify {shown!r}: {host} is a link-local or cloud metadata address, never a webhook; "
                             "give the hook's own URL")
    if hosts is not None and not host_allowed(host, hosts):
        raise ForbiddenError(f"notify {shown!r}: {host} is not a host this server posts to (QUANTSELECT_NOTIFY_HOSTS: "
                             f"{', '.join(hosts)}); use a hook on one of them")
    return url.strip()


def shown_url(url: str) -> str:
    """``url`` as answers and logs show it: its scheme, host and port, "…" for the rest (a user and
    password, a path or query, which may be its token: Slack's and Teams' hooks are)."""
    import re
    from urllib.parse import urlsplit

    url = url.strip()
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:  # also urlsplit's, on a bracketed host that is no IPv6 address
        parts, host, port = None, None, None
    if parts is not None and parts.scheme and host:
        head = f"{parts.scheme}://{f'[{host}]' if ':' in host else host}{f':{port}' if port else ''}"
        rest = parts.username is not None or parts.path not in ("", "/") or parts.query or parts.fragment
        return head + ("/…" if rest else "/" if parts.path else "")
    head = re.split(r"[/?#@:%]", url, maxsplit=1)[0]  # not a URL: no more than its first word
    return head + ("…" if head != url else "")


def host_allowed(host: str, hosts: tuple[str, ...]) -> bool:
    """Whether ``host`` is one of ``hosts``: a name, ``*.domain`` (any host under it), or an IP address."""
    import ipaddress

    host = host.lower().rstrip(".")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for allowed in hosts:
        if allowed.startswith("*."):
            if ip is None and host.endswith(allowed[1:]):
                return True
            continue
        try:
            allowed_ip = ipaddress.ip_address(allowed)
        except ValueError:  # a name
            allowed_ip = None
        if (ip == allowed_ip) if ip is not None else (host == allowed):
            return True
    return False


# Where clouds answer metadata and credential requests beyond the link-local ranges: AWS over IPv6
# (instance metadata, EKS Pod Identity), Alibaba Cloud.
METADATA_ADDRESSES = ("fd00:ec2::254", "fd00:ec2::23", "100.100.100.200")
# IPv6 ranges that carry an IPv4 address in their last 32 bits: IPv4-compatible, IPv4-translated, NAT64
_EMBEDDING_IPV4 = ("::/96", "::ffff:0:0:0/96", "64:ff9b::/96")


def metadata_address(host: str) -> bool:
    """Whether ``host`` is an IP address no webhook is on: link-local (169.254.0.0/16, fe80::/10,
    where clouds answer metadata and credential requests), another address of a cloud's metadata
    service, or one of those inside an IPv6 address (IPv4-mapped or -compatible, 6to4, Teredo, NAT64)."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return False
    found = [ip]
    if ip.version == 6:
        found += [inner for inner in (ip.ipv4_mapped, ip.sixtofour, ip.teredo and ip.teredo[1]) if inner]
        if any(ip in ipaddress.ip_network(net) for net in _EMBEDDING_IPV4) and int(ip) & 0xFFFFFFFF:
            found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    known = {ipaddress.ip_address(a) for a in METADATA_ADDRESSES}
    return any(a.is_link_local or a in known for a in found)


def end_notice(job: "Job") -> str:
    """One line that says how a job ended and its answer, for a chat channel (a webhook's ``text``)."""
    head = f"quantselect job {job.id} ({job.model} on {job.dataset_source}) {job.status}"
    if job.status != SUCCEEDED:
        return f"{head}: {job.error}" if job.error else head
    rec = job.recommended
    if not rec:
        answer = ""
    elif rec.get("candidate") is None:
        answer = f": no candidate keeps {rec['threshold']:.0%} of the baseline's quality"
    else:
        cost = rec.get("cost_per_1m_tokens_usd")
        answer = (f": {rec['candidate']} recommended, {rec['relative_score']:.1%} of the baseline's quality"
                  + (f", ${cost:.4g} per 1M tokens" if cost is not None else ""))
    served = f"; served at {job.base_url}" if job.base_url else ""
    return head + answer + served


def validate_price(p: float) -> float:
    from quantselect.errors import InputError

    if not (0 < p < float("inf")):  # NaN fails too; 1e999 in a JSON body is inf
        raise InputError(f"gpu-hour price {p} must be a positive, finite number of US dollars")
    return float(p)


@dataclass(frozen=True)
class Calibration:
    """Calibration samples for GPTQ/AWQ: split off the task data (those items are then not
    evaluated) or read from a file the user gave."""

    source: str  # "task data" or the file's path
    # a sample is a text, or a conversation ([{"role", "content"}, ...]) the worker renders through
    # the model's chat template (conversation datasets, --chat-template)
    texts: tuple[Any, ...]
    items: tuple[int, ...] = ()  # indices of the task items held out (source "task data")

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "texts": list(self.texts), "items": list(self.items)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        return cls(d["source"], tuple(d["texts"]), tuple(d.get("items") or ()))


@dataclass(frozen=True)
class JobSpec:
    model: str  # what the user named: "demo", a folder, a .gguf file
    model_path: str  # the resolved local path the workers load
    dataset: TaskDataset
    candidates: list[Candidate]
    threshold: float = DEFAULT_THRESHOLD
    gpu_hour_usd: float = DEFAULT_GPU_HOUR_USD
    deploy: bool = False
    confidence: float = DEFAULT_CONFIDENCE
    policy: str = DEFAULT_POLICY
    early_stop: bool = False  # stop a candidate once its verdict is settled (anytime-valid test)
    target_gpu: str = "H100-80GB"  # the deployment GPU the cost is quoted for
    calibration: Calibration | None = None
    use_cache: bool = True  # reuse stored results of earlier jobs with the same inputs (--no-cache: never)
    candidate_timeout: float | None = None  # seconds a candidate may run (None: the driver's setting, if any)
    notify: str | None = None  # a webhook URL the job's end is posted to


@dataclass
class ItemResult:
    index: int
    correct: bool
    prediction: Any  # chosen index (multiple choice) or generated text
    choice_logprobs: list[float] | None = None
    category: str | None = None
    # The item's score in [0, 1]: 1/0 for right/wrong metrics; graded for label-free metrics
    # (agreement with the baseline), where ``correct`` means "scored 1".
    score: float | None = None
    truncated: bool = False  # the prompt was cut from the left to fit the model's context

    def __post_init__(self) -> None:
        if self.score is None:
            self.score = 1.0 if self.correct else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "correct": self.correct,
            "score": self.score,
            "prediction": self.prediction,
            "choice_logprobs": self.choice_logprobs,
            "category": self.category,
            "truncated": self.truncated,
        }


@dataclass
class CandidateResult:
    name: str
    config: dict[str, Any]
    status: str = PENDING
    error: str | None = None
    score: float | None = None
    n_items: int | None = None
    weight_bytes: int | None = None
    peak_memory_bytes: int | None = None
    quantize_seconds: float | None = None
    eval_seconds: float | None = None
    tokens_per_second: float | None = None
    throughput_engine: str | None = None
    prefill_tokens_per_second: float | None = None
    decode_tokens_per_second_b16: float | None = None  # ``tokens_per_second`` is batch 1
    disk_bytes: int | None = None  # the saved artifact on disk
    artifact_path: str | None = None
    artifact_reused: bool | None = None  # loaded from an earlier job's artifact instead of quantizing
    device: str | None = None
    node_id: str | None = None
    gpu_ids: list[str] = field(default_factory=list)
    n_truncated: int | None = None  # items whose prompt was cut from the left to fit the context
    early_stop: dict[str, Any] | None = None  # the sequential test's final state, when early stopping ran
    attempts: int | None = None  # worker processes it took (a killed worker is retried, bounded)
    reused_from: str | None = None  # the job whose stored result this is (same model, data, config, settings)
    items_carried: int | None = None  # per-item results an earlier attempt had stored, not scored again
    phase: str | None = None  # while it runs, what it is doing: `quantizing 8/32 layers` (``phase_text``)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    items: list[ItemResult] = field(default_factory=list)
    # What the baseline computed for label-free metrics, handed to the other candidates; not stored.
    reference: Any = field(default=None, repr=False, compare=False)

    @property
    def is_baseline(self) -> bool:
        from quantselect.domain.candidates import BASELINE

        return self.name == BASELINE

    def cost_per_1m_tokens(self, gpu_hour_usd: float) -> float | None:
        return cost_per_1m_tokens(gpu_hour_usd, self.tokens_per_second)


def cost_per_1m_tokens(gpu_hour_usd: float, tokens_per_second: float | None) -> float | None:
    """Price of one million generated tokens at the measured throughput of one device."""
    if not tokens_per_second or tokens_per_second <= 0:
        return None
    return gpu_hour_usd / (tokens_per_second * 3600.0) * 1_000_000


@dataclass
class Job:
    id: str
    status: str
    model: str
    model_path: str
    dataset_source: str
    dataset_kind: str
    metric: str
    n_items: int
    threshold: float
    gpu_hour_usd: float
    candidate_names: list[str]
    deploy: bool
    created_at: datetime
    updated_at: datetime
    error: str | None = None
    deployed_candidate: str | None = None
    base_url: str | None = None
    confidence: float = DEFAULT_CONFIDENCE
    policy: str = DEFAULT_POLICY
    early_stop: bool = False
    target_gpu: str = "H100-80GB"
    model_config: dict[str, Any] | None = None
    use_cache: bool = True  # reuse stored results of earlier jobs with the same inputs
    cancel_requested: bool = False
    driver: str | None = None  # host:pid of the process running the job
    heartbeat_at: datetime | None = None  # last sign of life of that driver
    stage: str | None = None  # what that driver is doing now (fetching, preparing, running candidates, deploying)
    deploy_error: str | None = None  # why the deployment it asked for (--deploy) did not happen
    candidate_timeout: float | None = None  # seconds a candidate may run (None: the driver's setting, if any)
    # The answer as the job ended (its own threshold, confidence, policy and target GPU): the chosen
    # candidate (None when none qualified), its quality relative to the baseline and its cost.
    recommended: dict[str, Any] | None = None
    notify: str | None = None  # a webhook URL the job's end is posted to

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "model": self.model,
            "model_path": self.model_path,
            "dataset": self.dataset_source,
            "dataset_kind": self.dataset_kind,
            "metric": self.metric,
            "n_items": self.n_items,
            "threshold": self.threshold,
            "gpu_hour_usd": self.gpu_hour_usd,
            "confidence": self.confidence,
            "policy": self.policy,
            "early_stop": self.early_stop,
            "target_gpu": self.target_gpu,
            "candidates": self.candidate_names,
            "deploy": self.deploy,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "error": self.error,
            "deployed_candidate": self.deployed_candidate,
            "base_url": self.base_url,
            "use_cache": self.use_cache,
            "cancel_requested": self.cancel_requested,
            "driver": self.driver,
            "heartbeat_at": self.heartbeat_at.isoformat() if self.heartbeat_at else None,
            "stage": self.stage,
            "deploy_error": self.deploy_error,
            "candidate_timeout_seconds": self.candidate_timeout,
            "notify": shown_url(self.notify) if self.notify else None,  # the full URL is a secret
            "recommended": self.recommended,
        }


# Bump when scoring changes in a way that makes stored per-item results incomparable with new ones.
EVAL_VERSION = 1


def result_cache_key(model_fingerprint: str, dataset: dict[str, Any], candidate_config: dict[str, Any],
                     calibration: tuple[str, ...] | None, evaluation: dict[str, Any]) -> str:
    """Equal keys, equal results: the model's weights, the items and how they are scored, the
    candidate's config (and its calibration samples), and the evaluation settings that change
    which items are scored (early stopping, with its threshold and confidence)."""
    import hashlib
    import json

    blob = json.dumps({"v": EVAL_VERSION, "model": model_fingerprint, "dataset": dataset, "config": candidate_config,
                       "calibration": list(calibration) if calibration else None, "evaluation": evaluation},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
