"""The executor: one llama.cpp model and context, loaded exactly as a ``Plan`` says.

Loaded through llama.cpp's own C API (not llama-cpp-python's ``Llama`` class), so every knob of the
plan reaches llama.cpp: tensor buffer overrides, CPU extra buffer types, the number of parallel
sequences and one unified KV cache for them. Generation itself is the batch loop's (``batch``);
this module owns the model and context, tokens, embeddings and the raw benchmark.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from offload.planner.types import Plan
from offload.runtime.errors import BadRequest, ContextTooLong, LoadFailed, OutOfMemory
from offload.runtime.runner import FAULT_ENV, buffers
from offload.runtime.runner.native import (
    KV_TYPES,
    SPLIT_MODES,
    CpuThreadpools,
    captured_log,
    check_applicable,
    llama_c,
    overrides_array,
    set_progress_hook,
)

__all__ = ["Engine", "BatchTiming", "TokenBatch"]

log = logging.getLogger(__name__)


class TokenBatch:
    """A ``llama_batch`` whose arrays are numpy-owned, so a step fills them with vector writes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        seq_p = ctypes.POINTER(ctypes.c_int32)
        base = self.seq.ctypes.data
        self._seq_ptrs = (seq_p * capacity)(
            *[ctypes.cast(base + 4 * i, seq_p) for i in range(capacity)]
        )
        self.batch = llama_c.llama_batch()
        # llama_cpp types these fields as arrays; they take pointers into the numpy arrays above.
        self.batch.token = self.token.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))  # type: ignore[assignment]
        self.batch.embd = None  # type: ignore[assignment]
        self.batch.pos = self.pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))  # type: ignore[assignment]
        self.batch.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))  # type: ignore[assignment]
        self.batch.seq_id = self._seq_ptrs  # type: ignore[assignment]
        self.batch.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))  # type: ignore[assignment]

    def decode(self, ctx: int, n: int) -> int:
        """``llama_decode`` the first ``n`` entries; llama.cpp's return code."""
        self.batch.n_tokens = n
        return int(llama_c.llama_decode(ctx, self.batch))


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
        mid = (
            steps[len(steps) // 2]
            if len(steps) % 2
            else (steps[len(steps) // 2 - 1] + steps[len(steps) // 2]) / 2
        )
        return self.n_seq / mid if mid > 0 else 0.0

    @property
    def prompt_tps(self) -> float:
        """Prompt tokens per second."""
        return self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        """Generated tokens per second, all sequences together."""
        return self.tokens / self.decode_s if self.decode_s > 0 else 0.0


def _load_mode(use_mmap: bool, use_mlock: bool) -> int:
    if use_mmap:
        return llama_c.LLAMA_LOAD_MODE_MMAP_MLOCK if use_mlock else llama_c.LLAMA_LOAD_MODE_MMAP
    return llama_c.LLAMA_LOAD_MODE_MLOCK if use_mlock else llama_c.LLAMA_LOAD_MODE_NONE


def _model_params(
    plan: Plan, extra_bufts: bool, overrides: Any, progress: Any, adapters: bool = False
) -> Any:
    p = llama_c.llama_model_default_params()
    p.n_gpu_layers = plan.n_gpu_layers
    p.split_mode = SPLIT_MODES[plan.split_mode]
    p.main_gpu = plan.main_gpu
    # As llama-cpp-python does, a model with a LoRA adapter is read rather than mapped.
    p.load_mode = _load_mode(plan.use_mmap and not adapters, plan.use_mlock)
    # CPU "extra" buffer types (repacked weights, AMX): off is the safe setting on CPUs whose
    # advertised features fault in a VM.
    p.use_extra_bufts = extra_bufts
    if overrides is not None:
        p.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p).value
    if progress is not None:
        p.progress_callback = progress
    return p


def _context_params(plan: Plan, n_seq_max: int) -> Any:
    p = llama_c.llama_context_default_params()
    # llama.cpp lowers the batch to the context: at least a cell for every sequence (below).
    p.n_ctx = max(plan.n_ctx * max(1, plan.n_parallel), n_seq_max)
    # llama.cpp keeps room for as many outputs as a batch holds, and a step can hold one token
    # of every sequence: a smaller batch aborts it (GGML_ASSERT on n_outputs_max).
    p.n_batch = max(plan.n_batch, n_seq_max)
    p.n_ubatch = max(plan.n_ubatch, n_seq_max)
    p.n_seq_max = n_seq_max
    p.n_threads = plan.threads
    p.n_threads_batch = plan.threads_batch
    p.offload_kqv = plan.offload_kqv
    p.flash_attn_type = (
        llama_c.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if plan.flash_attn
        else llama_c.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    p.op_offload = plan.op_offload
    p.type_k = p.type_v = KV_TYPES[plan.kv_type]
    # One pool of cells for every sequence: a sequence may share its prefix with another's cells.
    p.kv_unified = True
    p.swa_full = plan.swa_full
    p.no_perf = True
    p.embeddings = False
    return p


def _oom_or_failed(lines: list[str], what: str) -> LoadFailed:
    reason = next((ln.strip() for ln in lines if buffers.is_out_of_memory([ln])), "")
    if reason:
        return OutOfMemory(f"not enough memory for this plan of {what}: {reason}")
    tail = " | ".join(ln.strip() for ln in lines if ln.strip())[-400:]
    return LoadFailed(f"llama.cpp could not load {what}" + (f": {tail}" if tail else ""))


# The logits one embedding chunk may make llama.cpp hold (bytes).
EMBED_OUTPUT_BYTES = 256 << 20


def _embed_chunk(n_vocab: int) -> int:
    """Tokens per embedding decode: as many as keep their logits within ``EMBED_OUTPUT_BYTES``."""
    return max(1, EMBED_OUTPUT_BYTES // (4 * max(1, n_vocab)))


class Engine:
    """A loaded model and its context; owned by one thread (the runner's batch loop).

    ``n_seq_max`` is the plan's parallel sequences plus one spare sequence for embeddings.
    ``measured_bytes`` is what llama.cpp reported allocating, per device and kind.
    """

    def __init__(
        self,
        model: int,
        ctx: int,
        plan: Plan,
        model_path: Path,
        load_s: float,
        log_lines: Sequence[str],
        keep: Sequence[Any],
    ) -> None:
        self.model = model
        self.ctx = ctx
        self.plan = plan
        self.model_path = model_path
        self.load_s = load_s
        self.vocab = llama_c.llama_model_get_vocab(model)
        self.mem = llama_c.llama_get_memory(ctx)
        self.n_vocab = int(llama_c.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(llama_c.llama_model_n_embd(model))
        self.n_slots = max(1, plan.n_parallel)
        self.n_seq_max = int(llama_c.llama_n_seq_max(ctx))
        self.n_batch = int(llama_c.llama_n_batch(ctx))
        self.n_ubatch = int(llama_c.llama_n_ubatch(ctx))
        # The context of one sequence: the plan's, within what llama.cpp allocated.
        self.n_ctx = min(plan.n_ctx, int(llama_c.llama_n_ctx(ctx)))
        self.bos = int(llama_c.llama_vocab_bos(self.vocab))
        self.add_bos = bool(llama_c.llama_vocab_get_add_bos(self.vocab))
        self.recurrent = bool(
            llama_c.llama_model_is_recurrent(model) or llama_c.llama_model_is_hybrid(model)
        )
        self.load_log: list[str] = list(log_lines)
        self.measured_bytes: dict[str, dict[str, int]] = buffers.measured_bytes(self.load_log)
        self.overridden_tensors: dict[str, str] = buffers.overridden_tensors(self.load_log)
        self._keep = list(keep)  # C arrays llama.cpp points into for the model's life
        self._piece_buf = ctypes.create_string_buffer(256)
        self._pieces: dict[int, bytes] = {}
        self._longest_token: int | None = None
        self.batch = TokenBatch(max(self.n_batch, self.n_seq_max))
        self.gave_up: list[str] = []
        self.prompt_tps_hint = 0.0  # from the first evaluation, until steps measure it
        # Whether llama_decode returns before the device has finished (measured at the first
        # evaluation): the batch loop then overlaps sending tokens with the device's work.
        self.decode_async = False
        # Seconds of the load's parts: model_s (weights read and placed), context_s (KV cache and
        # compute buffers), first_eval_s (the checking evaluation, when asked for).
        self.phases: dict[str, float] = {}

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model_path: Path | str,
        plan: Plan,
        adapters: Sequence[Path] = (),
        *,
        extra_bufts: bool = True,
        verify_decode: bool = False,
        check: bool = True,
        progress: Callable[[float], None] | None = None,
    ) -> Engine:
        """Load the model exactly as ``plan`` says.

        Raises ``PlanNotApplicable`` before loading when the plan cannot be applied, ``OutOfMemory``
        when llama.cpp ran out of memory (loading, or the first decode with ``verify_decode``), and
        ``LoadFailed`` with llama.cpp's reason otherwise. Nothing stays allocated after a failure.
        """
        model_path = Path(model_path)
        if check:
            check_applicable(plan, model_path)
        if len(adapters) > 1:
            raise LoadFailed("only one LoRA adapter per model is supported")
        t0 = time.perf_counter()
        # Without mmap, llama.cpp keeps CPU layers in the GPU's pinned host buffer; overridden
        # tensors follow them there, so op offload copies all CPU-resident weights at full speed.
        overrides = overrides_array(
            plan.cpu_tensor_patterns,
            pinned=not plan.use_mmap,
            gpu_patterns=plan.gpu_tensor_patterns,
        )
        keep: list[Any] = [overrides]
        model = ctx = None
        with captured_log() as lines:
            try:
                mparams = _model_params(
                    plan, extra_bufts, overrides, set_progress_hook(progress), bool(adapters)
                )
                if plan.tensor_split:
                    split = (
                        ctypes.c_float * max(len(plan.tensor_split), llama_c.llama_max_devices())
                    )(*plan.tensor_split)
                    mparams.tensor_split = split
                    keep.append(split)
                model = llama_c.llama_model_load_from_file(str(model_path).encode("utf-8"), mparams)
                if not model:
                    raise _oom_or_failed(lines, model_path.name)
                t_model = time.perf_counter()
                lora = []
                for adapter_path in adapters:
                    adapter = llama_c.llama_adapter_lora_init(
                        model, str(adapter_path).encode("utf-8")
                    )
                    if not adapter:
                        raise LoadFailed(
                            f"llama.cpp could not load the LoRA adapter {adapter_path}"
                        )
                    lora.append(adapter)
                n_seq_max = max(1, plan.n_parallel) + 1
                ctx = llama_c.llama_init_from_model(model, _context_params(plan, n_seq_max))
                if not ctx:
                    raise _oom_or_failed(lines, model_path.name)
                keep.append(CpuThreadpools.attach(ctx))
                if lora:
                    # Adapters belong to the model: llama_model_free frees them.
                    arr = (llama_c.llama_adapter_lora_p_ctypes * 1)(lora[0])
                    scales = (ctypes.c_float * 1)(1.0)
                    if llama_c.llama_set_adapters_lora(ctx, arr, 1, scales):
                        raise LoadFailed(
                            f"llama.cpp could not apply the LoRA adapter {adapters[0]}"
                        )
                t_ctx = time.perf_counter()
                engine = cls(model, ctx, plan, model_path, t_ctx - t0, lines, keep)
                engine.phases = {"model_s": t_model - t0, "context_s": t_ctx - t_model}
                if verify_decode:
                    engine._verify_decode(extra_bufts)
                    engine.phases["first_eval_s"] = time.perf_counter() - t_ctx
            except LoadFailed:
                cls._free(model, ctx, keep)
                raise
            except (ValueError, RuntimeError, OSError, MemoryError) as e:
                cls._free(model, ctx, keep)
                if isinstance(e, MemoryError):
                    raise OutOfMemory(
                        f"not enough memory for this plan of {model_path.name}: {e}"
                    ) from None
                raise _oom_or_failed([*lines, str(e)], model_path.name) from None
            finally:
                set_progress_hook(None)
            engine.load_log = list(lines)
        engine.measured_bytes = buffers.measured_bytes(engine.load_log)
        engine.overridden_tensors = buffers.overridden_tensors(engine.load_log)
        return engine

    @staticmethod
    def _free(model: Any, ctx: Any, keep: Sequence[Any] = ()) -> None:
        if ctx:
            llama_c.llama_free(ctx)
        if model:
            llama_c.llama_model_free(model)
        for item in keep:
            if isinstance(item, CpuThreadpools):
                item.free()

    def _verify_decode(self, extra_bufts: bool) -> None:
        """Decode one full micro-batch so compute buffers that allocate lazily fail now, not
        mid-request, and so a CPU that faults in llama.cpp's kernels faults during the load."""
        fault = os.environ.get(FAULT_ENV, "")
        if fault == "hang-first-eval":
            while True:
                time.sleep(3600)
        if fault == "crash-first-eval" or (
            fault == "crash-first-eval-with-extra-bufts" and extra_bufts
        ):
            os.kill(os.getpid(), signal.SIGSEGV)
        # A full micro-batch where a GPU allocates lazily; on the CPU a short one exercises the same
        # kernels in a fraction of the time.
        uses_gpu = self.plan.n_gpu_layers > 0 or any(d.kind == "GPU" for d in self.plan.devices)
        n = max(1, min(self.n_ubatch, self.n_ctx - 4, 512 if uses_gpu else 32))
        b = self.batch
        b.token[:n] = self.bos if self.bos >= 0 else 0
        b.pos[:n] = np.arange(n, dtype=np.int32)
        b.seq[:n] = 0
        b.logits[:n] = 0
        b.logits[n - 1] = 1
        t0 = time.perf_counter()
        try:
            rc = b.decode(self.ctx, n)
            llama_c.llama_synchronize(self.ctx)
            t_done = time.perf_counter() - t0
            if rc == 0 and uses_gpu:
                # Whether llama_decode returns before the device has finished, from single tokens
                # as decoding runs them, the last of three. Not from the evaluation above: a
                # device's first calls wait for its own set-up (cuBLAS, memory pools, captured
                # CUDA graphs) before they return.
                for k in range(3):
                    b.token[0], b.pos[0], b.seq[0], b.logits[0] = b.token[0], n + k, 0, 1
                    t1 = time.perf_counter()
                    if b.decode(self.ctx, 1) != 0:
                        break
                    t_return = time.perf_counter() - t1
                    llama_c.llama_synchronize(self.ctx)
                    t_one = time.perf_counter() - t1
                    self.decode_async = t_one > 0.0005 and t_return < 0.5 * t_one
        finally:
            llama_c.llama_memory_clear(self.mem, True)
        if rc != 0:
            raise _oom_or_failed(
                self.load_log if hasattr(self, "load_log") else [],
                f"{self.model_path.name} (first evaluation failed, code {rc})",
            )
        self.prompt_tps_hint = n / t_done if t_done > 0 else 0.0

    def memory_report(self) -> dict[str, Any]:
        """Predicted and measured bytes per device, for ``/api/ps`` and ``offload ps``."""
        predicted = {
            d.name if d.kind == "CPU" else f"CUDA{d.index}": {
                "weights": d.weights_bytes,
                "kv": d.kv_bytes,
                "compute": d.compute_bytes + d.overhead_bytes,
                "budget": d.budget_bytes,
            }
            for d in self.plan.devices
        }
        return {
            "predicted": predicted,
            "measured": self.measured_bytes,
            "cpu_tensor_overrides": len(self.overridden_tensors),
            "gave_up": list(self.gave_up),
        }

    # -- tokens --------------------------------------------------------------------------------

    def synchronize(self) -> None:
        """Wait until the device has finished the last ``llama_decode``."""
        llama_c.llama_synchronize(self.ctx)

    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """Text to token ids; special tokens in the text (template markers) are parsed as such."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama_c.llama_token * cap)()
        n = llama_c.llama_tokenize(self.vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:
            cap = -n
            buf = (llama_c.llama_token * cap)()
            n = llama_c.llama_tokenize(self.vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:
            raise BadRequest("the text could not be tokenized")
        return list(buf[:n])

    def longest_token_bytes(self) -> int:
        """The most bytes one token of the vocabulary stands for (special tokens included);
        worked out once, on the first text long enough to need it."""
        if self._longest_token is None:
            buf = ctypes.create_string_buffer(1024)
            longest = 1
            for t in range(self.n_vocab):
                n = llama_c.llama_token_to_piece(self.vocab, t, buf, 1024, 0, True)
                longest = max(longest, abs(int(n)))
            self._longest_token = longest
        return self._longest_token

    def clip_text(self, text: str, tokens: int, keep_end: bool) -> tuple[str, int]:
        """``text`` cut to a part that still holds at least ``tokens`` tokens (its end, or with
        ``keep_end`` False its start), and a lower bound of how many tokens the whole would be
        (0 when nothing was cut).

        A prompt is cut to the context after it is tokenized; tokenizing all of a 200 MB one
        first held its runner for minutes and several GB. No token stands for more bytes than the
        vocabulary's longest, so this many characters of the end (or start) cover ``tokens``
        tokens and the tokens kept from it are those of the whole text (but at the cut).
        """
        if len(text) <= tokens * 4:
            return text, 0  # shorter than any cut could be: no need to look at the vocabulary
        room = tokens * self.longest_token_bytes()
        if len(text) <= room:
            return text, 0
        at_least = len(text.encode("utf-8", errors="surrogatepass")) // self.longest_token_bytes()
        return (text[-room:] if keep_end else text[:room]), at_least

    def piece(self, token: int) -> bytes:
        """The bytes one token stands for (control tokens render as nothing)."""
        got = self._pieces.get(token)
        if got is None:
            n = llama_c.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, False)
            got = self._piece_buf.raw[: max(n, 0)]
            if len(self._pieces) < 65536:
                self._pieces[token] = got
        return got

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Token ids to text."""
        self.check_tokens(tokens)
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, EOT, <end_of_turn> ...)."""
        return bool(llama_c.llama_vocab_is_eog(self.vocab, token))

    def check_tokens(self, tokens: Sequence[int]) -> None:
        """Refuse token ids outside the vocabulary (llama.cpp would abort on them)."""
        if tokens and (min(tokens) < 0 or max(tokens) >= self.n_vocab):
            bad = next(t for t in tokens if t < 0 or t >= self.n_vocab)
            raise BadRequest(
                f"token id {bad} is outside this model's vocabulary (0 to {self.n_vocab - 1})"
            )

    # -- embeddings ----------------------------------------------------------------------------

    def embed(self, tokens: list[int], truncate: bool = True) -> tuple[list[float], int]:
        """One embedding of ``tokens`` (mean of per-token vectors unless the model pools); returns
        (vector, tokens used). Uses the spare sequence; the batch loop calls it between steps."""
        self.check_tokens(tokens)
        pooled = int(llama_c.llama_pooling_type(self.ctx)) != llama_c.LLAMA_POOLING_TYPE_NONE
        limit = min(self.n_ctx, self.n_ubatch) if pooled else self.n_ctx
        if len(tokens) > limit:
            if not truncate:
                raise ContextTooLong(
                    f"the input is {len(tokens)} tokens but the context holds {limit}"
                )
            tokens = tokens[:limit]
        if not tokens:
            return [0.0] * self.n_embd, 0
        seq = self.n_seq_max - 1
        llama_c.llama_memory_seq_rm(self.mem, seq, 0, -1)
        llama_c.llama_set_embeddings(self.ctx, True)
        total = np.zeros(self.n_embd, dtype=np.float64)
        b = self.batch
        try:
            # Every token of a chunk is an output, and llama.cpp keeps logits for each output (a
            # vocabulary of floats) in a buffer it never shrinks: chunks of the whole batch made a
            # runner hold GBs after one long input (num_batch 8192: 8 GiB for a 262k vocabulary).
            chunk = len(tokens) if pooled else min(self.n_batch, _embed_chunk(self.n_vocab))
            for start in range(0, len(tokens), chunk):
                part = tokens[start : start + chunk]
                n = len(part)
                b.token[:n] = part
                b.pos[:n] = np.arange(start, start + n, dtype=np.int32)
                b.seq[:n] = seq
                b.logits[:n] = 1
                rc = b.decode(self.ctx, n)
                if rc != 0:
                    raise LoadFailed(
                        f"llama.cpp could not embed the input (code {rc}); the context may be full"
                    )
                if not pooled:
                    for i in range(n):
                        ptr = llama_c.llama_get_embeddings_ith(self.ctx, i)
                        total += np.ctypeslib.as_array(ptr, shape=(self.n_embd,))
            if pooled:
                ptr = llama_c.llama_get_embeddings_seq(self.ctx, seq)
                vec = np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).astype(np.float64)
            else:
                vec = total / len(tokens)
        finally:
            llama_c.llama_set_embeddings(self.ctx, False)
            llama_c.llama_memory_seq_rm(self.mem, seq, 0, -1)
        return [float(x) for x in vec], len(tokens)

    # -- the raw benchmark ---------------------------------------------------------------------

    def run_batch(self, n_seq: int, prompt: Sequence[int], gen_tokens: int) -> BatchTiming:
        """Evaluate ``prompt`` once, then decode ``gen_tokens`` greedily for ``n_seq`` sequences at once.

        Sequences 1.. start from a copy of sequence 0's cache; each decode step is one llama.cpp
        batch holding one token of every sequence (real batched decoding, not streams in turn).
        End-of-generation tokens are not honoured: a benchmark wants exactly ``gen_tokens``.
        Clears the whole cache: the batch loop runs it only when no request is active.
        """
        if n_seq > self.n_slots:
            raise BadRequest(f"{n_seq} sequences need a runner loaded with parallel >= {n_seq}")
        self.check_tokens(prompt)
        ctx, mem, b = self.ctx, self.mem, self.batch
        llama_c.llama_memory_clear(mem, True)
        prompt = list(prompt)[: max(1, self.n_ctx - gen_tokens - 1)]

        def argmax(i: int) -> int:
            return int(
                np.ctypeslib.as_array(
                    llama_c.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,)
                ).argmax()
            )

        try:
            t0 = time.perf_counter()
            chunk = max(1, min(self.n_batch, len(prompt)))
            last = 0
            for start in range(0, len(prompt), chunk):  # llama_decode takes at most n_batch tokens
                part = prompt[start : start + chunk]
                n = len(part)
                b.token[:n] = part
                b.pos[:n] = np.arange(start, start + n, dtype=np.int32)
                b.seq[:n] = 0
                b.logits[:n] = 0
                b.logits[n - 1] = 1
                last = n - 1
                if b.decode(ctx, n) != 0:
                    raise LoadFailed("the prompt decode failed")
            first = argmax(last)
            t1 = time.perf_counter()
            for s in range(1, n_seq):
                llama_c.llama_memory_seq_cp(mem, 0, s, -1, -1)
            nxt = [first] * n_seq
            pos = len(prompt)
            steps: list[float] = []
            seqs = np.arange(n_seq, dtype=np.int32)
            for _ in range(gen_tokens):
                ts = time.perf_counter()
                b.token[:n_seq] = nxt
                b.pos[:n_seq] = pos
                b.seq[:n_seq] = seqs
                b.logits[:n_seq] = 1
                if b.decode(ctx, n_seq) != 0:
                    raise LoadFailed(f"batched decode of {n_seq} sequences failed")
                nxt = [argmax(s) for s in range(n_seq)]
                pos += 1
                steps.append(time.perf_counter() - ts)
            t2 = time.perf_counter()
        finally:
            llama_c.llama_memory_clear(mem, True)
        return BatchTiming(
            n_seq=n_seq,
            prompt_tokens=len(prompt),
            prompt_s=t1 - t0,
            ttft_s=t1 - t0,
            tokens=n_seq * gen_tokens,
            decode_s=t2 - t1,
            step_s=tuple(steps),
        )

    def close(self) -> None:
        """Free the context and model now."""
        ctx, model = self.ctx, self.model
        self.ctx = self.model = None  # type: ignore[assignment]
        self._free(model, ctx, self._keep)
