"""What llama.cpp asserts on when it loads a model, checked from the header before it ever does.

llama.cpp trusts a model's hyperparameters: a layer count of 0 or above ``LLAMA_MAX_LAYERS``,
expert counts that disagree, an unknown rope scaling type, a norm epsilon that is NaN or negative,
a rope dimension count of 0 (which hangs), odd or wider than a head (which aborts) each kill the
process that loads or runs the model (``GGML_ASSERT``), taking every other model and client with
it. Each rule below was found by loading the real embedded model with one key changed. Values
that are merely absurd (a billion-token context, a million heads) are refused too: nothing real
has them, and the planner would size memory from them. Only keys that are present are checked,
so adapters and projectors, which lack most of them, pass.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from offload.planner.errors import GGUFError

__all__ = ["check_metadata", "LLAMA_MAX_LAYERS", "LLAMA_MAX_EXPERTS", "ROPE_SCALING_TYPES"]

#: llama.cpp's limits (src/llama-hparams.h of the bundled build).
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")

_ARCH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_LAYER = re.compile(r"^blk\.(\d+)\.")

# (key under "<arch>.", lowest, highest, may be a per-layer array)
_INTS: tuple[tuple[str, int, int, bool], ...] = (
    ("block_count", 1, LLAMA_MAX_LAYERS, False),
    ("context_length", 1, 1 << 28, False),
    ("embedding_length", 1, 1 << 20, False),
    ("feed_forward_length", 0, 1 << 22, True),
    ("expert_feed_forward_length", 0, 1 << 22, True),
    ("expert_shared_feed_forward_length", 0, 1 << 22, False),
    ("attention.head_count", 0, 1 << 14, True),
    ("attention.head_count_kv", 0, 1 << 14, True),
    ("attention.key_length", 1, 1 << 16, False),
    ("attention.value_length", 1, 1 << 16, False),
    ("attention.key_length_mla", 1, 1 << 16, False),
    ("attention.value_length_mla", 1, 1 << 16, False),
    ("attention.kv_lora_rank", 0, 1 << 16, False),
    ("attention.q_lora_rank", 0, 1 << 16, False),
    ("attention.sliding_window", 0, 1 << 30, False),
    ("rope.dimension_count", 1, 1 << 16, False),
    ("rope.dimension_count_swa", 1, 1 << 16, False),
    ("expert_count", 0, LLAMA_MAX_EXPERTS, False),
    ("expert_used_count", 0, LLAMA_MAX_EXPERTS, False),
    ("expert_group_count", 0, LLAMA_MAX_EXPERTS, False),
    ("expert_group_used_count", 0, LLAMA_MAX_EXPERTS, False),
    ("expert_shared_count", 0, LLAMA_MAX_EXPERTS, False),
    ("leading_dense_block_count", 0, LLAMA_MAX_LAYERS, False),
    ("vocab_size", 1, 1 << 24, False),
    ("ssm.conv_kernel", 0, 1 << 10, False),
    ("ssm.inner_size", 0, 1 << 20, False),
    ("ssm.state_size", 0, 1 << 20, False),
    ("ssm.group_count", 0, 1 << 14, False),
    ("ssm.time_step_rank", 0, 1 << 20, False),
)
_EPSILONS = (
    "attention.layer_norm_epsilon",
    "attention.layer_norm_rms_epsilon",
    "attention.group_norm_epsilon",
)
_POSITIVE_FLOATS = ("rope.freq_base", "rope.freq_base_swa")
_FINITE_FLOATS = (
    "rope.scaling.factor",
    "rope.scaling.attn_factor",
    "attn_logit_softcapping",
    "final_logit_softcapping",
)


def _fail(path: str, problem: str) -> GGUFError:
    return GGUFError(path, problem)


def _show(value: Any) -> str:
    """A value for a one-line message: short, whatever it is (float32s without their noise)."""
    text = f"{value:.6g}" if isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _ints(
    path: str, key: str, value: Any, lo: int, hi: int, may_be_array: bool, length: int | None
) -> list[int]:
    """The value as a list of integers in [lo, hi] (one item unless a per-layer array)."""
    if isinstance(value, list) or (value is None and length is not None):
        if not may_be_array:
            raise _fail(path, f"{key} is an array, expected one integer")
        if value is None:
            raise _fail(path, f"{key} has {length} entries, expected one per layer")
        if any(not _is_int(v) for v in value):
            raise _fail(path, f"{key} is {_show(value)}, expected integers")
        items = value
    elif _is_int(value):
        items = [value]
    else:
        raise _fail(path, f"{key} is {_show(value)}, expected an integer")
    for v in items:
        if not lo <= v <= hi:
            raise _fail(path, f"{key} is {v}, expected {lo} to {hi}")
    return items


def _check_experts(path: str, arch: str, found: Mapping[str, list[int]]) -> None:
    """llama.cpp's load_hparams asserts, in its order."""
    n_expert = found.get("expert_count", [0])[0]
    used = found.get("expert_used_count", [0])[0]
    groups = found.get("expert_group_count", [0])[0]
    group_used = found.get("expert_group_used_count", [0])[0]
    a = arch
    if used > n_expert:
        raise _fail(path, f"{a}.expert_used_count is {used}, more than the {n_expert} experts")
    if n_expert > 0:
        if used == 0:
            raise _fail(path, f"{a}.expert_used_count is 0 but the model has {n_expert} experts")
        if groups >= n_expert:
            raise _fail(path, f"{a}.expert_group_count is {groups}, expected fewer than {n_expert}")
        if groups > 1:
            if n_expert % groups:
                raise _fail(
                    path, f"{a}.expert_group_count {groups} does not divide {n_expert} experts"
                )
            if not 0 < group_used < groups:
                raise _fail(
                    path, f"{a}.expert_group_used_count is {group_used}, expected 1 to {groups - 1}"
                )
    elif groups:
        raise _fail(path, f"{a}.expert_group_count is {groups} but the model has no experts")


def _check_rope(path: str, arch: str, found: Mapping[str, list[int]]) -> None:
    heads = max(found.get("attention.head_count", [0]), default=0)
    head_k = found.get("attention.key_length", [0])[0]
    if not head_k and heads and "embedding_length" in found:
        head_k = found["embedding_length"][0] // heads
    for key in ("rope.dimension_count", "rope.dimension_count_swa"):
        if key not in found:
            continue
        n_rot = found[key][0]
        if n_rot % 2:
            raise _fail(path, f"{arch}.{key} is {n_rot}, expected an even number")
        if head_k and n_rot > head_k:
            raise _fail(path, f"{arch}.{key} is {n_rot}, more than the head size {head_k}")


def _check_floats(path: str, md: Mapping[str, Any], arch: str) -> None:
    for suffix in (*_EPSILONS, *_POSITIVE_FLOATS, *_FINITE_FLOATS):
        key = f"{arch}.{suffix}"
        if key not in md:
            continue
        v = md[key]
        if not _is_number(v):
            raise _fail(path, f"{key} is {_show(v)}, expected a number")
        if not math.isfinite(v):
            raise _fail(path, f"{key} is {_show(v)}, expected a finite number")
        if suffix in _EPSILONS and not 0 < v < 1:
            raise _fail(path, f"{key} is {_show(v)}, expected a small positive number such as 1e-6")
        if suffix in _POSITIVE_FLOATS and v <= 0:
            raise _fail(path, f"{key} is {_show(v)}, expected a positive number")
        if suffix in _FINITE_FLOATS and v < 0:
            raise _fail(path, f"{key} is {_show(v)}, expected zero or more")


def check_metadata(
    path: str,
    md: Mapping[str, Any],
    array_lengths: Mapping[str, int],
    tensor_names: Iterable[str] = (),
) -> None:
    """Raise ``GGUFError`` naming the key when the metadata holds what llama.cpp cannot survive."""
    arch = md.get("general.architecture")
    if arch is None:
        return
    if not isinstance(arch, str) or not _ARCH.match(arch):
        raise _fail(
            path,
            f"general.architecture is {_show(arch)}, expected a short name such as 'llama'",
        )
    for key in ("tokenizer.chat_template", "general.name"):
        if key in md and not isinstance(md[key], str):
            raise _fail(path, f"{key} is {_show(md[key])}, expected a string")
    found: dict[str, list[int]] = {}
    for suffix, lo, hi, may_be_array in _INTS:
        key = f"{arch}.{suffix}"
        if key in md:
            found[suffix] = _ints(path, key, md[key], lo, hi, may_be_array, array_lengths.get(key))
    n_layers = found.get("block_count", [0])[0]
    for suffix, _, _, may_be_array in _INTS:
        if may_be_array and isinstance(md.get(f"{arch}.{suffix}"), list) and n_layers:
            if len(found[suffix]) != n_layers:
                raise _fail(
                    path,
                    f"{arch}.{suffix} has {len(found[suffix])} entries for {n_layers} layers",
                )
    _check_experts(path, arch, found)
    _check_rope(path, arch, found)
    _check_floats(path, md, arch)
    scaling = md.get(f"{arch}.rope.scaling.type")
    if scaling is not None and scaling not in ROPE_SCALING_TYPES:
        raise _fail(
            path,
            f"{arch}.rope.scaling.type is {_show(scaling)}, expected one of "
            + ", ".join(ROPE_SCALING_TYPES),
        )
    has_attention = False
    for name in tensor_names:
        m = _LAYER.match(name)
        if m and n_layers and int(m.group(1)) >= n_layers:
            raise _fail(
                path, f"tensor {name!r} belongs to layer {m.group(1)} of a {n_layers}-layer model"
            )
        has_attention = has_attention or ".attn_q." in name or ".attn_qkv." in name
    if has_attention and "attention.head_count" in found and not any(found["attention.head_count"]):
        raise _fail(path, f"{arch}.attention.head_count is 0 in a model with attention tensors")
