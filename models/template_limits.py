"""Bounds on rendering an untrusted template: its source size, steps, output and wall time.

Templates come from model files and from requests, and both are untrusted: a few nested loops
can ask for billions of iterations, a width for gigabytes. Rendering runs in a server thread
that nothing outside can stop, so the engines count their own work against a ``Budget`` and
stop themselves with ``TemplateLimitExceeded`` (a 400 that names the limit) when it runs out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from offload.models.gotemplate_parse import TemplateError

__all__ = [
    "TemplateLimits",
    "DEFAULT_LIMITS",
    "Budget",
    "TemplateLimitExceeded",
    "TemplateTooLarge",
    "check_source",
]


@dataclass(frozen=True)
class TemplateLimits:
    """How much one rendering may do.

    The defaults are far above what real chat templates need (a long conversation through a
    tool-calling template takes some thousands of steps and well under a second) and far below
    what hurts the server.
    """

    #: Actions, loop iterations and calls evaluated (Jinja: template lines run and calls).
    max_steps: int = 2_000_000
    #: Characters of output, and of any single string value built while rendering.
    max_chars: int = 1 << 24
    #: Items of any list or mapping built while rendering.
    max_items: int = 1 << 20
    #: Wall time of one rendering.
    max_seconds: float = 5.0
    #: Characters of template source.
    max_source_chars: int = 1 << 18


DEFAULT_LIMITS = TemplateLimits()


class TemplateLimitExceeded(TemplateError):
    """A rendering asked for more work, output or time than a template may take."""

    http_status = 400


class TemplateTooLarge(TemplateError):
    """Template source above the size limit."""

    http_status = 413


def check_source(source: str, limits: TemplateLimits = DEFAULT_LIMITS) -> None:
    """Refuse template source longer than ``limits.max_source_chars``."""
    if len(source) > limits.max_source_chars:
        raise TemplateTooLarge(
            f"source limit reached: {len(source)} characters (the limit is {limits.max_source_chars})"
        )


class Budget:
    """The work one rendering has left; the engine calls ``step`` and ``emit`` as it goes."""

    __slots__ = ("limits", "steps", "chars", "deadline")

    def __init__(self, limits: TemplateLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.steps = 0
        self.chars = 0
        self.deadline = time.monotonic() + limits.max_seconds

    def step(self, n: int = 1) -> None:
        """Count ``n`` steps; raise when over the step limit or (checked every 1024) the deadline."""
        before = self.steps
        self.steps += n
        if self.steps > self.limits.max_steps:
            raise TemplateLimitExceeded(
                f"step limit reached: more than {self.limits.max_steps} actions, loop iterations and calls"
            )
        if (before >> 10) != (self.steps >> 10) and time.monotonic() > self.deadline:
            raise TemplateLimitExceeded(
                f"time limit reached: rendering took more than {self.limits.max_seconds:g} s"
            )

    def emit(self, n_chars: int) -> None:
        """Count ``n_chars`` of output; raise past the output limit."""
        self.chars += n_chars
        if self.chars > self.limits.max_chars:
            raise TemplateLimitExceeded(
                f"output limit reached: more than {self.limits.max_chars} characters"
            )

    def value(self, value: Any) -> Any:
        """``value`` itself, when it is within the size limits for one value."""
        if isinstance(value, (str, bytes)):
            if len(value) > self.limits.max_chars:
                raise TemplateLimitExceeded(
                    f"value limit reached: a value of {len(value)} characters (the limit is "
                    f"{self.limits.max_chars})"
                )
        elif (
            isinstance(value, (list, tuple, dict, set, frozenset))
            and len(value) > self.limits.max_items
        ):
            raise TemplateLimitExceeded(
                f"value limit reached: a collection of {len(value)} items (the limit is {self.limits.max_items})"
            )
        return value

    def width(self, n: int, what: str = "a width") -> None:
        """Refuse a width, count or repeat of ``n`` characters above the value limit."""
        if n > self.limits.max_chars:
            raise TemplateLimitExceeded(
                f"value limit reached: {what} of {n} (the limit is {self.limits.max_chars})"
            )
