"""Device-machine check of the planner: probe, memory model vs llama.cpp's CUDA buffers, and
predicted vs measured speed of planned placements against llama.cpp's --fit (GPU.md recipe).

Usage on the GPU machine (after .gpu/build.sh): python3 bench/planner_gpu_check.py probe|memory|bench OUT_DIR
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.synth from the checkout

from offload.planner import Placement, PlanRequest, anatomy, evaluate, plan  # noqa: E402
from offload.planner import hardware as hw_mod  # noqa: E402
from offload.planner.evaluate import memory_by_device  # noqa: E402
from tests import synth  # noqa: E402

GiB = 1 << 30
TOOLS = Path("/tmp/llama-tools")
MODELS = {
    "moe": (synth.qwen3_30b_a3b, "/tmp/moe.gguf"),
    "dense": (synth.mistral_7b, "/tmp/dense.gguf"),
}


def models() -> dict[str, object]:
    out = {}
    for k, (spec, path) in MODELS.items():
        if not Path(path).exists():
            synth.write_model(path, spec(), tokenizer=True)
        out[k] = anatomy.read(path)
    return out


def probe(out: Path) -> object:
    t = time.time()
    hw = hw_mod.current(Path("/tmp/hardware.json"))
    (out / "hardware.json").write_text(
        json.dumps({**hw.to_dict(), "probe_s": time.time() - t}, indent=1)
    )
    print(json.dumps(hw.to_dict(), indent=1))
    return hw


_BUF = re.compile(r"(\S+) (model|KV|compute) buffer size =\s+([\d.]+) MiB")


def memory(out: Path) -> None:
    hw = hw_mod.current(Path("/tmp/hardware.json"))
    ms = models()
    rows = []
    cases = [
        ("dense", 33, 512, 4096),
        ("dense", 20, 512, 4096),
        ("moe", 49, 512, 4096),
        ("moe", 49, 2048, 4096),
        ("moe", 30, 1024, 16384),
    ]
    for name, ngl, ub, ctx in cases:
        code = (
            f"import llama_cpp; m = llama_cpp.Llama({MODELS[name][1]!r}, n_gpu_layers={ngl}, n_ctx={ctx}, "
            f"n_batch={max(2048, ub)}, n_ubatch={ub}, flash_attn=True, n_threads=8, verbose=True)"
        )
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=180
        )
        logs = [r.stdout, r.stderr]
        real: dict[str, float] = {}
        for dev, kind, mib in _BUF.findall("".join(logs)):
            real[f"{dev} {kind}"] = real.get(f"{dev} {kind}", 0) + float(mib)
        pl = Placement(
            ngl, n_ctx=ctx, n_batch=max(2048, ub), n_ubatch=ub, flash_attn=True, threads=8
        )
        mem = memory_by_device(ms[name], hw, pl)
        pred = {
            f"{'CPU' if d < 0 else f'GPU{d}'} {k}": v / (1 << 20)
            for d, vals in mem.items()
            for k, v in zip(("weights", "kv", "compute", "extra"), vals, strict=True)
        }
        rows.append({"case": [name, ngl, ub, ctx], "llama": real, "predicted_MiB": pred})
        print(json.dumps(rows[-1]))
    (out / "memory.json").write_text(json.dumps(rows, indent=1))


def _bench(model: str, ngl: int, pats: tuple[str, ...], ub: int, threads: int) -> dict:
    cmd = [
        str(TOOLS / "llama-bench"),
        "-m",
        model,
        "-ngl",
        str(ngl),
        "-fa",
        "1",
        "-p",
        "2048",
        "-n",
        "64",
        "-ub",
        str(ub),
        "-b",
        str(max(2048, ub)),
        "-t",
        str(threads),
        "-r",
        "2",
        "-o",
        "json",
    ]
    if pats:
        cmd += ["-ot", ";".join(f"{p}=CPU" for p in pats)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    try:
        res = json.loads(r.stdout)
    except ValueError:
        return {"error": r.stderr[-800:]}
    out = {}
    for x in res:
        out["prompt_tps" if x["n_prompt"] else "decode_tps"] = x["avg_ts"]
    return out


def _fit(model: str, budget_mib: int, free_mib: int) -> tuple[int, tuple[str, ...]]:
    r = subprocess.run(
        [
            str(TOOLS / "llama-fit-params"),
            "-m",
            model,
            "-c",
            "4096",
            "-fa",
            "on",
            "-fitt",
            str(free_mib - budget_mib),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = r.stdout + r.stderr
    ngl = int(re.findall(r"-ngl (\d+)", text)[-1])
    ot = re.findall(r"-ot (\S+)", text)
    pats = tuple(p.rsplit("=", 1)[0] for p in ot[-1].split(",")) if ot else ()
    return ngl, pats


def bench(out: Path, which: list[str]) -> None:
    hw = hw_mod.current(Path("/tmp/hardware.json"))
    ms = models()
    free_mib = hw.gpus[0].vram_free_bytes >> 20
    rows = []
    for case in which:
        name, gib = case.split(":")
        a, path = ms[name], MODELS[name][1]
        threads = 8 if name == "moe" else 16
        req = PlanRequest(n_ctx=4096, gpu_budget_bytes=int(gib) * GiB, threads=threads)
        entries = {}
        for opt in ("decode", "balanced"):
            p = plan(a, hw, replace(req, optimize=opt))
            entries[opt] = (p.n_gpu_layers, p.cpu_tensor_patterns, p.n_ubatch, p)
        ngl, pats = _fit(path, int(gib) * 1024, free_mib)
        fit_plan = evaluate(
            a,
            hw,
            req,
            Placement(ngl, pats, n_ctx=4096, n_ubatch=512, threads=threads, flash_attn=True),
        )
        entries["fit"] = (ngl, pats, 512, fit_plan)
        for tag, (ngl, pats, ub, p) in entries.items():
            measured = _bench(path, ngl, pats, ub, threads)
            row = {
                "case": case,
                "plan": tag,
                "ngl": ngl,
                "patterns": list(pats),
                "ubatch": ub,
                "predicted": {
                    "decode_tps": p.predicted.decode_tps,
                    "prompt_tps": p.predicted.prompt_tps,
                },
                "gpu_total_MiB": p.devices[1].total_bytes >> 20,
                "measured": measured,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            (out / "bench.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    step, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    {
        "probe": lambda: probe(out),
        "memory": lambda: memory(out),
        "bench": lambda: bench(out, sys.argv[3:]),
    }[step]()
