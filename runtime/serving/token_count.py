"""Counting a chat request's prompt tokens without generating: Anthropic's ``count_tokens``.

The prompt is built by ``service.chat_prompt``, as a chat builds it (the model's template, its
MESSAGE history and SYSTEM, the request's tools and ``think``), and tokenized by the loaded model's
own tokenizer, so the count is the ``prompt_eval_count`` that the same request would report.
"""

from __future__ import annotations

from offload.models.capabilities import chat_template_of, supports_thinking, supports_tools
from offload.runtime.errors import BadRequest
from offload.runtime.serving.options import merge_options
from offload.runtime.serving.requests import ChatRequest
from offload.runtime.serving.scheduler import Scheduler
from offload.runtime.serving.service import chat_messages, chat_prompt, keep_alive_from, think_of

__all__ = ["count_chat_tokens"]


def count_chat_tokens(sched: Scheduler, req: ChatRequest) -> int:
    """The number of tokens ``service.chat`` would feed the model for ``req``."""
    name = req.model
    info = sched.resolve(name)
    tools = req.tools or None
    think = think_of(req.think)
    gguf_template = None if info.template else chat_template_of(info.model_path)
    template = info.template or gguf_template
    if tools and not supports_tools(template):
        raise BadRequest(f'"{name}" does not support tools')
    if think and not supports_thinking(template):
        raise BadRequest(f'"{name}" does not support thinking')
    text, has_bos = chat_prompt(info, chat_messages(req), tools, think, gguf_template)
    options = merge_options(info.params, req.options)
    with sched.acquire(name, options, keep_alive_from(req.keep_alive)) as runner:
        return len(runner.proc.tokenize(text, add_bos=not has_bos))
