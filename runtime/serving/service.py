"""The work behind /api/generate and /api/chat, as plain functions yielding Ollama's chunks.

The HTTP routes (Ollama's and OpenAI's) and tests call these; each yields response dicts
(``done: false`` pieces, then one ``done: true`` summary with Ollama's counts and nanosecond
durations). Output that must be seen whole before it can be answered (tool calls) is held back
and sent with the summary.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from offload.models.store import ModelInfo
from offload.runtime import config
from offload.runtime.errors import BadRequest
from offload.runtime.runner.generation import Piece, Stats
from offload.runtime.serving import calibration, validate
from offload.runtime.serving.options import logprobs_from, merge_options, sampling_from
from offload.runtime.serving.scheduler import Runner, Scheduler
from offload.runtime.text import prompt
from offload.runtime.text.grammar import grammar_for_format
from offload.runtime.text.tools import (
    ThinkSplitter,
    ToolCallStreamer,
    supports_insert,
    supports_thinking,
    supports_tools,
)

__all__ = ["generate", "chat", "chat_prompt", "now_iso", "keep_alive_from", "model_name"]


def now_iso() -> str:
    """RFC 3339 timestamp as Ollama writes ``created_at``."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def keep_alive_from(value: Any) -> float | None:
    """A request's ``keep_alive`` in seconds (None: the server default; inf: forever)."""
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
        # Beyond Ollama's counts: prompt tokens found in the runner's cache (not evaluated, so not
        # in prompt_eval_count); OpenAI's and Anthropic's usage report them.
        "prompt_cached_count": stats.cached_tokens,
    }


def _run(
    runner: Runner,
    options: dict[str, Any],
    cancel: threading.Event | None,
    grammar: str | None,
    truncate: bool,
    logprobs: int | None = None,
    *,
    tokens: list[int] | None = None,
    text: str | None = None,
    add_bos: bool = True,
    want_tokens: bool = False,
) -> Iterator[Piece | Stats]:
    """Generate on the runner: the prompt is token ids, text the runner tokenizes, or both."""
    sampling = sampling_from({**options, "stop": list(options.get("stop", []))}, grammar, logprobs)
    accept = getattr(cancel, "accept", None)
    if accept is not None:
        accept()  # every check has passed: a streaming response may start now
    for ev in runner.proc.generate(sampling, tokens=tokens, text=text, add_bos=add_bos, truncate=truncate,
                                   cancel=cancel, want_tokens=want_tokens):
        if isinstance(ev, Stats):
            runner.last_stats = ev  # what the last generation did, for `ps` and tests
        yield ev
        if isinstance(ev, Stats):
            # After the answer is out: the lengths this model serves shape its next plan, and a
            # request that ran alone calibrates this machine's speed model (batched steps measure
            # another thing).
            calibration.record_workload(runner.info.digest, ev.prompt_eval_count, ev.eval_count)
            if ev.alone:
                calibration.record(runner.plan, runner.info.digest, ev)


def _check_common(name: str, req: dict[str, Any], template: str | None) -> bool | None:
    """Refuse what the model cannot do; returns the effective ``think``."""
    if req.get("images") or any((m or {}).get("images") for m in req.get("messages") or []):
        raise BadRequest(f'"{name}" has no vision support; send text only')
    think = req.get("think")
    if isinstance(think, str):  # gpt-oss style "low"/"medium"/"high" means on
        think = think.lower() not in ("", "false", "none")
    if think and not supports_thinking(template):
        raise BadRequest(f'"{name}" does not support thinking')
    return think if think is None else bool(think)


def _loaded_names(sched: Scheduler) -> set[tuple[str, int]]:
    return {(r.name, id(r)) for r in sched.loaded()}


def generate(
    sched: Scheduler, req: dict[str, Any], cancel: threading.Event | None = None
) -> Iterator[dict[str, Any]]:
    """Ollama /api/generate: pieces of ``response`` (and ``thinking``), then the summary."""
    t_start = time.perf_counter()
    name = model_name(req)
    keep = keep_alive_from(req.get("keep_alive"))
    info = sched.resolve(name)
    template = req.get("template") or info.template
    think = _check_common(name, req, template)
    if req.get("suffix") and not supports_insert(template):
        raise BadRequest(f'"{name}" does not support insert')
    grammar = grammar_for_format(req.get("format"))
    options = merge_options(info.params, req.get("options"))
    validate.for_model(info, options, req.get("context"))
    lp = logprobs_from(req)
    context = req.get("context") or []
    if not isinstance(context, list) or not all(isinstance(t, int) for t in context):
        raise BadRequest("context must be a list of token ids")
    if keep == 0 and not req.get("prompt") and not req.get("suffix") and not context:
        sched.unload(
            name
        )  # Ollama's way to unload: an empty request with keep_alive 0; loads nothing
        yield {
            "model": name,
            "created_at": now_iso(),
            "response": "",
            "done": True,
            "done_reason": "unload",
        }
        return
    before = _loaded_names(sched)
    with sched.acquire(name, options, keep) as runner:
        load_s = 0.0 if (runner.name, id(runner)) in before else runner.proc.load_s
        text_prompt = req.get("prompt") or ""
        if not text_prompt and not req.get("suffix") and not context:
            yield {
                "model": name,
                "created_at": now_iso(),
                "response": "",
                "done": True,
                "done_reason": "unload" if keep == 0 else "load",
            }
            return
        raw = bool(req.get("raw"))
        system = req.get("system") if req.get("system") is not None else info.system
        text = prompt.render_generate(template, text_prompt, system, req.get("suffix"), raw, think=think)
        splitter = ThinkSplitter(inside=text.rstrip().endswith("<think>")) if think else None
        for ev in _run(
            runner, options, cancel, grammar, req.get("truncate", True) is not False, lp,
            tokens=list(context), text=text, add_bos=not context, want_tokens=not raw,
        ):
            if isinstance(ev, Piece):
                thinking, content = splitter.feed(ev.text) if splitter else ("", ev.text)
                if thinking or content or ev.logprobs:
                    chunk = {
                        "model": name,
                        "created_at": now_iso(),
                        "response": content,
                        "done": False,
                    }
                    if thinking:
                        chunk["thinking"] = thinking
                    if ev.logprobs:
                        chunk["logprobs"] = [t.to_dict() for t in ev.logprobs]
                    yield chunk
            else:
                out = _summary(name, ev, load_s, t_start)
                out["response"] = ""
                if splitter:
                    thinking, content = splitter.flush()
                    out["response"] = content
                    if thinking:
                        out["thinking"] = thinking
                if not raw:
                    out["context"] = list(ev.prompt_tokens) + list(ev.tokens)
                yield out


def chat(
    sched: Scheduler, req: dict[str, Any], cancel: threading.Event | None = None
) -> Iterator[dict[str, Any]]:
    """Ollama /api/chat: pieces of ``message.content``, then the summary (with any ``tool_calls``)."""
    t_start = time.perf_counter()
    name = model_name(req)
    keep = keep_alive_from(req.get("keep_alive"))
    messages = req.get("messages") or []
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("messages must be a list of {role, content} objects")
    info = sched.resolve(name)
    if keep == 0 and not messages:
        sched.unload(name)
        yield {
            "model": name,
            "created_at": now_iso(),
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": "unload",
        }
        return
    tools = req.get("tools") or None
    grammar = grammar_for_format(req.get("format"))
    options = merge_options(info.params, req.get("options"))
    validate.for_model(info, options)
    lp = logprobs_from(req)
    before = _loaded_names(sched)
    with sched.acquire(name, options, keep) as runner:
        load_s = 0.0 if (runner.name, id(runner)) in before else runner.proc.load_s
        gguf_template = None if info.template else _gguf_template(runner)
        template = info.template or gguf_template
        think = _check_common(name, req, template)
        if tools and not supports_tools(template):
            raise BadRequest(f'"{name}" does not support tools')
        if not messages:
            yield {
                "model": name,
                "created_at": now_iso(),
                "message": {"role": "assistant", "content": ""},
                "done": True,
                "done_reason": "unload" if keep == 0 else "load",
            }
            return
        text, has_bos = chat_prompt(info, messages, tools, think, gguf_template)
        splitter = ThinkSplitter(inside=text.rstrip().endswith("<think>")) if think else None
        # With tools, text streams until something could open a call; the rest is parsed at the end.
        calls_out = ToolCallStreamer(tools) if tools else None
        for ev in _run(
            runner, options, cancel, grammar, req.get("truncate", True) is not False, lp,
            text=text, add_bos=not has_bos,
        ):
            if isinstance(ev, Piece):
                thinking, content = splitter.feed(ev.text) if splitter else ("", ev.text)
                if calls_out:
                    content = calls_out.feed(content)
                if thinking or content or ev.logprobs:
                    msg: dict[str, Any] = {"role": "assistant", "content": content}
                    if thinking:
                        msg["thinking"] = thinking
                    chunk = {"model": name, "created_at": now_iso(), "message": msg, "done": False}
                    if ev.logprobs:
                        chunk["logprobs"] = [t.to_dict() for t in ev.logprobs]
                    yield chunk
            else:
                out = _summary(name, ev, load_s, t_start)
                if ev.stop_sequence is not None:
                    out["stop_sequence"] = ev.stop_sequence  # which stop string ended it (Anthropic's API says)
                msg = {"role": "assistant", "content": ""}
                if splitter:
                    thinking, content = splitter.flush()
                    if thinking:
                        msg["thinking"] = thinking
                    msg["content"] = calls_out.feed(content) if calls_out else content
                if calls_out:
                    rest, calls = calls_out.finish()
                    msg["content"] += rest
                    if calls:
                        msg["tool_calls"] = calls
                out["message"] = msg
                yield out


def chat_prompt(info: ModelInfo, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                think: bool | None, gguf_template: str | None) -> tuple[str, bool]:
    """The prompt text a chat feeds the model (its MESSAGE history and SYSTEM before the request's
    messages, through its template), and whether the text already holds the BOS token."""
    history = list(info.messages) + messages
    if info.system and not any(m.get("role") == "system" for m in history):
        history = [{"role": "system", "content": info.system}, *history]
    return prompt.render_chat(info.template, gguf_template, history, tools, think=think)


def _gguf_template(runner: Runner) -> str | None:
    return _chat_template_of(str(runner.info.model_path))


@functools.lru_cache(maxsize=32)
def _chat_template_of(model_path: str) -> str | None:
    # Blobs are content-addressed, so a path's template never changes: read the header (a quarter
    # of a second for a large vocabulary) once, not on every chat request.
    from offload.planner import anatomy

    return anatomy.read(model_path).chat_template


def model_name(req: dict[str, Any]) -> str:
    """The request's model name (``model``, or the older ``name``)."""
    name = req.get("model") or req.get("name")
    if not name or not isinstance(name, str):
        raise BadRequest("model is required")
    return name
