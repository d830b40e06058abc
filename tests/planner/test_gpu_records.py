"""The memory model against what llama.cpp allocated on the H100, run by run (bench/results).

Every placement the GPU sweep measured is re-evaluated with the current model on the hardware the
run recorded: the GPU total the planner budgets must cover llama.cpp's CUDA buffers and what the
process grew by at load, weights and KV cache must match them (the synthetic models are rebuilt
header-only, as sparse files), and the CUDA context the budget now includes must agree with what
llama.cpp's own fit, whose target is the whole process, left free.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from offload.planner import anatomy, evaluate
from offload.planner.memory import CUDA_CONTEXT_BYTES
from offload.planner.types import Anatomy, Hardware, Placement, Plan, PlanRequest
from tests import synth

RESULTS = Path(__file__).parents[2] / "bench" / "results"
FILES = sorted(RESULTS.glob("**/*gib.json"))
GiB = 1 << 30


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Anatomy]:
    d = tmp_path_factory.mktemp("records")
    return {k: anatomy.read(synth.write_model(d / f"{k}.gguf", k)) for k in ("dense", "moe")}


def _runs() -> list[tuple[str, dict]]:
    out = []
    for f in FILES:
        d = json.loads(f.read_text())
        for r in d["runs"]:
            if (r.get("measured_bytes") or {}).get("CUDA0"):
                out.append(
                    (f.name, {**r, "_kind": d["summary"]["model_kind"], "_hw": d["hardware"]})
                )
    return out


RUNS = _runs()


def test_there_are_recorded_gpu_runs() -> None:
    assert len(RUNS) >= 40


def _evaluated(models: dict[str, Anatomy], run: dict) -> Plan:
    a = models[run["_kind"]]
    names = {f.name for f in dataclasses.fields(Placement)}
    pl = {
        **run["placement"],
        "cpu_tensor_patterns": tuple(run["cpu_tensor_patterns"]),
        "pinned_weights": run["placement"].get("use_mmap") is False,
    }
    if pl["n_gpu_layers"] < 0:  # llama-fit-params' "all"
        pl["n_gpu_layers"] = a.n_layers + 1
    req = PlanRequest(
        n_ctx=run["placement"]["n_ctx"], gpu_budget_bytes=int(run["budget_gib"] * GiB)
    )
    return evaluate(
        a,
        Hardware.from_dict(run["_hw"]),
        req,
        Placement(**{k: v for k, v in pl.items() if k in names}),
    )


@pytest.mark.parametrize("name,run", RUNS, ids=[f"{n}:{r['label']}" for n, r in RUNS])
def test_planned_gpu_memory_covers_what_llama_cpp_allocated(
    models: dict[str, Anatomy], name: str, run: dict
) -> None:
    gpu = next(d for d in _evaluated(models, run).devices if d.kind == "GPU")
    measured = run["measured_bytes"]["CUDA0"]
    buffers = gpu.weights_bytes + gpu.kv_bytes + gpu.compute_bytes
    assert buffers >= sum(measured.values())
    assert gpu.weights_bytes == pytest.approx(measured["weights"], rel=0.006)
    assert gpu.kv_bytes == pytest.approx(measured["kv"], rel=0.001)
    # What the process grew by at load beyond llama.cpp's buffers (the context already held)
    # fits in the compute allowance; the context itself is budgeted apart.
    assert buffers >= run["nvml_delta_bytes"]
    assert gpu.total_bytes == buffers + CUDA_CONTEXT_BYTES


FIT_RUNS = [(n, r) for n, r in RUNS if r["label"] in ("fit", "fit_pinned")]


def test_there_are_recorded_fit_runs() -> None:
    assert len(FIT_RUNS) >= 10


@pytest.mark.parametrize("name,run", FIT_RUNS, ids=[f"{n}:{r['label']}" for n, r in FIT_RUNS])
def test_the_cuda_context_budgeted_fits_beside_llama_cpps_own_fit(name: str, run: dict) -> None:
    """llama.cpp's fit keeps the whole process, its CUDA context included, under the budget: it
    left at least as much beside its buffers as the planner now budgets for the context."""
    buffers = sum(run["measured_bytes"]["CUDA0"].values())
    assert buffers + CUDA_CONTEXT_BYTES <= run["budget_gib"] * GiB


NOMINAL = [(n, r) for n, r in RUNS if r["label"] in ("planner", "planner_decode")]


def test_most_recorded_plans_left_no_room_for_a_cuda_context() -> None:
    tight = [
        r
        for _, r in NOMINAL
        if sum(r["measured_bytes"]["CUDA0"].values()) + CUDA_CONTEXT_BYTES > r["budget_gib"] * GiB
    ]
    assert len(tight) >= len(NOMINAL) * 2 // 3


@pytest.mark.parametrize("name,run", NOMINAL, ids=[f"{n}:{r['label']}" for n, r in NOMINAL])
def test_plans_that_left_no_room_for_the_cuda_context_are_over_budget_now(
    models: dict[str, Anatomy], name: str, run: dict
) -> None:
    """The sweep's plans budgeted llama.cpp's buffers only; on a real card of that size the ones
    whose buffers left less than a CUDA context free would not fit. Today's accounting says so."""
    measured = sum(run["measured_bytes"]["CUDA0"].values())
    gpu = next(d for d in _evaluated(models, run).devices if d.kind == "GPU")
    if measured + CUDA_CONTEXT_BYTES > gpu.budget_bytes:
        assert gpu.total_bytes > gpu.budget_bytes
