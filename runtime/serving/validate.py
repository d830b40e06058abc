"""Checks of a request against the model it runs on: token ids and context-dependent options.

What needs no model (types, ranges, the machine's CPU count) is checked by ``options``; what
needs the model's vocabulary or training context is checked here, from the GGUF header alone
(no load). llama.cpp aborts the whole process on a token id outside the vocabulary, so every
list of ids a client sends passes through ``check_token_ids`` before it goes near the model.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from offload.models.parameters import MAX_CTX
from offload.models.store import ModelInfo
from offload.runtime.errors import BadRequest, PayloadTooLarge

__all__ = [
    "MAX_TOKEN_IDS",
    "ModelFacts",
    "model_facts",
    "check_token_ids",
    "token_ids_for",
    "for_model",
]

log = logging.getLogger(__name__)

#: The most token ids one list may hold (a context of about a million tokens).
MAX_TOKEN_IDS = 1 << 20


@dataclass(frozen=True)
class ModelFacts:
    """What requests are checked against: vocabulary size and training context, in tokens."""

    n_vocab: int
    n_ctx_train: int


@functools.lru_cache(maxsize=64)
def _facts(model_path: str) -> ModelFacts:
    # Blobs are content-addressed: a path's header never changes, so it is read once.
    from offload.planner import anatomy

    a = anatomy.read(model_path)
    return ModelFacts(n_vocab=int(a.n_vocab), n_ctx_train=int(a.n_ctx_train or 0))


def model_facts(info: ModelInfo) -> ModelFacts:
    """The model's vocabulary size and training context, from its GGUF header."""
    return _facts(str(info.model_path))


def check_token_ids(ids: Any, n_vocab: int, field: str) -> list[int]:
    """``ids`` when it is a list of at most ``MAX_TOKEN_IDS`` ids, each ``0 <= id < n_vocab``.

    A 400 names the field and the accepted range; a list too long is a 413.
    """
    if not isinstance(ids, (list, tuple)):
        raise BadRequest(f"{field} must be a list of token ids, got {type(ids).__name__}")
    if len(ids) > MAX_TOKEN_IDS:
        raise PayloadTooLarge(
            f"{field} holds {len(ids)} token ids; at most {MAX_TOKEN_IDS} are accepted"
        )
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab:
            shown = repr(t) if len(repr(t)) <= 40 else repr(t)[:37] + "..."
            raise BadRequest(
                f"{field} holds {shown}; token ids of this model are whole numbers from 0 to {n_vocab - 1}"
            )
    return list(ids)


def token_ids_for(info: ModelInfo, ids: Sequence[int], field: str) -> list[int]:
    """``check_token_ids`` against ``info``'s vocabulary."""
    return check_token_ids(ids, model_facts(info).n_vocab, field)


def for_model(info: ModelInfo, options: dict[str, Any], context: Any = None) -> None:
    """Check merged ``options`` (and a generate request's ``context``) against the model.

    ``num_ctx`` above the training context is lowered to it, as Ollama does; ``repeat_last_n``
    may be at most the context (each token of it costs memory in the sampler).
    """
    facts = model_facts(info)
    n_ctx = options.get("num_ctx")
    if n_ctx and facts.n_ctx_train and n_ctx > facts.n_ctx_train:
        log.warning(
            "%s: num_ctx %d is above the training context; using %d",
            info.name.display,
            n_ctx,
            facts.n_ctx_train,
        )
        options["num_ctx"] = facts.n_ctx_train
    limit = options.get("num_ctx") or facts.n_ctx_train or MAX_CTX
    last_n = options.get("repeat_last_n")
    if last_n is not None and last_n > limit:
        raise BadRequest(
            f"options.repeat_last_n must be a whole number from -1 to {limit} (-1 = the whole "
            f"context, 0 = off; at most the context length), got {last_n}"
        )
    if context:
        check_token_ids(context, facts.n_vocab, "context")
