"""Measuring a plan in-process: prompt t/s, decode t/s, time to first token, batched throughput.

Each result sits beside the planner's prediction for the same plan, and each run is recorded in the
calibration store, so a first ``offload bench`` calibrates a new machine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from offload.planner.types import Plan
from offload.runtime.engine import Engine

__all__ = ["bench_prompt", "measure_plan", "MIN_CTX_MARGIN"]

log = logging.getLogger(__name__)
MIN_CTX_MARGIN = 16


def bench_prompt(engine: Engine, n_tokens: int) -> list[int]:
    """``n_tokens`` ordinary text tokens (repeated prose, BOS first) to time prompt processing."""
    unit = engine.tokenize("The quick brown fox jumps over the lazy dog while the river runs to the sea. ",
                           add_bos=False, special=False) or [0]
    bos = engine.llm.token_bos()
    toks = [bos] if bos is not None and bos >= 0 else []
    while len(toks) < n_tokens:
        toks.extend(unit)
    return toks[:n_tokens]


def measure_plan(model_path: Path | str, plan: Plan, *, prompt_tokens: int, gen_tokens: int,
                 parallel: Sequence[int] = (1,), model_digest: str = "", record: bool = True,
                 engine: Engine | None = None) -> dict[str, Any]:
    """Load ``plan`` (unless ``engine`` is given), measure it and return measured beside predicted.

    The result is ``{"measured": {prompt_tps, decode_tps, ttft_s, load_s, parallel: {n: tps}},
    "predicted": {prompt_tps, decode_tps, ttft_s}, "plan": ..., "measured_bytes": ...}``.
    """
    n_par = max([1, *parallel])
    need_ctx = prompt_tokens + gen_tokens + MIN_CTX_MARGIN
    plan = replace(plan, n_ctx=max(plan.n_ctx, need_ctx), n_parallel=max(plan.n_parallel, n_par))
    own = engine is None
    t0 = time.perf_counter()
    eng = engine or Engine.load(model_path, plan)
    load_s = time.perf_counter() - t0
    try:
        prompt = bench_prompt(eng, prompt_tokens)
        # Warm-up, as llama-bench does: pages mmapped weights in and lets the backends settle.
        eng.run_batch(1, prompt[:64], 4)
        single = eng.run_batch(1, prompt, gen_tokens)
        agg: dict[str, float] = {"1": round(single.decode_tps, 3)}
        for n in sorted(set(parallel) - {1}):
            # A short shared prompt: this measures decode throughput at batch size n, not prefill.
            t = eng.run_batch(n, prompt[: min(64, len(prompt))], gen_tokens)
            agg[str(n)] = round(t.decode_tps, 3)
        measured_bytes = eng.measured_bytes
    finally:
        if own:
            eng.close()
    result = {
        "measured": {"prompt_tps": single.prompt_tps, "decode_tps": single.decode_tps,
                     "decode_tps_median": single.decode_tps_median, "ttft_s": single.ttft_s, "load_s": load_s if own else None,
                     "prompt_tokens": single.prompt_tokens, "gen_tokens": gen_tokens, "parallel": agg},
        "predicted": {"prompt_tps": plan.predicted.prompt_tps, "decode_tps": plan.predicted.decode_tps,
                      "ttft_s": plan.predicted.ttft_s,
                      # The planner predicts one stream; batched throughput is measured only.
                      "parallel": None},
        "plan": plan.to_dict(),
        "measured_bytes": measured_bytes,
    }
    if record:
        from offload.runtime import calibration

        try:
            calibration.record_speeds(plan, model_digest, prompt_tokens=single.prompt_tokens,
                                      prompt_tps=single.prompt_tps, decode_tps=single.decode_tps)
        except (OSError, TimeoutError) as e:
            log.warning("could not record calibration: %s", e)
    return result
