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
    whole.first_k = None  # the chain over every token, as llama_sampler_sample runs it
    rng = np.random.default_rng(n_vocab)
    picked: list[int] = []
    used: list[bool] = []
    shortcut = fast._apply_top

    def counted(logits: ctypes.Array, k: int) -> int | None:
        token = shortcut(logits, k)
        used.append(token is not None)
        return token

    fast._apply_top = counted  # type: ignore[method-assign]
    try:
        assert fast.first_k is not None, "every one of these chains starts with a top-k cut"
        for _ in range(150):
            row = _logits(rng, n_vocab, picked)
            a, b = fast.sample_logits(row), whole.sample_logits(row)
            assert a == b, f"step {len(picked)}: shortcut {a}, whole vocabulary {b}"
            picked.append(a)
    finally:
        fast.close()
        whole.close()
    assert len(set(picked)) > 1
    assert len(used) == 150
    if fast.first_k * 256 < n_vocab:
        assert sum(used) >= 140, "the shortcut fell back to the whole vocabulary too often"


def test_chains_that_do_not_start_with_a_top_k_cut_take_the_whole_vocabulary() -> None:
    for sampling in (
        Sampling(seed=1, mirostat=2),
        Sampling(seed=1, top_k=0),
        Sampling(seed=1, repeat_penalty=0.8),  # raises logits: the cut-first rule does not hold
    ):
        s = Sampler(sampling, 0, 32_000, 4096)
        try:
            assert s.first_k is None
        finally:
            s.close()
