"""Parsing Go's text/template: splitting text from actions, lexing them, building the tree.

The nodes are private to ``offload.models.gotemplate``, which executes them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from offload.models.errors import ModelError
from offload.models.gofuncs import FUNCS

__all__ = ["TemplateError", "build"]


class TemplateError(ModelError):
    """A template that does not parse or fails while rendering; ``line`` is 1-based."""

    http_status = 400

    def __init__(self, problem: str, line: int | None = None) -> None:
        where = f"template line {line}: " if line else "template: "
        super().__init__(where + problem)
        self.problem = problem
        self.line = line


# ---------------------------------------------------------------- lexing the action text
_TOKEN = re.compile(
    r"""(?P<ws>\s+)
    |(?P<str>"(?:[^"\\\n]|\\.)*")
    |(?P<raw>`[^`]*`)
    |(?P<char>'(?:[^'\\]|\\.)+')
    |(?P<num>[-+]?(?:0[xX][0-9a-fA-F_]+|(?:\d[\d_]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))
    |(?P<decl>:=)
    |(?P<assign>=)
    |(?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+)
    |(?P<dot>\.)
    |(?P<var>\$[A-Za-z0-9_]*)
    |(?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    |(?P<lparen>\()
    |(?P<rparen>\))
    |(?P<pipe>\|)
    |(?P<comma>,)
    """,
    re.VERBOSE,
)


_CHAIN = re.compile(r"(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


@dataclass
class _Tok:
    kind: str
    text: str


def _tokenize(src: str, line: int) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(src):
        # A field chain right after ")" or a variable belongs to that operand, so try it first.
        m = _CHAIN.match(src, pos)
        if (
            m
            and toks
            and toks[-1].kind in ("rparen", "var")
            and pos > 0
            and not src[pos - 1].isspace()
        ):
            toks.append(_Tok("chain", m.group()))
            pos = m.end()
            continue
        m = _TOKEN.match(src, pos)
        if not m:
            raise TemplateError(f"unexpected {src[pos]!r} in action", line)
        kind = m.lastgroup or ""
        if kind != "ws":
            toks.append(_Tok(kind, m.group()))
        pos = m.end()
    return toks


# ---------------------------------------------------------------- nodes
@dataclass
class _Operand:
    kind: str  # lit, dot, field, var, func, pipe
    value: Any
    chain: tuple[str, ...] = ()
    line: int = 0


@dataclass
class _Pipe:
    decl: list[str]
    op: str  # ":=", "=" or ""
    cmds: list[list[_Operand]]
    line: int


@dataclass
class _Node:
    kind: str  # text, action, if, range, with, break, continue
    line: int
    text: str = ""
    pipe: _Pipe | None = None
    body: list[_Node] = field(default_factory=list)
    else_body: list[_Node] = field(default_factory=list)


class _PipeParser:
    def __init__(self, toks: list[_Tok], line: int) -> None:
        self.toks, self.i, self.line = toks, 0, line

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def next(self) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise TemplateError("unexpected end of action", self.line)
        self.i += 1
        return tok

    def pipeline(self, allow_decl: bool = True, range_decl: bool = False) -> _Pipe:
        decl: list[str] = []
        op = ""
        if allow_decl:
            # Look ahead for "$x :=", "$x =" or "$i, $x :=".
            j = self.i
            names: list[str] = []
            while j < len(self.toks) and self.toks[j].kind == "var":
                names.append(self.toks[j].text)
                j += 1
                if (
                    j < len(self.toks)
                    and self.toks[j].kind == "comma"
                    and range_decl
                    and len(names) < 2
                ):
                    j += 1
                    continue
                break
            if names and j < len(self.toks) and self.toks[j].kind in ("decl", "assign"):
                decl, op, self.i = names, self.toks[j].text, j + 1
        cmds = [self.command()]
        while (tok := self.peek()) is not None and tok.kind == "pipe":
            self.i += 1
            cmds.append(self.command())
        return _Pipe(decl, op, cmds, self.line)

    def command(self) -> list[_Operand]:
        ops: list[_Operand] = []
        while (tok := self.peek()) is not None and tok.kind not in ("pipe", "rparen"):
            ops.append(self.operand())
        if not ops:
            raise TemplateError("missing value in pipeline", self.line)
        return ops

    def operand(self) -> _Operand:
        tok = self.next()
        k, t = tok.kind, tok.text
        if k == "str":
            op = _Operand("lit", _unquote(t, self.line))
        elif k == "raw":
            op = _Operand("lit", t[1:-1])
        elif k == "char":
            op = _Operand("lit", _char(t, self.line))
        elif k == "num":
            op = _Operand("lit", _number(t, self.line))
        elif k == "dot":
            op = _Operand("dot", None)
        elif k == "field":
            op = _Operand("dot", None, tuple(t[1:].split(".")))
        elif k == "var":
            op = _Operand("var", t)
        elif k == "ident":
            if t in ("true", "false"):
                op = _Operand("lit", t == "true")
            elif t == "nil":
                op = _Operand("lit", None)
            elif t in FUNCS or t in ("and", "or"):
                op = _Operand("func", t)
            else:
                raise TemplateError(f'function "{t}" not defined', self.line)
        elif k == "lparen":
            inner = self.pipeline(allow_decl=False)
            if (close := self.peek()) is None or close.kind != "rparen":
                raise TemplateError("unclosed '('", self.line)
            self.i += 1
            op = _Operand("pipe", inner)
        else:
            raise TemplateError(f"unexpected {t!r} in operand", self.line)
        nxt = self.peek()
        if nxt is not None and nxt.kind == "chain":
            self.i += 1
            op.chain = op.chain + tuple(nxt.text[1:].split("."))
        op.line = self.line
        return op


_SIMPLE_ESCAPES = {
    "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\",
}  # fmt: skip
_HEX_LEN = {"x": 2, "u": 4, "U": 8}


def _unescape(body: str, quote: str) -> tuple[list[str | int], bool]:
    """Go's escapes in the body of a ``quote``-delimited literal, as ``strconv.Unquote`` reads
    them: a list of characters (str) and raw bytes (int, from hex and octal byte escapes), and
    whether it is well formed. Only the literal's own quote may be escaped."""
    out: list[str | int] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c == quote or c == "\n":
            return out, False
        if c != "\\":
            out.append(c)
            i += 1
            continue
        if i + 1 >= len(body):
            return out, False
        e = body[i + 1]
        i += 2
        if e in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[e])
        elif e == quote:
            out.append(quote)
        elif e in _HEX_LEN:
            digits = body[i : i + _HEX_LEN[e]]
            if len(digits) != _HEX_LEN[e] or not all(d in "0123456789abcdefABCDEF" for d in digits):
                return out, False
            i += _HEX_LEN[e]
            value = int(digits, 16)
            if e == "x":
                out.append(value)
            elif value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
                return out, False  # not a Unicode code point: Go refuses it too
            else:
                out.append(chr(value))
        elif e in "01234567":
            digits = body[i - 1 : i + 2]
            if len(digits) != 3 or not all(d in "01234567" for d in digits):
                return out, False
            i += 2
            value = int(digits, 8)
            if value > 255:
                return out, False
            out.append(value)
        else:
            return out, False
    return out, True


def _unquote(text: str, line: int) -> str:
    """The value of a Go interpreted string literal ``"..."``."""
    parts, ok = _unescape(text[1:-1], '"')
    if not ok:
        raise TemplateError(f"bad string literal {_shown(text)}", line)
    data = bytearray()
    for part in parts:
        data += bytes([part]) if isinstance(part, int) else part.encode("utf-8")
    # Go strings are bytes; "\xff" alone is no UTF-8 and prints as the replacement character.
    return data.decode("utf-8", errors="replace")


def _char(text: str, line: int) -> int:
    """The value of a Go character literal ``'x'``: one character, or one escape, as a number."""
    parts, ok = _unescape(text[1:-1], "'")
    if not ok or len(parts) != 1:
        raise TemplateError(
            f"malformed character constant {_shown(text)}: expected exactly one character", line
        )
    part = parts[0]
    return part if isinstance(part, int) else ord(part)


def _shown(text: str, limit: int = 40) -> str:
    """A literal for a one-line message: cut when long, line breaks escaped."""
    cut = text[:limit] + ("..." if len(text) > limit else "")
    return cut.replace("\r", "\\r").replace("\n", "\\n")


_OCTAL = re.compile(r"[-+]?0[0-7_]+")
_INT64_MIN, _UINT64_MAX = -(1 << 63), (1 << 64) - 1


def _number(text: str, line: int) -> int | float:
    t = text.replace("_", "")
    try:
        if t.lower().lstrip("+-").startswith("0x"):
            value: int | float = int(t, 16)
        elif _OCTAL.fullmatch(text) and len(t.lstrip("+-")) > 1:
            value = int(t, 8)  # Go reads 017 as octal
        elif any(c in t for c in ".eE"):
            value = float(t)
        else:
            value = int(t)
    except ValueError as exc:
        raise TemplateError(f"bad number {_shown(text)}", line) from exc
    if isinstance(value, int) and not _INT64_MIN <= value <= _UINT64_MAX:
        # Go keeps a constant too big for 64 bits as a float, if a float can hold it.
        value = float(value) if abs(value) < 1 << 1000 else math.inf
    if not math.isfinite(value):
        raise TemplateError(f"bad number {_shown(text)}: out of range", line)
    return value


# ---------------------------------------------------------------- splitting text and actions
def _split(source: str) -> list[tuple[str, str, int]]:
    """Yield ('text'|'action', content, line) with trim markers applied.

    One pass with ``str.find``: an action ends at the first ``}}`` after its ``{{``. (A regex
    that scans on from every unclosed ``{{`` takes quadratic time on hostile source.)
    """
    out: list[tuple[str, str, int]] = []
    pos = 0
    line = 1  # line of ``pos``
    trim_next = False
    while (start := source.find("{{", pos)) >= 0:
        end = source.find("}}", start + 2)
        start_line = line + source.count("\n", pos, start)
        if end < 0:
            raise TemplateError("unclosed action", start_line)
        inner = source[start + 2 : end]
        trim_left = len(inner) >= 2 and inner[0] == "-" and inner[1].isspace()
        body = inner[2:] if trim_left else inner
        trim_right = len(body) >= 2 and body[-1] == "-" and body[-2].isspace()
        body = body[:-2] if trim_right else body
        text = source[pos:start]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if trim_left:
            text = text.rstrip(" \t\r\n")
        if text:
            out.append(("text", text, line))
        out.append(("action", body, start_line))
        trim_next = trim_right
        line = start_line + inner.count("\n")
        pos = end + 2
    rest = source[pos:]
    if trim_next:
        rest = rest.lstrip(" \t\r\n")
    if rest:
        out.append(("text", rest, line))
    return out


def _build(source: str) -> list[_Node]:
    items = _split(source)
    root: list[_Node] = []
    # Stack of (node, which list we are filling, opener name); "else if" chains share one "end".
    stack: list[tuple[_Node, list[_Node], int]] = []
    current = root

    def close_chain() -> None:
        nonlocal current
        # Pop this block and any "else if"/"else with" links that end with it.
        while True:
            _node, _lst, chained = stack.pop()
            if not chained:
                break
        current = stack[-1][1] if stack else root

    for kind, content, line in items:
        if kind == "text":
            current.append(_Node("text", line, text=content))
            continue
        body = content.strip()
        if body.startswith("/*"):
            if not body.endswith("*/"):
                raise TemplateError("unclosed comment", line)
            continue
        toks = _tokenize(body, line)
        if not toks:
            raise TemplateError("missing value for command", line)
        head = toks[0].text if toks[0].kind == "ident" else ""
        p = _PipeParser(toks[1:], line)
        if head in ("if", "with", "range"):
            pipe = p.pipeline(range_decl=head == "range")
            node = _Node(head, line, pipe=pipe)
            current.append(node)
            stack.append((node, node.body, 0))
            current = node.body
        elif head == "else":
            if not stack or stack[-1][0].kind not in ("if", "with", "range"):
                raise TemplateError("unexpected {{else}}", line)
            node, _lst, chained = stack.pop()
            if node.else_body or _lst is node.else_body:
                raise TemplateError("expected {{end}} after {{else}}", line)
            if len(toks) > 1:
                sub_kind = toks[1].text
                if sub_kind not in ("if", "with") or toks[1].kind != "ident":
                    raise TemplateError(f"unexpected {sub_kind!r} after else", line)
                sub_parser = _PipeParser(toks[2:], line)
                sub = _Node(sub_kind, line, pipe=sub_parser.pipeline())
                if (extra := sub_parser.peek()) is not None:
                    raise TemplateError(f"unexpected {extra.text!r} in action", line)
                node.else_body.append(sub)
                stack.append((node, node.else_body, chained))
                stack.append((sub, sub.body, 1))
                current = sub.body
            else:
                stack.append((node, node.else_body, chained))
                current = node.else_body
            continue
        elif head == "end":
            if len(toks) > 1:
                raise TemplateError("unexpected words after {{end}}", line)
            if not stack:
                raise TemplateError("unexpected {{end}}", line)
            close_chain()
            continue
        elif head in ("break", "continue"):
            if not any(n.kind == "range" for n, _l, _c in stack):
                raise TemplateError(f"{{{{{head}}}}} outside {{{{range}}}}", line)
            current.append(_Node(head, line))
            continue
        elif head in ("define", "template", "block"):
            raise TemplateError(f"{{{{{head}}}}} is not supported", line)
        else:
            p = _PipeParser(toks, line)
            current.append(_Node("action", line, pipe=p.pipeline()))
        if p.peek() is not None:
            raise TemplateError(f"unexpected {p.peek().text!r} in action", line)  # type: ignore[union-attr]
    if stack:
        raise TemplateError(
            f"unexpected EOF: {{{{{stack[-1][0].kind}}}}} at line {stack[-1][0].line} has no {{{{end}}}}",
            stack[-1][0].line,
        )
    return root


def build(source: str) -> list[_Node]:
    """The node tree of ``source``; raise ``TemplateError`` with a line number on bad syntax."""
    return _build(source)
