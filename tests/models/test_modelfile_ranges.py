"""Modelfile PARAMETERs are held to the same types and ranges as request options, at create time.

A model must not carry a value that every request would be refused on, or that would take the
server down: ``PARAMETER num_batch -1000`` and ``PARAMETER temperature nan`` are errors naming the
line, as a misspelt parameter already was.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from offload.models.modelfile import ModelfileError, coerce_parameter, parse_modelfile
from tests.option_spec import INT_KEYS, SPEC, converted

_NUMERIC = sorted(k for k in SPEC if k not in ("stop", "use_mmap", "use_mlock", "numa", "low_vram"))


def _text(key: str, value: object) -> str:
    """How a Modelfile writes the value (integers without a decimal point)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if key in INT_KEYS and isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("PARAMETER num_batch -1000", ["line 2", "PARAMETER num_batch", "1 to 8192"]),
        ("PARAMETER num_thread 100000", ["line 2", "PARAMETER num_thread"]),
        ("PARAMETER temperature nan", ["line 2", "PARAMETER temperature", "finite"]),
        ("PARAMETER top_p 1.5", ["line 2", "PARAMETER top_p", "0 to 1"]),
        ("PARAMETER mirostat 3", ["line 2", "PARAMETER mirostat"]),
        ("PARAMETER num_ctx 0", ["line 2", "PARAMETER num_ctx"]),
        ("PARAMETER repeat_last_n 1000000000", ["line 2", "PARAMETER repeat_last_n"]),
        ("PARAMETER stop " + "x" * 300, ["line 2", "PARAMETER stop", "256"]),
    ],
)
def test_out_of_range_parameters_are_refused_naming_the_line_and_range(
    line: str, words: list[str]
) -> None:
    with pytest.raises(ModelfileError) as e:
        parse_modelfile(f"FROM gemma3:270m\n{line}\n")
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_more_than_sixteen_stop_strings_are_refused() -> None:
    text = "FROM x\n" + "".join(f"PARAMETER stop s{i}\n" for i in range(17))
    with pytest.raises(ModelfileError, match="line 18.*at most 16"):
        parse_modelfile(text)
    assert (
        len(
            parse_modelfile(
                "FROM x\n" + "".join(f"PARAMETER stop s{i}\n" for i in range(16))
            ).parameters["stop"]
        )
        == 16
    )


@st.composite
def _parameter(draw: st.DrawFn) -> tuple[str, object, bool]:
    key = draw(st.sampled_from(_NUMERIC))
    ok = draw(st.booleans())
    value = draw(SPEC[key][0] if ok else SPEC[key][1])
    return key, value, ok


@settings(max_examples=500, deadline=None, derandomize=True)
@given(_parameter())
def test_a_parameter_is_read_when_in_range_and_refused_with_its_line_when_not(
    case: tuple[str, object, bool],
) -> None:
    key, value, ok = case
    assume(
        _text(key, value).strip() and "\n" not in _text(key, value)
    )  # an empty value is another error
    text = f"FROM gemma3:270m\nPARAMETER {key} {_text(key, value)}\n"
    if not ok:
        with pytest.raises(ModelfileError, match=f"line 2: .*{key}"):
            parse_modelfile(text)
        return
    got = parse_modelfile(text).parameters[key]
    want = converted(key, value)
    if key == "seed":
        want = int(value)  # stored as written; the runtime takes it to 32 bits
    assert got == want or (isinstance(got, float) and math.isclose(got, float(want)))


def test_json_parameters_of_the_create_api_are_checked_the_same_way() -> None:
    assert coerce_parameter("temperature", 0.5) == 0.5
    for key, value in (
        ("temperature", float("nan")),
        ("num_batch", -5),
        ("top_k", -1),
        ("num_ctx", 1 << 30),
    ):
        with pytest.raises(ModelfileError, match=f"PARAMETER {key}"):
            coerce_parameter(key, value)
