"""The memory model: what llama.cpp allocates for weights, KV cache, recurrent state and compute.

Pure functions of the anatomy and the knobs, checked against llama.cpp's own log lines on a real
model (tests/planner/test_memory_matches_llama_cpp.py). Sizes follow llama.cpp of the
llama-cpp-python 0.3.36 era: KV cells padded to 256, full-size SWA cache by default, compute
buffers sized by the worst-case ubatch graph (all n_ubatch rows produce logits).
"""

from __future__ import annotations

from collections.abc import Iterable

from offload.planner.types import Anatomy, TensorInfo

__all__ = [
    "KV_TYPES",
    "CUDA_CONTEXT_BYTES",
    "MOE_KERNELS_BYTES",
    "gpu_overhead_bytes",
    "PIPELINE_COPIES",
    "pipeline_copy_bytes",
    "kv_elem_bytes",
    "kv_cells",
    "kv_bytes_per_layer",
    "recurrent_bytes_per_layer",
    "compute_buffer_bytes",
    "repack_bytes",
    "output_buffer_bytes",
]

# Bytes per element of each KV cache type (block bytes / block size).
KV_TYPES: dict[str, float] = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
    "iq4_nl": 18 / 32,
}
# What a process holds on a GPU beside llama.cpp's own buffers, as nvidia-smi counts it: the CUDA
# context, the kernels it loads (lazily, so a model with more kinds of operations loads more),
# cuBLAS handles and workspace, and llama.cpp's pool of temporary buffers. The H200 sweep of
# 2026-11-30 recorded nvidia-smi's peak beside llama.cpp's buffers for 48 loads
# (bench/results/sweep-2026-11-30): dense models 617-652 MiB beyond the buffers, MoE models (whose
# expert matmuls load kernels of their own) 712-772 MiB, whatever the placement, micro-batch or
# load mode. 512 MiB left every plan 15-103 MiB over its budget there. Plans keep the largest
# figure seen plus a little, per kind of model; GPUs with fewer SMs than an H200 need less, which
# costs them a layer at most.
CUDA_CONTEXT_BYTES = 672 << 20
# Beyond CUDA_CONTEXT_BYTES for models with expert tensors (mul_mat_id kernels and their pools).
MOE_KERNELS_BYTES = 128 << 20


def gpu_overhead_bytes(anatomy: Anatomy | None) -> int:
    """What one GPU that holds part of ``anatomy`` needs beyond llama.cpp's buffers."""
    moe = anatomy is not None and anatomy.expert_count > 0
    return CUDA_CONTEXT_BYTES + (MOE_KERNELS_BYTES if moe else 0)


# llama.cpp pipelines micro-batches across GPUs (all layers offloaded, layer split, no tensor
# overrides): the scheduler then keeps this many copies of every graph input and of every
# activation crossing between devices (ggml-backend's GGML_SCHED_MAX_COPIES).
PIPELINE_COPIES = 4
# CPU weight types llama.cpp repacks into an extra CPU_REPACK buffer (x86 AVX2/AVX512, ARM NEON).
_REPACKED = frozenset({"Q4_0", "Q4_K", "IQ4_NL"})
_KV_PAD = 256


def kv_elem_bytes(kv_type: str) -> float:
    """Bytes per element of a KV cache type; ``ValueError`` for an unknown one."""
    try:
        return KV_TYPES[kv_type]
    except KeyError:
        raise ValueError(
            f"unknown KV cache type {kv_type!r}; one of {', '.join(KV_TYPES)}"
        ) from None


def _pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def kv_cells(
    n_ctx: int, n_parallel: int, swa_window: int, n_ubatch: int, swa_full: bool = True
) -> int:
    """KV cells llama.cpp allocates for one layer (``n_ctx`` per sequence)."""
    total = _pad(n_ctx * max(n_parallel, 1), _KV_PAD)
    if swa_window and not swa_full:
        # Without the unified full cache a SWA layer keeps only the window (+ one ubatch) per sequence.
        return min(total, _pad(swa_window * max(n_parallel, 1) + n_ubatch, _KV_PAD))
    return total


def kv_bytes_per_layer(
    anatomy: Anatomy,
    n_ctx: int,
    n_parallel: int = 1,
    kv_type: str = "f16",
    n_ubatch: int = 512,
    swa_full: bool = True,
) -> list[int]:
    """KV cache bytes of each layer (0 for layers without attention)."""
    per_elem = kv_elem_bytes(kv_type)
    out = []
    for il, f16 in enumerate(anatomy.kv_bytes_per_token_f16):
        window = anatomy.swa_window[il] if il < len(anatomy.swa_window) else 0
        cells = kv_cells(n_ctx, n_parallel, window, n_ubatch, swa_full)
        out.append(int(f16 / 2 * per_elem * cells))
    return out


def recurrent_bytes_per_layer(anatomy: Anatomy, n_parallel: int = 1) -> list[int]:
    """Mamba/SSM state bytes of each layer: one f32 state per sequence, independent of n_ctx."""
    return [b * max(n_parallel, 1) for b in anatomy.recurrent_state_bytes_per_layer]


def output_buffer_bytes(anatomy: Anatomy, n_parallel: int = 1) -> int:
    """The host logits buffer: one row of f32 logits per sequence."""
    return anatomy.n_vocab * 4 * max(n_parallel, 1) + anatomy.n_embd * 4 * max(n_parallel, 1)


def _attention_bytes(anatomy: Anatomy, n_ubatch: int, n_kv: int, flash_attn: bool) -> int:
    n_head = max(anatomy.n_head, 1)
    if flash_attn:
        # Fused kernel: an f16 mask plus per-head outputs; no n_kv x n_ubatch score matrix.
        return n_kv * n_ubatch * 2 + n_ubatch * n_head * max(anatomy.head_dim_v, 1) * 4 * 2
    # Scores and softmax, both f32, per head, plus the f32 mask.
    return n_kv * n_ubatch * n_head * 4 * 2 + n_kv * n_ubatch * 4


def _layer_bytes(anatomy: Anatomy, n_ubatch: int) -> int:
    ff = anatomy.n_ff
    down = 0
    if anatomy.expert_count:
        used = max(anatomy.expert_used_count, 1)
        ff = max(ff, anatomy.n_ff_exp * used + anatomy.expert_count)
        # Each used expert's ffn_down output stays apart until they are weighted and summed
        # (two H200s, the 30B-A3B shape without the output layer: 344 MiB at n_ubatch 2048).
        down = anatomy.n_embd * used
    # gate, up and their product are alive together before ffn_down consumes them.
    return n_ubatch * 4 * (anatomy.n_embd * 3 + ff * 3 + down)


def compute_buffer_bytes(
    anatomy: Anatomy,
    n_ubatch: int,
    n_ctx_total: int,
    flash_attn: bool,
    *,
    logits: bool = True,
    layers: bool = True,
    layer_copy_bytes: int = 0,
) -> int:
    """Peak compute buffer of one device: the largest live set among logits, FFN and attention.

    ``logits``: the device computes the output projection for a full ubatch; ``layers``: it runs
    repeating layers; ``layer_copy_bytes``: a weight op offload copies in for a layer, alive with
    that layer's activations. ggml's allocator reuses memory, so the buffer is the max phase, not
    the sum.
    """
    phases = [anatomy.n_embd * n_ubatch * 4 * 2]
    if logits:
        phases.append(n_ubatch * (anatomy.n_vocab + anatomy.n_embd) * 4)
    if layers:
        phases.append(_layer_bytes(anatomy, n_ubatch) + layer_copy_bytes)
        if any(anatomy.kv_bytes_per_token_f16):
            phases.append(
                _attention_bytes(anatomy, n_ubatch, _pad(n_ctx_total, _KV_PAD), flash_attn)
            )
    return max(phases) + n_ubatch * anatomy.n_embd * 4


def repack_bytes(tensors: Iterable[TensorInfo]) -> int:
    """Extra CPU memory for weights llama.cpp repacks for its CPU kernels (CPU_REPACK buffer)."""
    return sum(t.nbytes for t in tensors if t.ggml_type in _REPACKED and t.layer is not None)


def pipeline_copy_bytes(anatomy: Anatomy, n_ubatch: int, n_ctx_total: int, flash_attn: bool) -> int:
    """Extra compute-buffer bytes a GPU needs when llama.cpp pipelines micro-batches across GPUs:
    more copies of the inputs (embeddings, positions, the KQ mask) and of the activations handed
    between devices, which its allocator may not reuse."""
    mask = _pad(n_ctx_total, _KV_PAD) * n_ubatch * (2 if flash_attn else 4)
    activations = 2 * n_ubatch * anatomy.n_embd * 4
    return (PIPELINE_COPIES - 1) * (mask + activations)
