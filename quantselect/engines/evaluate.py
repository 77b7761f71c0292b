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

Generation is greedy, batched with left padding, scored by normalized exact match or final number.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from quantselect.domain.dataset import MULTIPLE_CHOICE, Item, TaskDataset
from quantselect.domain.results import ItemResult

Progress = Callable[[int, int], None]
TARGET_DELIMITER = " "
# Most padded tokens per forward pass. On a GPU the free memory is the real bound; on a CPU larger
# batches stop paying off long before memory runs out.
TOKENS_PER_BATCH = {"cpu": 2048, "cuda": 65536}
MEMORY_FRACTION = 0.25  # of the free memory that one batch's activations may take


def evaluate(model: Any, tokenizer: Any, dataset: TaskDataset, progress: Progress | None = None,
             max_new_tokens: int = 64) -> list[ItemResult]:
    if dataset.kind == MULTIPLE_CHOICE:
        return score_multiple_choice(model, tokenizer, dataset.items, progress,
                                     norm=dataset.metric == "accuracy_norm")
    outputs = generate(model, tokenizer, [i.prompt for i in dataset.items], max_new_tokens, progress)
    scorer = final_number_match if dataset.metric == "final_number" else exact_match
    return [
        ItemResult(index=n, correct=scorer(out, item.reference or ""), prediction=out, category=item.category)
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
            rows += [_Row(i, [j], context[-(max_length + 1 - len(cont)):], [], [cont]) for j, cont in enumerate(conts)]
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


def _tokens_per_batch(model: Any, device: Any) -> int:
    """Padded tokens per forward pass that fit in a share of the free memory, within the cap."""
    import psutil
    import torch

    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = psutil.virtual_memory().available
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
    results = []
    for i, item in enumerate(items):
        pred = predict(logprobs[i], item.choices or (), norm)
        results.append(ItemResult(index=i, correct=pred == item.answer, prediction=pred,
                                  choice_logprobs=logprobs[i], category=item.category))
    return results


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
             progress: Progress | None = None, batch_size: int = 8) -> list[str]:
    import torch

    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    outputs: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start: start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            outputs.extend(tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
            if progress:
                progress(len(outputs), len(prompts))
    return outputs


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_text(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(output: str, reference: str) -> bool:
    first_line = output.strip().split("\n", 1)[0] if output.strip() else ""
    return normalize_text(first_line) == normalize_text(reference) or normalize_text(output) == normalize_text(reference)


def _final_number(text: str) -> str | None:
    if "####" in text:
        text = text.split("####")[-1]
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    n = numbers[-1].replace(",", "").rstrip(".")
    try:
        return str(float(n)).rstrip("0").rstrip(".")
    except ValueError:
        return None


def final_number_match(output: str, reference: str) -> bool:
    got, want = _final_number(output), _final_number(reference)
    return got is not None and got == want
