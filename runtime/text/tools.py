"""Reading tool calls and reasoning out of what a model wrote.

Ollama parses tool calls from a model's output when its template supports tools: JSON objects
with a ``name`` and ``arguments`` (or ``parameters``), bare or inside the template's markers
(``<tool_call>...</tool_call>``). Reasoning models put their thinking inside ``<think>`` tags;
``ThinkSplitter`` separates it from the answer as the text streams.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

# One definition of each capability test, shared with /api/show's capabilities.
from offload.models.capabilities import supports_insert, supports_thinking, supports_tools

__all__ = [
    "supports_tools",
    "supports_thinking",
    "supports_insert",
    "parse_tool_calls",
    "ThinkSplitter",
    "ToolCallStreamer",
]


def _as_call(obj: Any, names: set[str]) -> dict[str, Any] | None:
    if not isinstance(obj, dict):
        return None
    if "function" in obj and isinstance(obj["function"], dict):
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(name, str) or not isinstance(args, dict) or (names and name not in names):
        return None
    return {"function": {"name": name, "arguments": args}}


def parse_tool_calls(
    text: str, tools: Sequence[dict[str, Any]] | None
) -> tuple[str, list[dict[str, Any]]]:
    """Split output into (remaining content, tool calls); calls name one of ``tools``."""
    names = {(t.get("function") or {}).get("name", "") for t in tools or []} - {""}
    decoder = json.JSONDecoder()
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    i = 0
    while i < len(text):
        j = min((k for k in (text.find("{", i), text.find("[", i)) if k >= 0), default=-1)
        if j < 0:
            kept.append(text[i:])
            break
        try:
            obj, end = decoder.raw_decode(text, j)
        except ValueError:
            kept.append(text[i : j + 1])
            i = j + 1
            continue
        found = [
            c for c in (_as_call(o, names) for o in (obj if isinstance(obj, list) else [obj])) if c
        ]
        if found:
            calls.extend(found)
            kept.append(text[i:j])
        else:
            kept.append(text[i:end])
        i = end
    content = "".join(kept)
    if calls:
        for marker in ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>"):
            content = content.replace(marker, "")
        content = content.strip()
    return content, calls


_CALL_OPENERS = ("{", "[", "<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")


class ToolCallStreamer:
    """Streams an answer's text while it cannot be a tool call; from the first thing that could
    open one (JSON, a call marker, or the start of a marker cut between pieces) it holds the rest,
    which ``finish`` parses into the remaining content and the calls."""

    def __init__(self, tools: Sequence[dict[str, Any]]) -> None:
        self.tools = tools
        self.pending = ""
        self.holding = False

    def feed(self, text: str) -> str:
        """Text that can be sent now."""
        self.pending += text
        if self.holding:
            return ""
        cut = min((k for k in (self.pending.find(o) for o in _CALL_OPENERS) if k >= 0), default=-1)
        if cut >= 0:
            self.holding = True
            safe = self.pending[:cut].rstrip()
            self.pending = self.pending[len(safe) :]
        else:
            # Keep back a tail that could still grow into a marker, and trailing whitespace (a
            # call may follow it; parsing strips it then).
            keep = max(
                (
                    n
                    for o in _CALL_OPENERS
                    for n in range(1, len(o))
                    if self.pending.endswith(o[:n])
                ),
                default=0,
            )
            safe = self.pending[: len(self.pending) - keep]
            safe = safe[: len(safe.rstrip())]
            self.pending = self.pending[len(safe) :]
        return safe

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content not yet sent, tool calls) at the end of the answer."""
        text, self.pending = self.pending, ""
        return parse_tool_calls(text, self.tools) if self.holding else (text, [])


class ThinkSplitter:
    """Streams text into (thinking, content), holding back a tag cut between pieces."""

    def __init__(
        self, open_tag: str = "<think>", close_tag: str = "</think>", inside: bool = False
    ) -> None:
        self.open_tag, self.close_tag = open_tag, close_tag
        self.inside = inside  # True when the prompt itself opened the reasoning section
        self.buf = ""

    def feed(self, text: str) -> tuple[str, str]:
        """Add text; return the (thinking, content) that is now certain."""
        self.buf += text
        thinking: list[str] = []
        content: list[str] = []
        while True:
            tag = self.close_tag if self.inside else self.open_tag
            k = self.buf.find(tag)
            if k >= 0:
                (thinking if self.inside else content).append(self.buf[:k])
                self.buf = self.buf[k + len(tag) :]
                self.inside = not self.inside
                continue
            hold = next(
                (
                    n
                    for n in range(min(len(tag) - 1, len(self.buf)), 0, -1)
                    if self.buf.endswith(tag[:n])
                ),
                0,
            )
            (thinking if self.inside else content).append(self.buf[: len(self.buf) - hold])
            self.buf = self.buf[len(self.buf) - hold :]
            return "".join(thinking), "".join(content)

    def flush(self) -> tuple[str, str]:
        """What is left at the end."""
        rest, self.buf = self.buf, ""
        return (rest, "") if self.inside else ("", rest)
