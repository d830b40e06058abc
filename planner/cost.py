"""The speed model: predicted decode and prompt speed of a placement, from bytes moved and flops.

Decode is memory-bound: each token reads every resident weight once (only the active experts'
share of expert tensors), so time = bytes on each device / that device's effective bandwidth, plus
fixed per-token, per-GPU-layer and per-device-switch costs. Prompt processing runs GPU-resident
work at the GPU's effective flops; CPU-resident weights are either computed on the CPU or, with
llama.cpp's op offload (ubatch >= 32 and a GPU), streamed to the GPU once per micro-batch. Every
efficiency factor is a field of ``SpeedParams`` so that calibration can fit them to measurements.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from offload.planner.gpu_specs import llama_share, tensor_flops
from offload.planner.memory import kv_elem_bytes
from offload.planner.placement import CPU, DeviceLoad, device_loads, layer_devices
from offload.planner.types import Anatomy, GPUInfo, Hardware, Placement, Prediction

__all__ = [
    "SPEED_MODEL_VERSION",
    "SpeedParams",
    "predict",
    "predict_aggregate",
    "cpu_bandwidth_Bps",
    "gpu_flops",
    "experts_touched",
    "pageable_h2d_Bps",
    "stream_seconds",
]


# What the fitted factors mean changes with the model around them: a fit stored under another
# version is fitted again from its runs. 2: GPU flops from tensor flops by name, not bandwidth.
SPEED_MODEL_VERSION = 2


@dataclass(frozen=True)
class SpeedParams:
    """Efficiency factors of the speed model.

    Defaults are fitted on the H100 host's final sweep (bench/results: 63 runs of a dense 7B and a
    30B-A3B MoE shape, median errors 0.02 decode and 0.03 prompt in-sample) and, for the CPU
    roofline, a 2-core EPYC; ``offload bench`` refits them per machine (calibration).
    """

    # Fraction of the probed CPU read bandwidth that decode reaches with threads = physical cores
    # (H100 host: 0.84 of an 84 GB/s probe; the 2-core EPYC's Gemma 3 270M decode is
    # compute-bound, see the roofline below).
    cpu_bw_eff: float = 0.84
    # Bandwidth saturates with threads as 1 - exp(-threads / (tau * cores)); the H100 host's
    # 4/8/12/16-thread runs fit tau = 1.0 (nearly linear up to all 16 vCPUs).
    cpu_thread_tau: float = 1.0
    gpu_bw_eff: float = 0.83
    token_overhead_s: float = 0.8e-3
    # Per layer and token: kernel launches on a GPU.
    gpu_layer_overhead_s: float = 50e-6
    # Per whole CPU layer and token, per thread (attention, norms, rope: small ops, each ending in
    # a barrier of all threads; H100 host sweep: 24 us, so ~0.4 ms a layer at 16 threads).
    cpu_layer_overhead_s: float = 24e-6
    # Per GPU layer and micro-batch in prompt processing (kernel launches amortised over the batch).
    gpu_layer_overhead_prompt_s: float = 20e-6
    # Each hand-over between CPU and GPU inside a token (sync + activation copy).
    split_overhead_s: float = 21e-6
    # Decode is a roofline: a core dequantizes and dots about this many weight bytes per second, so
    # with few cores decode is compute-bound before it is bandwidth-bound (2-core EPYC, Gemma 3
    # 270M: 86-100 t/s whether the read probe said 49 or 70 GB/s).
    cpu_decode_Bps_per_core: float = 12e9
    # Effective CPU matmul throughput per physical core for quantized weights (prompt processing).
    cpu_flops_per_core: float = 2.2e11
    # Batched expert matmuls (MUL_MAT_ID) on the CPU reach a fraction of dense throughput.
    cpu_expert_flops_eff: float = 0.25
    # Decode speed of CPU-resident expert slices relative to dense weights: eight small matrices
    # per layer stream less efficiently than one large one (H100 host sweep: 0.9).
    cpu_expert_bw_factor: float = 0.9
    # Decode cost of a CPU-resident output layer relative to its bytes over CPU bandwidth. An
    # earlier 0.13 came from reading whole-layer runs with 48 layers offloaded as output-on-CPU;
    # llama.cpp offloads the output layer first, so those runs had it on the GPU (bench/results,
    # "layers_48"). Kept for calibration to refit.
    cpu_output_decode_factor: float = 1.0
    # H100, 2048-token prompts all on the GPU: ~10k t/s dense 7B (bench/results).
    gpu_flops_eff: float = 0.14
    # Expert matmuls (MUL_MAT_ID) run far below dense efficiency on GPUs: this much with
    # gpu_expert_batch_half tokens an expert in a micro-batch (ubatch * used / count), rising
    # towards twice it as they grow (H100, MoE all on the GPU: pp2048 6.5k t/s at ubatch 512,
    # 32 tokens an expert, against 10-11k t/s at 2048).
    gpu_expert_flops_eff: float = 0.036
    gpu_expert_batch_half: float = 47.0
    # Op offload copies CPU-resident weights to the GPU once per micro-batch: from pinned memory
    # at this fraction of the measured pinned host-to-device bandwidth, from the mapped model file
    # (pageable memory) at this fraction of the measured pageable copy bandwidth (H100 host:
    # 55 GB/s pinned, 7.1 GB/s pageable, both probed in a child process).
    stream_h2d_eff: float = 0.95
    stream_pageable_eff: float = 1.08
    # Where the pageable copy bandwidth was not measured: this share of the pinned one.
    pageable_h2d_ratio: float = 0.15
    ubatch_overhead_s: float = 0.5e-3
    op_offload_min_batch: int = 32
    # Flops of a GPU nothing else tells of, per byte/s of its memory bandwidth (H100: ~1e15 /
    # 3.35e12). A guess: an H200 has 1.4x the bandwidth of the same chip (planner.gpu_specs).
    gpu_flops_per_Bps: float = 300.0
    # Batched decode (several streams, one token each per step): the weights are read once a step,
    # each further token costs its flops at this fraction of the device's peak (GPU: its fp16
    # flops; CPU: the prompt-processing rate above). Small-batch decode kernels run far below
    # prompt-processing efficiency. Set to the gains llama.cpp's batched bench measured: the dense
    # 7B shape fully on an H200 (989 TF) 3.7x at eight streams (265 -> 981 t/s), Gemma 3 270M on a
    # 2-core EPYC 2.4x at four and 3.2x at eight (44 -> 106 -> 140 t/s). Single-stream runs, all that
    # calibration records today, say nothing about them. Consumer GPUs have fewer tensor-core
    # flops per vector flop than Hopper (about 4 against 15), so their gains are likely larger
    # than predicted until measured.
    gpu_batch_flops_eff: float = 0.023
    cpu_batch_flops_eff: float = 0.45

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeedParams:
        """Inverse of ``to_dict``; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def cpu_bandwidth_Bps(hardware: Hardware, threads: int, params: SpeedParams) -> float:
    """Effective CPU bandwidth for decode with ``threads`` threads."""
    cores = max(hardware.cpu.cores, 1)
    tau = max(params.cpu_thread_tau * cores, 1e-6)
    sat = (1 - math.exp(-max(threads, 1) / tau)) / (1 - math.exp(-cores / tau))
    return hardware.cpu.mem_bandwidth_Bps * params.cpu_bw_eff * min(sat, 1.05)


def gpu_flops(hardware: Hardware, gpu: int, params: SpeedParams) -> float:
    """A GPU's matmul throughput in H100-equivalent flops: its tensor flops (probed, from its
    profile or by its name) scaled by the share llama.cpp's kernels reach of them relative to
    Hopper; else estimated from its bandwidth."""
    g = hardware.gpus[gpu]
    spec = g.fp16_flops or tensor_flops(g.name, g.compute_capability)
    if spec:
        return spec * llama_share(g.name, g.compute_capability)
    return g.mem_bandwidth_Bps * params.gpu_flops_per_Bps


def _kv_per_token_by_device(
    anatomy: Anatomy, layer_dev: list[int], kv_type: str, offload_kqv: bool
) -> dict[int, float]:
    out: dict[int, float] = {}
    per = kv_elem_bytes(kv_type) / 2
    for il, f16 in enumerate(anatomy.kv_bytes_per_token_f16):
        d = layer_dev[il] if offload_kqv else CPU
        out[d] = out.get(d, 0.0) + f16 * per
    return out


def _switches(anatomy: Anatomy, devs: list[int]) -> int:
    """Device hand-overs per token: walk layers in order through attention, FFN and expert parts."""
    parts: dict[tuple[int, int], tuple[int, int]] = {}  # (layer, part) -> (bytes, device)
    part_of = {
        "attention": 0,
        "norm": 0,
        "ssm": 0,
        "router": 1,
        "ffn": 1,
        "shared_expert": 1,
        "expert": 2,
    }
    out_dev = CPU
    for t, d in zip(anatomy.tensors, devs, strict=True):
        if t.layer is None:
            if t.role == "output":
                out_dev = d
            continue
        key = (t.layer, part_of.get(t.role, 0))
        if t.nbytes > parts.get(key, (-1, 0))[0]:
            parts[key] = (t.nbytes, d)
    seq = [CPU] + [parts[k][1] for k in sorted(parts)] + [out_dev]
    # Between CPU and GPU, or from one GPU to the next in a layer split.
    return sum(1 for a, b in zip(seq, seq[1:], strict=False) if a != b)


def predict(
    anatomy: Anatomy,
    hardware: Hardware,
    placement: Placement,
    params: SpeedParams | None = None,
    *,
    prompt_tokens: int = 512,
    context_tokens: int | None = None,
) -> Prediction:
    """Predicted decode t/s, prompt t/s and time to first token of a placement on a machine."""
    p = params or SpeedParams()
    n_gpus = len(hardware.gpus)
    loads, devs = device_loads(anatomy, placement, n_gpus)
    layer_dev = layer_devices(
        anatomy.n_layers, placement.n_gpu_layers, n_gpus, placement.tensor_split
    )
    threads_batch = placement.threads_batch or placement.threads or hardware.cpu.cores
    ctx = prompt_tokens if context_tokens is None else context_tokens
    t_dec = _decode_step_s(anatomy, hardware, placement, p, ctx, 1)
    t_prompt = _prompt_time_s(
        anatomy, hardware, placement, loads, layer_dev, p, prompt_tokens, threads_batch
    )
    return Prediction(decode_tps=1.0 / t_dec, prompt_tps=prompt_tokens / t_prompt, ttft_s=t_prompt)


def predict_aggregate(
    anatomy: Anatomy,
    hardware: Hardware,
    placement: Placement,
    streams: int,
    params: SpeedParams | None = None,
    *,
    context_tokens: int = 512,
) -> float:
    """Predicted decode t/s of ``streams`` sequences together (one ``llama_decode`` per step holding
    one token of each): all streams' tokens, per second. One stream gives ``predict``'s decode."""
    p = params or SpeedParams()
    n = max(int(streams), 1)
    return n / _decode_step_s(anatomy, hardware, placement, p, context_tokens, n)


def _decode_step_s(
    anatomy: Anatomy,
    hardware: Hardware,
    placement: Placement,
    p: SpeedParams,
    ctx: int,
    streams: int,
) -> float:
    """Seconds of one decode step holding one token of each of ``streams`` sequences.

    Per device a roofline: reading the weights (once a step; an MoE step reads the experts any of
    its tokens route to) and each stream's KV cache, against computing every token. One stream
    is bandwidth-bound on GPUs and as measured on CPUs; further streams add only their flops and
    KV reads, so the step grows by the roofline's increase over one stream.
    """
    n_gpus = len(hardware.gpus)
    loads, devs = device_loads(anatomy, placement, n_gpus)
    layer_dev = layer_devices(
        anatomy.n_layers, placement.n_gpu_layers, n_gpus, placement.tensor_split
    )
    threads = placement.threads or hardware.cpu.cores
    cpu_bw = cpu_bandwidth_Bps(hardware, threads, p)
    kv_tok = _kv_per_token_by_device(anatomy, layer_dev, placement.kv_type, placement.offload_kqv)
    share = anatomy.expert_used_count / anatomy.expert_count if anatomy.expert_count else 1.0
    touched = experts_touched(anatomy, streams) / share if anatomy.expert_count else 1.0
    attn_layers = {d: sum(1 for x in layer_dev if x == d) for d in loads}
    t = p.token_overhead_s + _switches(anatomy, devs) * p.split_overhead_s
    for d, ld in loads.items():
        kv_read = kv_tok.get(d, 0.0) * ctx
        # Flops of one more token here: its matmuls and its attention over the context.
        flops = (
            ld.dense_flops + ld.expert_flops + _attn_flops_per_token(anatomy, attn_layers[d], ctx)
        )
        if d == CPU:
            out = ld.output_decode_bytes * (p.cpu_output_decode_factor if n_gpus else 1.0)
            dense = ld.decode_bytes - ld.expert_decode_bytes - ld.output_decode_bytes + out

            def cpu_roof(
                n: int,
                dense: float = dense,
                kv_read: float = kv_read,
                flops: float = flops,
                ld: DeviceLoad = ld,
            ) -> float:
                experts = ld.expert_decode_bytes * (touched if n > 1 else 1.0)
                t_mem = (dense + n * kv_read) / cpu_bw + experts / (cpu_bw * p.cpu_expert_bw_factor)
                cores_used = max(min(threads, hardware.cpu.cores), 1)
                # The first token dequantizes and dots every weight byte; batched kernels then
                # handle each further token at a share of the prompt-processing rate.
                t_compute = (dense + ld.expert_decode_bytes) / (
                    cores_used * p.cpu_decode_Bps_per_core
                )
                t_compute += (
                    (n - 1) * flops / (p.cpu_flops_per_core * cores_used * p.cpu_batch_flops_eff)
                )
                return max(t_mem, t_compute)

            t += cpu_roof(1) + (cpu_roof(streams) - cpu_roof(1) if streams > 1 else 0.0)
            # Whole layers on the CPU: attention, norms and rope are many small ops, each ending in
            # a barrier of all threads, so the cost grows with the thread count.
            t += sum(1 for x in layer_dev if x == CPU) * p.cpu_layer_overhead_s * max(threads, 1)
        else:
            g = hardware.gpus[d]
            bw = g.mem_bandwidth_Bps * p.gpu_bw_eff
            f = gpu_flops(hardware, d, p) * p.gpu_batch_flops_eff

            def gpu_roof(
                n: int,
                ld: DeviceLoad = ld,
                kv_read: float = kv_read,
                flops: float = flops,
                bw: float = bw,
                f: float = f,
            ) -> float:
                experts = ld.expert_decode_bytes * (touched if n > 1 else 1.0)
                t_mem = (ld.decode_bytes - ld.expert_decode_bytes + experts + n * kv_read) / bw
                return max(t_mem, n * flops / f)

            # One stream: the bandwidth term, as fitted on the H100 sweep.
            single = (ld.decode_bytes + kv_read) / bw
            t += single + (gpu_roof(streams) - gpu_roof(1) if streams > 1 else 0.0)
            t += len(ld.layers) * p.gpu_layer_overhead_s
    return t


def experts_touched(anatomy: Anatomy, ubatch: int) -> float:
    """Expected share of a layer's experts that ``ubatch`` tokens route to (balanced routing).

    llama.cpp's op offload copies only the experts a micro-batch uses; with 8 of 128 experts per
    token, 512 tokens use all of them, 32 tokens about 87%.
    """
    if not anatomy.expert_count:
        return 1.0
    share = anatomy.expert_used_count / anatomy.expert_count
    return 1.0 - (1.0 - min(share, 1.0)) ** max(ubatch, 1)


def pageable_h2d_Bps(gpu: GPUInfo, params: SpeedParams) -> float:
    """Host-to-device copy bandwidth from pageable memory: measured, else a share of pinned."""
    return gpu.h2d_pageable_Bps or gpu.h2d_bandwidth_Bps * params.pageable_h2d_ratio


def stream_seconds(
    anatomy: Anatomy,
    hardware: Hardware,
    cpu: DeviceLoad,
    ubatch: int,
    pinned: bool,
    params: SpeedParams,
) -> float:
    """Seconds to copy the CPU-resident weights one micro-batch uses to GPU 0 (op offload)."""
    g = hardware.gpus[0]
    if pinned:
        rate = g.h2d_bandwidth_Bps * params.stream_h2d_eff
    else:
        rate = pageable_h2d_Bps(g, params) * params.stream_pageable_eff
    dense = cpu.stream_bytes - cpu.stream_expert_bytes
    return (dense + cpu.stream_expert_bytes * experts_touched(anatomy, ubatch)) / max(rate, 1.0)


def _attn_flops_per_token(anatomy: Anatomy, n_layers_here: int, prompt_tokens: int) -> float:
    # QK^T and AV over, on average, half the prompt.
    return 4.0 * anatomy.n_head * max(anatomy.head_dim_k, 1) * prompt_tokens / 2 * n_layers_here


def _prompt_time_s(
    anatomy: Anatomy,
    hardware: Hardware,
    placement: Placement,
    loads: dict[int, DeviceLoad],
    layer_dev: list[int],
    p: SpeedParams,
    prompt_tokens: int,
    threads_batch: int,
) -> float:
    n_tokens = max(prompt_tokens, 1)
    ubatch = max(min(placement.n_ubatch, placement.n_batch, n_tokens), 1)
    n_ub = math.ceil(n_tokens / ubatch)
    cpu = loads[CPU]
    cpu_flops = p.cpu_flops_per_core * max(min(threads_batch, hardware.cpu.cores), 1)
    # Attention runs where its layer is (the KV cache is there), whatever FFN tensors moved.
    has_attn = [bool(k) for k in anatomy.kv_bytes_per_token_f16] or [True] * anatomy.n_layers
    attn_on = {
        d: sum(
            1 for il, x in enumerate(layer_dev) if x == d and il < len(has_attn) and has_attn[il]
        )
        for d in loads
    }
    total = 0.0
    streams = bool(hardware.gpus) and placement.op_offload and ubatch >= p.op_offload_min_batch
    per_expert = ubatch * anatomy.expert_used_count / max(anatomy.expert_count, 1)
    expert_eff = (
        p.gpu_expert_flops_eff * 2 * per_expert / (per_expert + p.gpu_expert_batch_half)
        if anatomy.expert_count
        else p.gpu_expert_flops_eff
    )
    for d, ld in loads.items():
        attn = _attn_flops_per_token(anatomy, attn_on[d], n_tokens)
        if d == CPU:
            continue
        f = gpu_flops(hardware, d, p)
        total += n_tokens * (
            (ld.dense_flops + attn) / (f * p.gpu_flops_eff) + ld.expert_flops / (f * expert_eff)
        )
        total += n_ub * len(ld.layers) * p.gpu_layer_overhead_prompt_s
    cpu_attn = _attn_flops_per_token(anatomy, attn_on[CPU], n_tokens)
    if streams and cpu.stream_bytes:
        f = gpu_flops(hardware, 0, p)
        total += n_ub * stream_seconds(anatomy, hardware, cpu, ubatch, placement.pinned_weights, p)
        total += n_tokens * (
            cpu.dense_flops / (f * p.gpu_flops_eff) + cpu.expert_flops / (f * expert_eff)
        )
        total += n_tokens * cpu_attn / cpu_flops
    else:
        # Expert matmuls with a batch touch nearly every expert, but flops follow the active share.
        total += (
            n_tokens
            * (cpu.dense_flops + cpu_attn + cpu.expert_flops / p.cpu_expert_flops_eff)
            / cpu_flops
        )
    total += n_ub * p.ubatch_overhead_s
    return total
