"""Choosing a plan: search placements for the best predicted speed within every device's budget."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from offload.planner.cost import SpeedParams
from offload.planner.errors import BudgetTooSmall, PlanInfeasible
from offload.planner.evaluate import device_budgets, evaluate, fits, given_gpu_budgets
from offload.planner.objective import (
    CONTEXT_MAX_DECODE_LOSS,
    CONTEXT_MAX_PROMPT_LOSS,
    KV_FALLBACK,
    PARALLEL_MAX,
    PARALLEL_MAX_DECODE_LOSS,
    choose,
    mode_of,
)
from offload.planner.placement import CPU, device_loads, layer_devices
from offload.planner.reasons import OUTPUT_PATTERN, Outcome, explain, infeasible_reason
from offload.planner.split import fit_split
from offload.planner.types import Anatomy, Hardware, Placement, Plan, PlanRequest, Workload

__all__ = [
    "plan",
    "expert_pattern",
    "ffn_pattern",
    "ffn_patterns",
    "split_probes",
    "choose",
    "OUTPUT_PATTERN",
    "PIN_RAM_FRACTION",
    "CONTEXT_MAX_DECODE_LOSS",
    "CONTEXT_MAX_PROMPT_LOSS",
    "PARALLEL_MAX",
    "PARALLEL_MAX_DECODE_LOSS",
    "KV_FALLBACK",
]

log = logging.getLogger(__name__)

_CTX_STEPS = (131072, 65536, 32768, 16384, 8192, 4096)
_UBATCHES = (512, 1024, 2048)
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


def _gpu_room(p: Plan) -> dict[int, int]:
    return {d.index: d.budget_bytes - d.total_bytes for d in p.devices if d.kind == "GPU"}


# A fill stops on a card after this many tensors in a row did not fit there.
_FILL_MISSES = 3


def _fill_cards(
    anatomy: Anatomy,
    plan: Plan,
    cpu_units: list[tuple[int, str]],
    reevaluate: Callable[[Placement], Plan],
) -> Plan | None:
    """Several GPUs: the room a whole-layer split leaves on a card taken by FFN (expert) tensors
    that would stay on the CPU, nearest the GPU layers first; None when no card has room for one.

    Layers go to the cards whole (``tensor_split``), so a card can be a large fraction of a layer
    short of its budget while the CPU keeps expert tensors; llama.cpp places any tensor on any
    device by an override, so those tensors go to the card with room instead.
    """
    if len([d for d in plan.devices if d.kind == "GPU"]) < 2 or not cpu_units:
        return None
    experts = bool(anatomy.expert_count)
    extra = tuple(x for x in plan.cpu_tensor_patterns if x == OUTPUT_PATTERN)
    n_gpus = sum(1 for d in plan.devices if d.kind == "GPU")
    home = layer_devices(anatomy.n_layers, plan.n_gpu_layers, n_gpus, plan.tensor_split)
    left = list(cpu_units)
    on: dict[int, list[tuple[int, str]]] = {}
    best = plan
    room = _gpu_room(plan)
    for g in sorted(room, key=lambda i: -room[i]):
        misses = 0
        for u in list(reversed(left)):
            if misses >= _FILL_MISSES:
                break
            trial = {**on, g: [*on.get(g, []), u]}
            rest = [x for x in left if x != u]
            # A tensor whose layer is on this card needs no override: it just leaves the CPU's.
            moved = {i: [x for x in us if home[x[0]] != i] for i, us in trial.items()}
            pl = replace(
                best.placement,
                cpu_tensor_patterns=extra + ffn_patterns(rest, experts),
                gpu_tensor_patterns=tuple(
                    (pat, i) for i in sorted(moved) for pat in ffn_patterns(moved[i], experts)
                ),
            )
            p = reevaluate(pl)
            if fits(p):
                best, left, on, misses = p, rest, trial, 0
            else:
                misses += 1
    return best if on else None


def _ffn_family(
    anatomy: Anatomy,
    evaluate_at: Callable[[int, tuple[str, ...]], Plan],
    top: int,
    reevaluate: Callable[[Placement], Plan] | None = None,
) -> list[Plan]:
    """All layers on the GPU, FFN (expert) tensors of the first layers on the CPU: the fewest that
    fit, then every mix of tensor kinds for the partial layer (down_exps alone is the biggest).
    With several GPUs, also the fewest with the cards' leftover room filled (``_fill_cards``)."""
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
        if reevaluate is not None and found[0]:
            filled = _fill_cards(anatomy, found[1], units[: found[0]], reevaluate)
            if filled is not None:
                out.append(filled)
        full = found[0] // len(_FFN_KINDS)
        if full < len(gpu_layers) and found[0]:
            base = units[: full * len(_FFN_KINDS)]
            for mask in range(1, 1 << len(_FFN_KINDS)):
                kinds = [k for i, k in enumerate(_FFN_KINDS) if mask >> i & 1]
                out.append(
                    evaluate_at(
                        ngl,
                        extra
                        + ffn_patterns(base + [(gpu_layers[full], k) for k in kinds], experts),
                    )
                )
    return [p for p in out if fits(p)]


def _flash_attn(req: PlanRequest, kv: str) -> bool:
    """Flash attention on GPUs unless the user turns it off (a quantized V cache needs it)."""
    return True if kv != "f16" or req.flash_attn is None else req.flash_attn


def _explicit_gpu_budget(hw: Hardware, req: PlanRequest) -> bool:
    """The caller capped GPU memory at more than nothing (0 keeps the GPUs out of the plan)."""
    given = given_gpu_budgets(hw, req)
    return given is not None and any(given)


def _cpu_plan(
    anatomy: Anatomy,
    hw: Hardware,
    req: PlanRequest,
    kv: str,
    base: dict,
    speed: SpeedParams | None,
    op_offload: bool,
) -> Plan:
    ub = max(req.n_ubatch or min(512, req.n_batch or 512), base["n_parallel"])
    pl = Placement(
        0,
        n_batch=max(req.n_batch or 2048, ub),
        n_ubatch=ub,
        kv_type=kv,
        flash_attn=bool(req.flash_attn) or kv != "f16",
        op_offload=op_offload,
        **base,
    )
    return evaluate(anatomy, hw, req, pl, speed)


def _candidates(
    anatomy: Anatomy, hw: Hardware, req: PlanRequest, n_ctx: int, kv: str, speed: SpeedParams | None
) -> list[Plan]:
    n_layers = anatomy.n_layers
    threads = req.threads or hw.cpu.cores
    base = dict(
        n_ctx=n_ctx, n_parallel=max(req.n_parallel or 1, 1), threads=threads, threads_batch=threads
    )
    if not hw.gpus:
        only = _cpu_plan(anatomy, hw, req, kv, base, speed, op_offload=True)
        return [only] if fits(only) else []
    ubatches = (
        [req.n_ubatch]
        if req.n_ubatch
        else [u for u in _UBATCHES if not req.n_batch or u <= req.n_batch]
    )
    ubatches = ubatches or [req.n_batch or 512]
    # A step holds a token of every sequence, and llama.cpp keeps room for as many outputs as a
    # batch holds: smaller batches abort it (GGML_ASSERT on n_outputs_max).
    ubatches = sorted({max(u, base["n_parallel"]) for u in ubatches})
    out: list[Plan] = []
    fa = _flash_attn(req, kv)
    if kv != "f16" and req.flash_attn is False:
        return out  # a quantized V cache needs flash attention
    for ub in ubatches:
        nb = max(req.n_batch or 2048, ub)
        common = dict(n_batch=nb, n_ubatch=ub, kv_type=kv, flash_attn=fa, **base)

        def at(ngl: int, pats: tuple[str, ...] = (), common: dict = common) -> Plan:
            pl = fit_split(anatomy, hw, req, Placement(ngl, pats, **common))
            return evaluate(anatomy, hw, req, _pinned(anatomy, hw, req, pl), speed)

        def again(pl: Placement) -> Plan:
            return evaluate(anatomy, hw, req, pl, speed)

        top = n_layers + 1 if req.num_gpu is None else min(req.num_gpu, n_layers + 1)
        ffn = _ffn_family(anatomy, at, top, again if len(hw.gpus) > 1 else None)
        whole = _whole_layers(at, top, forced=req.num_gpu is not None)
        if anatomy.expert_count and ffn:
            # MoE: expert tensors leave the GPU before any attention does (at equal GPU memory they
            # beat the best whole-layer split: bench/results/moe-*gib.json, "planner" against
            # "best_layers"); whole layers only when even that cannot fit.
            whole = [p for p in whole if p.n_gpu_layers >= min(top, n_layers)]
        # Op offload stays on: with it off, CPU-resident weights are multiplied on the CPU in
        # prompt processing, measured 5-8x slower on the H100 sweep, and decode is the same.
        out += [p for p in (*whole, *ffn) if fits(p)]
    if not out and req.num_gpu in (None, 0) and not _explicit_gpu_budget(hw, req):
        # A GPU too small even for op offload's compute buffer: run on the CPU and leave it alone.
        only = _cpu_plan(anatomy, hw, req, kv, base, speed, op_offload=False)
        if fits(only):
            out.append(only)
    return out


def split_probes(
    anatomy: Anatomy, hw: Hardware, req: PlanRequest, base: Placement
) -> list[Placement]:
    """Two placements that let calibration tell its decode costs apart, from ``base`` (the sweep's
    placement with the most layers on the GPU).

    A whole-layer sweep cannot: the bytes a CPU layer reads, the small ops of its attention and the
    one hand-over per token all grow together with the layers on the CPU. These keep every
    attention on the GPU and move FFN (expert) tensors of GPU layers to the CPU instead: those of
    the first half of the layers, then ``ffn_down`` alone of every layer. The second reads about as
    many CPU bytes as the first with twice the hand-overs between CPU and GPU, which separates the
    cost of a hand-over from CPU bandwidth, and both from the cost of whole CPU layers.
    """
    n, experts = anatomy.n_layers, bool(anatomy.expert_count)
    homes = layer_devices(n, base.n_gpu_layers, len(hw.gpus), base.tensor_split)
    gpu_layers = [il for il, d in enumerate(homes) if d != CPU]
    if len(gpu_layers) < 2:
        return []
    half = gpu_layers[: len(gpu_layers) // 2]
    probes = (
        ffn_patterns([(il, k) for il in half for k in _FFN_KINDS], experts),
        ffn_patterns([(il, "down") for il in gpu_layers], experts),
    )
    # Where the CPU-resident weights live is decided again (pinned for op offload's copies, as
    # the planner's own plans do): ``base`` may have none on the CPU and say "map the file".
    fresh = replace(base, use_mmap=None, pinned_weights=False)
    return [
        _pinned(
            anatomy, hw, req, replace(fresh, cpu_tensor_patterns=(*base.cpu_tensor_patterns, *p))
        )
        for p in probes
    ]


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


@dataclass(frozen=True)
class _Found:
    plan: Plan
    candidates: tuple[Plan, ...]
    kv_why: str  # "requested", "needed" (f16 could not fit) or "" (f16)


def _smallest_gpu_plan(
    anatomy: Anatomy, hw: Hardware, req: PlanRequest, n_ctx: int, kv: str
) -> Plan:
    """The least GPU memory any plan that uses a GPU needs: no layers there, op offload only."""
    ub = max(req.n_ubatch or min(_UBATCHES), req.n_parallel or 1)
    pl = Placement(
        0,
        n_ctx=n_ctx,
        n_parallel=max(req.n_parallel or 1, 1),
        n_ubatch=ub,
        n_batch=max(req.n_batch or ub, ub),
        kv_type=kv,
        flash_attn=_flash_attn(req, kv),
    )
    return evaluate(anatomy, hw, req, pl)


def _too_small(
    anatomy: Anatomy, hw: Hardware, req: PlanRequest, n_ctx: int, kv: str
) -> BudgetTooSmall | None:
    given = given_gpu_budgets(hw, req)
    if not given or not any(given):
        return None
    least = _smallest_gpu_plan(anatomy, hw, req, n_ctx, kv)
    gpu = least.devices[1]
    _, budgets, _ = device_budgets(hw, req, anatomy)
    if budgets[0] >= gpu.total_bytes:
        return None
    mib = 1 << 20
    return BudgetTooSmall(
        f"a GPU memory budget of {budgets[0] / mib:.0f} MiB is below the smallest plan that uses the "
        f"GPU, {gpu.total_bytes / mib:.0f} MiB ({gpu.overhead_bytes / mib:.0f} MiB CUDA context and "
        f"{gpu.compute_bytes / mib:.0f} MiB compute buffer); give at least {gpu.total_bytes / mib:.0f} MiB, "
        "or 0 to run on the CPU alone"
    )


def _search(anatomy: Anatomy, hw: Hardware, req: PlanRequest, speed: SpeedParams | None) -> _Found:
    """The best plan for a fixed number of sequences: KV type, context, then placement."""
    contexts = _contexts(anatomy, req)
    smallest = contexts[-1]
    if req.kv_type:
        kv_types, why = [req.kv_type], "requested"
    else:
        kv_types, why = ["f16", *KV_FALLBACK], ""
    first: list[Plan] = []
    kv = kv_types[0]
    for kv in kv_types:
        first = _candidates(anatomy, hw, req, smallest, kv, speed)
        if first:
            break
        if kv == "f16":
            why = "needed"
    if not first:
        raise _too_small(anatomy, hw, req, smallest, kv_types[0]) or PlanInfeasible(
            infeasible_reason(anatomy, hw, req, smallest)
        )
    reference = chosen = choose(first, req.optimize)
    chosen_from = first
    # Larger contexts, while they cost little: the shortest one is the reference.
    for n_ctx in reversed(contexts[:-1]):
        cands = _candidates(anatomy, hw, req, n_ctx, kv, speed)
        if not cands:
            break
        best = choose(cands, req.optimize)
        if (
            best.predicted.decode_tps
            < (1 - CONTEXT_MAX_DECODE_LOSS) * reference.predicted.decode_tps
            or best.predicted.prompt_tps
            < (1 - CONTEXT_MAX_PROMPT_LOSS) * reference.predicted.prompt_tps
        ):
            break
        chosen, chosen_from = best, cands
    return _Found(chosen, tuple(chosen_from), why)


def _normalized(req: PlanRequest) -> PlanRequest:
    mode = mode_of(req.optimize)
    if req.n_parallel is not None and req.n_parallel < 1:
        raise ValueError(f"n_parallel must be at least 1, not {req.n_parallel}")
    return replace(req, optimize=mode, workload=req.workload or Workload())


def plan(
    anatomy: Anatomy,
    hardware: Hardware,
    request: PlanRequest | None = None,
    speed: SpeedParams | None = None,
) -> Plan:
    """Place the model on this hardware for the best predicted speed within every budget.

    ``request.n_parallel = None`` lets the planner choose how many sequences run side by side.
    """
    req = _normalized(request or PlanRequest())
    given_gpu_budgets(hardware, req)  # a budget the GPUs cannot honour is an error before anything
    if req.n_parallel is not None:
        found = _search(anatomy, hardware, req, speed)
        return explain(Outcome(found.plan, found.candidates, found.kv_why), anatomy, hardware, req)
    single = _search(anatomy, hardware, replace(req, n_parallel=1), speed)
    outcome = Outcome(
        single.plan,
        single.candidates,
        single.kv_why,
        parallel_chosen=True,
        single_decode_tps=single.plan.predicted.decode_tps,
    )
    for n in range(PARALLEL_MAX, 1, -1):
        fixed = replace(req, n_parallel=n, n_ctx=single.plan.n_ctx, kv_type=single.plan.kv_type)
        try:
            multi = _search(anatomy, hardware, fixed, speed)
        except PlanInfeasible:
            continue
        if (
            multi.plan.predicted.decode_tps
            >= (1 - PARALLEL_MAX_DECODE_LOSS) * single.plan.predicted.decode_tps
        ):
            outcome = replace(outcome, plan=multi.plan, candidates=multi.candidates)
            break
        outcome = replace(
            outcome, rejected_parallel=n, rejected_decode_tps=multi.plan.predicted.decode_tps
        )
    return explain(outcome, anatomy, hardware, req)
