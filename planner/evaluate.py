"""Turn a concrete placement into a Plan: memory per device against budgets, and predicted speed."""

from __future__ import annotations

from offload.planner.cost import SpeedParams, predict
from offload.planner.memory import (
    CUDA_CONTEXT_BYTES,
    compute_buffer_bytes,
    kv_bytes_per_layer,
    output_buffer_bytes,
    recurrent_bytes_per_layer,
)
from offload.planner.placement import CPU, device_loads, layer_devices, output_device
from offload.planner.types import Anatomy, DevicePlan, Hardware, Placement, Plan, PlanRequest

__all__ = ["evaluate", "device_budgets", "fits", "memory_by_device"]


def device_budgets(hardware: Hardware, request: PlanRequest) -> tuple[int, list[int], list[int]]:
    """RAM budget, each GPU's budget, and each GPU's fixed overhead (CUDA context) in bytes.

    An explicit GPU budget (``--gpu-memory``) is what llama.cpp's buffers may use, as ``--fit``'s
    target does; otherwise the card's free memory less the CUDA context and the margin.
    """
    cpu = hardware.cpu
    ram = request.ram_budget_bytes or cpu.ram_available_bytes or int(cpu.ram_bytes * 0.9)
    budgets, overheads = [], []
    for g in hardware.gpus:
        if request.gpu_budget_bytes is not None:
            budgets.append(int(request.gpu_budget_bytes))
            overheads.append(0)
        else:
            free = g.vram_free_bytes or g.vram_bytes
            budgets.append(max(free - request.gpu_margin_bytes, 0))
            overheads.append(CUDA_CONTEXT_BYTES)
    return ram, budgets, overheads


CUDA_WEIGHTS_ALLOWANCE = 1.005
CUDA_COMPUTE_ALLOWANCE = 1.25


def memory_by_device(
    anatomy: Anatomy, hardware: Hardware, placement: Placement
) -> dict[int, tuple[int, int, int, int]]:
    """(weights, kv, compute, extra) bytes per device (``CPU`` = -1, GPUs 0..n-1)."""
    n_gpus = len(hardware.gpus)
    loads, _ = device_loads(anatomy, placement, n_gpus)
    ldev = layer_devices(anatomy.n_layers, placement.n_gpu_layers, n_gpus, placement.tensor_split)
    odev = output_device(anatomy.n_layers, placement.n_gpu_layers, n_gpus, placement.tensor_split)
    kv = kv_bytes_per_layer(
        anatomy,
        placement.n_ctx,
        placement.n_parallel,
        placement.kv_type,
        placement.n_ubatch,
        swa_full=placement.swa_full,
    )
    rec = recurrent_bytes_per_layer(anatomy, placement.n_parallel)
    kv_on: dict[int, int] = {d: 0 for d in loads}
    for il in range(anatomy.n_layers):
        d = ldev[il] if placement.offload_kqv else CPU
        kv_on[d] += (kv[il] if il < len(kv) else 0) + (rec[il] if il < len(rec) else 0)
    n_ctx_total = placement.n_ctx * max(placement.n_parallel, 1)
    ub = min(placement.n_ubatch, placement.n_batch)
    out: dict[int, tuple[int, int, int, int]] = {}
    for d, ld in loads.items():
        if d == CPU:
            if n_gpus == 0:
                comp = compute_buffer_bytes(anatomy, ub, n_ctx_total, placement.flash_attn)
            else:
                # Host-side buffers only; the big graph runs on the GPU (op offload / GPU layers).
                comp = compute_buffer_bytes(
                    anatomy,
                    ub,
                    n_ctx_total,
                    placement.flash_attn,
                    logits=odev == CPU and not placement.op_offload,
                    layers=bool(ld.layers) and not placement.op_offload,
                )
            comp += output_buffer_bytes(anatomy, placement.n_parallel)
            # Repacked copies measured CPU-only (Gemma); with GPUs, op offload needs host-readable
            # weights, so CPU-resident tensors are not counted twice there.
            out[d] = (ld.weights_bytes, kv_on[d], comp, ld.repack_bytes if n_gpus == 0 else 0)
        else:
            main = d == 0
            # The main GPU holds a compute buffer even with no layers when op offload may use it.
            used = bool(ld.layers) or ld.has_output or (main and placement.op_offload)
            comp = (
                compute_buffer_bytes(
                    anatomy,
                    ub,
                    n_ctx_total,
                    placement.flash_attn,
                    logits=main or ld.has_output,
                    layers=bool(ld.layers) or main,
                )
                if used
                else 0
            )
            if main and placement.op_offload:
                # Op offload copies a dense tensor moved off a GPU layer into this buffer (H100:
                # +48 MB for a 48 MB ffn_down); experts go through their own used-expert copies.
                comp += loads[CPU].largest_moved_dense_bytes
            # On the H100 sweep llama.cpp's CUDA weight and KV buffers matched the model to the
            # byte (weights +0.5% kept as slack), while its compute buffers came out up to 22%
            # above our estimate: plan with that allowance so that no plan exceeds its budget.
            out[d] = (int(ld.weights_bytes * CUDA_WEIGHTS_ALLOWANCE), kv_on[d],
                      int(comp * CUDA_COMPUTE_ALLOWANCE), 0)
    return out


def evaluate(
    anatomy: Anatomy,
    hardware: Hardware,
    request: PlanRequest,
    placement: Placement,
    speed: SpeedParams | None = None,
    reasons: tuple[str, ...] = (),
) -> Plan:
    """Build the Plan for a given placement: memory per device, budgets and predicted speeds."""
    ram, budgets, overheads = device_budgets(hardware, request)
    mem = memory_by_device(anatomy, hardware, placement)
    w, k, c, x = mem[CPU]
    devices = [DevicePlan("CPU", "CPU", 0, w, k, c, x, ram)]
    for i, g in enumerate(hardware.gpus):
        w, k, c, _ = mem[i]
        devices.append(
            DevicePlan(g.name, "GPU", i, w, k, c, overheads[i] if (w or k or c) else 0, budgets[i])
        )
    pred = predict(anatomy, hardware, placement, speed, prompt_tokens=request.prompt_tokens)
    threads = placement.threads or hardware.cpu.cores
    return Plan(
        devices=tuple(devices),
        n_gpu_layers=placement.n_gpu_layers,
        n_ctx=placement.n_ctx,
        n_batch=placement.n_batch,
        n_ubatch=placement.n_ubatch,
        threads=threads,
        threads_batch=placement.threads_batch or threads,
        predicted=pred,
        reasons=reasons,
        cpu_tensor_patterns=placement.cpu_tensor_patterns,
        tensor_split=placement.tensor_split,
        n_parallel=placement.n_parallel,
        kv_type=placement.kv_type,
        flash_attn=placement.flash_attn,
        offload_kqv=placement.offload_kqv,
        op_offload=placement.op_offload,
        use_mmap=not placement.pinned_weights if request.use_mmap is None else request.use_mmap,
        use_mlock=request.use_mlock,
        optimize=request.optimize,
        model_path=anatomy.path,
        hardware_fingerprint=hardware.fingerprint,
        n_ctx_total=placement.n_ctx * max(placement.n_parallel, 1),
        swa_full=placement.swa_full,
    )


def fits(plan: Plan) -> bool:
    """Every device's total is within its budget."""
    return all(d.total_bytes <= d.budget_bytes for d in plan.devices)
