"""Plain-text rendering shared by the CLI (tables, sizes, the recommendation). No heavy imports."""

from __future__ import annotations

from typing import Any, Sequence

from quantselect.domain.candidates import BASELINE
from quantselect.domain.planner import fmt_bytes


def fmt_num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    if markdown:  # GitHub's pipe tables, for a pull request, an issue or a wiki
        esc = [[c.replace("|", "\\|") or " " for c in r] for r in cells]
        lines = ["| " + " | ".join(r) + " |" for r in esc]
        lines.insert(1, "|" + "|".join("---" for _ in headers) + "|")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    def passed(r: dict[str, Any]) -> str:
        return {True: "yes", False: "no", None: "-"}[r["passed"]]

    def interval(r: dict[str, Any]) -> str:
        if r.get("ci_low") is None or r.get("ci_high") is None:
            return "-"
        return f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"

    def items(r: dict[str, Any]) -> str:
        n = r.get("n_items")
        return "-" if n is None else f"{n}" + (" (stopped)" if r.get("stopped_early") else "")

    def cost(r: dict[str, Any]) -> str:
        c = r.get("cost_per_1m_tokens_usd")
        if c is None:
            return "n/a" if r.get("cost_note") and r["status"] == "succeeded" else "-"
        return f"{c:.4g}" + ("*" if r.get("cost_source") == "estimated" else "")

    target = next((r.get("target_gpu") for r in rows if r.get("target_gpu")), None) or "target"
    ppl = any(r.get("perplexity") is not None for r in rows)  # label-free jobs: each one's perplexity
    return table(
        ["candidate", "status", "items", "score", "relative", "interval", "verdict", "passes"] + ["ppl"] * ppl
        + ["weights", "peak mem", "quantize s", "tok/s b1", "tok/s b16", f"{target} tok/s", "$/1M tok", "error"],
        [[r["name"], r["status"], items(r), fmt_num(r["score"]), fmt_num(r["relative_score"]), interval(r),
          r.get("verdict") or "-", passed(r)] + [f"{r['perplexity']:.4g}" if r.get("perplexity") else "-"] * ppl
         + [fmt_bytes(r["weight_bytes"]), fmt_bytes(r["peak_memory_bytes"]),
            fmt_num(r["quantize_seconds"], 1), fmt_num(r["tokens_per_second"], 1),
            fmt_num(r.get("decode_tokens_per_second_b16"), 1), fmt_num(r.get("target_tokens_per_second"), 0),
            cost(r), (r["error"] or "")[:60]]
         for r in rows], markdown=markdown,
    )


def recommendation_text(rec: Any, engines: set[str]) -> str:
    lines = [f"Recommendation (quality threshold {rec.threshold:.3f} of the baseline's score "
             f"{fmt_num(rec.baseline_score)}; {rec.policy} policy, {rec.confidence:.0%} confidence):"]
    if rec.chosen:
        v = rec.verdict(rec.chosen)
        lines.append(f"  -> {rec.chosen}: {v.reason}")
        if v.ci_low is not None and v.name != BASELINE:
            evidence = (f"relative quality {v.relative_score:.3f}, {rec.confidence:.0%} interval "
                        f"[{v.ci_low:.3f}, {v.ci_high:.3f}] on {v.n_items} paired items, verdict {v.verdict}")
            if v.mcnemar_p is not None:
                evidence += f", McNemar p = {v.mcnemar_p:.3g}"
            lines.append(f"     evidence: {evidence}")
    else:
        lines.append(f"  -> {rec.message}")
    for v in rec.verdicts:
        if v.name != rec.chosen:
            lines.append(f"     {v.name}: {v.reason}")
    for cat, name in sorted(rec.per_category.items()):
        lines.append(f"  category {cat!r}: {'deploy ' + name if name else 'no candidate meets the threshold'}")
    for w in rec.warnings:
        lines.append(f"  warning: {w}")
    costs = [v.cost for v in rec.verdicts if v.cost is not None and v.cost.throughput is not None]
    estimated = [c for c in costs if c.throughput.source == "estimated"]
    if rec.target_gpu and costs:
        if estimated:
            lines.append(f"  * cost on {rec.target_gpu} estimated, not measured there: {estimated[0].throughput.basis}")
        if len(estimated) < len(costs):
            lines.append(f"  cost measured on {rec.target_gpu} for the others")
    for engine in sorted(e for e in engines if e):
        note = " (this machine's speed: never used as a GPU cost)" if " on cpu" in engine else ""
        lines.append(f"  tok/s b1/b16 measured with {engine}{note}")
    return "\n".join(lines)


def model_card(job: Any, name: str, rows: list[dict[str, Any]], rec: Any, path: str, differs: Any = None,
               gguf_file: str | None = None, kv_cache: str = "", checkpoint: bool = False,
               base_model: str | None = None, quantized: bool = True) -> str:
    """README.md of an exported model: what it is, the evidence it was chosen on (with the items
    where it differs most from the baseline, ``differs``), how to load it (``gguf_file``: a GGUF
    checkpoint, run by llama.cpp or Ollama; ``kv_cache``: the KV cache its quality was measured with;
    ``checkpoint``: quantized elsewhere, scored with the model's tokenizer). ``base_model``: the
    model's Hub id, in the metadata the Hub reads to list an upload among that model's quantizations."""
    row = next(r for r in rows if r["name"] == name)
    v = rec.verdict(name)
    title = str(job.model).rstrip("/").rsplit("/", 1)[-1] or job.model
    why = ("the recommended candidate" if rec.chosen == name
           else f"chosen by hand (the recommendation is {rec.chosen or 'none'})")
    quality = (f"relative quality {fmt_num(v.relative_score)} of the baseline's score {fmt_num(rec.baseline_score)}"
               + (f", {rec.confidence:.0%} interval [{v.ci_low:.3f}, {v.ci_high:.3f}], verdict {v.verdict}"
                  if v.ci_low is not None and name != BASELINE else ""))
    cost = row.get("cost_per_1m_tokens_usd")
    load = [
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("{path}", device_map="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("{path}")', "```", "",
        "A `quantization_config` in `config.json` names the library the weights need (torchao, bitsandbytes, "
        "or GPTQModel for GPTQ/AWQ); engines that read it (e.g. vLLM) load the folder as it is.", ""]
    if gguf_file:
        load = ["```bash", f"llama-server -m {path}/{gguf_file}    # llama.cpp, OpenAI-compatible on :8080",
                f"printf 'FROM ./{gguf_file}\\n' > {path}/Modelfile && ollama create {name} -f {path}/Modelfile",
                "```", "",
                "The quality above was measured on these very weights, dequantized; llama.cpp's figures of memory "
                "and speed are its own (the cost above is a roofline estimate from the file's bits per weight).", ""]
    if checkpoint and gguf_file:
        load += [f"Its quality was scored with the tokenizer and chat template of `{job.model}`; llama.cpp reads the "
                 "vocabulary stored in the file, which is usually the same.", ""]
    elif checkpoint:
        load += [f"Its tokenizer is that of `{job.model}`, with which its quality was scored (it replaces the one "
                 "the checkpoint came with).", ""]
    if kv_cache:
        load += [f"Its quality was measured with an {kv_cache} KV cache (e4m3, scale 1.0): serve it with one, e.g. "
                 f"`vllm serve {path} --kv-cache-dtype {kv_cache}`; a 16-bit cache runs the same weights "
                 "without that rounding.", ""]
    return "\n".join([
        "---", f"library_name: {'gguf' if gguf_file else 'transformers'}",
        *([f"base_model: {base_model}"] + (["base_model_relation: quantized"] if quantized else []) if base_model else []),
        "tags:", "- quantselect", f"- {name}", "---", "",
        f"# {title}: {name}", "",
        f"{name} ({row.get('throughput_engine') or row.get('device') or 'see below'}) of `{job.model}`, {why} by "
        f"quantselect job `{job.id}` on `{job.dataset_source}` ({row.get('n_items')} items, {job.metric}): {quality}; "
        f"threshold {rec.threshold:.3f} ({rec.policy} policy). Weights {fmt_bytes(row.get('weight_bytes'))}, "
        f"peak memory {fmt_bytes(row.get('peak_memory_bytes'))} on {row.get('device')}"
        + (f"; ${cost:.4g} per 1M generated tokens on {row.get('target_gpu')} ({row.get('cost_source')})." if cost else "."),
        "",
        "Measured on that task only: quality on another task can differ (reasoning, maths and code lose first).",
        "", "## Load it", "", *load,
        "## Evidence", "", "```", results_table(rows), "", recommendation_text(rec, {r["throughput_engine"] for r in rows}),
        "```", "",
        *(["## Where it differs from the baseline", "", "```", comparison_text(differs), "```", ""] if differs else []),
        "Every figure is also in `quantselect-evidence.json`.", "",
    ])


def cache_table(entries: Sequence[Any], root: Any) -> str:
    """``quantselect cache list``: one row per entry, then the total."""
    rows = [[e.kind, e.key, e.candidate or "-", fmt_bytes(e.size_bytes), e.last_used.strftime("%Y-%m-%d %H:%M"),
             _ids(e.jobs), _ids(e.served_by)] for e in entries]
    total = f"{entries_text(entries)} in {root}"
    if not rows:
        return f"The cache is empty ({root})."
    return table(["kind", "key", "candidate", "size", "last used (UTC)", "jobs", "served by"], rows) + "\n" + total


def _ids(ids: Sequence[str], most: int = 3) -> str:
    return ",".join(ids[:most]) + (f" +{len(ids) - most}" if len(ids) > most else "") if ids else "-"


def entries_text(entries: Sequence[Any]) -> str:
    """``3 entries, 1.2 GiB``: how many cache entries and their size."""
    return f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {fmt_bytes(sum(e.size_bytes for e in entries))}"


def comparison_text(c: Any, width: int = 240) -> str:
    """`quantselect compare`: the counts, then each differing item with its prompt, what was expected
    and what each of the two answered (cut to ``width`` characters, newlines shown as ``⏎``)."""

    def cut(text: str) -> str:
        flat = text.strip().replace("\n", " ⏎ ")
        return flat if len(flat) <= width else flat[: width - 1] + "…"

    def score(x: float) -> str:
        return f"{x:g}" if x in (0.0, 1.0) else f"{x:.3f}"

    head = (f"{c.candidate} against {c.against} on {c.n_items} items ({c.metric}): {c.n_worse} worse, "
            f"{c.n_better} better, {c.n_same} the same")
    if c.n_items:
        head += f"; mean score {c.candidate_score:.3f} vs {c.against_score:.3f}"
    lines = [head]
    if c.n_only_one:
        lines.append(f"({c.n_only_one} items scored by only one of the two are left out)")
    label = max(len(c.candidate), len(c.against), len("expected")) + 1
    for title, diffs, n in (("Worse", c.worse, c.n_worse), ("Better", c.better, c.n_better)):
        if not n:
            continue
        lines += ["", f"{title} ({n}{f', {len(diffs)} shown' if len(diffs) < n else ''}):"]
        for d in diffs:
            lines.append(f"  item {d.index}" + (f" [{d.category}]" if d.category else "")
                         + f": score {score(d.against_score)} -> {score(d.candidate_score)}")
            rows = [("prompt", d.prompt), ("expected", d.expected), (c.against, d.against_output),
                    (c.candidate, d.candidate_output)]
            lines += [f"    {name + ':':<{label}} {cut(text)}" for name, text in rows if text is not None]
    return "\n".join(lines)


def preview_text(p: dict[str, Any]) -> str:
    """``submit --dry-run``: what the job would run, and what it would not need to."""
    params = f", {p['params'] / 1e6:,.0f}M parameters" if p.get("params") else ""
    gen = ""
    if p["kind"] != "multiple_choice":
        tokens = p["max_new_tokens"]
        gen = (", nothing generated (scored on the texts' own tokens)" if tokens == 0
               else f", up to {tokens if tokens is not None else 'the metric default of'} new tokens")
        gen += ", chat template" if p["chat_template"] else ""
    cal = p.get("calibration")
    held = (f"; {cal['held_out_items']} more items held out to calibrate GPTQ/AWQ" if cal and cal["held_out_items"]
            else f"; GPTQ/AWQ calibrated on {cal['samples']} samples of {cal['source']}" if cal else "")
    lines = [
        "Dry run: nothing submitted, nothing run.",
        f"Model {p['model']} ({p['model_path']}{params})",
        f"Data: {p['n_items']} items of {p['dataset']} ({p['kind']}, metric {p['metric']}{gen}){held}",
        f"Threshold {p['threshold']:.3f} ({p['policy']} policy, {p['confidence']:.0%} confidence"
        + (", early stop" if p["early_stop"] else "") + f"); cost on {p['target_gpu']} at ${p['gpu_hour_usd']:.2f}/GPU-hour",
        "",
    ]
    rows = []
    for c in p["candidates"]:
        data = c["config"].get("_data") or {}
        what = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in data.items()
                        if k != "path" and (v not in (0, "", None) or v is False)) or "-"  # double_quant=false
        where = "yes" if c["unavailable_here"] is None else f"no: {c['unavailable_here']}"
        stored = "reused (same inputs)" if c["stored_result"] else ""
        rows.append([c["name"], what, fmt_bytes(c["weights_bytes"]), fmt_bytes(c["gpu_need_bytes"]), where, stored])
    lines.append(table(["candidate", "parameters", "weights (est.)", "GPU need (est.)", "runs here", "stored result"],
                       rows))
    for c in p["candidates"]:  # a checkpoint: where it is read from (a Hub id: pinned to the commit read)
        if (c["config"].get("_data") or {}).get("path"):
            lines.append(f"{c['name']}: a checkpoint read from {c['config']['_data']['path']}")
    if not p.get("params"):
        lines.append(f"(no memory estimates: {p.get('no_estimates') or 'the model config was not read'})")
    if any(c["stored_result"] for c in p["candidates"]):
        lines.append("A stored result is reused when it was measured on the same kind of device; --no-cache runs it again.")
    return "\n".join(lines)
