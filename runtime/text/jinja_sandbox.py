"""GGUF chat templates (Jinja) in a sandbox that also bounds their work, output and time.

Jinja's ``ImmutableSandboxedEnvironment`` keeps a template away from Python's internals, but
not from asking for a billion loop iterations or a gigabyte string. Here every rendering runs
against a ``Budget`` (``offload.models.template_limits``), enforced from inside the rendering
thread, since nothing outside can stop it:

- steps: a trace function counts each line of compiled template code run and each Python
  call made while rendering, so loops of any shape, recursive macros and ``loop()`` all pay;
  the same counter checks the deadline;
- size: operators that build values (``*``, ``**``, ``%``, ``+``, ``~``) and the calls and
  filters that take widths or repeat counts are checked before they run, and every value
  they return after;
- output: every piece written, to the result or to a macro's or block's buffer, is counted.
"""

from __future__ import annotations

import functools
import re
import string
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jinja2
import jinja2.nodes
import jinja2.sandbox
from jinja2.compiler import CodeGenerator, Frame

from offload.models import template_limits
from offload.models.template_limits import (
    DEFAULT_LIMITS,
    Budget,
    TemplateLimitExceeded,
    TemplateLimits,
    check_source,
)

__all__ = ["compile_template", "render", "TemplateLimitExceeded"]

_TEMPLATE_FILE = "<template>"
# The checks' own calls are not the template's work: the step counter skips them.
_OWN_FILES = frozenset({__file__, template_limits.__file__})
# Integers beyond this many bits take visible time to multiply or print.
_MAX_INT_BITS = 1 << 16
# tojson(indent=n) multiplies the size of nested data by about n per level.
_MAX_JSON_INDENT = 16
_state = threading.local()


class _Abort(BaseException):
    """Carries a limit error out through code that catches ``Exception`` (Jinja's and Python's)."""

    def __init__(self, error: TemplateLimitExceeded) -> None:
        super().__init__(str(error))
        self.error = error


def _budget() -> Budget | None:
    return getattr(_state, "budget", None)


def _limits() -> TemplateLimits:
    b = _budget()
    return b.limits if b is not None else DEFAULT_LIMITS


def _guarded(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except TemplateLimitExceeded as e:
        raise _Abort(e) from None


def _step() -> None:
    b = _budget()
    if b is not None:
        _guarded(b.step)


def _checked(value: Any) -> Any:
    """``value``, when within the size limits (checked with or without a rendering under way)."""
    b = _budget() or Budget(DEFAULT_LIMITS)
    return _guarded(b.value, value)


def _refuse(problem: str) -> None:
    raise _Abort(TemplateLimitExceeded(problem))


def _width(n: Any, what: str, limit: int | None = None) -> None:
    limit = _limits().max_chars if limit is None else limit
    if isinstance(n, int) and not isinstance(n, bool) and n > limit:
        _refuse(f"value limit reached: {what} of {n} (the limit is {limit})")


def _size_of(n_chars: int, what: str) -> None:
    _width(n_chars, what)


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d+|\*)?(?:\.(\d+|\*))?")


def _check_percent_format(fmt: str, args: Any) -> None:
    """``fmt % args``: refuse widths and precisions (given or by ``*``) above the value limit."""
    star = False
    for m in _PERCENT_SPEC.finditer(fmt):
        for g in (m.group(1), m.group(2)):
            if g == "*":
                star = True
            elif g:
                _width(int(g) if len(g) < 12 else 1 << 40, "a format width")
    if star:
        for a in args if isinstance(args, tuple) else (args,):
            _width(a, "a format width")


def _check_brace_format(fmt: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """``fmt.format(...)``: the same for ``{:>999999999}`` and widths passed as arguments."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # the call itself will fail
    for _literal, _name, spec, _conv in fields:
        for g in re.findall(r"\d+", spec or ""):
            _width(int(g) if len(g) < 12 else 1 << 40, "a format width")
    if any("{" in (spec or "") for _l, _n, spec, _c in fields):
        for a in (*args, *kwargs.values()):
            _width(a, "a format width")


def _check_binop(op: str, left: Any, right: Any) -> None:
    lim = _limits()
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(n, int) and not isinstance(n, bool):
                if isinstance(seq, str):
                    _size_of(len(seq) * max(n, 0), "a repeated string")
                elif isinstance(seq, (list, tuple)):
                    _width(len(seq) * max(n, 0), "a repeated list", lim.max_items)
        if isinstance(left, int) and isinstance(right, int):
            _width(left.bit_length() + right.bit_length(), "a product of bits", _MAX_INT_BITS)
    elif op == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            _width(left.bit_length() * right, "a power of bits", _MAX_INT_BITS)
    elif op == "%" and isinstance(left, str):
        _check_percent_format(left, right)


def _check_call(obj: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Widths and repeat counts of the str and int methods a template can call."""
    fn = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
    owner = getattr(fn, "__self__", None)
    name = getattr(fn, "__name__", "")
    first = args[0] if args else None
    if isinstance(owner, str):
        if name in ("center", "ljust", "rjust", "zfill"):
            _width(first if first is not None else kwargs.get("width"), "a width")
        elif name == "expandtabs":
            tab = first if first is not None else kwargs.get("tabsize", 8)
            if isinstance(tab, int):
                _size_of(len(owner) + owner.count("\t") * tab, "a string with tabs expanded")
        elif (
            name == "replace"
            and len(args) >= 2
            and isinstance(args[0], str)
            and isinstance(args[1], str)
        ):
            _check_replace(owner, args[0], args[1])
        elif name == "join" and first is not None and hasattr(first, "__len__"):
            _size_of(len(owner) * len(first), "a joined string")
        elif name in ("format", "format_map"):
            _check_brace_format(owner, args, kwargs)
    elif isinstance(owner, int) and name == "to_bytes":
        _width(first if first is not None else kwargs.get("length"), "a byte length")


def _check_replace(s: str, old: str, new: str) -> None:
    hits = s.count(old) if old else len(s) + 1
    _size_of(len(s) + hits * max(len(new) - len(old), 0), "a replaced string")


# -- filters -------------------------------------------------------------------------------


def _filter_check(name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Pre-checks of the filters that take widths, counts or separators (``args[0]`` is the value)."""
    value = args[0] if args else None
    rest = args[1:]

    def arg(i: int, key: str, default: Any = None) -> Any:
        return rest[i] if len(rest) > i else kwargs.get(key, default)

    if name == "center":
        _width(arg(0, "width", 80), "a width")
    elif name == "indent" and isinstance(value, str):
        w = arg(0, "width", 4)
        pad = w if isinstance(w, int) else len(str(w))
        _size_of(len(value) + (value.count("\n") + 1) * max(pad, 0), "an indented string")
    elif name == "wordwrap" and isinstance(value, str):
        width = arg(0, "width", 79)
        wrap = arg(2, "wrapstring", None)
        if isinstance(width, int) and isinstance(wrap, str):
            _size_of(len(value) + len(value) // max(width, 1) * len(wrap), "a wrapped string")
    elif name == "replace" and isinstance(value, str):
        old, new = arg(0, "old"), arg(1, "new")
        if isinstance(old, str) and isinstance(new, str):
            _check_replace(value, old, new)
    elif name == "join" and value is not None and hasattr(value, "__len__"):
        sep = arg(0, "d", "")
        if isinstance(sep, str):
            _size_of(len(sep) * len(value), "a joined string")
    elif name == "tojson":
        _width(arg(0, "indent"), "a JSON indent", _MAX_JSON_INDENT)
    elif name in ("slice", "batch"):
        _width(arg(0, "slices" if name == "slice" else "linecount"), "a count", _limits().max_items)
    elif name == "format" and isinstance(value, str):
        _check_percent_format(value, tuple(rest) or dict(kwargs))


def _bounded_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        _step()
        # Jinja passes the context or environment first to the filters that ask for it.
        pass_arg = getattr(fn, "jinja_pass_arg", None)
        _filter_check(name, args[1:] if pass_arg is not None else args, kwargs)
        return _checked(fn(*args, **kwargs))

    return run


def _count_steps(iterable: Any) -> Any:
    """A loop's iterable, paying one step per item (wrapped around every ``{% for %}``)."""
    for item in iterable:
        _step()
        yield item


# -- code generation -----------------------------------------------------------------------


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with output and ``~`` concatenations counted."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Frame) -> None:
        self.write("environment.offload_value(")
        super().visit_Concat(node, frame)
        self.write(")")

    def _output_const_repr(self, group: Any) -> str:
        return f"environment.offload_emit({super()._output_const_repr(group)})"


class _BoundedEnvironment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus the size checks of this module."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, finalize=self._finalize)
        self.filters = {k: _bounded_filter(k, f) for k, f in self.filters.items()}
        self.filters["offload_steps"] = _count_steps
        # Paragraphs of lorem ipsum by the thousand are no use to a chat template.
        self.globals.pop("lipsum", None)

    @staticmethod
    def _finalize(value: Any) -> str:
        text = str(value)
        b = _budget()
        if b is not None:
            _guarded(b.emit, len(text))
        return text

    def offload_emit(self, text: str) -> str:
        """Count constant output (template text) as it is written."""
        b = _budget()
        if b is not None:
            _guarded(b.emit, len(text))
        return text

    def offload_value(self, value: Any) -> Any:
        """Size-check the result of a ``~`` concatenation."""
        return _checked(value)

    def _parse(self, source: str, name: str | None, filename: str | None) -> jinja2.nodes.Template:
        tree = super()._parse(source, name, filename)
        # Every loop pays per item, also one whose body does nothing.
        for loop in tree.find_all(jinja2.nodes.For):
            loop.iter = jinja2.nodes.Filter(
                loop.iter, "offload_steps", [], [], None, None, lineno=loop.lineno
            )
        return tree

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        """Operators that build values, size-checked before and after."""
        _step()
        _check_binop(operator, left, right)
        return _checked(super().call_binop(context, operator, left, right))

    def call(
        __self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any
    ) -> Any:
        """Calls, counted and size-checked before and after."""
        _step()
        _check_call(__obj, args, kwargs)
        return _checked(super().call(__context, __obj, *args, **kwargs))


def compile_template(
    source: str, globals_: Mapping[str, Any] | None = None, limits: TemplateLimits = DEFAULT_LIMITS
) -> jinja2.Template:
    """Compile Jinja ``source`` in the bounded sandbox; raise ``TemplateTooLarge`` past the source
    limit, ``jinja2.TemplateError`` for bad syntax, and ``TemplateLimitExceeded`` when a constant
    part asks for too much."""
    check_source(source, limits)
    env = _BoundedEnvironment()
    env.globals.update(globals_ or {})
    try:
        return env.from_string(source)
    except _Abort as e:
        raise e.error from None


def render(
    template: jinja2.Template, data: Mapping[str, Any], limits: TemplateLimits = DEFAULT_LIMITS
) -> str:
    """Render within ``limits``; raise ``TemplateLimitExceeded`` naming the limit that was reached."""
    budget = Budget(limits)

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            _guarded(budget.step)
        return local

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        filename = frame.f_code.co_filename
        if filename in _OWN_FILES:
            return None
        _guarded(budget.step)
        return local if filename == _TEMPLATE_FILE else None

    previous_trace = sys.gettrace()
    previous_budget = _budget()
    _state.budget = budget
    sys.settrace(on_call)
    try:
        return template.render(**data)
    except _Abort as e:
        raise e.error from None
    finally:
        sys.settrace(previous_trace)
        _state.budget = previous_budget
