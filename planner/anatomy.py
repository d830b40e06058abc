"""A model's anatomy from its GGUF header: tensors with roles and bytes, KV-cache and state needs."""

from __future__ import annotations

import os
import re

from gguf.constants import GGMLQuantizationType

from offload.planner.gguf_header import GGUFHeader, read_header
from offload.planner.types import Anatomy, TensorInfo

__all__ = ["read", "from_header", "tensor_role"]

_LAYER = re.compile(r"^blk\.(\d+)\.")


def tensor_role(name: str) -> str:
    """Classify a tensor by llama.cpp's naming: attention, ffn, expert, shared_expert, router, ..."""
    if name.startswith("token_embd"):
        return "embedding"
    if name.startswith("output_norm"):
        return "norm"
    if name.startswith("output"):
        return "output"
    if "_exps" in name:
        return "expert"
    if "_shexp" in name:
        return "shared_expert"
    if "ffn_gate_inp" in name:
        return "router"
    if "norm" in name:
        return "norm"
    if ".ssm_" in name:
        return "ssm"
    if ".attn_" in name:
        return "attention"
    if ".ffn_" in name:
        return "ffn"
    return "other"


def _type_name(t: int) -> str:
    try:
        return GGMLQuantizationType(t).name
    except ValueError:
        return str(t)


def from_header(h: GGUFHeader) -> Anatomy:
    """Build the anatomy from a parsed header."""
    md = h.metadata
    arch = str(md.get("general.architecture", "unknown"))

    def get(key: str, default: int = 0) -> int:
        v = md.get(f"{arch}.{key}", default)
        if isinstance(v, list):
            v = max(v) if v else default
        return int(v)

    n_layers = get("block_count")
    n_embd = get("embedding_length")
    n_head = get("attention.head_count")
    n_head_kv = get("attention.head_count_kv", n_head) or n_head
    head_k = get("attention.key_length", n_embd // n_head if n_head else 0)
    head_v = get("attention.value_length", head_k)
    kv_per_layer = n_head_kv * (head_k + head_v) * 2
    tensors = []
    for t in h.tensors:
        m = _LAYER.match(t.name)
        tensors.append(
            TensorInfo(
                name=t.name,
                layer=int(m.group(1)) if m else None,
                role=tensor_role(t.name),
                ggml_type=_type_name(t.ggml_type),
                nbytes=t.nbytes,
                shape=t.shape,
            )
        )
    vocab = h.array_lengths.get("tokenizer.ggml.tokens", get("vocab_size"))
    return Anatomy(
        path=h.path,
        arch=arch,
        name=str(md.get("general.name", "")),
        n_layers=n_layers,
        n_ctx_train=get("context_length", 4096),
        n_embd=n_embd,
        n_vocab=int(vocab),
        tensors=tuple(tensors),
        file_bytes=h.file_bytes,
        kv_bytes_per_token_f16=tuple([kv_per_layer] * n_layers),
        swa_window=tuple([0] * n_layers),
        expert_count=get("expert_count"),
        expert_used_count=get("expert_used_count"),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_k,
        head_dim_v=head_v,
        chat_template=md.get("tokenizer.chat_template"),
    )


def read(path: str | os.PathLike[str]) -> Anatomy:
    """Read a GGUF file's anatomy from its header alone."""
    return from_header(read_header(path))
