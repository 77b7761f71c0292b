"""The OpenAI-compatible server under concurrent load: batched decoding against one request at a time.

For each candidate of the bundled SmolLM2-135M, a real Serve deployment on a local Ray (what
``quantselect deploy`` starts, the CPU default engine: a dynamic KV cache, batches of up to 16) gets the
same N GSM8K questions (``examples/gsm8k-prompts-50.jsonl``), greedy, ``--max-tokens`` each:

- sequential: one request after another (what any server without batching gets per replica, and what
  this server did before it batched: one sequence per forward pass);
- concurrent: all N at once, from N client threads.

Generated tokens (the ``usage`` the server reports) per wall second, rounds interleaved, the median
reported with the ratio concurrent / sequential. For reference, the same model's decode speed measured
in this process the way a job measures it (``measure.decode_tokens_per_second``: ``generate()``, one
prompt repeated, batch 1 and 16, the same thread count) -- the figures a job stores.

    .venv/bin/python benchmarks/serve_batching.py                # ~6 min on 2 cores
    .venv/bin/python benchmarks/serve_batching.py --candidates baseline --rounds 1 --n 8
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_prompts(n: int) -> list[str]:
    from quantselect.domain.dataset import load_dataset

    return [item.prompt for item in load_dataset(ROOT / "examples" / "gsm8k-prompts-50.jsonl", limit=n).items]


def timed(client, name: str, prompts: list[str], max_tokens: int, concurrent: bool) -> tuple[float, int]:
    def one(prompt: str) -> int:
        r = client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return r.usage.completion_tokens

    start = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(prompts)) as pool:
            tokens = sum(pool.map(one, prompts))
    else:
        tokens = sum(one(p) for p in prompts)
    return tokens / (time.perf_counter() - start), tokens


def serve_candidate(cand: str, model_dir: Path, prompts: list[str], args) -> dict:
    import httpx
    import openai

    from quantselect.domain.candidates import CATALOG
    from quantselect.serving.deploy import deploy, undeploy

    name = f"bench-{cand}"
    url = deploy(name, str(model_dir), CATALOG[cand].to_dict(), port=args.port)
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)
    try:
        timed(client, name, prompts[:2], 8, concurrent=True)  # warm-up
        seq, conc, tokens = [], [], set()
        for _ in range(args.rounds):
            for kind, out in (("sequential", seq), ("concurrent", conc)):
                tps, n = timed(client, name, prompts, args.max_tokens, kind == "concurrent")
                out.append(tps)
                tokens.add(n)
                print(f"  {cand} {kind}: {tps:.1f} tokens/s ({n} tokens)", flush=True)
        health = httpx.get(url.removesuffix("/v1") + "/healthz", timeout=30).json()
    finally:
        undeploy(name)
    return {"candidate": cand, "sequential": statistics.median(seq), "concurrent": statistics.median(conc),
            "tokens": sorted(tokens), "peak_rows": health["batch"]["peak_rows"], "threads": health["threads"],
            "decoding": health["decoding"]}


def measured(cand: str, model_dir: Path, threads: int) -> tuple[float, float]:
    import torch

    from quantselect.domain.candidates import CATALOG
    from quantselect.engines import measure
    from quantselect.engines.quantize import load_candidate

    torch.set_num_threads(threads)
    lm = load_candidate(str(model_dir), CATALOG[cand], "cpu")
    return (measure.decode_tokens_per_second(lm.model, lm.tokenizer, 32, batch=1),
            measure.decode_tokens_per_second(lm.model, lm.tokenizer, 32, batch=16, repeats=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", default="baseline,int8")
    ap.add_argument("--n", type=int, default=16, help="requests (the server batches up to 16)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--port", type=int, default=8123)
    args = ap.parse_args()

    import ray

    from quantselect.engines.models import resolve_model
    from quantselect.settings import get_settings

    model_dir = resolve_model("demo", get_settings().models_dir)
    prompts = load_prompts(args.n)
    ray.init(include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for cand in args.candidates.split(","):
            rows.append(serve_candidate(cand, model_dir, prompts, args))
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    for row in rows:  # after the server is gone: the cores are this process's
        row["generate_b1"], row["generate_b16"] = measured(row["candidate"], model_dir, row["threads"])

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; {args.n} requests x {args.max_tokens} "
          f"tokens max, greedy, median of {args.rounds} rounds\n")
    print("| candidate | sequential tokens/s | concurrent tokens/s | concurrent / sequential | peak rows "
          "| job's figure: generate() b1 / b16 tokens/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['candidate']} | {r['sequential']:.1f} | {r['concurrent']:.1f} | "
              f"{r['concurrent'] / r['sequential']:.2f}x | {r['peak_rows']} | "
              f"{r['generate_b1']:.1f} / {r['generate_b16']:.1f} |")
    print(f"\nserver: {rows[0]['decoding']}, {rows[0]['threads']} torch threads; tokens per round: "
          + ", ".join(f"{r['candidate']} {r['tokens']}" for r in rows))


if __name__ == "__main__":
    main()
