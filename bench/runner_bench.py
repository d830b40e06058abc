#!/usr/bin/env python3
"""Runner processes against llama.cpp's own tools, same model, same build, same placement.

Measures and writes one JSON:
- ``overhead``: single-stream decode t/s through a runner (and through the whole server: HTTP,
  template, runner) against ``llama-batched-bench -npl 1``; time to first token against llama.cpp's
  prompt time for the same prompt length; load time against ``llama-batched-bench``'s whole run
  on a tiny workload (process start, load, warm-up).
- ``batched``: aggregate decode t/s of N concurrent requests (each its own prompt) against
  ``llama-batched-bench -npp P -ntg G -npl N`` with the same unified KV cache, beside the
  planner's predicted aggregate.
- ``stall``: the longest wait a decoding stream sees while another request prefills a long prompt
  (chunked), against that prompt's whole prefill time (what one unchunked step would stall).
- ``match``: the share of greedy answers identical token for token alone and inside a batch of 8.

    python bench/runner_bench.py --model gemma3:270m --tools DIR --out bench/results/runner-cpu.json
    python bench/runner_bench.py --model /tmp/dense.gguf --gpu-memory 12GiB --tools /tmp/llama-tools ...

``--tools`` holds ``llama-batched-bench`` built from the same llama.cpp sources as llama-cpp-python.
Each figure is the median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from offload.planner import anatomy as anatomy_mod  # noqa: E402
from offload.planner import plan as make_plan  # noqa: E402
from offload.planner import predict_aggregate  # noqa: E402
from offload.planner.types import Plan, PlanRequest  # noqa: E402
from offload.runtime import config  # noqa: E402
from offload.runtime.runner.generation import CancelEvent, Piece, Sampling, Stats  # noqa: E402
from offload.runtime.serving import calibration, process  # noqa: E402
from offload.runtime.serving.benchmark import measure_parallel  # noqa: E402
from offload.runtime.serving.planning import current_hardware  # noqa: E402
from offload.runtime.serving.process import RunnerProcess  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_tools import override_rules  # noqa: E402

WORDS = (
    "river stone cloud paper garden window silver orange forest candle harbor ladder violin "
    "meadow pencil thunder lantern marble castle pepper"
).split()


def resolve(model: str) -> Path:
    p = Path(model).expanduser()
    if p.is_file():
        return p
    from offload.runtime.serving import planning

    return planning.resolve(model).path


def llama_args(plan: Plan) -> list[str]:
    """llama.cpp command-line flags that apply the same placement and knobs as ``plan``."""
    args = [
        "-ngl",
        str(plan.n_gpu_layers),
        "-b",
        str(plan.n_batch),
        "-ub",
        str(plan.n_ubatch),
        "-t",
        str(plan.threads),
        "-fa",
        "on" if plan.flash_attn else "off",
        "-ctk",
        plan.kv_type,
        "-ctv",
        plan.kv_type,
        "-lm",
        "mmap" if plan.use_mmap else "none",
        "-kvu",
    ]
    rules = override_rules(plan.to_dict())
    if rules:
        args += ["-ot", ",".join(f"{p}={b}" for p, b in rules)]
    if plan.tensor_split:
        args += ["-ts", ",".join(f"{x:.4f}" for x in plan.tensor_split)]
    if not plan.op_offload:
        args.append("--no-op-offload")
    return args


def batched_bench(
    tool: Path,
    model: Path,
    plan: Plan,
    n_ctx: int,
    npp: int,
    ntg: int,
    npl: list[int],
    extra_bufts: bool = True,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    cmd = [
        str(tool),
        "-m",
        str(model),
        "-c",
        str(n_ctx),
        "-npp",
        str(npp),
        "-ntg",
        str(ntg),
        "-npl",
        ",".join(map(str, npl)),
        "--output-format",
        "jsonl",
        *llama_args(plan),
    ]
    if not extra_bufts:
        cmd.append("--no-repack")
    if verbose:  # llama.cpp's timings are logged at this verbosity (debug lines too)
        cmd += ["-lv", "4"]
    for _ in range(3):  # seen once: an exit code 0 with no result lines
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3000)
        rows = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode == 0 and rows:
            # llama.cpp's own count of the model's load (llama_perf_context_print's "load time").
            m = re.search(r"load time\s*=\s*([0-9.]+) ms", r.stderr)
            for row in rows:
                row["load_ms"] = float(m.group(1)) if m else None
            return rows
    raise RuntimeError(f"{' '.join(cmd)} failed (exit {r.returncode}): {r.stderr[-800:]}")


def gpu_mib_of(pid: int | None) -> float | None:
    """GPU memory nvidia-smi counts for ``pid`` (0 when it holds none; None without nvidia-smi)."""
    if pid is None:
        return None
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    for line in r.stdout.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            return float(parts[1])
    return 0.0


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def distinct_prompt(proc: RunnerProcess, n_tokens: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    toks = proc.tokenize(
        f"Note {seed}: " + " ".join(rng.choice(WORDS) for _ in range(n_tokens * 2)), add_bos=True
    )
    return toks[:n_tokens]


# -- single stream ----------------------------------------------------------------------------------


def stream_once(proc: RunnerProcess, tokens: list[int], gen: int) -> dict[str, float]:
    t0 = time.perf_counter()
    first = 0.0
    stats: Stats | None = None
    for ev in proc.generate(
        Sampling(temperature=0.0, num_predict=gen), tokens=tokens, ignore_eos=True
    ):
        if isinstance(ev, Piece) and not first:
            first = time.perf_counter() - t0
        elif isinstance(ev, Stats):
            stats = ev
    assert stats is not None
    return {
        "ttft_s": first,
        "prompt_eval_s": stats.prompt_eval_s,
        "decode_tps": stats.eval_count / stats.eval_s if stats.eval_s else 0.0,
    }


def server_stream_once(url: str, model_name: str, prompt: str, gen: int) -> dict[str, float]:
    import httpx

    t0 = time.perf_counter()
    first = last = 0.0
    final: dict[str, Any] = {}
    with httpx.stream(
        "POST",
        f"{url}/api/generate",
        timeout=600,
        json={
            "model": model_name,
            "prompt": prompt,
            "raw": True,
            "options": {"temperature": 0, "num_predict": gen, "repeat_penalty": 1.0},
        },
    ) as r:
        for line in r.iter_lines():
            now = time.perf_counter() - t0
            chunk = json.loads(line)
            if chunk.get("response") and not first:
                first = now
            last = now
            if chunk.get("done"):
                final = chunk
    n = int(final.get("eval_count") or 0)
    return {
        "ttft_s": first,
        "decode_tps": n / (final["eval_duration"] / 1e9) if final.get("eval_duration") else 0.0,
        "client_decode_tps": (n - 1) / (last - first) if last > first and n > 1 else 0.0,
        "eval_count": n,
        "load_s": final.get("load_duration", 0) / 1e9,
    }


def overhead(args: argparse.Namespace, model: Path, plans: Any, tools: Path) -> dict[str, Any]:
    single = plans(1, args.prompt + args.gen + 64)
    n_ctx = single.n_ctx
    # Interleaved, one of each per round, so that a machine whose speed drifts (a shared VM)
    # weighs on both alike; the ratio is also reported as the median of the rounds' ratios.
    base: list[dict[str, Any]] = []
    load_base: list[float] = []
    model_base: list[float] = []  # llama.cpp's own "load time" of the model within that
    phases: list[dict[str, float]] = []  # the runner's (RunnerProcess.phases)
    spare_loads: list[float] = []  # the same load, taking a spare runner
    spare_phases: list[dict[str, float]] = []
    spare_gpu: list[float | None] = []  # GPU memory (MiB) a spare held before its load
    ours: list[dict[str, Any]] = []
    loads: list[float] = []
    for r in range(args.repeats):
        base.append(
            batched_bench(
                tools / "llama-batched-bench", model, single, n_ctx, args.prompt, args.gen, [1],
                args.extra_bufts,
            )[0]
        )  # fmt: skip
        # llama.cpp's whole cost of getting ready: process start, load, a tiny run, exit.
        t0 = time.perf_counter()
        batched_bench(
            tools / "llama-batched-bench", model, single, n_ctx, 8, 1, [1], args.extra_bufts
        )
        load_base.append(time.perf_counter() - t0)
        # Once more, logging, for llama.cpp's own count of the model's load within that.
        tiny = batched_bench(
            tools / "llama-batched-bench", model, single, n_ctx, 8, 1, [1], args.extra_bufts, True
        )
        model_base.append((tiny[0].get("load_ms") or 0.0) / 1e3)
        t0 = time.perf_counter()
        proc = RunnerProcess.start("bench", model, single, extra_bufts=args.extra_bufts)
        loads.append(time.perf_counter() - t0)
        phases.append(dict(proc.phases))
        try:
            # A warm-up, as llama.cpp's tools do.
            stream_once(proc, distinct_prompt(proc, args.prompt, 999), 8)
            ours.append(stream_once(proc, distinct_prompt(proc, args.prompt, r + 1), args.gen))
        finally:
            proc.close()
        # As a running server loads: its spare runner has started Python and llama.cpp already.
        process.keep_spare_runner()
        spare_pid = process._spares.pid()
        time.sleep(3)
        spare_gpu.append(gpu_mib_of(spare_pid))
        t0 = time.perf_counter()
        proc = RunnerProcess.start("bench", model, single, extra_bufts=args.extra_bufts)
        spare_loads.append(time.perf_counter() - t0)
        spare_phases.append(dict(proc.phases))
        process.close_spare_runner()
        proc.close()
    out: dict[str, Any] = {
        "llama_cpp": {
            "decode_tps": median([b["speed_tg"] for b in base]),
            "prompt_s": median([b["t_pp"] for b in base]),
            "ready_s": median(load_base),
            "model_load_s": median(model_base),
            "runs": base,
        },
        "runner": {
            "decode_tps": median([o["decode_tps"] for o in ours]),
            "ttft_s": median([o["ttft_s"] for o in ours]),
            "prompt_eval_s": median([o["prompt_eval_s"] for o in ours]),
            "load_s": median(loads),
            "phases": {k: median([p.get(k, 0.0) for p in phases]) for k in phases[0]}
            if phases
            else {},
            "runs": ours,
            "load_with_spare_s": median(spare_loads),
            "phases_with_spare": {
                k: median([p.get(k, 0.0) for p in spare_phases]) for k in spare_phases[0]
            }
            if spare_phases
            else {},
            "spare_gpu_mib": spare_gpu,
        },
    }
    if args.server_model:
        out["server"] = server_overhead(args, single)
    lc, rn = out["llama_cpp"], out["runner"]
    out["decode_ratio"] = rn["decode_tps"] / lc["decode_tps"] if lc["decode_tps"] else None
    out["decode_ratio_of_rounds"] = median(
        [o["decode_tps"] / b["speed_tg"] for o, b in zip(ours, base, strict=True) if b["speed_tg"]]
    )
    out["ttft_extra_ms"] = (rn["ttft_s"] - lc["prompt_s"]) * 1e3
    out["load_extra_s"] = rn["load_s"] - lc["ready_s"]
    out["load_extra_with_spare_s"] = rn["load_with_spare_s"] - lc["ready_s"]
    if "server" in out:
        sv = out["server"]
        out["server_decode_ratio"] = (
            sv["decode_tps"] / lc["decode_tps"] if lc["decode_tps"] else None
        )
        out["server_ttft_extra_ms"] = (sv["ttft_s"] - lc["prompt_s"]) * 1e3
    return out


def server_overhead(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """The same request through a real ``offload serve`` process and its HTTP API."""
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OFFLOAD_HOST": f"127.0.0.1:{port}", "OFFLOAD_NUM_PARALLEL": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "offload.runtime.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        rng = random.Random(7)
        runs = []
        for i in range(args.repeats + 1):
            prompt = f"Note {i}: " + " ".join(rng.choice(WORDS) for _ in range(args.prompt // 2))
            runs.append(server_stream_once(url, args.server_model, prompt, args.gen))
        runs = runs[1:]  # the first loads the model
        return {
            "decode_tps": median([r["decode_tps"] for r in runs]),
            "client_decode_tps": median([r["client_decode_tps"] for r in runs]),
            "ttft_s": median([r["ttft_s"] for r in runs]),
            "runs": runs,
        }
    finally:
        server.terminate()
        server.wait(timeout=60)


# -- batched, stall, match -------------------------------------------------------------------------


def batched(
    args: argparse.Namespace, model: Path, plans: Any, tools: Path, predict: Any
) -> dict[str, Any]:
    streams = sorted(args.parallel)
    wide = plans(max(streams), args.prompt + args.gen + 64)
    n_ctx_total = wide.n_ctx * wide.n_parallel
    base_runs = [
        batched_bench(
            tools / "llama-batched-bench",
            model,
            wide,
            n_ctx_total,
            args.prompt,
            args.gen,
            streams,
            args.extra_bufts,
        )
        for _ in range(args.repeats)
    ]
    proc = RunnerProcess.start("bench", model, wide, extra_bufts=args.extra_bufts)
    ours: dict[int, list[dict[str, Any]]] = {n: [] for n in streams}
    try:
        for _ in range(args.repeats):
            for n in streams:
                ours[n].append(measure_parallel(proc, n, args.prompt, args.gen))
    finally:
        proc.close()
    rows = []
    for n in streams:
        lc = median([next(r["speed_tg"] for r in run if r["pl"] == n) for run in base_runs])
        agg = median([o["aggregate_decode_tps"] for o in ours[n]])
        rows.append(
            {
                "streams": n,
                "aggregate_decode_tps": agg,
                "llama_batched_bench_tg_tps": lc,
                "ratio": agg / lc if lc else None,
                "per_stream_decode_tps": median([o["per_stream_decode_tps"] for o in ours[n]]),
                "ttft_p50_s": median([o["ttft_p50_s"] for o in ours[n]]),
                "ttft_p95_s": median([o["ttft_p95_s"] for o in ours[n]]),
                "predicted_aggregate_decode_tps": predict(wide, n) if predict else None,
                "runs": ours[n],
            }
        )
    one = next((r["aggregate_decode_tps"] for r in rows if r["streams"] == 1), None)
    for r in rows:
        r["speedup_vs_one_stream"] = r["aggregate_decode_tps"] / one if one else None
    return {
        "prompt_tokens": args.prompt,
        "gen_tokens": args.gen,
        "n_ctx_total": n_ctx_total,
        "rows": rows,
    }


def stall(args: argparse.Namespace, model: Path, plans: Any) -> dict[str, Any]:
    long_tokens = args.stall_prompt
    p = plans(2, long_tokens + 256)
    proc = RunnerProcess.start("bench", model, p, extra_bufts=args.extra_bufts)
    try:
        alone = stream_once(proc, distinct_prompt(proc, long_tokens, 1), 1)["prompt_eval_s"]
        stats: dict[str, Stats] = {}
        started = threading.Event()
        stop = CancelEvent()

        def decoding() -> None:
            n = 0
            for ev in proc.generate(
                Sampling(temperature=0.0, num_predict=100000),
                ignore_eos=True,
                tokens=distinct_prompt(proc, 32, 2),
                cancel=stop,
            ):
                n += 1
                if n == 8:
                    started.set()
                if isinstance(ev, Stats):
                    stats["decoding"] = ev

        t = threading.Thread(target=decoding)
        t.start()
        started.wait(600)
        time.sleep(0.5)
        long = stream_once(proc, distinct_prompt(proc, long_tokens, 3), 4)
        steps = proc.call("stats", "benchmarking")["steps"]
        stop.set()  # the decoding stream ends within one step
        t.join(600)
    finally:
        proc.close()
    mixed = [(d, pf, dt) for d, pf, dt in steps if d and pf]
    return {
        "prompt_tokens": long_tokens,
        "prefill_alone_s": alone,
        "prefill_beside_stream_s": long["prompt_eval_s"],
        "longest_stall_s": stats["decoding"].max_gap_s if "decoding" in stats else None,
        "mixed_steps": len(mixed),
        "largest_chunk": max((pf for _, pf, _ in mixed), default=0),
    }


def match(args: argparse.Namespace, model: Path, plans: Any) -> dict[str, Any]:
    p = plans(8, 256)
    proc = RunnerProcess.start("bench", model, p, extra_bufts=args.extra_bufts)
    try:
        prompts = [
            proc.tokenize(f"Fact {i}: the {w} is", add_bos=True) for i, w in enumerate(WORDS)
        ]

        def tokens(toks: list[int]) -> list[int]:
            ev = list(
                proc.generate(
                    Sampling(temperature=0.0, num_predict=args.match_tokens),
                    tokens=toks,
                    want_tokens=True,
                    ignore_eos=True,
                )
            )
            return list(ev[-1].tokens)  # type: ignore[union-attr]

        alone = [tokens(t) for t in prompts]
        together: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(prompts), 8):
            group = list(range(start, min(start + 8, len(prompts))))
            fill = [
                i % len(prompts) for i in range(start + 8, start + 8 + 8 - len(group))
            ]  # keep batches of 8
            results: dict[int, list[int]] = {}

            def answer(i: int, results: dict[int, list[int]] = results) -> None:
                results[i] = tokens(prompts[i])

            threads = [threading.Thread(target=answer, args=(i,)) for i in group + fill]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            for i in group:
                together[i] = results[i]
    finally:
        proc.close()
    same = sum(a == b for a, b in zip(alone, together, strict=True))
    first_diff = [
        next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        for a, b in zip(alone, together, strict=True)
    ]
    return {
        "prompts": len(prompts),
        "tokens_each": args.match_tokens,
        "identical": same,
        "share": same / len(prompts),
        "first_difference_at": first_diff,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True, help="a model name in the store or a GGUF path")
    ap.add_argument("--server-model", help="the store name to measure through a real server too")
    ap.add_argument("--tools", type=Path, required=True, help="folder with llama-batched-bench")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gpu-memory", help="GPU budget for the plan, e.g. 12GiB")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument(
        "--parallel", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16]
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stall-prompt", type=int, default=4096)
    ap.add_argument("--match-tokens", type=int, default=32)
    ap.add_argument("--parts", default="overhead,batched,stall,match")
    ap.add_argument("--no-extra-bufts", dest="extra_bufts", action="store_false")
    args = ap.parse_args()
    model = resolve(args.model)
    anatomy = anatomy_mod.read(model)
    hw = current_hardware()
    budget = config.parse_bytes(args.gpu_memory) if args.gpu_memory else None
    speed, _ = calibration.speed_params_for(hw.fingerprint)

    def plans(n_parallel: int, n_ctx: int) -> Plan:
        """The planner's plan for this many sequences of this context, within the budget."""
        return make_plan(
            anatomy,
            hw,
            PlanRequest(n_ctx=max(256, n_ctx), n_parallel=n_parallel, gpu_budget_bytes=budget),
            speed,
        )

    def predict(plan: Plan, n: int) -> float:
        ctx = args.prompt + args.gen // 2
        return float(predict_aggregate(anatomy, hw, plan.placement, n, speed, context_tokens=ctx))

    plan = plans(1, args.prompt + args.gen + 64)
    out: dict[str, Any] = {
        "model": str(args.model),
        "hardware": hw.name,
        "cores": hw.cpu.cores,
        "gpus": [g.name for g in hw.gpus],
        "gpu_budget_bytes": budget,
        "plan": plan.to_dict(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "load_average_start": os.getloadavg()[0],
    }
    parts = args.parts.split(",")
    if "overhead" in parts:
        out["overhead"] = overhead(args, model, plans, args.tools)
        print(
            json.dumps(
                {k: v for k, v in out["overhead"].items() if k.endswith(("ratio", "_ms", "_s"))}
            )
        )
    if "batched" in parts:
        out["batched"] = batched(args, model, plans, args.tools, predict)
        for r in out["batched"]["rows"]:
            print(
                r["streams"],
                round(r["aggregate_decode_tps"], 1),
                round(r["llama_batched_bench_tg_tps"], 1),
                round(r["ratio"] or 0, 3),
            )
    if "stall" in parts:
        out["stall"] = stall(args, model, plans)
        print(json.dumps(out["stall"]))
    if "match" in parts:
        out["match"] = match(args, model, plans)
        print(json.dumps({k: v for k, v in out["match"].items() if k != "first_difference_at"}))
    out["load_average_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
