"""Continuous batching: up to N requests decoded together, one ``llama_decode`` per step.

Each request holds a slot (a llama.cpp sequence id) while it runs. A step puts into one batch the
next token of every request that is generating and, within a budget, a chunk of the prompt of
requests still prefilling, so that a long prompt does not stall the others for its whole prefill.
New requests take a free slot at the next step; finished or cancelled ones leave and free it at
once. Slots keep what their last request left in the KV cache: a new request whose prompt starts
with tokens a slot holds (the same system prompt, the previous turn of a chat) reuses them, and
can copy a shared prefix from another slot's cells, instead of recomputing it.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import logging
import os
import queue
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from offload.planner.errors import OffloadError
from offload.runtime.errors import ContextTooLong
from offload.runtime.runner import FAULT_ENV
from offload.runtime.runner.engine import Engine
from offload.runtime.runner.generation import Sampling, StopScanner, TokenLogprob
from offload.runtime.runner.native import llama_c
from offload.runtime.runner.sampling import Sampler, StepLogits, sample_rows

__all__ = ["BatchLoop", "Job", "fit_prompt"]

log = logging.getLogger(__name__)

Send = Callable[[list[dict[str, Any]]], None]

# A chunk of prompt is kept to about this long (or twice a decode step) while others decode.
STALL_TARGET_S = 0.2
MIN_CHUNK = 32
# A prefix held by another slot is copied when it saves at least this many tokens of prefill.
MIN_SHARED_PREFIX = 16
# llama.cpp attends over every KV cell up to the highest one in use, rounded up to this many.
CELL_PAD = 256
# The most KV state an idle runner copies out and back to move the caches it keeps to the lowest
# cells (beyond it, they stay where they are).
COMPACT_MAX_BYTES = 512 << 20


def fit_prompt(
    tokens: list[int], n_ctx: int, num_predict: int, truncate: bool, bos: int
) -> list[int]:
    """``tokens`` cut to leave room in a context of ``n_ctx`` (keeping BOS and the end), or
    ``ContextTooLong`` when truncation was refused."""
    room = n_ctx - 1
    if len(tokens) <= room:
        return tokens
    if not truncate:
        raise ContextTooLong(
            f"the prompt is {len(tokens)} tokens but the context holds {n_ctx}; "
            "raise num_ctx or allow truncation"
        )
    keep = max(room - max(min(num_predict, room // 4), 0), 1) if num_predict > 0 else room * 3 // 4
    head = tokens[:1] if tokens and tokens[0] == bos else []
    return head + tokens[len(tokens) - (keep - len(head)) :]


def _fault_after_tokens() -> tuple[str, int] | None:
    """The test-only switch (``engine.FAULT_ENV``): ``crash-after-tokens=N``/``hang-after-tokens=N``."""
    value = os.environ.get(FAULT_ENV, "")
    for kind in ("crash", "hang"):
        if value.startswith(f"{kind}-after-tokens="):
            return kind, int(value.split("=", 1)[1])
    return None


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Slot:
    """A llama.cpp sequence and the tokens whose KV it holds (positions 0..len-1)."""

    seq: int
    cached: list[int] = field(default_factory=list)
    job: Job | None = None
    last_used: float = 0.0


@dataclass
class Job:
    """A generation request inside the runner."""

    id: int
    prompt: list[int]
    sampling: Sampling
    truncate: bool = True
    want_tokens: bool = False
    ignore_eos: bool = False
    cancelled: bool = False
    slot: Slot | None = None
    sampler: Sampler | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet evaluated
    feeding: int = 0  # prompt tokens in the current step
    reused: int = 0
    generated: list[int] = field(default_factory=list)
    next_token: int | None = None  # sampled and sent, not yet in the cache
    scanner: StopScanner | None = None
    decoder: Any = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    t_admit: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0
    max_gap_s: float = 0.0
    alone: bool = True  # no step of this request held another request's tokens
    stopping: str | None = None  # ends (with this done_reason) once the step in flight is applied

    @property
    def limit(self) -> int:
        n = self.sampling.num_predict
        return n if n >= 0 else 1 << 30


class BatchLoop:
    """Serves generation and embedding requests on one engine from one thread.

    ``post`` may be called from any thread; everything else runs on the loop's thread, which owns
    the llama.cpp context.
    """

    def __init__(self, engine: Engine, send: Send) -> None:
        self.engine = engine
        self.send = send
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.slots = [Slot(i) for i in range(engine.n_slots)]
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []
        self.jobs: dict[int, Job] = {}
        self.out: list[dict[str, Any]] = []
        self.prompt_tps = engine.prompt_tps_hint
        self.decode_step_s = 0.0
        self.steps: collections.deque[tuple[int, int, float]] = collections.deque(maxlen=4096)
        self.running = True
        self._fault = _fault_after_tokens()
        self._tokens_out = 0
        # Where llama_decode returns before the device has finished (a GPU), sending the tokens of
        # the last step (detokenizing, stop strings, the socket) waits until the next step is
        # launched, so that it overlaps the device's work; on the CPU it would only delay them.
        self.pipelined = engine.decode_async
        self._unsent: list[tuple[Job, int, TokenLogprob | None]] = []
        self.logits = StepLogits(engine.n_vocab)
        self._high = 0  # the most cells held at once since the cache was last compacted
        self.compactions = 0

    # -- from other threads ----------------------------------------------------------------------

    def post(self, kind: str, payload: Any) -> None:
        """Hand the loop a message: ("generate", Job), ("cancel", id), ("call", fn), ("stop", None)."""
        self.inbox.put((kind, payload))

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until a ``stop`` message."""
        last_sent = time.monotonic()
        while self.running:
            idle = not (self.active or self.waiting)
            if idle and self.inbox.empty():
                self._compact()
            self._drain(block=idle)
            if self.active or self.waiting:
                self.step()
            now = time.monotonic()
            if self.out:
                last_sent = now
            elif self.active and now - last_sent >= 1.0:
                # A long prefill sends nothing for a while: tell the server the runner is alive.
                self.out.append({"ev": "tick"})
                last_sent = now
            self._flush()

    def _drain(self, block: bool) -> None:
        while True:
            try:
                kind, payload = self.inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if kind == "generate":
                self._submit(payload)
            elif kind == "cancel":
                self._cancel(payload)
            elif kind == "call":
                payload()
            elif kind == "stop":
                self.running = False
                return

    def _submit(self, job: Job) -> None:
        e = self.engine
        try:
            e.check_tokens(job.prompt)
            if not job.prompt:
                job.prompt = [e.bos if e.bos >= 0 else 0]
            job.prompt = fit_prompt(
                job.prompt, e.n_ctx, job.sampling.num_predict, job.truncate, e.bos
            )
            job.sampler = Sampler(job.sampling, e.vocab, e.n_vocab, e.n_ctx)
        except (OffloadError, ValueError) as exc:
            self._error(job.id, exc)
            return
        job.scanner = StopScanner(job.sampling.stop)
        job.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.jobs[job.id] = job
        self.waiting.append(job)

    def _cancel(self, job_id: int) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            return
        job.cancelled = True
        if job in self.waiting:
            self.waiting.remove(job)
            self._finish(job, "cancel")

    def _error(self, job_id: int, exc: BaseException, kind: str | None = None) -> None:
        kind = kind or (type(exc).__name__ if isinstance(exc, OffloadError) else "BadRequest")
        self.out.append({"ev": "error", "id": job_id, "kind": kind, "message": str(exc)})

    def _flush(self) -> None:
        if self.out:
            out, self.out = self.out, []
            self.send(out)

    # -- admitting requests ----------------------------------------------------------------------

    def _admit(self) -> None:
        while self.waiting:
            free = [s for s in self.slots if s.job is None]
            if not free:
                return
            job = self.waiting.popleft()
            self._place(job, free)
            self.active.append(job)
            self._trim_idle()

    def _trim_idle(self) -> None:
        """Drop the caches of idle slots, least recently used first, while they hold more cells
        than the running requests and more than one sequence's context. llama.cpp attends over
        every cell up to the highest one in use, so the caches finished requests leave behind
        would slow every running stream (a 1-stream round after a 16-stream one ran at 0.64 of a
        fresh cache on a 2-core CPU); one conversation's worth stays for the next turn."""
        idle = sorted(
            (s for s in self.slots if s.job is None and s.cached), key=lambda s: s.last_used
        )
        held = sum(len(s.cached) for s in idle)
        running = sum(len(s.cached) + len(s.job.pending) for s in self.slots if s.job is not None)
        keep = max(running, self.engine.n_ctx)
        for slot in idle:
            if held <= keep:
                break
            llama_c.llama_memory_seq_rm(self.engine.mem, slot.seq, 0, -1)
            held -= len(slot.cached)
            slot.cached = []

    def _compact(self) -> None:
        """Move the caches an idle runner keeps to the lowest cells.

        The requests of a burst decode together, so their cells interleave over every cell the
        burst used; the conversations kept after it stay scattered over that range, and every
        later request attends over all of it (one stream after a burst of 16 decoded at 0.66 of
        a fresh cache on a 2-core CPU; compacted, at 0.96). When the cells in use could shrink
        by at least one of llama.cpp's blocks, the context's state is copied out and read back,
        which places the cells in use from the first one. Done while nothing runs or waits;
        beyond ``COMPACT_MAX_BYTES`` of state the cells stay where they are.
        """
        e = self.engine
        if e.recurrent:
            return
        self._trim_idle()  # what the next request's admission would keep of them anyway
        kept = [s for s in self.slots if s.cached]
        held = sum(len(s.cached) for s in kept)
        if -(-self._high // CELL_PAD) <= -(-held // CELL_PAD):
            return
        self._high = held
        # The whole context's state (the cells in use, in cell order, with their sequences) is
        # read back from the first cell on. Copying each sequence apart would not do: restoring
        # one may reuse cells a sliding-window layer no longer attends to, of one restored before.
        size = int(llama_c.llama_state_get_size(e.ctx))
        if size > COMPACT_MAX_BYTES:
            return
        buf = (ctypes.c_uint8 * size)()
        got = int(llama_c.llama_state_get_data(e.ctx, buf, size))
        if not got or int(llama_c.llama_state_set_data(e.ctx, buf, got)) != got:
            llama_c.llama_memory_clear(e.mem, False)  # nothing half restored stays in use
            for slot in self.slots:
                slot.cached = []
        self._high = sum(len(s.cached) for s in self.slots)
        self.compactions += 1

    def _place(self, job: Job, free: list[Slot]) -> None:
        """Give ``job`` the free slot holding the longest prefix of its prompt (least recently used
        on a tie), copying a longer prefix from another slot when that saves real work."""
        e, prompt = self.engine, job.prompt
        slot = max(free, key=lambda s: (_common(s.cached, prompt), -s.last_used))
        reuse = _common(slot.cached, prompt)
        if not e.recurrent:
            donors = [s for s in self.slots if s is not slot and s.cached]
            donor = max(donors, key=lambda s: _common(s.cached, prompt), default=None)
            if donor is not None:
                shared = min(_common(donor.cached, prompt), len(donor.cached))
                if shared >= reuse + MIN_SHARED_PREFIX:
                    llama_c.llama_memory_seq_rm(e.mem, slot.seq, 0, -1)
                    llama_c.llama_memory_seq_cp(e.mem, donor.seq, slot.seq, 0, shared)
                    slot.cached = donor.cached[:shared]
                    reuse = shared
        # At least one prompt token is evaluated: its logits choose the first answer token.
        reuse = min(reuse, len(prompt) - 1)
        if not llama_c.llama_memory_seq_rm(e.mem, slot.seq, reuse, -1):
            reuse = 0  # a recurrent state cannot be cut back: start the sequence over
        if reuse and llama_c.llama_memory_seq_pos_min(e.mem, slot.seq) > 0:
            reuse = 0  # the cache dropped early positions (sliding window): they cannot be reused
        if reuse == 0:
            llama_c.llama_memory_seq_rm(e.mem, slot.seq, 0, -1)
        slot.cached = slot.cached[:reuse]
        slot.job = job
        job.slot = slot
        job.reused = reuse
        job.pending = prompt[reuse:]
        job.t_admit = time.perf_counter()

    # -- one step ----------------------------------------------------------------------------------

    def _chunk(self) -> int:
        """Prompt tokens a step may take while other requests are decoding."""
        target = max(STALL_TARGET_S, 2 * self.decode_step_s)
        if self.prompt_tps <= 0:
            return min(self.engine.n_ubatch, 128)
        n = int(target * self.prompt_tps) // 16 * 16
        return max(MIN_CHUNK, min(self.engine.n_ubatch, n))

    def step(self) -> None:
        """Admit, build one batch, decode it, sample and send."""
        e = self.engine
        t_step = time.perf_counter()
        for job in [j for j in self.active if j.cancelled]:
            self._finish(job, "cancel")  # first, so that a waiting request takes the slot now
        self._admit()
        b = e.batch
        n = 0
        outputs: list[tuple[Job, int]] = []
        fed: list[tuple[Job, int]] = []  # (request, token) decoded this step
        for job in list(self.active):
            if job.next_token is None:
                continue
            slot = job.slot
            assert slot is not None
            if len(slot.cached) >= e.n_ctx:
                self._finish(job, "length")
                continue
            b.token[n], b.pos[n], b.seq[n], b.logits[n] = (
                job.next_token,
                len(slot.cached),
                slot.seq,
                1,
            )
            outputs.append((job, n))
            fed.append((job, job.next_token))
            job.next_token = None
            n += 1
        decoding = len(fed)
        budget = e.n_batch - n
        if decoding:
            budget = min(budget, self._chunk())
        prefill = 0
        for job in self.active:
            job.feeding = 0
            if not job.pending or budget <= 0:
                continue
            slot = job.slot
            assert slot is not None
            take = job.pending[:budget]
            k = len(take)
            start = len(slot.cached)
            b.token[n : n + k] = take
            b.pos[n : n + k] = np.arange(start, start + k, dtype=np.int32)
            b.seq[n : n + k] = slot.seq
            b.logits[n : n + k] = 0
            if k == len(job.pending):
                b.logits[n + k - 1] = 1
                outputs.append((job, n + k - 1))
            job.feeding = k
            n += k
            budget -= k
            prefill += k
        if n == 0:
            self._send_unsent()
            self._finish_stopping()
            return
        together = [j for j, _ in fed] + [j for j in self.active if j.feeding]
        if len(together) > 1:
            for j in together:
                j.alone = False
        rc = b.decode(e.ctx, n)
        if self.pipelined:  # last step's tokens, sent while the device works on this one
            self._send_unsent()
            self._flush()
        if rc != 0:
            for job, token in fed:  # nothing of the step was applied: feed it again next step
                if job.next_token is None and not job.stopping:
                    job.next_token = token
            self._decode_failed(rc, together)
            return
        if self.pipelined and outputs:
            # The step's times are of its end, not of its launch: a prompt's evaluation would
            # otherwise count as the time of its first answer token.
            e.synchronize()
        now = time.perf_counter()
        for job, token in fed:
            assert job.slot is not None
            job.slot.cached.append(token)
        for job in self.active:
            slot = job.slot
            assert slot is not None
            if job.feeding:
                slot.cached.extend(job.pending[: job.feeding])
                del job.pending[: job.feeding]
                job.feeding = 0
            slot.last_used = now
        held = sum(len(s.cached) for s in self.slots)
        if held > self._high:
            self._high = held
        self._finish_stopping()
        picks: list[tuple[Job, int, int]] = []  # (request, batch index, row of the logits)
        for row, (job, idx) in enumerate(outputs):
            if job in self.active and not job.stopping and self._due(job, now):
                picks.append((job, idx, row))
        if picks:
            rows = self.logits.rows(e.ctx, len(outputs))
            tokens = sample_rows(e.ctx, rows, [(j.sampler, i, r) for j, i, r in picks])  # type: ignore[misc]
            for (job, idx, _), token in zip(picks, tokens, strict=True):
                self._sampled(job, idx, token)
        # The whole step, sampling included (where llama_decode returns early, it is sampling that
        # waits for the device): what a stream between two of its tokens sees.
        self._measure(decoding, prefill, time.perf_counter() - t_step)

    def _measure(self, decoding: int, prefill: int, dt: float) -> None:
        self.steps.append((decoding, prefill, dt))
        if prefill >= MIN_CHUNK:
            rate = prefill / dt if dt > 0 else 0.0
            self.prompt_tps = rate if self.prompt_tps <= 0 else 0.7 * self.prompt_tps + 0.3 * rate
        elif decoding and not prefill:
            self.decode_step_s = (
                dt if self.decode_step_s <= 0 else 0.9 * self.decode_step_s + 0.1 * dt
            )

    def _decode_failed(self, rc: int, jobs: list[Job]) -> None:
        """No KV cell left (1): end the request holding the most cells and retry the others next
        step; anything else fails every request in the batch."""
        e = self.engine
        if rc == 1 and jobs:
            victim = max(jobs, key=lambda j: len(j.slot.cached) if j.slot else 0)
            log.warning("KV cache full: ending request %d early", victim.id)
            for j in jobs:
                j.feeding = 0
            self._finish(victim, "length")
            return
        for job in jobs:
            job.feeding = 0
            self._error(
                job.id,
                RuntimeError(f"llama.cpp could not evaluate the batch (code {rc})"),
                "RuntimeFailure",
            )
            self._release(job)
            if job.slot is not None:
                llama_c.llama_memory_seq_rm(e.mem, job.slot.seq, 0, -1)
                job.slot.cached = []

    # -- sampling and sending ----------------------------------------------------------------------

    def _due(self, job: Job, now: float) -> bool:
        """Account for a step that gave ``job`` logits; False when it has reached its limit."""
        if not job.t_first:
            job.t_first = now
        elif job.t_last:
            job.max_gap_s = max(job.max_gap_s, now - job.t_last)
        job.t_last = now
        if len(job.generated) >= job.limit:
            self._finish(job, "length")
            return False
        return True

    def _sampled(self, job: Job, idx: int, token: int) -> None:
        e = self.engine
        assert job.sampler is not None and job.scanner is not None
        if not job.ignore_eos and e.is_eog(token):
            self._finish(job, "stop")
            return
        job.generated.append(token)
        if self._fault is not None:
            self._tokens_out += 1
            if self._tokens_out >= self._fault[1]:
                self._flush()
                if self._fault[0] == "crash":
                    os.kill(os.getpid(), signal.SIGSEGV)
                while True:
                    time.sleep(3600)
        # Log probabilities come from this step's logits, which the next step overwrites.
        lp = (
            job.sampler.logprob(e.ctx, idx, token, e.piece(token), e.piece)
            if job.sampling.logprobs is not None
            else None
        )
        done = len(job.generated) >= job.limit
        if self.pipelined:
            self._unsent.append((job, token, lp))
            if done:
                job.stopping = "length"
            else:
                job.next_token = token
            return
        if self._send(job, token, lp):
            self._finish(job, "stop")
        elif done:
            self._finish(job, "length")
        else:
            job.next_token = token

    def _send(self, job: Job, token: int, lp: TokenLogprob | None) -> bool:
        """Turn a sampled token into text for the client; True when it completed a stop string."""
        assert job.scanner is not None
        if lp is not None:
            job.logprobs.append(lp)
        text, hit = job.scanner.feed(job.decoder.decode(self.engine.piece(token)))
        if text:
            self._piece(job, text)
        return hit

    def _send_unsent(self) -> None:
        """Send the tokens sampled last step (pipelined mode); a stop string ends its request once
        the step in flight, which may hold one more of its tokens, is applied."""
        if not self._unsent:
            return
        unsent, self._unsent = self._unsent, []
        for job, token, lp in unsent:
            if job.stopping == "stop" or job not in self.active:
                continue  # cancelled meanwhile, or a stop string already ended it
            if self._send(job, token, lp):
                job.stopping = "stop"
                job.next_token = None

    def _finish_stopping(self) -> None:
        for job in [j for j in self.active if j.stopping]:
            self._finish(job, job.stopping or "stop")

    def _piece(self, job: Job, text: str) -> None:
        ev: dict[str, Any] = {"ev": "piece", "id": job.id, "text": text}
        if job.logprobs:
            ev["logprobs"] = [t.to_dict() for t in job.logprobs]
            job.logprobs = []
        self.out.append(ev)

    def _finish(self, job: Job, reason: str) -> None:
        end = time.perf_counter()
        if reason != "cancel" and job.scanner is not None:
            tail = job.scanner.flush() + job.decoder.decode(b"", final=True)
            if tail or job.logprobs:
                self._piece(job, tail)
        t_first = job.t_first or end
        stats: dict[str, Any] = {
            "prompt_eval_count": len(job.prompt) - job.reused if job.t_admit else 0,
            "prompt_eval_s": (t_first - job.t_admit) if job.t_admit else 0.0,
            "eval_count": len(job.generated),
            "eval_s": end - t_first if job.t_first else 0.0,
            "done_reason": reason,
            "cached_tokens": job.reused,
            "max_gap_s": job.max_gap_s,
            "alone": job.alone,
            "stop_sequence": job.scanner.hit
            if job.scanner is not None and reason == "stop"
            else None,
        }
        if job.want_tokens:
            stats["prompt_tokens"] = job.prompt
            stats["tokens"] = job.generated
        self.out.append({"ev": "done", "id": job.id, "stats": stats})
        self._release(job)

    def _release(self, job: Job) -> None:
        if job.sampler is not None:
            job.sampler.close()
            job.sampler = None
        if job.slot is not None:
            job.slot.job = None
            job.slot.last_used = time.perf_counter()
        if job in self.active:
            self.active.remove(job)
        self.jobs.pop(job.id, None)
