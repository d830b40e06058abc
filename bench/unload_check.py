#!/usr/bin/env python3
"""Unloading gives everything back: GPU memory (as nvidia-smi counts it, CUDA context included)
and host memory, pinned included, return to their level before the load once the runner ends.

    python bench/unload_check.py --model /tmp/synth-dense.gguf --out bench/results/unload-gpu.json
    python bench/unload_check.py --model /tmp/synth-moe.gguf --gpu-memory 8GiB --out ...

Each load is measured ``--repeats`` times: before, loaded (and after one request), and after the
runner was closed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from offload.planner import anatomy as anatomy_mod  # noqa: E402
from offload.planner import plan as make_plan  # noqa: E402
from offload.planner.types import PlanRequest  # noqa: E402
from offload.runtime import config  # noqa: E402
from offload.runtime.runner.generation import Sampling  # noqa: E402
from offload.runtime.serving.planning import current_hardware  # noqa: E402
from offload.runtime.serving.process import RunnerProcess  # noqa: E402

MiB = 1 << 20


def gpu_used_mib() -> list[int]:
    """MiB in use on each GPU as nvidia-smi counts it ([] without one)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
        )
    except OSError:
        return []
    return [int(x) for x in out.stdout.split()] if out.returncode == 0 else []


def mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def settle(prev: list[int], timeout_s: float = 10.0) -> list[int]:
    """nvidia-smi's reading once it stops changing (the driver frees a context asynchronously)."""
    deadline = time.monotonic() + timeout_s
    cur = gpu_used_mib()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        nxt = gpu_used_mib()
        if nxt == cur and nxt != prev:
            return nxt
        cur = nxt
    return cur


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--gpu-memory")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    hw = current_hardware()
    budget = config.parse_bytes(args.gpu_memory) if args.gpu_memory else None
    plan = make_plan(
        anatomy_mod.read(args.model), hw, PlanRequest(n_ctx=4096, gpu_budget_bytes=budget)
    )
    runs: list[dict[str, Any]] = []
    for _ in range(args.repeats):
        gpu0, ram0 = gpu_used_mib(), mem_available_mib()
        proc = RunnerProcess.start("unload-check", args.model, plan)
        list(proc.generate(Sampling(temperature=0, num_predict=8), text="Hello there"))
        gpu1, ram1 = gpu_used_mib(), mem_available_mib()
        pid = proc.pid
        proc.close()
        gpu2 = settle(gpu1)
        time.sleep(1.0)
        ram2 = mem_available_mib()
        runs.append(
            {
                "runner_pid": pid,
                "gpu_before_mib": gpu0,
                "gpu_loaded_mib": gpu1,
                "gpu_after_mib": gpu2,
                "gpu_returned_within_mib": max(
                    (a - b for a, b in zip(gpu2, gpu0, strict=False)), default=None
                ),
                "ram_available_before_mib": ram0,
                "ram_available_loaded_mib": ram1,
                "ram_available_after_mib": ram2,
                "ram_held_while_loaded_mib": ram0 - ram1,
                "ram_not_returned_mib": ram0 - ram2,
            }
        )
        print(json.dumps(runs[-1]))
    out = {
        "model": str(args.model),
        "gpu_budget": args.gpu_memory,
        "plan": plan.to_dict(),
        "pinned_weights": not plan.use_mmap,
        "runs": runs,
        "target": "GPU memory after unload within 64 MiB of before",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
