"""The server's handle on one runner process: start it, talk to it, notice when it dies.

A ``RunnerProcess`` starts ``python -m offload.runtime.runner`` with one end of a socketpair,
sends it the model and plan, and then multiplexes requests over the socket (``runner.protocol``).
The runner's stderr (llama.cpp's log, crash reports) goes to ``<data dir>/logs/runner-<model>.log``,
size-capped and rotated, and its last lines are kept in memory. When the runner dies (a signal,
an abort, the kernel's OOM killer) or stops answering, every request in flight ends with
``RunnerCrashed``, which names the signal and quotes those last lines; the server keeps running.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from offload.planner.types import Plan
from offload.runtime import config
from offload.runtime.errors import LoadFailed, RuntimeFailure
from offload.runtime.runner import protocol
from offload.runtime.runner.generation import Piece, Sampling, Stats, TokenLogprob

__all__ = ["RunnerProcess", "RunnerCrashed", "log_path_for", "LOG_CAP_BYTES"]

log = logging.getLogger(__name__)

LOG_CAP_BYTES = 8 << 20  # per log file; one rotated copy is kept
_TAIL_LINES = 40
_CLOSED = object()


class RunnerCrashed(RuntimeFailure):
    """A runner process died or stopped answering; its requests end with this error."""

    http_status = 500

    def __init__(self, message: str, hung: bool = False, returncode: int | None = None) -> None:
        super().__init__(message)
        self.hung = hung
        self.returncode = returncode


def log_path_for(name: str) -> Path:
    """``<data dir>/logs/runner-<model>.log`` (the name made safe for a file name)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:120] or "model"
    return config.log_dir() / f"runner-{safe}.log"


class _Log:
    """The runner's log file: appended to, rotated once past ``LOG_CAP_BYTES``; last lines kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._f = self._open()

    def _open(self) -> Any:
        if self.path.exists() and self.path.stat().st_size > LOG_CAP_BYTES:
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        return self.path.open("ab")

    def write(self, line: bytes) -> None:
        text = line.decode("utf-8", errors="replace").rstrip("\n")
        if text.strip():
            self.tail.append(text)
        try:
            self._f.write(line if line.endswith(b"\n") else line + b"\n")
            self._f.flush()
            if self._f.tell() > LOG_CAP_BYTES:
                self._f.close()
                self._f = self._open()
        except OSError:
            pass  # a full disk must not take the runner down with it

    def last(self, n: int = 5) -> str:
        """The last lines worth quoting: llama.cpp's routine load chatter is left in the file."""
        lines = [ln.strip() for ln in self.tail if ln.strip()]
        telling = [ln for ln in lines if " INFO offload.runtime.llama_cpp: " not in ln]
        picked = (telling or lines)[-n:]
        return " | ".join(_short(ln) for ln in picked)[-600:]

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass


_PREFIX = re.compile(r"^\S+ \S+ runner\[\d+\] ")


def _short(line: str) -> str:
    """A log line without its timestamp and process tag."""
    return _PREFIX.sub("", line)


def _how(rc: int | None) -> str:
    if rc is None:
        return "stopped answering"
    if rc < 0:
        try:
            return f"stopped ({signal.Signals(-rc).name})"
        except ValueError:
            return f"stopped (signal {-rc})"
    return f"stopped (exit code {rc})"


class _Request:
    """What the reader hands one request: events, or the reason the runner went away."""

    def __init__(self, phase: str) -> None:
        self.events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.phase = phase


def _spawn() -> tuple[subprocess.Popen[bytes], socket.socket]:
    """A runner process, its end of the channel and its output (for the log) piped to us. It loads
    Python and llama.cpp's libraries, then waits for its load message."""
    parent, child = socket.socketpair()
    cmd = [sys.executable, "-m", "offload.runtime.runner", "--fd", str(child.fileno())]
    # On an abort ggml would run gdb for a backtrace, which can take minutes; its message and
    # our own faulthandler's traceback are what the log needs.
    env = {"GGML_NO_BACKTRACE": "1", **os.environ}
    try:
        proc = subprocess.Popen(
            cmd,
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError:
        parent.close()
        raise
    finally:
        child.close()  # the runner holds its own copy
    return proc, parent


class _Spares:
    """One runner process started ahead of the next load, where the server asked for it.

    Starting Python and loading llama.cpp's libraries (CUDA's among them) takes 0.2 s on a CPU
    build and 0.6-0.8 s on a CUDA one; a spare has done it before the load is asked for. It holds
    no model and touches no GPU (no device call is made before the load message), so it holds no
    GPU memory; it exits when its channel closes, with the server. A spare started under other
    environment variables than the load's is not used.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.enabled = False
        self._spare: tuple[subprocess.Popen[bytes], socket.socket, tuple[Any, ...]] | None = None

    # Variables that change under a caller without changing what a runner does.
    _VOLATILE = frozenset({"PYTEST_CURRENT_TEST"})

    @classmethod
    def _key(cls) -> tuple[Any, ...]:
        env = (kv for kv in os.environ.items() if kv[0] not in cls._VOLATILE)
        return (sys.executable, tuple(sorted(env)))

    def enable(self) -> None:
        """Keep a spare from now on (the server does; one-off callers need none)."""
        self.enabled = True
        self.refill()

    def take(self) -> tuple[subprocess.Popen[bytes], socket.socket] | None:
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is None:
            return None
        proc, sock, key = spare
        if proc.poll() is None and key == self._key():
            return proc, sock
        _end(proc, sock)
        return None

    def refill(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._spare is not None and self._spare[0].poll() is None:
                return
            old, self._spare = self._spare, None
            try:
                proc, sock = _spawn()
            except OSError as e:
                log.warning("could not start a spare runner: %s", e)
            else:
                self._spare = (proc, sock, self._key())
        if old is not None:
            _end(old[0], old[1])

    def close(self) -> None:
        """End the spare (the server stops); none is started again until ``enable``."""
        with self._lock:
            self.enabled = False
            spare, self._spare = self._spare, None
        if spare is not None:
            _end(spare[0], spare[1])

    def pid(self) -> int | None:
        with self._lock:
            return self._spare[0].pid if self._spare is not None else None


def _end(proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
    """End a runner that was never handed a load: closing its channel makes it exit."""
    sock.close()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


_spares = _Spares()
keep_spare_runner = _spares.enable
close_spare_runner = _spares.close


class RunnerProcess:
    """One model loaded in a child process; thread-safe: any number of requests at once."""

    def __init__(
        self,
        name: str,
        proc: subprocess.Popen[bytes],
        sock: socket.socket,
        log_file: _Log,
        on_exit: Callable[[RunnerProcess], None] | None,
    ) -> None:
        self.name = name
        self.proc = proc
        self.pid = proc.pid
        self.sock = sock
        self.log = log_file
        self.on_exit = on_exit
        self._reader = sock.makefile("rb", buffering=1 << 16)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._requests: dict[int, _Request] = {}
        self._last_event = time.monotonic()
        self.dead: RunnerCrashed | None = None
        self.returncode: int | None = None
        self.closing = False
        self._hung = False
        self._copier = threading.Thread(
            target=self._copy_log, name=f"runner-log-{proc.pid}", daemon=True
        )
        # Filled by the load handshake.
        self.plan: Plan | None = None
        self.load_s = 0.0  # from the process's start to the model's being ready
        # Where that time went: process_s (the interpreter and llama.cpp's libraries), then the
        # runner's model_s, context_s, first_eval_s and other_s (see Engine.phases).
        self.phases: dict[str, float] = {}
        self.n_ctx = 0
        self.n_parallel = 1
        self.n_vocab = 0
        self.measured_bytes: dict[str, dict[str, int]] = {}
        self.memory: dict[str, Any] = {}
        self.gave_up: list[str] = []
        self.extra_bufts = True
        self.buffers: list[
            str
        ] = []  # llama.cpp's weight buffers (CPU_REPACK: extra buffer types in use)

    # -- starting ----------------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        name: str,
        model_path: Path | str,
        plan: Plan,
        *,
        adapters: Sequence[Path | str] = (),
        extra_bufts: bool = True,
        verify: bool = True,
        load_timeout_s: float | None = None,
        on_exit: Callable[[RunnerProcess], None] | None = None,
    ) -> RunnerProcess:
        """Start a runner and load the model; returns once it is loaded.

        Raises the runner's own load error (``OutOfMemory``, ``LoadFailed``...), or
        ``RunnerCrashed`` when the process died or stalled while loading.
        """
        log_file = _Log(log_path_for(name))
        t0 = time.monotonic()
        spare = _spares.take()
        if spare is not None:
            proc, parent = spare
        else:
            try:
                proc, parent = _spawn()
            except OSError as e:
                log_file.close()
                raise LoadFailed(
                    f"the runner for {name} could not start: {e}; see {log_file.path}"
                ) from None
        runner = cls(name, proc, parent, log_file, on_exit)
        runner._copier.start()
        runner._send(
            [
                {
                    "op": "load",
                    "model": str(model_path),
                    "plan": plan.to_dict(),
                    "adapters": [str(a) for a in adapters],
                    "extra_bufts": extra_bufts,
                    "verify": verify,
                }
            ]
        )
        try:
            runner._handshake(
                load_timeout_s if load_timeout_s is not None else config.load_timeout_s(), t0
            )
        except BaseException:
            # Whatever went wrong, no half-started runner is left holding memory.
            runner._kill()
            runner.close(timeout_s=5)
            raise
        finally:
            _spares.refill()  # the next load's process starts now, while this model serves
        threading.Thread(
            target=runner._read_loop, name=f"runner-read-{proc.pid}", daemon=True
        ).start()
        threading.Thread(target=runner._watch, name=f"runner-watch-{proc.pid}", daemon=True).start()
        return runner

    def _copy_log(self) -> None:
        out = self.proc.stdout
        assert out is not None
        for line in iter(out.readline, b""):
            self.log.write(line)
        self.log.close()

    def _handshake(self, timeout_s: float, t0: float) -> None:
        self.sock.settimeout(timeout_s)
        started = False
        t_started = t0
        try:
            while True:
                try:
                    line = self._reader.readline()
                except (TimeoutError, OSError):
                    self._hung = True  # no progress for the whole load timeout
                    self._kill()
                    line = b""
                if not line:
                    if not started:
                        raise self._not_started()
                    raise self._ended("loading")
                msg = protocol.decode(line)
                ev = msg.get("ev")
                if ev == "started":
                    started = True
                    t_started = time.monotonic()
                    continue
                if ev in ("progress", "tick"):
                    continue
                if ev == "load_failed":
                    self.close()
                    raise protocol.error_from(str(msg.get("kind")), str(msg.get("message")))
                if ev == "loaded":
                    self.plan = Plan.from_dict(msg["plan"])
                    # The whole wait, as a client sees it: the process's start included.
                    self.load_s = time.monotonic() - t0
                    got = msg.get("phases")
                    phases: dict[str, Any] = got if isinstance(got, dict) else {}
                    self.phases = {
                        "process_s": t_started - t0,
                        **{
                            str(k): float(v)
                            for k, v in phases.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)
                        },
                    }
                    log.info(
                        "runner for %s (pid %d) ready in %.2f s: %s",
                        self.name,
                        self.pid,
                        self.load_s,
                        ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in self.phases.items()),
                    )
                    self.n_ctx = int(msg.get("n_ctx", 0))
                    self.n_parallel = int(msg.get("n_parallel", 1))
                    self.n_vocab = int(msg.get("n_vocab", 0))
                    self.measured_bytes = msg.get("measured_bytes") or {}
                    self.memory = msg.get("memory") or {}
                    self.gave_up = list(msg.get("gave_up") or [])
                    self.extra_bufts = bool(msg.get("extra_bufts", True))
                    self.buffers = list(msg.get("buffers") or [])
                    return
        finally:
            if self.dead is None:
                self.sock.settimeout(None)

    def _ended(self, phase: str) -> RunnerCrashed:
        """The runner's socket closed: wait for the process (kill it if it lingers) and make the
        error its requests get."""
        try:
            rc = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._hung = not self.closing
            self._kill()
            rc = self.proc.wait()
        self._copier.join(timeout=2)  # the log copier takes the last lines the process wrote
        if self.closing:
            how = "was unloaded"
        elif self._hung:
            how = f"stopped answering for {config.load_timeout_s():.0f} s and was stopped"
        else:
            how = _how(rc)
        tail = self.log.last()
        message = f"the runner for {self.name} {how} while {phase}"
        message += f"; last log lines: {tail}" if tail else ""
        message += f" (full log: {self.log.path})"
        self.returncode = rc
        self.dead = RunnerCrashed(message, hung=self._hung, returncode=rc)
        return self.dead

    def _not_started(self) -> LoadFailed:
        """The process ended before llama.cpp was even loaded: an install problem, not the model."""
        self._ended("starting")
        tail = self.log.last()
        how = _how(self.returncode).removeprefix("stopped ")
        return LoadFailed(
            f"the runner for {self.name} could not start {how}"
            + (f": {tail}" if tail else "")
            + f"; see {self.log.path}"
        )

    # -- reading -----------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        try:
            for line in iter(self._reader.readline, b""):
                self._last_event = time.monotonic()
                try:
                    msg = protocol.decode(line)
                except ValueError:
                    continue
                rid = msg.get("id")
                if rid is None:
                    continue
                with self._lock:
                    req = self._requests.get(int(rid))
                if req is not None:
                    req.events.put(msg)
        except (OSError, ValueError):
            pass
        with self._lock:
            phases = {r.phase for r in self._requests.values()}
        err = self._ended(" and ".join(sorted(phases)) or "idle")
        with self._lock:
            for req in self._requests.values():
                req.events.put(err)
        if self.on_exit is not None:
            self.on_exit(self)

    def _watch(self) -> None:
        """End a runner that has requests in flight but has said nothing for the load timeout."""
        while self.dead is None:
            time.sleep(0.5)
            with self._lock:
                busy = bool(self._requests)
            limit = config.load_timeout_s()
            if busy and time.monotonic() - self._last_event > limit and self.dead is None:
                log.error(
                    "runner %d for %s stopped answering for %.0f s; ending it",
                    self.pid,
                    self.name,
                    limit,
                )
                self._hung = True
                self._kill()  # the reader sees the end and reports it as a hang
                return

    def _kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass

    # -- requests ----------------------------------------------------------------------------------

    def _send(self, messages: list[dict[str, Any]]) -> None:
        data = protocol.encode(messages)
        try:
            with self._send_lock:
                self.sock.sendall(data)
        except OSError:
            pass  # the reader notices the end and tells every request

    def _open(self, phase: str) -> tuple[int, _Request]:
        if self.dead is not None:
            raise self.dead
        rid = next(self._ids)
        req = _Request(phase)
        with self._lock:
            self._requests[rid] = req
            if len(self._requests) == 1:  # idle until now: the silence so far was no hang
                self._last_event = time.monotonic()
        return rid, req

    def _close_request(self, rid: int) -> None:
        with self._lock:
            self._requests.pop(rid, None)

    def _next(self, req: _Request) -> dict[str, Any]:
        item = req.events.get()
        if isinstance(item, BaseException):
            raise item
        if item.get("ev") == "error":
            raise protocol.error_from(str(item.get("kind")), str(item.get("message")))
        return item

    def call(self, op: str, phase: str, **fields: Any) -> Any:
        """A one-answer operation (tokenize, detokenize, embed, bench, stats)."""
        rid, req = self._open(phase)
        try:
            self._send([{"op": op, "id": rid, **fields}])
            return self._next(req).get("value")
        finally:
            self._close_request(rid)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Text to token ids with the model's tokenizer (template markers parsed as special tokens)."""
        return list(self.call("tokenize", "tokenizing", text=text, add_bos=add_bos))

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Token ids to text."""
        return str(self.call("detokenize", "detokenizing", tokens=list(tokens)))

    def embed(
        self, inputs: Sequence[str | Sequence[int]], truncate: bool = True
    ) -> tuple[list[list[float]], int]:
        """Embeddings of each input (text or token ids), and the tokens used."""
        value = self.call(
            "embed",
            "embedding",
            inputs=[x if isinstance(x, str) else list(x) for x in inputs],
            truncate=truncate,
        )
        return value["embeddings"], int(value["tokens"])

    def generate(
        self,
        sampling: Sampling,
        *,
        tokens: Sequence[int] | None = None,
        text: str | None = None,
        add_bos: bool = True,
        truncate: bool = True,
        cancel: Any = None,
        want_tokens: bool = False,
        ignore_eos: bool = False,
    ) -> Iterator[Piece | Stats]:
        """Stream pieces of text for a prompt (token ids, or text the runner tokenizes); the last item
        is the ``Stats``. ``cancel`` (an event) ends the generation at the runner's next step."""
        rid, req = self._open("generating")
        cancelled = threading.Event()

        def send_cancel() -> None:
            if not cancelled.is_set():
                cancelled.set()
                self._send([{"op": "cancel", "id": rid}])

        hook = getattr(cancel, "add_callback", None)
        if hook is not None:
            hook(send_cancel)
        finished = False
        try:
            self._send(
                [
                    {
                        "op": "generate",
                        "id": rid,
                        "tokens": None if tokens is None else list(tokens),
                        "text": text,
                        "add_bos": add_bos,
                        "sampling": protocol.sampling_to_json(sampling),
                        "truncate": truncate,
                        "want_tokens": want_tokens,
                        "ignore_eos": ignore_eos,
                    }
                ]
            )
            while True:
                if hook is None and cancel is not None and cancel.is_set():
                    send_cancel()
                try:
                    item = req.events.get(
                        timeout=None if hook is not None or cancel is None else 0.05
                    )
                except queue.Empty:
                    continue
                if isinstance(item, BaseException):
                    raise item
                ev = item.get("ev")
                if ev == "piece":
                    lps = tuple(TokenLogprob.from_dict(d) for d in item.get("logprobs") or ())
                    yield Piece(item.get("text") or "", lps)
                elif ev == "done":
                    finished = True
                    yield Stats.from_dict(item.get("stats") or {})
                    return
                elif ev == "error":
                    finished = True
                    raise protocol.error_from(str(item.get("kind")), str(item.get("message")))
        finally:
            if not finished and self.dead is None:
                send_cancel()  # the caller stopped reading: the runner frees the slot at once
            self._close_request(rid)

    def memory_report(self) -> dict[str, Any]:
        """Predicted and measured bytes per device, as the runner reported them at load."""
        return dict(self.memory)

    @property
    def in_flight(self) -> int:
        """Requests this runner is serving or queueing now."""
        with self._lock:
            return len(self._requests)

    # -- ending ------------------------------------------------------------------------------------

    def close(self, timeout_s: float = 10.0) -> None:
        """Ask the runner to exit (freeing every byte it holds); kill it if it does not."""
        self.closing = True
        if self.proc.poll() is None:
            self._send([{"op": "shutdown"}])
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._kill()
                self.proc.wait()
        try:
            self.sock.close()
        except OSError:
            pass
