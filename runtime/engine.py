"""The executor: one llama.cpp model and context, loaded exactly as a ``Plan`` says.

With ``native_llama`` (log capture, ctypes overrides, plan checks) the only modules that import
``llama_cpp``. It turns a plan into llama.cpp parameters, streams tokens with Ollama's timing
fields, and stops cleanly on a stop string, end of generation, the token limit, a full context or
a cancel event.
"""

from __future__ import annotations

import codecs
import ctypes
import gc
import logging
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import llama_cpp as llama_c

from offload.planner.types import Plan
from offload.runtime import buffers
from offload.runtime.errors import ContextTooLong, LoadFailed, OutOfMemory
from offload.runtime.generation import Piece, Sampling, Stats, StopScanner, TokenLogprob
from offload.runtime.native_llama import (
    _SPLIT,
    LOAD_LOCK,
    captured_log,
    check_applicable,
    gpu_device_count,
    overrides_array,
    patched_defaults,
)

__all__ = ["Sampling", "Piece", "Stats", "Engine", "BatchTiming", "llama_params", "KV_TYPES", "check_applicable",
           "gpu_device_count"]

log = logging.getLogger(__name__)

KV_TYPES = {"f16": llama_c.GGML_TYPE_F16, "q8_0": llama_c.GGML_TYPE_Q8_0, "q4_0": llama_c.GGML_TYPE_Q4_0, "f32": llama_c.GGML_TYPE_F32}


def llama_params(plan: Plan) -> dict[str, Any]:
    """The ``llama_cpp.Llama`` keyword arguments that apply a plan (overrides are applied apart)."""
    if plan.kv_type not in KV_TYPES:
        raise LoadFailed(f"plan asks for KV cache type {plan.kv_type!r}; known: {', '.join(KV_TYPES)}")
    params: dict[str, Any] = {
        "n_gpu_layers": plan.n_gpu_layers,
        "split_mode": _SPLIT[plan.split_mode],
        "main_gpu": plan.main_gpu,
        "tensor_split": list(plan.tensor_split) or None,
        "use_mmap": plan.use_mmap,
        "use_mlock": plan.use_mlock,
        # The plan's n_ctx is per sequence (Ollama's num_ctx); llama.cpp splits its context
        # evenly between n_seq_max sequences.
        "n_ctx": plan.n_ctx * max(1, plan.n_parallel),
        "n_batch": plan.n_batch,
        "n_ubatch": plan.n_ubatch,
        "n_threads": plan.threads,
        "n_threads_batch": plan.threads_batch,
        "offload_kqv": plan.offload_kqv,
        "flash_attn": plan.flash_attn,
        "op_offload": plan.op_offload,
        "type_k": KV_TYPES[plan.kv_type],
        "type_v": KV_TYPES[plan.kv_type],
    }
    return params


@dataclass(frozen=True)
class BatchTiming:
    """Timings of ``Engine.run_batch``: one prompt, then ``n_seq`` sequences decoded together."""

    n_seq: int
    prompt_tokens: int
    prompt_s: float
    ttft_s: float  # prompt evaluated and the first token chosen
    tokens: int  # generated, all sequences together
    decode_s: float
    step_s: tuple[float, ...] = ()  # wall time of each decode step

    @property
    def decode_tps_median(self) -> float:
        """Generated tokens per second from the median step: robust to a step the OS delayed."""
        if not self.step_s:
            return self.decode_tps
        steps = sorted(self.step_s)
        mid = steps[len(steps) // 2] if len(steps) % 2 else (steps[len(steps) // 2 - 1] + steps[len(steps) // 2]) / 2
        return self.n_seq / mid if mid > 0 else 0.0

    @property
    def prompt_tps(self) -> float:
        """Prompt tokens per second."""
        return self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        """Generated tokens per second, all sequences together."""
        return self.tokens / self.decode_s if self.decode_s > 0 else 0.0


class Engine:
    """A loaded model and context; one generation at a time (callers serialise).

    ``measured_bytes`` is what llama.cpp reported allocating, per device (``"CPU"``, ``"CUDA0"``...)
    and kind (``weights``, ``kv``, ``compute``), to set beside ``plan.devices``' predictions.
    """

    def __init__(self, llm: llama_cpp.Llama, plan: Plan, model_path: Path, load_s: float,
                 log_lines: Sequence[str] = (), keep_alive: Any = None) -> None:
        self.llm = llm
        self.plan = plan
        self.model_path = model_path
        self.load_s = load_s
        self.lock = threading.Lock()
        self._vocab = llm._model.vocab
        self.load_log: list[str] = list(log_lines)
        self.measured_bytes: dict[str, dict[str, int]] = buffers.measured_bytes(self.load_log)
        self.overridden_tensors: dict[str, str] = buffers.overridden_tensors(self.load_log)
        # llama.cpp keeps a pointer to the override array for the model's life.
        self._keep_alive = keep_alive
        # What a healing load gave up to fit (sentences for the user; empty when the plan fitted).
        self.gave_up: list[str] = []

    @classmethod
    def load(cls, model_path: Path | str, plan: Plan, adapters: Sequence[Path] = (),
             embedding: bool = False, check: bool = True, verify_decode: bool = False) -> Engine:
        """Load the model exactly as ``plan`` says.

        Raises ``PlanNotApplicable`` before loading when the plan cannot be applied, ``OutOfMemory``
        when llama.cpp ran out of memory (loading, or the first decode with ``verify_decode``), and
        ``LoadFailed`` with llama.cpp's reason otherwise. Nothing stays allocated after a failure.
        """
        model_path = Path(model_path)
        if check:
            check_applicable(plan, model_path)
        t0 = time.perf_counter()
        kwargs = llama_params(plan)
        if adapters:
            if len(adapters) > 1:
                raise LoadFailed("only one LoRA adapter per model is supported")
            kwargs["lora_path"] = str(adapters[0])
        # Without mmap, llama.cpp keeps CPU layers in the GPU's pinned host buffer; overridden
        # tensors follow them there, so op offload copies all CPU-resident weights at full speed.
        overrides = overrides_array(plan.cpu_tensor_patterns, pinned=not plan.use_mmap)
        llm: llama_cpp.Llama | None = None
        with LOAD_LOCK, captured_log() as lines:
            try:
                with patched_defaults(overrides, max(1, plan.n_parallel)):
                    llm = llama_cpp.Llama(str(model_path), embedding=embedding, verbose=False, **kwargs)
                engine = cls(llm, plan, model_path, time.perf_counter() - t0, lines, overrides)
                if verify_decode:
                    engine._verify_decode()
            except (ValueError, RuntimeError, OSError, MemoryError) as e:
                if llm is not None:
                    llm.close()
                llm = None
                # A half-built Llama holds the model until collected; free it before a retry.
                gc.collect()
                reason = next((ln.strip() for ln in lines if buffers.is_out_of_memory([ln])), str(e))
                if isinstance(e, MemoryError) or buffers.is_out_of_memory(lines):
                    raise OutOfMemory(f"not enough memory for this plan of {model_path.name}: {reason}") from None
                raise LoadFailed(f"llama.cpp could not load {model_path}: {e}") from None
            engine.load_log = list(lines)
        return engine

    def _verify_decode(self) -> None:
        """Decode one full micro-batch so compute buffers that allocate lazily fail now, not mid-request."""
        llm = self.llm
        n = max(1, min(self.plan.n_ubatch, self.n_ctx - 1, 512))
        tok = llm.token_bos() if llm.token_bos() >= 0 else 0
        try:
            llm.eval([tok] * n)
        finally:
            llm.reset()
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)

    def memory_report(self) -> dict[str, Any]:
        """Predicted and measured bytes per device, for ``/api/ps`` and ``offload ps``."""
        predicted = {
            d.name if d.kind == "CPU" else f"CUDA{d.index}": {
                "weights": d.weights_bytes, "kv": d.kv_bytes, "compute": d.compute_bytes + d.overhead_bytes,
                "budget": d.budget_bytes,
            }
            for d in self.plan.devices
        }
        return {"predicted": predicted, "measured": self.measured_bytes,
                "cpu_tensor_overrides": len(self.overridden_tensors), "gave_up": list(self.gave_up)}

    def run_batch(self, n_seq: int, prompt: Sequence[int], gen_tokens: int) -> BatchTiming:
        """Evaluate ``prompt`` once, then decode ``gen_tokens`` greedily for ``n_seq`` sequences at once.

        Sequences 1.. start from a copy of sequence 0's cache; each decode step is one llama.cpp
        batch holding one token of every sequence (real batched decoding, not streams in turn).
        End-of-generation tokens are not honoured: a benchmark wants exactly ``gen_tokens``.
        """
        if n_seq > max(1, self.plan.n_parallel):
            raise LoadFailed(f"{n_seq} sequences need a context loaded with n_parallel >= {n_seq}")
        llm = self.llm
        ctx = llm._ctx.ctx
        mem = llama_c.llama_get_memory(ctx)
        llama_c.llama_memory_clear(mem, True)
        llm.reset()
        prompt = list(prompt)[: max(1, self.n_ctx - gen_tokens - 1)]
        n_vocab = llama_c.llama_vocab_n_tokens(self._vocab)
        chunk = max(1, min(self.plan.n_batch, len(prompt)))
        batch = llama_c.llama_batch_init(max(chunk, n_seq), 0, n_seq)

        def logits_row(i: int) -> np.ndarray:
            return np.ctypeslib.as_array(llama_c.llama_get_logits_ith(ctx, i), shape=(n_vocab,))

        try:
            t0 = time.perf_counter()
            for start in range(0, len(prompt), chunk):  # llama_decode takes at most n_batch tokens
                part = prompt[start : start + chunk]
                batch.n_tokens = len(part)
                for i, t in enumerate(part):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, start + i, 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = start + i == len(prompt) - 1
                if llama_c.llama_decode(ctx, batch) != 0:
                    raise LoadFailed("the prompt decode failed")
            first = int(logits_row(len(prompt) - 1 - (len(prompt) - 1) // chunk * chunk).argmax())
            t1 = time.perf_counter()
            for s in range(1, n_seq):
                llama_c.llama_memory_seq_cp(mem, 0, s, -1, -1)
            nxt = [first] * n_seq
            pos = len(prompt)
            steps: list[float] = []
            for _ in range(gen_tokens):
                ts = time.perf_counter()
                batch.n_tokens = n_seq
                for s in range(n_seq):
                    batch.token[s], batch.pos[s], batch.n_seq_id[s] = nxt[s], pos, 1
                    batch.seq_id[s][0] = s
                    batch.logits[s] = True
                if llama_c.llama_decode(ctx, batch) != 0:
                    raise LoadFailed(f"batched decode of {n_seq} sequences failed")
                nxt = [int(logits_row(s).argmax()) for s in range(n_seq)]
                pos += 1
                steps.append(time.perf_counter() - ts)
            t2 = time.perf_counter()
        finally:
            llama_c.llama_batch_free(batch)
            llama_c.llama_memory_clear(mem, True)
        return BatchTiming(n_seq=n_seq, prompt_tokens=len(prompt), prompt_s=t1 - t0, ttft_s=t1 - t0,
                           tokens=n_seq * gen_tokens, decode_s=t2 - t1, step_s=tuple(steps))

    # -- tokens --------------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        """The context length of one sequence in tokens."""
        # llama.cpp pads a small context up (to 256), but llama-cpp-python sizes its token
        # buffer to the n_ctx asked for: the smaller of the two is what we can really use. With
        # n_parallel sequences in one unified cache, each still gets the plan's n_ctx (num_ctx).
        return min(int(llama_c.llama_n_ctx_seq(self.llm._ctx.ctx)), len(self.llm.input_ids), self.plan.n_ctx)

    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """Text to token ids; special tokens in the text (template markers) are parsed as such."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Token ids to text."""
        return self.llm.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = llama_c.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[: max(n, 0)]

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, EOT, <end_of_turn> ...)."""
        return bool(llama_c.llama_vocab_is_eog(self._vocab, token))

    # -- generation ----------------------------------------------------------------------------

    def _fit_prompt(self, tokens: list[int], num_predict: int, truncate: bool) -> list[int]:
        room = self.n_ctx - 1
        if len(tokens) <= room:
            return tokens
        if not truncate:
            raise ContextTooLong(
                f"the prompt is {len(tokens)} tokens but the context holds {self.n_ctx}; "
                "raise num_ctx or allow truncation"
            )
        keep = max(room - max(min(num_predict, room // 4), 0), 1) if num_predict > 0 else room * 3 // 4
        bos = tokens[:1] if tokens and tokens[0] == self.llm.token_bos() else []
        return bos + tokens[len(tokens) - (keep - len(bos)) :]

    def _prefill(self, tokens: list[int]) -> int:
        """Evaluate ``tokens``, reusing the cached prefix when llama.cpp allows; returns reused count."""
        llm = self.llm
        reuse = 0
        for a, b in zip(llm.input_ids[: llm.n_tokens], tokens[:-1], strict=False):
            if a != b:
                break
            reuse += 1
        if reuse and llm._ctx.kv_cache_seq_rm(-1, reuse, -1):
            llm.n_tokens = reuse
        else:
            reuse = 0
            llm.reset()
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        llm.eval(tokens[reuse:])
        return reuse

    def generate(self, tokens: list[int], sampling: Sampling, cancel: threading.Event | None = None,
                 truncate: bool = True) -> Iterator[Piece | Stats]:
        """Stream pieces of text for a prompt; the last item is the ``Stats``."""
        llm = self.llm
        stats = Stats()
        tokens = self._fit_prompt(list(tokens), sampling.num_predict, truncate)
        stats.prompt_eval_count = len(tokens)
        seed = sampling.seed if sampling.seed is not None and sampling.seed >= 0 else random.getrandbits(31)
        llm.set_seed(seed)
        llm.last_n_tokens_size = sampling.repeat_last_n if sampling.repeat_last_n >= 0 else self.n_ctx
        grammar = llama_cpp.LlamaGrammar.from_string(sampling.grammar, verbose=False) if sampling.grammar else None
        sampler = llm._init_sampler(
            top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
            typical_p=sampling.typical_p, temp=sampling.temperature,
            repeat_penalty=sampling.repeat_penalty, frequency_penalty=sampling.frequency_penalty,
            presence_penalty=sampling.presence_penalty, mirostat_mode=sampling.mirostat,
            mirostat_tau=sampling.mirostat_tau, mirostat_eta=sampling.mirostat_eta, grammar=grammar,
        )
        t0 = time.perf_counter()
        stats.cached_tokens = self._prefill(tokens)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        scanner = StopScanner(sampling.stop)
        t1 = time.perf_counter()
        stats.prompt_eval_s = t1 - t0
        limit = sampling.num_predict if sampling.num_predict >= 0 else 1 << 30
        generated: list[int] = []
        pending: list[TokenLogprob] = []  # log probabilities not yet attached to an emitted piece
        done_reason = "stop"
        while True:
            if cancel is not None and cancel.is_set():
                done_reason = "cancel"
                break
            if len(generated) >= limit:
                done_reason = "length"
                break
            if llm.n_tokens >= self.n_ctx:
                done_reason = "length"
                break
            logits = self._last_logits() if sampling.logprobs is not None else None
            token = sampler.sample(llm._ctx, -1)
            if self.is_eog(token):
                break
            generated.append(token)
            raw = self._piece(token)
            if logits is not None:
                pending.append(self._logprob(logits, token, raw, sampling.logprobs or 0))
            text, hit = scanner.feed(decoder.decode(raw))
            if text:
                yield Piece(text, tuple(pending))
                pending.clear()
            if hit:
                break
            llm.eval([token])
        tail = scanner.flush() + decoder.decode(b"", final=True)
        if (tail or pending) and done_reason != "cancel":
            yield Piece(tail, tuple(pending))
        stats.eval_count = len(generated)
        stats.eval_s = time.perf_counter() - t1
        stats.done_reason = done_reason
        stats.tokens = generated
        yield stats

    def _last_logits(self) -> np.ndarray:
        n_vocab = llama_c.llama_vocab_n_tokens(self._vocab)
        ptr = llama_c.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float64)

    def _logprob(self, logits: np.ndarray, token: int, raw: bytes, top_n: int) -> TokenLogprob:
        """The token's log probability under the model's own distribution (before sampling tweaks)."""
        shifted = logits - logits.max()
        logp = shifted - np.log(np.exp(shifted).sum())
        top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()
        if top_n > 0:
            ids = np.argpartition(-logp, top_n)[:top_n]
            ids = ids[np.argsort(-logp[ids])]
            top = tuple((self._piece(int(i)).decode("utf-8", errors="replace"), float(logp[i]),
                         tuple(self._piece(int(i)))) for i in ids)
        return TokenLogprob(raw.decode("utf-8", errors="replace"), float(logp[token]), tuple(raw), top)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embeddings of texts (the model must be loaded with ``embedding=True``)."""
        return [list(map(float, v)) for v in self.llm.embed(list(texts))]

    def close(self) -> None:
        """Free the model and context now rather than at garbage collection."""
        llm, self.llm = self.llm, None  # type: ignore[assignment]
        if llm is not None:
            llm.close()
