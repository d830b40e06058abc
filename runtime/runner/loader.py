"""Loading that heals: when a plan does not fit in memory, give up one step and try again.

A step is, in order: GPU layers (or, for a mixture-of-experts model, the expert tensors of one more
GPU layer moved to the CPU), then context length. Each retry frees everything first. What was given
up is returned as sentences for the user; a load that cannot be healed raises ``OutOfMemory``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from offload.planner.types import Plan
from offload.runtime.errors import OutOfMemory
from offload.runtime.runner.engine import Engine
from offload.runtime.serving.healing import Shrink, shrink_step

__all__ = ["load_healing"]

log = logging.getLogger(__name__)


def _model_path_and_adapters(info_or_path: Any) -> tuple[Path, Sequence[Path]]:
    if isinstance(info_or_path, (str, Path)):
        return Path(info_or_path), ()
    return Path(info_or_path.model_path), tuple(getattr(info_or_path, "adapters", ()) or ())


def load_healing(
    info_or_path: Any,
    plan: Plan,
    shrink: Shrink | None = None,
    *,
    max_retries: int = 12,
    verify_decode: bool = True,
    extra_bufts: bool = True,
    progress: Callable[[float], None] | None = None,
) -> tuple[Engine, Plan, list[str]]:
    """Load ``plan``; on running out of memory, shrink it one step and retry.

    Returns (engine, the plan that loaded, sentences saying what was given up). ``info_or_path`` is a
    GGUF path or a ``ModelInfo``. Errors other than memory (``PlanNotApplicable``, a broken file)
    are raised at once: a smaller plan would not fix them.
    """
    path, adapters = _model_path_and_adapters(info_or_path)
    if shrink is None:
        from offload.runtime.runner.native import gguf_tensor_names

        def shrink(p: Plan, retry: int) -> tuple[Plan, str] | None:
            return shrink_step(p, retry, list(gguf_tensor_names(path)))  # read when needed

    gave_up: list[str] = []
    current = plan
    for retry in range(max_retries + 1):
        try:
            engine = Engine.load(
                path,
                current,
                adapters=adapters,
                verify_decode=verify_decode,
                extra_bufts=extra_bufts,
                progress=progress,
            )
        except OutOfMemory as e:
            step = shrink(current, retry) if retry < max_retries else None
            if step is None:
                given = f" (after giving up: {'; '.join(gave_up)})" if gave_up else ""
                raise OutOfMemory(f"{e}{given}") from None
            current, sentence = step
            log.warning("load of %s ran out of memory; %s", path.name, sentence)
            gave_up.append(sentence)
            continue
        if gave_up:
            current = dataclasses.replace(current, reasons=(*current.reasons, *gave_up))
            engine.plan = current
            engine.gave_up = list(gave_up)
        return engine, current, gave_up
    raise AssertionError("unreachable")  # the loop returns or raises
