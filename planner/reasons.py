"""Why a plan is what it is: the sentences ``offload plan`` prints and ``reasons`` carries.

Every threshold a sentence quotes comes from its named constant (objective.py), so the text
cannot drift from what the search does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from offload.planner.cost import SpeedParams, pageable_h2d_Bps
from offload.planner.evaluate import device_budgets
from offload.planner.memory import kv_bytes_per_layer
from offload.planner.objective import (
    CONTEXT_MAX_DECODE_LOSS,
    PARALLEL_MAX,
    PARALLEL_MAX_DECODE_LOSS,
    runner_up,
)
from offload.planner.placement import CPU, device_loads
from offload.planner.types import Anatomy, Hardware, Plan, PlanRequest

__all__ = ["Outcome", "explain", "infeasible_reason", "describe", "OUTPUT_PATTERN"]

_GiB = float(1 << 30)
_MiB = float(1 << 20)
# The output layer alone (llama.cpp's name; "attn_output" must not match).
OUTPUT_PATTERN = r"^output\.weight$"


@dataclass(frozen=True)
class Outcome:
    """What the search found: the plan, what it was chosen from, and the choices behind it."""

    plan: Plan
    candidates: tuple[Plan, ...]
    kv_why: str = ""  # "requested", "needed" or "" (f16)
    parallel_chosen: bool = False  # the planner chose n_parallel (else it was given)
    single_decode_tps: float = 0.0  # the one-sequence plan's decode, when parallel_chosen
    rejected_parallel: int = 0  # the fewest sequences that cost too much decode (0: none tried)
    rejected_decode_tps: float = 0.0


def infeasible_reason(anatomy: Anatomy, hw: Hardware, req: PlanRequest, n_ctx: int) -> str:
    """What the model needs against what the machine offers."""
    ram, budgets, _ = device_budgets(hw, req, anatomy)
    kv = sum(kv_bytes_per_layer(anatomy, n_ctx, max(req.n_parallel or 1, 1), req.kv_type or "f16"))
    need = anatomy.weights_bytes + kv
    return (
        f"{anatomy.path or 'the model'} needs about {need / _GiB:.1f} GiB "
        f"({anatomy.weights_bytes / _GiB:.1f} GiB of weights + {kv / _GiB:.1f} GiB of KV cache at "
        f"n_ctx={n_ctx}) plus compute buffers, but this machine offers {ram / _GiB:.1f} GiB of RAM"
        + (f" and {sum(budgets) / _GiB:.1f} GiB of GPU memory" if budgets else "")
        + (f"; with {req.num_gpu} layers forced onto the GPU" if req.num_gpu is not None else "")
        + "; use a smaller quantization, a smaller context, or more memory"
    )


def describe(p: Plan, anatomy: Anatomy) -> str:
    """A placement in a few words: what is on the GPU, what stays on the CPU, the micro-batch."""
    n = anatomy.n_layers
    if p.n_gpu_layers == 0 or not any(d.kind == "GPU" and d.weights_bytes for d in p.devices):
        where = "everything on the CPU"
    elif p.n_gpu_layers > n and not p.cpu_tensor_patterns:
        where = "everything on the GPU"
    elif p.cpu_tensor_patterns:
        layers = {
            t.layer
            for t, d in zip(anatomy.tensors, _devices(p, anatomy), strict=True)
            if d == CPU and t.layer is not None and t.role in ("expert", "ffn")
        }
        what = "expert" if anatomy.expert_count else "FFN"
        where = f"all layers on the GPU but the {what} tensors of {len(layers)} on the CPU"
    else:
        where = f"{p.n_gpu_layers} of {n + 1} layers on the GPU"
    return f"{where}, n_ubatch {p.n_ubatch}"


def _devices(p: Plan, anatomy: Anatomy) -> list[int]:
    n_gpus = sum(1 for d in p.devices if d.kind == "GPU")
    return device_loads(anatomy, p.placement, n_gpus)[1]


def _placement_sentence(p: Plan, anatomy: Anatomy, hw: Hardware) -> str:
    n_layers = anatomy.n_layers
    if not hw.gpus:
        return (
            f"No GPU on this machine: everything runs on the CPU with {p.threads} threads; "
            f"decode is bound by memory bandwidth ({hw.cpu.mem_bandwidth_Bps / 1e9:.0f} GB/s measured)."
        )
    if p.n_gpu_layers > n_layers and not p.cpu_tensor_patterns:
        return (
            f"The whole model ({anatomy.weights_bytes / _GiB:.1f} GiB) and its KV cache fit on the GPU: "
            "everything runs there."
        )
    if p.cpu_tensor_patterns and anatomy.expert_count:
        pats = [x for x in p.cpu_tensor_patterns if x != OUTPUT_PATTERN]
        return (
            f"All layers on the GPU except expert tensors matched by {' and '.join(pats)}: "
            f"a token reads only {anatomy.expert_used_count} of {anatomy.expert_count} experts, so "
            "experts cost least on the CPU, while attention, KV cache and shared tensors stay on the GPU."
        )
    if p.cpu_tensor_patterns:
        return (
            "All attention and KV on the GPU; the dense FFN tensors of the first layers stay on the CPU "
            "to fit the budget."
        )
    if p.n_gpu_layers == 0:
        return "No layer fits the GPU budget: the model runs on the CPU."
    # llama.cpp offloads the output layer first, then the last repeating layers.
    rep = min(max(p.n_gpu_layers - 1, 0), n_layers)
    return (
        f"The output layer and the last {rep} of {n_layers} layers on the GPU: that is what fits "
        "the budget."
    )


def _streaming(p: Plan, anatomy: Anatomy, hw: Hardware) -> list[str]:
    # The input embedding always stays on the CPU but is only looked up, never copied over.
    if not hw.gpus:
        return []
    streamed = device_loads(anatomy, p.placement, len(hw.gpus))[0][CPU].stream_bytes
    if streamed <= 0 and p.op_offload:
        return []
    out = []
    if p.op_offload:
        out.append(
            f"n_ubatch {p.n_ubatch}: CPU-resident weights ({streamed / _GiB:.1f} GiB) cross "
            "PCIe once per micro-batch for prompt processing, so a larger micro-batch is faster; "
            "its compute buffer is paid for in GPU memory."
        )
    elif p.n_gpu_layers == 0:
        out.append(
            "The GPU budget is too small even for the compute buffer op offload needs: "
            "everything, prompt processing included, runs on the CPU."
        )
    else:
        out.append(
            "Prompt processing of CPU-resident weights stays on the CPU: streaming them over PCIe "
            "would be slower."
        )
    if p.op_offload and not p.use_mmap:
        g = hw.gpus[0]
        pageable = pageable_h2d_Bps(g, SpeedParams())
        out.append(
            f"CPU-resident weights loaded into pinned memory (no mmap): the GPU copies them at "
            f"{g.h2d_bandwidth_Bps / 1e9:.0f} GB/s instead of {pageable / 1e9:.0f} GB/s from the "
            f"mapped file{'' if g.h2d_pageable_Bps else ' (estimated)'}; they cannot be paged out "
            "while the model is loaded."
        )
    return out


def _budgets(p: Plan, hw: Hardware, req: PlanRequest) -> list[str]:
    gpus = [d for d in p.devices if d.kind == "GPU"]
    if not gpus:
        return []
    ctx = f"its {max(d.overhead_bytes for d in gpus) / _MiB:.0f} MiB CUDA context and kernels included"
    if req.gpu_budget_bytes is not None:
        given = req.gpu_budget_bytes
        figure = (
            ", ".join(f"{b / _GiB:.1f}" for b in given)
            if isinstance(given, tuple)
            else f"{given / _GiB:.1f}"
        )
        out = [
            f"GPU memory capped at {figure} GiB per GPU as requested, as nvidia-smi counts it ({ctx})."
        ]
    else:
        out = [
            f"GPU budget: the free memory less a {req.gpu_margin_bytes / _MiB:.0f} MiB margin, as "
            f"nvidia-smi counts it ({ctx})."
        ]
    if len(gpus) > 1 and p.tensor_split:
        used = "; ".join(
            f"GPU {d.index} {d.total_bytes / _GiB:.2f} of {d.budget_bytes / _GiB:.2f} GiB"
            for d in gpus
        )
        counts = "/".join(f"{x:g}" for x in p.tensor_split)
        out.append(
            f"Offloaded layers split {counts} over the GPUs (tensor_split, in llama.cpp's layer order, "
            f"the output layer last) so that each card holds what fits: {used}."
        )
    if p.gpu_tensor_patterns:
        moved = _moved_to_gpus(p)
        out.append(
            "Whole layers left room on a card, so tensors that would stay on the CPU go there "
            f"instead (overrides ahead of the CPU ones): {moved}."
        )
    return out


def _moved_to_gpus(p: Plan) -> str:
    by_gpu: dict[int, list[str]] = {}
    for pat, g in p.gpu_tensor_patterns:
        by_gpu.setdefault(g, []).append(pat)
    return "; ".join(f"GPU {g}: {' and '.join(pats)}" for g, pats in sorted(by_gpu.items()))


def _kv(o: Outcome, req: PlanRequest) -> list[str]:
    p = o.plan
    if o.kv_why == "requested":
        return [f"KV cache in {p.kv_type} as requested."]
    if o.kv_why == "needed":
        return [
            f"KV cache in {p.kv_type} (with flash attention): a context of {p.n_ctx} tokens x "
            f"{p.n_parallel} sequence(s) does not fit in f16."
        ]
    return []


def _workload(o: Outcome, anatomy: Anatomy, req: PlanRequest) -> list[str]:
    p, w = o.plan, o.plan.workload
    source = {
        "default": "the default until this model has served requests",
        "recorded": f"the medians of the last {w.requests} requests this model served",
        "requested": "as requested",
    }.get(w.source, w.source)
    prompt_s = w.prompt_tokens / max(p.predicted.prompt_tps, 1e-9)
    what = {
        "workload": "the time of a typical request",
        "decode": "decode speed",
        "prompt": "prompt speed",
    }[p.optimize]
    out = [
        f"Optimized for {what}. A request of {w.prompt_tokens} prompt + {w.answer_tokens} answer tokens "
        f"({source}) is predicted at {p.predicted.request_s:.2f} s ({prompt_s:.2f} s prompt, "
        f"{p.predicted.request_s - prompt_s:.2f} s answer)."
    ]
    other = runner_up(p, list(o.candidates), p.optimize)
    if other is not None:
        r = other.predicted
        out.append(
            f"Runner-up: {describe(other, anatomy)}: {r.request_s:.2f} s a request "
            f"({r.request_s / p.predicted.request_s - 1:+.1%}), decode {r.decode_tps:.1f} t/s "
            f"({r.decode_tps / p.predicted.decode_tps - 1:+.1%}), prompt {r.prompt_tps:.0f} t/s "
            f"({r.prompt_tps / p.predicted.prompt_tps - 1:+.1%})."
        )
    return out


def _parallel(o: Outcome) -> list[str]:
    p = o.plan
    n = p.n_parallel
    kv = sum(d.kv_bytes for d in p.devices) / _GiB
    agg = p.predicted.aggregate_decode_tps
    if not o.parallel_chosen:
        if n == 1:
            return []
        return [
            f"{n} sequences side by side as requested (one KV cache of {p.n_ctx} x {n} cells, "
            f"{kv:.2f} GiB): {agg:.1f} t/s predicted decoding all {n} together."
        ]
    if n > 1:
        loss = 1 - p.predicted.decode_tps / max(o.single_decode_tps, 1e-9)
        return [
            f"{n} sequences side by side (one KV cache of {p.n_ctx} x {n} cells, {kv:.2f} GiB): the most, "
            f"up to {PARALLEL_MAX}, that cost at most {PARALLEL_MAX_DECODE_LOSS:.0%} of one stream's "
            f"decode ({max(loss, 0):.1%} here); {agg:.1f} t/s predicted decoding all {n} together."
        ]
    if o.rejected_parallel:
        loss = 1 - o.rejected_decode_tps / max(o.single_decode_tps, 1e-9)
        return [
            f"One sequence at a time: the KV cache of {o.rejected_parallel} would cost {loss:.0%} of "
            f"decode speed (more than {PARALLEL_MAX_DECODE_LOSS:.0%})."
        ]
    return ["One sequence at a time: there is no room for a second sequence's KV cache."]


def _comparisons(p: Plan, cands: tuple[Plan, ...]) -> list[str]:
    """Sentences comparing the chosen plan with the simpler plans it beat."""
    out = []
    whole = [c for c in cands if not c.cpu_tensor_patterns]
    if p.cpu_tensor_patterns and whole:
        w = max(whole, key=lambda c: c.predicted.decode_tps)
        out.append(
            f"Predicted {p.predicted.decode_tps:.1f} t/s decode and {p.predicted.prompt_tps:.0f} t/s prompt, "
            f"against {w.predicted.decode_tps:.1f} / {w.predicted.prompt_tps:.0f} t/s for the best whole-layer "
            f"split that fits ({w.n_gpu_layers} layers)."
        )
    small = [c for c in cands if c.n_ubatch == 512 and c.kv_type == p.kv_type]
    if p.n_ubatch > 512 and small:
        s = max(small, key=lambda c: c.predicted.decode_tps)
        gpu_extra = sum(d.compute_bytes for d in p.devices[1:]) - sum(
            d.compute_bytes for d in s.devices[1:]
        )
        out.append(
            f"n_ubatch {p.n_ubatch} instead of 512: prompt {p.predicted.prompt_tps / s.predicted.prompt_tps:.1f}x "
            f"faster for {100 * (1 - p.predicted.decode_tps / s.predicted.decode_tps):.0f}% less decode speed "
            f"({gpu_extra / _MiB:.0f} MiB more GPU compute buffer)."
        )
    return out


def explain(o: Outcome, anatomy: Anatomy, hw: Hardware, req: PlanRequest) -> Plan:
    """The chosen plan with its reasons."""
    p = o.plan
    r = [_placement_sentence(p, anatomy, hw)]
    if OUTPUT_PATTERN in p.cpu_tensor_patterns:
        r.append(
            "The output layer stays on the CPU: the GPU memory it would take holds weights that cost "
            "more there."
        )
    r += _streaming(p, anatomy, hw)
    r += _kv(o, req)
    if not req.n_ctx:
        r.append(
            f"Context {p.n_ctx} tokens (trained for {anatomy.n_ctx_train}; planned up to {req.max_ctx}): "
            f"the largest that fits without slowing decode by more than {CONTEXT_MAX_DECODE_LOSS:.0%}."
        )
    if req.num_gpu is not None:
        r.append(f"{req.num_gpu} GPU layers as requested.")
    r += _budgets(p, hw, req)
    r += _workload(o, anatomy, req)
    r += _parallel(o)
    r += _comparisons(p, o.candidates)
    for w in anatomy.warnings:
        r.append(f"Warning: {w}.")
    return replace(p, reasons=tuple(r))
