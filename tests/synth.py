"""Synthetic GGUF writers: real tensor shapes and metadata, sparse (no disk) or zero-filled data.

Also the tiny random-data F32 llama and the gemma3:270m LoRA the model-library tests use
(``write_model(path)`` without a spec, ``write_lora``).

``write_model`` is general (any llama.cpp-style arch, dims, per-tensor types); the named helpers
give the shapes the planner is judged on (GPU.md): a Mistral-7B dense, a Qwen3-30B-A3B MoE, a
Mamba, a Mamba2 and a granitehybrid. With ``tokenizer=True`` llama.cpp can load the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

__all__ = [
    "GEMMA3_270M_Q_SHAPE",
    "write_lora",
    "ModelSpec",
    "write_model",
    "mistral_7b",
    "qwen3_30b_a3b",
    "mamba",
    "mamba2",
    "granite_hybrid",
    "tiny_llama",
]


@dataclass
class ModelSpec:
    """Shape and quantization of a synthetic model (llama.cpp tensor naming)."""

    arch: str = "llama"
    n_layers: int = 4
    n_embd: int = 256
    n_ff: int = 512
    n_head: int = 4
    n_head_kv: int | Sequence[int] = 4
    head_dim: int | None = None
    n_vocab: int = 1024
    n_ctx_train: int = 4096
    expert_count: int = 0
    expert_used: int = 0
    n_ff_exp: int = 0
    tied_embeddings: bool = False
    qk_norm: bool = False
    swa_window: int = 0
    # Mamba/SSM dims (mamba, mamba2, hybrids); layers with n_head_kv == 0 are recurrent in hybrids.
    ssm_d_inner: int = 0
    ssm_d_state: int = 0
    ssm_d_conv: int = 4
    ssm_dt_rank: int = 0
    ssm_n_group: int = 0
    ssm_n_head: int = 0
    # ggml type per tensor-name keyword (first match wins), else default_type; norms are F32.
    types: dict[str, str] = field(default_factory=dict)
    default_type: str = "Q4_K"
    extra_kv: dict[str, Any] = field(default_factory=dict)


def _kv_heads(spec: ModelSpec) -> list[int]:
    h = spec.n_head_kv
    return list(h) if not isinstance(h, int) else [h] * spec.n_layers


def _tensors(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """(name, ggml shape ne0-first) of every tensor."""
    e, hd = spec.n_embd, spec.head_dim or spec.n_embd // max(spec.n_head, 1)
    out: list[tuple[str, tuple[int, ...]]] = [
        ("token_embd.weight", (e, spec.n_vocab)),
        ("output_norm.weight", (e,)),
    ]
    if not spec.tied_embeddings:
        out.append(("output.weight", (e, spec.n_vocab)))
    recurrent_arch = spec.arch in ("mamba", "mamba2")
    for il, kvh in enumerate(_kv_heads(spec)):
        b = f"blk.{il}."
        out.append((b + "attn_norm.weight", (e,)))
        if recurrent_arch or kvh == 0:
            out += _ssm_tensors(spec, b)
            if recurrent_arch:
                continue
        else:
            out += [
                (b + "attn_q.weight", (e, spec.n_head * hd)),
                (b + "attn_k.weight", (e, kvh * hd)),
                (b + "attn_v.weight", (e, kvh * hd)),
                (b + "attn_output.weight", (spec.n_head * hd, e)),
            ]
            if spec.qk_norm:
                out += [(b + "attn_q_norm.weight", (hd,)), (b + "attn_k_norm.weight", (hd,))]
        out.append((b + "ffn_norm.weight", (e,)))
        if spec.expert_count:
            n, f = spec.expert_count, spec.n_ff_exp
            out += [
                (b + "ffn_gate_inp.weight", (e, n)),
                (b + "ffn_gate_exps.weight", (e, f, n)),
                (b + "ffn_up_exps.weight", (e, f, n)),
                (b + "ffn_down_exps.weight", (f, e, n)),
            ]
        else:
            out += [
                (b + "ffn_gate.weight", (e, spec.n_ff)),
                (b + "ffn_up.weight", (e, spec.n_ff)),
                (b + "ffn_down.weight", (spec.n_ff, e)),
            ]
    return out


def _ssm_tensors(spec: ModelSpec, b: str) -> list[tuple[str, tuple[int, ...]]]:
    e, di, ds, dc = spec.n_embd, spec.ssm_d_inner, spec.ssm_d_state, spec.ssm_d_conv
    if spec.arch == "mamba" or spec.arch == "jamba":
        r = spec.ssm_dt_rank
        return [
            (b + "ssm_in.weight", (e, 2 * di)),
            (b + "ssm_conv1d.weight", (dc, di)),
            (b + "ssm_conv1d.bias", (di,)),
            (b + "ssm_x.weight", (di, r + 2 * ds)),
            (b + "ssm_dt.weight", (r, di)),
            (b + "ssm_dt.bias", (di,)),
            (b + "ssm_a", (ds, di)),
            (b + "ssm_d", (di,)),
            (b + "ssm_out.weight", (di, e)),
        ]
    g, nh = max(spec.ssm_n_group, 1), spec.ssm_n_head
    conv = di + 2 * g * ds
    return [
        (b + "ssm_in.weight", (e, 2 * di + 2 * g * ds + nh)),
        (b + "ssm_conv1d.weight", (dc, conv)),
        (b + "ssm_conv1d.bias", (conv,)),
        (b + "ssm_dt.bias", (nh,)),
        (b + "ssm_a", (1, nh)),
        (b + "ssm_d", (1, nh)),
        (b + "ssm_norm.weight", (di // g, g)),
        (b + "ssm_out.weight", (di, e)),
    ]


def _type_for(spec: ModelSpec, name: str, shape: tuple[int, ...]) -> GGMLQuantizationType:
    if (
        len(shape) == 1
        or "norm" in name
        or "ssm_a" in name
        or "ssm_d" in name.split(".")[-1]
        or "conv1d" in name
        or "gate_inp" in name
        or name.endswith(".bias")
    ):
        return GGMLQuantizationType.F32
    tname = next((t for k, t in spec.types.items() if k in name), spec.default_type)
    qt = GGMLQuantizationType[tname]
    block = GGML_QUANT_SIZES[qt][0]
    if shape[0] % block:  # rows that don't divide into blocks: llama.cpp's converters fall back too
        return GGMLQuantizationType.Q8_0 if shape[0] % 32 == 0 else GGMLQuantizationType.F16
    return qt


def _nbytes(qt: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[qt]
    return int(np.prod(shape)) // block * size


def _metadata(w: GGUFWriter, spec: ModelSpec, tokenizer: bool) -> None:
    a, hd = spec.arch, spec.head_dim or spec.n_embd // max(spec.n_head, 1)
    w.add_uint32(f"{a}.block_count", spec.n_layers)
    w.add_uint32(f"{a}.context_length", spec.n_ctx_train)
    w.add_uint32(f"{a}.embedding_length", spec.n_embd)
    w.add_uint32(f"{a}.feed_forward_length", spec.n_ff)
    w.add_uint32(f"{a}.attention.head_count", spec.n_head)
    if isinstance(spec.n_head_kv, int):
        w.add_uint32(f"{a}.attention.head_count_kv", spec.n_head_kv)
    else:
        w.add_array(f"{a}.attention.head_count_kv", [int(x) for x in spec.n_head_kv])
    w.add_uint32(f"{a}.attention.key_length", hd)
    w.add_uint32(f"{a}.attention.value_length", hd)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{a}.rope.freq_base", 10000.0)
    w.add_uint32(f"{a}.vocab_size", spec.n_vocab)
    if spec.expert_count:
        w.add_uint32(f"{a}.expert_count", spec.expert_count)
        w.add_uint32(f"{a}.expert_used_count", spec.expert_used)
        w.add_uint32(f"{a}.expert_feed_forward_length", spec.n_ff_exp)
    if spec.swa_window:
        w.add_uint32(f"{a}.attention.sliding_window", spec.swa_window)
    if spec.ssm_d_inner:
        w.add_uint32(f"{a}.ssm.conv_kernel", spec.ssm_d_conv)
        w.add_uint32(f"{a}.ssm.inner_size", spec.ssm_d_inner)
        w.add_uint32(f"{a}.ssm.state_size", spec.ssm_d_state)
        w.add_uint32(f"{a}.ssm.time_step_rank", spec.ssm_dt_rank or spec.ssm_n_head)
        if spec.ssm_n_group:
            w.add_uint32(f"{a}.ssm.group_count", spec.ssm_n_group)
    for k, v in spec.extra_kv.items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_string(k, str(v))
    w.add_uint32("general.file_type", 15)
    if tokenizer:
        # A minimal SentencePiece-style vocabulary: enough for llama.cpp to load and run.
        toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
        toks += [f"t{i}" for i in range(spec.n_vocab - len(toks))]
        toks = toks[: spec.n_vocab]
        w.add_tokenizer_model("llama")
        w.add_token_list(toks)
        w.add_token_scores([0.0] * len(toks))
        w.add_token_types([2, 3, 3] + [6] * min(256, len(toks) - 3) + [1] * max(len(toks) - 259, 0))
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)


def write_model(
    path: str | os.PathLike[str],
    spec: ModelSpec | None = None,
    *,
    sparse: bool = True,
    tokenizer: bool = False,
    embd: int = 256,
    seed: int = 0,
) -> Path:
    """Write a GGUF of ``spec`` to ``path``: the header, then data as a hole (sparse) or zeros.

    Without a spec: a one-layer F32 llama with random weights (``embd``, ``seed``) that llama.cpp
    can load and quantize (about 2 MB).
    """
    if spec is None:
        return _write_tiny_f32(Path(path), embd=embd, seed=seed)
    p = Path(path)
    w = GGUFWriter(str(p), spec.arch)
    _metadata(w, spec, tokenizer)
    sizes = []
    for name, shape in _tensors(spec):
        qt = _type_for(spec, name, shape)
        nb = _nbytes(qt, shape)
        w.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), nb, raw_dtype=qt)
        sizes.append(nb)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    align = 32
    header = p.stat().st_size
    start = header + (-header % align)
    total = start + sum(s + (-s % align) for s in sizes)
    with p.open("r+b") as f:
        if sparse:
            f.truncate(total)
        else:
            f.seek(header)
            chunk = bytes(16 << 20)
            left = total - header
            while left > 0:
                n = min(left, len(chunk))
                f.write(chunk[:n])
                left -= n
    return p


def mistral_7b() -> ModelSpec:
    """GPU.md's dense shape: 32 layers, 4096 embd, 14336 ff, GQA 32/8, Q4_K with Q6_K v/down/output."""
    return ModelSpec(
        arch="llama",
        n_layers=32,
        n_embd=4096,
        n_ff=14336,
        n_head=32,
        n_head_kv=8,
        n_vocab=32000,
        n_ctx_train=32768,
        types={"attn_v": "Q6_K", "ffn_down": "Q6_K", "output.": "Q6_K"},
    )


def qwen3_30b_a3b() -> ModelSpec:
    """GPU.md's MoE shape: 48 layers, 2048 embd, 128 experts (8 used), expert ff 768, vocab 151936."""
    return ModelSpec(
        arch="qwen3moe",
        n_layers=48,
        n_embd=2048,
        n_ff=6144,
        n_head=32,
        n_head_kv=4,
        head_dim=128,
        n_vocab=151936,
        n_ctx_train=40960,
        expert_count=128,
        expert_used=8,
        n_ff_exp=768,
        qk_norm=True,
        types={"attn_v": "Q6_K", "ffn_down": "Q6_K", "output.": "Q6_K"},
    )


def mamba() -> ModelSpec:
    """A Mamba-1 2.8B shape (64 layers, 2560 embd, d_inner 5120, d_state 16)."""
    return ModelSpec(
        arch="mamba",
        n_layers=64,
        n_embd=2560,
        n_ff=0,
        n_head=0,
        n_head_kv=0,
        n_vocab=50280,
        n_ctx_train=1 << 20,
        ssm_d_inner=5120,
        ssm_d_state=16,
        ssm_dt_rank=160,
        tied_embeddings=True,
        default_type="Q8_0",
    )


def mamba2() -> ModelSpec:
    """A Mamba-2 1.3B-like shape (48 layers, 2048 embd, d_inner 4096, d_state 128, 64 heads)."""
    return ModelSpec(
        arch="mamba2",
        n_layers=48,
        n_embd=2048,
        n_ff=0,
        n_head=0,
        n_head_kv=0,
        n_vocab=50288,
        n_ctx_train=1 << 20,
        ssm_d_inner=4096,
        ssm_d_state=128,
        ssm_n_group=1,
        ssm_n_head=64,
        tied_embeddings=True,
        default_type="Q8_0",
    )


def granite_hybrid() -> ModelSpec:
    """A granitehybrid (Granite 4.0-H-like): Mamba2 layers with every 6th layer attention, dense FFN."""
    n = 24
    kv = [8 if il % 6 == 5 else 0 for il in range(n)]
    return ModelSpec(
        arch="granitehybrid",
        n_layers=n,
        n_embd=1536,
        n_ff=4096,
        n_head=12,
        n_head_kv=kv,
        head_dim=128,
        n_vocab=100352,
        n_ctx_train=131072,
        ssm_d_inner=3072,
        ssm_d_state=128,
        ssm_n_group=1,
        ssm_n_head=48,
        tied_embeddings=True,
    )


def tiny_llama(
    n_layers: int = 4, n_embd: int = 256, n_ff: int = 512, expert_count: int = 0
) -> ModelSpec:
    """A small llama (or MoE with ``expert_count``) whose dims divide every quant block."""
    return ModelSpec(
        arch="qwen3moe" if expert_count else "llama",
        n_layers=n_layers,
        n_embd=n_embd,
        n_ff=n_ff,
        n_head=4,
        n_head_kv=2,
        n_vocab=1024,
        expert_count=expert_count,
        expert_used=max(expert_count // 8, 1) if expert_count else 0,
        n_ff_exp=n_ff // 2 or 256,
        qk_norm=bool(expert_count),
    )


#: attn_q of gemma3:270m as numpy sees it (rows = outputs): 4 heads x 256 = 1024 by 640 embd.
GEMMA3_270M_Q_SHAPE = (1024, 640)
GEMMA3_270M_LAYERS = 18


def _write_tiny_f32(path: Path, *, embd: int = 256, seed: int = 0) -> Path:
    """A one-layer F32 llama GGUF that llama.cpp can load and quantize (about 2 MB)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(embd)
    w.add_context_length(128)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_feed_forward_length(embd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((32, embd), dtype=np.float32))
    for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        w.add_tensor(f"blk.0.{n}.weight", rng.standard_normal((embd, embd), dtype=np.float32))
    for n in ("blk.0.attn_norm", "blk.0.ffn_norm", "output_norm"):
        w.add_tensor(f"{n}.weight", np.ones(embd, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_lora(
    path: Path, *, rank: int = 4, alpha: float = 8.0, scale: float = 0.0, seed: int = 0
) -> Path:
    """A LoRA GGUF for gemma3:270m on every layer's attn_q; ``scale`` 0 makes B zero (a no-op)."""
    rng = np.random.default_rng(seed)
    out_dim, in_dim = GEMMA3_270M_Q_SHAPE
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    for i in range(GEMMA3_270M_LAYERS):
        a = rng.standard_normal((rank, in_dim), dtype=np.float32) * 0.01
        b = (rng.standard_normal((out_dim, rank), dtype=np.float32) * scale).astype(np.float32)
        w.add_tensor(f"blk.{i}.attn_q.weight.lora_a", a)
        w.add_tensor(f"blk.{i}.attn_q.weight.lora_b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
