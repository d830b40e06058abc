"""The default plan minimizes the predicted time of the user's typical request."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload.planner import PlanRequest, Workload, WorkloadError, plan
from offload.planner.hardware import load_profile
from offload.planner.objective import TIE

GiB = 1 << 30


@pytest.mark.parametrize("bad", [0, -1, 1 << 23, 2.5, True, "1024"])
def test_a_workload_of_zero_or_absurd_lengths_is_a_clear_error(bad) -> None:
    with pytest.raises(WorkloadError, match="whole number from 1 to") as e:
        Workload(bad, 256)
    assert e.value.http_status == 400
    with pytest.raises(WorkloadError, match="answer tokens"):
        Workload(1024, bad)


def test_the_default_workload_is_1024_prompt_and_256_answer_tokens(mistral) -> None:
    p = plan(mistral, load_profile("rtx3060"))
    assert p.workload == Workload(1024, 256, "default") and p.optimize == "workload"
    pr = p.predicted
    assert pr.request_s == pytest.approx(1024 / pr.prompt_tps + 256 / pr.decode_tps)


_settings = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_settings
@given(
    prompt=st.integers(16, 16384),
    answer=st.integers(1, 4096),
    budget=st.sampled_from([6, 8, 12, 16]),
    profile=st.sampled_from(["h100-sxm", "rtx3090", "rtx4090"]),
)
def test_no_other_mode_predicts_a_faster_request_for_the_workload(
    qwen_moe, prompt, answer, budget, profile
) -> None:
    hw = load_profile(profile)
    req = PlanRequest(
        n_ctx=16384 + 4096, gpu_budget_bytes=budget * GiB, workload=Workload(prompt, answer)
    )
    best = plan(qwen_moe, hw, req)
    for mode in ("decode", "prompt"):
        other = plan(qwen_moe, hw, replace(req, optimize=mode))
        assert best.predicted.request_s <= (1 + TIE) * other.predicted.request_s, mode


def test_the_reasons_state_the_request_time_and_the_runner_up_trade(qwen_moe) -> None:
    p = plan(qwen_moe, load_profile("h100-sxm"), PlanRequest(gpu_budget_bytes=8 * GiB))
    text = "\n".join(p.reasons)
    m = re.search(
        r"A request of 1024 prompt \+ 256 answer tokens \(.*default.*\) is predicted at ([\d.]+) s",
        text,
    )
    assert m and float(m.group(1)) == pytest.approx(p.predicted.request_s, abs=0.01)
    runner = re.search(
        r"Runner-up: .*: ([\d.]+) s a request \(\+[\d.]+%\), decode [\d.]+ t/s \([+-][\d.]+%\), "
        r"prompt [\d.]+ t/s \([+-][\d.]+%\)",
        text,
    )
    assert runner and float(runner.group(1)) >= p.predicted.request_s * (1 - TIE)


def test_decode_and_prompt_modes_still_maximize_their_speed(qwen_moe) -> None:
    hw, req = load_profile("h100-sxm"), PlanRequest(gpu_budget_bytes=12 * GiB)
    modes = {
        m: plan(qwen_moe, hw, replace(req, optimize=m))
        for m in ("workload", "decode", "prompt", "balanced")
    }
    assert (
        modes["decode"].predicted.decode_tps >= (1 - TIE) * modes["workload"].predicted.decode_tps
    )
    assert (
        modes["prompt"].predicted.prompt_tps >= (1 - TIE) * modes["workload"].predicted.prompt_tps
    )
    assert modes["balanced"] == modes["workload"]  # the old name of the workload mode
    with pytest.raises(ValueError, match="optimize must be"):
        plan(qwen_moe, hw, replace(req, optimize="fastest"))


def test_prompt_speed_shown_at_another_length_leaves_the_request_time_at_the_workload(
    mistral,
) -> None:
    hw = load_profile("rtx3060")
    at_p = plan(mistral, hw, PlanRequest(n_ctx=4096))
    shown_2048 = plan(mistral, hw, PlanRequest(n_ctx=4096, prompt_tokens=2048))
    assert shown_2048.predicted.request_s == pytest.approx(at_p.predicted.request_s)
    assert shown_2048.predicted.prompt_tps != at_p.predicted.prompt_tps
