"""Ollama's Modelfile: parse every instruction, and render text that parses back to an equal file.

Instructions (case-insensitive): FROM, PARAMETER, TEMPLATE, SYSTEM, ADAPTER, LICENSE (repeatable),
MESSAGE (system/user/assistant), and ``#`` comments. Values are a bare rest-of-line, a ``"quoted"``
string (``\\"`` escapes a quote), or a ``\"\"\"multi-line\"\"\"`` block.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from offload.models.errors import ModelError
from offload.models.parameters import MAX_STOP_COUNT, InvalidParameter, check_parameter

__all__ = [
    "Message",
    "Modelfile",
    "ModelfileError",
    "ModelfileTooLarge",
    "ROLES",
    "PARAMETER_TYPES",
    "coerce_parameter",
    "parse_modelfile",
]


class ModelfileError(ModelError):
    """A Modelfile that cannot be read; ``line`` is 1-based, or None for file-wide problems."""

    http_status = 400

    def __init__(self, problem: str, line: int | None = None) -> None:
        # One line whatever the Modelfile held: line breaks inside quoted values are escaped.
        problem = problem.replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(f"Modelfile line {line}: {problem}" if line else f"Modelfile: {problem}")
        self.problem = problem
        self.line = line


class ModelfileTooLarge(ModelfileError):
    """A value too big for the layer it would be stored in."""

    http_status = 413


def _shown(text: str, limit: int = 80) -> str:
    """A value quoted for a one-line message: escaped, and cut when long."""
    return json.dumps(text[:limit] + ("..." if len(text) > limit else ""), ensure_ascii=False)


def _int(text: str) -> int:
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # NaN and infinity are no setting, and not JSON either
        raise ValueError(text)
    return value


def _bool(text: str) -> bool:
    # The spellings Go's strconv.ParseBool accepts, since Ollama parses with it.
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise ValueError(text)


_TYPE_WORDS = {
    _int: "an integer",
    _float: "a finite number",
    _bool: "true or false",
    str: "a string",
}

#: Ollama's option names and how each value is read; ``stop`` may repeat and collects a list.
PARAMETER_TYPES: dict[str, Callable[[str], Any]] = {
    "num_ctx": _int,
    "num_batch": _int,
    "num_gpu": _int,
    "main_gpu": _int,
    "num_thread": _int,
    "num_keep": _int,
    "num_predict": _int,
    "seed": _int,
    "top_k": _int,
    "repeat_last_n": _int,
    "mirostat": _int,
    "temperature": _float,
    "top_p": _float,
    "min_p": _float,
    "typical_p": _float,
    "repeat_penalty": _float,
    "presence_penalty": _float,
    "frequency_penalty": _float,
    "mirostat_eta": _float,
    "mirostat_tau": _float,
    "tfs_z": _float,
    "use_mmap": _bool,
    "use_mlock": _bool,
    "numa": _bool,
    "low_vram": _bool,
    "vocab_only": _bool,
    "penalize_newline": _bool,
    "stop": str,
}

ROLES = ("system", "user", "assistant")
_INSTRUCTIONS = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE")


def coerce_parameter(name: str, value: Any, line: int | None = None) -> Any:
    """Check a parameter name and convert its value to Ollama's type for it."""
    key = name.lower()
    if key not in PARAMETER_TYPES:
        raise ModelfileError(
            f"unknown parameter {_shown(name)}, expected one of {', '.join(sorted(PARAMETER_TYPES))}",
            line,
        )
    reader = PARAMETER_TYPES[key]
    if not isinstance(value, str):
        value = str(value).lower() if isinstance(value, bool) else str(value)
    try:
        typed = reader(value.strip())
    except ValueError:
        raise ModelfileError(
            f"PARAMETER {key} expects {_TYPE_WORDS[reader]}, got {_shown(value)}", line
        ) from None
    # In range too: a model must not carry a value every request would be refused (or crash) on.
    try:
        check_parameter(key, typed, f"PARAMETER {key}")
    except InvalidParameter as e:
        raise ModelfileError(str(e), line) from None
    return typed


@dataclass(frozen=True)
class Message:
    """A MESSAGE line: a turn of conversation the model starts with."""

    role: str
    content: str


@dataclass
class Modelfile:
    """Everything a Modelfile says, in Ollama's terms; ``from_`` is a model name or a file path."""

    from_: str
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    adapters: list[str] = field(default_factory=list)
    licenses: list[str] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    #: Where each instruction was: "FROM", "TEMPLATE", "ADAPTER0"... -> 1-based line (not compared).
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def render(self, *, strict: bool = True) -> str:
        """Text that ``parse_modelfile`` reads back to an equal Modelfile.

        With ``strict=False`` (showing a stored model) nothing raises: a value no Modelfile can
        hold (both ``\"\"\"`` and a line break, or not text at all) is written as near as it can be.
        """
        q = functools.partial(_quote, strict=strict)
        out = [f"FROM {q(self.from_)}"]
        out += [f"ADAPTER {q(a)}" for a in self.adapters]
        if self.template is not None:
            out.append(f"TEMPLATE {q(self.template, block=True)}")
        if self.system is not None:
            out.append(f"SYSTEM {q(self.system, block=True)}")
        for key, value in self.parameters.items():
            for v in value if isinstance(value, list) else [value]:
                text = ("true" if v else "false") if isinstance(v, bool) else str(v)
                out.append(f"PARAMETER {key} {q(text)}")
        out += [f"LICENSE {q(lic, block=True)}" for lic in self.licenses]
        out += [f"MESSAGE {m.role} {q(m.content)}" for m in self.messages]
        return "\n".join(out) + "\n"


def _quote(value: str, block: bool = False, strict: bool = True) -> str:
    """The shortest form that reads back exactly as ``value``."""
    if not isinstance(value, str):
        if strict:
            raise ModelfileError(f"a value must be text, not {type(value).__name__}")
        value = json.dumps(value, ensure_ascii=False, default=str)
    if '"""' in value or value.endswith('"'):
        if "\n" in value:
            if strict:
                raise ModelfileError('a value holding both \'"""\' and a newline cannot be written')
            value = value.replace("\r", "\\r").replace("\n", "\\n")  # shown, not read back
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if "\n" in value or (block and value != value.strip()):
        return f'"""{value}"""'
    if value == "" or value != value.strip() or value.startswith(('"', "#")) or "\\" in value:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def _read_value(text: str, pos: int, line: int, lines_of: Callable[[int], int]) -> tuple[str, int]:
    """Read a value starting at ``pos``; return it and the index just past it."""
    eol = text.find("\n", pos)
    eol = len(text) if eol < 0 else eol
    if text.startswith('"""', pos):
        end = text.find('"""', pos + 3)
        if end < 0:
            raise ModelfileError('unterminated """ block, expected a closing """', line)
        after = text.find("\n", end + 3)
        after = len(text) if after < 0 else after
        if text[end + 3 : after].strip():
            raise ModelfileError(
                f'unexpected text after closing """: {text[end + 3 : after].strip()!r}',
                lines_of(end),
            )
        return text[pos + 3 : end], after
    if text.startswith('"', pos):
        out: list[str] = []
        i = pos + 1
        while i < eol:
            c = text[i]
            if c == "\\" and i + 1 < eol and text[i + 1] in '"\\':
                out.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                if text[i + 1 : eol].strip():
                    raise ModelfileError(
                        f"unexpected text after closing quote: {text[i + 1 : eol].strip()!r}", line
                    )
                return "".join(out), eol
            out.append(c)
            i += 1
        raise ModelfileError('unterminated quoted value, expected a closing "', line)
    return text[pos:eol].strip(), eol


def parse_modelfile(text: str) -> Modelfile:
    """Parse Modelfile text; raise ``ModelfileError`` naming the line and what was expected."""
    # CRLF line ends, however many CRs: a fixpoint, so a parsed value never holds CR LF itself.
    text = re.sub(r"\r+\n", "\n", text)
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]

    def line_of(index: int) -> int:
        lo, hi = 0, len(starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if starts[mid] <= index:
                lo = mid
            else:
                hi = mid - 1
        return lo + 1

    from_: str | None = None
    from_line = 0
    mf = Modelfile(from_="")
    pos = 0
    while pos < len(text):
        eol = text.find("\n", pos)
        eol = len(text) if eol < 0 else eol
        stripped = text[pos:eol].strip()
        line = line_of(pos)
        if not stripped or stripped.startswith("#"):
            pos = eol + 1
            continue
        lead = pos + (len(text[pos:eol]) - len(text[pos:eol].lstrip()))
        word = stripped.split(None, 1)[0]
        instr = word.upper()
        if instr not in _INSTRUCTIONS:
            raise ModelfileError(
                f"unknown instruction {_shown(word)}, expected one of {', '.join(_INSTRUCTIONS)}",
                line,
            )
        vpos = lead + len(word)
        while vpos < eol and text[vpos] in " \t":
            vpos += 1
        if instr == "PARAMETER" or instr == "MESSAGE":
            rest = text[vpos:eol]
            parts = rest.split(None, 1)
            if not parts:
                what = "a name and a value" if instr == "PARAMETER" else "a role and a message"
                raise ModelfileError(f"{instr} needs {what}", line)
            key = parts[0]
            vpos += len(key)
            while vpos < eol and text[vpos] in " \t":
                vpos += 1
        value, pos = _read_value(text, vpos, line, line_of)
        pos += 1
        if instr != "MESSAGE" and instr not in ("TEMPLATE", "SYSTEM", "LICENSE") and not value:
            raise ModelfileError(f"{instr} needs a value", line)
        if instr == "FROM":
            if from_ is not None:
                raise ModelfileError(f"FROM given twice (first at line {from_line})", line)
            from_, from_line = value, line
            mf.lines["FROM"] = line
        elif instr == "PARAMETER":
            name = key.lower()
            coerced = coerce_parameter(name, value, line)
            if coerced == "":
                raise ModelfileError(f"PARAMETER {name} needs a value", line)
            if name == "stop":
                mf.parameters.setdefault("stop", []).append(coerced)
                if len(mf.parameters["stop"]) > MAX_STOP_COUNT:
                    raise ModelfileError(
                        f"PARAMETER stop may be given at most {MAX_STOP_COUNT} times", line
                    )
            else:
                mf.parameters[name] = coerced
        elif instr == "TEMPLATE":
            mf.template = value
            mf.lines["TEMPLATE"] = line
        elif instr == "SYSTEM":
            mf.system = value
        elif instr == "ADAPTER":
            mf.lines[f"ADAPTER{len(mf.adapters)}"] = line
            mf.adapters.append(value)
        elif instr == "LICENSE":
            mf.licenses.append(value)
        elif instr == "MESSAGE":
            role = key.lower()
            if role not in ROLES:
                raise ModelfileError(
                    f"MESSAGE role {_shown(key)} is not one of {', '.join(ROLES)}", line
                )
            mf.messages.append(Message(role, value))
    if from_ is None:
        raise ModelfileError("no FROM instruction, expected FROM <model name or GGUF file>")
    mf.from_ = from_
    return mf
