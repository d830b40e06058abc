"""Which device each tensor lands on for a placement, by llama.cpp's rules, and what each device holds.

llama.cpp offloads ``n_gpu_layers`` layers from the top: the output layer first, then the last
repeating layers; it keeps the input embedding on the CPU, splits GPU layers by ``tensor_split``, and then
moves every tensor whose name a buffer-override pattern matches (``re.search``) to that pattern's
device: the CPU, or (to fill a card) another GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from offload.planner.types import Anatomy, Placement

__all__ = [
    "CPU",
    "layer_devices",
    "output_device",
    "tensor_devices",
    "DeviceLoad",
    "device_loads",
    "split_for_counts",
]

CPU = -1


@lru_cache(maxsize=1024)
def _split_points(split: tuple[float, ...]) -> tuple[np.float32, ...]:
    """llama.cpp's split points: the cumulative shares, summed and divided in float32."""
    if not any(split):
        split = tuple([1.0] * len(split))  # llama.cpp splits by free memory then; equal cards
    acc, points = np.float32(0.0), []
    for s in split:
        acc = np.float32(acc + np.float32(s))
        points.append(acc)
    return tuple(np.float32(p / acc) for p in points)


def _gpu_for(il: int, i_gpu_start: int, act_gpu_layers: int, points: tuple[np.float32, ...]) -> int:
    # llama.cpp (llama-model.cpp, load_tensors): upper_bound over the split points of
    # float(il - i_gpu_start) / act_gpu_layers, all in float32. Whole-layer counts as the split
    # put each boundary exactly where the counts say.
    if len(points) <= 1:
        return 0
    x = np.float32(np.float32(il - i_gpu_start) / np.float32(max(act_gpu_layers, 1)))
    for i, point in enumerate(points):
        if x < point:
            return i
    return len(points) - 1


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
    return list(_layer_devices(n_layers, n_gpu_layers, n_gpus, tuple(split)))


@lru_cache(maxsize=8192)
def _layer_devices(
    n_layers: int, n_gpu_layers: int, n_gpus: int, split: tuple[float, ...]
) -> tuple[int, ...]:
    if n_gpus == 0 or n_gpu_layers <= 0:
        return (CPU,) * n_layers
    start = _gpu_start(n_layers, n_gpu_layers)
    act = min(n_gpu_layers, n_layers + 1)
    points = _split_points(split[:n_gpus] if split else tuple([1.0] * n_gpus))
    return tuple(CPU if il < start else _gpu_for(il, start, act, points) for il in range(n_layers))


def split_for_counts(counts: tuple[int, ...]) -> tuple[float, ...]:
    """The tensor_split that gives GPU i exactly ``counts[i]`` of the offloaded layers (the output
    layer counts as the last one): the counts themselves, which llama.cpp divides exactly."""
    return tuple(float(c) for c in counts)


def output_device(
    n_layers: int, n_gpu_layers: int, n_gpus: int, split: tuple[float, ...] = ()
) -> int:
    """Device of the output layer: on a GPU as soon as one layer is offloaded."""
    if n_gpus == 0 or n_gpu_layers <= 0:
        return CPU
    start = _gpu_start(n_layers, n_gpu_layers)
    points = _split_points(tuple(split[:n_gpus]) if split else tuple([1.0] * n_gpus))
    return _gpu_for(n_layers, start, min(n_gpu_layers, n_layers + 1), points)


@lru_cache(maxsize=4096)
def _moved(
    names: tuple[str, ...],
    gpu_patterns: tuple[tuple[str, int], ...],
    cpu_patterns: tuple[str, ...],
) -> dict[int, int]:
    """Tensor index -> device for every tensor an override moves, as llama.cpp applies them: the
    first pattern a name matches (``re.search``) wins, GPU overrides ahead of CPU ones."""
    if not gpu_patterns and not cpu_patterns:
        return {}
    rules = [(re.compile(p), g) for p, g in gpu_patterns] + [
        (re.compile(p), CPU) for p in cpu_patterns
    ]
    out: dict[int, int] = {}
    for i, n in enumerate(names):
        for rx, d in rules:
            if rx.search(n):
                out[i] = d
                break
    return out


def _cpu_patterns(placement: Placement, n_gpus: int) -> tuple[str, ...]:
    return tuple(placement.cpu_tensor_patterns) if n_gpus else ()


def _gpu_patterns(placement: Placement, n_gpus: int) -> tuple[tuple[str, int], ...]:
    """GPU overrides this machine can honour (a GPU index beyond its GPUs names none)."""
    return tuple((p, g) for p, g in placement.gpu_tensor_patterns if 0 <= g < n_gpus)


def tensor_devices(anatomy: Anatomy, placement: Placement, n_gpus: int) -> list[int]:
    """Device of every tensor of the anatomy, in order."""
    layers = layer_devices(anatomy.n_layers, placement.n_gpu_layers, n_gpus, placement.tensor_split)
    out_dev = output_device(
        anatomy.n_layers, placement.n_gpu_layers, n_gpus, placement.tensor_split
    )
    names = tuple(t.name for t in anatomy.tensors)
    moved = _moved(names, _gpu_patterns(placement, n_gpus), _cpu_patterns(placement, n_gpus))
    devs = []
    for i, t in enumerate(anatomy.tensors):
        if t.role == "embedding":
            devs.append(CPU)
        elif i in moved:
            devs.append(moved[i])
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
    # Largest expert tensor kept here (CPU only): op offload copies it to the main GPU for a
    # micro-batch, while that layer's activations are alive.
    largest_expert_bytes: int = 0
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
        tuple(placement.gpu_tensor_patterns),
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


@dataclass
class _Block:
    """Tensors that always share a device (one layer's, overridden or not): their sums."""

    weights_bytes: int = 0
    decode_bytes: float = 0.0
    expert_decode_bytes: float = 0.0
    output_decode_bytes: float = 0.0
    dense_flops: float = 0.0
    expert_flops: float = 0.0
    stream_bytes: int = 0
    stream_expert_bytes: int = 0
    repack_bytes: int = 0
    largest_dense_bytes: int = 0  # largest tensor that is neither expert nor output
    largest_expert_bytes: int = 0
    has_output: bool = False
    layers: set[int] = field(default_factory=set)


_BLOCKS: dict[tuple, tuple[Anatomy, dict[tuple, _Block], list[tuple]]] = {}


def _blocks(
    anatomy: Anatomy, patterns: tuple[str, ...], gpu_patterns: tuple[tuple[str, int], ...] = ()
) -> tuple[dict[tuple, _Block], list[tuple]]:
    """Tensors grouped by what decides their device, and each tensor's group.

    Groups: ("emb",) the input embedding (always the CPU), ("cpu",) tensors outside the repeating
    layers and the output (the CPU), ("out", to) the output layer, ("L", il, to) a layer's tensors,
    where ``to`` is the device an override pattern moves them to (``CPU`` or a GPU index), or
    None where none does (they go where their layer goes).
    """
    key = (id(anatomy), patterns, gpu_patterns)
    hit = _BLOCKS.get(key)
    if hit is not None and hit[0] is anatomy:
        return hit[1], hit[2]
    names = tuple(t.name for t in anatomy.tensors)
    moved = _moved(names, gpu_patterns, patterns)
    share = (anatomy.expert_used_count / anatomy.expert_count) if anatomy.expert_count else 1.0
    vocab = max(anatomy.n_vocab, 1)
    blocks: dict[tuple, _Block] = {}
    groups: list[tuple] = []
    for i, (t, (layer, role, nbytes, flops, repack)) in enumerate(
        zip(anatomy.tensors, _rows(anatomy), strict=True)
    ):
        if t.role == "embedding":
            g: tuple = ("emb",)
        elif t.layer is not None and t.layer < anatomy.n_layers:
            g = ("L", t.layer, moved.get(i))
        elif t.layer is None and t.name.startswith("output"):
            g = ("out", moved.get(i))
        else:
            g = ("cpu",)
        groups.append(g)
        b = blocks.setdefault(g, _Block())
        b.weights_bytes += nbytes
        if layer is not None:
            b.layers.add(layer)
        if role == "embedding":
            b.decode_bytes += nbytes / vocab  # one row per token
            continue
        if role == "expert":
            b.decode_bytes += nbytes * share
            b.expert_decode_bytes += nbytes * share
            b.expert_flops += flops * share
            b.stream_expert_bytes += nbytes
            b.largest_expert_bytes = max(b.largest_expert_bytes, nbytes)
        else:
            b.decode_bytes += nbytes
            b.dense_flops += flops
        if role == "output":
            b.has_output = True
            b.output_decode_bytes += nbytes
        elif role != "expert":
            b.largest_dense_bytes = max(b.largest_dense_bytes, nbytes)
        b.stream_bytes += nbytes
        b.repack_bytes += repack
    if len(_BLOCKS) > 4096:
        _BLOCKS.clear()
    _BLOCKS[key] = (anatomy, blocks, groups)
    return blocks, groups


def _add(ld: DeviceLoad, b: _Block, on_cpu: bool) -> None:
    ld.weights_bytes += b.weights_bytes
    ld.decode_bytes += b.decode_bytes
    ld.expert_decode_bytes += b.expert_decode_bytes
    ld.output_decode_bytes += b.output_decode_bytes
    ld.dense_flops += b.dense_flops
    ld.expert_flops += b.expert_flops
    ld.has_output = ld.has_output or b.has_output
    ld.layers |= b.layers
    if on_cpu:
        # What op offload streams to a GPU, and what the CPU repacks for its own kernels.
        ld.stream_bytes += b.stream_bytes
        ld.stream_expert_bytes += b.stream_expert_bytes
        ld.repack_bytes += b.repack_bytes
        ld.largest_expert_bytes = max(ld.largest_expert_bytes, b.largest_expert_bytes)


def _device_loads(
    anatomy: Anatomy, placement: Placement, n_gpus: int
) -> tuple[dict[int, DeviceLoad], list[int]]:
    blocks, groups = _blocks(
        anatomy, _cpu_patterns(placement, n_gpus), _gpu_patterns(placement, n_gpus)
    )
    layers = layer_devices(anatomy.n_layers, placement.n_gpu_layers, n_gpus, placement.tensor_split)
    out_dev = output_device(
        anatomy.n_layers, placement.n_gpu_layers, n_gpus, placement.tensor_split
    )

    def device(g: tuple) -> int:
        if g[0] == "L":
            return layers[g[1]] if g[2] is None else g[2]
        if g[0] == "out":
            return out_dev if g[1] is None else g[1]
        return CPU

    loads: dict[int, DeviceLoad] = {CPU: DeviceLoad(), **{i: DeviceLoad() for i in range(n_gpus)}}
    where = {g: device(g) for g in blocks}
    for g, b in blocks.items():
        d = where[g]
        _add(loads[d], b, d == CPU)
        # A dense tensor an override moved off a GPU layer: op offload copies it whole into the
        # GPU's compute buffer for prompt processing. (The output layer's matmul covers only the
        # tokens that need logits: too small to offload.)
        if g[0] == "L" and g[2] == CPU and layers[g[1]] != CPU:
            cpu = loads[CPU]
            cpu.largest_moved_dense_bytes = max(
                cpu.largest_moved_dense_bytes, b.largest_dense_bytes
            )
    if anatomy.tied_embeddings:
        emb = next((t for t in anatomy.tensors if t.role == "embedding"), None)
        if emb is not None:
            ld = loads[out_dev]
            if out_dev != CPU:
                ld.weights_bytes += emb.nbytes  # llama.cpp duplicates token_embd as output there
            else:
                ld.stream_bytes += emb.nbytes
            ld.decode_bytes += emb.nbytes
            ld.output_decode_bytes += emb.nbytes
            ld.dense_flops += 2 * _elements(emb.shape)
            ld.has_output = True
    return loads, [where[g] for g in groups]
