"""What a model can do, read from its GGUF and its template: Ollama's ``capabilities``.

``completion`` (it generates text) or ``embedding`` (it only embeds: a pooling type in its GGUF or
an encoder-only architecture), ``tools`` and ``thinking`` and ``insert`` (its template renders
tools, a reasoning section, a fill-in-the-middle suffix), ``vision`` (a projector layer). The
template tests are the ones the runtime applies to a request, so what ``/api/show`` promises is
what a request may ask for.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from offload.models.store import ModelInfo
from offload.planner.errors import GGUFError
from offload.planner.gguf_header import read_header

__all__ = [
    "ENCODER_ARCHS",
    "capabilities",
    "capabilities_of",
    "chat_template_of",
    "gguf_metadata",
    "supports_insert",
    "supports_thinking",
    "supports_tools",
]

# llama.cpp's architectures with no decoder: they embed, they cannot generate.
ENCODER_ARCHS = frozenset(
    {"bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert", "jina-bert-v2",
     "jina-bert-v3", "t5encoder"}
)  # fmt: skip


def supports_tools(template: str | None) -> bool:
    """True when the template renders ``.Tools`` (Go) or ``tools`` (Jinja)."""
    return template is not None and (".Tools" in template or "tools" in template)


def supports_thinking(template: str | None) -> bool:
    """True when the template has a reasoning section (``.Thinking``/``.Think``)."""
    return template is not None and (".Thinking" in template or ".Think" in template)


def supports_insert(template: str | None) -> bool:
    """True when the template places a ``.Suffix`` (fill-in-the-middle)."""
    return template is not None and ".Suffix" in template


def capabilities(
    template: str | None, metadata: Mapping[str, Any], has_projector: bool = False
) -> list[str]:
    """The capabilities of a model with this template, GGUF metadata and projector, in a fixed order."""
    arch = str(metadata.get("general.architecture", ""))
    embeds_only = f"{arch}.pooling_type" in metadata or arch in ENCODER_ARCHS
    caps = ["embedding" if embeds_only else "completion"]
    if not embeds_only:
        caps += [
            name
            for name, test in (
                ("tools", supports_tools),
                ("insert", supports_insert),
                ("thinking", supports_thinking),
            )
            if test(template)
        ]
    if has_projector:
        caps.append("vision")
    return caps


@functools.lru_cache(maxsize=32)
def _metadata(model_path: str) -> dict[str, Any]:
    # Blobs are content-addressed, so a path's header never changes: read it once.
    try:
        return dict(read_header(model_path).metadata)
    except GGUFError:
        return {}  # a model we cannot read claims nothing beyond completion


def gguf_metadata(model_path: str | Path) -> dict[str, Any]:
    """The GGUF metadata of a model file (cached per path; empty when the header is unreadable)."""
    return _metadata(str(model_path))


def chat_template_of(model_path: str | Path) -> str | None:
    """The Jinja chat template inside a GGUF, if it has one."""
    value = gguf_metadata(model_path).get("tokenizer.chat_template")
    return value if isinstance(value, str) else None


def capabilities_of(info: ModelInfo) -> list[str]:
    """A resolved model's capabilities: its Modelfile template, else the GGUF's chat template."""
    metadata = gguf_metadata(info.model_path)
    template = info.template or chat_template_of(info.model_path)
    return capabilities(template, metadata, bool(info.projectors))
