"""Two GPUs: layers split as llama.cpp splits them, both cards filled, none over its budget."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from offload.planner import Placement, PlanRequest, evaluate, plan
from offload.planner.hardware import load_profile
from offload.planner.placement import CPU, layer_devices, output_device, split_for_counts

GiB = 1 << 30
MiB = 1 << 20


def _llama_cpp_layer_gpu(il: int, n_layer: int, ngl: int, split: list[float]) -> int:
    """llama-model.cpp's rule, written out: cumulative float32 shares, std::upper_bound over them
    of float(il - i_gpu_start) / act_gpu_layers; -1 for a CPU layer."""
    i_gpu_start = max(n_layer + 1 - ngl, 0)
    act = min(ngl, n_layer + 1)
    if il < i_gpu_start or il - i_gpu_start >= act:
        return -1
    points = np.cumsum(np.asarray(split, dtype=np.float32), dtype=np.float32)
    points = (points / points[-1]).astype(np.float32)
    x = np.float32(il - i_gpu_start) / np.float32(act)
    return min(int(np.searchsorted(points, x, side="right")), len(split) - 1)


@pytest.mark.parametrize(
    "split", [[0.5, 0.5], [1 / 3, 2 / 3], [0.3, 0.7], [3.0, 7.0], [20.0, 29.0], [1, 1, 1]]
)
@pytest.mark.parametrize("ngl", [1, 2, 17, 33, 48, 49])
def test_layers_go_to_gpus_exactly_as_llama_cpp_assigns_them(split: list[float], ngl: int) -> None:
    n = 48
    got = layer_devices(n, ngl, len(split), tuple(split))
    assert got == [_llama_cpp_layer_gpu(il, n, ngl, split) for il in range(n)]
    assert output_device(n, ngl, len(split), tuple(split)) == _llama_cpp_layer_gpu(n, n, ngl, split)


@pytest.mark.parametrize("ngl", [1, 10, 33, 49])
def test_whole_layer_counts_put_the_boundary_where_they_say(ngl: int) -> None:
    act = min(ngl, 49)
    for c0 in range(act + 1):
        devs = layer_devices(48, ngl, 2, split_for_counts((c0, act - c0)))
        on0 = devs.count(0) + (output_device(48, ngl, 2, split_for_counts((c0, act - c0))) == 0)
        assert on0 == c0 and devs.count(1) + devs.count(0) == act - 1  # the output layer is one


def test_the_moe_shape_on_two_6_gib_cards_fills_both(qwen_moe) -> None:
    hw = load_profile("2x-rtx2060")
    p = plan(qwen_moe, hw, PlanRequest(gpu_budget_bytes=6 * GiB))
    gpus = p.devices[1:]
    assert all(d.total_bytes <= d.budget_bytes for d in p.devices)
    # Both near full, where an even split of the layers left GPU 0 with 1.1 GiB of its 6.
    assert all(d.total_bytes > d.budget_bytes - 400 * MiB for d in gpus), [
        d.total_bytes / GiB for d in gpus
    ]
    old = evaluate(
        qwen_moe,
        hw,
        PlanRequest(gpu_budget_bytes=6 * GiB),
        replace(p.placement, tensor_split=(0.5, 0.5)),
    )
    assert (
        old.devices[1].total_bytes < 3 * GiB
        and old.devices[2].total_bytes > old.devices[2].budget_bytes
    )
    assert p.devices[0].weights_bytes < 11 * GiB  # 13 GiB stayed on the CPU with the even split
    assert any("split" in r and "GPU 0" in r and "GPU 1" in r for r in p.reasons)


@pytest.mark.parametrize("profile", ["2x-rtx2060", "2x-rtx4060ti-8gb", "2x-rtx3060"])
@pytest.mark.parametrize("model", ["qwen_moe", "mistral"])
@pytest.mark.parametrize("n_parallel", [1, None])
def test_two_cards_are_both_used_and_none_is_over_budget(
    request, profile: str, model: str, n_parallel: int | None
) -> None:
    a = request.getfixturevalue(model)
    hw = load_profile(profile)
    p = plan(a, hw, PlanRequest(n_parallel=n_parallel))
    gpus = p.devices[1:]
    assert all(d.total_bytes <= d.budget_bytes for d in p.devices)
    everything = p.n_gpu_layers > a.n_layers and not p.cpu_tensor_patterns
    if not everything:
        # What stays on the CPU does because neither card has room for a layer's worth more.
        assert all(d.total_bytes > d.budget_bytes - 600 * MiB for d in gpus), [
            d.total_bytes / GiB for d in gpus
        ]
    else:
        assert all(d.weights_bytes > 0 for d in gpus)
    # Each card holds the KV cache of its own layers.
    assert all(d.kv_bytes > 0 for d in gpus) and p.devices[0].kv_bytes == 0
    assert sum(p.tensor_split) == min(p.n_gpu_layers, a.n_layers + 1)


def test_a_card_with_a_larger_budget_takes_more_layers(mistral) -> None:
    p = plan(mistral, load_profile("2x-rtx3060"), PlanRequest(gpu_budget_bytes=(2 * GiB, 4 * GiB)))
    assert p.tensor_split[1] > p.tensor_split[0]
    assert all(d.total_bytes <= d.budget_bytes for d in p.devices)


def test_three_cards_fill_in_order_and_stay_within_budget(qwen_moe) -> None:
    hw = load_profile("2x-rtx2060")
    hw = replace(hw, gpus=(*hw.gpus, replace(hw.gpus[0], index=2)))
    p = plan(qwen_moe, hw, PlanRequest())
    assert len(p.tensor_split) == 3 and all(d.total_bytes <= d.budget_bytes for d in p.devices)
    assert all(d.weights_bytes > 0 for d in p.devices[1:])


def test_a_fully_offloaded_split_pays_for_llama_cpps_pipeline_copies(mistral) -> None:
    hw = load_profile("2x-rtx3060")
    full = Placement(mistral.n_layers + 1, n_ctx=4096, tensor_split=(16.0, 17.0), flash_attn=True)
    piped = evaluate(mistral, hw, PlanRequest(), full)
    overridden = evaluate(
        mistral, hw, PlanRequest(), replace(full, cpu_tensor_patterns=(r"^output\.weight$",))
    )
    # Pipeline parallelism (no overrides) keeps more copies of inputs and handed-over activations.
    assert piped.devices[2].compute_bytes > overridden.devices[2].compute_bytes
    assert layer_devices(mistral.n_layers, 0, 2) == [CPU] * mistral.n_layers


def _decode_plan(a, hw, budget: int):
    return plan(a, hw, PlanRequest(gpu_budget_bytes=budget, optimize="decode", n_ctx=2112))


def _filled_decode_plan(a, hw):
    """The first budget per card from 6 GiB down (64 MiB steps) where whole layers leave a card
    room for an expert tensor the CPU would keep (whether 6 GiB itself does depends on rounding)."""
    for mib in range(6144, 5120, -64):
        p = _decode_plan(a, hw, mib << 20)
        if p.gpu_tensor_patterns:
            return p, mib << 20
    pytest.fail("no budget between 5 and 6 GiB per card fills a card")


def test_room_whole_layers_leave_on_a_card_takes_experts_the_cpu_would_keep(qwen_moe) -> None:
    """The 30B-A3B shape on two ~6 GiB cards, decode mode: layers go to the cards whole, which can
    leave a card up to a layer short of its budget while the CPU kept expert tensors; those tensors
    go to that card by an override of their own, ahead of the CPU ones."""
    hw = load_profile("2x-rtx2060")
    p, budget = _filled_decode_plan(qwen_moe, hw)
    assert all(d.total_bytes <= d.budget_bytes for d in p.devices)
    # Without the fill: the same layers, split and CPU experts, the moved tensors back on the CPU.
    unfilled = evaluate(
        qwen_moe,
        hw,
        PlanRequest(gpu_budget_bytes=budget, optimize="decode", n_ctx=2112),
        replace(
            p.placement,
            gpu_tensor_patterns=(),
            cpu_tensor_patterns=(*p.cpu_tensor_patterns, *(x for x, _ in p.gpu_tensor_patterns)),
        ),
    )
    moved = unfilled.devices[0].weights_bytes - p.devices[0].weights_bytes
    expert = max(t.nbytes for t in qwen_moe.tensors if t.role == "expert")
    assert moved >= expert
    for g in {g for _, g in p.gpu_tensor_patterns}:
        # (GPU weights carry the memory model's small alignment allowance.)
        gained = p.devices[1 + g].weights_bytes - unfilled.devices[1 + g].weights_bytes
        assert gained == pytest.approx(moved, rel=0.01)
        # Filled up to less than one more expert tensor.
        assert p.devices[1 + g].budget_bytes - p.devices[1 + g].total_bytes < expert * 1.01
    assert p.predicted.decode_tps > unfilled.predicted.decode_tps
    assert any("room on a card" in r and "GPU 1" in r for r in p.reasons), p.reasons


@pytest.mark.parametrize("profile", ["2x-rtx2060", "2x-rtx4060ti-8gb", "2x-rtx3060"])
def test_a_fill_override_never_names_the_card_a_tensors_layer_is_on(qwen_moe, profile) -> None:
    import re

    hw = load_profile(profile)
    for mode in ("decode", "workload", "prompt"):
        p = plan(qwen_moe, hw, PlanRequest(optimize=mode, n_parallel=None))
        home = layer_devices(qwen_moe.n_layers, p.n_gpu_layers, 2, p.tensor_split)
        for pat, g in p.gpu_tensor_patterns:
            layers = {t.layer for t in qwen_moe.tensors if re.search(pat, t.name)}
            assert layers and all(home[il] != g for il in layers), (pat, g)
        assert all(d.total_bytes <= d.budget_bytes for d in p.devices)


def test_tensors_moved_to_a_gpu_take_precedence_over_the_cpu_patterns(qwen_moe) -> None:
    from offload.planner.placement import tensor_devices

    names = [t.name for t in qwen_moe.tensors]
    pl = Placement(
        qwen_moe.n_layers + 1,
        cpu_tensor_patterns=(r"blk\.(0|1|2)\.ffn_(up|down|gate)_exps\.weight",),
        gpu_tensor_patterns=((r"blk\.2\.ffn_down_exps\.weight", 1),),
        tensor_split=(20.0, 29.0),
    )
    devs = dict(zip(names, tensor_devices(qwen_moe, pl, 2), strict=True))
    assert devs["blk.2.ffn_down_exps.weight"] == 1  # its layer is on GPU 0, the CPU pattern matches
    assert devs["blk.2.ffn_up_exps.weight"] == CPU
    assert devs["blk.1.ffn_down_exps.weight"] == CPU
    assert devs["blk.2.attn_q.weight"] == 0
    # A machine with one GPU has no GPU 1: the override names nothing there, the CPU one holds.
    one = dict(zip(names, tensor_devices(qwen_moe, pl, 1), strict=True))
    assert one["blk.2.ffn_down_exps.weight"] == CPU


def test_one_card_needs_no_fill(qwen_moe) -> None:
    hw = load_profile("rtx3060")
    assert not _decode_plan(qwen_moe, hw, 8 * GiB).gpu_tensor_patterns
