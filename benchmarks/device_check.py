"""GPU check of every candidate's engine path, run on a machine with one CUDA GPU.

Builds a Llama-shaped model from a config (random weights, ~1.2B parameters by default), then
runs each candidate through the same worker code the Ray tasks use (load + quantize, evaluate on
PIQA items, measure), and reports per candidate: status, quantize time, weight bytes, peak CUDA
memory, multiple-choice scoring throughput and eager batch-1 decode tokens/s next to the memory-
bandwidth limit. Scores are meaningless on random weights; this checks code paths and speed.

    python benchmarks/device_check.py --tokenizer DIR --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CANDIDATES = ("baseline", "bf16", "fp16", "int8", "w8a8", "int4", "fp8")


def build_model(out: Path, tokenizer_dir: Path, hidden: int, layers: int, device: str = "cuda") -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                      max_position_embeddings=4096, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    n = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return out, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("device_check.json"))
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--bandwidth-tbs", type=float, default=3.35, help="HBM bandwidth of the GPU (H100 SXM: 3.35)")
    args = ap.parse_args()

    import torch
    import transformers

    from quantselect.domain.candidates import CATALOG, Candidate
    from quantselect.domain.dataset import load_dataset
    from quantselect.engines.quantize import availability
    from quantselect.engines.worker import run_candidate

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    t0 = time.perf_counter()
    model_dir, n_params = build_model(Path("/tmp/qs-llama"), args.tokenizer, args.hidden, args.layers)
    print(f"built a {n_params / 1e9:.2f}B Llama-shaped model in {time.perf_counter() - t0:.0f}s", flush=True)
    ds = load_dataset(REPO / "examples/piqa-300.jsonl", limit=args.items)
    ds_tokens = None
    rows = []
    for name in CANDIDATES:
        reason = availability(CATALOG[name])
        if reason:
            rows.append({"name": name, "status": "unavailable", "error": reason})
            continue
        t = time.perf_counter()
        r = run_candidate(str(model_dir), Candidate(name, CATALOG[name]), ds, device="cuda")
        limit = args.bandwidth_tbs * 1e12 / r.weight_bytes if r.weight_bytes else None
        row = {"name": name, "status": r.status, "error": r.error, "device": r.device,
               "quantize_seconds": r.quantize_seconds, "weight_bytes": r.weight_bytes,
               "peak_memory_bytes": r.peak_memory_bytes, "eval_seconds": r.eval_seconds,
               "items_per_second": (len(ds) / r.eval_seconds) if r.eval_seconds else None,
               "decode_tokens_per_second_b1": r.tokens_per_second, "engine": r.throughput_engine,
               "bandwidth_limit_tokens_per_second": limit,
               "fraction_of_limit": (r.tokens_per_second / limit) if (limit and r.tokens_per_second) else None,
               "wall_seconds": time.perf_counter() - t}
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "params": n_params, "items": len(ds), "rows": rows}
    try:
        import torchao

        report["torchao"] = torchao.__version__
    except ImportError:
        pass
    args.out.write_text(json.dumps(report, indent=2))
    print("| candidate | status | quantize s | weights GiB | peak GiB | items/s | decode tok/s b1 | limit tok/s | % of limit |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r["status"] != "succeeded":
            print(f"| {r['name']} | {r['status']}: {r['error']} | | | | | | | |")
            continue
        print(f"| {r['name']} | ok | {r['quantize_seconds']:.1f} | {r['weight_bytes'] / 2**30:.2f} | "
              f"{r['peak_memory_bytes'] / 2**30:.2f} | {r['items_per_second']:.1f} | "
              f"{r['decode_tokens_per_second_b1']:.1f} | {r['bandwidth_limit_tokens_per_second']:.0f} | "
              f"{100 * r['fraction_of_limit']:.1f} |")


if __name__ == "__main__":
    main()
