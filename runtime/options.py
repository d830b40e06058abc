"""Ollama's request ``options``: which drive sampling, which change the plan."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from offload.planner.types import PlanRequest
from offload.runtime import planning
from offload.runtime.config import KV_CACHE_TYPES
from offload.runtime.errors import BadRequest
from offload.runtime.generation import Sampling

__all__ = ["SAMPLING_OPTIONS", "PLAN_OPTIONS", "merge_options", "sampling_from", "plan_request_from"]

# Ollama option name -> (Sampling field, type)
SAMPLING_OPTIONS: dict[str, tuple[str, type]] = {
    "temperature": ("temperature", float), "top_k": ("top_k", int), "top_p": ("top_p", float),
    "min_p": ("min_p", float), "typical_p": ("typical_p", float),
    "repeat_penalty": ("repeat_penalty", float), "repeat_last_n": ("repeat_last_n", int),
    "presence_penalty": ("presence_penalty", float), "frequency_penalty": ("frequency_penalty", float),
    "mirostat": ("mirostat", int), "mirostat_tau": ("mirostat_tau", float),
    "mirostat_eta": ("mirostat_eta", float), "seed": ("seed", int), "num_predict": ("num_predict", int),
}
# Options that change how the model is loaded; a change reloads it.
PLAN_OPTIONS: dict[str, type] = {
    "num_ctx": int, "num_gpu": int, "num_batch": int, "num_thread": int, "use_mmap": bool,
    "use_mlock": bool, "num_keep": int, "numa": bool, "low_vram": bool, "main_gpu": int,
    # Ours (Ollama sets it server-wide only, as OLLAMA_KV_CACHE_TYPE): f16, q8_0 or q4_0.
    "kv_type": str,
}
_IGNORED = {"penalize_newline", "tfs_z", "num_gqa", "f16_kv", "vocab_only", "logits_all", "embedding_only",
            "rope_frequency_base", "rope_frequency_scale"}


def _coerce(name: str, value: Any, typ: type) -> Any:
    try:
        if typ is bool:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return typ(value)
    except (TypeError, ValueError):
        raise BadRequest(f"option {name!r} must be {typ.__name__}, got {value!r}") from None


def merge_options(model_params: dict[str, Any], request_options: dict[str, Any] | None) -> dict[str, Any]:
    """Request options over the model's PARAMETERs; values checked and converted."""
    merged: dict[str, Any] = {}
    for source in (model_params or {}, request_options or {}):
        for k, v in source.items():
            if v is None:
                continue
            if k == "stop":
                merged["stop"] = [v] if isinstance(v, str) else [str(s) for s in v]
            elif k in SAMPLING_OPTIONS:
                merged[k] = _coerce(k, v, SAMPLING_OPTIONS[k][1])
            elif k == "kv_type":
                if str(v).lower() not in KV_CACHE_TYPES:
                    raise BadRequest(f"option 'kv_type' must be one of {', '.join(KV_CACHE_TYPES)}, got {v!r}")
                merged[k] = str(v).lower()
            elif k in PLAN_OPTIONS:
                merged[k] = _coerce(k, v, PLAN_OPTIONS[k])
            elif k in _IGNORED:
                continue
            # Unknown options are ignored, as Ollama does (it logs them).
    return merged


def sampling_from(options: dict[str, Any], grammar: str | None = None,
                  logprobs: int | None = None) -> Sampling:
    """The ``Sampling`` for merged options (``logprobs``: None off, k = with k alternatives)."""
    known = {f.name for f in fields(Sampling)}
    kw = {SAMPLING_OPTIONS[k][0]: v for k, v in options.items() if k in SAMPLING_OPTIONS}
    kw = {k: v for k, v in kw.items() if k in known}
    return Sampling(**kw, stop=tuple(options.get("stop", ())), grammar=grammar, logprobs=logprobs)


def logprobs_from(req: dict[str, Any]) -> int | None:
    """``logprobs``/``top_logprobs`` of a request: None when off, else how many alternatives (0-20)."""
    if not req.get("logprobs"):
        return None
    top = req.get("top_logprobs") or 0
    if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20:
        raise BadRequest(f"top_logprobs must be a whole number from 0 to 20, got {top!r}")
    return top


def plan_request_from(options: dict[str, Any], gpu_budget_bytes: int | None = None) -> PlanRequest:
    """The planner request implied by the plan-changing options (over the configuration)."""
    return planning.request_from_options(options, gpu_budget_bytes=gpu_budget_bytes)


def plan_key(options: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The part of the options that decides the loaded plan (a change means a reload)."""
    return tuple(sorted((k, v) for k, v in options.items() if k in PLAN_OPTIONS))
