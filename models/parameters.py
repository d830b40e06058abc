"""Ollama's options: each one's type and accepted range, for Modelfile PARAMETERs and requests.

One table serves both: a value a Modelfile may not hold is a value a request may not send. The
ranges keep values llama.cpp would abort or misbehave on (a negative batch, a NaN temperature,
a ring buffer of a billion tokens) out of it. Limits that depend on the model or the machine
(the training context, the CPU count) are checked where those are known, by the runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from offload.models.errors import ModelError

__all__ = [
    "InvalidParameter",
    "Rule",
    "RULES",
    "IGNORED",
    "MAX_CTX",
    "MAX_STOP_COUNT",
    "MAX_STOP_CHARS",
    "check_parameter",
]

INT32_MAX = 2**31 - 1
#: The largest context anyone may ask for; real models top out around ten million tokens.
MAX_CTX = 1 << 24
# llama-cpp-python keeps n_batch rows of logits (262144 floats a row for Gemma 3): 8192 is 8 GiB
# of address space already, and past it a bigger batch buys no speed.
MAX_BATCH = 8192
MAX_STOP_COUNT = 16
MAX_STOP_CHARS = 256
# float32's largest finite value: llama.cpp keeps these options as float, where more is inf.
_FLOAT32_MAX = 3.4028234663852886e38


class InvalidParameter(ModelError):
    """An option or PARAMETER whose value has the wrong type or is out of range."""

    http_status = 400

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} {problem}")
        self.name = name
        self.problem = problem


@dataclass(frozen=True)
class Rule:
    """What one option accepts: its type (int, float, bool, or str for stop) and range."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    #: What special values mean, for the error message ("-1 = the whole context").
    note: str = ""

    def describe(self) -> str:
        """The accepted values in words, e.g. "a whole number from 1 to 8192"."""
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return f"a string or a list of at most {MAX_STOP_COUNT} strings of at most {MAX_STOP_CHARS} characters"
        what = "a whole number" if self.kind is int else "a finite number"
        if self.lo is not None and self.hi is not None:
            what += f" from {_num(self.lo)} to {_num(self.hi)}"
        elif self.lo is not None:
            what += f" of at least {_num(self.lo)}"
        elif self.hi is not None:
            what += f" of at most {_num(self.hi)}"
        return what + (f" ({self.note})" if self.note else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


#: Ollama's options (api/types.go ``Options`` and ``Runner``) and what each accepts.
RULES: dict[str, Rule] = {
    # Loading: these change the plan.
    "num_ctx": Rule(int, 1, MAX_CTX),
    "num_batch": Rule(int, 1, MAX_BATCH),
    "num_gpu": Rule(int, -1, INT32_MAX, "-1 = decide"),
    "main_gpu": Rule(int, 0, 255),
    "num_thread": Rule(int, 0, 1024, "0 = decide"),
    "num_keep": Rule(int, -1, INT32_MAX),
    "use_mmap": Rule(bool),
    "use_mlock": Rule(bool),
    "numa": Rule(bool),
    "low_vram": Rule(bool),
    "vocab_only": Rule(bool),
    "f16_kv": Rule(bool),
    "logits_all": Rule(bool),
    "embedding_only": Rule(bool),
    # Sampling.
    "seed": Rule(int, -(2**63), 2**64 - 1, "negative = random"),
    "num_predict": Rule(int, -2, INT32_MAX, "-1 = no limit, -2 = fill the context"),
    "top_k": Rule(int, 0, INT32_MAX, "0 = off"),
    "top_p": Rule(float, 0, 1),
    "min_p": Rule(float, 0, 1),
    "typical_p": Rule(float, 0, 1),
    "tfs_z": Rule(float, 0, None),
    "repeat_last_n": Rule(int, -1, MAX_CTX, "-1 = the whole context, 0 = off"),
    "temperature": Rule(float, 0, None),
    "repeat_penalty": Rule(float, 0, None),
    "presence_penalty": Rule(float),
    "frequency_penalty": Rule(float),
    "mirostat": Rule(int, 0, 2, "0 = off, 1 = Mirostat, 2 = Mirostat 2.0"),
    "mirostat_tau": Rule(float, 0, None),
    "mirostat_eta": Rule(float, 0, None),
    "penalize_newline": Rule(bool),
    "stop": Rule(str),
    # Older options Ollama still reads; accepted and checked, never used.
    "num_gqa": Rule(int, 0, INT32_MAX),
    "rope_frequency_base": Rule(float, 0, None),
    "rope_frequency_scale": Rule(float, 0, None),
}

#: Options accepted and checked but without effect here.
IGNORED = frozenset(
    {
        "penalize_newline",
        "tfs_z",
        "num_gqa",
        "f16_kv",
        "vocab_only",
        "logits_all",
        "embedding_only",
        "rope_frequency_base",
        "rope_frequency_scale",
        "main_gpu",
        "num_keep",
        "numa",
        "low_vram",
    }
)

# The spellings Go's strconv.ParseBool accepts, since Ollama parses Modelfiles with it.
_TRUE = ("1", "t", "T", "true", "TRUE", "True")
_FALSE = ("0", "f", "F", "false", "FALSE", "False")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _to_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str) and len(value) <= 40:
        try:
            return int(value.strip())
        except ValueError:
            try:
                return _to_int(float(value))
            except ValueError:
                return None
    return None


def _to_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) or (isinstance(value, str) and len(value) <= 40):
        try:
            return float(value)
        except (ValueError, OverflowError):
            return None
    return None


def _stop_list(name: str, value: Any, rule: Rule) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(s, str) for s in values):
        raise InvalidParameter(name, f"must be {rule.describe()}, got {_show(value)}")
    if len(values) > MAX_STOP_COUNT:
        raise InvalidParameter(name, f"takes at most {MAX_STOP_COUNT} strings, got {len(values)}")
    for s in values:
        if len(s) > MAX_STOP_CHARS:
            raise InvalidParameter(
                name, f"strings may be at most {MAX_STOP_CHARS} characters, got one of {len(s)}"
            )
    return list(values)


def check_parameter(key: str, value: Any, name: str | None = None, rule: Rule | None = None) -> Any:
    """``value`` converted to option ``key``'s type, if it is one the option accepts.

    Raises ``InvalidParameter`` (a 400) naming the option (as ``name``, e.g. "options.top_p")
    and what it accepts. ``stop`` comes back as a list. Numbers may come as numeric strings, as
    Modelfiles write them; a whole-number float is an integer. ``rule`` narrows the table's rule
    where more is known (the machine's CPU count).
    """
    rule = rule or RULES[key]
    label = name or key
    if rule.kind is str:
        return _stop_list(label, value, rule)
    if rule.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip() in _TRUE + _FALSE:
            return value.strip() in _TRUE
        raise InvalidParameter(label, f"must be {rule.describe()}, got {_show(value)}")
    number: int | float | None = _to_int(value) if rule.kind is int else _to_float(value)
    if number is None or (isinstance(number, float) and not abs(number) <= _FLOAT32_MAX):
        raise InvalidParameter(label, f"must be {rule.describe()}, got {_show(value)}")
    if (rule.lo is not None and number < rule.lo) or (rule.hi is not None and number > rule.hi):
        raise InvalidParameter(label, f"must be {rule.describe()}, got {_show(value)}")
    return number
