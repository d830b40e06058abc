"""Choosing a plan for a model on a machine."""

from __future__ import annotations

from offload.planner.errors import PlanInfeasible
from offload.planner.types import Anatomy, DevicePlan, Hardware, Plan, PlanRequest, Prediction

__all__ = ["plan"]


def plan(anatomy: Anatomy, hardware: Hardware, request: PlanRequest | None = None) -> Plan:
    """Place the model on this hardware (CPU only for now)."""
    req = request or PlanRequest()
    n_ctx = req.n_ctx or min(anatomy.n_ctx_train, 4096)
    kv_bytes = sum(anatomy.kv_bytes_per_token_f16) * n_ctx * max(1, req.n_parallel)
    weights = anatomy.weights_bytes
    n_batch = req.n_batch or 512
    n_ubatch = min(req.n_ubatch or 512, n_batch)
    compute = anatomy.n_vocab * n_ubatch * 4 + anatomy.n_embd * n_ubatch * 4 * 8
    budget = req.ram_budget_bytes or hardware.cpu.ram_bytes
    cpu = DevicePlan("CPU", "CPU", 0, weights, kv_bytes, compute, 0, budget)
    if cpu.total_bytes > budget:
        raise PlanInfeasible(
            f"the model needs {cpu.total_bytes / 2**30:.1f} GiB but only {budget / 2**30:.1f} GiB of RAM "
            "is available"
        )
    threads = req.threads or hardware.cpu.cores
    decode_tps = hardware.cpu.mem_bandwidth_Bps / max(weights, 1)
    prompt_tps = 200.0
    return Plan(
        devices=(cpu,),
        n_gpu_layers=0,
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        threads=threads,
        threads_batch=threads,
        predicted=Prediction(decode_tps, prompt_tps, req.prompt_tokens / prompt_tps),
        reasons=("no GPU: everything runs on the CPU",),
        n_parallel=max(1, req.n_parallel),
        kv_type=req.kv_type or "f16",
        flash_attn=bool(req.flash_attn),
        use_mmap=True if req.use_mmap is None else req.use_mmap,
        use_mlock=req.use_mlock,
        optimize=req.optimize,
        model_path=anatomy.path,
        hardware_fingerprint=hardware.fingerprint,
    )
