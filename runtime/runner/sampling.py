"""One llama.cpp sampler chain per request: its own temperature, top-k/p, min-p, penalties, seed,
mirostat and grammar, and each token's log probability when asked.

Sampling runs in C over the whole vocabulary, which is where the per-token time goes with large
vocabularies (262k tokens for Gemma 3): a full chain of penalties then top-k took 1.1 ms a token on
a 2-core EPYC, against 0.22 ms with top-k first. Penalties can only lower a logit, and at most
``penalty_last_n`` tokens carry one, so the true top-k after penalties always lies within the top
``k + penalty_last_n`` before them: cutting to that first gives exactly the same distribution.

Where a chain starts by keeping the top k (every chain but mirostat's and those without a top-k),
even that first cut need not see the whole vocabulary in C: a threshold read from a strided sample
of the logits picks, with two vectorized passes, a few hundred tokens that surely hold the top k,
and the chain runs on those (0.054 ms instead of 0.165 ms a token for Gemma 3 on 2 cores). The
chain sorts what it keeps, so it picks the same token, seeded draws included.

A greedy chain needs less still: the largest logit is its pick unless a penalty lowers it (one pass,
``argmax``). When the largest logit is a penalized token, the pick is among the penalized tokens and
the best of the others (a second ``argmax`` with the penalized ones masked): without a frequency
penalty, numpy applies llama.cpp's penalty arithmetic to those few, bit for bit; with one, the
chain picks from them in C.
"""

from __future__ import annotations

import collections
import ctypes
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from offload.runtime.runner.generation import Sampling, TokenLogprob
from offload.runtime.runner.native import llama_c

__all__ = ["Sampler", "StepLogits", "sample_rows"]

_NEG_INF = float("-inf")
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
# The top-k shortcut: every STRIDE-th logit is read to find a threshold above which about
# (k // STRIDE + MARGIN) * STRIDE tokens lie. Fewer than k above it (rare) or more than CAPACITY
# falls back to the whole vocabulary.
_STRIDE = 64
_MARGIN = 8
_CAPACITY = 8192


def _add(chain: int, smpl: int | None) -> None:
    if smpl:
        llama_c.llama_sampler_chain_add(chain, smpl)


def _lowers_only(s: Sampling) -> bool:
    """True when the penalties can only lower logits (the top-k-first shortcut is then exact)."""
    return s.repeat_penalty >= 1.0 and s.frequency_penalty >= 0.0 and s.presence_penalty >= 0.0


@dataclass
class _Grammar:
    smpl: int
    single: ctypes.Array  # one llama_token_data, for checking a sampled token cheaply
    single_arr: llama_c.llama_token_data_array


class Sampler:
    """A request's sampler chain (and grammar); ``sample`` picks and accepts the next token."""

    def __init__(self, sampling: Sampling, vocab: int, n_vocab: int, n_ctx: int) -> None:
        self.n_vocab = n_vocab
        self.vocab = vocab
        self.logprobs = sampling.logprobs
        params = llama_c.llama_sampler_chain_default_params()
        params.no_perf = True
        self.chain = llama_c.llama_sampler_chain_init(params)
        self.grammar: _Grammar | None = None
        self._cur: ctypes.Array | None = None
        # k when the chain starts by keeping the top k logits (greedy alone is k = 1).
        self.first_k: int | None = None
        # A greedy chain picks the largest logit after penalties that can only lower logits: the
        # largest logit itself unless it carries a penalty. The tokens the penalties sampler holds
        # (the last ``penalty_last_n`` accepted) are mirrored here, with their counts, to tell.
        self.greedy = False
        self._window: collections.deque[int] | None = None
        self._counts: dict[int, int] = {}
        self._stateless = False  # the chain is greedy alone: accepting a token changes nothing
        self._small: ctypes.Array | None = None
        self._exact = False
        self._build(sampling, n_ctx)
        if sampling.grammar:
            smpl = llama_c.llama_sampler_init_grammar(
                vocab, sampling.grammar.encode("utf-8"), b"root"
            )
            if not smpl:
                self.close()
                raise ValueError("the grammar for this format could not be parsed")
            single = (llama_c.llama_token_data * 1)()
            arr = llama_c.llama_token_data_array(data=single, size=1, selected=-1, sorted=False)
            self.grammar = _Grammar(smpl, single, arr)

    def _build(self, s: Sampling, n_ctx: int) -> None:
        chain = self.chain
        last_n = n_ctx if s.repeat_last_n < 0 else min(s.repeat_last_n, n_ctx)
        penalize = last_n > 0 and (
            s.repeat_penalty != 1.0 or s.frequency_penalty != 0.0 or s.presence_penalty != 0.0
        )
        top_k = s.top_k if s.top_k > 0 else 0
        greedy = s.temperature <= 0.0
        keep = 1 if greedy else top_k
        if penalize and keep and _lowers_only(s) and not s.mirostat:
            _add(chain, llama_c.llama_sampler_init_top_k(keep + last_n))
            self.first_k = keep + last_n
        if penalize:
            _add(
                chain,
                llama_c.llama_sampler_init_penalties(
                    self.n_vocab, last_n, s.repeat_penalty, s.frequency_penalty, s.presence_penalty
                ),
            )
        if greedy:
            _add(chain, llama_c.llama_sampler_init_greedy())
            if not penalize:
                self.first_k = 1
                self.greedy = self._stateless = True
            elif _lowers_only(s):
                self.greedy = True
                self._window = collections.deque()
                self._last_n = last_n
                # Without a frequency penalty, llama.cpp's penalty is one float operation per
                # term, which numpy repeats bit for bit: the pick needs no call into the chain.
                self._exact = s.frequency_penalty == 0.0
                self._repeat = np.float32(s.repeat_penalty)
                self._presence = np.float32(s.presence_penalty)
            return
        seed = s.seed if s.seed is not None and s.seed >= 0 else random.getrandbits(31)
        if s.mirostat == 1:
            _add(chain, llama_c.llama_sampler_init_temp(s.temperature))
            _add(
                chain,
                llama_c.llama_sampler_init_mirostat(
                    self.n_vocab, seed & 0xFFFFFFFF, s.mirostat_tau, s.mirostat_eta, 100
                ),
            )
            return
        if s.mirostat == 2:
            _add(chain, llama_c.llama_sampler_init_temp(s.temperature))
            _add(
                chain,
                llama_c.llama_sampler_init_mirostat_v2(
                    seed & 0xFFFFFFFF, s.mirostat_tau, s.mirostat_eta
                ),
            )
            return
        if top_k:
            _add(chain, llama_c.llama_sampler_init_top_k(top_k))
            if not penalize:
                self.first_k = top_k
        if s.typical_p < 1.0:
            _add(chain, llama_c.llama_sampler_init_typical(s.typical_p, 1))
        if s.top_p < 1.0:
            _add(chain, llama_c.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0.0:
            _add(chain, llama_c.llama_sampler_init_min_p(s.min_p, 1))
        _add(chain, llama_c.llama_sampler_init_temp(s.temperature))
        _add(chain, llama_c.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    # -- sampling -----------------------------------------------------------------------------

    @property
    def shortcut(self) -> bool:
        """True when the chain's pick can be made from a row of logits read in place (no grammar,
        and greedy or starting with a top-k cut)."""
        return self.grammar is None and (self.greedy or self.first_k is not None)

    def sample(self, ctx: int, idx: int) -> int:
        """Pick the token for output ``idx`` of the last decode and accept it into the chain."""
        if self.grammar is None and not self.greedy and self.first_k is None:
            return int(llama_c.llama_sampler_sample(self.chain, ctx, idx))
        x = np.ctypeslib.as_array(llama_c.llama_get_logits_ith(ctx, idx), shape=(self.n_vocab,))
        if self.grammar is None:
            token = self.pick(x)
            self.accept(token)
            return token
        # Sample freely, then check the one token against the grammar: applying a grammar to the
        # whole vocabulary is slow, and most tokens a constrained model picks are allowed anyway.
        token = self.pick(x)
        g = self.grammar
        g.single[0].id, g.single[0].logit, g.single[0].p = token, 1.0, 0.0
        g.single_arr.size, g.single_arr.selected, g.single_arr.sorted = 1, -1, False
        llama_c.llama_sampler_apply(g.smpl, ctypes.byref(g.single_arr))
        if g.single[0].logit == _NEG_INF:
            token = self._apply(x, with_grammar=True)
        llama_c.llama_sampler_accept(g.smpl, token)
        self.accept(token)
        return token

    def sample_logits(self, logits: ctypes.Array) -> int:
        """Pick a token from a row of logits (``n_vocab`` floats) and accept it into the chain."""
        token = self.pick(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)))
        self.accept(token)
        return token

    def accept(self, token: int) -> None:
        """Tell the chain (and the mirror of its penalty window) which token was chosen."""
        if not self._stateless:
            llama_c.llama_sampler_accept(self.chain, token)
        window = self._window
        if window is not None:
            counts = self._counts
            if len(window) >= self._last_n:
                old = window.popleft()
                left = counts[old] - 1
                if left:
                    counts[old] = left
                else:
                    del counts[old]
            window.append(token)
            counts[token] = counts.get(token, 0) + 1

    def pick(self, x: np.ndarray, top: int | None = None) -> int:
        """The chain's choice over a row of logits (not accepted), through a shortcut where one
        holds; ``top`` is the row's largest logit's token when already known."""
        if self.greedy:
            return self._greedy(x, int(x.argmax()) if top is None else top)
        if self.first_k is not None:
            token = self._apply_top(x, self.first_k)
            if token is not None:
                return token
        return self._apply(x, with_grammar=False)

    def _greedy(self, x: np.ndarray, top: int) -> int:
        """The greedy pick given the largest logit's token ``top``: itself when no penalty lowers
        it; else the best of the penalized tokens and the best of the others, weighed in numpy
        (no frequency penalty) or by the chain in C."""
        counts = self._counts
        if self._window is None or top not in counts:
            return top
        held = np.fromiter(counts, dtype=np.int32, count=len(counts))
        if len(held) + 1 > _CAPACITY:
            return self._apply(x, with_grammar=False)
        saved = x[held]
        x[held] = _NEG_INF  # the logits row is read in place: put it back before anything else
        try:
            best = int(x.argmax())
        finally:
            x[held] = saved
        if self._exact:
            # llama.cpp's penalties: a logit <= 0 times the repeat penalty, above 0 divided by
            # it, less the presence penalty. Its greedy pick takes the first largest, and the
            # chain's top-k cut orders a penalized token before an unpenalized one of equal value.
            pen = np.where(saved <= 0, saved * self._repeat, saved / self._repeat)
            if self._presence:
                pen -= self._presence
            i = int(pen.argmax())
            return int(held[i]) if pen[i] >= x[best] else best
        ids = np.append(held, np.int32(best))
        return self._run(ids, x[ids])

    def _apply_top(self, x: np.ndarray, k: int) -> int | None:
        """Run the chain on a superset of the k largest logits; None when none was found cheaply."""
        if k * _STRIDE * 4 >= self.n_vocab:
            return None  # a small vocabulary: the whole of it costs as little
        sample = x[::_STRIDE]
        m = min(len(sample), k // _STRIDE + _MARGIN)
        threshold = np.partition(sample, len(sample) - m)[len(sample) - m]
        ids = np.flatnonzero(x >= threshold)
        if not k <= len(ids) <= _CAPACITY:
            return None
        return self._run(ids, x[ids])

    def _run(self, ids: np.ndarray, logits: np.ndarray) -> int:
        """Run the chain on the tokens ``ids`` (at most ``_CAPACITY``) with their logits."""
        if self._small is None:
            self._small = (llama_c.llama_token_data * _CAPACITY)()
            self._small_view = np.ctypeslib.as_array(self._small).view(_TOKEN_DATA)
            self._small_arr = llama_c.llama_token_data_array(
                data=self._small, size=0, selected=-1, sorted=False
            )
            self._small_ptr = ctypes.pointer(self._small_arr)
        n = len(ids)
        view = self._small_view[:n]
        view["id"] = ids
        view["logit"] = logits
        view["p"] = 0.0
        arr = self._small_arr
        arr.data, arr.size, arr.selected, arr.sorted = self._small, n, -1, False
        llama_c.llama_sampler_apply(self.chain, self._small_ptr)
        if arr.selected < 0:
            raise ValueError("the sampler chain selected no token")
        return int(arr.data[arr.selected].id)

    def _apply(self, x: np.ndarray, with_grammar: bool) -> int:
        if self._cur is None:
            self._cur = (llama_c.llama_token_data * self.n_vocab)()
            self._view = np.ctypeslib.as_array(self._cur).view(_TOKEN_DATA)
            self._ids = np.arange(self.n_vocab, dtype=np.int32)
        view = self._view
        view["id"] = self._ids
        view["logit"] = x
        view["p"] = 0.0
        arr = llama_c.llama_token_data_array(
            data=self._cur, size=self.n_vocab, selected=-1, sorted=False
        )
        if with_grammar and self.grammar is not None:
            llama_c.llama_sampler_apply(self.grammar.smpl, ctypes.byref(arr))
        llama_c.llama_sampler_apply(self.chain, ctypes.byref(arr))
        if arr.selected < 0:
            raise ValueError("the sampler chain selected no token")
        return int(arr.data[arr.selected].id)

    # -- log probabilities --------------------------------------------------------------------

    def logprob(
        self, ctx: int, idx: int, token: int, piece: bytes, pieces: Callable[[int], bytes]
    ) -> TokenLogprob:
        """The token's log probability under the model (before sampling tweaks) and its top rivals."""
        ptr = llama_c.llama_get_logits_ith(ctx, idx)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
        shifted = logits - logits.max()
        logp = shifted - math.log(float(np.exp(shifted).sum()))
        top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()
        k = self.logprobs or 0
        if k > 0:
            ids = np.argpartition(-logp, k)[:k]
            ids = ids[np.argsort(-logp[ids])]
            top = tuple(
                (
                    pieces(int(i)).decode("utf-8", errors="replace"),
                    float(logp[i]),
                    tuple(pieces(int(i))),
                )
                for i in ids
            )
        return TokenLogprob(
            piece.decode("utf-8", errors="replace"), float(logp[token]), tuple(piece), top
        )

    def close(self) -> None:
        """Free the chain and grammar."""
        if self.chain:
            llama_c.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar is not None:
            llama_c.llama_sampler_free(self.grammar.smpl)
            self.grammar = None


class StepLogits:
    """The logits of the last decode as one ``(rows, n_vocab)`` array, read in place.

    llama.cpp stores the rows of the outputs a batch asked for contiguously, in batch order
    (``llama_get_logits``); the view of them is made once per buffer address and row count, not
    once per token.
    """

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self._views: dict[tuple[int, int], np.ndarray] = {}

    def rows(self, ctx: int, n_rows: int) -> np.ndarray | None:
        """The rows of the last decode's ``n_rows`` outputs; None where llama.cpp has none."""
        base = _get_logits(ctx)
        if not base:
            return None
        view = self._views.get((base, n_rows))
        if view is None:
            if len(self._views) > 64:
                self._views.clear()  # the buffer moved (llama.cpp grew it): forget old addresses
            buf = (ctypes.c_float * (n_rows * self.n_vocab)).from_address(base)
            view = np.ctypeslib.as_array(buf).reshape(n_rows, self.n_vocab)
            self._views[(base, n_rows)] = view
        return view


# ``llama_get_logits`` returning the address as an int (its own function object, so that
# llama_cpp's keeps its types).
_get_logits = llama_c._lib["llama_get_logits"]
_get_logits.argtypes, _get_logits.restype = [ctypes.c_void_p], ctypes.c_void_p


def sample_rows(ctx: int, x: np.ndarray | None, picks: list[tuple[Sampler, int, int]]) -> list[int]:
    """Pick and accept the next token of each ``(sampler, batch index, row of x)``.

    Rows are read in place from ``x`` (the step's logits); the largest logits of greedy rows are
    found in one vectorized pass. Each chain still runs with its own options and state. (Finding
    the candidates of several top-k rows in one pass saved nothing: the chain's own work in C
    dominates those.)
    """
    tokens = [0] * len(picks)
    greedy: list[int] = []
    for i, (s, idx, r) in enumerate(picks):
        if x is None or not s.shortcut:
            tokens[i] = s.sample(ctx, idx)
        elif s.greedy:
            greedy.append(i)
        else:
            tokens[i] = token = s.pick(x[r])
            s.accept(token)
    if greedy:
        assert x is not None
        rows = [picks[i][2] for i in greedy]
        if len(rows) > 1 and rows == list(range(rows[0], rows[0] + len(rows))):
            best = x[rows[0] : rows[0] + len(rows)].argmax(axis=1).tolist()
        else:
            best = [int(x[r].argmax()) for r in rows]
        for i, r, b in zip(greedy, rows, best, strict=True):
            s = picks[i][0]
            tokens[i] = token = s._greedy(x[r], b)
            s.accept(token)
    return tokens
