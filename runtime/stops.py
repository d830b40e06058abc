"""Which stop string ended a generation, for the APIs that report it (Anthropic's ``stop_sequence``).

The engine ends on a stop string and leaves it out of the text, with the same ``done_reason``
("stop") as at the end of generation; the tokens it generated still hold the stop string, so
decoding them tells the two apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from offload.runtime.generation import Stats

__all__ = ["stop_sequence"]


def stop_sequence(
    detokenize: Callable[[Sequence[int]], str], stats: Stats, stops: Sequence[str] | None
) -> str | None:
    """The stop string that ended the generation (the first in the text), or None."""
    if stats.done_reason != "stop" or not stops or not stats.tokens:
        return None
    text = detokenize(stats.tokens)
    hits = [(text.find(s), s) for s in stops if s and s in text]
    return min(hits)[1] if hits else None
