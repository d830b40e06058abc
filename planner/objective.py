"""What "best" means: the plan modes, and the tolerances they use, each named once.

``workload`` (the default) minimizes the predicted time of the typical request, P prompt tokens
plus G answer tokens: P / prompt t/s + G / decode t/s. ``decode`` and ``prompt`` maximize one
speed. Tolerances sit below the speed model's resolution: on the recorded GPU runs
(bench/results/*gib.json, bench/results/revalidation.json) its median errors were 2-14% decode
and 3% prompt, so a difference of 1% is not a difference worth trading anything for.
"""

from __future__ import annotations

from offload.planner.types import Plan

__all__ = [
    "MODES",
    "MODE_ALIASES",
    "TIE",
    "LEANER_DECODE_LOSS",
    "LEANER_PROMPT_LOSS",
    "CONTEXT_MAX_DECODE_LOSS",
    "CONTEXT_MAX_PROMPT_LOSS",
    "PARALLEL_MAX",
    "PARALLEL_MAX_DECODE_LOSS",
    "KV_FALLBACK",
    "mode_of",
    "choose",
    "runner_up",
    "objective_s",
]

MODES = ("workload", "decode", "prompt")
# "balanced" (best prompt within 5% of the best decode) became the workload mode.
MODE_ALIASES = {"balanced": "workload"}
# Plans within 1% of the best on the mode's measure count as tied; among them the one with more
# layers on the GPU wins (attention and KV there keep decode fast as the context grows, which a
# prediction at one context length underweights), in prompt mode the one with the fastest decode.
TIE = 0.01
# A larger micro-batch costs compute-buffer memory; it is kept only for a real gain: the same
# placement with a smaller one wins when it loses at most this much decode (0.1%) and prompt (5%)
# speed, or (workload mode) at most TIE of request time.
LEANER_DECODE_LOSS = 0.001
LEANER_PROMPT_LOSS = 0.05
# A longer context than asked for (up to max_ctx) is taken only while it costs at most this much
# single-stream decode and prompt speed against the shortest one.
CONTEXT_MAX_DECODE_LOSS = 0.03
CONTEXT_MAX_PROMPT_LOSS = 0.10
# Unless told, the planner runs as many sequences side by side (up to PARALLEL_MAX) as keep the
# single-stream decode within this loss of the plan for one sequence.
PARALLEL_MAX = 4
PARALLEL_MAX_DECODE_LOSS = 0.05
# The KV cache stays f16 unless asked; when the context cannot fit at f16, these in order.
KV_FALLBACK = ("q8_0", "q4_0")


def mode_of(optimize: str) -> str:
    """The mode ``optimize`` names (aliases resolved); ``ValueError`` for an unknown one."""
    mode = MODE_ALIASES.get(optimize, optimize)
    if mode not in MODES:
        raise ValueError(f"optimize must be {', '.join(MODES)} (or balanced), not {optimize!r}")
    return mode


def objective_s(p: Plan, mode: str) -> float:
    """The mode's measure as a cost (lower is better): request seconds, or seconds per token."""
    if mode == "decode":
        return 1.0 / max(p.predicted.decode_tps, 1e-12)
    if mode == "prompt":
        return 1.0 / max(p.predicted.prompt_tps, 1e-12)
    return p.predicted.request_s


def _fastest(plans: list[Plan], mode: str) -> Plan:
    best = min(objective_s(p, mode) for p in plans)
    if mode == "prompt":
        # Among the tied, the fastest decode: a hair of prompt speed is not worth a real loss.
        near = [p for p in plans if objective_s(p, mode) <= (1 + TIE) * best]
        return max(near, key=lambda p: (p.predicted.decode_tps, p.predicted.prompt_tps))
    near = [p for p in plans if objective_s(p, mode) <= (1 + TIE) * best]
    return max(near, key=lambda p: (p.n_gpu_layers, -objective_s(p, mode), p.predicted.prompt_tps))


def _same_placement(a: Plan, b: Plan) -> bool:
    keys = (
        "n_gpu_layers",
        "cpu_tensor_patterns",
        "gpu_tensor_patterns",
        "kv_type",
        "n_ctx",
        "tensor_split",
        "n_parallel",
    )
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _leaner(pick: Plan, plans: list[Plan], mode: str) -> Plan:
    """The same placement with the smallest micro-batch that is as fast: a larger one only costs
    compute-buffer memory then."""

    def as_fast(p: Plan) -> bool:
        if mode == "workload":
            return p.predicted.request_s <= (1 + TIE) * pick.predicted.request_s
        return (
            p.predicted.decode_tps >= (1 - LEANER_DECODE_LOSS) * pick.predicted.decode_tps
            and p.predicted.prompt_tps >= (1 - LEANER_PROMPT_LOSS) * pick.predicted.prompt_tps
        )

    same = [p for p in plans if _same_placement(p, pick) and as_fast(p)]
    return min(same, key=lambda p: p.n_ubatch, default=pick)


def choose(plans: list[Plan], optimize: str) -> Plan:
    """The best plan by the mode ``optimize`` names."""
    mode = mode_of(optimize)
    return _leaner(_fastest(plans, mode), plans, mode)


def runner_up(chosen: Plan, plans: list[Plan], optimize: str) -> Plan | None:
    """The best plan that makes a different trade: its decode or prompt speed differs from the
    chosen one's by more than TIE (so not the same placement with another micro-batch)."""
    mode = mode_of(optimize)
    d, q = chosen.predicted.decode_tps, chosen.predicted.prompt_tps
    other = [
        p
        for p in plans
        if abs(p.predicted.decode_tps / d - 1) > TIE or abs(p.predicted.prompt_tps / q - 1) > TIE
    ]
    return min(other, key=lambda p: objective_s(p, mode), default=None)
