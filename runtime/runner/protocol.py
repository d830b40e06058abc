"""The message format between the server and a runner: one JSON object per line.

The channel is a local stream socket (a socketpair; the runner inherits its end as a file
descriptor). Each message is a UTF-8 JSON object on one line ending in ``\\n`` (JSON escapes any
newline inside strings). The server sends operations (``op``), the runner answers with events
(``ev``). Requests that span time carry an integer ``id`` the server chose; every event about that
request repeats it. Anything the runner writes to stderr (llama.cpp's log, a crash report) goes to
its log file, never to this channel.

Server -> runner
  {"op": "load", "model": PATH, "plan": PLAN, "adapters": [PATH], "extra_bufts": BOOL, "verify": BOOL}
        first message; answered by "progress" events, then "loaded" or "load_failed"
  {"op": "generate", "id": N, "tokens": [INT] | null, "text": STR | null, "add_bos": BOOL,
   "sampling": SAMPLING, "truncate": BOOL, "want_tokens": BOOL, "ignore_eos": BOOL}
        answered by "piece" events, then "done" (or "error")
  {"op": "cancel", "id": N}          the request ends within one step with done_reason "cancel"
  {"op": "tokenize", "id": N, "text": STR, "add_bos": BOOL}          -> "result" [INT]
  {"op": "detokenize", "id": N, "tokens": [INT]}                       -> "result" STR
  {"op": "embed", "id": N, "inputs": [STR | [INT]], "truncate": BOOL}  -> "result" {"embeddings", "tokens"}
  {"op": "bench", "id": N, "n_seq": N, "tokens": [INT], "gen_tokens": N}  -> "result" timings
  {"op": "stats", "id": N}           -> "result" {"steps": [[decoding, prefill, seconds]...]}
  {"op": "shutdown"}                 the runner frees the model and exits

Runner -> server
  {"ev": "started", "pid": N}        llama.cpp's libraries are loaded; the model load begins
  {"ev": "progress", "fraction": F}
  {"ev": "tick"}                     still working (sent at most once a second while busy and silent)
  {"ev": "loaded", "pid": N, "plan": PLAN, "load_s": F, "n_ctx": N, "n_parallel": N, "n_vocab": N,
   "measured_bytes": {...}, "memory": {...}, "gave_up": [STR], "extra_bufts": BOOL,
   "phases": {"model_s": F, "context_s": F, "first_eval_s": F, "other_s": F}}
  {"ev": "load_failed", "kind": ERROR, "message": STR}
  {"ev": "piece", "id": N, "text": STR, "logprobs": [...]}      logprobs only when asked for
  {"ev": "done", "id": N, "stats": {"prompt_eval_count", "prompt_eval_s", "eval_count", "eval_s",
   "done_reason", "cached_tokens", "max_gap_s", "alone", "stop_sequence", "prompt_tokens"?, "tokens"?}}
  {"ev": "result", "id": N, "value": ANY}
  {"ev": "error", "id": N, "kind": ERROR, "message": STR}

SAMPLING is ``generation.Sampling`` as a JSON object; PLAN is ``Plan.to_dict()``; ERROR names a
runtime error class (``BadRequest``, ``ContextTooLong``, ``OutOfMemory``, ``LoadFailed``,
``PlanNotApplicable``...), so the server raises the same type the runner did.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from offload.planner.errors import OffloadError
from offload.runtime import errors
from offload.runtime.runner.generation import Sampling

__all__ = ["encode", "decode", "error_from", "sampling_to_json", "sampling_from_json"]


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_quote = json.encoder.encode_basestring  # a JSON string literal, non-ASCII kept (as _ENCODER does)


def encode(messages: list[dict[str, Any]]) -> bytes:
    """Messages as the bytes of their lines."""
    lines = []
    for m in messages:
        # A piece of text (the message of every token) is written directly: the same JSON as the
        # encoder's, at a fraction of its cost.
        if len(m) == 3 and m.get("ev") == "piece":
            rid, text = m.get("id"), m.get("text")
            if type(rid) is int and type(text) is str:
                lines.append(f'{{"ev":"piece","id":{rid},"text":{_quote(text)}}}\n')
                continue
        lines.append(_ENCODER.encode(m) + "\n")
    return "".join(lines).encode("utf-8")


def decode(line: bytes) -> dict[str, Any]:
    """One line back into its message (``ValueError`` when it is not a JSON object)."""
    msg = json.loads(line)
    if not isinstance(msg, dict):
        raise ValueError("a runner message must be a JSON object")
    return msg


_KINDS: dict[str, type[OffloadError]] = {
    name: cls for name in errors.__all__ if isinstance(cls := getattr(errors, name), type)
}


def error_from(kind: str, message: str) -> OffloadError:
    """The runtime error a runner named (``RuntimeFailure`` for a name we don't know)."""
    return _KINDS.get(kind, errors.RuntimeFailure)(message)


def sampling_to_json(s: Sampling) -> dict[str, Any]:
    """A ``Sampling`` as a JSON object."""
    d = dataclasses.asdict(s)
    d["stop"] = list(s.stop)
    return d


def sampling_from_json(d: dict[str, Any]) -> Sampling:
    """Inverse of ``sampling_to_json`` (unknown keys are ignored)."""
    names = {f.name for f in dataclasses.fields(Sampling)}
    kw = {k: v for k, v in d.items() if k in names}
    kw["stop"] = tuple(kw.get("stop") or ())
    return Sampling(**kw)
