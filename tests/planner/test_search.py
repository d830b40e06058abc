"""Search: plans respect budgets, use memory well, and place MoE experts before attention."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload.planner import (
    BudgetTooSmall,
    CPUInfo,
    GPUInfo,
    Hardware,
    Placement,
    PlanInfeasible,
    PlanRequest,
    Workload,
    anatomy,
    evaluate,
    plan,
)
from offload.planner.evaluate import fits
from offload.planner.memory import gpu_overhead_bytes
from offload.planner.placement import CPU, tensor_devices
from offload.planner.search import expert_pattern
from tests import synth

GiB = 1 << 30


def _hw(
    vram_gib: float,
    ram_gib: float = 64,
    cores: int = 8,
    n_gpus: int = 1,
    cpu_bw: float = 50e9,
    gpu_bw: float = 900e9,
    h2d: float = 20e9,
) -> Hardware:
    gpus = tuple(
        GPUInfo(f"GPU{i}", int(vram_gib * GiB), gpu_bw, h2d, index=i) for i in range(n_gpus)
    )
    return Hardware(
        "test", CPUInfo(cores=cores, ram_bytes=int(ram_gib * GiB), mem_bandwidth_Bps=cpu_bw), gpus
    )


_CACHE: dict[tuple, object] = {}


def _model(tmp: Path, n_layers: int, n_embd: int, experts: int):
    key = (n_layers, n_embd, experts)
    if key not in _CACHE:
        spec = synth.tiny_llama(
            n_layers=n_layers, n_embd=n_embd, n_ff=n_embd * 3, expert_count=experts
        )
        spec.n_vocab = 32000
        _CACHE[key] = anatomy.read(
            synth.write_model(tmp / f"m{n_layers}_{n_embd}_{experts}.gguf", spec)
        )
    return _CACHE[key]


models = st.tuples(
    st.integers(2, 24), st.sampled_from([256, 512, 1024, 2048]), st.sampled_from([0, 8, 32])
)
machines = st.tuples(
    st.floats(0.2, 24),
    st.floats(2, 128),
    st.integers(1, 32),
    st.floats(10e9, 200e9),
    st.floats(100e9, 3e12),
    st.floats(5e9, 50e9),
    st.integers(0, 2),
)
_settings = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_settings
@given(model=models, machine=machines, optimize=st.sampled_from(["decode", "prompt", "balanced"]))
def test_no_plan_exceeds_any_budget(synth_dir: Path, model, machine, optimize) -> None:
    a = _model(synth_dir, *model)
    vram, ram, cores, cbw, gbw, h2d, n_gpus = machine
    hw = _hw(vram, ram, cores, n_gpus, cbw, gbw, h2d)
    try:
        p = plan(a, hw, PlanRequest(optimize=optimize))
    except PlanInfeasible:
        return
    for d in p.devices:
        assert d.total_bytes <= d.budget_bytes, d
    assert p.n_ctx >= min(4096, a.n_ctx_train)


@_settings
@given(model=models, vram=st.floats(0.1, 8), extra=st.floats(0.05, 8), cores=st.integers(1, 16))
def test_more_gpu_memory_never_predicts_slower_decode(
    synth_dir: Path, model, vram, extra, cores
) -> None:
    a = _model(synth_dir, *model)
    req = PlanRequest(n_ctx=4096, optimize="decode")
    try:
        small = plan(a, _hw(vram, cores=cores), replace(req, gpu_budget_bytes=int(vram * GiB)))
    except BudgetTooSmall:
        return  # below the CUDA context and a compute buffer: no GPU plan to compare
    big = plan(
        a, _hw(vram + extra, cores=cores), replace(req, gpu_budget_bytes=int((vram + extra) * GiB))
    )
    # Within 1% the planner prefers more GPU layers over a hair of predicted speed.
    assert big.predicted.decode_tps >= small.predicted.decode_tps * 0.99


@_settings
@given(model=models)
def test_everything_on_the_gpu_when_it_fits(synth_dir: Path, model) -> None:
    a = _model(synth_dir, *model)
    p = plan(a, _hw(80), PlanRequest(n_ctx=4096))
    assert p.n_gpu_layers == a.n_layers + 1 and not p.cpu_tensor_patterns
    assert p.devices[0].weights_bytes == next(t.nbytes for t in a.tensors if t.role == "embedding")


def test_tight_budget_moves_moe_experts_before_attention(qwen_moe) -> None:
    non_expert = sum(t.nbytes for t in qwen_moe.tensors if t.role != "expert")
    expert = qwen_moe.weights_bytes - non_expert
    hw = _hw(80, ram_gib=128, cores=16)
    for frac in (0.1, 0.3, 0.6):
        budget = int(non_expert + frac * expert + 1.5 * GiB)
        p = plan(qwen_moe, hw, PlanRequest(n_ctx=4096, gpu_budget_bytes=budget, optimize="decode"))
        devs = tensor_devices(qwen_moe, Placement(p.n_gpu_layers, p.cpu_tensor_patterns), 1)
        attn_cpu = [
            t.name
            for t, d in zip(qwen_moe.tensors, devs, strict=True)
            if t.role == "attention" and d == CPU
        ]
        experts_gpu = sum(
            1
            for t, d in zip(qwen_moe.tensors, devs, strict=True)
            if t.role == "expert" and d != CPU
        )
        assert not attn_cpu, f"attention moved to CPU at {frac}: {attn_cpu[:3]}"
        assert 0 < experts_gpu < 3 * 48


def test_expert_placement_beats_whole_layers_at_equal_budget(qwen_moe) -> None:
    from offload.planner.hardware import load_profile

    hw = load_profile("h100-sxm")
    req = PlanRequest(n_ctx=4096, gpu_budget_bytes=12 * GiB, threads=8, optimize="decode")
    p = plan(qwen_moe, hw, req)
    whole = max(
        (
            evaluate(qwen_moe, hw, req, Placement(k, n_ctx=4096, threads=8, flash_attn=True))
            for k in range(0, 50)
        ),
        key=lambda q: q.predicted.decode_tps if fits(q) else 0,
    )
    assert fits(whole) and p.predicted.decode_tps > 1.1 * whole.predicted.decode_tps


def test_the_workload_decides_between_prompt_and_decode_speed_on_moe(qwen_moe) -> None:
    from offload.planner.hardware import load_profile

    hw = load_profile("h100-sxm")
    req = PlanRequest(n_ctx=4096, gpu_budget_bytes=12 * GiB, threads=8)
    dec = plan(qwen_moe, hw, replace(req, optimize="decode"))
    # Long prompts, short answers: prompt speed is worth some decode (a larger micro-batch).
    rag = plan(qwen_moe, hw, replace(req, workload=Workload(3500, 16)))
    assert rag.predicted.prompt_tps > 1.3 * dec.predicted.prompt_tps and rag.n_ubatch > 512
    assert any("n_ubatch" in r for r in rag.reasons)
    # Short prompts, long answers: the decode plan, or one within the tie.
    chat = plan(qwen_moe, hw, replace(req, workload=Workload(32, 2048)))
    assert chat.predicted.decode_tps >= 0.99 * dec.predicted.decode_tps
    # Each minimizes its own request time among the two.
    for p, other in ((rag, chat), (chat, rag)):
        assert p.workload.request_s(p.predicted) <= p.workload.request_s(other.predicted) * 1.01


def test_cpu_only_machine_gets_a_cpu_plan_that_says_so(mistral) -> None:
    p = plan(mistral, _hw(0, n_gpus=0), PlanRequest())
    assert p.n_gpu_layers == 0 and [d.name for d in p.devices] == ["CPU"]
    assert any("No GPU" in r for r in p.reasons)


def test_model_larger_than_ram_and_vram_is_infeasible_and_says_what_is_needed(qwen_moe) -> None:
    with pytest.raises(PlanInfeasible, match=r"needs about 1[89]\.\d GiB"):
        plan(qwen_moe, _hw(4, ram_gib=8), PlanRequest(n_ctx=4096))


def test_user_constraints_are_honoured(mistral) -> None:
    p = plan(mistral, _hw(24), PlanRequest(num_gpu=10, n_ctx=8192, n_parallel=2))
    assert p.n_gpu_layers == 10 and p.n_ctx == 8192 and p.n_parallel == 2
    assert any("as requested" in r for r in p.reasons)


def test_two_gpus_split_layers_by_budget(mistral) -> None:
    p = plan(mistral, _hw(3, n_gpus=2), PlanRequest(n_ctx=4096))
    # Whole offloaded layers per GPU, as llama.cpp reads tensor_split.
    assert len(p.tensor_split) == 2 and sum(p.tensor_split) == min(
        p.n_gpu_layers, mistral.n_layers + 1
    )
    assert all(d.weights_bytes > 0 for d in p.devices[1:])


def test_plan_json_has_the_published_shape(mistral) -> None:
    d = json.loads(json.dumps(plan(mistral, _hw(6), PlanRequest()).to_dict()))
    for k in (
        "n_gpu_layers",
        "cpu_tensor_patterns",
        "n_ctx",
        "n_batch",
        "n_ubatch",
        "threads",
        "kv_type",
        "flash_attn",
        "reasons",
    ):
        assert k in d
    assert set(d["predicted"]) >= {"decode_tps", "prompt_tps", "ttft_s"}
    assert d["devices"][0]["name"] == "CPU"
    assert set(d["devices"][0]) >= {
        "name",
        "weights_bytes",
        "kv_bytes",
        "compute_bytes",
        "total_bytes",
        "budget_bytes",
    }


def test_evaluate_reflects_a_given_expert_override(qwen_moe) -> None:
    hw = _hw(80)
    base = Placement(49, n_ctx=4096)
    moved = replace(base, cpu_tensor_patterns=(expert_pattern(range(10)),))
    p0, p1 = (evaluate(qwen_moe, hw, PlanRequest(), pl) for pl in (base, moved))
    ten_layers = sum(t.nbytes for t in qwen_moe.tensors if t.role == "expert" and t.layer < 10)
    assert p1.devices[0].weights_bytes - p0.devices[0].weights_bytes == ten_layers
    assert p1.predicted.decode_tps < p0.predicted.decode_tps


@pytest.mark.parametrize(
    "spec", [synth.mamba, synth.mamba2, synth.granite_hybrid, synth.qwen3_30b_a3b, synth.mistral_7b]
)
@pytest.mark.parametrize("profile", ["rtx4060-laptop", "rtx3090", "cpu-only-laptop"])
def test_every_architecture_plans_on_every_kind_of_machine(
    synth_dir: Path, spec, profile: str
) -> None:
    from offload.planner.hardware import load_profile

    a = anatomy.read(synth.write_model(synth_dir / f"{spec.__name__}.gguf", spec()))
    hw = load_profile(profile)
    if a.weights_bytes > hw.cpu.ram_bytes * 0.9 + sum(g.vram_bytes for g in hw.gpus):
        with pytest.raises(PlanInfeasible, match="GiB of RAM"):
            plan(a, hw, PlanRequest())
        return
    p = plan(a, hw, PlanRequest())
    assert fits(p) and p.predicted.decode_tps > 0 and p.predicted.prompt_tps > 0 and p.reasons
    assert p.n_ctx >= 4096 and p.n_ctx_total == p.n_ctx * p.n_parallel
    if a.recurrent_state_bytes:
        assert sum(d.kv_bytes for d in p.devices) >= a.recurrent_state_bytes


def test_a_users_n_batch_caps_the_micro_batch(qwen_moe) -> None:
    from offload.planner.hardware import load_profile

    p = plan(qwen_moe, load_profile("rtx3060"), PlanRequest(n_batch=512))
    assert p.n_ubatch <= 512 and p.n_batch == 512


def _moe(tmp: Path, n_layers: int, n_embd: int, experts: int, n_ff_exp: int):
    key = ("moe", n_layers, n_embd, experts, n_ff_exp)
    if key not in _CACHE:
        spec = synth.qwen3_30b_a3b()
        spec.n_layers, spec.n_embd, spec.expert_count, spec.n_ff_exp = (
            n_layers,
            n_embd,
            experts,
            n_ff_exp,
        )
        spec.n_head, spec.n_head_kv, spec.head_dim = n_embd // 128, 4, 128
        path = tmp / f"moe_{n_layers}_{n_embd}_{experts}_{n_ff_exp}.gguf"
        _CACHE[key] = anatomy.read(synth.write_model(path, spec))
    return _CACHE[key]


@_settings
@given(
    model=st.tuples(
        st.integers(8, 48),
        st.sampled_from([2048, 4096]),
        st.sampled_from([64, 128]),
        st.sampled_from([768, 1408]),
    ),
    frac=st.floats(0.0, 0.95),
    cores=st.integers(4, 32),
    optimize=st.sampled_from(["decode", "balanced"]),
)
def test_random_moe_at_a_tight_budget_moves_experts_before_attention(
    synth_dir: Path, model, frac, cores, optimize
) -> None:
    # Real MoE proportions (8 active experts of 64-128): attention is a small share of the bytes.
    a = _moe(synth_dir, *model)
    non_expert = sum(t.nbytes for t in a.tensors if t.role != "expert")
    expert = a.weights_bytes - non_expert
    # Room for everything but experts (plus the CUDA context, KV and compute buffers), then a
    # fraction of the experts.
    budget = int(non_expert + frac * expert + gpu_overhead_bytes(a) + 512 * (1 << 20))
    p = plan(
        a,
        _hw(80, ram_gib=256, cores=cores),
        PlanRequest(n_ctx=4096, gpu_budget_bytes=budget, optimize=optimize),
    )
    devs = tensor_devices(a, Placement(p.n_gpu_layers, p.cpu_tensor_patterns), 1)
    attention_cpu = [
        t.name for t, d in zip(a.tensors, devs, strict=True) if t.role == "attention" and d == CPU
    ]
    experts_gpu = [
        t.name for t, d in zip(a.tensors, devs, strict=True) if t.role == "expert" and d != CPU
    ]
    assert not (attention_cpu and experts_gpu), (attention_cpu[:2], experts_gpu[:2])


def test_default_context_is_ollamas_4096_and_max_ctx_lets_the_planner_go_longer(
    gemma_path: Path,
) -> None:
    a = anatomy.read(gemma_path)
    assert plan(a, _hw(0, n_gpus=0), PlanRequest()).n_ctx == 4096
    long = plan(a, _hw(0, n_gpus=0), PlanRequest(max_ctx=1 << 20))
    assert long.n_ctx == a.n_ctx_train == 32768


def test_longer_context_is_dropped_when_it_would_push_weights_off_the_gpu(mistral) -> None:
    # 4.8 GB of weights (plus CUDA's allocation allowance) in a 6 GiB budget: a 32k f16 KV cache
    # (4 GiB) cannot join them.
    p = plan(
        mistral,
        _hw(80),
        PlanRequest(max_ctx=32768, gpu_budget_bytes=int(6.0 * GiB), optimize="decode"),
    )
    assert p.n_gpu_layers == mistral.n_layers + 1 and not p.cpu_tensor_patterns
    assert 4096 <= p.n_ctx < 32768


# -- llama.cpp's layer order, pinned host memory, the copy model of op offload -----------------


def test_n_gpu_layers_offloads_the_output_layer_first_as_llama_cpp_does(mistral) -> None:
    from offload.planner.placement import layer_devices, output_device

    n = mistral.n_layers
    # i_gpu_start = n_layer + 1 - ngl: one offloaded layer is the output layer, not the last block.
    assert output_device(n, 1, 1) == 0 and layer_devices(n, 1, 1) == [CPU] * n
    assert layer_devices(n, n, 1) == [CPU] + [0] * (n - 1) and output_device(n, n, 1) == 0
    assert layer_devices(n, n + 1, 1) == [0] * n
    assert output_device(n, 0, 1) == CPU and layer_devices(n, 5, 0) == [CPU] * n


def test_cpu_resident_weights_are_pinned_when_op_offload_streams_them(mistral) -> None:
    hw = _hw(3, ram_gib=64)
    p = plan(mistral, hw, PlanRequest(n_ctx=4096))
    assert p.devices[0].weights_bytes > 0 and not p.use_mmap
    assert any("pinned memory" in r for r in p.reasons)
    # The user's use_mmap wins; a model whose CPU part would pin over half the RAM stays mapped;
    # everything on the GPU, or no GPU at all, leaves nothing to pin.
    assert plan(mistral, hw, PlanRequest(n_ctx=4096, use_mmap=True)).use_mmap
    assert plan(mistral, _hw(3, ram_gib=4.5), PlanRequest(n_ctx=4096)).use_mmap
    assert plan(mistral, _hw(24), PlanRequest(n_ctx=4096)).use_mmap
    assert plan(mistral, replace(hw, gpus=()), PlanRequest(n_ctx=4096)).use_mmap


def test_pinned_weights_predict_faster_prompts_and_the_same_decode(mistral) -> None:
    hw = _hw(3)
    hw = replace(hw, gpus=(replace(hw.gpus[0], h2d_bandwidth_Bps=50e9, h2d_pageable_Bps=7e9),))
    req = PlanRequest(n_ctx=4096, gpu_budget_bytes=3 * GiB)
    at = {
        pin: evaluate(mistral, hw, req, Placement(16, n_ctx=4096, pinned_weights=pin))
        for pin in (False, True)
    }
    assert at[True].predicted.prompt_tps > 1.5 * at[False].predicted.prompt_tps
    assert at[True].predicted.decode_tps == at[False].predicted.decode_tps
    assert not at[True].use_mmap and at[False].use_mmap


def test_a_micro_batch_copies_only_the_experts_it_routes_to(qwen_moe) -> None:
    from offload.planner.cost import experts_touched

    # 8 of 128 experts a token: 32 tokens reach ~87% of the experts, 512 all of them.
    assert experts_touched(qwen_moe, 1) == pytest.approx(8 / 128)
    assert experts_touched(qwen_moe, 32) == pytest.approx(1 - (120 / 128) ** 32)
    assert experts_touched(qwen_moe, 512) > 0.999
