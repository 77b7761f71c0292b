"""Score a loaded model on a task dataset, item by item.

Multiple choice follows lm-evaluation-harness's log-likelihood semantics:

- the continuation of a choice is ``" " + choice`` (the target delimiter) after the prompt;
  trailing whitespace of the prompt moves to the continuation, and tokens are cut at the boundary
  as lm-eval cuts them: the context is the prompt encoded alone, the continuation is what follows
  it in the encoding of the whole string (the tokenizer's own special tokens, e.g. BOS, included);
- a choice's score is the summed log-likelihood of its continuation tokens; ``accuracy`` picks the
  highest, ``accuracy_norm`` (lm-eval's ``acc_norm``) the highest per character of the choice.

One deliberate difference: when the prompt already ends in whitespace no delimiter is added, where
lm-eval would add a second space (and warns about it).

Speed: an item's context -- and the tokens all its choices start with -- runs through the model
once for all its choices. Each item is one packed row: the shared part, then the rest of every
choice, with a 4D attention mask that lets each choice see the shared part and its own earlier
tokens only, and position ids that restart after the shared part for each choice, so each choice
sees exactly what it would see alone (rows that do not fit, or models whose attention takes no
custom mask, fall back to one row per choice). Rows are batched by length, the vocabulary
projection and log-softmax run only at scored positions, and the batch size follows the free
memory. On PIQA with SmolLM2 this feeds ~51 tokens per item to the model where lm-eval feeds ~71.

Generation (generation and prompts datasets, settings on the ``TaskDataset``):

- each prompt is encoded as the multiple-choice context is (the tokenizer's default special
  tokens), or, with ``chat_template``, rendered as one user message through the tokenizer's chat
  template with the assistant turn opened and encoded without added special tokens (the template
  holds them); a tokenizer without a chat template is an InputError;
- a prompt longer than the model's positions minus ``max_new_tokens`` is cut from the left, as
  lm-eval cuts it, and the item is flagged ``truncated`` (a warning counts them); a
  multiple-choice context cut from the left is flagged the same way;
- decoding is greedy, batched with left padding (the attention mask gives the position ids), the
  rows sorted by length and as many per batch as a share of the free memory holds (at most
  ``GENERATION_ROWS``); a row ends at the end-of-sequence token, at ``max_new_tokens``, or as soon
  as its text holds a stop string (searched for after the output's leading whitespace), and a
  batch ends when all its rows have;
- the output is the decoded text (special tokens skipped) cut before the first stop string, scored
  by ``exact_match``, ``final_number`` or ``substring`` (``quantselect.domain.dataset``).

Label-free metrics (``top1_agreement``, ``kl_similarity``, ``baseline_match``) compare a candidate
with the baseline's ``labelfree.Reference``: see ``quantselect.engines.labelfree``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

from quantselect.domain.dataset import (
    LABEL_FREE_METRICS,
    MULTIPLE_CHOICE,
    TEXT_METRICS,
    Item,
    TaskDataset,
    exact_match,
    final_number,
    final_number_match,
    normalize_text,
    substring_match,
)
from quantselect.domain.results import ItemResult
from quantselect.errors import InputError

if TYPE_CHECKING:
    from quantselect.engines.labelfree import Reference

__all__ = ["evaluate", "generate", "generate_outputs", "encode_prompts", "score_multiple_choice", "predict",
           "exact_match", "final_number", "final_number_match", "normalize_text", "substring_match"]

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
TARGET_DELIMITER = " "
# Most padded tokens per forward pass. On a GPU the free memory is the real bound; on a CPU larger
# batches stop paying off long before memory runs out (measured on a 2-core AVX2 machine with
# SmolLM2 on PIQA: 1024 tokens ~15 % faster than 2048, 512 and 4096 slower).
TOKENS_PER_BATCH = {"cpu": 1024, "cuda": 65536}
# Most rows per generation batch: decoding reads every weight once per step for the whole batch,
# so rows are nearly free until compute binds; a finished row still rides along until its batch ends.
GENERATION_ROWS = {"cpu": 16, "cuda": 256}
MEMORY_FRACTION = 0.25  # of the free memory that one batch's activations may take


def evaluate(model: Any, tokenizer: Any, dataset: TaskDataset, progress: Progress | None = None,
             max_new_tokens: int | None = None, reference: "Reference | None" = None) -> list[ItemResult]:
    """Score every item of ``dataset`` (any slice of a dataset: indices count from its first item).

    ``max_new_tokens``, when given, overrides the dataset's setting. Label-free metrics need the
    baseline's ``reference`` (``labelfree.build_reference``)."""
    if max_new_tokens is not None and dataset.kind != MULTIPLE_CHOICE:
        dataset = replace(dataset, max_new_tokens=max_new_tokens)
    if dataset.kind == MULTIPLE_CHOICE:
        return score_multiple_choice(model, tokenizer, dataset.items, progress,
                                     norm=dataset.metric == "accuracy_norm")
    if dataset.metric in LABEL_FREE_METRICS:
        from quantselect.engines.labelfree import score_against_reference

        if reference is None:
            raise ValueError(f"metric {dataset.metric} compares with the baseline: build its reference first "
                             "(labelfree.build_reference on the baseline) and pass reference=")
        return score_against_reference(model, tokenizer, dataset, reference, progress)
    outputs = generate_outputs(model, tokenizer, dataset, progress)
    scorer = TEXT_METRICS[dataset.metric]
    return [
        ItemResult(index=n, correct=scorer(out.text, item.reference or ""), prediction=out.text,
                   category=item.category, truncated=out.truncated)
        for n, (item, out) in enumerate(zip(dataset.items, outputs))
    ]


def predict(choice_logprobs: Sequence[float], choices: Sequence[str], norm: bool = False) -> int:
    """The chosen index: the highest log-likelihood (lm-eval ``acc``) or, with ``norm``, the highest
    log-likelihood per character of the choice (``acc_norm``). Ties go to the first."""
    scores = [lp / len(c) for lp, c in zip(choice_logprobs, choices)] if norm else list(choice_logprobs)
    return max(range(len(scores)), key=scores.__getitem__)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]  # the tokenizer's default special tokens, as lm-eval's HF model


def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing whitespace of the context moves to the continuation; the context
    is encoded alone, the continuation is what follows it in the encoding of the whole string."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


@dataclass
class _Row:
    """One sequence for the model: a context, the tokens every continuation starts with (computed
    once), then the rest of each continuation ("tails"), each seeing only the shared part and itself."""

    item: int
    choices: list[int]  # which choice of the item each tail finishes
    context: list[int]
    common: list[int]
    tails: list[list[int]]
    truncated: bool = False  # the context was cut from the left to fit

    @property
    def shared(self) -> list[int]:
        return self.context + self.common

    def __len__(self) -> int:  # input tokens: the last token of a tail is never an input
        return len(self.context) + len(self.common) + sum(max(len(t) - 1, 0) for t in self.tails)


def _common_prefix(seqs: list[list[int]]) -> int:
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


def _rows(tokenizer: Any, items: Sequence[Item], max_length: int, pack_length: int) -> list[_Row]:
    """One packed row per item where its longest choice fits in ``pack_length`` positions (0: never),
    else one row per choice with the context cut from the left to fit ``max_length``, as lm-eval."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rows = []
    for i, item in enumerate(items):
        assert item.choices is not None
        delim = "" if item.prompt[-1:].isspace() else TARGET_DELIMITER
        pairs = [_encode_pair(tokenizer, item.prompt, delim + choice) for choice in item.choices]
        context = pairs[0][0] or [prefix]
        conts = [cont for _, cont in pairs]
        for j, cont in enumerate(conts):
            if not cont:
                raise ValueError(f"item {i}: choice {j} encodes to no tokens")
            if len(cont) > max_length:
                raise ValueError(f"item {i}: choice {j} is longer than the model's {max_length} positions")
        if len(context) + max(map(len, conts)) - 1 <= pack_length:
            n = _common_prefix(conts)
            rows.append(_Row(i, list(range(len(conts))), context, conts[0][:n], [c[n:] for c in conts]))
        else:
            for j, cont in enumerate(conts):
                keep = max_length + 1 - len(cont)
                rows.append(_Row(i, [j], context[-keep:], [], [cont], truncated=len(context) > keep))
    return rows


def _max_length(model: Any) -> int:
    """Positions the model takes (lm-eval's rule: the config's limit, else 2048)."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        if getattr(model.config, name, None):
            return int(getattr(model.config, name))
    return 2048


def _pack_length(model: Any) -> int:
    """Longest packed row: packing needs an attention that takes an arbitrary 4D mask, and the
    mask we build knows no sliding window."""
    if getattr(model.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return 0
    window = getattr(model.config, "sliding_window", None)
    return min(_max_length(model), window) if window else _max_length(model)


def _free_memory(device: Any) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _tokens_per_batch(model: Any, device: Any) -> int:
    """Padded tokens per forward pass that fit in a share of the free memory, within the cap."""
    free = _free_memory(device)
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", 4096)
    inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
    vocab = getattr(cfg, "vocab_size", 32000)
    # Live activations of one layer in the model's dtype (≤ 4 bytes), plus fp32 logits and their
    # log-softmax at the continuation positions (most positions, for short contexts).
    per_token = 4 * (8 * hidden + 3 * inter) + 8 * vocab
    budget = int(free * MEMORY_FRACTION) // per_token
    return max(1, min(budget, TOKENS_PER_BATCH.get(device.type, TOKENS_PER_BATCH["cpu"])))


def _pack_batch(batch: Sequence[_Row], dtype: Any):
    """Input ids, position ids, the attention mask, and per scored token: (row, column whose output
    predicts it, target token, index of its group in ``groups``); ``groups`` lists, per group of
    scored tokens, the (item, choice) pairs whose log-likelihood it adds to."""
    import torch

    width = max(len(r) for r in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    pos = torch.zeros((len(batch), width), dtype=torch.long)
    seg = torch.full((len(batch), width), -1, dtype=torch.long)  # -1 padding, 0 shared, k tail k
    rows, cols, targets, owners, groups = [], [], [], [], []

    def score(b: int, columns: list[int], tokens: list[int], members: list[tuple[int, int]]) -> None:
        rows.extend([b] * len(tokens))
        cols.extend(columns)
        targets.extend(tokens)
        owners.extend([len(groups)] * len(tokens))
        groups.append(members)

    for b, row in enumerate(batch):
        shared, c = row.shared, len(row.context)
        s = len(shared)
        ids[b, :s] = torch.tensor(shared)
        pos[b, :s] = torch.arange(s)
        seg[b, :s] = 0
        if row.common:  # common[t] is predicted by the token before it, once for every choice
            score(b, list(range(c - 1, s - 1)), row.common, [(row.item, j) for j in row.choices])
        start = s
        for k, (j, tail) in enumerate(zip(row.choices, row.tails), start=1):
            if not tail:
                continue
            n = len(tail) - 1
            ids[b, start: start + n] = torch.tensor(tail[:-1], dtype=torch.long)
            pos[b, start: start + n] = torch.arange(s, s + n)
            seg[b, start: start + n] = k
            # tail[0] is predicted by the last shared token, tail[t] by the input tail[t - 1].
            score(b, [s - 1] + list(range(start, start + n)), tail, [(row.item, j)])
            start += n
    if all(len(row.tails) == 1 for row in batch):
        return ids, pos, (seg >= 0).long(), (rows, cols, targets, owners), groups  # the model's own mask
    q, k = seg[:, :, None], seg[:, None, :]
    allowed = torch.ones(width, width, dtype=torch.bool).tril() & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty softmax
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids, pos, mask[:, None], (rows, cols, targets, owners), groups


def score_multiple_choice(model: Any, tokenizer: Any, items: Sequence[Item],
                          progress: Progress | None = None, norm: bool = False) -> list[ItemResult]:
    """Log-likelihood of every choice of every item; the prediction per ``predict(norm=norm)``."""
    import torch

    device = next(model.parameters()).device
    dtype = getattr(model, "dtype", torch.float32)
    dtype = dtype if dtype.is_floating_point else torch.float32
    rows = _rows(tokenizer, items, _max_length(model), _pack_length(model))
    # Packed rows and one-choice rows apart (their masks differ), each longest first: the first
    # batch shows the worst memory use, and padding stays small.
    rows.sort(key=lambda r: (len(r.tails) == 1, -len(r)))
    budget = _tokens_per_batch(model, device)
    body, head = model.base_model, model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    logprobs = [[0.0] * len(item.choices or ()) for item in items]
    rows_left = [0] * len(items)
    for row in rows:
        rows_left[row.item] += 1
    n_done, start = 0, 0
    with torch.inference_mode():
        while start < len(rows):
            size = max(1, budget // len(rows[start]))
            batch = [r for r in rows[start: start + size] if (len(r.tails) == 1) == (len(rows[start].tails) == 1)]
            start += len(batch)
            ids, pos, mask, (r, c, targets, owners), groups = _pack_batch(batch, dtype)
            hidden = body(input_ids=ids.to(device), position_ids=pos.to(device),
                          attention_mask=mask.to(device)).last_hidden_state
            # Log-softmax only at the continuation positions: the vocabulary projection is the
            # largest matmul of a small model.
            logits = head(hidden[r, c]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            target = torch.tensor(targets, device=logits.device)
            lp = logits.gather(1, target[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
            sums = torch.zeros(len(groups), dtype=torch.float64)
            sums.index_add_(0, torch.tensor(owners), lp.double().cpu())
            for members, value in zip(groups, sums.tolist()):
                for i, j in members:
                    logprobs[i][j] += value
            for row in batch:
                rows_left[row.item] -= 1
                n_done += rows_left[row.item] == 0
            if progress:
                progress(n_done, len(items))
    truncated = [False] * len(items)
    for row in rows:
        truncated[row.item] |= row.truncated
    if any(truncated):
        log.warning("%d of %d multiple-choice contexts were cut from the left to fit the model's %d positions",
                    sum(truncated), len(items), _max_length(model))
    results = []
    for i, item in enumerate(items):
        pred = predict(logprobs[i], item.choices or (), norm)
        results.append(ItemResult(index=i, correct=pred == item.answer, prediction=pred,
                                  choice_logprobs=logprobs[i], category=item.category, truncated=truncated[i]))
    return results


# --- generation -----------------------------------------------------------------------------------


@dataclass
class Generation:
    """One item's greedy output."""

    prompt_ids: list[int]  # the prompt as fed to the model (chat template applied, cut to fit)
    output_ids: list[int]  # generated tokens, through the end-of-sequence token or the stop string
    text: str  # decoded (special tokens skipped), cut before the first stop string
    truncated: bool = False  # the prompt was cut from the left
    stopped: str = field(default="length")  # "eos", "stop" or "length"


def render_prompt(tokenizer: Any, prompt: str, chat_template: bool) -> str:
    if not chat_template:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("chat-template was asked for, but the model's tokenizer has no chat template "
                         "(not an instruct model?): leave it off")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)


def encode_prompts(model: Any, tokenizer: Any, dataset: TaskDataset) -> tuple[list[list[int]], list[bool]]:
    """Each item's prompt ids (chat template applied when the dataset asks) and whether it was cut
    from the left to leave ``max_new_tokens`` positions free."""
    n_new = dataset.max_new_tokens or 1
    limit = _max_length(model) - n_new
    if limit < 1:
        raise InputError(f"max-new-tokens {n_new} leaves no room for a prompt in the model's "
                         f"{_max_length(model)} positions")
    fallback = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids, truncated = [], []
    for item in dataset.items:
        text = render_prompt(tokenizer, item.prompt, dataset.chat_template)
        enc = tokenizer(text, add_special_tokens=not dataset.chat_template)["input_ids"] or [fallback]
        truncated.append(len(enc) > limit)
        ids.append(list(enc[-limit:]))
    if any(truncated):
        log.warning("%d of %d prompts were cut from the left to fit the model's %d positions less %d new tokens",
                    sum(truncated), len(ids), _max_length(model), n_new)
    return ids, truncated


def stop_index(text: str, stop: Sequence[str]) -> int | None:
    """Where the first stop string starts in ``text``, searched for after its leading whitespace."""
    start = len(text) - len(text.lstrip())
    hits = [k for s in stop if (k := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return ids


def _generation_rows(model: Any, device: Any, width: int) -> int:
    """Rows of ``width`` positions (prompt + new tokens) whose cache and prefill activations fit in
    a share of the free memory, within the cap."""
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", 4096)
    inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
    heads = getattr(cfg, "num_attention_heads", 32)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    layers = getattr(cfg, "num_hidden_layers", 32)
    vocab = getattr(cfg, "vocab_size", 32000)
    # fp32 upper bounds: the KV cache of every layer, one layer's prefill activations, the logits.
    per_row = width * (4 * 2 * layers * kv_heads * head_dim + 4 * (8 * hidden + 3 * inter)) + 8 * vocab
    rows = int(_free_memory(device) * MEMORY_FRACTION) // per_row
    return max(1, min(rows, GENERATION_ROWS.get(device.type, GENERATION_ROWS["cpu"])))


def _stop_criteria(tokenizer: Any, stop: Sequence[str], width: int) -> Any:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopStrings(StoppingCriteria):
        """A row is done once its generated text holds a stop string."""

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            texts = tokenizer.batch_decode(input_ids[:, width:], skip_special_tokens=True)
            return torch.tensor([stop_index(t, stop) is not None for t in texts], dtype=torch.bool,
                                device=input_ids.device)

    return StoppingCriteriaList([StopStrings()])


def _cut(tokenizer: Any, tokens: list[int], eos: Sequence[int], stop: Sequence[str]) -> tuple[list[int], str, str]:
    """A row's generated tokens through the end-of-sequence token (kept), or through the token that
    completes the first stop string; its text cut before that string; how it ended."""
    def text_of(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    end = next((k for k, t in enumerate(tokens) if t in eos), None)
    body = tokens if end is None else tokens[:end]
    text = text_of(body)
    cut = stop_index(text, stop) if stop else None
    if cut is not None:
        lo, hi = 1, len(body)  # the shortest prefix whose text holds the stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if stop_index(text_of(body[:mid]), stop) is not None:
                hi = mid
            else:
                lo = mid + 1
        return body[:lo], text[:cut], "stop"
    if end is not None:
        return tokens[: end + 1], text, "eos"
    return tokens, text, "length"


def generate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             stop: Sequence[str] = (), progress: Progress | None = None) -> list[tuple[list[int], str, str]]:
    """Greedy continuations of token-id prompts, batched with left padding: per prompt the output
    ids, the text and how it ended (see ``_cut``)."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=eos or None, pad_token_id=pad)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: worst memory first
    outputs: list[Any] = [None] * len(prompts)
    start = 0
    with torch.inference_mode():
        while start < len(order):
            width = len(prompts[order[start]])
            batch = order[start: start + _generation_rows(model, device, width + max_new_tokens)]
            start += len(batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, i in enumerate(batch):
                n = len(prompts[i])
                ids[b, width - n:] = torch.tensor(list(prompts[i]), dtype=torch.long)
                mask[b, width - n:] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                 stopping_criteria=_stop_criteria(tokenizer, stop, width) if stop else None)
            for b, i in enumerate(batch):
                outputs[i] = _cut(tokenizer, out[b, width:].tolist(), eos, stop)
            if progress:
                progress(start, len(prompts))
    return outputs


def generate_outputs(model: Any, tokenizer: Any, dataset: TaskDataset,
                     progress: Progress | None = None) -> list[Generation]:
    """Every item's greedy output under the dataset's generation settings."""
    prompts, truncated = encode_prompts(model, tokenizer, dataset)
    assert dataset.max_new_tokens is not None and dataset.stop is not None
    outs = generate(model, tokenizer, prompts, dataset.max_new_tokens, dataset.stop, progress)
    return [Generation(p, ids, text, cut, how) for p, cut, (ids, text, how) in zip(prompts, truncated, outs)]
