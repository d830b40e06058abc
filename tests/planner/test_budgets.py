"""GPU budgets as nvidia-smi counts them: the CUDA context is part of what a plan places."""

from __future__ import annotations

from dataclasses import replace

import pytest

from offload.planner import BudgetTooSmall, GPUBudgetError, PlanRequest, plan
from offload.planner.hardware import load_profile
from offload.planner.memory import CUDA_CONTEXT_BYTES, MOE_KERNELS_BYTES, gpu_overhead_bytes

GiB = 1 << 30
MiB = 1 << 20


@pytest.mark.parametrize("budget_gib", [3, 4, 6, 8, 12])
@pytest.mark.parametrize("model", ["mistral", "qwen_moe"])
def test_every_gpu_byte_a_plan_places_counts_against_the_budget(
    request, model: str, budget_gib: float
) -> None:
    a = request.getfixturevalue(model)
    p = plan(a, load_profile("rtx3060"), PlanRequest(gpu_budget_bytes=budget_gib * GiB))
    gpu = p.devices[1]
    extra = MOE_KERNELS_BYTES if model == "qwen_moe" else 0
    assert gpu.overhead_bytes == gpu_overhead_bytes(a) == CUDA_CONTEXT_BYTES + extra
    assert (
        gpu.weights_bytes + gpu.kv_bytes + gpu.compute_bytes + gpu.overhead_bytes == gpu.total_bytes
    )
    assert gpu.budget_bytes == budget_gib * GiB and gpu.total_bytes <= gpu.budget_bytes
    # And the budget is used: within a layer's worth of experts or dense FFN of full.
    assert (
        gpu.total_bytes > gpu.budget_bytes - 600 * MiB
        or p.n_gpu_layers > a.n_layers
        and not p.cpu_tensor_patterns
    )
    assert any("nvidia-smi" in r and "CUDA context" in r for r in p.reasons)


def test_without_a_budget_the_plan_keeps_the_margin_below_free_memory(mistral) -> None:
    hw = load_profile("rtx3060")
    hw = replace(hw, gpus=(replace(hw.gpus[0], vram_free_bytes=5 * GiB),))
    p = plan(mistral, hw, PlanRequest())
    gpu = p.devices[1]
    assert gpu.budget_bytes == 5 * GiB - PlanRequest().gpu_margin_bytes
    assert gpu.overhead_bytes == CUDA_CONTEXT_BYTES and gpu.total_bytes <= gpu.budget_bytes


def test_a_budget_beyond_free_memory_plans_for_what_is_free(mistral) -> None:
    hw = load_profile("rtx3060")
    hw = replace(hw, gpus=(replace(hw.gpus[0], vram_free_bytes=3 * GiB),))
    p = plan(mistral, hw, PlanRequest(gpu_budget_bytes=10 * GiB))
    assert p.devices[1].budget_bytes == 3 * GiB and p.devices[1].total_bytes <= 3 * GiB


def test_a_budget_larger_than_the_card_is_an_error_naming_both(mistral) -> None:
    with pytest.raises(GPUBudgetError, match=r"16\.00 GiB.*12\.00 GiB") as e:
        plan(mistral, load_profile("rtx3060"), PlanRequest(gpu_budget_bytes=16 * GiB))
    assert e.value.http_status == 400


def test_a_budget_below_the_smallest_gpu_plan_is_an_error_naming_both(mistral) -> None:
    with pytest.raises(
        BudgetTooSmall, match=r"budget of 400 MiB.*smallest plan that uses the GPU, (\d+) MiB"
    ) as e:
        plan(mistral, load_profile("rtx3060"), PlanRequest(gpu_budget_bytes=400 * MiB))
    least = int(e.value.reason.split("GPU, ")[1].split(" MiB")[0])
    # That smallest plan is what it says: with that budget a plan exists, a MiB less it does not.
    assert (
        plan(mistral, load_profile("rtx3060"), PlanRequest(gpu_budget_bytes=least * MiB + MiB))
        .devices[1]
        .total_bytes
    )
    with pytest.raises(BudgetTooSmall):
        plan(mistral, load_profile("rtx3060"), PlanRequest(gpu_budget_bytes=least * MiB - MiB))
    assert least * MiB > CUDA_CONTEXT_BYTES


def test_a_zero_budget_keeps_the_gpu_out_of_the_plan(mistral) -> None:
    p = plan(mistral, load_profile("rtx3060"), PlanRequest(gpu_budget_bytes=0))
    assert p.n_gpu_layers == 0 and not p.op_offload
    assert p.devices[1].total_bytes == 0


def test_one_budget_per_gpu_must_match_the_gpus(mistral) -> None:
    with pytest.raises(GPUBudgetError, match="3 GPU memory budgets for 2"):
        plan(mistral, load_profile("2x-rtx3060"), PlanRequest(gpu_budget_bytes=(GiB, GiB, GiB)))
    p = plan(mistral, load_profile("2x-rtx3060"), PlanRequest(gpu_budget_bytes=(3 * GiB, 2 * GiB)))
    assert [d.budget_bytes for d in p.devices[1:]] == [3 * GiB, 2 * GiB]
    assert all(d.total_bytes <= d.budget_bytes for d in p.devices)
