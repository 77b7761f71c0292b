"""Score a loaded model on a task dataset, item by item.

Multiple choice follows lm-evaluation-harness's log-likelihood semantics: the continuation is
``" " + choice`` after the prompt (no delimiter when the prompt ends in whitespace); tokens are cut
at the context/continuation boundary as it does (encode the whole string, the continuation is what
follows the encoded context); the prediction is the choice with the highest summed log-likelihood.
Generation is greedy, batched with left padding, scored by normalized exact match or final number.
"""

from __future__ import annotations

import re
import string
from typing import Any, Callable, Sequence

from quantselect.domain.dataset import MULTIPLE_CHOICE, Item, TaskDataset
from quantselect.domain.results import ItemResult

Progress = Callable[[int, int], None]
TOKENS_PER_BATCH = {"cpu": 1024, "cuda": 16384}  # padded tokens per forward pass: bounds activation memory


def evaluate(model: Any, tokenizer: Any, dataset: TaskDataset, progress: Progress | None = None,
             max_new_tokens: int = 64) -> list[ItemResult]:
    if dataset.kind == MULTIPLE_CHOICE:
        return score_multiple_choice(model, tokenizer, dataset.items, progress)
    outputs = generate(model, tokenizer, [i.prompt for i in dataset.items], max_new_tokens, progress)
    scorer = final_number_match if dataset.metric == "final_number" else exact_match
    return [
        ItemResult(index=n, correct=scorer(out, item.reference or ""), prediction=out, category=item.category)
        for n, (item, out) in enumerate(zip(dataset.items, outputs))
    ]


def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    # As lm-evaluation-harness: trailing spaces of the context move to the continuation.
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return whole[: len(ctx)], whole[len(ctx):]


def score_multiple_choice(model: Any, tokenizer: Any, items: Sequence[Item],
                          progress: Progress | None = None) -> list[ItemResult]:
    import torch

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    requests = []  # (item index, choice index, tokens, n continuation tokens)
    for i, item in enumerate(items):
        assert item.choices is not None
        delim = "" if item.prompt[-1:].isspace() else " "
        for j, choice in enumerate(item.choices):
            ctx, cont = _encode_pair(tokenizer, item.prompt, delim + choice)
            if not cont:
                raise ValueError(f"item {i}: choice {j} encodes to no tokens")
            tokens = (ctx or [bos]) + cont
            requests.append((i, j, tokens, len(cont)))
    # Longest first: the first batch shows the worst memory use, and padding stays small.
    order = sorted(range(len(requests)), key=lambda r: -len(requests[r][2]))
    logprobs: dict[tuple[int, int], float] = {}
    device = next(model.parameters()).device
    body, head = model.base_model, model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_items_done, per_item_left = 0, {i: len(it.choices or ()) for i, it in enumerate(items)}
    pos = 0
    with torch.inference_mode():
        while pos < len(order):
            width = len(requests[order[pos]][2]) - 1
            size = max(1, TOKENS_PER_BATCH.get(device.type, 1024) // max(width, 1))
            batch = [requests[r] for r in order[pos: pos + size]]
            pos += len(batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, (_, _, tokens, _) in enumerate(batch):
                inp = tokens[:-1]
                ids[b, : len(inp)] = torch.tensor(inp)
                mask[b, : len(inp)] = 1
            hidden = body(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            # Log-softmax only at the continuation positions: the vocabulary projection is the
            # largest matmul of a small model.
            rows, cols, targets, owners = [], [], [], []
            for b, (i, j, tokens, n_cont) in enumerate(batch):
                start = len(tokens) - 1 - n_cont
                for k in range(n_cont):
                    rows.append(b)
                    cols.append(start + k)
                    targets.append(tokens[start + k + 1])
                    owners.append((i, j))
            logits = head(hidden[rows, cols]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            lp = torch.log_softmax(logits, dim=-1)[torch.arange(len(targets)), torch.tensor(targets)]
            for owner, value in zip(owners, lp.tolist()):
                logprobs[owner] = logprobs.get(owner, 0.0) + value
            for i, _, _, _ in batch:
                per_item_left[i] -= 1
                if per_item_left[i] == 0:
                    n_items_done += 1
            if progress:
                progress(n_items_done, len(items))
    results = []
    for i, item in enumerate(items):
        scores = [logprobs[(i, j)] for j in range(len(item.choices or ()))]
        pred = max(range(len(scores)), key=scores.__getitem__)
        results.append(ItemResult(index=i, correct=pred == item.answer, prediction=pred,
                                  choice_logprobs=scores, category=item.category))
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
