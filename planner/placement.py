"""Which device each tensor lands on for a placement, by llama.cpp's rules, and what each device holds.

llama.cpp offloads ``n_gpu_layers`` layers from the top: the output layer first, then the last
repeating layers; it keeps the input embedding on the CPU, splits GPU layers by ``tensor_split``, and then
moves every tensor whose name a buffer-override pattern matches (``re.search``) to the CPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import lru_cache

from offload.planner.types import Anatomy, Placement

__all__ = ["CPU", "layer_devices", "output_device", "tensor_devices", "DeviceLoad", "device_loads"]

CPU = -1


def _gpu_for(il: int, i_gpu_start: int, act_gpu_layers: int, split: tuple[float, ...]) -> int:
    # llama.cpp: upper_bound over the cumulative split of (il - i_gpu_start) / act_gpu_layers.
    if len(split) <= 1:
        return 0
    total = sum(split) or 1.0
    x = (il - i_gpu_start) / max(act_gpu_layers, 1)
    acc = 0.0
    for i, s in enumerate(split):
        acc += s / total
        if x < acc:
            return i
    return len(split) - 1


def _gpu_start(n_layers: int, n_gpu_layers: int) -> int:
    # llama.cpp counts the output layer as layer n_layers and offloads from the top down: the
    # output layer goes first, then the last repeating layers (i_gpu_start = n_layer + 1 - ngl).
    return max(n_layers + 1 - n_gpu_layers, 0)


def layer_devices(
    n_layers: int, n_gpu_layers: int, n_gpus: int, split: tuple[float, ...] = ()
) -> list[int]:
    """Device of each repeating layer: a GPU index or ``CPU``.

    ``n_gpu_layers`` = k puts the output layer and the last k - 1 repeating layers on the GPUs
    (llama.cpp's rule, confirmed by its buffer sizes on the H100 sweep); n_layers + 1 is all.
    """
    if n_gpus == 0 or n_gpu_layers <= 0:
        return [CPU] * n_layers
    start = _gpu_start(n_layers, n_gpu_layers)
    act = min(n_gpu_layers, n_layers + 1)
    split = split[:n_gpus] if split else tuple([1.0] * n_gpus)
    return [CPU if il < start else _gpu_for(il, start, act, split) for il in range(n_layers)]


def output_device(
    n_layers: int, n_gpu_layers: int, n_gpus: int, split: tuple[float, ...] = ()
) -> int:
    """Device of the output layer: on a GPU as soon as one layer is offloaded."""
    if n_gpus == 0 or n_gpu_layers <= 0:
        return CPU
    start = _gpu_start(n_layers, n_gpu_layers)
    split = split[:n_gpus] if split else tuple([1.0] * n_gpus)
    return _gpu_for(n_layers, start, min(n_gpu_layers, n_layers + 1), split)


@lru_cache(maxsize=4096)
def _matched(names: tuple[str, ...], patterns: tuple[str, ...]) -> frozenset[int]:
    if not patterns:
        return frozenset()
    rx = [re.compile(p) for p in patterns]
    return frozenset(i for i, n in enumerate(names) if any(r.search(n) for r in rx))


def tensor_devices(anatomy: Anatomy, placement: Placement, n_gpus: int) -> list[int]:
    """Device of every tensor of the anatomy, in order."""
    layers = layer_devices(anatomy.n_layers, placement.n_gpu_layers, n_gpus, placement.tensor_split)
    out_dev = output_device(
        anatomy.n_layers, placement.n_gpu_layers, n_gpus, placement.tensor_split
    )
    names = tuple(t.name for t in anatomy.tensors)
    forced = _matched(names, tuple(placement.cpu_tensor_patterns)) if n_gpus else frozenset()
    devs = []
    for i, t in enumerate(anatomy.tensors):
        if t.role == "embedding" or i in forced:
            devs.append(CPU)
        elif t.layer is not None and t.layer < anatomy.n_layers:
            devs.append(layers[t.layer])
        elif t.layer is None and t.name.startswith("output"):
            devs.append(out_dev)
        else:
            devs.append(CPU)
    return devs


@dataclass
class DeviceLoad:
    """What one device holds and does per token (aggregated from tensors)."""

    weights_bytes: int = 0
    decode_bytes: float = 0.0  # bytes read per generated token
    expert_decode_bytes: float = 0.0  # the expert part of decode_bytes
    output_decode_bytes: float = 0.0  # the output-layer part of decode_bytes
    dense_flops: float = 0.0  # flops per token of non-expert matmuls
    expert_flops: float = 0.0  # flops per token of the active experts
    stream_bytes: int = 0  # bytes op offload streams to a GPU per ubatch (CPU only)
    stream_expert_bytes: int = 0  # the expert part of stream_bytes (only used experts are copied)
    repack_bytes: int = 0
    # Largest dense tensor an override pattern moved here from a GPU layer: op offload copies it
    # into the GPU's compute buffer for prompt processing (CPU only).
    largest_moved_dense_bytes: int = 0
    layers: set[int] = field(default_factory=set)
    has_output: bool = False


def _elements(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# (anatomy, per-tensor rows) by id: the search evaluates hundreds of placements of one anatomy.
_ROWS: dict[int, tuple[Anatomy, list[tuple[int | None, str, int, int, int]]]] = {}


def _rows(anatomy: Anatomy) -> list[tuple[int | None, str, int, int, int]]:
    """Per tensor: (layer, role, bytes, matmul flops per token at full share, repack bytes)."""
    hit = _ROWS.get(id(anatomy))
    if hit is not None and hit[0] is anatomy:
        return hit[1]
    from offload.planner.memory import repack_bytes  # local: memory has no placement logic

    rows = []
    for t in anatomy.tensors:
        flops = 2 * _elements(t.shape) if len(t.shape) >= 2 else 0
        rows.append((t.layer, t.role, t.nbytes, flops, repack_bytes([t])))
    if len(_ROWS) > 64:
        _ROWS.clear()
    _ROWS[id(anatomy)] = (anatomy, rows)
    return rows


_LOADS: dict[tuple, tuple[Anatomy, dict[int, DeviceLoad], list[int]]] = {}


def device_loads(
    anatomy: Anatomy, placement: Placement, n_gpus: int
) -> tuple[dict[int, DeviceLoad], list[int]]:
    """Per-device loads (``CPU`` and GPU indices) and the device of every tensor (cached, do not mutate)."""
    key = (
        id(anatomy),
        placement.n_gpu_layers,
        tuple(placement.cpu_tensor_patterns),
        tuple(placement.tensor_split),
        n_gpus,
    )
    hit = _LOADS.get(key)
    if hit is not None and hit[0] is anatomy:
        return hit[1], hit[2]
    loads, devs = _device_loads(anatomy, placement, n_gpus)
    if len(_LOADS) > 4096:
        _LOADS.clear()
    _LOADS[key] = (anatomy, loads, devs)
    return loads, devs


def _device_loads(
    anatomy: Anatomy, placement: Placement, n_gpus: int
) -> tuple[dict[int, DeviceLoad], list[int]]:
    devs = tensor_devices(anatomy, placement, n_gpus)
    home = tensor_devices(anatomy, replace(placement, cpu_tensor_patterns=()), n_gpus)  # before overrides
    loads: dict[int, DeviceLoad] = {CPU: DeviceLoad(), **{g: DeviceLoad() for g in range(n_gpus)}}
    share = (anatomy.expert_used_count / anatomy.expert_count) if anatomy.expert_count else 1.0
    vocab = max(anatomy.n_vocab, 1)
    for (layer, role, nbytes, flops, repack), d, h in zip(_rows(anatomy), devs, home, strict=True):
        ld = loads[d]
        # (The output layer's matmul covers only the tokens that need logits: too small to offload.)
        if d == CPU and h != CPU and role not in ("expert", "output"):
            ld.largest_moved_dense_bytes = max(ld.largest_moved_dense_bytes, nbytes)
        ld.weights_bytes += nbytes
        if layer is not None:
            ld.layers.add(layer)
        if role == "embedding":
            ld.decode_bytes += nbytes / vocab  # one row per token
            continue
        if role == "expert":
            ld.decode_bytes += nbytes * share
            ld.expert_decode_bytes += nbytes * share
            ld.expert_flops += flops * share
        else:
            ld.decode_bytes += nbytes
            ld.dense_flops += flops
        if role == "output":
            ld.has_output = True
            ld.output_decode_bytes += nbytes
        if d == CPU:
            ld.stream_bytes += nbytes
            if role == "expert":
                ld.stream_expert_bytes += nbytes
            ld.repack_bytes += repack
    if anatomy.tied_embeddings:
        emb = next((t for t in anatomy.tensors if t.role == "embedding"), None)
        if emb is not None:
            od = output_device(
                anatomy.n_layers, placement.n_gpu_layers, n_gpus, placement.tensor_split
            )
            ld = loads[od]
            if od != CPU:
                ld.weights_bytes += emb.nbytes  # llama.cpp duplicates token_embd as output there
            else:
                ld.stream_bytes += emb.nbytes
            ld.decode_bytes += emb.nbytes
            ld.output_decode_bytes += emb.nbytes
            ld.dense_flops += 2 * _elements(emb.shape)
            ld.has_output = True
    return loads, devs
