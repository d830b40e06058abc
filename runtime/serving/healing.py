"""Healing loads, the server's side: what to give up when a plan does not fit, and which safer
settings to try when a runner crashes while loading, remembered per machine.

A shrink step is, in order: GPU layers (or, for a mixture-of-experts model, the expert tensors of
one more GPU layer moved to the CPU), then context length. Pure functions over plans; the runner's
``loader`` applies them on running out of memory, the scheduler on crashes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

from offload.planner.types import Plan

__all__ = ["shrink_step", "MIN_CTX", "Shrink"]

MIN_CTX = 512
# (plan, retry number from 0) -> (smaller plan, what was given up) or None when nothing is left.
Shrink = Callable[[Plan, int], "tuple[Plan, str] | None"]
_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_\w+_exps")
_LAYER = re.compile(r"^blk\.(\d+)\.")


def _expert_layers(tensor_names: Sequence[str]) -> list[int]:
    return sorted({int(m[1]) for n in tensor_names if (m := _EXPERT.match(n))})


def _n_layers(tensor_names: Sequence[str]) -> int:
    return 1 + max((int(m[1]) for n in tensor_names if (m := _LAYER.match(n))), default=-1)


def _cpu_expert_layers(plan: Plan, tensor_names: Sequence[str]) -> set[int]:
    rxs = [re.compile(p) for p in plan.cpu_tensor_patterns]
    return {
        int(m[1]) for n in tensor_names if (m := _EXPERT.match(n)) and any(r.search(n) for r in rxs)
    }


def _scale_gpu_bytes(plan: Plan, keep: float) -> tuple[Any, ...]:
    """Device predictions after moving (1 - keep) of GPU weights to the CPU (rough; for display)."""
    moved = 0
    out = []
    for d in plan.devices:
        if d.kind == "GPU":
            w = int(d.weights_bytes * keep)
            moved += d.weights_bytes - w
            out.append(dataclasses.replace(d, weights_bytes=w))
        else:
            out.append(d)
    return tuple(
        dataclasses.replace(d, weights_bytes=d.weights_bytes + moved) if d.kind == "CPU" else d
        for d in out
    )


def shrink_step(
    plan: Plan, retry: int, tensor_names: Sequence[str] = ()
) -> tuple[Plan, str] | None:
    """One step smaller: 2**retry GPU layers (or expert groups), else half the context; None at the floor.

    The step doubles with each retry so that a plan far over memory heals in a few loads, at the
    cost of overshooting by at most one step.
    """
    count = 1 << min(retry, 5)
    if plan.gpu_tensor_patterns:
        # Tensors that filled a card's leftover room go back to the CPU first.
        pats = tuple(p for p, _ in plan.gpu_tensor_patterns)
        new = plan.with_knobs(
            gpu_tensor_patterns=(), cpu_tensor_patterns=(*plan.cpu_tensor_patterns, *pats)
        )
        return new, (
            "moved the tensors that filled the GPUs' leftover room back to the CPU to fit GPU memory"
        )
    if plan.n_gpu_layers > 0:
        experts = _expert_layers(tensor_names)
        on_cpu = _cpu_expert_layers(plan, tensor_names)
        # Expert tensors of the last GPU layers go first, as llama.cpp's --fit does: only the active
        # experts are read per token, so they cost decode speed least per byte freed.
        # llama.cpp puts the last n_gpu_layers - 1 repeating layers (and the output) on the GPU.
        first_gpu = _n_layers(tensor_names) + 1 - plan.n_gpu_layers
        candidates = [i for i in reversed(experts) if i >= first_gpu and i not in on_cpu][:count]
        if candidates:
            layers = sorted(candidates)
            pattern = r"^blk\.(" + "|".join(map(str, layers)) + r")\.ffn_(up|down|gate)_exps"
            per_layer = 1 / max(1, len(experts) - len(on_cpu))
            new = plan.with_knobs(
                cpu_tensor_patterns=(*plan.cpu_tensor_patterns, pattern),
                devices=_scale_gpu_bytes(plan, 1 - per_layer * len(layers)),
            )
            what = "layer" if len(layers) == 1 else "layers"
            return new, (
                f"moved the expert tensors of {what} {', '.join(map(str, layers))} to the CPU "
                "to fit GPU memory"
            )
        n = max(0, plan.n_gpu_layers - count)
        new = plan.with_knobs(
            n_gpu_layers=n, devices=_scale_gpu_bytes(plan, n / max(1, plan.n_gpu_layers))
        )
        return (
            new,
            f"gave up {plan.n_gpu_layers - n} GPU layer(s) to fit GPU memory ({n} left on the GPU)",
        )
    if plan.n_ctx > MIN_CTX:
        n_ctx = max(MIN_CTX, plan.n_ctx // 2)
        devices = tuple(
            dataclasses.replace(d, kv_bytes=d.kv_bytes * n_ctx // plan.n_ctx) for d in plan.devices
        )
        new = plan.with_knobs(n_ctx=n_ctx, devices=devices)
        return new, f"reduced the context from {plan.n_ctx} to {n_ctx} tokens to fit memory"
    return None
