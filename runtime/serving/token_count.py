"""Counting a chat request's prompt tokens without generating: Anthropic's ``count_tokens``.

The prompt is built by ``service.chat_prompt``, as a chat builds it (the model's template, its
MESSAGE history and SYSTEM, the request's tools and ``think``), and tokenized by the loaded model's own tokenizer, so
the count is the ``prompt_eval_count`` that the same request would report.
"""

from __future__ import annotations

from typing import Any

from offload.models.capabilities import chat_template_of, supports_thinking, supports_tools
from offload.runtime.errors import BadRequest
from offload.runtime.serving.options import merge_options
from offload.runtime.serving.scheduler import Scheduler
from offload.runtime.serving.service import chat_prompt, keep_alive_from, model_name

__all__ = ["count_chat_tokens"]


def count_chat_tokens(sched: Scheduler, req: dict[str, Any]) -> int:
    """The number of tokens ``service.chat`` would feed the model for ``req``."""
    name = model_name(req)
    info = sched.resolve(name)
    messages = list(req.get("messages") or [])
    tools = req.get("tools") or None
    think = req.get("think")
    if isinstance(think, str):  # as service.chat reads it: "low"/"medium"/"high" mean on
        think = think.lower() not in ("", "false", "none")
    gguf_template = None if info.template else chat_template_of(info.model_path)
    template = info.template or gguf_template
    if tools and not supports_tools(template):
        raise BadRequest(f'"{name}" does not support tools')
    if think and not supports_thinking(template):
        raise BadRequest(f'"{name}" does not support thinking')
    text, has_bos = chat_prompt(info, messages, tools, None if think is None else bool(think), gguf_template)
    options = merge_options(info.params, req.get("options"))
    with sched.acquire(name, options, keep_alive_from(req.get("keep_alive"))) as runner:
        return len(runner.proc.tokenize(text, add_bos=not has_bos))
