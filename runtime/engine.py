"""The executor: one llama.cpp model and context, loaded exactly as a ``Plan`` says.

This is the only module that imports ``llama_cpp``. It turns a plan into llama.cpp parameters,
streams tokens with Ollama's timing fields, and stops cleanly on a stop string, end of generation,
the token limit, a full context or a cancel event.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import llama_cpp as llama_c

from offload.planner.types import Plan
from offload.runtime.errors import ContextTooLong, LoadFailed

__all__ = ["Sampling", "Piece", "Stats", "Engine", "llama_params", "KV_TYPES"]

log = logging.getLogger(__name__)

KV_TYPES = {"f16": llama_c.GGML_TYPE_F16, "q8_0": llama_c.GGML_TYPE_Q8_0, "q4_0": llama_c.GGML_TYPE_Q4_0, "f32": llama_c.GGML_TYPE_F32}
_SPLIT = {"none": llama_c.LLAMA_SPLIT_MODE_NONE, "layer": llama_c.LLAMA_SPLIT_MODE_LAYER,
          "row": llama_c.LLAMA_SPLIT_MODE_ROW}


@dataclass(frozen=True)
class Sampling:
    """Sampling options, with Ollama's defaults."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int | None = None
    num_predict: int = -1
    stop: tuple[str, ...] = ()
    grammar: str | None = None


@dataclass(frozen=True)
class Piece:
    """A piece of generated text (one or more tokens' worth)."""

    text: str


@dataclass
class Stats:
    """Counts and durations of one generation, as Ollama reports them."""

    prompt_eval_count: int = 0
    prompt_eval_s: float = 0.0
    eval_count: int = 0
    eval_s: float = 0.0
    done_reason: str = "stop"
    cached_tokens: int = 0
    tokens: list[int] = field(default_factory=list)


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
        "n_ctx": plan.n_ctx,
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


class _StopScanner:
    """Finds stop strings in streamed text, holding back what could be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was hit)."""
        self.buf += text
        if not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.buf[: len(self.buf) - hold]
        self.buf = self.buf[len(self.buf) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class Engine:
    """A loaded model and context; one generation at a time (callers serialise)."""

    def __init__(self, llm: llama_cpp.Llama, plan: Plan, model_path: Path, load_s: float) -> None:
        self.llm = llm
        self.plan = plan
        self.model_path = model_path
        self.load_s = load_s
        self.lock = threading.Lock()
        self._vocab = llm._model.vocab

    @classmethod
    def load(cls, model_path: Path | str, plan: Plan, adapters: Sequence[Path] = (),
             embedding: bool = False) -> Engine:
        """Load the model as ``plan`` says; raise ``LoadFailed`` with llama.cpp's reason."""
        t0 = time.perf_counter()
        kwargs = llama_params(plan)
        if adapters:
            if len(adapters) > 1:
                raise LoadFailed("only one LoRA adapter per model is supported")
            kwargs["lora_path"] = str(adapters[0])
        try:
            llm = llama_cpp.Llama(str(model_path), embedding=embedding, verbose=False, **kwargs)
        except (ValueError, RuntimeError, OSError) as e:
            raise LoadFailed(f"llama.cpp could not load {model_path}: {e}") from None
        return cls(llm, plan, Path(model_path), time.perf_counter() - t0)

    # -- tokens --------------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        """The context length in tokens."""
        return self.llm.n_ctx()

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
        scanner = _StopScanner(sampling.stop)
        t1 = time.perf_counter()
        stats.prompt_eval_s = t1 - t0
        limit = sampling.num_predict if sampling.num_predict >= 0 else 1 << 30
        generated: list[int] = []
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
            token = sampler.sample(llm._ctx, -1)
            if self.is_eog(token):
                break
            generated.append(token)
            text, hit = scanner.feed(decoder.decode(self._piece(token)))
            if text:
                yield Piece(text)
            if hit:
                break
            llm.eval([token])
        tail = scanner.flush() + decoder.decode(b"", final=True)
        if tail and done_reason != "cancel":
            yield Piece(tail)
        stats.eval_count = len(generated)
        stats.eval_s = time.perf_counter() - t1
        stats.done_reason = done_reason
        stats.tokens = generated
        yield stats

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embeddings of texts (the model must be loaded with ``embedding=True``)."""
        return [list(map(float, v)) for v in self.llm.embed(list(texts))]

    def close(self) -> None:
        """Free the model and context now rather than at garbage collection."""
        llm, self.llm = self.llm, None  # type: ignore[assignment]
        if llm is not None:
            llm.close()
