"""How many sequences side by side, and what they decode together."""

from __future__ import annotations

from dataclasses import replace

import pytest

from offload.planner import Placement, PlanRequest, plan, predict_aggregate
from offload.planner.hardware import load_profile
from offload.planner.memory import kv_bytes_per_layer
from offload.planner.objective import PARALLEL_MAX, PARALLEL_MAX_DECODE_LOSS
from offload.planner.types import CPUInfo, Hardware

GiB = 1 << 30


def _rule_holds(a, hw, req: PlanRequest) -> None:
    """The chosen N is the most (up to PARALLEL_MAX) whose single-stream decode is within the
    allowed loss of the one-sequence plan's; the plan's KV cache is n_ctx x N cells."""
    chosen = plan(a, hw, replace(req, n_parallel=None))
    one = plan(a, hw, replace(req, n_parallel=1))
    n = chosen.n_parallel
    assert 1 <= n <= PARALLEL_MAX
    assert chosen.predicted.decode_tps >= (1 - PARALLEL_MAX_DECODE_LOSS) * one.predicted.decode_tps
    for more in range(n + 1, PARALLEL_MAX + 1):
        try:
            bigger = plan(
                a, hw, replace(req, n_parallel=more, n_ctx=one.n_ctx, kv_type=one.kv_type)
            )
        except Exception:  # noqa: BLE001 - infeasible is a reason not to run more
            continue
        assert (
            bigger.predicted.decode_tps < (1 - PARALLEL_MAX_DECODE_LOSS) * one.predicted.decode_tps
        ), more
    kv = sum(
        kv_bytes_per_layer(a, chosen.n_ctx, n, chosen.kv_type, chosen.n_ubatch, chosen.swa_full)
    )
    assert sum(d.kv_bytes for d in chosen.devices) >= kv
    assert chosen.n_ctx_total == chosen.n_ctx * n


@pytest.mark.parametrize("budget_gib", [None, 6, 8, 12])
@pytest.mark.parametrize("profile", ["rtx3060", "2x-rtx4060ti-8gb", "cpu-only-laptop"])
def test_the_planner_runs_as_many_sequences_as_cost_at_most_5_percent_decode(
    mistral, profile: str, budget_gib: float | None
) -> None:
    hw = load_profile(profile)
    if budget_gib and any(g.vram_bytes < budget_gib * GiB for g in hw.gpus):
        pytest.skip("budget beyond the card")
    _rule_holds(mistral, hw, PlanRequest(gpu_budget_bytes=budget_gib and budget_gib * GiB))


@pytest.mark.parametrize("budget_gib", [8, 12, 16])
def test_on_a_tight_moe_budget_more_sequences_must_earn_their_kv_cache(
    qwen_moe, budget_gib: int
) -> None:
    req = PlanRequest(gpu_budget_bytes=budget_gib * GiB, max_ctx=16384)
    _rule_holds(qwen_moe, load_profile("h100-sxm"), req)


def test_one_sequence_when_a_second_costs_more_than_5_percent(mistral) -> None:
    # A GPU that just holds the model with one 32k context: a second one pushes layers off.
    hw = load_profile("h100-sxm")
    req = PlanRequest(n_ctx=32768, gpu_budget_bytes=int(9.7 * GiB), n_parallel=None)
    p = plan(mistral, hw, req)
    assert p.n_parallel == 1
    assert any(r.startswith("One sequence at a time") for r in p.reasons)


def test_a_given_number_of_sequences_is_kept_and_its_aggregate_shown(mistral) -> None:
    p = plan(mistral, load_profile("rtx3060"), PlanRequest(n_parallel=3))
    assert p.n_parallel == 3 and p.n_ctx_total == 3 * p.n_ctx
    assert p.predicted.aggregate_decode_tps == pytest.approx(
        predict_aggregate(
            mistral, load_profile("rtx3060"), p.placement, 3, context_tokens=1024 + 128
        )
    )
    assert any("3 sequences side by side as requested" in r for r in p.reasons)
    with pytest.raises(ValueError, match="n_parallel"):
        plan(mistral, load_profile("rtx3060"), PlanRequest(n_parallel=0))


def _h200() -> Hardware:
    hw = load_profile("h100-sxm")
    return replace(hw, gpus=(replace(hw.gpus[0], vram_bytes=141 * GiB, mem_bandwidth_Bps=4.8e12),))


@pytest.mark.parametrize("streams", [1, 2, 4, 8, 16])
def test_one_stream_of_the_aggregate_is_the_single_stream_decode(
    mistral, qwen_moe, streams: int
) -> None:
    from offload.planner import predict

    for a, hw, pl in (
        (mistral, _h200(), Placement(33, flash_attn=True)),
        (qwen_moe, load_profile("rtx3060"), Placement(49, (r"blk\.(0|1|2|3)\.ffn_.*_exps",))),
        (mistral, load_profile("cpu-only-laptop"), Placement(0)),
    ):
        single = predict(a, hw, pl, prompt_tokens=256).decode_tps
        one = predict_aggregate(a, hw, pl, 1, context_tokens=256)
        agg = predict_aggregate(a, hw, pl, streams, context_tokens=256)
        assert one == pytest.approx(single)
        # More streams never decode less in aggregate, nor more than that many single streams.
        assert one * (1 - 1e-9) <= agg <= streams * single * (1 + 1e-9)
        assert predict_aggregate(a, hw, pl, streams * 2, context_tokens=256) >= agg * (1 - 1e-9)


def test_weights_are_read_once_a_step_so_a_memory_bound_gpu_gains_most(mistral) -> None:
    # The dense 7B shape fully on an H200: llama.cpp's batched bench measured 265 -> 981 t/s at 8.
    pl = Placement(mistral.n_layers + 1, flash_attn=True)
    hw = _h200()
    gain8 = predict_aggregate(mistral, hw, pl, 8, context_tokens=192) / predict_aggregate(
        mistral, hw, pl, 1, context_tokens=192
    )
    assert 3.0 <= gain8 <= 4.5
    # Twice the streams, less than twice the gain: compute and KV reads grow with them.
    gain16 = predict_aggregate(mistral, hw, pl, 16, context_tokens=192) / predict_aggregate(
        mistral, hw, pl, 1, context_tokens=192
    )
    assert gain8 < gain16 < 2 * gain8


def test_few_cpu_cores_gain_from_batching_as_llama_cpps_batched_bench_does(gemma_path) -> None:
    from offload.planner import anatomy

    # Gemma 3 270M on a 2-core EPYC, llama-batched-bench: 44 t/s, 106 at four, 140 at eight.
    a = anatomy.read(gemma_path)
    box = Hardware("2-core", CPUInfo(cores=2, ram_bytes=8 * GiB, mem_bandwidth_Bps=50e9))
    pl = Placement(0, threads=2)
    one = predict_aggregate(a, box, pl, 1, context_tokens=192)
    assert predict_aggregate(a, box, pl, 4, context_tokens=192) / one == pytest.approx(
        106 / 44, rel=0.25
    )
    assert predict_aggregate(a, box, pl, 8, context_tokens=192) / one == pytest.approx(
        140 / 44, rel=0.25
    )


def test_moe_streams_read_more_experts_so_cpu_resident_experts_gain_less(qwen_moe) -> None:
    hw = load_profile("rtx3060")
    on_gpu = Placement(49)
    experts_cpu = Placement(49, (r"blk\.\d+\.ffn_(up|down|gate)_exps",))
    g = {
        pl: predict_aggregate(qwen_moe, hw, pl, 4) / predict_aggregate(qwen_moe, hw, pl, 1)
        for pl in (on_gpu, experts_cpu)
    }
    assert g[experts_cpu] < g[on_gpu]
