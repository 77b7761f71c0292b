"""quantselect's multiple-choice scoring against lm-evaluation-harness, on the same model and items.

Both tools score PIQA (lm-eval's prompt ``"Question: {goal}\\nAnswer:"``, choices ``[sol1, sol2]``)
with the bundled SmolLM2-135M-Instruct, in one process, on one loaded model, with the same number of
torch threads. lm-eval runs through its Python API on a local task (a YAML written to a temp folder,
``dataset_path: json``), with per-sample logging for its per-item log-likelihoods; nothing is
downloaded. Reported: per-item agreement of the chosen answer (acc and acc_norm), both tools'
accuracies, the largest log-likelihood difference, items/s for both and their ratio.

    .venv/bin/python benchmarks/eval_vs_lm_eval.py                  # 300 items, 3 rounds (~13 min, 2 cores)
    .venv/bin/python benchmarks/eval_vs_lm_eval.py --items 1000 --lm-eval-batch-sizes 8

Needs the ``bench`` extra (lm-eval); see pyproject.toml.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the whole validation split where the shared datasets are beside the checkout, else the 300 items bundled
PIQA = next((p for p in (ROOT.parent / "shared" / "datasets" / "piqa", ROOT / "examples" / "piqa") if p.is_dir()))
PROMPT = "Question: {goal}\nAnswer:"
TASK_YAML = """\
task: piqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=300,
                   help="PIQA validation items to score (max 1838; 300 take ~6 min on 2 cores)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for both tools")
    p.add_argument("--lm-eval-batch-sizes", default="1,8,16",
                   help="lm-eval batch sizes, comma-separated: the first (1, its default) runs in the first round "
                        "only and is the reference for agreement; the others (8 and 16 are its fastest here) run "
                        "every round")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of lm-eval and quantselect in turn: a ratio quoted is the median of the rounds' ratios")
    p.add_argument("--piqa", type=Path, default=PIQA, help="folder with PIQA validation items (valid*.jsonl) and labels (valid*labels*)")
    p.add_argument("--model", type=Path, default=None, help="local model folder (default: the bundled demo)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval_vs_lm_eval.md")
    return p.parse_args()


def demo_model_dir() -> Path:
    from quantselect.engines.models import resolve_model

    home = Path(os.environ.get("QUANTSELECT_HOME", Path.home() / ".quantselect"))
    return resolve_model("demo", home / "models")


def write_task(folder: Path, piqa: Path, n: int) -> None:
    """PIQA with its labels merged in, and lm-eval's piqa task pointed at it."""
    docs = [json.loads(line) for line in next(piqa.glob("valid*.jsonl")).read_text().splitlines()[:n]]
    labels = [int(x) for x in next(piqa.glob("valid*labels*")).read_text().split()[:n]]
    data = folder / "piqa.jsonl"
    data.write_text("".join(json.dumps({**d, "label": y}) + "\n" for d, y in zip(docs, labels)))
    (folder / "piqa_local.yaml").write_text(TASK_YAML.format(data=data))


def run_lm_eval(model, tokenizer, task_dir: Path, batch_size: str) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size) if batch_size.isdigit() else batch_size,
              device=str(model.device))
    scoring = {"seconds": 0.0}
    inner = lm.loglikelihood

    def timed(requests, *a, **kw):  # the model work alone, without lm-eval's task set-up
        start = time.perf_counter()
        out = inner(requests, *a, **kw)
        scoring["seconds"] += time.perf_counter() - start
        return out

    lm.loglikelihood = timed
    start = time.perf_counter()
    res = simple_evaluate(model=lm, tasks=["piqa_local"], num_fewshot=0, log_samples=True, bootstrap_iters=0,
                          task_manager=TaskManager(include_path=str(task_dir)))
    seconds = time.perf_counter() - start
    samples = sorted(res["samples"]["piqa_local"], key=lambda s: s["doc_id"])
    return {
        "seconds": seconds,
        "scoring_seconds": scoring["seconds"],
        "logprobs": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
        "acc": [s["acc"] for s in samples],
        "acc_norm": [s["acc_norm"] for s in samples],
    }


def run_quantselect(model, tokenizer, piqa: Path, n: int) -> dict:
    from quantselect.domain.dataset import FieldMapping, load_dataset
    from quantselect.engines import evaluate as ev

    start = time.perf_counter()
    mapping = FieldMapping(prompt=PROMPT, choices=("sol1", "sol2"), labels_file=str(next(piqa.glob("valid*labels*"))))
    dataset = load_dataset(next(piqa.glob("valid*.jsonl")), mapping, limit=n)
    results = ev.evaluate(model, tokenizer, dataset)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "logprobs": [r.choice_logprobs for r in results],
        "pred": [r.prediction for r in results],
        "pred_norm": [ev.predict(r.choice_logprobs, item.choices, norm=True) for r, item in zip(results, dataset.items)],
        "answers": [item.answer for item in dataset.items],
    }


def machine() -> dict:
    import torch
    import transformers
    import lm_eval

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), platform.processor())
    return {
        "cpu": cpu,
        "nproc": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lm_eval": getattr(lm_eval, "__version__", None) or _version("lm_eval"),
    }


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def main() -> None:
    args = parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    model_dir = args.model or demo_model_dir()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    n = args.items

    sizes = [b.strip() for b in args.lm_eval_batch_sizes.split(",") if b.strip()]
    lme: dict[str, list[dict]] = {bs: [] for bs in sizes}
    qs_runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        write_task(Path(tmp), args.piqa, n)
        for k in range(max(1, args.rounds)):  # lm-eval and quantselect in turn: drift hits both
            for bs in sizes if k == 0 else sizes[1:]:
                print(f"round {k + 1}: lm-eval {n} items, batch size {bs}, {args.threads} threads ...", flush=True)
                lme[bs].append(run_lm_eval(model, AutoTokenizer.from_pretrained(str(model_dir)), Path(tmp), bs))
                print(f"  {lme[bs][-1]['seconds']:.1f} s", flush=True)
            print(f"round {k + 1}: quantselect {n} items ...", flush=True)
            qs_runs.append(run_quantselect(model, AutoTokenizer.from_pretrained(str(model_dir)), args.piqa, n))
            print(f"  {qs_runs[-1]['seconds']:.1f} s", flush=True)

    qs, ref = qs_runs[0], lme[sizes[0]][0]
    assert len(ref["logprobs"]) == len(qs["logprobs"]) == n
    lme_pred = [max(range(len(lp)), key=lp.__getitem__) for lp in ref["logprobs"]]
    lme_pred_norm = [p if a else 1 - p for p, a in zip(qs["answers"], ref["acc_norm"])]  # two choices

    def speed(runs: list[dict]) -> dict:  # each lm-eval run against the quantselect run of its round
        whole = [r["seconds"] / q["seconds"] for r, q in zip(runs, qs_runs)]
        scoring = [r["scoring_seconds"] / q["seconds"] for r, q in zip(runs, qs_runs)]
        return {"rounds": len(runs), "items_per_s": n / statistics.median(r["seconds"] for r in runs),
                "scoring_items_per_s": n / statistics.median(r["scoring_seconds"] for r in runs),
                "ratio": statistics.median(whole), "ratio_min": min(whole), "ratio_max": max(whole),
                "ratio_vs_scoring": statistics.median(scoring)}

    figures = {
        "items": n,
        "threads": args.threads,
        "agree_acc": sum(a == b for a, b in zip(qs["pred"], lme_pred)) / n,
        "agree_acc_norm": sum(a == b for a, b in zip(qs["pred_norm"], lme_pred_norm)) / n,
        "max_abs_logprob_diff": max(abs(a - b) for x, y in zip(qs["logprobs"], ref["logprobs"]) for a, b in zip(x, y)),
        "qs_acc": sum(p == y for p, y in zip(qs["pred"], qs["answers"])) / n,
        "qs_acc_norm": sum(p == y for p, y in zip(qs["pred_norm"], qs["answers"])) / n,
        "lme_acc": sum(ref["acc"]) / n,
        "lme_acc_norm": sum(ref["acc_norm"]) / n,
        "qs_items_per_s": n / statistics.median(q["seconds"] for q in qs_runs),
        "qs_rounds": len(qs_runs),
        "lm_eval": {bs: speed(runs) for bs, runs in lme.items()},
    }
    env = machine()
    print(json.dumps({**figures, **env}, indent=2))
    write_report(args.out, figures, env, model_dir)


def write_report(out: Path, f: dict, env: dict, model_dir: Path) -> None:
    pct = lambda x: f"{100 * x:.2f} %"  # noqa: E731
    spread = lambda r: f" ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})" if r["rounds"] > 1 else ""  # noqa: E731
    speed = "\n".join(
        f"| lm-eval, batch size {bs} | {r['rounds']} | {r['items_per_s']:.2f} | {r['scoring_items_per_s']:.2f} "
        f"| **{r['ratio']:.2f}×**{spread(r)} | {r['ratio_vs_scoring']:.2f}× |"
        for bs, r in f["lm_eval"].items())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"""# quantselect vs lm-evaluation-harness: multiple-choice scoring

Written by `benchmarks/eval_vs_lm_eval.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.

Same process, same loaded model (SmolLM2-135M-Instruct, fp32, `{model_dir.name}`), same {f['items']} PIQA
validation items (prompt `Question: {{goal}}\\nAnswer:`, choices `[sol1, sol2]`), torch threads:
{f['threads']}, CPU. lm-eval: HF backend (`HFLM` around the loaded model), a local task YAML,
`log_samples=True`, `bootstrap_iters=0`.

| | quantselect | lm-eval |
| --- | --- | --- |
| acc | {f['qs_acc']:.4f} | {f['lme_acc']:.4f} |
| acc_norm | {f['qs_acc_norm']:.4f} | {f['lme_acc_norm']:.4f} |

Predicted choice agrees on {pct(f['agree_acc'])} of items (acc) and {pct(f['agree_acc_norm'])} (acc_norm);
largest difference of a choice's log-likelihood: {f['max_abs_logprob_diff']:.2e}.

Speed (model already loaded; quantselect's figure includes reading the dataset). "Whole call" is
`simple_evaluate` (task set-up, dataset, requests, metrics); "requests only" is lm-eval's
`loglikelihood` alone. The tools ran in turn, round by round; a ratio is quantselect items/s ÷ lm-eval
items/s within one round, the median over the rounds (lowest–highest in brackets); items/s are medians.

| | rounds | items/s, whole call | items/s, requests only | ratio, whole call | ratio, requests only |
| --- | --- | --- | --- | --- | --- |
| quantselect | {f['qs_rounds']} | {f['qs_items_per_s']:.2f} | | | |
{speed}

Machine: {env['cpu']}, nproc {env['nproc']}, {env['memory_gib']} GiB; Python {env['python']}, torch {env['torch']},
transformers {env['transformers']}, lm-eval {env['lm_eval']}.
""")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
