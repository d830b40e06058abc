"""Measuring a plan through a runner process: prompt t/s, decode t/s, time to first token, and
continuous batching under N concurrent streams.

Single-stream figures come from the runner's raw benchmark (one prompt, then greedy decoding, as
llama.cpp's llama-bench measures). Batched figures come from N real requests sent at once to the
runner's batch loop, each with its own prompt (no shared prefix), as llama.cpp's
``llama-batched-bench -npp P -ntg G -npl N`` measures: aggregate decode t/s counts the steps in
which all N streams were decoding. Each result sits beside the planner's prediction, and the
single-stream run is recorded in the calibration store, so a first ``offload bench`` calibrates a
new machine.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from offload.planner.types import Plan
from offload.runtime.runner.generation import Sampling, Stats
from offload.runtime.serving.process import RunnerProcess

__all__ = ["bench_prompt", "measure_plan", "measure_parallel", "MIN_CTX_MARGIN"]

log = logging.getLogger(__name__)
MIN_CTX_MARGIN = 16
_PROSE = "The quick brown fox jumps over the lazy dog while the river runs to the sea. "


def bench_prompt(proc: RunnerProcess, n_tokens: int, stream: int = 0) -> list[int]:
    """``n_tokens`` ordinary text tokens (repeated prose, BOS first); ``stream`` makes each
    stream's prompt differ from its first tokens, so no stream reuses another's cache."""
    head = proc.tokenize(f"Stream {stream}. ", add_bos=True)
    unit = proc.tokenize(_PROSE, add_bos=False) or [0]
    toks = list(head)
    while len(toks) < n_tokens:
        toks.extend(unit)
    return toks[:n_tokens]


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def measure_parallel(
    proc: RunnerProcess, n: int, prompt_tokens: int, gen_tokens: int
) -> dict[str, Any]:
    """Send ``n`` requests at once (distinct prompts, greedy, EOS ignored) and time them."""
    prompts = [bench_prompt(proc, prompt_tokens, stream=i + 1) for i in range(n)]
    proc.call("stats", "benchmarking")  # clears the runner's step record
    ttft: list[float] = [0.0] * n
    stats: list[Stats | None] = [None] * n
    errors: list[BaseException] = []
    start = threading.Barrier(n + 1)

    def one(i: int) -> None:
        start.wait()
        t0 = time.perf_counter()
        try:
            for ev in proc.generate(
                Sampling(temperature=0.0, num_predict=gen_tokens),
                tokens=prompts[i],
                ignore_eos=True,
            ):
                if isinstance(ev, Stats):
                    stats[i] = ev
                elif not ttft[i]:
                    ttft[i] = time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    wall_s = time.perf_counter() - t0
    if errors:
        raise errors[0]
    steps = proc.call("stats", "benchmarking")["steps"]
    full = [(d, dt) for d, p, dt in steps if d == n and p == 0]
    tokens = sum(d for d, _ in full)
    agg = tokens / sum(dt for _, dt in full) if full and sum(dt for _, dt in full) > 0 else 0.0
    done = [s for s in stats if s is not None]
    per_stream = [s.eval_count / s.eval_s for s in done if s.eval_s > 0]
    return {
        "streams": n,
        "aggregate_decode_tps": round(agg, 3),
        "aggregate_wall_tps": round(sum(s.eval_count for s in done) / wall_s, 3)
        if wall_s > 0
        else 0.0,
        "per_stream_decode_tps": round(statistics.median(per_stream), 3) if per_stream else 0.0,
        "ttft_p50_s": round(_pct([t for t in ttft if t], 0.5), 4),
        "ttft_p95_s": round(_pct([t for t in ttft if t], 0.95), 4),
        "max_gap_s": round(max((s.max_gap_s for s in done), default=0.0), 4),
        "steps_all_decoding": len(full),
        "wall_s": round(wall_s, 3),
    }


def measure_plan(
    model_path: Path | str,
    plan: Plan,
    *,
    prompt_tokens: int,
    gen_tokens: int,
    parallel: Sequence[int] = (1,),
    model_digest: str = "",
    record: bool = True,
    name: str = "bench",
    parallel_prompt_tokens: int = 128,
    predict_aggregate: Callable[[int], float | None] | None = None,
) -> dict[str, Any]:
    """Start a runner for ``plan``, measure it and return measured beside predicted.

    The result is ``{"measured": {prompt_tps, decode_tps, ttft_s, load_s, parallel: {n: tps},
    "batched": [...]}, "predicted": {...}, "plan": ..., "measured_bytes": ...}``.
    """
    n_par = max([1, *parallel])
    need_ctx = max(prompt_tokens, parallel_prompt_tokens) + gen_tokens + MIN_CTX_MARGIN
    plan = plan.with_knobs(n_ctx=max(plan.n_ctx, need_ctx), n_parallel=max(plan.n_parallel, n_par))
    t0 = time.perf_counter()
    proc = RunnerProcess.start(name, model_path, plan)
    load_s = time.perf_counter() - t0
    try:
        prompt = bench_prompt(proc, prompt_tokens)
        # Warm-up, as llama-bench does: pages mapped weights in and lets the backends settle.
        proc.call("bench", "benchmarking", n_seq=1, tokens=prompt[:64], gen_tokens=4)
        single = proc.call("bench", "benchmarking", n_seq=1, tokens=prompt, gen_tokens=gen_tokens)
        batched = [
            measure_parallel(proc, n, parallel_prompt_tokens, gen_tokens)
            for n in sorted(set(parallel))
        ]
        measured_bytes = proc.measured_bytes
        loaded_plan = proc.plan or plan
    finally:
        proc.close()
    steps = sorted(single["step_s"])
    median_step = steps[len(steps) // 2] if steps else 0.0
    prompt_tps = single["prompt_tokens"] / single["prompt_s"] if single["prompt_s"] > 0 else 0.0
    decode_tps = single["tokens"] / single["decode_s"] if single["decode_s"] > 0 else 0.0
    for b in batched:
        b["predicted_aggregate_decode_tps"] = (
            predict_aggregate(b["streams"]) if predict_aggregate else None
        )
    result = {
        "measured": {
            "prompt_tps": prompt_tps,
            "decode_tps": decode_tps,
            "decode_tps_median": 1 / median_step if median_step > 0 else decode_tps,
            "ttft_s": single["ttft_s"],
            "load_s": load_s,
            "prompt_tokens": single["prompt_tokens"],
            "gen_tokens": gen_tokens,
            "parallel": {str(b["streams"]): b["aggregate_decode_tps"] for b in batched},
            "batched": batched,
        },
        "predicted": {
            "prompt_tps": plan.predicted.prompt_tps,
            "decode_tps": plan.predicted.decode_tps,
            "ttft_s": plan.predicted.ttft_s,
            "parallel": {str(b["streams"]): b["predicted_aggregate_decode_tps"] for b in batched},
        },
        "plan": loaded_plan.to_dict(),
        "measured_bytes": measured_bytes,
    }
    if record:
        from offload.runtime.serving import calibration

        try:
            calibration.record_speeds(
                plan,
                model_digest,
                prompt_tokens=single["prompt_tokens"],
                prompt_tps=prompt_tps,
                decode_tps=decode_tps,
            )
        except (OSError, TimeoutError) as e:
            log.warning("could not record calibration: %s", e)
    return result
