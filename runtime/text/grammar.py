"""JSON Schema (and plain "json") to GBNF, so ``format`` constrains what the model may write.

llama.cpp samples through a GBNF grammar. Ollama's ``format`` is either ``"json"`` (any JSON
object) or a JSON Schema; this turns both into a grammar. The output is compact JSON (no
whitespace between tokens): small models given room for whitespace tend to spend their whole
token budget on it. Properties come in the schema's order, required ones first.
"""

from __future__ import annotations

import json
import re
from typing import Any

from offload.runtime.errors import BadRequest

__all__ = ["JSON_GBNF", "grammar_for_format", "schema_to_gbnf"]

_PRIMITIVES: dict[str, str] = {
    "value": "object | array | string | number | boolean | null",
    "object": '"{" ( string ":" value ( "," string ":" value )* )? "}"',
    "array": '"[" ( value ( "," value )* )? "]"',
    "string": r'"\"" char* "\""',
    "char": r'[^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} )',
    "number": '"-"? ( [0-9] | [1-9] [0-9]{0,15} ) ( "." [0-9]{1,15} )? ( [eE] [-+]? [0-9]{1,3} )?',
    "integer": '"-"? ( [0-9] | [1-9] [0-9]{0,15} )',
    "boolean": '"true" | "false"',
    "null": '"null"',
}


def _rules_text(rules: dict[str, str]) -> str:
    return "\n".join(f"{k} ::= {v}" for k, v in rules.items()) + "\n"


JSON_GBNF = _rules_text({"root": "object", **_PRIMITIVES})


def _literal(value: Any) -> str:
    """A GBNF string literal matching ``value`` written as compact JSON."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


# A grammar is matched against the vocabulary at every sampled token: its size is work on every
# step of the model's runner, for every request it serves. JSON Schemas larger than this (enum
# values, anyOf/oneOf branches, properties and types counted together) are refused.
MAX_SCHEMA_NODES = 1024
MAX_GRAMMAR_CHARS = 256 << 10


class _Converter:
    def __init__(self, root_schema: dict[str, Any]) -> None:
        self.root_schema = root_schema
        self.rules: dict[str, str] = {}
        self.refs: dict[str, str] = {}
        self.nodes = 0

    def _count(self, n: int = 1) -> None:
        self.nodes += n
        if self.nodes > MAX_SCHEMA_NODES:
            raise BadRequest(
                f"format: the JSON Schema is too large for a grammar (more than {MAX_SCHEMA_NODES} "
                "schemas, enum values and branches); constrain less of it, or check the answer "
                "after it is written"
            )

    def _name(self, hint: str) -> str:
        base = re.sub(r"[^a-zA-Z0-9-]+", "-", hint).strip("-").lower() or "r"
        name, i = base, 1
        while name in self.rules or name in _PRIMITIVES:
            i += 1
            name = f"{base}{i}"
        return name

    def _add(self, hint: str, body: str) -> str:
        name = self._name(hint)
        self.rules[name] = body
        return name

    def _resolve_ref(self, ref: str) -> str:
        if ref in self.refs:
            return self.refs[ref]
        if not ref.startswith("#/"):
            raise BadRequest(f"format: only local $refs are supported, got {ref!r}")
        target: Any = self.root_schema
        for part in ref[2:].split("/"):
            if not isinstance(target, dict) or part not in target:
                raise BadRequest(f"format: $ref {ref!r} points nowhere")
            target = target[part]
        name = self._name("ref-" + ref.rsplit("/", 1)[-1])
        self.refs[ref] = name
        self.rules[name] = ""  # reserve: recursive schemas refer to themselves
        self.rules[name] = self.visit(target, name)
        return name

    def visit(self, schema: Any, hint: str) -> str:
        """A GBNF expression for ``schema``."""
        self._count()
        if schema is True or schema == {} or schema is None:
            return "value"
        if not isinstance(schema, dict):
            raise BadRequest("format: a JSON Schema must be an object")
        if "$ref" in schema:
            return self._resolve_ref(schema["$ref"])
        if "const" in schema:
            return _literal(schema["const"])
        if "enum" in schema:
            if not schema["enum"]:
                raise BadRequest("format: enum must not be empty")
            self._count(len(schema["enum"]))
            return "( " + " | ".join(_literal(v) for v in schema["enum"]) + " )"
        for key in ("anyOf", "oneOf"):
            if key in schema:
                alts = [
                    self._add(f"{hint}-{i}", self.visit(s, f"{hint}-{i}"))
                    for i, s in enumerate(schema[key])
                ]
                return "( " + " | ".join(alts) + " )"
        if "allOf" in schema and len(schema["allOf"]) == 1:
            return self.visit(schema["allOf"][0], hint)
        typ = schema.get("type")
        if isinstance(typ, list):
            alts = [self.visit({**schema, "type": t}, f"{hint}-{t}") for t in typ]
            return "( " + " | ".join(alts) + " )"
        if typ == "object" or (typ is None and "properties" in schema):
            return self._object(schema, hint)
        if typ == "array":
            return self._array(schema, hint)
        if typ == "string":
            return self._string(schema)
        if typ in ("number", "integer", "boolean", "null"):
            return typ
        if typ is None:
            return "value"
        raise BadRequest(f"format: unsupported JSON Schema type {typ!r}")

    def _object(self, schema: dict[str, Any], hint: str) -> str:
        props: dict[str, Any] = schema.get("properties") or {}
        if not props:
            return "object"
        required = [k for k in schema.get("required", []) if k in props]
        optional = [k for k in props if k not in required]
        pairs = {
            k: f'{_literal(k)} ":" {self._add(f"{hint}-{k}", self.visit(props[k], f"{hint}-{k}"))}'
            for k in props
        }
        if required:
            body = ' "," '.join(pairs[k] for k in required)
            tail = " ".join(f'( "," {pairs[k]} )?' for k in optional)
            return f'"{{" {body} {tail} "}}"'
        # All optional: each may appear, in order, commas only between those present.
        alts = []
        for i, k in enumerate(optional):
            rest = " ".join(f'( "," {pairs[j]} )?' for j in optional[i + 1 :])
            alts.append(f"{pairs[k]} {rest}")
        return '"{" ( ' + " | ".join(f"( {a} )" for a in alts) + ' )? "}"'

    def _array(self, schema: dict[str, Any], hint: str) -> str:
        item = self._add(f"{hint}-item", self.visit(schema.get("items", {}), f"{hint}-item"))
        lo, hi = _bounds(schema, "minItems", "maxItems")
        if hi == 0:
            return '"[" "]"'
        if lo == 0:
            more = f'( "," {item} )*' if hi is None else f'( "," {item} ){{0,{hi - 1}}}'
            return f'"[" ( {item} {more} )? "]"'
        more = (
            f'( "," {item} ){{{lo - 1},}}' if hi is None else f'( "," {item} ){{{lo - 1},{hi - 1}}}'
        )
        return f'"[" {item} {more} "]"'

    def _string(self, schema: dict[str, Any]) -> str:
        lo, hi = _bounds(schema, "minLength", "maxLength")
        if lo == 0 and hi is None:
            return "string"
        rep = f"{{{lo},}}" if hi is None else f"{{{lo},{hi}}}"
        return rf'"\"" char{rep} "\""'


def _bounds(schema: dict[str, Any], lo_key: str, hi_key: str) -> tuple[int, int | None]:
    """A (min, max) pair of counts from a schema; a max below the min has no sentence at all."""
    lo, hi = max(0, int(schema.get(lo_key, 0))), schema.get(hi_key)
    if hi is not None and int(hi) < lo:
        raise BadRequest(f"format: {hi_key} {hi} is below {lo_key} {lo}")
    return lo, None if hi is None else int(hi)


def schema_to_gbnf(schema: dict[str, Any]) -> str:
    """A GBNF grammar whose sentences are compact JSON documents valid under ``schema``."""
    conv = _Converter(schema)
    try:
        root = conv.visit(schema, "root")
    except (TypeError, ValueError, AttributeError) as e:
        # A keyword with a value of the wrong kind ("minItems": "x", "anyOf": 5): the caller's mistake.
        raise BadRequest(f"format: not a valid JSON Schema ({e})") from None
    text = _rules_text({"root": root, **conv.rules, **_PRIMITIVES})
    if len(text) > MAX_GRAMMAR_CHARS:
        raise BadRequest(
            f"format: the JSON Schema makes a grammar of {len(text)} characters, more than the "
            f"{MAX_GRAMMAR_CHARS} allowed; constrain less of it"
        )
    return text


def grammar_for_format(fmt: Any) -> str | None:
    """The grammar for Ollama's ``format`` (``""``/None: none; ``"json"``; or a JSON Schema)."""
    if fmt is None or fmt == "" or fmt == {}:
        return None
    if isinstance(fmt, str):
        if fmt.strip() == "json":
            return JSON_GBNF
        try:
            fmt = json.loads(fmt)
        except ValueError:
            raise BadRequest(f'invalid format: {fmt!r}; expected "json" or a JSON Schema') from None
    if not isinstance(fmt, dict):
        raise BadRequest('invalid format: expected "json" or a JSON Schema object')
    return schema_to_gbnf(fmt)
