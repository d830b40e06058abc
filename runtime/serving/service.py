"""The work behind /api/generate and /api/chat: a typed request in, Ollama's chunks out.

Every face (Ollama's routes, OpenAI's, the Responses and Messages APIs) hands ``generate`` or
``chat`` a ``GenerateRequest``/``ChatRequest`` and gets response dicts: ``done: false`` pieces,
then one ``done: true`` summary with Ollama's counts and nanosecond durations. Output that must be
seen whole before it can be answered (tool calls) is held back and sent with the summary.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from offload.models.store import ModelInfo
from offload.runtime import config
from offload.runtime.errors import BadRequest
from offload.runtime.runner.generation import Piece, Stats
from offload.runtime.serving import calibration, validate
from offload.runtime.serving.options import logprobs_from, merge_options, sampling_from
from offload.runtime.serving.requests import ChatRequest, GenerateRequest
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

__all__ = [
    "generate",
    "chat",
    "chat_prompt",
    "chat_messages",
    "think_of",
    "now_iso",
    "keep_alive_from",
]


def now_iso() -> str:
    """RFC 3339 timestamp as Ollama writes ``created_at``."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def keep_alive_from(value: Any) -> float | None:
    """A request's ``keep_alive`` in seconds (None: the server default; inf: forever)."""
    return None if value is None else config.parse_duration_s(value, config.keep_alive_s())


def think_of(value: bool | str | None) -> bool | None:
    """A request's ``think``: gpt-oss style "low"/"medium"/"high" mean on."""
    if isinstance(value, str):
        return value.lower() not in ("", "false", "none")
    return value if value is None else bool(value)


def chat_messages(req: ChatRequest) -> list[dict[str, Any]]:
    """The request's messages as the templates see them (plain dicts, unset fields left out)."""
    return [m.model_dump(exclude_none=True) for m in req.messages or []]


@dataclass
class _Answer:
    """How one request's chunks look: ``response`` (generate) or ``message`` (chat) pieces, with
    reasoning split out and tool calls held back where the request asks for them."""

    model: str
    chat: bool
    think: ThinkSplitter | None = None
    calls: ToolCallStreamer | None = None

    def chunk(self, content: str, thinking: str, done: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": now_iso()}
        if self.chat:
            msg: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                msg["thinking"] = thinking
            out["message"] = msg
        else:
            out["response"] = content
            if thinking:
                out["thinking"] = thinking
        out["done"] = done
        return out

    def piece(self, text: str) -> tuple[str, str]:
        """(thinking, content) that can be sent now for a piece of model output."""
        thinking, content = self.think.feed(text) if self.think else ("", text)
        if self.calls:
            content = self.calls.feed(content)
        return thinking, content

    def rest(self) -> tuple[str, str, list[dict[str, Any]]]:
        """(thinking, content, tool calls) held back until the end."""
        thinking, content = self.think.flush() if self.think else ("", "")
        calls: list[dict[str, Any]] = []
        if self.calls:
            content = self.calls.feed(content)
            tail, calls = self.calls.finish()
            content += tail
        return thinking, content, calls

    def empty(self, done_reason: str) -> dict[str, Any]:
        """The answer to a request that only loads or unloads the model."""
        return {**self.chunk("", "", True), "done_reason": done_reason}


def _summary(answer: _Answer, stats: Stats, load_s: float, t_start: float) -> dict[str, Any]:
    thinking, content, calls = answer.rest()
    out = answer.chunk(content, thinking, True)
    if calls:
        out["message"]["tool_calls"] = calls
    out.update(
        {
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
    )
    if stats.stop_sequence is not None:
        out["stop_sequence"] = (
            stats.stop_sequence
        )  # which stop string ended it (Anthropic's API says)
    return out


@dataclass
class _Job:
    """What a checked request runs with."""

    name: str
    info: ModelInfo
    keep: float | None
    options: dict[str, Any]
    grammar: str | None
    logprobs: int | None
    truncate: bool


def _job(
    sched: Scheduler, req: GenerateRequest | ChatRequest, context: list[int] | None = None
) -> _Job:
    """Check what needs no loaded model: the model exists, options and format are sound."""
    info = sched.resolve(req.model)
    options = merge_options(info.params, req.options)
    validate.for_model(info, options, context)
    return _Job(
        req.model,
        info,
        keep_alive_from(req.keep_alive),
        options,
        grammar_for_format(req.format),
        logprobs_from(req.logprobs, req.top_logprobs),
        req.truncate is not False,
    )


@contextlib.contextmanager
def _loaded(sched: Scheduler, job: _Job) -> Iterator[tuple[Runner, float]]:
    """The runner for the job, and the seconds this request spent loading it (0 if it was loaded)."""
    before = {id(r) for r in sched.loaded()}
    with sched.acquire(job.name, job.options, job.keep) as runner:
        yield runner, 0.0 if id(runner) in before else runner.proc.load_s


def _check(name: str, template: str | None, think: bool | None, images: bool) -> None:
    """Refuse what the model cannot do."""
    if images:
        raise BadRequest(f'"{name}" has no vision support; send text only')
    if think and not supports_thinking(template):
        raise BadRequest(f'"{name}" does not support thinking')


def _stream(
    runner: Runner,
    job: _Job,
    answer: _Answer,
    cancel: threading.Event | None,
    t_start: float,
    load_s: float,
    *,
    tokens: list[int] | None = None,
    text: str | None = None,
    add_bos: bool = True,
    want_tokens: bool = False,
) -> Iterator[dict[str, Any] | Stats]:
    """Generate on the runner and yield the answer's chunks, then its summary and the ``Stats``."""
    sampling = sampling_from(
        {**job.options, "stop": list(job.options.get("stop", []))}, job.grammar, job.logprobs
    )
    accept = getattr(cancel, "accept", None)
    if accept is not None:
        accept()  # every check has passed: a streaming response may start now
    for ev in runner.proc.generate(
        sampling,
        tokens=tokens,
        text=text,
        add_bos=add_bos,
        truncate=job.truncate,
        cancel=cancel,
        want_tokens=want_tokens,
    ):
        if isinstance(ev, Piece):
            thinking, content = answer.piece(ev.text)
            if thinking or content or ev.logprobs:
                chunk = answer.chunk(content, thinking, False)
                if ev.logprobs:
                    chunk["logprobs"] = [t.to_dict() for t in ev.logprobs]
                yield chunk
            continue
        runner.last_stats = ev  # what the last generation did, for `ps` and tests
        yield _summary(answer, ev, load_s, t_start)
        yield ev
        # After the answer is out: the lengths this model serves shape its next plan, and a request
        # that ran alone calibrates this machine's speed model (batched steps measure another thing).
        calibration.record_workload(runner.info.digest, ev.prompt_eval_count, ev.eval_count)
        if ev.alone:
            calibration.record(runner.plan, runner.info.digest, ev)


def generate(
    sched: Scheduler, req: GenerateRequest, cancel: threading.Event | None = None
) -> Iterator[dict[str, Any]]:
    """Ollama /api/generate: pieces of ``response`` (and ``thinking``), then the summary."""
    t_start = time.perf_counter()
    context = list(req.context or [])
    job = _job(sched, req, context)
    template = req.template or job.info.template
    think = think_of(req.think)
    _check(job.name, template, think, bool(req.images))
    if req.suffix and not supports_insert(template):
        raise BadRequest(f'"{job.name}" does not support insert')
    answer = _Answer(job.name, chat=False)
    if not (req.prompt or req.suffix or context):
        # Ollama's way to load a model (or, with keep_alive 0, to unload it without loading it).
        if job.keep == 0:
            sched.unload(job.name)
            yield answer.empty("unload")
            return
        with _loaded(sched, job):
            yield answer.empty("load")
        return
    raw = bool(req.raw)
    system = req.system if req.system is not None else job.info.system
    text = prompt.render_generate(template, req.prompt or "", system, req.suffix, raw, think=think)
    if think:
        answer.think = ThinkSplitter(inside=text.rstrip().endswith("<think>"))
    with _loaded(sched, job) as (runner, load_s):
        summary: dict[str, Any] = {}
        for ev in _stream(
            runner,
            job,
            answer,
            cancel,
            t_start,
            load_s,
            tokens=context,
            text=text,
            add_bos=not context,
            want_tokens=not raw,
        ):
            if isinstance(ev, Stats):
                if not raw:  # Ollama's context: the prompt and the answer, to continue from
                    summary["context"] = list(ev.prompt_tokens) + list(ev.tokens)
                yield summary
            elif ev.get("done"):
                summary = ev
            else:
                yield ev


def chat(
    sched: Scheduler, req: ChatRequest, cancel: threading.Event | None = None
) -> Iterator[dict[str, Any]]:
    """Ollama /api/chat: pieces of ``message.content``, then the summary (with any ``tool_calls``)."""
    t_start = time.perf_counter()
    messages = chat_messages(req)
    job = _job(sched, req)
    tools = req.tools or None
    answer = _Answer(job.name, chat=True)
    if not messages and job.keep == 0:
        sched.unload(job.name)
        yield answer.empty("unload")
        return
    with _loaded(sched, job) as (runner, load_s):
        gguf_template = None if job.info.template else _chat_template_of(str(job.info.model_path))
        template = job.info.template or gguf_template
        think = think_of(req.think)
        _check(job.name, template, think, any(m.get("images") for m in messages))
        if tools and not supports_tools(template):
            raise BadRequest(f'"{job.name}" does not support tools')
        if not messages:
            yield answer.empty("load")
            return
        text, has_bos = chat_prompt(job.info, messages, tools, think, gguf_template)
        if think:
            answer.think = ThinkSplitter(inside=text.rstrip().endswith("<think>"))
        if tools:
            # Text streams until something could open a call; the rest is parsed at the end.
            answer.calls = ToolCallStreamer(tools)
        for ev in _stream(
            runner, job, answer, cancel, t_start, load_s, text=text, add_bos=not has_bos
        ):
            if not isinstance(ev, Stats):
                yield ev


def chat_prompt(
    info: ModelInfo,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    think: bool | None,
    gguf_template: str | None,
) -> tuple[str, bool]:
    """The prompt text a chat feeds the model (its MESSAGE history and SYSTEM before the request's
    messages, through its template), and whether the text already holds the BOS token."""
    history = list(info.messages) + messages
    if info.system and not any(m.get("role") == "system" for m in history):
        history = [{"role": "system", "content": info.system}, *history]
    return prompt.render_chat(info.template, gguf_template, history, tools, think=think)


@functools.lru_cache(maxsize=32)
def _chat_template_of(model_path: str) -> str | None:
    # Blobs are content-addressed, so a path's template never changes: read the header (a quarter
    # of a second for a large vocabulary) once, not on every chat request.
    from offload.planner import anatomy

    return anatomy.read(model_path).chat_template
