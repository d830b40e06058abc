"""A Plan holds its Placement: one place for each knob, the published flat JSON kept both ways."""

from __future__ import annotations

import dataclasses
import json

import pytest

from offload.planner import PlanRequest, plan
from offload.planner.hardware import load_profile
from offload.planner.types import DevicePlan, Placement, Plan, Prediction, Workload

# A plan as `offload plan --json` and the calibration store wrote it before the placement was
# nested (knobs flat, "balanced" mode, no workload or pinned_weights).
OLD_FLAT = {
    "devices": [
        {
            "name": "CPU",
            "kind": "CPU",
            "index": 0,
            "weights_bytes": 5,
            "kv_bytes": 0,
            "compute_bytes": 1,
            "overhead_bytes": 0,
            "budget_bytes": 100,
            "total_bytes": 6,
        },
        {
            "name": "GPU",
            "kind": "GPU",
            "index": 0,
            "weights_bytes": 50,
            "kv_bytes": 4,
            "compute_bytes": 3,
            "overhead_bytes": 1,
            "budget_bytes": 60,
            "total_bytes": 58,
        },
    ],
    "n_gpu_layers": 49,
    "n_ctx": 4096,
    "n_batch": 2048,
    "n_ubatch": 1024,
    "threads": 16,
    "threads_batch": 16,
    "predicted": {"decode_tps": 48.7, "prompt_tps": 3007.0, "ttft_s": 0.68},
    "reasons": ["why"],
    "cpu_tensor_patterns": [r"blk\.(0|1)\.ffn_(up|down|gate)_exps\.weight"],
    "tensor_split": [],
    "split_mode": "layer",
    "main_gpu": 0,
    "n_parallel": 1,
    "kv_type": "f16",
    "flash_attn": True,
    "offload_kqv": True,
    "op_offload": True,
    "use_mmap": False,
    "use_mlock": False,
    "optimize": "balanced",
    "model_path": "/m.gguf",
    "hardware_fingerprint": "fp",
    "n_ctx_total": 4096,
    "swa_full": True,
}


def test_old_flat_plan_json_still_loads_with_its_knobs_in_the_placement() -> None:
    p = Plan.from_dict(OLD_FLAT)
    assert p.placement.n_gpu_layers == 49 and p.n_gpu_layers == 49 and p.n_ubatch == 1024
    assert p.cpu_tensor_patterns == (r"blk\.(0|1)\.ffn_(up|down|gate)_exps\.weight",)
    # The file was read into memory with a GPU present: llama.cpp pinned the CPU weights.
    assert p.placement.pinned_weights and not p.use_mmap
    assert p.predicted.decode_tps == 48.7 and p.workload == Workload()


def test_plan_json_is_flat_and_round_trips(mistral) -> None:
    p = plan(mistral, load_profile("rtx3060"), PlanRequest(n_parallel=None))
    d = json.loads(json.dumps(p.to_dict()))
    assert "placement" not in d
    for k in (f.name for f in dataclasses.fields(Placement)):
        assert k in d, k
    assert d["n_ctx_total"] == p.n_ctx * p.n_parallel and isinstance(d["use_mmap"], bool)
    assert set(d["workload"]) == {"prompt_tokens", "answer_tokens", "source", "requests"}
    assert Plan.from_dict(d) == p


def test_tensors_moved_to_a_gpu_round_trip_and_bad_entries_are_refused(mistral) -> None:
    p = plan(mistral, load_profile("rtx3060"), PlanRequest())
    moved = p.with_knobs(gpu_tensor_patterns=((r"blk\.3\.ffn_up\.weight", 1),))
    d = json.loads(json.dumps(moved.to_dict()))
    assert d["gpu_tensor_patterns"] == [[r"blk\.3\.ffn_up\.weight", 1]]
    assert Plan.from_dict(d) == moved
    for bad in ([["x"]], [["x", "1"]], [["x", -1]], [["x", True]], ["x"], [[1, 1]]):
        with pytest.raises(ValueError, match="gpu_tensor_patterns"):
            Plan.from_dict({**d, "gpu_tensor_patterns": bad})


def test_knobs_read_through_and_replace_by_name_as_before() -> None:
    pred = Prediction(10.0, 100.0, 1.0)
    dev = (DevicePlan("CPU", "CPU", 0, 1, 1, 1, 0, 10),)
    # Built the old way, with the knobs as keywords.
    p = Plan(
        devices=dev,
        n_gpu_layers=3,
        n_ctx=1024,
        n_batch=512,
        n_ubatch=512,
        threads=2,
        threads_batch=2,
        predicted=pred,
        swa_full=False,
    )
    assert p.placement == Placement(
        3, n_ctx=1024, n_batch=512, threads=2, threads_batch=2, swa_full=False, use_mmap=True
    )
    # dataclasses.replace with a knob's name changes the placement (what the loader does on OOM).
    q = dataclasses.replace(p, n_gpu_layers=1, n_ctx=512)
    assert (q.n_gpu_layers, q.n_ctx, q.swa_full, q.n_ctx_total) == (1, 512, False, 512)
    assert q.placement.n_batch == 512 and q.predicted is pred
    with pytest.raises(TypeError, match="nonsense"):
        Plan(devices=dev, predicted=pred, nonsense=1)


def test_swa_full_survives_a_calibration_round_trip(mistral) -> None:
    # The placement a calibration observation re-predicts is the plan's own, knobs and all.
    p = plan(mistral, load_profile("rtx3060"), PlanRequest(n_ctx=4096))
    p = dataclasses.replace(p, swa_full=False)
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))).placement == p.placement
