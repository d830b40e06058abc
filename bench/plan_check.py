"""Device check of the planner's budgets, workload plans, two-GPU split and parallel sequences.

Each plan runs through offload's own executor in a child process while nvidia-smi reports that
process's memory on every GPU (``--query-compute-apps``, about every 100 ms): its peak, CUDA context
and pool included, is what a budget must cover. Usage on the GPU machine (after .gpu/build.sh, with
``PYTHONPATH=/tmp/site:$PWD/.gpu/src``):

    python3 bench/plan_check.py budgets  --model moe   --budgets 8,12,16 --out $OUT
    python3 bench/plan_check.py budgets  --model dense --budgets 3,4     --out $OUT
    python3 bench/plan_check.py two-gpus --model moe   --budgets 6,8     --out $OUT   # two GPUs
    python3 bench/plan_check.py parallel --model dense --streams 1,2,4,8,16 --out $OUT

``budgets`` and ``two-gpus`` plan every mode (workload, decode, prompt) with the planner choosing
the number of sequences, and measure a request of 1024 prompt + 256 answer tokens plus the chosen
number of streams decoding together; ``parallel`` puts the model wholly on the GPU and measures
aggregate decode at each stream count beside ``predict_aggregate``. Results:
``$OUT/plan-check-<what>-<model>.json``, written after every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import synth_models  # noqa: E402

from offload.planner import Plan, PlanRequest, Workload, anatomy, plan, predict_aggregate  # noqa: E402
from offload.planner import hardware as hw_mod  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
PROMPT, ANSWER = 1024, 256


def _gpu_index_by_uuid() -> dict[str, int]:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {u.strip(): int(i) for i, u in (line.split(",") for line in out.strip().splitlines())}


def _process_mib(pid: int, gpus: dict[str, int]) -> dict[int, int]:
    """MiB each GPU holds for ``pid`` and its descendants (the runner process that loads the model)."""
    import psutil

    try:
        family = {str(pid), *(str(c.pid) for c in psutil.Process(pid).children(recursive=True))}
    except psutil.Error:
        family = {str(pid)}
    out = subprocess.run(
        [
            "nvidia-smi",
            "--query-compute-apps=pid,gpu_uuid,used_memory",
            "--format=csv,noheader,nounits",
        ],
        capture_output=True,
        text=True,
    ).stdout
    used: dict[int, int] = {}
    for line in out.strip().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 3 and parts[0] in family and parts[2].isdigit():
            g = gpus.get(parts[1], -1)
            used[g] = used.get(g, 0) + int(parts[2])
    return used


def measure(
    model: Path,
    p: Plan,
    streams: tuple[int, ...],
    out_dir: Path,
    timeout_s: float,
    visible: str | None = None,
) -> dict[str, Any]:
    """Run ``p`` in a child process (seeing the GPUs ``visible`` names, all by default); its
    measured speeds and nvidia-smi peak per GPU (MiB)."""
    plan_file, result_file = out_dir / "plan.json", out_dir / "result.json"
    plan_file.write_text(json.dumps(p.to_dict()))
    result_file.unlink(missing_ok=True)
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "_child",
            str(model),
            str(plan_file),
            str(result_file),
            ",".join(map(str, streams)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **({"CUDA_VISIBLE_DEVICES": visible} if visible else {})},
    )
    gpus, peak = _gpu_index_by_uuid(), {}
    t0 = time.monotonic()
    while child.poll() is None and time.monotonic() - t0 < timeout_s:
        for g, mib in _process_mib(child.pid, gpus).items():
            peak[g] = max(peak.get(g, 0), mib)
        time.sleep(0.1)
    if child.poll() is None:
        child.kill()
    log = child.communicate()[0]
    res: dict[str, Any] = (
        json.loads(result_file.read_text()) if result_file.exists() else {"error": log[-3000:]}
    )
    res["nvidia_smi_peak_mib"] = {str(g): v for g, v in sorted(peak.items())}
    return res


def _child(model: str, plan_file: str, result_file: str, streams: str) -> None:
    from offload.runtime.serving.benchmark import measure_plan

    p = Plan.from_dict(json.loads(Path(plan_file).read_text()))
    r = measure_plan(
        model,
        p,
        prompt_tokens=PROMPT,
        gen_tokens=ANSWER,
        parallel=tuple(int(x) for x in streams.split(",")),
        record=False,
    )
    Path(result_file).write_text(json.dumps(r))


def _row(label: str, p: Plan, hw: Any, res: dict[str, Any]) -> dict[str, Any]:
    meas = res.get("measured") or {}
    row: dict[str, Any] = {
        "label": label,
        "plan": p.to_dict(),
        "predicted": p.to_dict()["predicted"],
        "measured": meas,
        "nvidia_smi_peak_mib": res.get("nvidia_smi_peak_mib"),
        "measured_bytes": res.get("measured_bytes"),
        "error": res.get("error"),
    }
    if meas.get("prompt_tps") and meas.get("decode_tps"):
        row["measured_request_s"] = PROMPT / meas["prompt_tps"] + ANSWER / meas["decode_tps"]
    checks = []
    for d in p.devices:
        if d.kind != "GPU":
            continue
        peak = (res.get("nvidia_smi_peak_mib") or {}).get(str(d.index))
        llama = (res.get("measured_bytes") or {}).get(f"CUDA{d.index}", {})
        bufs = sum(llama.values())
        checks.append(
            {
                "gpu": d.index,
                "budget_mib": d.budget_bytes / MiB,
                "planned_mib": d.total_bytes / MiB,
                # Layers landed where the plan put them when these agree (weights to 0.6%, KV exactly).
                "planned_weights_mib": d.weights_bytes / MiB,
                "llama_weights_mib": llama.get("weights", 0) / MiB,
                "planned_kv_mib": d.kv_bytes / MiB,
                "llama_kv_mib": llama.get("kv", 0) / MiB,
                "peak_mib": peak,
                "over_budget": peak is not None and peak * MiB > d.budget_bytes,
                "llama_buffers_mib": bufs / MiB,
                # What the process holds beyond llama.cpp's buffers: what the plan keeps for the
                # CUDA context and kernels (overhead_bytes) stands for.
                "beyond_buffers_mib": (peak - bufs / MiB) if peak is not None else None,
                "overhead_budgeted_mib": d.overhead_bytes / MiB,
            }
        )
    row["gpus"] = checks
    return row


def main() -> int:
    """Run the chosen check; one JSON file of rows."""
    if sys.argv[1:2] == ["_child"]:
        _child(*sys.argv[2:6])
        return 0
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("what", choices=["budgets", "two-gpus", "parallel"])
    ap.add_argument("--model", choices=sorted(synth_models.SPECS), default="moe")
    ap.add_argument("--budgets", default="8", help="GiB per GPU, comma separated")
    ap.add_argument("--modes", default="workload,decode,prompt")
    ap.add_argument("--streams", default="1,2,4,8,16")
    ap.add_argument("--out", type=Path, default=Path("/tmp/out"))
    ap.add_argument("--time-budget-s", type=float, default=500)
    args = ap.parse_args()
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    model = Path(f"/tmp/synth-{args.model}.gguf")
    if not model.exists():
        synth_models.write_model(model, args.model)
    a = anatomy.read(model)
    hw = hw_mod.current(Path("/tmp/hardware.json"))
    if args.what == "two-gpus" and len(hw.gpus) < 2:
        print("two-gpus needs two GPUs", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    out_file = args.out / f"plan-check-{args.what}-{args.model}.json"
    work = Workload(PROMPT, ANSWER, source="requested")

    def left() -> float:
        return args.time_budget_s - (time.monotonic() - start)

    if args.what == "parallel":
        streams = tuple(int(x) for x in args.streams.split(","))
        hw = dataclasses.replace(hw, gpus=hw.gpus[:1])
        p = plan(
            a, hw, PlanRequest(n_ctx=PROMPT + ANSWER + 64, n_parallel=max(streams), workload=work)
        )
        res = measure(model, p, streams, args.out, max(left() - 10, 30), visible="0")
        row = _row("parallel", p, hw, res)
        row["predicted_parallel"] = {
            str(n): predict_aggregate(a, hw, p.placement, n, context_tokens=64 + ANSWER // 2)
            for n in streams
        }
        rows.append(row)
    else:
        gpus = len(hw.gpus) if args.what == "two-gpus" else 1
        for b in (float(x) for x in args.budgets.split(",")):
            for mode in args.modes.split(","):
                if left() < 60:
                    break
                budget = tuple([int(b * GiB)] * gpus) if gpus > 1 else int(b * GiB)
                # One GPU: the child sees only the first, or llama.cpp would spread layers over all.
                hw_here = hw if gpus > 1 else dataclasses.replace(hw, gpus=hw.gpus[:1])
                p = plan(
                    a,
                    hw_here,
                    PlanRequest(
                        gpu_budget_bytes=budget, optimize=mode, n_parallel=None, workload=work
                    ),
                )
                res = measure(
                    model,
                    p,
                    tuple(sorted({1, p.n_parallel})),
                    args.out,
                    left() - 20,
                    visible=None if gpus > 1 else "0",
                )
                rows.append(
                    {"budget_gib": b, "mode": mode, **_row(f"{mode}@{b:g}GiB", p, hw_here, res)}
                )
                out_file.write_text(json.dumps({"hardware": hw.to_dict(), "rows": rows}, indent=1))
                print(
                    json.dumps(
                        {k: rows[-1].get(k) for k in ("label", "gpus", "measured_request_s")}
                    )
                )
    out_file.write_text(json.dumps({"hardware": hw.to_dict(), "rows": rows}, indent=1))
    over = [r["label"] for r in rows for g in r.get("gpus", []) if g["over_budget"]]
    print(f"{len(rows)} runs, over budget: {over or 'none'}; wrote {out_file}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
