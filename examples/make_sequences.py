"""Write sequences-1000.jsonl: "continue the arithmetic sequence" items, 4 choices each.

An easy task a small instruct model gets mostly right, so a broken quantization (2- or 3-bit
weights) shows up as a large, quickly detectable drop: the early-stopping test and benchmark use
it. Generated, not collected: no licence restrictions. Re-run to regenerate (deterministic):

    python examples/make_sequences.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def items(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start, step = rng.randint(1, 50), rng.randint(1, 5)
        seq = [start + k * step for k in range(5)]
        right = seq[-1]
        wrong = rng.sample([right + step * m for m in (-3, -2, 2, 3)] + [right + 1, right - 1], 3)
        choices = [str(right)] + [str(w) for w in wrong]
        rng.shuffle(choices)
        out.append({"prompt": "Continue the sequence: " + ", ".join(map(str, seq[:-1])) + ",",
                    "choices": choices, "answer": choices.index(str(right)),
                    "category": f"step {step}"})
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("sequences-1000.jsonl")
    path.write_text("".join(json.dumps(i) + "\n" for i in items(1000)))
    print(f"wrote {path}")
