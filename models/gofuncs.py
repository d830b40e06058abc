"""Values and builtin functions of Go templates: truth, printing, and the function map."""

from __future__ import annotations

import datetime as _dt
import html as _html
import json as _json
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["FUNCS", "go_json", "to_text", "truth"]


def truth(value: Any) -> bool:
    """Go's notion of truth: false, 0, nil and empty things are false."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value != 0
    if isinstance(value, (str, Sequence, Mapping)):
        return len(value) > 0
    return True


def go_json(value: Any) -> str:
    """``json.Marshal`` as Go does it: compact, HTML characters escaped."""
    text = _json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_jsonable)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dict__"):
        return vars(value)
    return str(value)


def to_text(value: Any) -> str:
    """Format a value the way the template prints it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(int(value)) if value.is_integer() and abs(value) < 1e21 else repr(value)
    if isinstance(value, Mapping):
        return go_json(value)
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, (Mapping, list, tuple)) for v in value):
            return go_json(value)
        return "[" + " ".join(to_text(v) for v in value) + "]"
    return str(value)


def _eq(a: Any, *bs: Any) -> bool:
    if not bs:
        raise TypeError("missing argument for comparison")
    return any(a == b for b in bs)


def _index(item: Any, *keys: Any) -> Any:
    for key in keys:
        if item is None:
            return None
        if isinstance(item, Mapping):
            item = item.get(key)
        else:
            item = item[int(key)]
    return item


def _slice(item: Any, *idx: Any) -> Any:
    if len(idx) > 3:
        raise TypeError("too many slice indexes")
    ints = [int(i) for i in idx]
    if len(ints) == 3:
        # Go's 3-index slice only caps capacity; the visible elements are item[i:j].
        ints = ints[:2]
    return item[ints[0] : ints[1] if len(ints) > 1 else None] if ints else item


def _go_sprint(*args: Any) -> str:
    out = ""
    for i, a in enumerate(args):
        # fmt.Sprint adds a space between operands when neither is a string.
        if i and not isinstance(a, str) and not isinstance(args[i - 1], str):
            out += " "
        out += to_text(a)
    return out


_VERB = re.compile(r"%([-+# 0]*)(\d+|\*)?(?:\.(\d+))?([vsdqtfgexXcTb%])")
# Go's fmt refuses widths and precisions above a million (BADWIDTH/BADPREC); so do we, which
# also keeps one printf from asking for gigabytes.
_MAX_WIDTH = 1_000_000


def _printf(fmt: str, *args: Any) -> str:
    it = iter(args)

    def sub(m: re.Match[str]) -> str:
        flags, width, prec, verb = m.group(1), m.group(2) or "", m.group(3), m.group(4)
        if verb == "%":
            return "%"
        try:
            a = next(it)
        except StopIteration:
            return f"%!{verb}(MISSING)"
        if width.isdigit() and int(width) > _MAX_WIDTH:
            return "%!(BADWIDTH)"
        if prec is not None and int(prec) > _MAX_WIDTH:
            return "%!(BADPREC)"
        spec = flags.replace("#", "") + width + (f".{prec}" if prec is not None else "")
        if verb in "vs":
            return format(to_text(a), spec.replace("0", "") if spec.startswith("0") else spec)
        if verb == "q":
            return go_json(to_text(a))
        if verb == "t":
            return to_text(bool(a))
        if verb in "dxXbc":
            return format(int(a), spec + {"d": "d", "x": "x", "X": "X", "b": "b", "c": "c"}[verb])
        if verb in "fge":
            return format(float(a), spec + verb)
        if verb == "T":
            return type(a).__name__
        return to_text(a)

    return _VERB.sub(sub, fmt)


def _lt(a: Any, b: Any) -> bool:
    return a < b


FUNCS: dict[str, Callable[..., Any]] = {
    "not": lambda a: not truth(a),
    "eq": _eq,
    "ne": lambda a, b: a != b,
    "lt": _lt,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "len": lambda a: len(a),
    "index": _index,
    "slice": _slice,
    "print": _go_sprint,
    "println": lambda *a: " ".join(to_text(x) for x in a) + "\n",
    "printf": _printf,
    "html": lambda *a: _html.escape(_go_sprint(*a)).replace("&#x27;", "&#39;"),
    "js": lambda *a: _json.dumps(_go_sprint(*a))[1:-1].replace("'", "\\'"),
    "urlquery": lambda *a: urllib.parse.quote_plus(_go_sprint(*a)),
    "json": go_json,
    "toJson": go_json,
    "currentDate": lambda: _dt.date.today().isoformat(),
    "yesterdayDate": lambda: (_dt.date.today() - _dt.timedelta(days=1)).isoformat(),
}
