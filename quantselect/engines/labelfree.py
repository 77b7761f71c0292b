"""Label-free quality: how closely a candidate follows the full-precision baseline on prompts alone.

The baseline runs first and leaves a compact, picklable ``Reference``; every candidate is then
scored against it. Per item the reference holds:

- the prompt's token ids as fed to the model (chat template applied and cut from the left to fit,
  as ``evaluate.encode_prompts`` does), followed by the baseline's greedy continuation: up to
  ``dataset.max_new_tokens`` tokens, through the end-of-sequence token or the token that completes a
  stop string (``evaluate.generate``), and its decoded text cut before the stop string;
- at every scored position -- each position of that sequence whose next token is in it, so the
  prompt and the baseline's own continuation -- the baseline's ``TOP_K`` most likely next tokens
  and their log-probabilities (full-vocabulary distributions would be gigabytes: ~160 bytes a
  position here instead of ~200 KB for a 49k vocabulary).

A candidate runs the same sequences with teacher forcing (batched forward passes, the vocabulary
projection in chunks, in inference mode) and each item scores in [0, 1], the baseline itself
exactly 1, so one relative-score threshold covers every metric:

- ``top1_agreement``: the fraction of the item's scored positions where the candidate's most likely
  token (over the whole vocabulary) is the baseline's; a tie within ``TIE_NATS`` in either model's
  log-probabilities counts as agreement, so a near-tie that numerical noise breaks either way is
  not counted as a disagreement;
- ``kl_similarity``: exp(-mean over positions of KL(baseline || candidate)). The KL is taken over
  the baseline's top-k tokens plus one "rest" bucket holding the remaining probability of each
  model. That is the KL of a coarsening of both distributions, and by the data-processing
  inequality it never exceeds the full-vocabulary KL: the score can only overstate the similarity,
  by the mass the baseline puts outside its top-k (small for k = 20 on a trained model);
- ``baseline_match``: 1 when the candidate's greedy output text (same prompts, settings and stop
  truncation) equals the baseline's exactly, else 0. This needs a generation run per candidate;
  the other two only a forward pass.

Label-free metrics apply to prompts-only datasets and to generation datasets (whose references are
then ignored). With ``max_new_tokens`` 0 (the default of text datasets, ``{"text"}`` items) nothing
is generated: the scored positions are the text's own, which is llama.cpp's KL-divergence check on
the user's documents. Every item's ``prediction`` holds its ``mean_kl``, ``top1_agreement`` and
``kl_similarity``, its ``nll`` (summed over the scored positions, nats), ``n_tokens`` and
``perplexity`` (the baseline's from the log-probabilities of the next tokens kept in the
reference), and, for ``baseline_match``, the candidate's ``output``, whatever the metric. A candidate
whose logits are NaN (an overflow) scores 0, with ``mean_kl`` and ``perplexity`` None and no ``nll``
(JSON has no NaN or infinity).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from quantselect.domain.dataset import LABEL_FREE_METRICS, MULTIPLE_CHOICE, Item, TaskDataset
from quantselect.domain.results import ItemResult
from quantselect.engines import evaluate as ev
from quantselect.errors import InputError

Progress = Callable[[int, int], None]
TOP_K = 20  # baseline tokens kept per position
TIE_NATS = 1e-4  # log-probabilities this close count as a tie for top-1 agreement
REST_FLOOR = 1e-6  # probability mass below which the two "rest" buckets count as equal
HEAD_CHUNK = 512  # positions per vocabulary projection (the fp32 logits of a chunk: ~100 MB at 49k)


def needs_reference(dataset: TaskDataset) -> bool:
    """Whether scoring ``dataset`` needs the baseline's ``Reference`` (a label-free metric)."""
    return dataset.metric in LABEL_FREE_METRICS


@dataclass
class ReferenceItem:
    tokens: np.ndarray  # int32 [L]: prompt ids as fed, then the baseline's continuation
    n_prompt: int
    text: str  # the baseline's output, cut before the first stop string
    truncated: bool  # the prompt was cut from the left to fit
    top_ids: np.ndarray  # int32 [L - 1, k]: the baseline's most likely next tokens, most likely first
    top_logprobs: np.ndarray  # float32 [L - 1, k]
    digest: str  # of the prompt and the generation settings, to catch a mismatched dataset
    token_logprobs: np.ndarray | None = None  # float32 [L - 1]: of each next token (None: saved before)

    @property
    def n_positions(self) -> int:
        return len(self.tokens) - 1


@dataclass
class Reference:
    """The baseline's greedy continuations and top-k next-token distributions, per item."""

    items: list[ReferenceItem]
    top_k: int = TOP_K
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    def slice(self, start: int, stop: int) -> "Reference":
        """Items ``start:stop``, matching ``TaskDataset.slice(start, stop)``."""
        return Reference(self.items[start:stop], self.top_k, dict(self.settings))

    def select(self, indices: Sequence[int]) -> "Reference":
        """Items at ``indices``, in that order (early stopping evaluates chunks in a shuffled order)."""
        return Reference([self.items[i] for i in indices], self.top_k, dict(self.settings))

    @property
    def nbytes(self) -> int:
        return sum(i.tokens.nbytes + i.top_ids.nbytes + i.top_logprobs.nbytes + len(i.text)
                   + (i.token_logprobs.nbytes if i.token_logprobs is not None else 0) for i in self.items)

    def save(self, path: Path) -> None:
        """To one ``.npz`` file (no pickle), written whole or not at all."""
        meta = {"top_k": self.top_k, "settings": self.settings,
                "items": [[i.n_prompt, i.text, i.truncated, i.digest] for i in self.items]}
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
        for n, i in enumerate(self.items):
            arrays[f"tokens_{n}"], arrays[f"top_ids_{n}"], arrays[f"top_logprobs_{n}"] = i.tokens, i.top_ids, i.top_logprobs
            if i.token_logprobs is not None:
                arrays[f"token_logprobs_{n}"] = i.token_logprobs
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Reference":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            items = [ReferenceItem(z[f"tokens_{n}"], n_prompt, text, truncated, z[f"top_ids_{n}"],
                                   z[f"top_logprobs_{n}"], digest,
                                   z[f"token_logprobs_{n}"] if f"token_logprobs_{n}" in z.files else None)
                     for n, (n_prompt, text, truncated, digest) in enumerate(meta["items"])]
        return cls(items, meta["top_k"], meta["settings"])

    def matches(self, dataset: TaskDataset) -> bool:
        """Whether this reference was built for ``dataset`` (its prompts and generation settings)."""
        try:
            _check(dataset, self)
        except ValueError:
            return False
        return True

    def baseline_results(self, dataset: TaskDataset) -> list[ItemResult]:
        """The baseline's own item results (score 1 on every item, by definition), without a second
        pass; ``prediction`` as ``score_against_reference`` gives it."""
        _check(dataset, self)
        out = []
        for n, (item, ref) in enumerate(zip(dataset.items, self.items)):
            prediction: dict[str, Any] = {"mean_kl": 0.0, "top1_agreement": 1.0, "kl_similarity": 1.0}
            if ref.token_logprobs is not None:
                prediction.update(_perplexity(-float(ref.token_logprobs.sum(dtype=np.float64)), ref.n_positions))
            if dataset.metric == "baseline_match":
                prediction["output"] = ref.text
            out.append(ItemResult(index=n, correct=True, prediction=prediction, category=item.category,
                                  score=1.0, truncated=ref.truncated))
        return out


def _settings(dataset: TaskDataset) -> dict[str, Any]:
    return {"max_new_tokens": dataset.max_new_tokens, "stop": list(dataset.stop or ()),
            "chat_template": dataset.chat_template}


def _digest(item: Item, settings: dict[str, Any]) -> str:
    """Ties a reference item to its prompt (a conversation by its messages) and the settings; plain
    prompts hash as they always have, so stored references stay valid."""
    prompt: Any = item.prompt if item.messages is None else item.chat()
    return hashlib.sha1(json.dumps([prompt, settings], sort_keys=True).encode()).hexdigest()[:16]


def _check(dataset: TaskDataset, reference: Reference) -> None:
    if dataset.kind == MULTIPLE_CHOICE:
        raise ValueError("label-free scoring takes a generation or prompts dataset")
    if len(dataset) != len(reference):
        raise ValueError(f"the reference holds {len(reference)} items, the dataset {len(dataset)}: "
                         "slice both alike")
    settings = _settings(dataset)
    for n, (item, ref) in enumerate(zip(dataset.items, reference.items)):
        if _digest(item, settings) != ref.digest:
            raise ValueError(f"item {n}: the reference was built for another prompt or other generation settings")


def _teacher_forced(model: Any, sequences: Sequence[np.ndarray],
                    on_chunk: Callable[[Any, np.ndarray, np.ndarray], None],
                    progress: Callable[[int], None] | None = None) -> None:
    """Run every sequence through ``model`` (batched by length, right-padded) and call
    ``on_chunk(logprobs, items, positions)`` with the fp32 next-token log-probabilities of chunks of
    scored positions (position p predicts token p + 1; every position but the last)."""
    import torch

    device = next(model.parameters()).device
    body, head = model.base_model, model.get_output_embeddings()
    finish = ev.final_logits(model)  # Granite's, Cohere's scale, Gemma's soft-capping
    budget = ev._tokens_per_batch(model, device)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    done, start = 0, 0
    with torch.inference_mode():
        while start < len(order):
            width = len(sequences[order[start]])
            batch = order[start: start + max(1, budget // width)]
            start += len(batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            rows, cols, owners, positions = [], [], [], []
            for b, i in enumerate(batch):
                seq = sequences[i]
                ids[b, : len(seq)] = torch.from_numpy(seq.astype(np.int64))
                mask[b, : len(seq)] = 1
                n = len(seq) - 1
                rows += [b] * n
                cols += range(n)
                owners += [i] * n
                positions += range(n)
            hidden = body(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            r, c = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
            owners_np, positions_np = np.asarray(owners), np.asarray(positions)
            for s in range(0, len(rows), HEAD_CHUNK):
                logits = finish(head(hidden[r[s: s + HEAD_CHUNK], c[s: s + HEAD_CHUNK]]))
                on_chunk(torch.log_softmax(logits, dim=-1), owners_np[s: s + HEAD_CHUNK],
                         positions_np[s: s + HEAD_CHUNK])
            done += len(batch)
            if progress:
                progress(done)


def _two_phases(progress: Progress | None, n: int) -> tuple[Progress | None, Callable[[int], None] | None]:
    """Progress over 2n steps: generation first, then the forward pass."""
    if progress is None:
        return None, None
    return (lambda done, total: progress(done, 2 * n)), (lambda done: progress(n + done, 2 * n))


def build_reference(model: Any, tokenizer: Any, dataset: TaskDataset, progress: Progress | None = None,
                    top_k: int = TOP_K) -> Reference:
    """The baseline's continuations and top-k next-token distributions for every item."""
    if dataset.kind == MULTIPLE_CHOICE:
        raise ValueError("label-free scoring takes a generation or prompts dataset")
    generating, forwarding = _two_phases(progress, len(dataset))
    if dataset.max_new_tokens == 0 and progress:  # nothing generated: the forward pass is all
        generating, forwarding = None, (lambda done: progress(done, len(dataset)))
    outputs = ev.generate_outputs(model, tokenizer, dataset, generating)
    sequences = [np.asarray(o.prompt_ids + o.output_ids, dtype=np.int32) for o in outputs]
    for n, seq in enumerate(sequences):
        if len(seq) < 2:
            raise InputError(f"{dataset.source}[{n}]: the text is a single token, with no next token to score; "
                             "give longer texts")
    top_ids = [np.zeros((len(s) - 1, top_k), dtype=np.int32) for s in sequences]
    top_lp = [np.zeros((len(s) - 1, top_k), dtype=np.float32) for s in sequences]
    tok_lp = [np.zeros(len(s) - 1, dtype=np.float32) for s in sequences]

    def keep(logprobs: Any, items: np.ndarray, positions: np.ndarray) -> None:
        values, indices = logprobs.topk(top_k, dim=-1)
        values, indices = values.cpu().numpy(), indices.cpu().numpy().astype(np.int32)
        actual = _next_token_logprobs(logprobs, sequences, items, positions).cpu().numpy()
        for i in np.unique(items):
            sel = items == i
            top_ids[i][positions[sel]] = indices[sel]
            top_lp[i][positions[sel]] = values[sel]
            tok_lp[i][positions[sel]] = actual[sel]

    _teacher_forced(model, sequences, keep, forwarding)
    settings = _settings(dataset)
    return Reference(
        [ReferenceItem(seq, len(o.prompt_ids), o.text, o.truncated, ids, lp, _digest(item, settings), t)
         for item, o, seq, ids, lp, t in zip(dataset.items, outputs, sequences, top_ids, top_lp, tok_lp)],
        top_k, settings)


def _next_token_logprobs(logprobs: Any, sequences: Sequence[np.ndarray], items: np.ndarray,
                         positions: np.ndarray) -> Any:
    """The log-probability each position gives the token that follows it in its sequence."""
    import torch

    following = np.fromiter((sequences[i][p + 1] for i, p in zip(items, positions)), dtype=np.int64,
                            count=len(items))
    return logprobs.gather(1, torch.from_numpy(following).to(logprobs.device)[:, None])[:, 0]


def _perplexity(nll: float, n_tokens: int) -> dict[str, Any]:
    """Per item: the summed negative log-likelihood of the tokens scored (nats), their count, and the
    perplexity exp(nll / n) -- of the text itself for a text item, else of the prompt and the
    baseline's continuation."""
    if not np.isfinite(nll):  # NaN logits: no perplexity, and no NaN in the stored JSON (PostgreSQL rejects
        # it); without "nll" the candidate's perplexity over its items is None too (selection.perplexity)
        return {"n_tokens": n_tokens, "perplexity": None}
    return {"nll": nll, "n_tokens": n_tokens, "perplexity": float(np.exp(nll / n_tokens))}


def position_scores(logprobs: Any, base_ids: Any, base_logprobs: Any) -> tuple[Any, Any]:
    """Per position: KL(baseline || candidate) over the baseline's top-k tokens plus one "rest"
    bucket, and whether the two models' most likely tokens agree (ties within ``TIE_NATS``).

    ``logprobs``: the candidate's [n, vocab]; ``base_ids``/``base_logprobs``: the baseline's top-k
    [n, k], most likely first."""
    import torch

    top = logprobs.argmax(dim=-1)
    top_lp = logprobs.gather(1, top[:, None])[:, 0]
    cand = logprobs.gather(1, base_ids).double()  # the candidate's log-probabilities of the baseline's top-k
    base = base_logprobs.double()
    p_base = base.exp()
    # The "rest" buckets come from fp32 log-probabilities, so they are known to ~1e-7 only: below
    # REST_FLOOR they count as equal (else float noise, 1e-7 * log(1e-7 / 1e-30), would look like KL).
    rest_base = (1 - p_base.sum(-1)).clamp_min(0)
    rest_cand = (1 - cand.exp().sum(-1)).clamp_min(0)
    kl = (p_base * (base - cand)).sum(-1) + torch.xlogy(rest_base, rest_base.clamp_min(REST_FLOOR)) \
        - torch.xlogy(rest_base, rest_cand.clamp_min(REST_FLOOR))
    base_lp_of_top = torch.where(base_ids == top[:, None], base, torch.full_like(base, -torch.inf)).amax(-1)
    agree = (top == base_ids[:, 0]) | (base_lp_of_top >= base[:, 0] - TIE_NATS) \
        | (cand[:, 0] >= top_lp.double() - TIE_NATS)
    # A NaN row (an overflowing candidate; argmax picks the NaN) agrees with nothing and is infinitely
    # far: its item's kl_similarity is 0, not NaN.
    return torch.nan_to_num(kl, nan=torch.inf, posinf=torch.inf).clamp_min(0), agree & ~top_lp.isnan()


def score_against_reference(model: Any, tokenizer: Any, dataset: TaskDataset, reference: Reference,
                            progress: Progress | None = None) -> list[ItemResult]:
    """Score a candidate on the baseline's ``reference`` (built on the same dataset, or sliced alike)
    by ``dataset.metric``; see the module docstring."""
    import torch

    _check(dataset, reference)
    device = next(model.parameters()).device
    matching = dataset.metric == "baseline_match"
    generating, forwarding = _two_phases(progress, len(dataset)) if matching else (None, None)
    if progress and not matching:
        forwarding = lambda done: progress(done, len(dataset))  # noqa: E731
    outputs = ev.generate_outputs(model, tokenizer, dataset, generating) if matching else None
    kl_sum = np.zeros(len(dataset), dtype=np.float64)
    agree_sum = np.zeros(len(dataset), dtype=np.float64)
    nll_sum = np.zeros(len(dataset), dtype=np.float64)
    sequences = [r.tokens for r in reference.items]

    def score(logprobs: Any, items: np.ndarray, positions: np.ndarray) -> None:
        base_ids = _gather(reference, items, positions, "top_ids")
        base_lp = _gather(reference, items, positions, "top_logprobs")
        kl, agree = position_scores(logprobs, torch.from_numpy(base_ids).long().to(device),
                                    torch.from_numpy(base_lp).to(device))
        np.add.at(kl_sum, items, kl.cpu().numpy())
        np.add.at(agree_sum, items, agree.cpu().numpy().astype(np.float64))
        np.add.at(nll_sum, items, -_next_token_logprobs(logprobs, sequences, items, positions).double().cpu().numpy())

    _teacher_forced(model, sequences, score, forwarding)
    results = []
    for n, (item, ref) in enumerate(zip(dataset.items, reference.items)):
        mean_kl = float(kl_sum[n] / ref.n_positions)
        top1 = float(agree_sum[n] / ref.n_positions)
        prediction: dict[str, Any] = {"mean_kl": mean_kl if np.isfinite(mean_kl) else None,  # JSON has no inf
                                      "top1_agreement": top1, "kl_similarity": float(np.exp(-mean_kl)),
                                      **_perplexity(float(nll_sum[n]), ref.n_positions)}
        if matching:
            assert outputs is not None
            prediction["output"] = outputs[n].text
            value = 1.0 if outputs[n].text == ref.text else 0.0
        else:
            value = prediction[dataset.metric]
        results.append(ItemResult(index=n, correct=value >= 1.0, prediction=prediction, category=item.category,
                                  score=value, truncated=ref.truncated))
    return results


def _gather(reference: Reference, items: np.ndarray, positions: np.ndarray, name: str) -> np.ndarray:
    """Rows ``positions`` of each item's ``name`` array, in order (items come in contiguous runs)."""
    parts = []
    bounds = np.flatnonzero(np.diff(items)) + 1
    for run_items, run_pos in zip(np.split(items, bounds), np.split(positions, bounds)):
        parts.append(getattr(reference.items[run_items[0]], name)[run_pos])
    return np.concatenate(parts)
