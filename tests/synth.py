"""Synthetic GGUF files for tests: tiny models and LoRA adapters written with the gguf package."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

__all__ = ["write_model", "write_lora", "GEMMA3_270M_Q_SHAPE"]

#: attn_q of gemma3:270m as numpy sees it (rows = outputs): 4 heads x 256 = 1024 by 640 embd.
GEMMA3_270M_Q_SHAPE = (1024, 640)
GEMMA3_270M_LAYERS = 18


def write_model(path: Path, *, embd: int = 256, seed: int = 0) -> Path:
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
