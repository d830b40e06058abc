"""Template shapes of every size render exactly, or stop at a limit, in both template engines.

Hypothesis draws nested loops (counts from none to a billion, widths from one character to ten
million) and doubling strings; small limits keep each case quick. A template well within the
limits must render exactly; one beyond them must stop with ``TemplateLimitExceeded``; none may
run past the time limit.
"""

from __future__ import annotations

import math
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload.models import gotemplate
from offload.models.template_limits import TemplateLimitExceeded, TemplateLimits
from offload.runtime.text import jinja_sandbox

SMALL = TemplateLimits(max_steps=40_000, max_chars=100_000, max_items=10_000, max_seconds=5.0)


@st.composite
def _loops(draw: st.DrawFn) -> tuple[list[int], int]:
    """Counts of nested loops and the width of what the innermost one writes."""
    counts = draw(
        st.lists(st.integers(0, 300) | st.sampled_from([10**5, 10**9]), min_size=1, max_size=4)
    )
    width = draw(st.integers(1, 2000) | st.sampled_from([10**5, 10**7]))
    return counts, width


def _go_loops(counts: list[int], width: int) -> str:
    return (
        "".join(f"{{{{range {n}}}}}" for n in counts)
        + f'{{{{printf "%{width}d" 7}}}}'
        + "{{end}}" * len(counts)
    )


def _jinja_loops(counts: list[int], width: int) -> str:
    heads = "".join(f"{{% for i{d} in range({min(n, 100000)}) %}}" for d, n in enumerate(counts))
    return heads + f"{{{{ '%{width}d' % 7 }}}}" + "{% endfor %}" * len(counts)


def _render(engine: str, source: str) -> str:
    if engine == "go":
        return gotemplate.parse(source).render({}, SMALL)
    return jinja_sandbox.render(jinja_sandbox.compile_template(source), {}, SMALL)


def _check(engine: str, source: str, out_chars: int, iterations: int) -> None:
    t0 = time.monotonic()
    try:
        out = _render(engine, source)
    except TemplateLimitExceeded as e:
        assert "limit reached" in str(e)
        # A template well within every limit must never be refused.
        assert not (out_chars <= SMALL.max_chars // 2 and iterations * 40 <= SMALL.max_steps), (
            source,
            e,
        )
    else:
        assert len(out) == out_chars <= SMALL.max_chars
    assert time.monotonic() - t0 < SMALL.max_seconds + 3


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(shape=_loops(), engine=st.sampled_from(["go", "jinja"]))
def test_nested_loops_of_any_shape_render_exactly_or_stop_at_a_limit(
    shape: tuple[list[int], int], engine: str
) -> None:
    counts, width = shape
    if engine == "jinja":
        counts = [min(n, 100000) for n in counts]  # Jinja's sandbox caps range() itself
    iterations = sum(math.prod(counts[: i + 1]) for i in range(len(counts)))
    source = (_go_loops if engine == "go" else _jinja_loops)(counts, width)
    # Go's fmt writes %!(BADWIDTH) for widths over a million, as Go does.
    piece = len("%!(BADWIDTH)") if engine == "go" and width > 10**6 else max(width, 1)
    _check(engine, source, math.prod(counts) * piece, iterations)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(doublings=st.integers(0, 40), engine=st.sampled_from(["go", "jinja"]))
def test_a_doubling_string_renders_exactly_or_stops_at_the_value_limit(
    doublings: int, engine: str
) -> None:
    if engine == "go":
        source = f'{{{{$x := "ab"}}}}{{{{range {doublings}}}}}{{{{$x = printf "%s%s" $x $x}}}}{{{{end}}}}{{{{$x}}}}'
    else:
        source = (
            f"{{% set ns = namespace(s='ab') %}}{{% for i in range({doublings}) %}}"
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"
        )
    _check(engine, source, 2 ** (doublings + 1), doublings)


def test_go_templates_reach_data_fields_but_not_python_internals() -> None:
    data = {"Prompt": "hi", "Messages": [{"Role": "user"}]}
    assert (
        gotemplate.render("{{ .Prompt }}{{ range .Messages }}{{ .Role }}{{ end }}", data)
        == "hiuser"
    )
    for source in (
        "{{ .Prompt.__class__ }}",
        "{{ (index .Messages 0).Role.__class__ }}",
        "{{ .Messages.__len__ }}",
    ):
        try:
            gotemplate.render(source, data)
        except gotemplate.TemplateError as e:
            assert "can't evaluate field __" in str(e)
        else:
            raise AssertionError(f"{source} rendered")
