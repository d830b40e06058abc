"""llama.cpp's native side, below the engine: the libraries loaded in the right order, its log,
tensor buffer overrides, and the checks that a plan can be applied before anything is loaded.

Only runner processes import this module (it loads llama.cpp).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import logging
import os
import re
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


def _preload() -> None:
    """Load ``libllama`` with ``RTLD_GLOBAL`` before numpy's native libraries can be loaded.

    Seen on a CUDA build: with numpy's libraries loaded first (numpy comes in through ``gguf`` and
    the planner), llama.cpp crashed with a segmentation fault on its first GPU load; with
    llama.cpp's loaded first, both work.
    """
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return
    suffix = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
    lib = Path(spec.origin).parent / "lib" / f"libllama{suffix}"
    if lib.exists():
        with contextlib.suppress(OSError):  # importing llama_cpp below reports a broken install
            ctypes.CDLL(str(lib), mode=getattr(ctypes, "RTLD_GLOBAL", 0))


_preload()

import llama_cpp  # noqa: E402 - after the preload above, on purpose
from llama_cpp import llama_cpp as llama_c  # noqa: E402

from offload.planner.types import Plan  # noqa: E402
from offload.runtime.errors import LoadFailed, PlanNotApplicable  # noqa: E402

__all__ = [
    "llama_c",
    "llama_cpp",
    "SPLIT_MODES",
    "KV_TYPES",
    "check_applicable",
    "gpu_device_count",
    "gpu_buffer_type",
    "captured_log",
    "overrides_array",
    "cpu_buffer_type",
    "ggml_symbol",
    "set_progress_hook",
    "CpuThreadpools",
]

SPLIT_MODES = {
    "none": llama_c.LLAMA_SPLIT_MODE_NONE,
    "layer": llama_c.LLAMA_SPLIT_MODE_LAYER,
    "row": llama_c.LLAMA_SPLIT_MODE_ROW,
}
KV_TYPES = {
    "f16": llama_c.GGML_TYPE_F16,
    "q8_0": llama_c.GGML_TYPE_Q8_0,
    "q4_0": llama_c.GGML_TYPE_Q4_0,
    "f32": llama_c.GGML_TYPE_F32,
}


# -- llama.cpp's log: to our logger (the runner's stderr, i.e. its log file), captured while loading


_llama_log = logging.getLogger("offload.runtime.llama_cpp")


class _LogSink:
    """Receives llama.cpp's log; one capture at a time (a runner loads one model)."""

    def __init__(self) -> None:
        self.partial = ""
        self.capture: list[str] | None = None
        self.lock = threading.Lock()
        self.skipping = False  # the last line was a dropped debug line
        # OFFLOAD_DEBUG=1 keeps llama.cpp's debug lines in the runner's log after the load.
        self.debug = os.environ.get("OFFLOAD_DEBUG", "") not in ("", "0", "false")

    def write(self, text: str, log: bool = True) -> None:
        """Take a piece of llama.cpp's log: whole lines go to the capture, if any, and (``log``)
        to the runner's log."""
        with self.lock:
            self.partial += text
            while "\n" in self.partial:
                line, self.partial = self.partial.split("\n", 1)
                if self.capture is not None:
                    self.capture.append(line)
                if log and line.strip():
                    _llama_log.info("%s", line)


_SINK = _LogSink()


# ggml's log levels: a debug line, and the pieces that continue one.
_DEBUG, _CONT = 1, 5


@llama_c.llama_log_callback
def _on_llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # Called for every line llama.cpp logs, debug ones included. CUDA builds log one for every
    # graph they launch ("CUDA Graph id N reused"), that is one per GPU split per token: dozens
    # per token for an MoE with CPU experts, which through Python's logging cost it a quarter of
    # its decode speed (measured on an H200). A load logs a thousand more (every tensor created).
    # Debug lines are therefore dropped first thing; while a load's log is captured they go to
    # the capture only (it is parsed: buffer overrides are debug lines). OFFLOAD_DEBUG keeps them.
    sink = _SINK
    debug = level == _DEBUG or (level == _CONT and sink.skipping)
    sink.skipping = debug
    if debug and not sink.debug and sink.capture is None:
        return
    try:
        sink.write(text.decode("utf-8", errors="replace"), log=not debug or sink.debug)
    except Exception:  # noqa: BLE001 - an exception must never cross back into C
        pass


# The callback object must outlive every llama.cpp call, so it lives at module level.
llama_c.llama_log_set(_on_llama_log, ctypes.c_void_p(0))


@contextlib.contextmanager
def captured_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines while the block runs (all but debug lines still reach the
    log file)."""
    lines: list[str] = []
    _SINK.capture = lines
    try:
        yield lines
    finally:
        _SINK.capture = None


# -- load progress ------------------------------------------------------------------------------

_progress_hook: Callable[[float], None] | None = None


@llama_c.llama_progress_callback
def _on_progress(fraction: float, user_data: ctypes.c_void_p) -> bool:
    hook = _progress_hook
    if hook is not None:
        try:
            hook(float(fraction))
        except Exception:  # noqa: BLE001 - never across into C
            pass
    return True


def set_progress_hook(hook: Callable[[float], None] | None) -> Any:
    """Call ``hook(fraction)`` as llama.cpp loads tensors; returns the C callback for model params."""
    global _progress_hook
    _progress_hook = hook
    return _on_progress


# -- tensor buffer overrides --------------------------------------------------------------------


class _BuftOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def ggml_symbol(name: str) -> Any:
    """A function from the ggml libraries llama-cpp-python ships (the ctypes module lacks them)."""
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for lib_name in ("libggml-cpu", "libggml-base", "libggml"):
        for ext in (".so", ".dylib", ".dll"):
            path = lib_dir / (lib_name + ext)
            if path.exists():
                fn = getattr(ctypes.CDLL(str(path)), name, None)
                if fn is not None:
                    return fn
    raise LoadFailed(f"{name} not found in {lib_dir}")


class _ThreadpoolParams(ctypes.Structure):
    """ggml's ``struct ggml_threadpool_params`` (ggml.h; GGML_MAX_N_THREADS is 512)."""

    _fields_ = [
        ("cpumask", ctypes.c_bool * 512),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


# ggml's default: threads busy-wait a little for the next graph before they sleep.
THREADPOOL_POLL = 50


class CpuThreadpools:
    """Persistent CPU thread pools attached to a context, as llama.cpp's own tools attach them.

    Without them a ggml built without OpenMP (Apple clang's builds, for one) starts and joins its
    worker threads for every graph it computes, that is for every decoded token; llama-cpp-python
    attaches none. (With OpenMP, its thread team persists either way.) One pool for generation and, when the
    batch thread count differs, one for prompt batches (the other waits paused, as in llama.cpp).
    """

    def __init__(self, pool: int, pool_batch: int | None, free: Any) -> None:
        self.pool, self.pool_batch, self._free = pool, pool_batch, free

    @classmethod
    def attach(cls, ctx: Any) -> CpuThreadpools | None:
        """Create and attach the pools; None (ggml's own threads per graph) where this build
        does not export what it takes."""
        try:
            by_type = ggml_symbol("ggml_backend_dev_by_type")
            dev_reg = ggml_symbol("ggml_backend_dev_backend_reg")
            proc = ggml_symbol("ggml_backend_reg_get_proc_address")
            attach = llama_c._lib.llama_attach_threadpool
        except (LoadFailed, AttributeError):
            return None
        by_type.restype, by_type.argtypes = ctypes.c_void_p, [ctypes.c_int]
        dev_reg.restype, dev_reg.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
        proc.restype, proc.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]
        dev = by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
        reg = dev_reg(dev) if dev else None
        new_ptr = proc(reg, b"ggml_threadpool_new") if reg else None
        free_ptr = proc(reg, b"ggml_threadpool_free") if reg else None
        if not new_ptr or not free_ptr:
            return None
        new = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ThreadpoolParams))(new_ptr)
        free = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(free_ptr)
        attach.restype, attach.argtypes = None, [ctypes.c_void_p] * 3

        def params(n_threads: int, paused: bool) -> _ThreadpoolParams:
            p = _ThreadpoolParams()
            p.n_threads, p.prio, p.poll, p.strict_cpu, p.paused = (
                n_threads, 0, THREADPOOL_POLL, False, paused,
            )  # fmt: skip
            return p

        n, n_batch = int(llama_c.llama_n_threads(ctx)), int(llama_c.llama_n_threads_batch(ctx))
        pool_batch = None
        if n_batch != n:
            pool_batch = new(ctypes.byref(params(n_batch, False)))
            if not pool_batch:
                return None
        pool = new(ctypes.byref(params(n, pool_batch is not None)))
        if not pool:
            if pool_batch:
                free(pool_batch)
            return None
        attach(ctx, pool, pool_batch)
        return cls(pool, pool_batch, free)

    def free(self) -> None:
        """Free the pools; only after the context that used them is freed."""
        for p in (self.pool, self.pool_batch):
            if p:
                self._free(p)
        self.pool = self.pool_batch = 0


def cpu_buffer_type(pinned: bool = False) -> int:
    """Where overridden tensors go: ``ggml_backend_cpu_buffer_type()``, or with ``pinned`` the
    first GPU's host buffer type (pinned memory, which op offload copies from at full PCIe speed).

    llama.cpp itself puts CPU layers in that host buffer when the model is not memory-mapped;
    overridden tensors get exactly the buffer type we name, so we name the same one. A build
    without a GPU device (or one with no host buffer type) falls back to the plain CPU buffer.
    """
    if pinned:
        try:
            by_type = ggml_symbol("ggml_backend_dev_by_type")
            host = ggml_symbol("ggml_backend_dev_host_buffer_type")
        except LoadFailed:
            by_type = host = None
        if by_type is not None and host is not None:
            by_type.restype, by_type.argtypes = ctypes.c_void_p, [ctypes.c_int]
            host.restype, host.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
            dev = by_type(1)  # GGML_BACKEND_DEVICE_TYPE_GPU
            buft = host(dev) if dev else None
            if buft:
                return int(buft)
    fn = ggml_symbol("ggml_backend_cpu_buffer_type")
    fn.restype, fn.argtypes = ctypes.c_void_p, []
    return int(fn())


def _gpu_devices() -> list[int]:
    """llama.cpp's GPUs in its own order (the order of ``tensor_split``): discrete GPUs, or the
    integrated ones where there is none."""
    count, get, kind = (
        ggml_symbol(n)
        for n in ("ggml_backend_dev_count", "ggml_backend_dev_get", "ggml_backend_dev_type")
    )
    count.restype, count.argtypes = ctypes.c_size_t, []
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    kind.restype, kind.argtypes = ctypes.c_int, [ctypes.c_void_p]
    devs = [(int(get(i)), kind(get(i))) for i in range(count())]
    gpus = [d for d, k in devs if k == 1]
    return gpus or [d for d, k in devs if k == 2]


def gpu_buffer_type(index: int) -> int:
    """The buffer type of llama.cpp's GPU ``index``: where a GPU override puts its tensors."""
    gpus = _gpu_devices()
    if not 0 <= index < len(gpus):
        raise PlanNotApplicable(
            f"the plan moves tensors to GPU {index}; llama.cpp sees {len(gpus)} GPU(s)"
        )
    fn = ggml_symbol("ggml_backend_dev_buffer_type")
    fn.restype, fn.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    buft = fn(gpus[index])
    if not buft:
        raise PlanNotApplicable(f"llama.cpp's GPU {index} has no buffer type")
    return int(buft)


def overrides_array(
    patterns: Sequence[str],
    pinned: bool = False,
    gpu_patterns: Sequence[tuple[str, int]] = (),
) -> ctypes.Array[_BuftOverride] | None:
    """A NULL-terminated ``llama_model_tensor_buft_override`` array placing ``patterns`` on the CPU
    and each of ``gpu_patterns`` on its GPU. llama.cpp takes the first pattern a tensor name
    matches, so the GPU ones come first, as the planner reads them."""
    rules = [(p, gpu_buffer_type(g)) for p, g in gpu_patterns]
    if patterns:
        buft = cpu_buffer_type(pinned)
        rules += [(p, buft) for p in patterns]
    if not rules:
        return None
    arr = (_BuftOverride * (len(rules) + 1))()
    for i, (p, b) in enumerate(rules):
        arr[i].pattern = p.encode("utf-8")
        arr[i].buft = b
    arr[len(rules)].pattern = None
    arr[len(rules)].buft = None
    return arr


# -- checking a plan before loading -------------------------------------------------------------


def gpu_device_count() -> int:
    """GPUs llama.cpp can offload to (0 on a CPU-only build)."""
    if not llama_c.llama_supports_gpu_offload():
        return 0
    try:
        return len(_gpu_devices())
    except LoadFailed:
        return 1  # no device API to ask; offload support implies at least one GPU


def gguf_tensor_names(model_path: Path) -> tuple[str, ...]:
    """The tensor names of a GGUF file (its header read once per file version: a header with a
    large vocabulary takes a tenth of a second or more to read)."""
    try:
        st = model_path.stat()
    except OSError as e:
        raise LoadFailed(f"cannot read {model_path}: {e}") from None
    return _tensor_names(str(model_path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _tensor_names(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    from offload.planner.errors import GGUFError
    from offload.planner.gguf_header import read_header

    try:
        return tuple(t.name for t in read_header(path).tensors)
    except (OSError, GGUFError) as e:
        raise LoadFailed(f"cannot read {path}: {e}") from None


def check_applicable(
    plan: Plan,
    model_path: Path | str,
    tensor_names: Sequence[str] | None = None,
    n_gpus: int | None = None,
) -> None:
    """Raise ``PlanNotApplicable`` when llama.cpp could not apply ``plan`` as written."""
    try:  # non-blocking: a FIFO put in the model's place never blocks the runner
        fd = os.open(model_path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise LoadFailed(f"cannot read {model_path}: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LoadFailed(f"cannot read {model_path}: it is not a regular file")
    finally:
        os.close(fd)
    names: Sequence[str] = ()
    gpu_patterns = tuple(plan.gpu_tensor_patterns)
    if plan.cpu_tensor_patterns or gpu_patterns:
        names = tensor_names if tensor_names is not None else gguf_tensor_names(Path(model_path))
    for pattern in (*(p for p, _ in gpu_patterns), *plan.cpu_tensor_patterns):
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise PlanNotApplicable(
                f"tensor pattern {pattern!r} is not a valid regex: {e}"
            ) from None
        # llama.cpp uses std::regex_search, i.e. a match anywhere in the name.
        if not any(rx.search(n) for n in names):
            raise PlanNotApplicable(
                f"tensor pattern {pattern!r} matches no tensor of {Path(model_path).name}"
            )
    gpus = gpu_device_count() if n_gpus is None else n_gpus
    uses_gpu = plan.n_gpu_layers != 0 or any(
        d.kind == "GPU" and d.weights_bytes for d in plan.devices
    )
    if uses_gpu and gpus == 0:
        raise PlanNotApplicable(
            f"the plan puts {plan.n_gpu_layers} layers on a GPU, but llama.cpp sees no GPU here"
        )
    for _, g in gpu_patterns:
        if not 0 <= g < gpus:
            raise PlanNotApplicable(
                f"the plan moves tensors to GPU {g}; llama.cpp sees {gpus} GPU(s)"
            )
    if plan.tensor_split and len([x for x in plan.tensor_split if x > 0]) > max(gpus, 1):
        raise PlanNotApplicable(
            f"the plan splits over {len(plan.tensor_split)} GPUs; llama.cpp sees {gpus}"
        )
    if uses_gpu and plan.main_gpu >= max(gpus, 1):
        raise PlanNotApplicable(f"the plan's main GPU is {plan.main_gpu}; llama.cpp sees {gpus}")
    if plan.split_mode not in SPLIT_MODES:
        raise PlanNotApplicable(
            f"unknown split mode {plan.split_mode!r}; known: {', '.join(SPLIT_MODES)}"
        )
    if plan.kv_type not in KV_TYPES:
        raise PlanNotApplicable(
            f"plan asks for KV cache type {plan.kv_type!r}; known: {', '.join(KV_TYPES)}"
        )
