"""The engine on the real Gemma model: reproducible, plausible, and it stops when told."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from offload.planner import anatomy, hardware, plan
from offload.planner.types import PlanRequest
from offload.runtime.engine import Engine, Piece, Sampling, Stats


@pytest.fixture(scope="module")
def engine(gemma_gguf: Path) -> Engine:
    p = plan(anatomy.read(gemma_gguf), hardware.probe(), PlanRequest(n_ctx=1024))
    e = Engine.load(gemma_gguf, p)
    yield e
    e.close()


def run(engine: Engine, prompt: str, **sampling: object) -> tuple[str, Stats]:
    text, stats = "", None
    for ev in engine.generate(engine.tokenize(prompt), Sampling(**sampling)):
        if isinstance(ev, Piece):
            text += ev.text
        else:
            stats = ev
    assert stats is not None
    return text, stats


def test_engine_loads_with_the_plans_context(engine: Engine) -> None:
    assert engine.n_ctx == engine.plan.n_ctx == 1024


def test_temperature_zero_with_a_seed_gives_the_same_text_twice(engine: Engine) -> None:
    a, _ = run(engine, "Once upon a time", temperature=0.0, seed=7, num_predict=24)
    b, _ = run(engine, "Once upon a time", temperature=0.0, seed=7, num_predict=24)
    assert a == b
    assert len(a.split()) >= 5


def test_sampling_with_the_same_seed_repeats_and_another_seed_differs(engine: Engine) -> None:
    a, _ = run(engine, "My favourite food is", temperature=1.0, seed=1, num_predict=24)
    b, _ = run(engine, "My favourite food is", temperature=1.0, seed=1, num_predict=24)
    c, _ = run(engine, "My favourite food is", temperature=1.0, seed=2, num_predict=24)
    assert a == b
    assert a != c


@pytest.mark.parametrize(("prompt", "expected"), [
    ("Paris is the capital of", "France"),
    ("Water is made of hydrogen and", "oxygen"),
])
def test_factual_prompt_gets_a_plausible_continuation(engine: Engine, prompt: str, expected: str) -> None:
    text, _ = run(engine, prompt, temperature=0.0, seed=1, num_predict=8)
    assert expected in text


def test_num_predict_caps_the_tokens_and_reports_length(engine: Engine) -> None:
    _, stats = run(engine, "Count: one, two,", temperature=0.0, num_predict=5)
    assert stats.eval_count == 5
    assert stats.done_reason == "length"
    assert stats.prompt_eval_count == len(engine.tokenize("Count: one, two,"))
    assert stats.prompt_eval_s > 0 and stats.eval_s > 0


def test_a_stop_string_ends_generation_and_is_not_emitted(engine: Engine) -> None:
    free, _ = run(engine, "One, two, three, four,", temperature=0.0, num_predict=12)
    assert "six" in free
    stopped, stats = run(engine, "One, two, three, four,", temperature=0.0, num_predict=12, stop=("six",))
    assert "six" not in stopped
    assert stopped == free[: free.index("six")]
    assert stats.done_reason == "stop"


def test_a_set_cancel_event_stops_generation_at_once(engine: Engine) -> None:
    cancel = threading.Event()
    pieces = 0
    stats = None
    for ev in engine.generate(engine.tokenize("Tell me a long story"), Sampling(temperature=0.0, num_predict=200), cancel=cancel):
        if isinstance(ev, Piece):
            pieces += 1
            if pieces == 3:
                cancel.set()
        else:
            stats = ev
    assert stats is not None and stats.done_reason == "cancel"
    assert stats.eval_count <= 4


def test_an_overlong_prompt_is_truncated_from_the_left(engine: Engine) -> None:
    tokens = engine.tokenize("word " * 3000)
    assert len(tokens) > engine.n_ctx
    stats = [ev for ev in engine.generate(tokens, Sampling(temperature=0.0, num_predict=4)) if isinstance(ev, Stats)][0]
    assert stats.prompt_eval_count < engine.n_ctx
    assert stats.eval_count == 4


def test_an_overlong_prompt_is_refused_when_truncation_is_off(engine: Engine) -> None:
    from offload.runtime.errors import ContextTooLong

    tokens = engine.tokenize("word " * 3000)
    with pytest.raises(ContextTooLong, match="context holds"):
        list(engine.generate(tokens, Sampling(num_predict=4), truncate=False))


def test_a_context_smaller_than_llama_cpps_padding_still_truncates_safely(gemma_gguf: Path) -> None:
    p = plan(anatomy.read(gemma_gguf), hardware.probe(), PlanRequest(n_ctx=128))
    e = Engine.load(gemma_gguf, p)
    try:
        assert e.n_ctx == 128
        stats = [ev for ev in e.generate(e.tokenize("word " * 300), Sampling(num_predict=4)) if isinstance(ev, Stats)][0]
        assert stats.prompt_eval_count < 128 and stats.eval_count == 4
    finally:
        e.close()
