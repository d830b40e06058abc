"""Synthetic GGUF models with real random weights, for timing llama.cpp placements.

Standalone (gguf + numpy only) so the device can write models while llama.cpp builds. Quantized
tensors are random blocks whose scale fields are set to small finite values: the data costs what
real weights cost to read and multiply, and activations stay finite. Usage:

    python bench/synth_models.py dense /tmp/synth-dense.gguf    # Mistral-7B shape, 4.6 GB
    python bench/synth_models.py moe /tmp/synth-moe.gguf        # Qwen3-30B-A3B shape, 19.6 GB
    python bench/synth_models.py tiny-dense|tiny-moe PATH       # seconds to write, for CPU tests
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:  # gguf's package init imports yaml for model cards only; a bare device may lack it
    import yaml  # noqa: F401
except ImportError:
    import types

    sys.modules["yaml"] = types.ModuleType("yaml")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter  # noqa: E402

__all__ = ["Spec", "SPECS", "write_model", "tensors"]

Q = GGMLQuantizationType
ATTN_OUT_SCALE = 1e-7


@dataclass(frozen=True)
class Spec:
    """Shape and quantization of a synthetic llama-family model (llama.cpp tensor names)."""

    arch: str
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    head_dim: int = 0
    n_ctx_train: int = 32768
    expert_count: int = 0
    expert_used: int = 0
    n_ff_exp: int = 0
    qk_norm: bool = False
    q6_keys: tuple[str, ...] = ("attn_v", "ffn_down", "output.")
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def hd(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


SPECS = {
    "dense": Spec("llama", 32, 4096, 14336, 32, 8, 32000),
    "moe": Spec("qwen3moe", 48, 2048, 6144, 32, 4, 151936, head_dim=128, n_ctx_train=40960,
                expert_count=128, expert_used=8, n_ff_exp=768, qk_norm=True),
    "tiny-dense": Spec("llama", 4, 256, 512, 4, 2, 1024, n_ctx_train=4096),
    "tiny-moe": Spec("qwen3moe", 4, 256, 512, 4, 2, 1024, head_dim=64, n_ctx_train=4096,
                     expert_count=8, expert_used=2, n_ff_exp=256, qk_norm=True),
}


def tensors(s: Spec) -> list[tuple[str, tuple[int, ...]]]:
    """(name, ggml shape ne0 first) of every tensor."""
    e, hd = s.n_embd, s.hd
    out: list[tuple[str, tuple[int, ...]]] = [
        ("token_embd.weight", (e, s.n_vocab)), ("output_norm.weight", (e,)), ("output.weight", (e, s.n_vocab))]
    for i in range(s.n_layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (e,)), (b + "attn_q.weight", (e, s.n_head * hd)),
                (b + "attn_k.weight", (e, s.n_head_kv * hd)), (b + "attn_v.weight", (e, s.n_head_kv * hd)),
                (b + "attn_output.weight", (s.n_head * hd, e)), (b + "ffn_norm.weight", (e,))]
        if s.qk_norm:
            out += [(b + "attn_q_norm.weight", (hd,)), (b + "attn_k_norm.weight", (hd,))]
        if s.expert_count:
            n, f = s.expert_count, s.n_ff_exp
            out += [(b + "ffn_gate_inp.weight", (e, n)), (b + "ffn_gate_exps.weight", (e, f, n)),
                    (b + "ffn_up_exps.weight", (e, f, n)), (b + "ffn_down_exps.weight", (f, e, n))]
        else:
            out += [(b + "ffn_gate.weight", (e, s.n_ff)), (b + "ffn_up.weight", (e, s.n_ff)),
                    (b + "ffn_down.weight", (s.n_ff, e))]
    return out


def _qtype(s: Spec, name: str, shape: tuple[int, ...]) -> Q:
    if len(shape) == 1 or "norm" in name or "gate_inp" in name:
        return Q.F32
    return Q.Q6_K if any(k in name for k in s.q6_keys) else Q.Q4_K


def _nbytes(qt: Q, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[qt]
    return int(np.prod(shape)) // block * size


def _block_pool(qt: Q, rng: np.random.Generator, n_bytes: int, scale: float = 1e-4) -> bytes:
    """Random quant blocks with small, finite and zero-mean weights.

    Zero mean matters for MoE timing: weights with a common offset give every hidden state a
    shared direction, the random router then sends most tokens to the same few experts, and
    llama.cpp's op offload, which copies only the experts a micro-batch uses, moves a fraction of
    the bytes a trained (load-balanced) model makes it move.
    """
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
    return blocks.tobytes()


def write_model(path: str | os.PathLike[str], kind_or_spec: str | Spec, seed: int = 0,
                header_only: bool = False) -> Path:
    """Write the model (tokenizer included, so llama.cpp loads it); returns the path.

    ``header_only`` leaves the tensor data as a hole (a sparse file of the full size): enough for
    the planner, which reads only the header, in seconds and without the disk space.
    """
    s = SPECS[kind_or_spec] if isinstance(kind_or_spec, str) else kind_or_spec
    p = Path(path)
    tmp = p.with_name(p.name + ".part")
    a = s.arch
    w = GGUFWriter(str(tmp), a)
    w.add_uint32(f"{a}.block_count", s.n_layers)
    w.add_uint32(f"{a}.context_length", s.n_ctx_train)
    w.add_uint32(f"{a}.embedding_length", s.n_embd)
    w.add_uint32(f"{a}.feed_forward_length", s.n_ff)
    w.add_uint32(f"{a}.attention.head_count", s.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", s.n_head_kv)
    w.add_uint32(f"{a}.attention.key_length", s.hd)
    w.add_uint32(f"{a}.attention.value_length", s.hd)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{a}.rope.freq_base", 10000.0)
    w.add_uint32(f"{a}.vocab_size", s.n_vocab)
    if s.expert_count:
        w.add_uint32(f"{a}.expert_count", s.expert_count)
        w.add_uint32(f"{a}.expert_used_count", s.expert_used)
        w.add_uint32(f"{a}.expert_feed_forward_length", s.n_ff_exp)
    w.add_uint32("general.file_type", 15)  # Q4_K_M
    w.add_string("general.name", f"synthetic-{a}-{s.n_layers}L")
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    toks = (toks + [f"t{i}" for i in range(s.n_vocab - len(toks))])[: s.n_vocab]
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * len(toks))
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(toks) - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    layout = []
    for name, shape in tensors(s):
        qt = _qtype(s, name, shape)
        nb = _nbytes(qt, shape)
        w.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), nb, raw_dtype=qt)
        layout.append((name, qt, nb))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    if header_only:
        with tmp.open("r+b") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell() + (-f.tell() % 32) + sum(nb + (-nb % 32) for _, _, nb in layout)
            f.truncate(size)
        os.replace(tmp, p)
        return p
    rng = np.random.default_rng(seed)
    pools = {qt: _block_pool(qt, rng, 64 << 20) for qt in (Q.Q4_K, Q.Q6_K)}
    # Attention's output projection, scaled down: random attention averages over the positions, and
    # at full scale that average swamps every token's own state within a few layers, so all tokens
    # route to the same experts (a trained model's residual stream keeps tokens apart).
    quiet = {qt: _block_pool(qt, rng, 8 << 20, scale=ATTN_OUT_SCALE) for qt in (Q.Q4_K, Q.Q6_K)}
    align = 32
    with tmp.open("r+b") as f:
        f.seek(0, os.SEEK_END)
        f.write(bytes(-f.tell() % align))
        for name, qt, nb in layout:
            if qt == Q.F32:
                if "gate_inp" in name:  # router weights: varied so that different experts win
                    data = rng.normal(0, 0.02, nb // 4).astype(np.float32).tobytes()
                else:  # norms
                    data = np.ones(nb // 4, dtype=np.float32).tobytes()
                f.write(data)
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
            f.write(bytes(-nb % align))
    os.replace(tmp, p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line: write one model unless it is already there."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=sorted(SPECS))
    ap.add_argument("path")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    if Path(args.path).exists() and not args.force:
        print(f"{args.path} exists")
        return 0
    t0 = time.perf_counter()
    p = write_model(args.path, args.kind)
    print(f"wrote {p} ({p.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
