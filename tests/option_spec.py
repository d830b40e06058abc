"""What each of Ollama's options accepts, written out independently of the code, as strategies.

``SPEC[name] = (valid, invalid)``: hypothesis strategies of values the option must accept and
values it must refuse (NaN, infinities, out-of-range numbers, wrong types, nested objects).
Shared by the option tests of the runtime (requests) and the model library (Modelfiles).
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import strategies as st

__all__ = [
    "SPEC", "INT32_MAX", "FLOAT32_MAX", "INT_KEYS", "json_junk", "PLAN_KEYS", "is_valid", "converted"
]  # fmt: skip

INT32_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38

# Values of no numeric or boolean meaning: containers, nested objects, words.
json_junk = st.one_of(
    st.lists(st.integers(0, 3), max_size=3),
    st.dictionaries(
        st.sampled_from(["a", "value"]), st.integers() | st.text(max_size=3), max_size=2
    ),
    st.sampled_from(["", "abc", "ten", "1,5", "0x10x", "nope", "true-ish"]),
)
_bad_floats = st.sampled_from([math.nan, math.inf, -math.inf, 1e39, -1e39, 1e308])


def _ints(lo: int, hi: int) -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    # Whole-number floats are integers, as JSON's 1.0 (exactly representable ones only).
    valid = (
        st.integers(lo, hi)
        | st.integers(max(lo, -(2**53)), min(hi, 2**53)).map(float)
        | st.sampled_from([lo, hi])
    )
    invalid = st.one_of(
        st.sampled_from([lo - 1, hi + 1]),
        st.integers(max_value=lo - 1),
        st.integers(min_value=hi + 1),
        st.floats(max(lo, -(2**53)), min(hi, 2**53)).filter(lambda x: not x.is_integer()),
        _bad_floats,
        st.booleans(),
        json_junk,
    )
    return valid, invalid


def _floats(
    lo: float | None, hi: float | None
) -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    low = -FLOAT32_MAX if lo is None else lo
    high = FLOAT32_MAX if hi is None else hi
    valid = st.floats(low, high, allow_nan=False) | st.integers(
        int(max(low, -1e6)), int(min(high, 1e6))
    )
    valid = valid | st.sampled_from([low, high])
    outside = []
    if lo is not None:
        outside.append(st.sampled_from([lo - 0.5, lo - 1e-6]))
        outside.append(
            st.floats(max_value=lo, allow_nan=False, allow_infinity=False).filter(lambda x: x < lo)
        )
    if hi is not None:
        outside.append(st.sampled_from([hi + 0.5, hi + 1e-6]))
        outside.append(
            st.floats(min_value=hi, allow_nan=False, allow_infinity=False).filter(lambda x: x > hi)
        )
    invalid = st.one_of(*outside, _bad_floats, st.booleans(), json_junk)
    return valid, invalid


def _bools() -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    return st.booleans(), st.one_of(st.integers(), st.floats(), json_junk)


def _stops() -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    one = st.text(min_size=1, max_size=256)
    valid = one | st.lists(one, max_size=16)
    invalid = st.one_of(
        st.integers(),
        st.floats(),
        st.booleans(),
        st.lists(one, min_size=17, max_size=20),
        st.text(min_size=257, max_size=300),
        st.lists(st.integers(), min_size=1, max_size=3),
        st.dictionaries(st.text(max_size=2), st.text(max_size=2), min_size=1, max_size=2),
    )
    return valid, invalid


SPEC: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "num_ctx": _ints(1, 1 << 24),
    "num_batch": _ints(1, 8192),
    "num_gpu": _ints(-1, INT32_MAX),
    "main_gpu": _ints(0, 255),
    "num_keep": _ints(-1, INT32_MAX),
    "use_mmap": _bools(),
    "use_mlock": _bools(),
    "numa": _bools(),
    "low_vram": _bools(),
    "seed": _ints(-(2**63), 2**64 - 1),
    "num_predict": _ints(-2, INT32_MAX),
    "top_k": _ints(0, INT32_MAX),
    "top_p": _floats(0, 1),
    "min_p": _floats(0, 1),
    "typical_p": _floats(0, 1),
    "repeat_last_n": _ints(-1, 1 << 24),
    "temperature": _floats(0, None),
    "repeat_penalty": _floats(0, None),
    "presence_penalty": _floats(None, None),
    "frequency_penalty": _floats(None, None),
    "mirostat": _ints(0, 2),
    "mirostat_tau": _floats(0, None),
    "mirostat_eta": _floats(0, None),
    "stop": _stops(),
}
#: Options that change how the model is loaded (a valid one may reload it).
PLAN_KEYS = frozenset(
    {
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_keep",
        "use_mmap",
        "use_mlock",
        "numa",
        "low_vram",
    }
)


def is_valid(draw: Any, key: str) -> tuple[Any, bool]:
    """Draw a value for ``key``: (value, whether the option must accept it)."""
    valid, invalid = SPEC[key]
    ok = draw(st.booleans())
    return draw(valid if ok else invalid), ok


def converted(key: str, value: Any) -> Any:
    """What a valid ``value`` of ``key`` becomes: whole numbers are ints, a stop string a list,
    and a seed is taken to 32 bits (llama.cpp's seed), negative meaning random."""
    if key == "stop":
        return [value] if isinstance(value, str) else list(value)
    if isinstance(value, bool) or key not in INT_KEYS:
        return value
    v = int(value)
    return v & 0xFFFFFFFF if key == "seed" and v >= 0 else v


INT_KEYS = frozenset(
    {
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_keep",
        "seed",
        "num_predict",
        "top_k",
        "repeat_last_n",
        "mirostat",
    }
)
