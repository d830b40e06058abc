"""The memory model against what llama.cpp allocated on the H100, run by run (bench/results).

Every placement the GPU sweep measured is re-evaluated with the current model on the hardware the
run recorded: the GPU total the planner budgets must cover llama.cpp's CUDA buffers, and weights
and KV cache must match them (the synthetic models are rebuilt header-only, as sparse files).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from offload.planner import anatomy, evaluate
from offload.planner.types import Anatomy, Hardware, Placement, PlanRequest

RESULTS = Path(__file__).parents[2] / "bench" / "results"
FILES = sorted(RESULTS.glob("**/*gib.json"))
GiB = 1 << 30


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Anatomy]:
    path = Path(__file__).parents[2] / "bench" / "synth_models.py"
    spec = importlib.util.spec_from_file_location("synth_models", path)
    sm = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["synth_models"] = sm
    spec.loader.exec_module(sm)  # type: ignore[union-attr]
    d = tmp_path_factory.mktemp("records")
    return {k: anatomy.read(sm.write_model(d / f"{k}.gguf", k, header_only=True)) for k in ("dense", "moe")}


def _runs() -> list[tuple[str, dict]]:
    out = []
    for f in FILES:
        d = json.loads(f.read_text())
        for r in d["runs"]:
            if (r.get("measured_bytes") or {}).get("CUDA0"):
                out.append((f.name, {**r, "_kind": d["summary"]["model_kind"], "_hw": d["hardware"]}))
    return out


RUNS = _runs()


def test_there_are_recorded_gpu_runs() -> None:
    assert len(RUNS) >= 40


@pytest.mark.parametrize("name,run", RUNS, ids=[f"{n}:{r['label']}" for n, r in RUNS])
def test_planned_gpu_memory_covers_what_llama_cpp_allocated(models: dict[str, Anatomy], name: str, run: dict) -> None:
    a = models[run["_kind"]]
    names = {f.name for f in dataclasses.fields(Placement)}
    pl = {**run["placement"], "cpu_tensor_patterns": tuple(run["cpu_tensor_patterns"]),
          "pinned_weights": run["placement"].get("use_mmap") is False}
    if pl["n_gpu_layers"] < 0:  # llama-fit-params' "all"
        pl["n_gpu_layers"] = a.n_layers + 1
    req = PlanRequest(n_ctx=run["placement"]["n_ctx"], gpu_budget_bytes=int(run["budget_gib"] * GiB))
    plan = evaluate(a, Hardware.from_dict(run["_hw"]), req, Placement(**{k: v for k, v in pl.items() if k in names}))
    gpu = next(d for d in plan.devices if d.kind == "GPU")
    measured = run["measured_bytes"]["CUDA0"]
    assert gpu.weights_bytes + gpu.kv_bytes + gpu.compute_bytes >= sum(measured.values())
    assert gpu.weights_bytes == pytest.approx(measured["weights"], rel=0.006)
    assert gpu.kv_bytes == pytest.approx(measured["kv"], rel=0.001)
