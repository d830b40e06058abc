"""Half a minute of fuzzing the Modelfile parser: generated Modelfiles and mutations of real ones
(OFFLOAD_FUZZ_SECONDS for longer).

Whatever the text, parsing ends in a ``Modelfile`` or a one-line ``ModelfileError``, quickly; and a
Modelfile that parses renders to text that parses back to an equal Modelfile (or rendering says
why it cannot).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from offload.models.modelfile import (
    PARAMETER_TYPES,
    ModelfileError,
    coerce_parameter,
    parse_modelfile,
)

FUZZ_S = max(30.0, float(os.environ.get("OFFLOAD_FUZZ_SECONDS", "30")))
ROOT = Path(__file__).resolve().parents[2]
WORDS = ["FROM", "from", "PARAMETER", "parameter", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE",
         "MESSAGE", "message", "#", "FORM", "", "RUN"]  # fmt: skip
ROLES = ["system", "user", "assistant", "User", "robot", ""]
PIECES = ['"', '"""', "\\", '\\"', "\n", "\r\n", "\r", "\t", " ", "  ", "#", "{{ .Prompt }}",
          "\x00", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u00a0", "é", "😀", "gemma3:270m",
          "./model.gguf", "-1", "0", "1e9", "nan", "inf", "true", "T", "yes", "9" * 30]  # fmt: skip


def value(rng: random.Random) -> str:
    parts = [rng.choice(PIECES) if rng.random() < 0.6 else chr(rng.randrange(0x20, 0x3000))
             for _ in range(rng.randrange(0, 12))]  # fmt: skip
    text = "".join(parts)
    shape = rng.random()
    if shape < 0.3:
        return f'"{text}"'
    if shape < 0.5:
        return f'"""{text}"""'
    return text


def line(rng: random.Random) -> str:
    word = rng.choice(WORDS)
    if word.upper() == "PARAMETER":
        name = rng.choice([*PARAMETER_TYPES, "warp", ""])
        return f"{word} {name} {value(rng)}"
    if word.upper() == "MESSAGE":
        return f"{word} {rng.choice(ROLES)} {value(rng)}"
    return word + rng.choice([" ", "  ", "\t", ""]) + value(rng)


def generated(rng: random.Random) -> str:
    lines = [line(rng) for _ in range(rng.randrange(0, 10))]
    if rng.random() < 0.7:
        lines.insert(rng.randrange(len(lines) + 1), f"FROM {value(rng)}")
    return rng.choice(["\n", "\r\n", "\n\n"]).join(lines) + rng.choice(["", "\n"])


def mutated(rng: random.Random, seeds: list[str]) -> str:
    text = list(rng.choice(seeds))
    for _ in range(rng.randrange(1, 6)):
        if not text:
            break
        i = rng.randrange(len(text))
        op = rng.random()
        if op < 0.4:
            text[i] = rng.choice(PIECES)
        elif op < 0.7:
            del text[i : i + rng.randrange(1, 20)]
        else:
            text[i:i] = list(rng.choice(PIECES))
    return "".join(text)


def check(text: str) -> str:
    t0 = time.monotonic()
    try:
        mf = parse_modelfile(text)
    except ModelfileError as e:
        assert "\n" not in str(e) and "\r" not in str(e), repr(str(e))
        return "refused"
    try:
        again = parse_modelfile(mf.render())
    except ModelfileError as e:
        assert "cannot be written" in str(e), f"{text!r} renders to text that fails: {e}"
        return "unrenderable"
    assert again == mf, f"{text!r} does not survive render and parse"
    assert time.monotonic() - t0 < 2
    return "ok"


def test_fuzz_the_modelfile_parser_for_half_a_minute() -> None:
    seeds = [p.read_text(encoding="utf-8") for p in (ROOT / "Modelfiles").iterdir() if p.is_file()]
    seeds.append((ROOT / "models" / "data" / "gemma3.Modelfile").read_text(encoding="utf-8"))
    rng = random.Random(int(os.environ.get("OFFLOAD_FUZZ_SEED", "7")))
    counts = {"ok": 0, "refused": 0, "unrenderable": 0}
    deadline = time.monotonic() + FUZZ_S
    i = 0
    while time.monotonic() < deadline:
        text = generated(rng) if rng.random() < 0.6 else mutated(rng, seeds)
        try:
            counts[check(text)] += 1
        except AssertionError:
            raise
        except Exception as e:
            raise AssertionError(f"iteration {i}: {type(e).__name__}: {e} for {text!r}") from e
        if i % 50 == 0:
            name, raw = rng.choice([*PARAMETER_TYPES, "Top_K", "x"]), value(rng)
            try:
                coerce_parameter(name, raw)
            except ModelfileError as e:
                assert "\n" not in str(e), repr(str(e))
        i += 1
    assert counts["ok"] > 100 and counts["refused"] > 100, counts
    print(f"fuzzed {i} Modelfiles in {FUZZ_S:.0f}s: {counts}")


def test_a_huge_modelfile_is_parsed_in_linear_time() -> None:
    text = (
        "FROM x\n" + "SYSTEM hello there\n" * 200_000 + 'TEMPLATE """' + "y" * 2_000_000 + '"""\n'
    )
    t0 = time.monotonic()
    assert parse_modelfile(text).template == "y" * 2_000_000
    assert time.monotonic() - t0 < 10
