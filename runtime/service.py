"""The work behind /api/generate and /api/chat, as plain functions yielding Ollama's chunks.

The HTTP routes and tests call these; each yields response dicts (``done: false`` pieces, then one
``done: true`` summary with Ollama's counts and nanosecond durations).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from offload.runtime import config, prompt
from offload.runtime.engine import Piece, Stats
from offload.runtime.errors import BadRequest
from offload.runtime.options import merge_options, sampling_from
from offload.runtime.scheduler import Runner, Scheduler

__all__ = ["generate", "chat", "now_iso"]


def now_iso() -> str:
    """RFC 3339 timestamp as Ollama writes ``created_at``."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _keep_alive(value: Any) -> float | None:
    return None if value is None else config.parse_duration_s(value, config.keep_alive_s())


def _summary(model: str, stats: Stats, load_s: float, t_start: float) -> dict[str, Any]:
    return {
        "model": model,
        "created_at": now_iso(),
        "done": True,
        "done_reason": stats.done_reason,
        "total_duration": _ns(time.perf_counter() - t_start),
        "load_duration": _ns(load_s),
        "prompt_eval_count": stats.prompt_eval_count,
        "prompt_eval_duration": _ns(stats.prompt_eval_s),
        "eval_count": stats.eval_count,
        "eval_duration": _ns(stats.eval_s),
    }


def _run(runner: Runner, text: str, options: dict[str, Any], add_bos: bool, cancel: threading.Event | None,
         grammar: str | None = None) -> Iterator[Piece | Stats]:
    engine = runner.engine
    tokens = engine.tokenize(text, add_bos=add_bos)
    stop = list(options.get("stop", []))
    yield from engine.generate(tokens, sampling_from({**options, "stop": stop}, grammar), cancel=cancel,
                               truncate=options.get("truncate", True))



def generate(sched: Scheduler, req: dict[str, Any], cancel: threading.Event | None = None) -> Iterator[dict[str, Any]]:
    """Ollama /api/generate: pieces of ``response``, then the summary."""
    t_start = time.perf_counter()
    name = _model_name(req)
    keep = _keep_alive(req.get("keep_alive"))
    if req.get("images"):
        raise BadRequest(f'model "{name}" has no vision support; send text only')
    info = sched.resolve(name)
    options = merge_options(info.params, req.get("options"))
    loaded_before = {r.name for r in sched.loaded()}
    with sched.acquire(name, options, keep) as runner:
        load_s = 0.0 if runner.name in loaded_before else runner.engine.load_s
        text_prompt = req.get("prompt") or ""
        if not text_prompt and not req.get("suffix"):
            yield {"model": name, "created_at": now_iso(), "response": "", "done": True,
                   "done_reason": "unload" if keep == 0 else "load"}
            return
        template = req.get("template") or info.template
        system = req.get("system") if req.get("system") is not None else info.system
        text = prompt.render_generate(template, text_prompt, system, req.get("suffix"), bool(req.get("raw")))
        for ev in _run(runner, text, options, add_bos=True, cancel=cancel):
            if isinstance(ev, Piece):
                yield {"model": name, "created_at": now_iso(), "response": ev.text, "done": False}
            else:
                out = _summary(name, ev, load_s, t_start)
                out["response"] = ""
                yield out


def chat(sched: Scheduler, req: dict[str, Any], cancel: threading.Event | None = None) -> Iterator[dict[str, Any]]:
    """Ollama /api/chat: pieces of ``message.content``, then the summary."""
    t_start = time.perf_counter()
    name = _model_name(req)
    keep = _keep_alive(req.get("keep_alive"))
    messages = req.get("messages") or []
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("messages must be a list of {role, content} objects")
    if any(m.get("images") for m in messages):
        raise BadRequest(f'model "{name}" has no vision support; send text only')
    info = sched.resolve(name)
    options = merge_options(info.params, req.get("options"))
    loaded_before = {r.name for r in sched.loaded()}
    with sched.acquire(name, options, keep) as runner:
        load_s = 0.0 if runner.name in loaded_before else runner.engine.load_s
        if not messages:
            yield {"model": name, "created_at": now_iso(), "message": {"role": "assistant", "content": ""},
                   "done": True, "done_reason": "unload" if keep == 0 else "load"}
            return
        history = list(info.messages) + messages
        if info.system and not any(m.get("role") == "system" for m in history):
            history = [{"role": "system", "content": info.system}, *history]
        gguf_template = None if info.template else _gguf_template(runner)
        text, has_bos = prompt.render_chat(info.template, gguf_template, history, req.get("tools"))
        for ev in _run(runner, text, options, add_bos=not has_bos, cancel=cancel):
            if isinstance(ev, Piece):
                yield {"model": name, "created_at": now_iso(),
                       "message": {"role": "assistant", "content": ev.text}, "done": False}
            else:
                out = _summary(name, ev, load_s, t_start)
                out["message"] = {"role": "assistant", "content": ""}
                yield out


def _gguf_template(runner: Runner) -> str | None:
    from offload.planner import anatomy

    return anatomy.read(runner.info.model_path).chat_template


def _model_name(req: dict[str, Any]) -> str:
    name = req.get("model") or req.get("name")
    if not name or not isinstance(name, str):
        raise BadRequest("model is required")
    return name
