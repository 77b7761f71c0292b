"""The precision matrix on one CUDA GPU (part of ``make device-check``).

Builds a Llama-shaped model from a config (random weights, ~1.2B parameters by default), then
runs every candidate through the same worker code the Ray tasks use (quantize -- GPTQ/AWQ on PIQA
calibration samples -- save the artifact, reload and check it, evaluate on PIQA items, measure), and
reports per candidate: status, quantize time, weights in memory and on disk, peak CUDA memory,
multiple-choice items/s, prefill tokens/s and decode tokens/s at batch 1 and 16 with the serving
engine (static-cache generation that transformers compiles), next to the batch-1 memory-bandwidth
limit. Scores are meaningless on random weights; this checks code paths and speed.

    python benchmarks/precision_matrix.py --tokenizer DIR --out results.json
    python benchmarks/precision_matrix.py --device cpu --model demo --items 40   # the CPU matrix

On CPU (``--device cpu``) it runs on a real model folder (``demo``: the bundled SmolLM2) and adds,
per candidate, the roofline estimate of its decode throughput and cost on ``--target-gpu``.
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

# The weight-only candidates first (the targets are about them), then the rest; on a GPU the baseline
# is bf16, so a separate bf16 row would measure the same model twice.
CANDIDATES = ("baseline", "int8", "int4", "int4-gptq", "int4-awq", "fp8", "w8a8", "nf4")


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
    ap.add_argument("--tokenizer", type=Path, default=None, help="tokenizer of the built model (GPU)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--model", default=None, help="a model folder or 'demo' instead of building one")
    ap.add_argument("--target-gpu", default="H100-80GB")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("precision_matrix.json"))
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--bandwidth-tbs", type=float, default=None,
                    help="HBM bandwidth of the GPU in TB/s (default: from the GPU table, e.g. H100 SXM 3.35)")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--calibration-samples", type=int, default=32)
    ap.add_argument("--budget-seconds", type=float, default=None,
                    help="start no further candidate after this many seconds (those left are listed as skipped)")
    args = ap.parse_args()

    import torch
    import transformers

    import tempfile

    from quantselect.domain.candidates import parse_candidate
    from quantselect.domain.dataset import calibration_texts, load_dataset
    from quantselect.domain.gpus import gpu_of_device
    from quantselect.engines.quantize import availability
    from quantselect.engines.worker import run_candidate

    from quantselect.domain import cost, planner
    from quantselect.engines.models import resolve_model
    from quantselect.settings import get_settings

    if args.device == "cuda":
        assert torch.cuda.is_available(), "needs a CUDA GPU (or --device cpu)"
        if args.bandwidth_tbs is None:
            spec = gpu_of_device(f"cuda:{torch.cuda.get_device_name()}")
            args.bandwidth_tbs = spec.bandwidth_tbs if spec else 3.35
    if args.threads:
        torch.set_num_threads(args.threads)
    artifacts_dir = tempfile.mkdtemp(prefix="qs-artifacts-")
    t0 = time.perf_counter()
    if args.model:
        model_dir = resolve_model(args.model, get_settings().models_dir)
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        n_params = planner.shape_from_config(cfg).params
    else:
        model_dir, n_params = build_model(Path("/tmp/qs-llama"), args.tokenizer, args.hidden, args.layers)
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        print(f"built a {n_params / 1e9:.2f}B Llama-shaped model in {time.perf_counter() - t0:.0f}s", flush=True)
    shape, target = planner.shape_from_config(cfg), cost.gpu(args.target_gpu)
    ds = load_dataset(REPO / "examples/piqa-300.jsonl", limit=args.items)
    calibration = calibration_texts(load_dataset(REPO / "examples/piqa-300.jsonl").items[-args.calibration_samples:])
    rows = []
    report = {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "python": platform.python_version(), "params": n_params, "items": len(ds), "rows": rows}
    from importlib.metadata import PackageNotFoundError, version

    for lib in ("torchao", "bitsandbytes", "gptqmodel", "optimum"):
        try:
            report[lib] = version(lib)
        except PackageNotFoundError:
            report[lib] = None
    for name in args.candidates.split(","):
        if args.budget_seconds is not None and time.perf_counter() - t0 > args.budget_seconds:
            rows.append({"name": name, "status": "skipped", "error": f"the {args.budget_seconds:.0f} s budget was spent"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        cand = parse_candidate(name)
        reason = availability(cand.config)
        if reason:
            rows.append({"name": name, "status": "unavailable", "error": reason})
            print(json.dumps(rows[-1]), flush=True)
            continue
        t = time.perf_counter()
        r = run_candidate(str(model_dir), cand, ds, device=args.device, artifacts_dir=artifacts_dir,
                          calibration=calibration if cand.config.calibrated else None,
                          threads=args.threads, measure_threads=args.threads)
        limit = args.bandwidth_tbs * 1e12 / r.weight_bytes if (r.weight_bytes and args.bandwidth_tbs) else None
        est = cost.serving_cost(cand.config, shape, target, target.usd_per_hour)
        row = {"name": name, "status": r.status, "error": r.error, "device": r.device, "score": r.score,
               "quantize_seconds": r.quantize_seconds, "weight_bytes": r.weight_bytes, "disk_bytes": r.disk_bytes,
               "peak_memory_bytes": r.peak_memory_bytes, "eval_seconds": r.eval_seconds,
               "items_per_second": (len(ds) / r.eval_seconds) if r.eval_seconds else None,
               "prefill_tokens_per_second": r.prefill_tokens_per_second,
               "decode_tokens_per_second_b1": r.tokens_per_second,
               "decode_tokens_per_second_b16": r.decode_tokens_per_second_b16, "engine": r.throughput_engine,
               "bandwidth_limit_tokens_per_second": limit, "artifact_reused": r.artifact_reused,
               "target_gpu": target.name, "target_estimated_tokens_per_second_b16":
                   est.throughput.tokens_per_second if est.throughput else None,
               "target_estimated_usd_per_1m_tokens": est.usd_per_1m_tokens,
               "fraction_of_limit": (r.tokens_per_second / limit) if (limit and r.tokens_per_second) else None,
               "wall_seconds": time.perf_counter() - t}
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps(report, indent=2))  # after every row: a run cut short keeps what it measured
        if args.device == "cuda":
            torch.cuda.empty_cache()
    args.out.write_text(json.dumps(report, indent=2))
    print(f"GPU {report['gpu']}, {args.bandwidth_tbs} TB/s; " + ", ".join(f"{k} {report.get(k)}" for k in
          ("torch", "transformers", "torchao", "bitsandbytes", "gptqmodel")))
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    print(f"| candidate | status | score | quantize s | weights MiB | on disk MiB | peak GiB | items/s | prefill tok/s "
          f"| decode tok/s b1 | b16 | limit tok/s b1 | % of limit | {args.target_gpu} est. tok/s b16 | est. $/1M tok |")
    print("| --- " * 15 + "|")
    for r in rows:
        if r.get("status") != "succeeded":
            print(f"| {r['name']} | {r.get('status')}: {r.get('error')} |" + " |" * 13)
            continue
        print(f"| {r['name']} | ok | {r['score']:.3f} | {r['quantize_seconds']:.1f} | {r['weight_bytes'] / 2**20:.0f} | "
              f"{num(r['disk_bytes'] and r['disk_bytes'] / 2**20, '.0f')} | {r['peak_memory_bytes'] / 2**30:.2f} | "
              f"{r['items_per_second']:.1f} | {r['prefill_tokens_per_second']:.0f} | "
              f"{r['decode_tokens_per_second_b1']:.1f} | {r['decode_tokens_per_second_b16']:.1f} | "
              f"{num(r['bandwidth_limit_tokens_per_second'], '.0f')} | "
              f"{num(r['fraction_of_limit'] and 100 * r['fraction_of_limit'], '.1f')} | "
              f"{num(r['target_estimated_tokens_per_second_b16'], '.0f')} | "
              f"{num(r['target_estimated_usd_per_1m_tokens'], '.4f')} |")


if __name__ == "__main__":
    main()
