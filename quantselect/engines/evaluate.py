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
custom mask, fall back to one row per choice). On PIQA with SmolLM2 this feeds ~51 tokens per item
to the model where lm-eval feeds ~71.

- No padding through the weights: with SDPA attention the rows of a batch go through the model as
  one unpadded sequence; only attention sees them as a padded batch of rows (our attention function,
  registered with transformers' ``AttentionInterface`` and selected for the duration of the forward
  pass, scatters the queries, keys and values into rows, runs SDPA with the packed mask and gathers
  the output back). Batches are filled to a token budget from the longest row down, and the budget
  follows the free memory. A model whose attention does not go through the interface is found on
  the first batch and scored with padded rows instead.
- The leading tokens every row of a batch shares (an instruction or template in the prompt) run
  once, at the start of the sequence: each row attends to them, then to itself. On the
  "continue the sequence" example this is ~1.25x faster; on PIQA (two shared tokens) it is neutral.
- The vocabulary projection runs only at scored positions, in blocks of positions and of the
  vocabulary with a running log-sum-exp, so the logits of a block stay in cache (and a big batch
  never holds all its logits at once).

Generation (generation and prompts datasets, settings on the ``TaskDataset``):

- each prompt is encoded as the multiple-choice context is (the tokenizer's default special
  tokens), or, with ``chat_template``, rendered as one user message (a conversation item: its
  messages) through the tokenizer's chat template with the assistant turn opened and encoded without
  added special tokens (the template holds them); a tokenizer without a chat template, or a template
  that refuses the conversation (a system turn Gemma's does not take), is an InputError;
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
from contextvars import ContextVar
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
from quantselect.engines.kvcache import inner, round_kv
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
# Scored positions x vocabulary entries per block of the vocabulary projection: a CPU block's logits
# (4 MB) stay in cache for the log-sum-exp (measured on the 2-core machine: ~30 % less time for the
# projection and log-sum-exp than one matmul over the whole vocabulary).
HEAD_BLOCK = {"cpu": (256, 4096), "cuda": (4096, 32768)}
UNPADDED = "quantselect_unpadded"  # the attention implementation name registered for the forward pass


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
    """Positions the model takes (lm-eval's rule: the config's limit, else 2048; a multimodal
    wrapper's, Gemma 3's, is in its text config)."""
    config = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return 2048


def _pack_length(model: Any) -> int:
    """Longest packed row: packing needs an attention that takes an arbitrary 4D mask, and the
    packed mask of padded rows knows no sliding window (rows of one choice may be longer: the padded
    path gives them the model's own mask, the unpadded attention adds the window itself)."""
    if inner(getattr(model.config, "_attn_implementation", "sdpa")) not in ("sdpa", "eager"):
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


def _pack_batch(batch: Sequence[_Row], dtype: Any, own_mask: bool = True, skip: int = 0):
    """Input ids, position ids, the attention mask, and per scored token: (row, column whose output
    predicts it, target token, index of its group in ``groups``); ``groups`` lists, per group of
    scored tokens, the (item, choice) pairs whose log-likelihood it adds to. The mask is the 2D
    padding mask (the model's own causal mask) when every row has one tail and ``own_mask``, else
    the 4D packed mask. ``skip``: the first tokens of every row, all alike and all context (they run
    once, as the batch's prefix) are left out; positions still count them."""
    import torch

    assert all(skip < len(r.context) for r in batch), "the prefix must leave every row a context token"
    width = max(len(r) for r in batch) - skip
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
        shared, c = row.shared[skip:], len(row.context) - skip
        s = len(shared)
        ids[b, :s] = torch.tensor(shared)
        pos[b, :s] = torch.arange(skip, skip + s)
        seg[b, :s] = 0
        if row.common:  # common[t] is predicted by the token before it, once for every choice
            score(b, list(range(c - 1, s - 1)), row.common, [(row.item, j) for j in row.choices])
        start = s
        for k, (j, tail) in enumerate(zip(row.choices, row.tails), start=1):
            if not tail:
                continue
            n = len(tail) - 1
            ids[b, start: start + n] = torch.tensor(tail[:-1], dtype=torch.long)
            pos[b, start: start + n] = torch.arange(skip + s, skip + s + n)
            seg[b, start: start + n] = k
            # tail[0] is predicted by the last shared token, tail[t] by the input tail[t - 1].
            score(b, [s - 1] + list(range(start, start + n)), tail, [(row.item, j)])
            start += n
    if own_mask and all(len(row.tails) == 1 for row in batch):
        return ids, pos, (seg >= 0).long(), (rows, cols, targets, owners), groups  # the model's own mask
    q, k = seg[:, :, None], seg[:, None, :]
    allowed = torch.ones(width, width, dtype=torch.bool).tril() & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty softmax
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids, pos, mask[:, None], (rows, cols, targets, owners), groups


def score_multiple_choice(model: Any, tokenizer: Any, items: Sequence[Item],
                          progress: Progress | None = None, norm: bool = False) -> list[ItemResult]:
    """Log-likelihood of every choice of every item; the prediction per ``predict(norm=norm)``."""
    rows = _rows(tokenizer, items, _max_length(model), _pack_length(model))
    logprobs = None
    if _unpadded_supported(model):
        try:
            logprobs = _score_rows(model, items, rows, progress, unpadded=True)
        except _NotUnpadded as e:  # found on the first batch, before any progress was reported
            log.info("scoring with padded batches: %s", e)
    if logprobs is None:
        logprobs = _score_rows(model, items, rows, progress, unpadded=False)
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


class _NotUnpadded(Exception):
    """The model did not run its attention through the unpadded attention function."""


@dataclass
class _Layout:
    """Where the tokens of the unpadded sequence sit in the padded batch of rows, for attention."""

    keep: Any  # flat indices into the (rows x width) grid, one per token, in order
    mask: Any  # the packed 4D mask of the rows
    rows: int
    width: int
    prefix: int = 0  # tokens at the start of the sequence that every row sees first
    calls: int = 0
    pos: Any = None  # the (rows x width) grid's position ids; the prefix's are 0..prefix-1
    windowed: dict[int, tuple[Any, Any]] = field(default_factory=dict)

    def window_masks(self, window: int) -> tuple[Any, Any]:
        """The masks of a sliding-window layer (Gemma 3's local layers, Mistral's, Qwen2's with
        ``use_sliding_window``), for the rows and for the prefix: as ``mask`` and causal, less every
        key ``window`` or more positions behind its query, as the model's own mask (transformers passes
        the layer's window to the attention function; SDPA itself ignores it). Built once a forward."""
        if window not in self.windowed:
            import torch

            lowest = torch.finfo(self.mask.dtype).min
            first = torch.arange(self.prefix, device=self.pos.device)
            keys = torch.cat([first.expand(self.rows, -1), self.pos], dim=1)
            far = self.pos[:, :, None] - keys[:, None, :] >= window
            distance = first[:, None] - first[None, :]
            prefix = torch.zeros((self.prefix, self.prefix), dtype=self.mask.dtype, device=self.pos.device)
            prefix.masked_fill_((distance < 0) | (distance >= window), lowest)
            self.windowed[window] = self.mask.masked_fill(far[:, None], lowest), prefix[None, None]
        return self.windowed[window]


_LAYOUT: "ContextVar[_Layout | None]" = ContextVar("quantselect_unpadded_layout", default=None)


def _unpadded_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any):
    """SDPA over the rows of the current ``_Layout``: (1, heads, tokens, dim) in, rows padded for
    attention only, (1, tokens, heads, dim) out, as transformers' attention functions return. The
    prefix attends to itself (causal); every row attends to the prefix, then to itself (the mask)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout = _LAYOUT.get()
    assert layout is not None, "the unpadded attention runs only inside _forward_unpadded"
    layout.calls += 1
    n = layout.prefix
    key, value = round_kv(module, key, value)  # as the candidate's KV cache stores them

    def pad(x: Any) -> Any:
        heads, dim = x.shape[1], x.shape[3]
        out = x.new_zeros(layout.rows * layout.width, heads, dim)
        out[layout.keep] = x[0, :, n:].transpose(0, 1)
        return out.view(layout.rows, layout.width, heads, dim).transpose(1, 2)

    keys, values = pad(key), pad(value)
    if n:
        keys = torch.cat([key[:, :, :n].expand(layout.rows, -1, -1, -1), keys], dim=2)
        values = torch.cat([value[:, :, :n].expand(layout.rows, -1, -1, -1), values], dim=2)
    mask, prefix_mask = layout.mask, None
    if kwargs.get("sliding_window"):
        mask, prefix_mask = layout.window_masks(int(kwargs["sliding_window"]))
    out, _ = sdpa_attention_forward(module, pad(query), keys, values, mask, **kwargs)
    out = out.reshape(layout.rows * layout.width, *out.shape[2:])[layout.keep]
    if n:
        first, _ = sdpa_attention_forward(module, query[:, :, :n], key[:, :, :n], value[:, :, :n], prefix_mask,
                                          **{**kwargs, "is_causal": prefix_mask is None})
        out = torch.cat([first[0], out])
    return out[None], None


def _unpadded_supported(model: Any) -> bool:
    """SDPA attention that takes our packed mask (``_pack_length``); registers the function once."""
    if _pack_length(model) == 0 or inner(getattr(model.config, "_attn_implementation", None)) != "sdpa":
        return False
    from transformers import AttentionInterface

    if UNPADDED not in AttentionInterface._global_mapping:
        AttentionInterface.register(UNPADDED, _unpadded_attention)
    return True


def _forward_unpadded(model: Any, ids: Any, pos: Any, mask: Any, lengths: list[int], device: Any,
                      prefix: Sequence[int] = ()):
    """The hidden states of ``prefix`` then of the batch's real tokens, run as one sequence, and for
    every cell of the (rows x width) grid its token's index in that sequence. The rows' positions
    (``pos``) start after the prefix, and they see it first (``_pack_batch(skip=len(prefix))``)."""
    import torch

    n_rows, width = ids.shape
    n = len(prefix)
    keep = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).flatten().nonzero()[:, 0]
    if n:  # every row may see every prefix token
        mask = torch.cat([mask.new_zeros((n_rows, 1, width, n)), mask], dim=-1)
    layout = _Layout(keep.to(device), mask.to(device), n_rows, width, prefix=n, pos=pos.to(device))
    token, config = _LAYOUT.set(layout), model.config
    own = config._attn_implementation
    config._attn_implementation = UNPADDED
    try:
        input_ids = torch.cat([torch.tensor(list(prefix), dtype=torch.long), ids.flatten()[keep]])
        positions = torch.cat([torch.arange(n), pos.flatten()[keep]])
        hidden = model.base_model(input_ids=input_ids[None].to(device),
                                  position_ids=positions[None].to(device)).last_hidden_state
    finally:
        config._attn_implementation = own
        _LAYOUT.reset(token)
    if layout.calls == 0:
        raise _NotUnpadded(f"{type(model).__name__} does not call transformers' attention interface")
    where = torch.full((n_rows * width,), -1, dtype=torch.long)
    where[keep] = n + torch.arange(len(keep))
    return hidden[0], where


def _batch_prefix(batch: Sequence[_Row]) -> int:
    """Leading tokens every row of the batch shares (an instruction, a template, few-shot examples)
    that can run once for all: at most all but the last context token of the shortest context."""
    if len(batch) < 2:
        return 0
    return min(_common_prefix([r.shared for r in batch]), min(len(r.context) for r in batch) - 1)


def final_logits(model: Any) -> Callable[[Any], Any]:
    """The fp32 logits from the output head's, finished as the model's own forward finishes them (we
    run ``base_model`` and the head ourselves): Granite's ``/ logits_scaling`` (MiniCPM3 divides the
    hidden states before its bias-free head: the same; HyperCLOVAX multiplies), Cohere's
    ``* logit_scale``, then Gemma 2/3's ``final_logit_softcapping``."""
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = 1.0
    if getattr(config, "logits_scaling", None):
        s = float(config.logits_scaling)
        scale = s if str(getattr(config, "model_type", "")).startswith("hyperclovax") else 1 / s
    if isinstance(getattr(config, "logit_scale", None), (int, float)):
        scale *= float(config.logit_scale)
    softcap = getattr(config, "final_logit_softcapping", None)

    def finish(logits: Any) -> Any:
        logits = logits.float()
        if scale != 1.0:
            logits = logits * scale
        return torch.tanh(logits / softcap) * softcap if softcap else logits

    return finish


def _target_logprobs(hidden: Any, head: Any, targets: Any, finish: Callable[[Any], Any], device: Any) -> Any:
    """log p(target) at each position of ``hidden`` (positions x hidden), the head's logits finished
    by ``finish`` (``final_logits``): the vocabulary projection and its log-sum-exp in blocks
    (``HEAD_BLOCK``) where the head is a plain linear layer, else at once (a quantized head's weight
    cannot be sliced)."""
    import torch

    weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    plain = (type(head) is torch.nn.Linear and type(weight) is torch.nn.Parameter
             and weight.dtype.is_floating_point)

    if not plain:
        logits = finish(head(hidden))
        return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    n_pos, n_vocab = HEAD_BLOCK.get(device.type, HEAD_BLOCK["cpu"])
    out = []
    for s in range(0, len(hidden), n_pos):
        h, t = hidden[s: s + n_pos], targets[s: s + n_pos]
        target_logit = torch.zeros(len(h), dtype=torch.float32, device=h.device)
        lse = []
        for v in range(0, weight.shape[0], n_vocab):
            logits = finish(torch.nn.functional.linear(h, weight[v: v + n_vocab],
                                                       None if bias is None else bias[v: v + n_vocab]))
            lse.append(torch.logsumexp(logits, dim=-1))
            inside = ((t >= v) & (t < v + logits.shape[1])).nonzero()[:, 0]
            target_logit[inside] = logits[inside, t[inside] - v]
        out.append(target_logit - torch.logsumexp(torch.stack(lse, dim=-1), dim=-1))
    return torch.cat(out)


def _score_rows(model: Any, items: Sequence[Item], rows: list[_Row], progress: Progress | None,
                unpadded: bool) -> list[list[float]]:
    """Every choice's log-likelihood, the rows in batches of the token budget."""
    import torch

    device = next(model.parameters()).device
    dtype = getattr(model, "dtype", torch.float32)
    dtype = dtype if dtype.is_floating_point else torch.float32
    # Longest first: the first batch shows the worst memory use, and padding stays small. Padded,
    # packed rows and one-choice rows go apart (their masks differ).
    rows = sorted(rows, key=lambda r: -len(r) if unpadded else (len(r.tails) == 1, -len(r)))
    budget = _tokens_per_batch(model, device)
    finish = final_logits(model)
    head = model.get_output_embeddings()
    logprobs = [[0.0] * len(item.choices or ()) for item in items]
    rows_left = [0] * len(items)
    for row in rows:
        rows_left[row.item] += 1
    n_done, start = 0, 0
    with torch.inference_mode():
        while start < len(rows):
            if unpadded:  # real tokens up to the budget
                end, tokens = start + 1, len(rows[start])
                while end < len(rows) and tokens + len(rows[end]) <= budget:
                    tokens += len(rows[end])
                    end += 1
                batch = rows[start:end]
            else:  # padded tokens up to the budget, one kind of mask
                size = max(1, budget // len(rows[start]))
                batch = [r for r in rows[start: start + size] if (len(r.tails) == 1) == (len(rows[start].tails) == 1)]
            start += len(batch)
            skip = _batch_prefix(batch) if unpadded else 0
            ids, pos, mask, (r, c, targets, owners), groups = _pack_batch(batch, dtype, not unpadded, skip)
            if unpadded:
                hidden, where = _forward_unpadded(model, ids, pos, mask, [len(b) - skip for b in batch], device,
                                                  prefix=batch[0].shared[:skip])
                scored = hidden[where[torch.tensor(r) * ids.shape[1] + torch.tensor(c)].to(device)]
            else:
                hidden = model.base_model(input_ids=ids.to(device), position_ids=pos.to(device),
                                          attention_mask=mask.to(device)).last_hidden_state
                scored = hidden[r, c]
            lp = _target_logprobs(scored, head, torch.tensor(targets, device=device), finish, device)
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
    return logprobs


# --- generation -----------------------------------------------------------------------------------


@dataclass
class Generation:
    """One item's greedy output."""

    prompt_ids: list[int]  # the prompt as fed to the model (chat template applied, cut to fit)
    output_ids: list[int]  # generated tokens, through the end-of-sequence token or the stop string
    text: str  # decoded (special tokens skipped), cut before the first stop string
    truncated: bool = False  # the prompt was cut from the left
    stopped: str = field(default="length")  # "eos", "stop" or "length"


def render_prompt(tokenizer: Any, item: Item, chat_template: bool) -> str:
    """The prompt as text: as given, or (``chat_template``, conversations) the item's messages through
    the tokenizer's chat template with the assistant turn opened."""
    if not chat_template and item.messages is None:
        return item.prompt
    if not getattr(tokenizer, "chat_template", None):
        if item.messages is not None:
            raise InputError("the dataset's items are conversations ('messages'), but the model's tokenizer has "
                             "no chat template to render them (not an instruct model?)")
        raise InputError("chat-template was asked for, but the model's tokenizer has no chat template "
                         "(not an instruct model?): leave it off")
    try:
        return tokenizer.apply_chat_template(item.chat(), add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja's TemplateError, raise_exception("System role not supported")
        raise InputError(f"the model's chat template refused a conversation ({e}): {item.prompt[:60]!r}") from None


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
        text = render_prompt(tokenizer, item, dataset.chat_template)
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
    """Every item's greedy output under the dataset's generation settings (none at all with
    ``max_new_tokens`` 0: a text scored on its own tokens)."""
    prompts, truncated = encode_prompts(model, tokenizer, dataset)
    assert dataset.max_new_tokens is not None and dataset.stop is not None
    if dataset.max_new_tokens == 0:
        if progress:
            progress(len(prompts), len(prompts))
        return [Generation(p, [], "", cut) for p, cut in zip(prompts, truncated)]
    outs = generate(model, tokenizer, prompts, dataset.max_new_tokens, dataset.stop, progress)
    return [Generation(p, ids, text, cut, how) for p, cut, (ids, text, how) in zip(prompts, truncated, outs)]
