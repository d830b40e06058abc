"""The one writer of synthetic GGUF models, for tests and for benchmarks.

``write_model`` is general (any llama.cpp-style arch, dims, per-tensor types); the named helpers
give the shapes the planner is judged on: a Mistral-7B dense, a Qwen3-30B-A3B MoE, a Mamba, a
Mamba2 and a granitehybrid. ``SPECS`` names the shapes the benchmarks time (``bench/synth_models.py``
is its command line). The tensor data is one of:

- ``sparse``: a hole, the file's full size without the disk space (the planner reads only headers);
- ``zeros``: written zeros;
- ``random``: random quant blocks with small, finite, zero-mean weights, which cost what real
  weights cost to read and multiply and keep a MoE router balanced (for timing llama.cpp).

With ``tokenizer=True`` (implied by ``random``) llama.cpp can load the file. Also the tiny
random-data F32 llama and the gemma3:270m LoRA the model-library tests use (``write_model(path)``
without a spec, ``write_lora``).

Imports only gguf and numpy, so a bare machine can write models while llama.cpp builds.
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
    "SPECS",
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
    name: str = ""  # general.name, when set


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
    if spec.name:
        w.add_string("general.name", spec.name)
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
    spec: ModelSpec | str | None = None,
    *,
    data: str = "sparse",
    tokenizer: bool = False,
    embd: int = 256,
    seed: int = 0,
) -> Path:
    """Write a GGUF of ``spec`` (or a ``SPECS`` name) to ``path``, with ``data`` as the module says.

    Without a spec: a one-layer F32 llama with random weights (``embd``, ``seed``) that llama.cpp
    can load and quantize (about 2 MB). The file appears whole or not at all.
    """
    if spec is None:
        return _write_tiny_f32(Path(path), embd=embd, seed=seed)
    if data not in ("sparse", "zeros", "random"):
        raise ValueError(f"data must be sparse, zeros or random, not {data!r}")
    spec = SPECS[spec] if isinstance(spec, str) else spec
    p = Path(path)
    tmp = p.with_name(p.name + ".part")
    w = GGUFWriter(str(tmp), spec.arch)
    _metadata(w, spec, tokenizer or data == "random")
    layout = []
    for name, shape in _tensors(spec):
        qt = _type_for(spec, name, shape)
        nb = _nbytes(qt, shape)
        w.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), nb, raw_dtype=qt)
        layout.append((name, qt, nb))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    align = 32
    header = tmp.stat().st_size
    start = header + (-header % align)
    total = start + sum(nb + (-nb % align) for _, _, nb in layout)
    with tmp.open("r+b") as f:
        if data == "sparse":
            f.truncate(total)
        elif data == "zeros":
            f.seek(header)
            chunk = bytes(16 << 20)
            left = total - header
            while left > 0:
                n = min(left, len(chunk))
                f.write(chunk[:n])
                left -= n
        else:
            f.seek(header)
            f.write(bytes(start - header))
            _write_random(f, layout, seed)
    os.replace(tmp, p)
    return p


#: Attention's output projection, scaled down: random attention averages over the positions, and
#: at full scale that average swamps every token's own state within a few layers, so all tokens
#: route to the same experts (a trained model's residual stream keeps tokens apart).
ATTN_OUT_SCALE = 1e-7


def _block_pool(
    qt: GGMLQuantizationType, rng: np.random.Generator, n_bytes: int, scale: float = 1e-4
) -> bytes:
    """Random quant blocks with small, finite and zero-mean weights.

    Zero mean matters for MoE timing: weights with a common offset give every hidden state a
    shared direction, the random router then sends most tokens to the same few experts, and
    llama.cpp's op offload, which copies only the experts a micro-batch uses, moves a fraction of
    the bytes a trained (load-balanced) model makes it move.
    """
    Q = GGMLQuantizationType
    block = GGML_QUANT_SIZES[qt][1]
    blocks = rng.integers(0, 256, size=(n_bytes // block, block), dtype=np.uint8)
    d = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
    if qt == Q.Q4_K:  # struct: half d, half dmin, u8 scales[12], u8 qs[128]
        # w = d * sc * q - dmin * m with q uniform in 0..15: sc = m = 17 in all eight sub-blocks
        # (6-bit fields packed as in ggml's get_scale_min_k4) and dmin = 7.5 d centre it on zero.
        blocks[:, 0:2] = d
        blocks[:, 2:4] = np.frombuffer(np.float16(7.5 * scale).tobytes(), dtype=np.uint8)
        blocks[:, 4:12] = 0x51
        blocks[:, 12:16] = 0x11
    elif qt == Q.Q6_K:  # struct: u8 ql[128], u8 qh[64], i8 scales[16], half d
        blocks[:, 208:210] = d
    elif qt == Q.Q8_0:  # struct: half d, i8 qs[32]
        blocks[:, 0:2] = d
    elif qt in (Q.F16, Q.F32):
        return (
            (rng.standard_normal(n_bytes // (2 if qt == Q.F16 else 4)) * scale)
            .astype(np.float16 if qt == Q.F16 else np.float32)
            .tobytes()
        )
    else:
        raise ValueError(
            f"random data for {qt.name} tensors is not written; use Q4_K, Q6_K, Q8_0, F16 or F32"
        )
    return blocks.tobytes()


def _write_random(f: Any, layout: list[tuple[str, GGMLQuantizationType, int]], seed: int) -> None:
    """Tensor data after the header: varied views of a few random pools (seconds for gigabytes)."""
    rng = np.random.default_rng(seed)
    kinds = sorted({qt for _, qt, _ in layout if qt != GGMLQuantizationType.F32})
    pools = {qt: _block_pool(qt, rng, 64 << 20) for qt in kinds}
    quiet = {qt: _block_pool(qt, rng, 8 << 20, scale=ATTN_OUT_SCALE) for qt in kinds}
    for name, qt, nb in layout:
        if qt == GGMLQuantizationType.F32:
            if "gate_inp" in name:  # router weights: varied so that different experts win
                f.write(rng.normal(0, 0.02, nb // 4).astype(np.float32).tobytes())
            else:  # norms and biases
                f.write(np.ones(nb // 4, dtype=np.float32).tobytes())
        else:
            pool = memoryview((quiet if "attn_output" in name else pools)[qt])  # views, not copies
            block = GGML_QUANT_SIZES[qt][1]
            pos = int(rng.integers(0, len(pool) // block)) * block  # vary tensors' contents
            left = nb
            while left > 0:
                n = min(left, len(pool) - pos)
                f.write(pool[pos : pos + n])
                left -= n
                pos = 0
        f.write(bytes(-nb % 32))


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


_Q6_KEYS = {"attn_v": "Q6_K", "ffn_down": "Q6_K", "output.": "Q6_K"}

#: The shapes the benchmarks time, by name (Q4_K with Q6_K v/down/output, as Q4_K_M files are).
SPECS: dict[str, ModelSpec] = {
    "dense": ModelSpec(**{**mistral_7b().__dict__, "name": "synthetic-llama-32L"}),
    "moe": ModelSpec(**{**qwen3_30b_a3b().__dict__, "name": "synthetic-qwen3moe-48L"}),
    "tiny-dense": ModelSpec(
        arch="llama",
        n_layers=4,
        n_embd=256,
        n_ff=512,
        n_head=4,
        n_head_kv=2,
        n_vocab=1024,
        types=_Q6_KEYS,
        name="synthetic-llama-4L",
    ),
    "tiny-moe": ModelSpec(
        arch="qwen3moe",
        n_layers=4,
        n_embd=256,
        n_ff=512,
        n_head=4,
        n_head_kv=2,
        head_dim=64,
        n_vocab=1024,
        expert_count=8,
        expert_used=2,
        n_ff_exp=256,
        qk_norm=True,
        types=_Q6_KEYS,
        name="synthetic-qwen3moe-4L",
    ),
}
