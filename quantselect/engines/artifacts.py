"""Quantized models on disk: saved once in the Hugging Face layout, checked on reload, reused.

An artifact is a folder ``<artifacts_dir>/<key>/`` holding what ``save_pretrained`` writes
(safetensors + ``config.json`` with its ``quantization_config``), the tokenizer, and
``quantselect.json``: the candidate config, how long quantizing took, the engine, and a *probe* --
the log-probabilities the in-memory quantized model gave on a fixed input.

The key hashes the base model (its ``config.json``, its tokenizer, chat template and generation
config -- saved into the artifact and loaded back from it -- and the names, sizes and modification
times of its weight files), the candidate config, the calibration samples (GPTQ/AWQ) and the device
kind: the same key means the same quantized model, so a later job loads it instead of quantizing again.

Trust, but verify: transformers 5 fills weights it cannot map with random values and only prints a
table. Every artifact is reloaded right after saving and its probe compared with the in-memory
model's; a reused artifact is compared with the stored probe. A mismatch fails loudly
(``ArtifactMismatch``) instead of scoring a randomly initialized model as a (terrible) candidate.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from quantselect.domain.cache import ARTIFACT, INCOMPLETE, REFERENCE, CacheEntry
from quantselect.engines.models import COMPLETE, file_lock, folder_bytes, mtime, touch

MARKER = "quantselect.json"
REFERENCES = "references"  # the label-free baselines' reference outputs, one .npz per baseline cache key
PROBE_TEXT = ("The quick brown fox jumps over the lazy dog. Question: What is 12 plus 30? Answer: 42. "
              "Paris is the capital of")
PROBE_TOP_K = 8
# Largest difference in log-probability of the probe's top tokens that still counts as "the same
# model": a reload is bit-exact on CPU; GPU kernels may differ by rounding. Random weights are off
# by whole units.
PROBE_TOLERANCE = 2e-2


class ArtifactMismatch(RuntimeError):
    pass


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def _model_fingerprint(model_path: str | Path) -> dict[str, Any]:
    folder = Path(model_path)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    # The artifact carries its own copy of these, which scoring and serving it use: an edited chat
    # template must make a new artifact, not reuse one with the old template.
    names = TOKENIZER_FILES | {"generation_config.json"}
    text = sorted([p for p in folder.iterdir() if p.name in names and p.is_file()]
                  + [p for p in folder.glob("additional_chat_templates/*") if p.is_file()])
    tokenizer = hashlib.sha256()
    for p in text:
        tokenizer.update(f"{p.relative_to(folder)}\x00".encode() + p.read_bytes() + b"\x00")
    return {
        "config": hashlib.sha256((folder / "config.json").read_bytes()).hexdigest(),
        "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        "tokenizer": tokenizer.hexdigest(),
    }


def key(model_path: str | Path, config: Any, calibration: Any, device: str) -> str:
    payload = {
        "model": _model_fingerprint(model_path),
        "config": config.to_dict(),
        "calibration": _calibration_digest(calibration) if calibration else None,
        "device": "cuda" if device.startswith("cuda") else "cpu",
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return f"{config.type_name}-{digest}"


# What ``key`` names, and what a build left (``_build``'s ``<key>.tmp``; a folder whose removal was
# cut short, its marker gone first): the leftovers ``scan`` lists. Anything else under the artifacts
# folder (QUANTSELECT_ARTIFACTS_DIR may be a shared mount) is not ours: never listed, never removed.
_LEFTOVER = re.compile(r"[a-z0-9_]+-[0-9a-f]{16}(\.tmp)?")
# ``labelfree.Reference.save``'s temporary file: ``.<name>.npz.<pid>.tmp``
_REFERENCE_LEFTOVER = re.compile(r"\..+\.npz\.[0-9]+\.tmp")


def _calibration_digest(samples: Any) -> str:
    """Texts hash as they always have (keys of earlier artifacts stay valid); a sample that is a
    conversation makes the whole list hash as JSON."""
    if all(isinstance(s, str) for s in samples):
        return hashlib.sha256("\x00".join(samples).encode()).hexdigest()
    return hashlib.sha256(json.dumps(list(samples), sort_keys=True).encode()).hexdigest()


def disk_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def probe(model: Any, tokenizer: Any) -> dict[str, list]:
    """Top-k log-probabilities (and their tokens) at every position of a fixed input."""
    import torch

    device = next(model.parameters()).device
    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"].to(device)
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits.float()[0], dim=-1)
    values, tokens = logp.topk(PROBE_TOP_K, dim=-1)
    return {"tokens": tokens.tolist(), "logprobs": values.tolist()}


def compare(expected: dict[str, list], model: Any, tokenizer: Any) -> float:
    """Largest log-probability difference at the expected top tokens (inf: another input length)."""
    import torch

    device = next(model.parameters()).device
    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"].to(device)
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits.float()[0], dim=-1).cpu()
    tokens = torch.tensor(expected["tokens"])
    want = torch.tensor(expected["logprobs"])
    if logp.shape[0] != tokens.shape[0]:
        return float("inf")
    return float((logp.gather(1, tokens) - want).abs().max())


def load(folder: str | Path, device: str, reused: bool = False, check_probe: bool = True) -> Any:
    """Load an artifact, check that every weight was mapped and (``check_probe``) that it gives the
    stored probe's outputs, and return a ``LoadedModel``."""
    from quantselect.engines.quantize import LoadedModel

    folder = Path(folder)
    meta = json.loads((folder / MARKER).read_text())
    if reused:
        touch(folder / MARKER)  # its "last used" time, which `cache prune --older-than` goes by
    model, tokenizer = _load_whole(folder, device, meta.get("dtype", "float32"),
                                   "Delete the folder to quantize again")
    if check_probe:
        diff = compare(meta["probe"], model, tokenizer)
        if not diff <= PROBE_TOLERANCE:
            raise ArtifactMismatch(
                f"the quantized model saved at {folder} reloads with different outputs (largest log-probability "
                f"difference {diff:.3g} > {PROBE_TOLERANCE}): some weights were not restored (transformers fills "
                "unmapped weights with random values); delete the folder to quantize again")
    return LoadedModel(model, tokenizer, device, meta.get("dtype", "float32"), float(meta.get("quantize_seconds", 0.0)),
                       meta.get("engine", "saved artifact"), artifact_path=str(folder), reused=reused,
                       disk_bytes=disk_bytes(folder))


def _load_whole(folder: Path, device: str, dtype: str, remedy: str) -> tuple[Any, Any]:
    """The model and tokenizer of a Hugging Face folder, refusing one whose weights do not all map
    (transformers 5 would fill them with random values and only print a table)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantselect.engines.quantize import device_map, gptqmodel_reload_kwargs

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    with warnings.catch_warnings():  # a kernel chosen for the device: transformers warns that it takes just that
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), device_map=device_map(device),
                                                           output_loading_info=True, dtype=getattr(torch, dtype),
                                                           **gptqmodel_reload_kwargs(folder, device))
    model.eval()
    unmapped = sorted({*info.get("missing_keys", ()), *info.get("unexpected_keys", ()),
                       *(k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ()))})
    if unmapped:
        raise ArtifactMismatch(
            f"the quantized model saved at {folder} does not load back whole: {len(unmapped)} weight(s) missing, "
            f"unexpected or mis-shaped (e.g. {', '.join(unmapped[:3])}); transformers would fill them with random "
            f"values. {remedy}")
    return model, tokenizer


def load_checkpoint(folder: str | Path, device: str, dtype: str, engine: str) -> Any:
    """A checkpoint quantized elsewhere (``Prequantized``), loaded as it is: every weight must map;
    there is no probe to check it against, since nothing here made it."""
    from quantselect.engines.quantize import LoadedModel

    folder = Path(folder)
    model, tokenizer = _load_whole(folder, device, dtype, "Is the checkpoint complete, and for this transformers?")
    return LoadedModel(model, tokenizer, device, dtype, 0.0, engine, artifact_path=str(folder),
                       disk_bytes=disk_bytes(folder))


def get_or_create(artifacts_dir: str | Path, name: str, quantize: Callable[[], Any] | None, device: str,
                  info: dict[str, Any], export: Callable[[Path], tuple[str, float, str]] | None = None) -> Any:
    """Load the artifact ``name`` if it is complete, else quantize, save, reload, check and return the
    reloaded model (so that what is evaluated is what was saved). One process per key at a time.

    ``export`` instead writes the quantized folder itself (GPTQ/AWQ): that folder is loaded with the
    check for unmapped weights, and its outputs become the probe every later reuse is checked against."""
    root = Path(artifacts_dir)
    folder = root / name
    with file_lock(root / f".{name}.lock"):
        if is_artifact(folder):
            return load(folder, device, reused=True)
        if export is not None:
            return _build(folder, lambda tmp: _exported(tmp, export, device, info))
        assert quantize is not None
        return _build(folder, lambda tmp: _saved(tmp, quantize, device, info))


def _build(folder: Path, make: Callable[[Path], Any]) -> Any:
    """Make the artifact in ``<folder>.tmp`` (``make`` returns the model loaded back from it), then
    publish it under ``folder``; nothing half-written is left behind on failure."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        loaded = make(tmp)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    loaded.artifact_path = str(folder)
    return loaded


def _saved(tmp: Path, quantize: Callable[[], Any], device: str, info: dict[str, Any]) -> Any:
    """Quantize in memory, save, take the in-memory model's probe, and load back checked against it.
    Saved before any forward pass: bitsandbytes 0.50's CPU NF4 rewrites a layer's quantization state
    in its first forward, and a model saved after that reloads with other outputs (measured on
    SmolLM2: log-probabilities 0.32 apart), which the probe check then refused."""
    loaded = quantize()
    try:
        save(loaded.model, loaded.tokenizer, tmp)
    except Exception as e:  # noqa: BLE001 - say which candidate cannot be saved, then fail it
        raise RuntimeError(f"cannot save the quantized model ({loaded.engine}) in the Hugging Face layout: "
                           f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    expected = probe(loaded.model, loaded.tokenizer)
    meta = {**info, "key": tmp.name[: -len(".tmp")], "engine": loaded.engine, "dtype": loaded.dtype,
            "quantize_seconds": loaded.quantize_seconds, "probe": expected,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (tmp / MARKER).write_text(json.dumps(meta))
    del loaded
    return load(tmp, device, reused=False)


def _exported(tmp: Path, export: Callable[[Path], tuple[str, float, str]], device: str,
              info: dict[str, Any]) -> Any:
    """Let the engine write the quantized folder, load it back (refusing unmapped weights), and
    store its outputs as the probe later reuses are checked against."""
    engine, seconds, dtype = export(tmp)
    meta = {**info, "key": tmp.name[: -len(".tmp")], "engine": engine, "dtype": dtype, "quantize_seconds": seconds,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (tmp / MARKER).write_text(json.dumps(meta))
    loaded = load(tmp, device, reused=False, check_probe=False)  # still refuses unmapped weights
    meta["probe"] = probe(loaded.model, loaded.tokenizer)
    (tmp / MARKER).write_text(json.dumps(meta))
    return loaded


def save(model: Any, tokenizer: Any, folder: Path) -> None:
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


# ---- export: a model folder to hand to another engine or to the Hub ---------------------------
# What a tokenizer is saved as (transformers' names for every kind of tokenizer a causal LM uses).
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                             "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "vocab.txt",
                             "merges.txt", "spiece.model"})


def export_folder(source: str | Path, dest: Path, files: dict[str, str], tokenizer_from: str | Path | None = None) -> None:
    """Copy a saved artifact (or the base model, for the baseline) to ``dest`` with ``files`` (name
    -> text) added: the weights, ``config.json`` and tokenizer, without quantselect's own marker.
    With ``tokenizer_from`` (a checkpoint quantized elsewhere, scored with the model's tokenizer),
    the tokenizer written is that folder's instead of the source's: the pair that was scored."""
    def fill(tmp: Path) -> None:
        for f in Path(source).iterdir():
            if (f.is_file() and f.name != MARKER and not f.name.startswith(".")
                    and not (tokenizer_from and f.name in TOKENIZER_FILES)):
                shutil.copy2(f, tmp / f.name)
            elif f.is_dir() and f.name == "additional_chat_templates" and not tokenizer_from:  # the tool-use one...
                shutil.copytree(f, tmp / f.name)
        if tokenizer_from:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(tokenizer_from)).save_pretrained(str(tmp))

    _publish(dest, fill, files)


def export_file(source: str | Path, dest: Path, files: dict[str, str]) -> None:
    """Copy one checkpoint file (a GGUF) to ``dest`` with ``files`` added."""
    _publish(dest, lambda tmp: shutil.copy2(source, tmp / Path(source).name), files)


def export_converted(model_path: str | Path, config: Any, dest: Path, files: dict[str, str]) -> None:
    """Save a candidate that has no artifact of its own (bf16, fp16: the base model in another
    dtype) to ``dest``: converted on this machine's CPU, saved, reloaded and checked like an artifact.
    Its weights only: an emulated KV cache (``kv_cache=fp8``) marks the loaded model's config, and
    that mark saved would make the folder, used as a model later, round every candidate's cache."""
    from quantselect.engines.quantize import load_candidate

    config = config.weights_only()

    def fill(tmp: Path) -> None:
        _saved(tmp, lambda: load_candidate(str(model_path), config, "cpu"), "cpu", {"config": config.to_dict()})
        (tmp / MARKER).unlink()

    _publish(dest, fill, files)


def _publish(dest: Path, fill: Callable[[Path], None], files: dict[str, str]) -> None:
    """Fill a hidden folder next to ``dest``, then rename it there: nothing half-written is left."""
    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        for name, text in files.items():
            (tmp / name).write_text(text)
        if dest.is_dir():
            dest.rmdir()  # an empty folder the user made for it
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- the cache: what is there, and removing it ------------------------------------------------
def scan(root: str | Path) -> list[CacheEntry]:
    """Every artifact, reference and half-written leftover under the artifacts folder ``root``;
    nothing else there (``_LEFTOVER``)."""
    root = Path(root)
    out: list[CacheEntry] = []
    if not root.is_dir():
        return out
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or p.name == REFERENCES or not p.is_dir():
            continue
        if is_artifact(p):
            try:
                meta = json.loads((p / MARKER).read_text())
            except (OSError, ValueError):
                meta = {}
            config = meta.get("config") or {}
            params = " ".join(f"{k}={v}" for k, v in (config.get("_data") or {}).items())
            out.append(CacheEntry(ARTIFACT, p.name, str(p), folder_bytes(p), mtime(p / MARKER),
                                  " ".join(filter(None, [config.get("_type"), params])) or None, meta.get("model")))
        elif _LEFTOVER.fullmatch(p.name):  # a build a killed process left (``<key>.tmp``)
            out.append(CacheEntry(INCOMPLETE, p.name, str(p), folder_bytes(p), mtime(p)))
    refs = root / REFERENCES
    for p in sorted(refs.iterdir()) if refs.is_dir() else ():
        if p.is_file() and (p.suffix == ".npz" and not p.name.startswith(".") or _REFERENCE_LEFTOVER.fullmatch(p.name)):
            kind = REFERENCE if p.suffix == ".npz" else INCOMPLETE
            out.append(CacheEntry(kind, p.name, str(p), p.stat().st_size, mtime(p)))
    return out


def remove(entry: CacheEntry) -> bool:
    """Delete an entry ``scan`` or ``models.scan_converted`` found; False (and nothing deleted) when
    a process holds its lock: a job building or loading that folder right now."""
    path = Path(entry.path)
    if not path.is_dir():
        path.unlink(missing_ok=True)
        return True
    name = path.name[: -len(".tmp")] if path.name.endswith(".tmp") else path.name
    with file_lock(path.parent / f".{name}.lock", wait=False) as held:
        if not held:
            return False
        for marker in (MARKER, COMPLETE):  # first: never a complete-looking half-deleted folder
            (path / marker).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    return True
