"""An interpreter for Go's text/template, the language of Ollama Modelfile TEMPLATEs.

Covers what Ollama's templates use: ``{{- -}}`` trimming, comments, fields and variables,
``if/else if/else``, ``range`` (with ``else``, ``break``, ``continue``), ``with``, pipelines and
the builtin functions plus Ollama's ``json``/``currentDate``. ``define``/``template``/``block``
are not supported. Maps and lists of maps print as JSON, as Ollama's Stringer types do; a
missing field prints as an empty string rather than Go's ``<no value>`` (our data are dicts, not
Go structs, so a missing key is an omitted optional field).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from offload.models.gofuncs import FUNCS, to_text, truth
from offload.models.gotemplate_parse import TemplateError, _Node, _Operand, _Pipe, build
from offload.models.template_limits import DEFAULT_LIMITS, Budget, TemplateLimits, check_source

__all__ = ["TemplateError", "Template", "parse", "render"]


def _get(value: Any, name: str, line: int) -> Any:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return value.get(name)
    # Go templates reach exported fields only; Python's private and dunder attributes
    # (.Prompt.__class__ ...) are not fields, and a template has no business with them.
    if hasattr(value, name) and not name.startswith("_"):
        return getattr(value, name)
    raise TemplateError(f"can't evaluate field {name} in {type(value).__name__}", line)


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


# ---------------------------------------------------------------- execution
class _Exec:
    # Every node, loop iteration and function call is a step of the budget, every output
    # character counts, and function results are size-checked: a template cannot run long,
    # grow large, or build a huge value, whatever its loops and widths ask for.
    def __init__(self, root: Any, budget: Budget) -> None:
        self.root = root
        self.scopes: list[dict[str, Any]] = [{"$": root}]
        self.out: list[str] = []
        self.budget = budget

    def emit(self, text: str) -> None:
        self.budget.emit(len(text))
        self.out.append(text)

    def lookup(self, name: str, line: int) -> Any:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        raise TemplateError(f"undefined variable {name}", line)

    def run(self, nodes: list[_Node], dot: Any) -> None:
        for node in nodes:
            self.budget.step()
            k = node.kind
            if k == "text":
                self.emit(node.text)
            elif k == "action":
                assert node.pipe is not None
                value = self.pipe(node.pipe, dot)
                if not node.pipe.decl:
                    self.emit(to_text(value))
            elif k in ("if", "with"):
                self.scopes.append({})
                try:
                    assert node.pipe is not None
                    value = self.pipe(node.pipe, dot)
                    if truth(value):
                        self.run(node.body, value if k == "with" else dot)
                    else:
                        self.run(node.else_body, dot)
                finally:
                    self.scopes.pop()
            elif k == "range":
                self.range(node, dot)
            elif k == "break":
                raise _Break
            elif k == "continue":
                raise _Continue

    def range(self, node: _Node, dot: Any) -> None:
        assert node.pipe is not None
        pipe = node.pipe
        self.scopes.append({})
        try:
            value = self.pipe(_Pipe([], "", pipe.cmds, pipe.line), dot)
            items: Iterable[tuple[Any, Any]]
            # Lazily: "range 1000000000" must cost steps as it goes, not a billion pairs up front.
            if value is None:
                items, empty = (), True
            elif isinstance(value, Mapping):
                items, empty = ((k, value[k]) for k in sorted(value)), not value
            elif isinstance(value, int) and not isinstance(value, bool):
                items, empty = ((i, i) for i in range(value)), value <= 0
            elif isinstance(value, (list, tuple, str)):
                items, empty = enumerate(value), not value
            else:
                raise TemplateError(f"range can't iterate over {type(value).__name__}", node.line)
            if empty:
                self.run(node.else_body, dot)
                return
            for key, elem in items:
                self.budget.step()
                scope: dict[str, Any] = {}
                if len(pipe.decl) == 1:
                    scope[pipe.decl[0]] = elem
                elif len(pipe.decl) == 2:
                    scope[pipe.decl[0]], scope[pipe.decl[1]] = key, elem
                self.scopes.append(scope)
                try:
                    self.run(node.body, elem)
                except _Continue:
                    pass
                except _Break:
                    break
                finally:
                    self.scopes.pop()
        finally:
            self.scopes.pop()

    def pipe(self, pipe: _Pipe, dot: Any) -> Any:
        value: Any = _MISSING
        for cmd in pipe.cmds:
            value = self.command(cmd, dot, value, pipe.line)
        if pipe.op == ":=":
            self.scopes[-1][pipe.decl[0]] = value
        elif pipe.op == "=":
            name = pipe.decl[0]
            for scope in reversed(self.scopes):
                if name in scope:
                    scope[name] = value
                    break
            else:
                raise TemplateError(f"undefined variable {name}", pipe.line)
        return value

    def command(self, cmd: list[_Operand], dot: Any, piped: Any, line: int) -> Any:
        first = cmd[0]
        if first.kind == "func":
            name = first.value
            rest = cmd[1:]
            extra = [] if piped is _MISSING else [piped]
            if name in ("and", "or"):
                if not rest and not extra:
                    raise TemplateError(f"missing arguments for {name}", line)
                value: Any = None
                # and/or stop at the first deciding operand, so later ones are never evaluated.
                for i, op in enumerate(rest + [None] * len(extra)):
                    value = self.operand(op, dot) if op is not None else extra[i - len(rest)]
                    if truth(value) == (name == "or"):
                        return value
                return value
            args = [self.operand(op, dot) for op in rest] + extra
            self.budget.step()
            try:
                return self.budget.value(FUNCS[name](*args))
            except TemplateError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of a builtin is a render error
                raise TemplateError(f"error calling {name}: {exc}", line) from exc
        if len(cmd) > 1 or piped is not _MISSING:
            raise TemplateError("can't give argument to non-function", line)
        return self.operand(first, dot)

    def operand(self, op: _Operand, dot: Any) -> Any:
        if op.kind == "lit":
            value = op.value
        elif op.kind == "dot":
            value = dot
        elif op.kind == "var":
            value = self.lookup(op.value, op.line)
        elif op.kind == "pipe":
            value = self.pipe(op.value, dot)
        else:
            raise TemplateError(f"{op.value} is a function and takes no field", op.line)
        for name in op.chain:
            value = _get(value, name, op.line)
        return value


_MISSING = object()


@dataclass
class Template:
    """A parsed template; ``render`` may be called any number of times."""

    source: str
    nodes: list[_Node]

    def render(
        self, data: Mapping[str, Any] | None = None, limits: TemplateLimits = DEFAULT_LIMITS
    ) -> str:
        """Execute the template with ``data`` as dot; raise ``TemplateError`` on failure and
        ``TemplateLimitExceeded`` when it needs more steps, output or time than ``limits`` allow."""
        ex = _Exec(data if data is not None else {}, Budget(limits))
        try:
            ex.run(self.nodes, ex.root)
        except RecursionError as exc:
            raise TemplateError("template nests too deeply") from exc
        return "".join(ex.out)


def parse(source: str, limits: TemplateLimits = DEFAULT_LIMITS) -> Template:
    """Parse Go template ``source``; raise ``TemplateError`` with the line number on bad syntax
    and ``TemplateTooLarge`` for source longer than ``limits`` allow."""
    check_source(source, limits)
    try:
        return Template(source, build(source))
    except RecursionError as exc:
        raise TemplateError("template nests too deeply") from exc


def render(source: str, data: Mapping[str, Any] | None = None) -> str:
    """Parse and render in one step."""
    return parse(source).render(data)
