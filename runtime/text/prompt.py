"""Turning a request into the prompt text the model sees.

A model's TEMPLATE (Ollama's Go-template syntax, from its Modelfile) is rendered with Ollama's
data: ``.System``, ``.Prompt``, ``.Response``, ``.Messages``, ``.Tools``, ``.Suffix``. A model
without one falls back to the chat template inside its GGUF (Jinja), and a raw request or a model
with neither gets the prompt as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import jinja2

from offload.models import gotemplate
from offload.models.template_limits import TemplateLimitExceeded, TemplateTooLarge
from offload.runtime.errors import BadRequest
from offload.runtime.text import jinja_sandbox

__all__ = ["render_generate", "render_chat", "go_messages"]


@lru_cache(maxsize=64)
def _go(source: str) -> gotemplate.Template:
    return gotemplate.parse(source)


def _raise_exception(msg: str) -> None:
    raise BadRequest(f"the model's chat template refused the messages: {msg}")


@lru_cache(maxsize=16)
def _jinja(source: str) -> jinja2.Template:
    # The template comes from the model file: untrusted, so compiled in the bounded sandbox, and
    # anything that goes wrong compiling it (a recursion, Python's nesting limit) is a 400.
    try:
        return jinja_sandbox.compile_template(source, {"raise_exception": _raise_exception})
    except (jinja2.TemplateError, gotemplate.TemplateError):
        raise
    except (RecursionError, SyntaxError, MemoryError, ValueError) as e:
        raise BadRequest(f"the model's chat template could not be compiled: {e}") from None


def go_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as Ollama's Go templates see them (``.Role``, ``.Content``, ``.ToolCalls`` ...)."""
    out = []
    for m in messages:
        tool_calls = [
            {
                "Function": {
                    "Name": c.get("function", {}).get("name", ""),
                    "Arguments": c.get("function", {}).get("arguments", {}),
                }
            }
            for c in (m.get("tool_calls") or [])
        ]
        out.append(
            {
                "Role": m.get("role", ""),
                "Content": m.get("content") or "",
                "Thinking": m.get("thinking") or "",
                "ToolCalls": tool_calls,
                "ToolName": m.get("tool_name") or m.get("name") or "",
                "Images": m.get("images") or [],
            }
        )
    return out


def _render_go(template: str, data: dict[str, Any]) -> str:
    try:
        return _go(template).render(data)
    except (TemplateLimitExceeded, TemplateTooLarge):
        raise  # with their own status, naming the limit
    except gotemplate.TemplateError as e:
        raise BadRequest(f"the model's template failed: {e}") from None


def render_chat(
    template: str | None,
    gguf_template: str | None,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None = None,
    bos_token: str = "",
    think: bool | None = None,
) -> tuple[str, bool]:
    """Prompt text for a chat; returns (text, whether the text already holds the BOS token)."""
    if template:
        data = {
            "Messages": go_messages(messages),
            "Tools": _go_tools(tools),
            "System": "",
            "Prompt": "",
            "Response": "",
            "Think": bool(think),
            "IsThinkSet": think is not None,
        }
        sys_msgs = [m.get("content", "") for m in messages if m.get("role") == "system"]
        if sys_msgs:
            data["System"] = "\n".join(sys_msgs)
        return _render_go(template, data), False
    if gguf_template:
        try:
            data = {
                "messages": list(messages),
                "tools": tools or None,
                "add_generation_prompt": True,
                "bos_token": bos_token,
                "eos_token": "",
            }
            text = jinja_sandbox.render(_jinja(gguf_template), data)
        except (TemplateLimitExceeded, TemplateTooLarge):
            raise
        except (jinja2.TemplateError, gotemplate.TemplateError) as e:
            raise BadRequest(f"the model's chat template failed: {e}") from None
        except RecursionError:
            raise BadRequest("the model's chat template failed: it nests too deeply") from None
        return text, bool(bos_token) and text.startswith(bos_token)
    # No template at all: the plain conversation text.
    return "\n".join(str(m.get("content") or "") for m in messages), False


def _go_tools(tools: Sequence[dict[str, Any]] | None) -> list[dict[str, Any]]:
    out = []
    for t in tools or []:
        fn = t.get("function", {})
        out.append(
            {
                "Type": t.get("type", "function"),
                "Function": {
                    "Name": fn.get("name", ""),
                    "Description": fn.get("description", ""),
                    "Parameters": fn.get("parameters", {}),
                },
                **t,
            }
        )
    return out


def render_generate(
    template: str | None,
    prompt: str,
    system: str | None,
    suffix: str | None = None,
    raw: bool = False,
    think: bool | None = None,
) -> str:
    """Prompt text for /api/generate: the template with .System/.Prompt (and as .Messages);
    ``think`` sets .Think and .IsThinkSet as /api/chat does."""
    if raw or not template:
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + (
        [{"role": "user", "content": prompt}] if prompt else []
    )
    data = {
        "System": system or "",
        "Prompt": prompt,
        "Response": "",
        "Suffix": suffix or "",
        "Messages": go_messages(messages),
        "Tools": [],
        "Think": bool(think),
        "IsThinkSet": think is not None,
    }
    return _render_go(template, data)
