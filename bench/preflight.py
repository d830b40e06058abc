"""A first load on a new machine, before a sweep: probe, plan, load, decode a few tokens.

Run with ``python3 -X faulthandler bench/preflight.py MODEL.gguf BUDGET_GIB``; prints each step so
that a crash shows where it happened.
"""

from __future__ import annotations

import json
import sys
import time

import gpu_sweep  # noqa: F401 - puts this checkout's offload on the path


def step(msg: str) -> None:
    print(f"[preflight {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    model, budget_gib = sys.argv[1], float(sys.argv[2])
    from offload.planner import anatomy, hardware, plan
    from offload.planner.types import PlanRequest

    step("probing hardware")
    hw = hardware.probe()
    step(json.dumps({"gpus": [g.__dict__ for g in hw.gpus], "cpu": hw.cpu.__dict__, "notes": hw.notes}))
    a = anatomy.read(model)
    p = plan(a, hw, PlanRequest(n_ctx=4096, gpu_budget_bytes=int(budget_gib * (1 << 30))))
    step(f"plan: ngl={p.n_gpu_layers} ot={list(p.cpu_tensor_patterns)} ub={p.n_ubatch} threads={p.threads} "
         f"use_mmap={p.use_mmap}")
    from offload.runtime.engine import Engine, Piece, Sampling

    for label, pl in (("whole layers, no overrides", p.__class__(**{**p.__dict__, "cpu_tensor_patterns": ()})), ("plan", p)):
        step(f"loading ({label})")
        e = Engine.load(model, pl)
        step(f"loaded in {e.load_s:.1f}s; measured {json.dumps(e.measured_bytes)}")
        for ln in e.load_log:
            if "buffer size" in ln or "pinned" in ln:
                step("  " + ln.strip())
        n = sum(1 for ev in e.generate(e.tokenize("Hello"), Sampling(temperature=0, num_predict=8)) if isinstance(ev, Piece))
        step(f"decoded {n} pieces")
        e.close()
    step("ok")


if __name__ == "__main__":
    main()
