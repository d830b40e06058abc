"""Fitting the speed model's efficiency factors to speeds measured on this machine.

Pure: observations in, ``SpeedParams`` out. Each factor is a bounded multiple of its base value,
found by damped least squares on log(predicted / measured), with a weak pull towards the base so
that factors the observations say nothing about stay where they were.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from offload.planner.cost import predict
from offload.planner.types import Anatomy, Hardware, Placement, Prediction

__all__ = ["Observation", "fit", "fit_error", "FIT_BOUNDS", "LOOSE_FACTORS"]

# Each factor may move between a quarter and four times its base: enough for a machine that is
# twice as fast or slow as assumed, not enough for a few noisy runs to make predictions absurd.
FIT_BOUNDS = (0.25, 4.0)
_PRIOR_WEIGHT = 0.15
# Two factors differ by an order of magnitude from one machine to the next, so they get wide
# bounds and a weak pull: what a whole layer's small CPU ops cost beyond its bytes, and what a
# hand-over between CPU and GPU costs. (A 16-vCPU H100 host: 0.6 ms a CPU layer at 16 threads,
# dense decode with FFN tensors on the CPU 25% faster than whole layers of the same bytes. A
# 32-vCPU H200 host: through offload's runner after a 512-token prompt, 11.7 us a layer per thread
# and 32 us a hand-over; in llama-bench's decode with an empty KV cache, whole layers won by 12-16%
# against a split.) Runs tell the two apart only when the sweep holds split placements too
# (search.split_probes).
LOOSE_FACTORS: dict[str, tuple[float, float]] = {
    "cpu_layer_overhead_s": (0.01, 4.0),
    "split_overhead_s": (0.25, 8.0),
}
_LOOSE_PRIOR_WEIGHT = 0.005
_MAX_OBSERVATIONS = 48


@dataclass(frozen=True)
class Observation:
    """One measured run: the model, the machine, the placement it ran with and what it measured.

    ``placement`` is a ``Placement`` for the planner's speed model; a custom ``predict`` passed to
    ``fit`` may use any description of its own.
    """

    anatomy: Anatomy
    hardware: Hardware
    placement: Placement | Any
    prompt_tokens: int
    decode_tps: float | None = None
    prompt_tps: float | None = None
    context_tokens: int | None = None


Predict = Callable[[Observation, Any], Prediction]


def _default_predict(obs: Observation, params: Any) -> Prediction:
    return predict(
        obs.anatomy,
        obs.hardware,
        obs.placement,
        params,
        prompt_tokens=obs.prompt_tokens,
        context_tokens=obs.context_tokens,
    )


def _fitted_fields(base: Any) -> list[str]:
    return [
        f.name
        for f in dataclasses.fields(base)
        if isinstance(getattr(base, f.name), float) and getattr(base, f.name) > 0
    ]


def _residuals(obs: Sequence[Observation], params: Any, predict: Predict) -> list[float]:
    out: list[float] = []
    for o in obs:
        p = predict(o, params)
        if o.decode_tps:
            out.append(math.log(max(p.decode_tps, 1e-9) / o.decode_tps))
        if o.prompt_tps:
            out.append(math.log(max(p.prompt_tps, 1e-9) / o.prompt_tps))
    return out


def fit_error(
    observations: Sequence[Observation], params: Any, predict: Predict | None = None
) -> float:
    """Root mean square of log(predicted / measured) over all measured speeds (0 is perfect)."""
    r = _residuals(observations, params, predict or _default_predict)
    return math.sqrt(sum(x * x for x in r) / len(r)) if r else 0.0


def fit(
    observations: Sequence[Observation],
    base: Any,
    predict: Predict | None = None,
    names: Sequence[str] | None = None,
    iterations: int = 25,
) -> Any:
    """``base`` with its efficiency factors fitted to the observations (bounded; base if none)."""
    predict = predict or _default_predict
    obs = [o for o in observations if o.decode_tps or o.prompt_tps][-_MAX_OBSERVATIONS:]
    if not obs:
        return base
    names = list(names) if names is not None else _fitted_fields(base)
    bounds = [LOOSE_FACTORS.get(n, FIT_BOUNDS) for n in names]
    lo = np.log([b[0] for b in bounds])
    hi = np.log([b[1] for b in bounds])
    prior = np.sqrt([_LOOSE_PRIOR_WEIGHT if n in LOOSE_FACTORS else _PRIOR_WEIGHT for n in names])

    def params_at(x: np.ndarray) -> Any:
        return dataclasses.replace(
            base, **{n: getattr(base, n) * math.exp(v) for n, v in zip(names, x, strict=True)}
        )

    def resid(x: np.ndarray) -> np.ndarray:
        return np.array(_residuals(obs, params_at(x), predict) + list(prior * x))

    x = np.zeros(len(names))
    r = resid(x)
    cost = float(r @ r)
    damping = 1e-2
    h = 1e-3
    for _ in range(iterations):
        jac = np.empty((len(r), len(names)))
        for j in range(len(names)):
            xj = x.copy()
            xj[j] += h
            jac[:, j] = (resid(xj) - r) / h
        # Levenberg-Marquardt step, then clipped to the bounds.
        a = jac.T @ jac + damping * np.eye(len(names))
        step = np.linalg.solve(a, -jac.T @ r)
        x_new = np.clip(x + step, lo, hi)
        r_new = resid(x_new)
        cost_new = float(r_new @ r_new)
        if cost_new < cost - 1e-12:
            x, r, cost = x_new, r_new, cost_new
            damping = max(damping / 3, 1e-6)
            if np.max(np.abs(step)) < 1e-4:
                break
        else:
            damping *= 4
            if damping > 1e6:
                break
    return params_at(x)
