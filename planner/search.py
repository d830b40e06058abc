"""Choosing a plan: search placements for the best predicted speed within every device's budget."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import replace

from offload.planner.calibrate import placement_of
from offload.planner.cost import SpeedParams, pageable_h2d_Bps
from offload.planner.errors import PlanInfeasible
from offload.planner.evaluate import device_budgets, evaluate, fits
from offload.planner.memory import kv_bytes_per_layer
from offload.planner.placement import CPU, device_loads
from offload.planner.types import Anatomy, Hardware, Placement, Plan, PlanRequest

__all__ = ["plan", "expert_pattern", "ffn_pattern", "ffn_patterns", "choose"]

log = logging.getLogger(__name__)

_GiB = float(1 << 30)
_CTX_STEPS = (131072, 65536, 32768, 16384, 8192, 4096)
_UBATCHES = (512, 1024, 2048)
_BALANCED_DECODE = 0.95
_DECODE_TIE = 0.99
_BALANCED_MIN_GAIN = 1.10
# The output layer alone (llama.cpp's name; "attn_output" must not match).
OUTPUT_PATTERN = r"^output\.weight$"
# Pinned host memory cannot be paged out: pin CPU-resident weights only up to this share of RAM.
PIN_RAM_FRACTION = 0.5


def _alternation(layers: Iterable[int]) -> str:
    return "(" + "|".join(str(i) for i in sorted(layers)) + ")"


def expert_pattern(layers: Iterable[int]) -> str:
    """Regex for the expert tensors of ``layers`` (llama.cpp matches it with regex search)."""
    return rf"blk\.{_alternation(layers)}\.ffn_(up|down|gate)_exps\.weight"


def ffn_pattern(layers: Iterable[int]) -> str:
    """Regex for the dense FFN tensors of ``layers``."""
    return rf"blk\.{_alternation(layers)}\.ffn_(up|down|gate)\.weight"


_FFN_KINDS = ("down", "gate", "up")


def ffn_patterns(units: list[tuple[int, str]], experts: bool) -> tuple[str, ...]:
    """Patterns for (layer, ffn tensor kind) units: whole layers in one regex, a partial layer apart."""
    by_layer: dict[int, set[str]] = {}
    for il, kind in units:
        by_layer.setdefault(il, set()).add(kind)
    full = [il for il, kinds in by_layer.items() if len(kinds) == len(_FFN_KINDS)]
    make = expert_pattern if experts else ffn_pattern
    pats = [make(full)] if full else []
    suffix = "_exps" if experts else ""
    for il, kinds in sorted(by_layer.items()):
        if len(kinds) < len(_FFN_KINDS):
            pats.append(rf"blk\.{il}\.ffn_({'|'.join(sorted(kinds))}){suffix}\.weight")
    return tuple(pats)


def choose(plans: list[Plan], optimize: str) -> Plan:
    """Pick by mode: decode, prompt, or balanced (best prompt within 5% of the best decode).

    A quantized KV cache costs quality: it is chosen only when it is more than 3% faster.
    """
    best = _choose(plans, optimize)
    f16 = [p for p in plans if p.kv_type == "f16"]
    if best.kv_type != "f16" and f16:
        alt = _choose(f16, optimize)
        if (
            alt.predicted.decode_tps >= best.predicted.decode_tps / 1.03
            and alt.predicted.prompt_tps >= best.predicted.prompt_tps / 1.03
        ):
            return alt
    return best


def _leaner(pick: Plan, plans: list[Plan]) -> Plan:
    """The same placement with the smallest micro-batch that is as fast (prompt within 5%): a
    larger one only costs compute-buffer memory then."""
    same = [
        p
        for p in plans
        if (p.n_gpu_layers, p.cpu_tensor_patterns, p.kv_type, p.n_ctx)
        == (pick.n_gpu_layers, pick.cpu_tensor_patterns, pick.kv_type, pick.n_ctx)
        and p.predicted.decode_tps >= 0.999 * pick.predicted.decode_tps
        and p.predicted.prompt_tps >= 0.95 * pick.predicted.prompt_tps
    ]
    return min(same, key=lambda p: p.n_ubatch, default=pick)


def _choose(plans: list[Plan], optimize: str) -> Plan:
    return _leaner(_choose_fastest(plans, optimize), plans)


def _choose_fastest(plans: list[Plan], optimize: str) -> Plan:
    if optimize == "decode":
        # Within 1% (below the model's resolution) prefer more layers on the GPU: attention and KV
        # there keep decode fast as the context grows, which a 2k-token prediction underweights.
        best = max(p.predicted.decode_tps for p in plans)
        near = [p for p in plans if p.predicted.decode_tps >= _DECODE_TIE * best]
        return max(
            near, key=lambda p: (p.n_gpu_layers, p.predicted.decode_tps, p.predicted.prompt_tps)
        )
    if optimize == "prompt":
        return max(plans, key=lambda p: (round(p.predicted.prompt_tps, 6), p.predicted.decode_tps))
    fastest = _choose_fastest(plans, "decode")
    best = fastest.predicted.decode_tps
    near = [p for p in plans if p.predicted.decode_tps >= _BALANCED_DECODE * best]
    pick = max(near, key=lambda p: (p.predicted.prompt_tps, p.predicted.decode_tps))
    # Giving up decode speed is worth it only for a real prompt gain, not a rounding error.
    if pick.predicted.prompt_tps < _BALANCED_MIN_GAIN * fastest.predicted.prompt_tps:
        return fastest
    return pick


def _gpu_over(p: Plan) -> bool:
    return any(d.total_bytes > d.budget_bytes for d in p.devices if d.kind == "GPU")


def _first_fit(
    lo: int, hi: int, build: Callable[[int], Plan], descending: bool
) -> tuple[int, Plan] | None:
    """Binary search over k in [lo, hi] for the plan with the most on the GPU that fits.

    ``descending``: larger k puts more on the GPU (whole layers); otherwise smaller k does. GPU
    memory grows toward "more on the GPU" and RAM the other way, so the feasible k form an
    interval: a GPU over budget moves the search toward less on the GPU, a RAM overflow toward more.
    """
    best: tuple[int, Plan] | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        p = build(mid)
        more_gpu = fits(p) or not _gpu_over(p)
        if fits(p):
            best = (mid, p)
        if more_gpu == descending:
            lo = mid + 1
        else:
            hi = mid - 1
    return best


def _whole_layers(build: Callable[[int], Plan], top: int, forced: bool) -> list[Plan]:
    """Whole-layer placements: the most that fits, and every smaller count (strided when deep)."""
    if forced:
        return [build(top)]
    most = _first_fit(0, top, build, descending=True)
    if most is None:
        return []
    # Fewer layers can be faster (per-layer GPU costs on tiny models): scan them all.
    step = max(1, (most[0] + 1) // 48)
    return [build(k) for k in range(0, most[0], step)] + [most[1]]


def _ffn_family(
    anatomy: Anatomy, evaluate_at: Callable[[int, tuple[str, ...]], Plan], top: int
) -> list[Plan]:
    """All layers on the GPU, FFN (expert) tensors of the first layers on the CPU: the fewest that
    fit, then every mix of tensor kinds for the partial layer (down_exps alone is the biggest)."""
    n_layers, experts = anatomy.n_layers, bool(anatomy.expert_count)
    out: list[Plan] = []
    # Output layer on the GPU and, as a second try, kept on the CPU by a pattern of its own (its
    # decode cost there can be smaller than the FFN tensors it makes room for).
    outputs: list[tuple[str, ...]] = [()]
    if top > n_layers and any(t.name == "output.weight" for t in anatomy.tensors):
        outputs.append((OUTPUT_PATTERN,))
    ngl = top
    gpu_layers = list(range(max(n_layers + 1 - ngl, 0), n_layers))
    if not gpu_layers:
        return out
    units = [(il, kind) for il in gpu_layers for kind in _FFN_KINDS]
    for extra in outputs:

        def moved(k: int, units: list = units, extra: tuple[str, ...] = extra) -> Plan:
            return evaluate_at(ngl, extra + ffn_patterns(units[:k], experts))

        found = _first_fit(0, len(units), moved, descending=False)
        if found is None:
            continue
        out.append(found[1])
        full = found[0] // len(_FFN_KINDS)
        if full < len(gpu_layers) and found[0]:
            base = units[: full * len(_FFN_KINDS)]
            for mask in range(1, 1 << len(_FFN_KINDS)):
                kinds = [k for i, k in enumerate(_FFN_KINDS) if mask >> i & 1]
                out.append(
                    evaluate_at(
                        ngl,
                        extra + ffn_patterns(base + [(gpu_layers[full], k) for k in kinds], experts),
                    )
                )
    return [p for p in out if fits(p)]


def _candidates(
    anatomy: Anatomy, hw: Hardware, req: PlanRequest, n_ctx: int, speed: SpeedParams | None
) -> list[Plan]:
    n_layers = anatomy.n_layers
    threads = req.threads or hw.cpu.cores
    parallel = max(req.n_parallel, 1)
    base = dict(n_ctx=n_ctx, n_parallel=parallel, threads=threads, threads_batch=threads)
    if not hw.gpus:
        fa = bool(req.flash_attn) or (req.kv_type not in (None, "f16"))
        ub = req.n_ubatch or min(512, req.n_batch or 512)
        pl = Placement(
            0,
            n_batch=max(req.n_batch or 2048, ub),
            n_ubatch=ub,
            kv_type=req.kv_type or "f16",
            flash_attn=fa,
            **base,
        )
        only = evaluate(anatomy, hw, req, pl, speed)
        return [only] if fits(only) else []
    _, budgets, _ = device_budgets(hw, req)
    split = tuple(b / sum(budgets) for b in budgets) if len(hw.gpus) > 1 and sum(budgets) else ()
    kv_types = [req.kv_type] if req.kv_type else ["f16", "q8_0"]
    ubatches = (
        [req.n_ubatch]
        if req.n_ubatch
        else [u for u in _UBATCHES if not req.n_batch or u <= req.n_batch]
    )
    ubatches = ubatches or [req.n_batch or 512]
    out: list[Plan] = []
    for kv in kv_types:
        fa = True if kv != "f16" else (True if req.flash_attn is None else req.flash_attn)
        if kv != "f16" and req.flash_attn is False:
            continue  # a quantized V cache needs flash attention
        for ub in ubatches:
            nb = max(req.n_batch or 2048, ub)
            common = dict(
                n_batch=nb, n_ubatch=ub, kv_type=kv, flash_attn=fa, tensor_split=split, **base
            )

            def at(ngl: int, pats: tuple[str, ...] = (), common: dict = common) -> Plan:
                pl = Placement(ngl, pats, **common)
                return evaluate(anatomy, hw, req, _pinned(anatomy, hw, req, pl), speed)

            top = n_layers + 1 if req.num_gpu is None else min(req.num_gpu, n_layers + 1)
            ffn = _ffn_family(anatomy, at, top)
            whole = _whole_layers(at, top, forced=req.num_gpu is not None)
            if anatomy.expert_count and ffn:
                # MoE: expert tensors leave the GPU before any attention does (GPU.md: +20% decode,
                # +22% prompt at equal memory); whole layers only when even that cannot fit.
                whole = [p for p in whole if p.n_gpu_layers >= min(top, n_layers)]
            found: list[Plan | None] = [*whole, *ffn]
            for p in found:
                if p is None or not fits(p):
                    continue
                out.append(p)
                # Op offload stays on: with it off, CPU-resident weights are multiplied on the CPU in
                # prompt processing, measured 5-8x slower on the H100 sweep, and decode is the same.
    if not out and req.num_gpu in (None, 0):
        # A GPU too small even for op offload's compute buffer: run on the CPU and leave it alone.
        pl = Placement(0, kv_type=req.kv_type or "f16", op_offload=False,
                       flash_attn=bool(req.flash_attn) or (req.kv_type not in (None, "f16")),
                       n_batch=max(req.n_batch or 2048, req.n_ubatch or 512),
                       n_ubatch=req.n_ubatch or 512, **base)
        only = evaluate(anatomy, hw, req, pl, speed)
        if fits(only):
            out.append(only)
    return out


def _pinned(anatomy: Anatomy, hw: Hardware, req: PlanRequest, pl: Placement) -> Placement:
    """Keep CPU-resident weights in pinned memory when op offload copies them to a GPU.

    Without mmap, llama.cpp loads CPU-resident weights into the GPU driver's pinned host buffer,
    which the GPU copies from at full PCIe speed; from the mapped file (pageable memory) the same
    copies ran about 8x slower on the H100 host. Decode is unchanged. The cost is RAM that cannot
    be paged out, so only up to ``PIN_RAM_FRACTION`` of it, and never against the user's use_mmap.
    """
    if not hw.gpus or req.use_mmap is True or not pl.op_offload:
        return pl
    if req.use_mmap is False:
        return replace(pl, pinned_weights=True)
    cpu = device_loads(anatomy, pl, len(hw.gpus))[0][CPU]
    if cpu.stream_bytes <= 0 or cpu.weights_bytes > PIN_RAM_FRACTION * hw.cpu.ram_bytes:
        return pl
    return replace(pl, pinned_weights=True)


def _contexts(anatomy: Anatomy, req: PlanRequest) -> list[int]:
    if req.n_ctx:
        return [req.n_ctx]
    train = anatomy.n_ctx_train or 4096
    cap = min(train, max(req.max_ctx, 4096))
    steps = {min(cap, c) for c in _CTX_STEPS} | {cap}
    return sorted((c for c in steps if c >= min(4096, train)), reverse=True)


def plan(
    anatomy: Anatomy,
    hardware: Hardware,
    request: PlanRequest | None = None,
    speed: SpeedParams | None = None,
) -> Plan:
    """Place the model on this hardware for the best predicted speed within every budget."""
    req = request or PlanRequest()
    if req.optimize not in ("decode", "prompt", "balanced"):
        raise ValueError(f"optimize must be decode, prompt or balanced, not {req.optimize!r}")
    contexts = _contexts(anatomy, req)
    # Smallest context first: it is the reference the larger ones must not slow down by much.
    reference: Plan | None = None
    chosen: Plan | None = None
    chosen_from: list[Plan] = []
    for n_ctx in reversed(contexts):
        cands = _candidates(anatomy, hardware, req, n_ctx, speed)
        if not cands:
            break
        best = choose(cands, req.optimize)
        if reference is None:
            reference, chosen, chosen_from = best, best, cands
        elif (
            best.predicted.decode_tps >= 0.97 * reference.predicted.decode_tps
            and best.predicted.prompt_tps >= 0.9 * reference.predicted.prompt_tps
        ):
            chosen, chosen_from = best, cands
        else:
            break
    if chosen is None:
        raise PlanInfeasible(_infeasible_reason(anatomy, hardware, req, contexts[-1]))
    return _with_reasons(chosen, anatomy, hardware, req, chosen_from)


def _infeasible_reason(anatomy: Anatomy, hw: Hardware, req: PlanRequest, n_ctx: int) -> str:
    ram, budgets, _ = device_budgets(hw, req)
    kv = sum(kv_bytes_per_layer(anatomy, n_ctx, max(req.n_parallel, 1), req.kv_type or "f16"))
    need = anatomy.weights_bytes + kv
    return (
        f"{anatomy.path or 'the model'} needs about {need / _GiB:.1f} GiB "
        f"({anatomy.weights_bytes / _GiB:.1f} GiB of weights + {kv / _GiB:.1f} GiB of KV cache at "
        f"n_ctx={n_ctx}) plus compute buffers, but this machine offers {ram / _GiB:.1f} GiB of RAM"
        + (f" and {sum(budgets) / _GiB:.1f} GiB of GPU memory" if budgets else "")
        + (f"; with {req.num_gpu} layers forced onto the GPU" if req.num_gpu is not None else "")
        + "; use a smaller quantization, a smaller context, or more memory"
    )


def _comparisons(p: Plan, cands: list[Plan]) -> list[str]:
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
            f"({gpu_extra / (1 << 20):.0f} MiB more GPU compute buffer)."
        )
    return out


def _with_reasons(
    p: Plan, anatomy: Anatomy, hw: Hardware, req: PlanRequest, cands: list[Plan]
) -> Plan:
    r: list[str] = []
    n_layers = anatomy.n_layers
    if not hw.gpus:
        r.append(
            f"No GPU on this machine: everything runs on the CPU with {p.threads} threads; "
            f"decode is bound by memory bandwidth ({hw.cpu.mem_bandwidth_Bps / 1e9:.0f} GB/s measured)."
        )
    elif p.n_gpu_layers > n_layers and not p.cpu_tensor_patterns:
        r.append(
            f"The whole model ({anatomy.weights_bytes / _GiB:.1f} GiB) and its KV cache fit on the GPU: "
            "everything runs there."
        )
    elif p.cpu_tensor_patterns and anatomy.expert_count:
        pats = [x for x in p.cpu_tensor_patterns if x != OUTPUT_PATTERN]
        r.append(
            f"All layers on the GPU except expert tensors matched by {' and '.join(pats)}: "
            f"a token reads only {anatomy.expert_used_count} of {anatomy.expert_count} experts, so "
            "experts cost least on the CPU, while attention, KV cache and shared tensors stay on the GPU."
        )
    elif p.cpu_tensor_patterns:
        r.append(
            "All attention and KV on the GPU; the dense FFN tensors of the first layers stay on the CPU "
            "to fit the budget."
        )
    elif p.n_gpu_layers == 0:
        r.append("No layer fits the GPU budget: the model runs on the CPU.")
    else:
        # llama.cpp offloads the output layer first, then the last repeating layers.
        rep = min(max(p.n_gpu_layers - 1, 0), n_layers)
        r.append(
            f"The output layer and the last {rep} of {n_layers} layers on the GPU: that is what fits "
            "the budget."
        )
    if OUTPUT_PATTERN in p.cpu_tensor_patterns:
        r.append(
            "The output layer stays on the CPU: the GPU memory it would take holds weights that cost "
            "more there."
        )
    # The input embedding always stays on the CPU but is only looked up, never copied over.
    streamed = device_loads(anatomy, placement_of(p), len(hw.gpus))[0][CPU].stream_bytes if hw.gpus else 0
    if hw.gpus and (streamed > 0 or not p.op_offload):
        if p.op_offload:
            r.append(
                f"n_ubatch {p.n_ubatch}: CPU-resident weights ({streamed / _GiB:.1f} GiB) cross "
                "PCIe once per micro-batch for prompt processing, so a larger micro-batch is faster; "
                "its compute buffer is paid for in GPU memory."
            )
        elif p.n_gpu_layers == 0:
            r.append(
                "The GPU budget is too small even for the compute buffer op offload needs: "
                "everything, prompt processing included, runs on the CPU."
            )
        else:
            r.append(
                "Prompt processing of CPU-resident weights stays on the CPU: streaming them over PCIe "
                "would be slower."
            )
        if p.op_offload and not p.use_mmap:
            g = hw.gpus[0]
            pageable = pageable_h2d_Bps(g, SpeedParams())
            r.append(
                f"CPU-resident weights loaded into pinned memory (no mmap): the GPU copies them at "
                f"{g.h2d_bandwidth_Bps / 1e9:.0f} GB/s instead of {pageable / 1e9:.0f} GB/s from the "
                f"mapped file{'' if g.h2d_pageable_Bps else ' (estimated)'}; they cannot be paged out "
                "while the model is loaded."
            )
    if p.kv_type != "f16":
        r.append(f"KV cache in {p.kv_type} (with flash attention) to leave GPU memory for weights.")
    if not req.n_ctx:
        r.append(
            f"Context {p.n_ctx} tokens (trained for {anatomy.n_ctx_train}; planned up to {req.max_ctx}): "
            "the largest that fits without slowing decode by more than 3%."
        )
    if req.num_gpu is not None:
        r.append(f"{req.num_gpu} GPU layers as requested.")
    if req.gpu_budget_bytes is not None and hw.gpus:
        r.append(f"GPU memory capped at {req.gpu_budget_bytes / _GiB:.1f} GiB as requested.")
    r += _comparisons(p, cands)
    for w in anatomy.warnings:
        r.append(f"Warning: {w}.")
    return replace(p, reasons=tuple(r))
