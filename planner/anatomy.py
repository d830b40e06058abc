"""A model's anatomy from its GGUF header: tensors with roles and bytes, KV-cache and state needs."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from gguf.constants import GGMLQuantizationType

from offload.planner.errors import GGUFError
from offload.planner.gguf_header import GGUFHeader, read_header
from offload.planner.gguf_limits import LLAMA_MAX_LAYERS
from offload.planner.types import Anatomy, TensorInfo

__all__ = ["read", "from_header", "tensor_role", "KNOWN_ARCHS"]

log = logging.getLogger(__name__)

_LAYER = re.compile(r"^blk\.(\d+)\.")

# Architectures whose KV/state layout we model explicitly; others get generic accounting.
_ATTENTION_ARCHS = frozenset(
    {
        "llama",
        "mistral3",
        "qwen2",
        "qwen2moe",
        "qwen3",
        "qwen3moe",
        "gemma",
        "gemma2",
        "gemma3",
        "phi3",
        "deepseek2",
        "granite",
        "granitemoe",
        "command-r",
        "cohere2",
        "olmo2",
        "starcoder2",
        "gpt-oss",
        "mixtral",
    }
)
_RECURRENT_ARCHS = frozenset({"mamba", "mamba2"})
_HYBRID_ARCHS = frozenset({"granitehybrid", "jamba", "falcon-h1"})
KNOWN_ARCHS = _ATTENTION_ARCHS | _RECURRENT_ARCHS | _HYBRID_ARCHS

# llama.cpp's sliding-window layer patterns: a layer il is SWA when il % n < n - 1.
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "gpt-oss": 2}


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
    if "ffn_gate_inp" in name or "exp_probs_b" in name:
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


class _Meta:
    """Typed access to ``{arch}.*`` metadata, including per-layer arrays.

    A value of the wrong type is the file's fault, so it is a ``GGUFError`` naming the key.
    """

    def __init__(self, md: dict[str, Any], arch: str, n_layers: int, path: str) -> None:
        self.md, self.arch, self.n, self.path = md, arch, n_layers, path

    def raw(self, key: str) -> Any:
        return self.md.get(f"{self.arch}.{key}")

    def _int(self, key: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) > 1 << 62:
            raise GGUFError(self.path, f"{self.arch}.{key} is {str(v)[:40]!r}, expected a count")
        return int(v)

    def scalar(self, key: str, default: int = 0) -> int:
        v = self.raw(key)
        if isinstance(v, list):
            v = max((self._int(key, x) for x in v), default=None)
        return default if v is None else self._int(key, v)

    def per_layer(self, key: str, default: int) -> list[int]:
        v = self.raw(key)
        if isinstance(v, list) and len(v) == self.n:
            return [self._int(key, x) for x in v]
        return [self.scalar(key, default)] * self.n


def _layer_kinds(arch: str, m: _Meta, head_kv: list[int], has_ssm: bool) -> list[str]:
    if arch in _RECURRENT_ARCHS:
        return ["recurrent"] * m.n
    if arch == "falcon-h1":
        return ["both"] * m.n  # attention and Mamba2 side by side in every layer
    if has_ssm and isinstance(m.raw("attention.head_count_kv"), list):
        # Hybrids (granitehybrid, jamba) mark recurrent layers with head_count_kv = 0.
        return ["attention" if h > 0 else "recurrent" for h in head_kv]
    return ["attention" if h > 0 else "none" for h in head_kv]


def _recurrent_bytes(m: _Meta) -> int:
    """Per-sequence, per-layer Mamba state in f32 (llama.cpp's r and s caches)."""
    d_conv = m.scalar("ssm.conv_kernel")
    d_inner = m.scalar("ssm.inner_size")
    d_state = m.scalar("ssm.state_size")
    n_group = m.scalar("ssm.group_count")
    conv = max(d_conv - 1, 0) * (d_inner + 2 * n_group * d_state)
    return (conv + d_state * d_inner) * 4


def from_header(h: GGUFHeader) -> Anatomy:
    """Build the anatomy from a parsed header."""
    md = h.metadata
    arch = str(md.get("general.architecture", "unknown"))
    warnings: list[str] = []
    n_layers = _Meta(md, arch, 0, h.path).scalar("block_count")
    tensors = []
    for t in h.tensors:
        mt = _LAYER.match(t.name)
        tensors.append(
            TensorInfo(
                name=t.name,
                layer=int(mt.group(1)) if mt else None,
                role=tensor_role(t.name),
                ggml_type=_type_name(t.ggml_type),
                nbytes=t.nbytes,
                shape=t.shape,
            )
        )
    if n_layers == 0:
        n_layers = 1 + max((t.layer for t in tensors if t.layer is not None), default=-1)
        if n_layers > LLAMA_MAX_LAYERS:
            raise GGUFError(
                h.path, f"its tensors name {n_layers} layers, more than llama.cpp loads"
            )
        warnings.append(
            f"no {arch}.block_count in the header; counted {n_layers} layers from tensors"
        )
    m = _Meta(md, arch, n_layers, h.path)
    if arch not in KNOWN_ARCHS:
        warnings.append(
            f"architecture {arch!r} is not modelled; using generic per-layer accounting"
        )

    n_embd = m.scalar("embedding_length")
    n_head = m.scalar("attention.head_count")
    head_kv = m.per_layer("attention.head_count_kv", n_head)
    head_k = m.scalar("attention.key_length", n_embd // n_head if n_head else 0)
    head_v = m.scalar("attention.value_length", head_k)
    kv_lora = m.scalar("attention.kv_lora_rank")
    if kv_lora:
        # MLA (deepseek2): one compressed KV "head": K = latent + rope part, V = latent.
        n_rot = m.scalar("rope.dimension_count", 64)
        head_k = m.scalar("attention.key_length_mla", kv_lora + n_rot)
        head_v = m.scalar("attention.value_length_mla", kv_lora)
        head_kv = [1] * n_layers
    has_ssm = m.raw("ssm.state_size") is not None
    kinds = _layer_kinds(arch, m, head_kv, has_ssm)
    kv_f16 = [
        hk * (head_k + head_v) * 2 if kinds[i] in ("attention", "both") else 0
        for i, hk in enumerate(head_kv)
    ]
    state = _recurrent_bytes(m) if has_ssm else 0
    state_per_layer = [state if k in ("recurrent", "both") else 0 for k in kinds]

    window = m.scalar("attention.sliding_window")
    pattern = _SWA_PATTERN.get(arch)
    swa = [
        window if window and pattern and il % pattern < pattern - 1 else 0 for il in range(n_layers)
    ]

    names = {t.name for t in tensors}
    tied = "output.weight" not in names and "token_embd.weight" in names
    vocab = h.array_lengths.get("tokenizer.ggml.tokens") or m.scalar("vocab_size")
    if not vocab:
        emb = next((t for t in tensors if t.name == "token_embd.weight"), None)
        vocab = emb.shape[-1] if emb and emb.shape else 0
    for w in warnings:
        log.warning("%s: %s", h.path, w)
    return Anatomy(
        path=h.path,
        arch=arch,
        name=str(md.get("general.name", "")),
        n_layers=n_layers,
        n_ctx_train=m.scalar("context_length", 4096),
        n_embd=n_embd,
        n_vocab=int(vocab),
        tensors=tuple(tensors),
        file_bytes=h.file_bytes,
        kv_bytes_per_token_f16=tuple(kv_f16),
        swa_window=tuple(swa),
        recurrent_state_bytes=sum(state_per_layer),
        expert_count=m.scalar("expert_count"),
        expert_used_count=m.scalar("expert_used_count"),
        n_head=n_head,
        n_head_kv=max(head_kv, default=0),
        head_dim_k=head_k,
        head_dim_v=head_v,
        chat_template=md.get("tokenizer.chat_template"),
        file_type=str(md.get("general.file_type", "")),
        warnings=tuple(warnings),
        n_ff=m.scalar("feed_forward_length"),
        n_ff_exp=m.scalar("expert_feed_forward_length"),
        layer_kinds=tuple(kinds),
        tied_embeddings=tied,
        recurrent_state_bytes_per_layer=tuple(state_per_layer),
        kv_lora_rank=kv_lora,
        known_arch=arch in KNOWN_ARCHS,
    )


def read(path: str | os.PathLike[str]) -> Anatomy:
    """Read a GGUF file's anatomy from its header alone."""
    return from_header(read_header(path))
