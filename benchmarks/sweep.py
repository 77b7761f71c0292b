"""Distributed sweep: placement and packing, measured on a local Ray cluster with logical GPUs.

Every experiment is a real job through the service (what ``quantselect submit`` + ``run-job`` do):
a fresh local Ray with ``num_gpus=N`` logical GPUs, a fresh SQLite database and a fresh artifacts
folder (nothing reused), the job submitted and run, and each candidate's worker interval
(``started_at`` .. ``finished_at``, stamped inside the worker) read back from the stored results.

1. Lower bound: real candidates of the bundled demo model (SmolLM2-135M) on 2 logical GPUs, one
   candidate per GPU. wall = last ``finished_at`` - the moment ``run_sweep`` was entered (the model
   is already prepared then); work = sum of the worker intervals; bound = max(work / GPUs, longest).
   Target: wall / bound <= 1.2.
2. Packing: small candidates (a tiny random Llama, SmolLM2's tokenizer) on 1 and 2 logical GPUs:
   (a) one candidate per GPU (QUANTSELECT_GPU_MEMORY unset: the GPU memory is unknown);
   (b) memory-aware packing (QUANTSELECT_GPU_MEMORY set so that each candidate's share of a GPU,
   ``planner.gpu_request``, is <= 0.25). Speed-up = wall(a) / wall(b); target >= 1.5. The overlap of
   the worker intervals per GPU (``gpu_ids``) shows how many candidates actually shared a GPU.

"GPUs" here are Ray's logical GPUs on a CPU machine: the workers run on the CPU with one torch
thread each (the placement a GPU cluster gets). See BENCHMARKS.md for what that does and does not show.

Each experiment first waits (``--wait-idle``) for the machine to be idle and counts the CPU-seconds
that this benchmark's process tree and all other processes use while it runs: on a shared 2-core
machine another user's test run doubles every duration.

    .venv/bin/python benchmarks/sweep.py            # full run, ~15 min on 2 cores (plus any wait)
    .venv/bin/python benchmarks/sweep.py --quick    # small run, ~5 min
    .venv/bin/python benchmarks/sweep.py --skip bound --merge --first-repeat 2   # packing again, kept as run 2
    .venv/bin/python benchmarks/sweep.py --summarize-only                        # table of the stored results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Before ray is imported anywhere: a loopback-only local cluster, no token auth, no usage stats.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATASET = ROOT / "examples" / "piqa-300.jsonl"
OUT = ROOT / "benchmarks" / "results" / "sweep.json"
COMMAND = ""
CORES = os.cpu_count() or 1


# ---- the machine ---------------------------------------------------------------------------------
def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem_kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                  if ln.startswith("MemTotal"))
    flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    versions = {}
    for mod in ("torch", "transformers", "ray", "torchao"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem_kb / 2**20, 1),
            "avx512": " avx512f" in flags, "gpu": None, "python": platform.python_version(),
            "load_average_at_start": list(os.getloadavg()), **versions}


# ---- other load on the machine -------------------------------------------------------------------
HZ = os.sysconf("SC_CLK_TCK")


def _busy_ticks() -> tuple[int, int]:
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + f[4]
    return sum(f) - idle, sum(f)


def _procs() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, utime+stime ticks, name)."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            st = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        f = st[st.rfind(")") + 2:].split()
        out[int(pid)] = (int(f[1]), int(f[11]) + int(f[12]), cmd or st[st.find("(") + 1: st.rfind(")")])
    return out


class CpuSampler:
    """CPU-seconds spent during an experiment: by this benchmark's process tree (the driver, its Ray
    cluster and workers), by anything else on the machine (other users' tests...), and in all (from
    /proc/stat, exact). Processes are sampled every ``interval``: a process that dies between two
    samples loses at most its last interval, so the per-tree figures are slight underestimates."""

    def __init__(self, interval: float = 0.5) -> None:
        import threading

        self.interval, self.me = interval, os.getpid()
        self.mine: dict[str, float] = {}
        self.foreign = 0.0
        self.last: dict[int, int] = {pid: t for pid, (_, t, _) in _procs().items()}
        self.busy0 = _busy_ticks()
        self.stop_ = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _kind(self, name: str, pid: int) -> str:
        if pid == self.me:
            return "driver"
        if name.startswith("ray::qs:"):
            return "candidate workers"
        if name.startswith("ray::"):
            return name.split(" ")[0]
        return Path(name.split(" ")[0]).name

    def _sample(self) -> None:
        procs = _procs()
        for pid, (ppid, ticks, name) in procs.items():
            delta = (ticks - self.last.get(pid, 0)) / HZ
            self.last[pid] = ticks
            if delta <= 0:
                continue
            p, mine = pid, False
            for _ in range(64):  # walk up to this process
                if p == self.me:
                    mine = True
                    break
                if p not in procs or p <= 1:
                    break
                p = procs[p][0]
            if mine:
                k = self._kind(name, pid)
                self.mine[k] = self.mine.get(k, 0.0) + delta
            else:
                self.foreign += delta

    def _run(self) -> None:
        while not self.stop_.wait(self.interval):
            self._sample()

    def stop(self) -> dict:
        self.stop_.set()
        self.thread.join()
        self._sample()
        busy1 = _busy_ticks()
        busy = (busy1[0] - self.busy0[0]) / HZ
        return {"total_busy_cpu_s": round(busy, 1), "this_benchmark_cpu_s": round(sum(self.mine.values()), 1),
                "other_processes_cpu_s": round(self.foreign, 1),
                "this_benchmark_by_process": {k: round(v, 1) for k, v in sorted(self.mine.items(), key=lambda kv: -kv[1])}}


def busy_fraction(seconds: float = 3.0) -> float:
    """Share of all cores busy over ``seconds``."""
    a = _busy_ticks()
    time.sleep(seconds)
    b = _busy_ticks()
    return (b[0] - a[0]) / max(1, b[1] - a[1])


def wait_idle(limit_s: float, threshold: float = 0.2) -> dict:
    """Wait (up to ``limit_s``) until the machine is quiet: other engineers' test runs share these cores."""
    t = time.time()
    frac = busy_fraction()
    while frac > threshold and time.time() - t < limit_s:
        print(f"   machine busy ({frac:.0%} of the cores over 3 s): waiting for it to be idle", flush=True)
        time.sleep(20)
        frac = busy_fraction()
    return {"waited_s": round(time.time() - t, 1), "busy_fraction_before": round(frac, 3)}


_BURN = "import time\nt=time.perf_counter()\nx=0\nfor i in range(20_000_000): x+=i\nprint(time.perf_counter()-t)"


def core_scaling() -> dict:
    """The same pure-Python loop in 1, 2 and 4 processes at once: how much the cores really run in
    parallel here (2 processes on 2 free cores take as long as 1; 4 take twice as long)."""
    out = {}
    for n in (1, 2, 4):
        ps = [subprocess.Popen([sys.executable, "-c", _BURN], stdout=subprocess.PIPE, text=True) for _ in range(n)]
        times = [float(p.communicate()[0]) for p in ps]
        out[f"{n}_procs_s"] = round(max(times), 2)
    out["parallel_speedup_2_procs"] = round(2 * out["1_procs_s"] / out["2_procs_s"], 2)
    return out


# ---- one experiment --------------------------------------------------------------------------------
def _epoch(dt: datetime | None) -> float | None:
    if dt is None:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals running at one moment."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


def list_schedule(durations: list[float], slots: int) -> float:
    """Makespan of greedy list scheduling of ``durations`` (in this order) on ``slots`` machines."""
    free = [0.0] * max(1, slots)
    for d in durations:
        i = free.index(min(free))
        free[i] += d
    return max(free)


def shares(model_dir: Path, candidates: list[str], gpu_memory: str | None, gpus: int) -> dict[str, float]:
    """Each candidate's GPU share as the service computes it (``Service._placements``)."""
    from quantselect.domain import planner
    from quantselect.domain.candidates import resolve_candidates
    from quantselect.service import read_model_config

    shape = planner.shape_from_config(read_model_config(model_dir) or {})
    memory = planner.parse_memory(gpu_memory) if gpu_memory else None
    out = {}
    for cand in resolve_candidates(candidates):
        need = planner.candidate_need(shape, cand.config)
        req = planner.gpu_request(need, memory, gpus)
        out[cand.name] = {"share": req.gpus, "need_gib": round(need.total / planner.GIB, 3)}
    return out


def run_experiment(name: str, *, home: Path, model: str, model_dir: Path, candidates: list[str], limit: int,
                   gpus: int, cpus: int, gpu_memory: str | None, wait_idle_s: float = 0) -> dict:
    import ray

    import quantselect.orchestration.sweep as sweep_mod
    from quantselect.service import Service, SubmitRequest
    from quantselect.settings import get_settings

    run_dir = Path(tempfile.mkdtemp(prefix=f"qs-sweep-{name}-"))
    env = {"QUANTSELECT_HOME": str(home),  # shared: the demo model is converted once, before timing
           "QUANTSELECT_DB_URL": f"sqlite:///{run_dir / 'quantselect.db'}",  # fresh: no stored result reused
           "QUANTSELECT_ARTIFACTS_DIR": str(run_dir / "artifacts")}  # fresh: every candidate quantizes
    if gpu_memory:
        env["QUANTSELECT_GPU_MEMORY"] = gpu_memory
    svc = Service(get_settings(env))
    req = SubmitRequest(model=model, dataset=str(DATASET), limit=limit, candidates=candidates, use_cache=False)
    planned = shares(model_dir, candidates, gpu_memory, gpus)
    print(f"\n== {name}: {len(candidates)} candidates x {limit} items on {gpus} logical GPU(s), "
          f"QUANTSELECT_GPU_MEMORY={gpu_memory or 'unset'}; shares "
          + ", ".join(f"{k} {v['share']:.2f}" for k, v in planned.items()), flush=True)

    idle = wait_idle(wait_idle_s) if wait_idle_s else {}
    ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _node_ip_address="127.0.0.1")
    original = sweep_mod.run_sweep
    entered: list[float] = []

    def timed_run_sweep(*a, **kw):
        entered.append(time.time())
        return original(*a, **kw)

    sweep_mod.run_sweep = timed_run_sweep  # run_job imports it from the module at call time
    cpu = None
    try:
        job = svc.submit(req)
        sampler = CpuSampler()
        t0 = time.time()
        try:
            svc.run_job(job.id)
        finally:
            t1 = time.time()
            cpu = sampler.stop()
        results = svc.results(job.id)
    finally:
        sweep_mod.run_sweep = original
        ray.shutdown()
        svc.close()
        shutil.rmtree(run_dir, ignore_errors=True)  # the database and the quantized artifacts
    t_sweep = entered[0]
    rows = []
    for r in results:
        s, e = _epoch(r.started_at), _epoch(r.finished_at)
        rows.append({"name": r.name, "status": r.status, "error": r.error, "gpu_ids": list(r.gpu_ids),
                     "share": planned[r.name]["share"], "need_gib": planned[r.name]["need_gib"],
                     "start_s": round(s - t_sweep, 2), "end_s": round(e - t_sweep, 2),
                     "duration_s": round(e - s, 2), "quantize_s": r.quantize_seconds, "attempts": r.attempts,
                     "score": r.score, "decode_tok_s_b1": r.tokens_per_second,
                     "decode_tok_s_b16": r.decode_tokens_per_second_b16})
    rows.sort(key=lambda x: x["start_s"])
    durations = [x["duration_s"] for x in rows]
    work, longest = sum(durations), max(durations)
    wall = max(x["end_s"] for x in rows)
    per_gpu: dict[str, list[tuple[float, float]]] = {}
    for x in rows:
        for g in x["gpu_ids"]:
            per_gpu.setdefault(g, []).append((x["start_s"], x["end_s"]))
    gaps = {}  # per GPU: idle time between one candidate's end and the next one's start there
    for g, iv in per_gpu.items():
        iv = sorted(iv)
        gaps[g] = [round(b[0] - a[1], 2) for a, b in zip(iv, iv[1:]) if b[0] >= a[1]]
    out = {
        "name": name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": COMMAND,
        "model": model, "candidates": candidates, "items": limit, "logical_gpus": gpus,
        "ray_cpus": cpus, "gpu_memory": gpu_memory, "job_id": job.id,
        "wall_s": round(wall, 2),  # run_sweep entered -> last worker finished
        "run_job_s": round(t1 - t0, 2),  # the whole run_job call (Ray connect no-op, model resolved, DB)
        "before_sweep_s": round(t_sweep - t0, 2),
        "first_start_s": round(min(x["start_s"] for x in rows), 2),
        "work_s": round(work, 2), "longest_s": round(longest, 2),
        "max_concurrent": max_overlap([(x["start_s"], x["end_s"]) for x in rows]),
        "max_concurrent_per_gpu": {g: max_overlap(iv) for g, iv in sorted(per_gpu.items())},
        "idle_gaps_per_gpu_s": gaps,
        "failed": [x["name"] for x in rows if x["status"] != "succeeded"],
        "retried": [x["name"] for x in rows if (x["attempts"] or 1) > 1],
        "cpu": cpu, "idle_wait": idle,
        "candidates_timeline": rows,
    }
    print_timeline(out)
    return out


def print_timeline(e: dict) -> None:
    print(f"   wall {e['wall_s']:.1f}s (run_job {e['run_job_s']:.1f}s, sweep entered after {e['before_sweep_s']:.1f}s, "
          f"first worker start at +{e['first_start_s']:.1f}s); work {e['work_s']:.1f}s, longest {e['longest_s']:.1f}s; "
          f"max concurrent {e['max_concurrent']}, per GPU {e['max_concurrent_per_gpu']}", flush=True)
    c = e["cpu"]
    print(f"   CPU-s: machine {c['total_busy_cpu_s']} = this benchmark {c['this_benchmark_cpu_s']} "
          f"{c['this_benchmark_by_process']} + other processes {c['other_processes_cpu_s']}"
          + (f"; RETRIED {e['retried']}" if e["retried"] else ""), flush=True)
    for x in e["candidates_timeline"]:
        print(f"   {x['name']:9s} gpu {','.join(x['gpu_ids']) or '-':3s} share {x['share']:.2f}  "
              f"+{x['start_s']:6.1f} .. +{x['end_s']:6.1f}  ({x['duration_s']:5.1f}s)  {x['status']}"
              + (f"  {x['error']}" if x["error"] else ""), flush=True)


# ---- set-up ----------------------------------------------------------------------------------------
def prepare(home: Path, tiny_out: Path) -> tuple[Path, Path]:
    """Convert the demo model once (untimed), and build the tiny random Llama the packing experiment
    uses (as tests/fixtures/models.py does), with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from quantselect.engines.models import resolve_model

    t = time.time()
    demo = resolve_model("demo", home / "models")
    print(f"demo model ready in {time.time() - t:.1f}s: {demo}", flush=True)
    tok = AutoTokenizer.from_pretrained(str(demo))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(tiny_out))
    tok.save_pretrained(str(tiny_out))
    return demo, tiny_out


def check_settings_home(home: Path) -> None:
    from quantselect.settings import get_settings

    s = get_settings({"QUANTSELECT_HOME": str(home)})
    assert s.models_dir == home / "models", f"models dir is {s.models_dir}, expected {home / 'models'}"


# ---- report ----------------------------------------------------------------------------------------
def summarize(bound: dict | None, packing: list[dict]) -> dict:
    out: dict = {}
    if bound:
        g = bound["logical_gpus"]
        lb = max(bound["work_s"] / g, bound["longest_s"])
        durs = [x["duration_s"] for x in bound["candidates_timeline"]]
        out["lower_bound"] = {
            "wall_s": bound["wall_s"], "work_s": bound["work_s"], "gpus": g, "longest_s": bound["longest_s"],
            "bound_s": round(lb, 2), "ratio": round(bound["wall_s"] / lb, 3),
            "ratio_run_job": round(bound["run_job_s"] / lb, 3), "target": 1.2,
            "met": bound["wall_s"] / lb <= 1.2,
            # The same measured durations, list-scheduled with no start-up cost: in the order they
            # started, and longest first. wall - the first = the cost of starting workers and handing over.
            "list_schedule_start_order_s": round(list_schedule(durs, g), 2),
            "list_schedule_longest_first_s": round(list_schedule(sorted(durs, reverse=True), g), 2),
            "idle_gaps_per_gpu_s": bound["idle_gaps_per_gpu_s"],
            "first_start_s": bound["first_start_s"],
            "cpu": bound["cpu"], "retried": bound["retried"],
        }
    rows = []
    by = {(e["logical_gpus"], e.get("repeat", 1), e["gpu_memory"] is not None): e for e in packing}
    for gpus, rep in sorted({(e["logical_gpus"], e.get("repeat", 1)) for e in packing}):
        a, b = by.get((gpus, rep, False)), by.get((gpus, rep, True))
        if not (a and b):
            continue
        tok = [(x["decode_tok_s_b1"], y["decode_tok_s_b1"]) for x in a["candidates_timeline"]
               for y in b["candidates_timeline"] if x["name"] == y["name"] and x["decode_tok_s_b1"] and y["decode_tok_s_b1"]]
        ratios = sorted(y / x for x, y in tok)
        rows.append({
            "gpus": gpus, "repeat": rep, "candidates": len(a["candidates"]), "items": a["items"],
            "one_per_gpu_wall_s": a["wall_s"], "packed_wall_s": b["wall_s"],
            "speedup": round(a["wall_s"] / b["wall_s"], 3), "target": 1.5, "met": a["wall_s"] / b["wall_s"] >= 1.5,
            "gpu_memory": b["gpu_memory"], "shares": sorted({x["share"] for x in b["candidates_timeline"]}),
            "one_per_gpu_max_concurrent_per_gpu": a["max_concurrent_per_gpu"],
            "packed_max_concurrent_per_gpu": b["max_concurrent_per_gpu"],
            "one_per_gpu_work_s": a["work_s"], "packed_work_s": b["work_s"],
            "one_per_gpu_mean_duration_s": round(a["work_s"] / len(a["candidates_timeline"]), 2),
            "packed_mean_duration_s": round(b["work_s"] / len(b["candidates_timeline"]), 2),
            # How busy the machine's cores were, and the shortest wall the packed run's CPU time allows
            # on them: packing cannot beat that floor on a CPU machine, however it schedules.
            "one_per_gpu_cores_busy": round(a["cpu"]["total_busy_cpu_s"] / a["wall_s"], 2),
            "packed_cores_busy": round(b["cpu"]["total_busy_cpu_s"] / b["wall_s"], 2),
            "packed_cpu_floor_s": round(b["cpu"]["total_busy_cpu_s"] / CORES, 1),
            "one_per_gpu_cpu": a["cpu"], "packed_cpu": b["cpu"],
            "retried": a["retried"] + b["retried"],
            "packed_vs_alone_decode_tok_s_median": round(ratios[len(ratios) // 2], 3) if ratios else None,
        })
    out["packing"] = rows
    out["packing_median_speedup"] = {}
    for gpus in sorted({r["gpus"] for r in rows}):
        ups = sorted(r["speedup"] for r in rows if r["gpus"] == gpus)
        mid = len(ups) // 2
        out["packing_median_speedup"][str(gpus)] = {
            "runs": len(ups), "speedups": ups, "met": None,
            "median": ups[mid] if len(ups) % 2 else round((ups[mid - 1] + ups[mid]) / 2, 3)}
        out["packing_median_speedup"][str(gpus)]["met"] = out["packing_median_speedup"][str(gpus)]["median"] >= 1.5
    return out


def commands(experiments: list[dict]) -> list[str]:
    """The commands that produced these experiments (a results file may merge several runs)."""
    return list(dict.fromkeys(e.get("command", "") for e in sorted(experiments, key=lambda e: e.get("date", ""))))


def markdown(summary: dict) -> str:
    lines = []
    lb = summary.get("lower_bound")
    if lb:
        lines += ["| sweep | GPUs | wall s | work s | longest s | bound s | wall / bound | target | met | other CPU-s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
                  f"| lower bound (demo) | {lb['gpus']} | {lb['wall_s']:.1f} | {lb['work_s']:.1f} | {lb['longest_s']:.1f} "
                  f"| {lb['bound_s']:.1f} | **{lb['ratio']:.2f}** | ≤ 1.2 | {'yes' if lb['met'] else 'no'} "
                  f"| {lb['cpu']['other_processes_cpu_s']:.0f} |", ""]
    if summary.get("packing"):
        lines += ["| packing (tiny Llama), run | GPUs | candidates | share each | one per GPU: wall s, max per GPU "
                  "| packed: wall s, max per GPU | speed-up | target | met | cores busy (a / b) | packed CPU floor s "
                  "| other CPU-s (a / b) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for p in summary["packing"]:
            lines.append(
                f"| {p['items']} items, {p['repeat']} | {p['gpus']} | {p['candidates']} | {', '.join(f'{s:.2f}' for s in p['shares'])} "
                f"({p['gpu_memory']}) | {p['one_per_gpu_wall_s']:.1f}, {max(p['one_per_gpu_max_concurrent_per_gpu'].values())} "
                f"| {p['packed_wall_s']:.1f}, {max(p['packed_max_concurrent_per_gpu'].values())} "
                f"| **{p['speedup']:.2f}×** | ≥ 1.5× | {'yes' if p['met'] else 'no'} "
                f"| {p['one_per_gpu_cores_busy']:.2f} / {p['packed_cores_busy']:.2f} | {p['packed_cpu_floor_s']:.1f} "
                f"| {p['one_per_gpu_cpu']['other_processes_cpu_s']:.0f} / {p['packed_cpu']['other_processes_cpu_s']:.0f} |")
        for gpus, m in summary.get("packing_median_speedup", {}).items():
            lines.append(f"\nPacking on {gpus} logical GPU(s): median speed-up **{m['median']:.2f}×** over {m['runs']} "
                         f"run(s) ({', '.join(f'{x:.2f}' for x in m['speedups'])}).")
    return "\n".join(lines)


def write_markdown(out: Path, data: dict) -> None:
    """The table next to the JSON, with the machine and the commands that produced it."""
    m = data["machine"]
    text = (f"# Distributed sweep: placement and packing\n\n"
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB, no GPU (Ray logical GPUs); "
            f"torch {m['torch']}, transformers {m['transformers']}, Ray {m['ray']}.\n\nCommands:\n\n"
            + "".join(f"    {c}\n" for c in data.get("commands", [data.get("command", "")]))
            + "\n" + markdown(data["summary"]) + f"\n\nFull data: `{out.name}`.\n")
    out.with_suffix(".md").write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer candidates and items (a smoke run)")
    ap.add_argument("--bound-candidates", default="baseline,int8,int4,nf4,w8a8,int3")
    ap.add_argument("--bound-items", type=int, default=60)
    ap.add_argument("--bound-gpus", type=int, default=2)
    ap.add_argument("--pack-candidates", default="baseline,bf16,fp16,int8,w8a8,int4,int3,int2")
    ap.add_argument("--pack-items", type=int, default=60)
    ap.add_argument("--pack-gpus", default="1,2", help="logical GPU counts to run the packing pair on")
    ap.add_argument("--repeats", type=int, default=1, help="run each packing pair this many times")
    ap.add_argument("--first-repeat", type=int, default=1,
                    help="number of the first repeat (with --merge: add repeats to an earlier run's)")
    ap.add_argument("--gpu-memory", default="8GiB", help="QUANTSELECT_GPU_MEMORY of the packed runs")
    ap.add_argument("--cpus", type=int, default=2, help="Ray's CPUs (the tasks of a GPU cluster take none)")
    ap.add_argument("--skip", choices=("bound", "packing"), action="append", default=[])
    ap.add_argument("--wait-idle", type=float, default=900,
                    help="before each experiment, wait up to this many seconds for the machine to be idle (0: don't)")
    ap.add_argument("--home", default=None, help="QUANTSELECT_HOME shared by the runs (default: a new temp dir)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--summarize-only", action="store_true", help="recompute the summary of --out; run nothing")
    ap.add_argument("--merge", action="store_true",
                    help="keep the experiments of the existing --out file that this run skips (e.g. a rerun of one part)")
    args = ap.parse_args()
    if args.quick:
        args.bound_candidates, args.bound_items = "baseline,int8,w8a8", 16
        args.pack_candidates, args.pack_items, args.pack_gpus = "baseline,int8,int4,int3", 16, "1"
    global COMMAND
    command = COMMAND = ".venv/bin/python benchmarks/sweep.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])

    if args.summarize_only:  # recompute the summary and the table of an existing results file
        data = json.loads(Path(args.out).read_text())
        exps = data["experiments"]
        data["summary"] = summarize(next((e for e in exps if e["name"] == "bound"), None),
                                    [e for e in exps if e["name"].startswith("pack-")])
        data["commands"] = commands(exps)
        Path(args.out).write_text(json.dumps(data, indent=2) + "\n")
        write_markdown(Path(args.out), data)
        print(markdown(data["summary"]))
        return 0
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB; torch {info['torch']}, "
          f"ray {info['ray']}; load {info['load_average_at_start']}", flush=True)
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="qs-sweep-home-"))
    tiny_root = Path(tempfile.mkdtemp(prefix="qs-sweep-tiny-"))
    try:
        return run_all(args, info, home, tiny_root)
    finally:
        shutil.rmtree(tiny_root, ignore_errors=True)
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)


def run_all(args, info: dict, home: Path, tiny_root: Path) -> int:
    command = COMMAND
    check_settings_home(home)
    demo_dir, tiny_dir = prepare(home, tiny_root / "tiny-llama")

    if args.wait_idle:
        wait_idle(args.wait_idle)
    scaling = core_scaling()
    print(f"core scaling (pure-Python loop): {scaling}", flush=True)
    experiments: list[dict] = []
    t_start = time.time()
    bound = None
    if "bound" not in args.skip:
        bound = run_experiment("bound", home=home, model="demo", model_dir=demo_dir,
                               candidates=args.bound_candidates.split(","), limit=args.bound_items,
                               gpus=args.bound_gpus, cpus=args.cpus, gpu_memory=None,
                               wait_idle_s=args.wait_idle)
        experiments.append(bound)
    packing = []
    if "packing" not in args.skip:
        for rep in range(args.first_repeat, args.first_repeat + args.repeats):
            for gpus in [int(g) for g in args.pack_gpus.split(",")]:
                for mode, mem in (("one-per-gpu", None), ("packed", args.gpu_memory)):
                    e = run_experiment(f"pack-{gpus}gpu-{mode}" + (f"-r{rep}" if rep > 1 else ""), home=home,
                                       model=str(tiny_dir), model_dir=tiny_dir,
                                       candidates=args.pack_candidates.split(","), limit=args.pack_items,
                                       gpus=gpus, cpus=args.cpus, gpu_memory=mem, wait_idle_s=args.wait_idle)
                    e["repeat"] = rep
                    experiments.append(e)
                    packing.append(e)
    if args.merge and Path(args.out).exists():
        # keep the experiments of the earlier run that this run did not repeat (each keeps its date and command)
        ran = {e["name"] for e in experiments}
        earlier = json.loads(Path(args.out).read_text())
        kept = [e for e in earlier["experiments"] if e["name"] not in ran]
        for e in kept:
            e.setdefault("date", earlier["date"])
            e.setdefault("command", earlier["command"])
        experiments = kept + experiments
        bound = next((e for e in experiments if e["name"] == "bound"), None)
        packing = [e for e in experiments if e["name"].startswith("pack-")]
    summary = summarize(bound, packing)
    for p in summary.get("packing", []):
        bad = [s for s in p["shares"] if s is None or s > 0.25]
        if bad:
            print(f"warning: {args.gpu_memory} gives shares {p['shares']}, not all <= 0.25", flush=True)
    table = markdown(summary)
    print("\n" + table)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
              "commands": commands(experiments),
              "machine": info, "core_scaling": scaling,
              "other_load": {e["name"]: e["cpu"]["other_processes_cpu_s"] for e in experiments},
              "load_average_at_end": list(os.getloadavg()),
              "total_benchmark_s": round(time.time() - t_start, 1), "summary": summary, "experiments": experiments,
              "git_head": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True).stdout.strip() or None}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(out, result)
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
