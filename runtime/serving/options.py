"""Ollama's request ``options``: which drive sampling, which change the plan."""

from __future__ import annotations

import logging
import os
from dataclasses import fields
from typing import Any

from offload.models.parameters import IGNORED, RULES, InvalidParameter, Rule, check_parameter
from offload.planner.types import PlanRequest
from offload.runtime.config import KV_CACHE_TYPES
from offload.runtime.errors import BadRequest
from offload.runtime.runner.generation import Sampling
from offload.runtime.serving import planning

__all__ = [
    "SAMPLING_OPTIONS",
    "PLAN_OPTIONS",
    "merge_options",
    "sampling_from",
    "plan_request_from",
    "max_threads",
]

log = logging.getLogger(__name__)

# Ollama option name -> (Sampling field, type)
SAMPLING_OPTIONS: dict[str, tuple[str, type]] = {
    "temperature": ("temperature", float),
    "top_k": ("top_k", int),
    "top_p": ("top_p", float),
    "min_p": ("min_p", float),
    "typical_p": ("typical_p", float),
    "repeat_penalty": ("repeat_penalty", float),
    "repeat_last_n": ("repeat_last_n", int),
    "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float),
    "mirostat": ("mirostat", int),
    "mirostat_tau": ("mirostat_tau", float),
    "mirostat_eta": ("mirostat_eta", float),
    "seed": ("seed", int),
    "num_predict": ("num_predict", int),
}
# Options that change how the model is loaded; a change reloads it.
PLAN_OPTIONS: dict[str, type] = {
    "num_ctx": int,
    "num_gpu": int,
    "num_batch": int,
    "num_thread": int,
    "use_mmap": bool,
    "use_mlock": bool,
    "num_keep": int,
    "numa": bool,
    "low_vram": bool,
    "main_gpu": int,
    # Ours (Ollama sets it server-wide only, as OLLAMA_KV_CACHE_TYPE): f16, q8_0 or q4_0.
    "kv_type": str,
}
# More threads than this many per logical CPU only add contention (and llama.cpp allocates per
# thread: 100000 threads was an abort).
THREADS_PER_CPU = 4


def max_threads() -> int:
    """The most ``num_thread`` accepted on this machine: ``THREADS_PER_CPU`` per logical CPU."""
    return THREADS_PER_CPU * (os.cpu_count() or 1)


def _checked(key: str, value: Any, label: str) -> Any:
    rule = None
    if key == "num_thread":
        rule = Rule(
            int, 0, max_threads(), f"0 = decide; at most {THREADS_PER_CPU} per logical CPU here"
        )
    value = check_parameter(key, value, label, rule)
    if key == "seed" and value >= 0:
        value &= 0xFFFFFFFF  # llama.cpp's seed is 32 bits, as Ollama passes it
    return value


def merge_options(
    model_params: dict[str, Any], request_options: dict[str, Any] | None
) -> dict[str, Any]:
    """Request options over the model's PARAMETERs, each checked against its type and range.

    A request value out of range is a 400 naming the option and what it accepts; a model's own
    PARAMETER that is (written by an older version or another tool) is skipped with a warning,
    so that the model stays usable. Unknown options are ignored, as Ollama does.
    """
    if request_options is not None and not isinstance(request_options, dict):
        raise BadRequest(f"options must be an object, got {type(request_options).__name__}")
    merged: dict[str, Any] = {}
    for k, v in (model_params or {}).items():
        if v is None or k not in RULES or k in IGNORED:
            continue
        try:
            merged[k] = _checked(k, v, f"the model's PARAMETER {k}")
        except InvalidParameter as e:
            log.warning("ignoring %s", e)
    for k, v in (request_options or {}).items():
        if k == "kv_type" and v is not None:
            if str(v).lower() not in KV_CACHE_TYPES:
                raise BadRequest(
                    f"options.kv_type must be one of {', '.join(KV_CACHE_TYPES)}, got {v!r}"
                )
            merged[k] = str(v).lower()
            continue
        if v is None or k not in RULES:
            continue
        value = _checked(k, v, f"options.{k}")
        if k not in IGNORED:
            merged[k] = value
    if merged.get("num_gpu") == -1:
        del merged["num_gpu"]  # Ollama's -1: let the planner decide
    if merged.get("num_thread") == 0:
        del merged["num_thread"]
    return merged


def sampling_from(
    options: dict[str, Any], grammar: str | None = None, logprobs: int | None = None
) -> Sampling:
    """The ``Sampling`` for merged options (``logprobs``: None off, k = with k alternatives)."""
    known = {f.name for f in fields(Sampling)}
    kw = {SAMPLING_OPTIONS[k][0]: v for k, v in options.items() if k in SAMPLING_OPTIONS}
    kw = {k: v for k, v in kw.items() if k in known}
    return Sampling(**kw, stop=tuple(options.get("stop", ())), grammar=grammar, logprobs=logprobs)


def logprobs_from(logprobs: bool | None, top_logprobs: int | None) -> int | None:
    """A request's ``logprobs``/``top_logprobs``: None when off, else how many alternatives (0-20)."""
    if not logprobs:
        return None
    top = top_logprobs or 0
    if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20:
        raise BadRequest(f"top_logprobs must be a whole number from 0 to 20, got {top!r}")
    return top


def plan_request_from(options: dict[str, Any], gpu_budget_bytes: int | None = None) -> PlanRequest:
    """The planner request implied by the plan-changing options (over the configuration)."""
    return planning.request_from_options(options, gpu_budget_bytes=gpu_budget_bytes)


def plan_key(options: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The part of the options that decides the loaded plan (a change means a reload)."""
    return tuple(sorted((k, v) for k, v in options.items() if k in PLAN_OPTIONS))
