"""The server's detokenization per generated token: a window at a time against the whole answer.

Every generated token is turned into text before it is streamed (and checked for stop strings).
Decoding the whole answer at every step costs O(n) per token, O(n^2) per answer; the server now
decodes a window of the last tokens (``serving.app._Sequence``). This times, in one process, both
ways on the same tokens of the bundled SmolLM2's tokenizer (GSM8K answers from ``../shared``,
repeated to the length) and checks they give the same text. Rounds interleaved, medians.

    .venv/bin/python benchmarks/detokenize.py          # ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def answer_tokens(tok, n: int) -> list[int]:
    path = ROOT.parent / "shared" / "datasets" / "gsm8k"
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else []
    text = "".join(json.loads(line).get("answer", "") + "\n" for f in files[:1] for line in f.open())
    text = text or (ROOT / "examples" / "gsm8k-prompts-50.jsonl").read_text()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return (ids * (n // len(ids) + 1))[:n]


def whole(tok, ids: list[int]) -> tuple[float, str]:
    """The previous server: decode everything generated so far at every token."""
    start = time.perf_counter()
    out: list[int] = []
    text = ""
    for t in ids:
        out.append(t)
        text = tok.decode(out, skip_special_tokens=True)
    return time.perf_counter() - start, text


def windowed(tok, ids: list[int]) -> tuple[float, str]:
    from quantselect.serving.app import CompletionRequest, _Sequence

    seq = _Sequence(tok, set(), [], CompletionRequest(prompt="x", stop=["\n\n\n\n"]), len(ids), "cpu")
    start = time.perf_counter()
    for t in ids:
        seq.push(t)
    elapsed = time.perf_counter() - start
    return elapsed, "".join(delta for delta, _, _ in seq.results())  # (ends: the limit is its length)


def main() -> None:
    from transformers import AutoTokenizer

    from quantselect.engines.models import resolve_model
    from quantselect.settings import get_settings

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="256,1024,4096", help="answer lengths in tokens")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    tok = AutoTokenizer.from_pretrained(str(resolve_model("demo", get_settings().models_dir)))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print("| answer tokens | whole answer, µs/token | window, µs/token | speed-up |")
    print("| --- | --- | --- | --- |")
    for n in map(int, args.lengths.split(",")):
        ids = answer_tokens(tok, n)
        a, b = [], []
        for _ in range(args.rounds):
            (ta, text_a), (tb, text_b) = whole(tok, ids), windowed(tok, ids)
            assert text_a == text_b, "the window gives another text than the whole decode"
            a.append(ta / n * 1e6)
            b.append(tb / n * 1e6)
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"| {n} | {ma:.0f} | {mb:.0f} | {ma / mb:.1f}× |")


if __name__ == "__main__":
    main()
