"""Anatomy from GGUF headers: roles, bytes, KV and state sizes across architectures."""

from __future__ import annotations

import time
from pathlib import Path

from offload.planner import anatomy
from tests import synth


def test_dense_mistral_shape_has_gqa_kv_and_q6k_output(mistral) -> None:
    assert mistral.arch == "llama" and mistral.n_layers == 32
    # 8 KV heads x 128 dims x (K + V) x 2 bytes
    assert set(mistral.kv_bytes_per_token_f16) == {8 * 128 * 2 * 2}
    out = next(t for t in mistral.tensors if t.name == "output.weight")
    assert out.role == "output" and out.ggml_type == "Q6_K"
    assert not mistral.tied_embeddings
    assert 4.5e9 < mistral.weights_bytes < 5.0e9


def test_moe_counts_experts_and_classifies_expert_tensors(qwen_moe) -> None:
    assert (qwen_moe.expert_count, qwen_moe.expert_used_count, qwen_moe.n_ff_exp) == (128, 8, 768)
    roles = {t.role for t in qwen_moe.tensors}
    assert {"expert", "router", "attention", "norm", "embedding", "output"} <= roles
    experts = sum(t.nbytes for t in qwen_moe.tensors if t.role == "expert")
    assert experts > 0.9 * qwen_moe.weights_bytes


def test_twenty_gigabyte_header_reads_in_well_under_a_second(qwen_moe) -> None:
    t0 = time.perf_counter()
    a = anatomy.read(qwen_moe.path)
    assert time.perf_counter() - t0 < 0.5
    assert a.file_bytes > 19e9


def test_mamba_has_recurrent_state_and_no_kv(synth_dir: Path) -> None:
    a = anatomy.read(synth.write_model(synth_dir / "mamba.gguf", synth.mamba()))
    assert set(a.layer_kinds) == {"recurrent"} and not any(a.kv_bytes_per_token_f16)
    # (d_conv - 1) * d_inner + d_state * d_inner, f32, per layer
    assert a.recurrent_state_bytes == 64 * ((3 * 5120 + 16 * 5120) * 4)
    assert a.tied_embeddings


def test_mamba2_state_counts_groups(synth_dir: Path) -> None:
    a = anatomy.read(synth.write_model(synth_dir / "mamba2.gguf", synth.mamba2()))
    per_layer = (3 * (4096 + 2 * 1 * 128) + 128 * 4096) * 4
    assert a.recurrent_state_bytes_per_layer[0] == per_layer


def test_hybrid_splits_layers_into_attention_and_recurrent(synth_dir: Path) -> None:
    a = anatomy.read(synth.write_model(synth_dir / "hybrid.gguf", synth.granite_hybrid()))
    assert a.layer_kinds.count("attention") == 4 and a.layer_kinds.count("recurrent") == 20
    for kind, kv, st in zip(
        a.layer_kinds, a.kv_bytes_per_token_f16, a.recurrent_state_bytes_per_layer, strict=True
    ):
        assert (kv > 0) == (kind == "attention") and (st > 0) == (kind == "recurrent")


def test_mla_kv_uses_the_compressed_latent(synth_dir: Path) -> None:
    spec = synth.tiny_llama()
    spec.arch = "deepseek2"
    spec.extra_kv = {"deepseek2.attention.kv_lora_rank": 512, "deepseek2.rope.dimension_count": 64}
    a = anatomy.read(synth.write_model(synth_dir / "ds2.gguf", spec))
    assert a.kv_bytes_per_token_f16[0] == (512 + 64 + 512) * 2


def test_unknown_architecture_falls_back_with_a_warning(synth_dir: Path) -> None:
    spec = synth.tiny_llama()
    spec.arch = "brandnew"
    a = anatomy.read(synth.write_model(synth_dir / "new.gguf", spec))
    assert not a.known_arch and any("brandnew" in w for w in a.warnings)
    assert a.n_layers == 4 and a.kv_bytes_per_token_f16[0] > 0


def test_gemma3_real_model_has_swa_pattern_and_tied_embeddings(gemma_path: Path) -> None:
    a = anatomy.read(gemma_path)
    assert a.arch == "gemma3" and a.n_layers == 18 and a.tied_embeddings
    full = [il for il, w in enumerate(a.swa_window) if w == 0]
    assert full == [5, 11, 17] and set(a.swa_window) == {0, 512}
    assert set(a.kv_bytes_per_token_f16) == {1 * 256 * 2 * 2}
