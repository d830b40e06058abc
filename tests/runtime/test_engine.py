"""Generation through a real runner process on the real Gemma model: reproducible, plausible, and
it stops when told."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from offload.planner import anatomy, hardware, plan
from offload.planner.types import PlanRequest
from offload.runtime.errors import ContextTooLong
from offload.runtime.runner.generation import CancelEvent, Piece, Sampling, Stats
from offload.runtime.serving.process import RunnerProcess


@pytest.fixture(scope="module")
def runner(gemma_gguf: Path, offload_home: Path) -> Iterator[RunnerProcess]:
    p = plan(
        anatomy.read(gemma_gguf),
        hardware.probe(measure=False),
        PlanRequest(n_ctx=1024, n_parallel=2),
    )
    r = RunnerProcess.start("gemma-engine-test", gemma_gguf, p)
    yield r
    r.close()


def run(runner: RunnerProcess, prompt: str, **sampling: object) -> tuple[str, Stats]:
    text, stats = "", None
    for ev in runner.generate(Sampling(**sampling), text=prompt):  # type: ignore[arg-type]
        if isinstance(ev, Piece):
            text += ev.text
        else:
            stats = ev
    assert stats is not None
    return text, stats


def test_runner_loads_with_the_plans_context_and_sequences(runner: RunnerProcess) -> None:
    assert runner.n_ctx == runner.plan.n_ctx == 1024  # type: ignore[union-attr]
    assert runner.n_parallel == 2 and runner.pid != 0 and runner.load_s > 0
    # Where the load's time went, each part measured, together within the whole wait.
    phases = runner.phases
    assert set(phases) == {"process_s", "model_s", "context_s", "first_eval_s", "other_s"}
    assert all(v >= 0 for v in phases.values()) and phases["model_s"] > 0
    assert sum(phases.values()) <= runner.load_s


def test_temperature_zero_with_a_seed_gives_the_same_text_twice(runner: RunnerProcess) -> None:
    a, _ = run(runner, "Once upon a time", temperature=0.0, seed=7, num_predict=24)
    b, _ = run(runner, "Once upon a time", temperature=0.0, seed=7, num_predict=24)
    assert a == b
    assert len(a.split()) >= 5


def test_sampling_with_the_same_seed_repeats_and_another_seed_differs(
    runner: RunnerProcess,
) -> None:
    a, _ = run(runner, "My favourite food is", temperature=1.0, seed=1, num_predict=24)
    b, _ = run(runner, "My favourite food is", temperature=1.0, seed=1, num_predict=24)
    c, _ = run(runner, "My favourite food is", temperature=1.0, seed=2, num_predict=24)
    assert a == b
    assert a != c


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("Paris is the capital of", "France"),
        ("Water is made of hydrogen and", "oxygen"),
    ],
)
def test_factual_prompt_gets_a_plausible_continuation(
    runner: RunnerProcess, prompt: str, expected: str
) -> None:
    text, _ = run(runner, prompt, temperature=0.0, seed=1, num_predict=8)
    assert expected in text


def test_num_predict_caps_the_tokens_and_reports_length(runner: RunnerProcess) -> None:
    prompt = "Count: one, two, three, and"
    _, stats = run(runner, prompt, temperature=0.0, num_predict=5)
    assert stats.eval_count == 5
    assert stats.done_reason == "length"
    assert stats.prompt_eval_count + stats.cached_tokens == len(runner.tokenize(prompt))
    assert stats.prompt_eval_s > 0 and stats.eval_s > 0


def test_a_repeated_prompt_reuses_its_cached_prefix(runner: RunnerProcess) -> None:
    prompt = "A cached prefix: " + "the same words again and again, " * 8
    _, first = run(runner, prompt, temperature=0.0, num_predict=2)
    _, second = run(runner, prompt + " and then something new", temperature=0.0, num_predict=2)
    n_first = len(runner.tokenize(prompt))
    assert second.cached_tokens >= n_first - 1
    assert (
        second.prompt_eval_count
        == len(runner.tokenize(prompt + " and then something new")) - second.cached_tokens
    )
    assert second.prompt_eval_count < first.prompt_eval_count


def test_a_stop_string_ends_generation_and_is_not_emitted(runner: RunnerProcess) -> None:
    free, _ = run(runner, "One, two, three, four,", temperature=0.0, num_predict=12)
    assert "six" in free
    stopped, stats = run(
        runner, "One, two, three, four,", temperature=0.0, num_predict=12, stop=("six",)
    )
    assert "six" not in stopped
    assert stopped == free[: free.index("six")]
    assert stats.done_reason == "stop"


def test_a_set_cancel_event_stops_generation_within_a_token(runner: RunnerProcess) -> None:
    cancel = CancelEvent()
    pieces = 0
    stats = None
    for ev in runner.generate(
        Sampling(temperature=0.0, num_predict=200), text="Tell me a long story", cancel=cancel
    ):
        if isinstance(ev, Piece):
            pieces += 1
            if pieces == 3:
                cancel.set()
        else:
            stats = ev
    assert stats is not None and stats.done_reason == "cancel"
    assert stats.eval_count <= 5


def test_a_plain_event_cancels_too(runner: RunnerProcess) -> None:
    cancel = threading.Event()
    out = []
    for ev in runner.generate(
        Sampling(temperature=0.0, num_predict=300), text="Tell me a long story", cancel=cancel
    ):
        out.append(ev)
        if len(out) == 2:
            cancel.set()
    assert (
        isinstance(out[-1], Stats) and out[-1].done_reason == "cancel" and out[-1].eval_count < 300
    )


def test_an_overlong_prompt_is_truncated_from_the_left(runner: RunnerProcess) -> None:
    tokens = runner.tokenize("word " * 3000)
    assert len(tokens) > runner.n_ctx
    stats = [
        ev
        for ev in runner.generate(Sampling(temperature=0.0, num_predict=4), tokens=tokens)
        if isinstance(ev, Stats)
    ][0]
    assert stats.prompt_eval_count < runner.n_ctx
    assert stats.eval_count == 4


def test_an_overlong_prompt_is_refused_when_truncation_is_off(runner: RunnerProcess) -> None:
    tokens = runner.tokenize("word " * 3000)
    with pytest.raises(ContextTooLong, match="context holds"):
        list(runner.generate(Sampling(num_predict=4), tokens=tokens, truncate=False))


def test_token_ids_outside_the_vocabulary_are_refused_and_the_runner_lives(
    runner: RunnerProcess,
) -> None:
    from offload.runtime.errors import BadRequest

    with pytest.raises(BadRequest, match="outside this model's vocabulary"):
        list(runner.generate(Sampling(num_predict=2), tokens=[2, 99_999_999]))
    with pytest.raises(BadRequest, match="outside"):
        runner.detokenize([-5])
    assert run(runner, "Still", temperature=0.0, num_predict=2)[1].eval_count == 2


def test_embeddings_come_from_the_same_runner(runner: RunnerProcess) -> None:
    vectors, count = runner.embed(["hello world", [2, 9259, 1902]])
    assert len(vectors) == 2 and count > 3
    assert all(len(v) == 640 for v in vectors)  # Gemma 3 270M's embedding width


def test_a_context_smaller_than_llama_cpps_padding_still_truncates_safely(
    gemma_gguf: Path, offload_home: Path
) -> None:
    p = plan(anatomy.read(gemma_gguf), hardware.probe(measure=False), PlanRequest(n_ctx=128))
    r = RunnerProcess.start("gemma-small-ctx", gemma_gguf, p)
    try:
        assert r.n_ctx == 128
        stats = [
            ev
            for ev in r.generate(Sampling(num_predict=4), text="word " * 300)
            if isinstance(ev, Stats)
        ][0]
        assert stats.prompt_eval_count < 128 and stats.eval_count == 4
    finally:
        r.close()
