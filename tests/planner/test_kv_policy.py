"""The KV cache stays f16 unless asked for, or unless the context cannot fit in f16."""

from __future__ import annotations

from pathlib import Path

import pytest

from offload.planner import Placement, PlanRequest, evaluate, plan
from offload.planner.hardware import load_profile
from offload.planner.types import CPUInfo, Hardware

GiB = 1 << 30
PROFILES = ["rtx4060-laptop", "rtx3060", "h100-sxm", "2x-rtx2060", "cpu-only-laptop"]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("budget_gib", [None, 3, 4, 6])
def test_the_kv_cache_is_f16_unless_asked(mistral, profile: str, budget_gib: float | None) -> None:
    hw = load_profile(profile)
    if budget_gib and any(g.vram_bytes < budget_gib * GiB for g in hw.gpus):
        pytest.skip("budget beyond the card")
    p = plan(mistral, hw, PlanRequest(gpu_budget_bytes=budget_gib and int(budget_gib * GiB)))
    assert p.kv_type == "f16"
    assert not any("KV cache in" in r for r in p.reasons)


def test_the_dense_shape_at_4_gib_keeps_f16_though_q8_0_would_predict_faster(mistral) -> None:
    # The case that quantized without being asked: q8_0 leaves room for more weights on the GPU.
    hw = load_profile("h100-sxm")
    req = PlanRequest(n_ctx=4096, gpu_budget_bytes=4 * GiB)
    f16 = plan(mistral, hw, req)
    q8 = plan(mistral, hw, PlanRequest(n_ctx=4096, gpu_budget_bytes=4 * GiB, kv_type="q8_0"))
    assert f16.kv_type == "f16" and q8.kv_type == "q8_0"
    assert q8.predicted.request_s < f16.predicted.request_s  # faster, and still not chosen


def test_a_requested_kv_type_is_used_and_the_reasons_say_so(qwen_moe) -> None:
    p = plan(qwen_moe, load_profile("rtx3060"), PlanRequest(kv_type="q4_0"))
    assert p.kv_type == "q4_0" and p.flash_attn
    assert "KV cache in q4_0 as requested." in p.reasons


def _small_box(ram_gib: float) -> Hardware:
    return Hardware("box", CPUInfo(cores=8, ram_bytes=int(ram_gib * GiB), mem_bandwidth_Bps=50e9))


def test_a_context_that_cannot_fit_in_f16_is_quantized_and_the_reasons_say_why(mistral) -> None:
    # 4.4 GiB of weights (and their repacked copies on the CPU); a 32k f16 KV cache is 4 GiB,
    # q8_0 about 2.1 GiB, q4_0 1.1 GiB. RAM budget: 90% of the RAM.
    req = PlanRequest(n_ctx=32768)
    box = _small_box(9.5 / 0.9)
    f16 = evaluate(mistral, box, req, Placement(0, n_ctx=32768, kv_type="f16", flash_attn=True))
    assert f16.devices[0].total_bytes > f16.devices[0].budget_bytes
    p = plan(mistral, box, req)
    assert p.kv_type == "q8_0" and p.n_ctx == 32768
    assert any("does not fit in f16" in r and "q8_0" in r for r in p.reasons)
    # Tighter still: q4_0.
    assert plan(mistral, _small_box(8.5 / 0.9), req).kv_type == "q4_0"


def test_quantizing_never_hides_a_model_that_cannot_fit_at_all(mistral, tmp_path: Path) -> None:
    from offload.planner import PlanInfeasible

    with pytest.raises(PlanInfeasible, match="GiB of RAM"):
        plan(mistral, _small_box(4), PlanRequest(n_ctx=32768))
