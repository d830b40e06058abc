#!/usr/bin/env python3
"""Where single-stream decode through offload loses to llama.cpp's own, for one plan.

The same plan timed four ways, each loaded afresh:
- ``llama-batched-bench -npl 1`` (llama.cpp's decode, no sampling);
- the engine and batch loop in a child process of this script, without a runner process or a
  client: the median step, the median ``llama_decode`` call within it, and the log lines llama.cpp
  wrote while decoding; once per environment variant (``--env``, e.g. ``OMP_WAIT_POLICY=ACTIVE``);
- a runner process streaming to this process, as the server uses it.

    python bench/gap_probe.py --model /tmp/synth-moe.gguf --gpu-memory 12GiB --tools DIR --out F
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
if "--child" in sys.argv:  # llama.cpp's libraries before numpy's, as in a runner (see native)
    from offload.runtime.runner import native  # noqa: F401

from runner_bench import (  # noqa: E402
    batched_bench,
    distinct_prompt,
    llama_args,
    resolve,
    stream_once,
)

from offload.planner import anatomy as anatomy_mod  # noqa: E402
from offload.planner import plan as make_plan  # noqa: E402
from offload.planner.types import Plan, PlanRequest  # noqa: E402


def in_process(
    model: Path, plan: Plan, prompt: int, gen: int, rounds: int, rp: float
) -> dict[str, Any]:
    """The engine and batch loop in this process: step and decode-call times per token."""
    from offload.runtime.runner import native
    from offload.runtime.runner.batch import BatchLoop, Job
    from offload.runtime.runner.engine import Engine
    from offload.runtime.runner.generation import Sampling

    lines = [0]
    write = native._SINK.write

    def counting(text: str, log: bool = True) -> None:
        lines[0] += 1
        write(text, log)

    native._SINK.write = counting  # type: ignore[method-assign]
    engine = Engine.load(model, plan, verify_decode=True)
    loop = BatchLoop(engine, lambda m: None)
    calls: list[float] = []
    raw = engine.batch.decode

    def timed(ctx: int, n: int) -> int:
        t = time.perf_counter()
        rc = raw(ctx, n)
        calls.append(time.perf_counter() - t)
        return rc

    engine.batch.decode = timed  # type: ignore[method-assign]
    out: list[dict[str, float]] = []
    for r in range(rounds + 1):
        toks = engine.tokenize(f"Note {r}: river stone cloud paper garden window " * (prompt // 4))
        toks = toks[:prompt]
        loop._submit(
            Job(
                id=r,
                prompt=toks,
                sampling=Sampling(temperature=0.0, num_predict=gen, repeat_penalty=rp),
                ignore_eos=True,
            )
        )
        calls.clear()
        steps: list[float] = []
        lines[0] = 0
        while loop.active or loop.waiting:
            t = time.perf_counter()
            loop.step()
            loop._flush()
            steps.append(time.perf_counter() - t)
        steps, dec = steps[1:], calls[1:]  # the prompt's step apart
        if r:
            out.append(
                {
                    "step_ms": statistics.median(steps) * 1e3,
                    "decode_call_ms": statistics.median(dec) * 1e3,
                    "python_ms": statistics.median([a - b for a, b in zip(steps, dec, strict=True)])
                    * 1e3,
                    "decode_tps": len(steps) / sum(steps),
                    "log_lines": lines[0],
                }
            )
    engine.close()
    return {
        "pipelined": loop.pipelined,
        "rounds": out,
        **{k: statistics.median([o[k] for o in out]) for k in out[0]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--gpu-memory")
    ap.add_argument("--tools", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE;NAME=VALUE per variant")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--rp", type=float, default=1.1)
    args = ap.parse_args()
    model = resolve(args.model)
    if args.child:
        plan = Plan.from_dict(json.loads(args.child.read_text()))
        print(
            "RESULT "
            + json.dumps(in_process(model, plan, args.prompt, args.gen, args.rounds, args.rp))
        )
        return

    from offload.runtime import config
    from offload.runtime.serving import calibration
    from offload.runtime.serving.planning import current_hardware
    from offload.runtime.serving.process import RunnerProcess

    hw = current_hardware()
    speed, _ = calibration.speed_params_for(hw.fingerprint)
    budget = config.parse_bytes(args.gpu_memory) if args.gpu_memory else None
    plan = make_plan(
        anatomy_mod.read(model),
        hw,
        PlanRequest(n_ctx=args.prompt + args.gen + 64, n_parallel=1, gpu_budget_bytes=budget),
        speed,
    )
    plan_file = Path(f"/tmp/gap-plan-{os.getpid()}.json")
    plan_file.write_text(json.dumps(plan.to_dict()))
    res: dict[str, Any] = {"model": str(args.model), "plan_args": llama_args(plan)}

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(res, indent=1))
        print(json.dumps({k: v for k, v in res.items() if k != "plan_args"}, indent=1), flush=True)

    if args.tools:
        runs = [
            batched_bench(
                args.tools / "llama-batched-bench",
                model,
                plan,
                plan.n_ctx,
                args.prompt,
                args.gen,
                [1],
            )[0]
            for _ in range(2)
        ]
        res["llama_batched_bench_tg"] = [r["speed_tg"] for r in runs]
        save()
    for variant in ["", "rp=1.0", *args.env]:
        env = dict(os.environ)
        rp = args.rp
        for kv in filter(None, variant.split(";")):
            k, v = kv.split("=", 1)
            if k == "rp":
                rp = float(v)
            else:
                env[k] = v
        cmd = [sys.executable, __file__, "--model", str(model), "--child", str(plan_file),
               "--prompt", str(args.prompt), "--gen", str(args.gen), "--rounds", str(args.rounds),
               "--rp", str(rp)]  # fmt: skip
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        got = [ln[7:] for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        res[f"in_process[{variant or 'default'}]"] = (
            json.loads(got[0]) if got else {"error": r.stderr[-1500:]}
        )
        save()
    proc = RunnerProcess.start("gap-probe", model, plan)
    try:
        stream_once(proc, distinct_prompt(proc, args.prompt, 999), 8)
        res["runner_decode_tps"] = [
            stream_once(proc, distinct_prompt(proc, args.prompt, r + 1), args.gen)["decode_tps"]
            for r in range(args.rounds)
        ]
    finally:
        proc.close()
    save()


if __name__ == "__main__":
    main()
