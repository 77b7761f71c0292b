"""Multiple-choice scoring speed on a GPU, against the compute roof and a one-request-at-a-time
reference, on a Llama-shaped ~1.2B model built from a config (random weights: the scores mean
nothing, the speed is real).

quantselect's scorer (packed shared context, length-bucketed batches sized from free memory,
vocabulary projection only at scored positions) against the way lm-evaluation-harness's HF backend
scores at batch size 1: one forward pass per (context, choice) request with full-vocabulary
logits. lm-eval itself is not installed on the lent GPU machine, so that reference is reimplemented
here (same requests, same model, same run) and labelled as such.

    python benchmarks/eval_gpu.py --tokenizer DIR [--items 1000] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def reference_requests(model, tokenizer, items, device: str) -> float:
    """lm-eval-style batch size 1: every (context, continuation) pair its own forward pass."""
    import torch

    from quantselect.engines.evaluate import _encode_pair

    with torch.inference_mode():
        for item in items:
            for choice in item.choices:
                ctx, cont = _encode_pair(tokenizer, item.prompt, " " + choice)
                ids = torch.tensor([ctx + cont[:-1]] if ctx else [cont[:-1]], device=device)
                logits = model(input_ids=ids).logits.float()
                logits.log_softmax(-1)
    if device == "cuda":
        torch.cuda.synchronize()
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--reference-items", type=int, default=200)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--out", type=Path, default=Path("eval_gpu.json"))
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script only")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from precision_matrix import build_model
    from quantselect.domain.dataset import FieldMapping, load_dataset
    from quantselect.engines import evaluate as ev

    piqa = REPO.parent / "shared" / "datasets" / "piqa"
    if not piqa.is_dir():
        piqa = REPO / "examples" / "piqa"
    mapping = FieldMapping(prompt="Question: {goal}\nAnswer:", choices=("sol1", "sol2"),
                           labels_file=str(next(piqa.glob("*labels*"))))
    ds = load_dataset(next(piqa.glob("*.jsonl")), mapping, limit=args.items)
    folder, n_params = build_model(Path(tempfile.mkdtemp()) / "m", args.tokenizer, args.hidden, args.layers,
                                   device=args.device)
    tok = AutoTokenizer.from_pretrained(str(folder))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(args.device).eval()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    rows = ev._rows(tok, ds.items, ev._max_length(model), ev._pack_length(model))
    tokens = sum(len(r) for r in rows)
    body_params = n_params - model.get_input_embeddings().weight.numel() - model.get_output_embeddings().weight.numel()
    scored = sum(len(r.common) + sum(len(t) for t in r.tails) for r in rows)
    flops = 2 * body_params * tokens + 2 * model.get_output_embeddings().weight.numel() * scored

    ev.score_multiple_choice(model, tok, ds.items[:64])  # warm-up: kernels, allocator
    sync()
    t0 = time.perf_counter()
    ev.score_multiple_choice(model, tok, ds.items)
    sync()
    qs = time.perf_counter() - t0

    ref_items = ds.items[: args.reference_items]
    reference_requests(model, tok, ref_items[:16], args.device)
    t0 = time.perf_counter()
    reference_requests(model, tok, ref_items, args.device)
    ref = time.perf_counter() - t0

    out = {
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, "params": n_params,
        "items": len(ds), "tokens_fed": tokens, "seconds": qs, "items_per_s": len(ds) / qs,
        "tokens_per_s": tokens / qs, "tflops": flops / qs / 1e12,
        "pct_of_peak": 100 * flops / qs / 1e12 / args.peak_tflops,
        "reference_items": len(ref_items), "reference_items_per_s": len(ref_items) / ref,
        "speedup": (len(ds) / qs) / (len(ref_items) / ref),
    }
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
