"""Embeddings as Ollama's /api/embed gives them: one vector per input, mean-pooled, L2-normalised.

Models without a pooling layer (Gemma 3 base) hand back one vector per token; those are averaged.
Vectors are unit length so that a dot product is the cosine similarity, as Ollama's are.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from offload.runtime.errors import BadRequest, ClientGone
from offload.runtime.serving.options import merge_options
from offload.runtime.serving.scheduler import Scheduler

__all__ = ["Embedded", "embed", "normalize"]


@dataclass
class Embedded:
    """Vectors and what computing them cost."""

    model: str
    embeddings: list[list[float]]
    prompt_eval_count: int
    load_s: float
    total_s: float


def normalize(vec: Sequence[float]) -> list[float]:
    """``vec`` scaled to unit length (a zero vector stays zero)."""
    norm = math.sqrt(sum(x * x for x in vec))
    return [float(x) / norm for x in vec] if norm > 0 else [float(x) for x in vec]


def embed(
    sched: Scheduler,
    name: str,
    inputs: Sequence[str | Sequence[int]],
    truncate: bool = True,
    dimensions: int | None = None,
    options: dict[str, Any] | None = None,
    keep_alive_s: float | None = None,
    cancel: threading.Event | None = None,
) -> Embedded:
    """Embed each input with ``name``; too-long inputs are cut to the context unless ``truncate`` is False.

    The runner embeds one input per call, so generation on the model goes on between inputs, and
    a ``cancel`` set (the client hung up) stops the work at the next input instead of after the
    whole list (2,048 long inputs hold a CPU for hours).
    """
    t0 = time.perf_counter()
    if dimensions is not None and dimensions <= 0:
        raise BadRequest("dimensions must be a positive number")
    info = sched.resolve(name)
    opts = merge_options(info.params, options)
    loaded = {id(r) for r in sched.loaded()}
    with sched.acquire(name, opts, keep_alive_s, embedding=True) as runner:
        load_s = 0.0 if id(runner) in loaded else runner.proc.load_s
        raw: list[list[float]] = []
        count = 0
        for item in inputs:
            if cancel is not None and cancel.is_set():
                raise ClientGone(f"the client hung up after {len(raw)} of {len(inputs)} inputs")
            vectors, used = runner.proc.embed([item], truncate=truncate)
            raw += vectors
            count += used
    vectors = [normalize(v[:dimensions] if dimensions is not None else v) for v in raw]
    return Embedded(name, vectors, count, load_s, time.perf_counter() - t0)
