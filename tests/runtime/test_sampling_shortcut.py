"""The top-k shortcut of the sampler picks exactly the token llama.cpp's chain picks over the whole
vocabulary: greedy and seeded draws, with and without penalties, token after token."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from offload.runtime.runner.generation import Sampling
from offload.runtime.runner.sampling import Sampler

CONFIGS = {
    "greedy": Sampling(temperature=0.0, repeat_penalty=1.0),
    "greedy, penalties": Sampling(temperature=0.0),
    "greedy, presence penalty": Sampling(temperature=0.0, repeat_penalty=1.3, presence_penalty=0.7),
    "greedy, frequency penalty": Sampling(temperature=0.0, frequency_penalty=0.4),
    "Ollama's defaults": Sampling(seed=7),
    "top_k 5, min_p": Sampling(seed=11, top_k=5, min_p=0.05, repeat_penalty=1.0),
    "top_k 200, penalties": Sampling(
        seed=3, top_k=200, top_p=0.95, frequency_penalty=0.5, presence_penalty=0.3
    ),
    "typical": Sampling(seed=5, typical_p=0.7, repeat_last_n=16),
}


def _logits(rng: np.random.Generator, n_vocab: int, recent: list[int]) -> ctypes.Array:
    """A row of logits shaped like a model's: a broad mass, a few strong candidates, and the tokens
    just generated among the likely ones (so penalties change the choice)."""
    x = rng.standard_normal(n_vocab).astype(np.float32) * 2.0
    x[rng.integers(0, n_vocab, 20)] += rng.uniform(4, 12, 20).astype(np.float32)
    if recent:
        x[recent[-5:]] += 9.0
    return (ctypes.c_float * n_vocab).from_buffer_copy(x.tobytes())


@pytest.mark.parametrize("n_vocab", [262_144, 32_000])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_shortcut_picks_what_the_whole_vocabulary_would(name: str, n_vocab: int) -> None:
    sampling = CONFIGS[name]
    fast = Sampler(sampling, 0, n_vocab, 4096)
    whole = Sampler(sampling, 0, n_vocab, 4096)
    # The chain over every token, as llama_sampler_sample runs it.
    whole.first_k, whole.greedy = None, False
    rng = np.random.default_rng(n_vocab)
    picked: list[int] = []
    whole_vocab: list[bool] = []
    apply = fast._apply

    def counted(x: np.ndarray, with_grammar: bool) -> int:
        whole_vocab.append(True)
        return apply(x, with_grammar)

    fast._apply = counted  # type: ignore[method-assign]
    try:
        assert fast.shortcut, "every one of these chains is greedy or starts with a top-k cut"
        for _ in range(150):
            row = _logits(rng, n_vocab, picked)
            a, b = fast.sample_logits(row), whole.sample_logits(row)
            assert a == b, f"step {len(picked)}: shortcut {a}, whole vocabulary {b}"
            picked.append(a)
    finally:
        fast.close()
        whole.close()
    assert len(set(picked)) > 1
    if fast.greedy or fast.first_k * 256 < n_vocab:  # type: ignore[operator]
        assert len(whole_vocab) <= 10, "the shortcut fell back to the whole vocabulary too often"


def test_greedy_with_penalties_finds_the_best_token_when_the_largest_logit_is_penalized() -> None:
    """The largest logit belongs to a token just generated: the greedy shortcut must weigh the
    penalized tokens against the best unpenalized one, as the whole chain does, and leave the row
    of logits as it found it."""
    n_vocab = 32_000
    for penalty, expect_repeat in ((1.005, True), (1.05, False)):
        fast = Sampler(Sampling(temperature=0.0, repeat_penalty=penalty), 0, n_vocab, 4096)
        whole = Sampler(Sampling(temperature=0.0, repeat_penalty=penalty), 0, n_vocab, 4096)
        whole.first_k, whole.greedy = None, False
        try:
            x = np.zeros(n_vocab, dtype=np.float32)
            x[[7, 9, 11]] = (10.0, 9.9, 9.0)
            for t in (7, 300, 7):  # 7 twice in the window
                fast.accept(t)
                whole.accept(t)
            row = (ctypes.c_float * n_vocab).from_buffer_copy(x.tobytes())
            a = fast.sample_logits(row)
            assert np.array_equal(np.ctypeslib.as_array(row), x)
            assert a == whole.sample_logits(row)
            assert (a == 7) is expect_repeat and a in (7, 9)
        finally:
            fast.close()
            whole.close()


def test_the_penalty_window_mirror_follows_the_chain() -> None:
    s = Sampler(Sampling(temperature=0.0, repeat_last_n=3), 0, 1000, 4096)
    try:
        for t in (1, 2, 1, 3, 4):
            s.accept(t)
        assert list(s._window or ()) == [1, 3, 4] and s._counts == {1: 1, 3: 1, 4: 1}
    finally:
        s.close()


def test_chains_that_do_not_start_with_a_top_k_cut_take_the_whole_vocabulary() -> None:
    for sampling in (
        Sampling(seed=1, mirostat=2),
        Sampling(seed=1, top_k=0),
        Sampling(seed=1, repeat_penalty=0.8),  # raises logits: the cut-first rule does not hold
        Sampling(temperature=0.0, repeat_penalty=0.8),
    ):
        s = Sampler(sampling, 0, 32_000, 4096)
        try:
            assert s.first_k is None and not s.greedy
        finally:
            s.close()
