"""Several GPUs: which offloaded layers each one takes, so that every card fits and is well used.

llama.cpp splits the offloaded layers (the output layer counts as the last) over the GPUs in
order, by the cumulative shares of ``tensor_split`` (placement.py follows its arithmetic);
tensors an override pattern matches stay on the CPU whatever GPU their layer went to. So the
layer boundary between cards decides each card's weights, KV cache and compute buffer. The split
is chosen per placement from the memory model itself: each GPU takes whole layers, counted into
``tensor_split`` so that llama.cpp's boundary falls exactly there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from offload.planner.evaluate import device_budgets, memory_by_device
from offload.planner.placement import split_for_counts
from offload.planner.types import Anatomy, Hardware, Placement, PlanRequest

__all__ = ["fit_split", "FASTER_GPU"]

# A GPU with this much more memory bandwidth than the other takes as many layers as fit on it.
FASTER_GPU = 1.05


def _gpu_totals(
    anatomy: Anatomy, hw: Hardware, placement: Placement, overheads: list[int]
) -> list[int]:
    mem = memory_by_device(anatomy, hw, placement)
    out = []
    for i in range(len(hw.gpus)):
        w, k, c, _ = mem[i]
        out.append(w + k + c + (overheads[i] if (w or k or c) else 0))
    return out


def _last_true(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """Largest x in [lo, hi] with ok(x), for ok true up to a point; lo - 1 when none."""
    best = lo - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if ok(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def fit_split(
    anatomy: Anatomy, hw: Hardware, request: PlanRequest, placement: Placement
) -> Placement:
    """``placement`` with the tensor split that fits every GPU's budget, filling the cards evenly
    (or the faster card first); a split that fits none where no split fits."""
    n_gpus = len(hw.gpus)
    act = min(max(placement.n_gpu_layers, 0), anatomy.n_layers + 1)
    if n_gpus < 2 or act == 0:
        return placement
    _, budgets, overheads = device_budgets(hw, request, anatomy)

    def at(counts: list[int]) -> Placement:
        return replace(placement, tensor_split=split_for_counts(tuple(counts)))

    def totals(counts: list[int]) -> list[int]:
        return _gpu_totals(anatomy, hw, at(counts), overheads)

    if n_gpus == 2:
        # GPU 0's total grows with its share of the layers, GPU 1's shrinks.
        hi = _last_true(0, act, lambda c: totals([c, act - c])[0] <= budgets[0])
        lo = act - _last_true(0, act, lambda c: totals([act - c, c])[1] <= budgets[1])
        if lo > hi:  # nothing fits both: an even split, over budget, tells the search to shrink
            return at([act // 2, act - act // 2])
        bw0, bw1 = hw.gpus[0].mem_bandwidth_Bps, hw.gpus[1].mem_bandwidth_Bps
        if bw0 > FASTER_GPU * bw1:
            c0 = hi
        elif bw1 > FASTER_GPU * bw0:
            c0 = lo
        else:
            c0 = (lo + hi + 1) // 2
        return at([c0, act - c0])
    # More GPUs: fill them in order, each with as many layers as fit, the last taking the rest.
    counts = [0] * n_gpus
    left = act
    for i in range(n_gpus - 1):

        def fits_i(c: int, i: int = i, left: int = left) -> bool:
            trial = counts[:i] + [c] + [0] * (n_gpus - i - 2) + [left - c]
            return totals(trial)[i] <= budgets[i]

        counts[i] = max(_last_true(0, left, fits_i), 0)
        left -= counts[i]
    counts[-1] = left
    return at(counts)
