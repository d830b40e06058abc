"""Which models are loaded, each in its own runner process, with which plan, and for how long.

``Scheduler.acquire(name, options)`` resolves the model, plans it against this machine, starts a
runner process for it (or reuses the loaded one when the plan-changing options match) and hands it
to the request; any number of requests share one runner, which batches them. Idle models expire
after their keep-alive; at most ``max_loaded`` stay loaded, the least recently used going first.
A runner that dies is dropped at once, and the next request for its model starts a new one. A
runner that dies while loading is retried with one safer setting at a time (``safety``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from offload.models.store import ModelInfo, Store
from offload.planner.anatomy import read as read_anatomy
from offload.planner.errors import PlanInfeasible
from offload.planner.gguf_header import read_header
from offload.planner.types import Hardware, Plan
from offload.runtime import config
from offload.runtime.errors import QueueFull
from offload.runtime.serving import planning, process
from offload.runtime.serving.healing import shrink_step
from offload.runtime.serving.options import plan_key
from offload.runtime.serving.planning import current_hardware
from offload.runtime.serving.process import RunnerCrashed, RunnerProcess
from offload.runtime.serving.safety import SAFER_STEPS, Safety

__all__ = [
    "Runner",
    "Scheduler",
    "memory_split",
    "all_on_gpu",
    "current_hardware",
    "CRASH_SHRINK_STEPS",
]

log = logging.getLogger(__name__)

# After the safer settings, a load that keeps crashing gives up this many shrink steps (GPU layers,
# expert tensors, context) before the error is the user's.
CRASH_SHRINK_STEPS = 3


def all_on_gpu(plan: Plan, n_layers: int) -> bool:
    """Every layer and the output layer on GPUs with no tensor kept back."""
    p = plan.placement
    gpus = any(d.kind == "GPU" for d in plan.devices)
    return gpus and n_layers > 0 and p.n_gpu_layers > n_layers and not p.cpu_tensor_patterns


def memory_split(
    plan: Plan, measured: Mapping[str, Mapping[str, int]], n_layers: int
) -> tuple[int, int]:
    """(bytes in all, bytes on GPUs) of a loaded model: what llama.cpp reported allocating where
    there is a report, the plan's prediction otherwise.

    A full offload counts as all GPU, as Ollama's ``ps`` calls it ``100% GPU``: llama.cpp still
    keeps the token embeddings and staging buffers in host memory then.
    """
    if measured:
        gpu = sum(sum(v.values()) for dev, v in measured.items() if dev != "CPU")
        total = sum(sum(v.values()) for v in measured.values())
    else:
        gpu = sum(d.total_bytes for d in plan.devices if d.kind == "GPU")
        total = sum(d.total_bytes for d in plan.devices)
    return (total, total) if all_on_gpu(plan, n_layers) else (total, gpu)


@dataclass
class Runner:
    """One loaded model: its runner process and how the server uses it."""

    info: ModelInfo
    plan: Plan
    proc: RunnerProcess
    key: tuple[tuple[str, Any], ...]
    keep_alive_s: float = 300.0
    last_used: float = field(default_factory=time.monotonic)
    expires_at: float = float("inf")
    refs: int = 0  # requests holding or waiting for this runner; only a runner at 0 may be unloaded
    last_stats: Any = None
    doomed: bool = False  # unload asked for while in use: unload when its requests end
    # What the load gave up (memory) or turned off (after crashes), as sentences for the user.
    gave_up: list[str] = field(default_factory=list)
    safety: list[str] = field(default_factory=list)
    n_layers: int = 0  # the model's repeating layers, to tell a full offload from a partial one

    def memory(self) -> tuple[int, int]:
        """(bytes in all, bytes on GPUs) as ``ps`` shows them; see ``memory_split``."""
        return memory_split(self.plan, self.proc.measured_bytes, self.n_layers)

    @property
    def name(self) -> str:
        """The model's display name."""
        return self.info.name.display

    @property
    def busy(self) -> int:
        """Requests using this runner now."""
        return self.refs

    def touch(self, keep_alive_s: float) -> None:
        """Mark used now and restart the keep-alive clock."""
        self.keep_alive_s = keep_alive_s
        self.last_used = time.monotonic()
        self.expires_at = self.last_used + keep_alive_s


# A loaded model is evicted for a new one when the new one's plan with the whole machine would
# decode this much faster than the plan it gets in what is left.
FASTER_BY = 1.5


class Scheduler:
    """Loads, shares and unloads models for the server.

    Loading plans a model against the memory the loaded ones leave free. When it would not fit,
    or would run much slower than with the whole machine, idle models are unloaded, least recently
    used first; when none is idle the request waits for one. Requests beyond every runner's
    parallel slots wait in their runner's queue; beyond ``OFFLOAD_MAX_QUEUE`` of those, a request
    gets ``QueueFull`` (a 503).
    """

    def __init__(
        self,
        store: Store,
        hardware: Callable[[], Hardware] | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.store = store
        self.hardware = hardware or current_hardware
        self.runners: dict[str, Runner] = {}
        self._lock = threading.RLock()
        self._load_lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._in_flight = 0
        self._stop = threading.Event()
        self._on_event = on_event
        self._reaper = threading.Thread(target=self._reap_loop, name="offload-reaper", daemon=True)
        self._reaper.start()

    def _event(self, kind: str, **data: Any) -> None:
        log.info("%s %s", kind, data)
        if self._on_event is not None:
            self._on_event(kind, data)

    # -- planning ------------------------------------------------------------------------------

    def resolve(self, name: str) -> ModelInfo:
        """Resolve a model name (importing the embedded default on first use)."""
        from offload.models import embedded

        embedded.ensure(self.store, name)
        return self.store.resolve(name)

    def held_bytes(
        self, exclude: str | tuple[str, bool] | None = None
    ) -> dict[tuple[str, int], int]:
        """Bytes the loaded models hold, per device (``("CPU", 0)``, ``("GPU", index)``)."""
        skip = exclude[0] if isinstance(exclude, tuple) else exclude
        held: dict[tuple[str, int], int] = {}
        with self._lock:
            for name, r in self.runners.items():
                if name == skip:
                    continue
                for d in r.plan.devices:
                    held[(d.kind, d.index)] = held.get((d.kind, d.index), 0) + d.total_bytes
        return held

    def plan_for(
        self,
        info: ModelInfo,
        options: dict[str, Any],
        held: dict[tuple[str, int], int] | None = None,
    ) -> Plan:
        """The plan this model gets here with these options, in what ``held`` leaves free."""
        return planning.plan_for(
            info.model_path, options, digest=info.digest, hw=self.hardware(), held=held
        )

    def _fitting_plan(self, info: ModelInfo, options: dict[str, Any]) -> Plan | None:
        """A plan in the free memory that is not much slower than the best; None: make room first."""
        held = self.held_bytes(exclude=info.name.display)
        try:
            shared = self.plan_for(info, options, held)
        except PlanInfeasible:
            if not held:
                raise
            return None
        if not held:
            return shared
        best = self.plan_for(info, options, {})
        if best.predicted.decode_tps > FASTER_BY * shared.predicted.decode_tps:
            return None
        return shared

    # -- starting runners ----------------------------------------------------------------------

    def _start(self, info: ModelInfo, plan: Plan) -> tuple[RunnerProcess, list[str], list[str]]:
        """Start a runner; when it dies while loading, try again with one safer setting at a time,
        then smaller plans. Returns (runner, what was given up, what is off on this machine)."""
        safety = Safety(self.hardware().fingerprint)
        extra_bufts = not safety.is_off("extra_bufts")
        if safety.is_off("mmap") and not plan.use_mmap:
            plan = plan.with_knobs(use_mmap=True)
        name = info.name.display
        gave_up: list[str] = []
        turned_off: list[tuple[str, str]] = []
        shrinks = 0
        names: list[str] | None = None
        while True:
            try:
                proc = RunnerProcess.start(
                    name,
                    info.model_path,
                    plan,
                    adapters=info.adapters,
                    extra_bufts=extra_bufts,
                    on_exit=self._on_exit,
                )
                break
            except RunnerCrashed as crash:
                if crash.hung:
                    raise  # a safer setting does not make a hang go away
                how = f"a runner {str(crash).split(' while ')[0].removeprefix(f'the runner for {name} ')}"
                log.warning("%s; trying a safer setting", crash)
                if extra_bufts:
                    extra_bufts = False
                    turned_off.append(("extra_bufts", f"{how} while loading {name} with them on"))
                    continue
                if not plan.use_mmap:
                    plan = plan.with_knobs(use_mmap=True)
                    turned_off.append(
                        ("mmap", f"{how} while loading {name} with the file read into memory")
                    )
                    continue
                if names is None:
                    names = [t.name for t in read_header(info.model_path).tensors]
                step = shrink_step(plan, shrinks, names) if shrinks < CRASH_SHRINK_STEPS else None
                if step is None:
                    tried = "; ".join(w for _, w in turned_off) or ""
                    raise RunnerCrashed(
                        f"{crash}" + (f" (after turning off: {tried})" if tried else "")
                    ) from None
                shrinks += 1
                plan, sentence = step
                gave_up.append(f"{sentence} after {how}")
        for key, why in turned_off:
            safety.remember(key, why)
        what = {s.key: s.what for s in SAFER_STEPS}
        for key, _ in turned_off:
            log.warning("%s: %s turned off after a crash", name, what[key])
        return proc, gave_up + proc.gave_up, safety.sentences()

    def _load(self, info: ModelInfo, options: dict[str, Any], plan: Plan) -> Runner:
        proc, gave_up, safety = self._start(info, plan)
        loaded = proc.plan or plan
        if gave_up:
            loaded = dataclasses.replace(loaded, reasons=(*loaded.reasons, *gave_up))
        fresh = [x for x in safety if x not in loaded.reasons]  # turned off during this very load
        warning = planning.usable_hardware().warning if self.hardware is current_hardware else None
        if warning:
            # GPUs this llama.cpp build cannot use: the log and /api/ps say so, with the fix.
            log.warning("%s", warning)
            fresh.append(warning)
        if fresh:
            loaded = dataclasses.replace(loaded, reasons=(*loaded.reasons, *fresh))
        self._event(
            "load",
            model=info.name.display,
            n_ctx=loaded.n_ctx,
            parallel=proc.n_parallel,
            pid=proc.pid,
            gave_up=gave_up,
        )
        for sentence in gave_up:
            log.warning("%s: %s", info.name.display, sentence)
        return Runner(
            info=info,
            plan=loaded,
            proc=proc,
            key=plan_key(options),
            gave_up=gave_up,
            safety=safety,
            n_layers=read_anatomy(info.model_path).n_layers,
        )

    def _on_exit(self, proc: RunnerProcess) -> None:
        """A runner process ended: drop it if it is still the loaded one (a crash, not an unload)."""
        with self._lock:
            for name, r in list(self.runners.items()):
                if r.proc is proc:
                    del self.runners[name]
                    if not proc.closing:
                        self._event("crash", model=name, pid=proc.pid, returncode=proc.returncode)
                    self._changed.notify_all()

    # -- handing runners out -------------------------------------------------------------------

    @contextlib.contextmanager
    def acquire(
        self,
        name: str,
        options: dict[str, Any] | None = None,
        keep_alive_s: float | None = None,
        embedding: bool = False,
    ) -> Iterator[Runner]:
        """Hold a loaded model for one request; it is kept alive ``keep_alive_s`` after (0: unload now).

        Embedding and generation share one runner, as in Ollama (``embedding`` is accepted for
        callers that say which they do).
        """
        options = options or {}
        keep = config.keep_alive_s() if keep_alive_s is None else keep_alive_s
        with self._lock:
            slots = sum(r.proc.n_parallel for r in self.runners.values())
            if self._in_flight >= max(1, config.max_queue()) + slots:
                raise QueueFull(
                    f"server busy: {self._in_flight} requests are in flight; try again shortly"
                )
            self._in_flight += 1
        try:
            info = self.resolve(name)
            runner = self._get_or_load(info, options)
            try:
                runner.expires_at = float("inf")
                yield runner
            finally:
                to_close = None
                with self._lock:
                    runner.refs -= 1
                    if runner.refs == 0:
                        runner.touch(keep)
                    if (keep <= 0 or runner.doomed) and runner.refs == 0:
                        to_close = self._pop(runner.name, runner)
                    self._changed.notify_all()
                if to_close is not None:
                    self._close_runner(to_close)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _get_or_load(self, info: ModelInfo, options: dict[str, Any]) -> Runner:
        name = info.name.display
        key = plan_key(options)
        while True:
            to_close: Runner | None = None
            with self._lock:
                runner = self.runners.get(name)
                if runner is not None and runner.info.digest == info.digest and runner.key == key:
                    runner.refs += 1
                    return runner
                if runner is not None:
                    # Another digest or plan-changing options: reload once nobody uses the old one.
                    if runner.refs:
                        self._changed.wait(1.0)
                        continue
                    to_close = self._pop(name, runner)
                    self._event("reload", model=name)
            if to_close is not None:
                self._close_runner(to_close)
                continue
            # One load at a time, so that each plan counts what the others hold; requests for
            # models already loaded go on meanwhile.
            with self._load_lock:
                loaded = self._load_when_room(info, options)
            if loaded is not None:
                return loaded

    def _load_when_room(self, info: ModelInfo, options: dict[str, Any]) -> Runner | None:
        """Make room and load ``info``; None when the caller must look again (it changed meanwhile)."""
        name = info.name.display
        while True:
            to_close: Runner | None = None
            plan: Plan | None = None
            with self._lock:
                if name in self.runners:
                    return None
                if len(self.runners) >= max(1, config.max_loaded_models()):
                    to_close = self._evict_one()
                    if to_close is None:
                        self._changed.wait(1.0)
                        continue
                else:
                    plan = self._fitting_plan(info, options)
                    if plan is None:
                        to_close = self._evict_one()
                        if to_close is None:
                            if any(r.refs for r in self.runners.values()):
                                self._changed.wait(1.0)
                                continue
                            plan = self.plan_for(info, options, self.held_bytes(exclude=name))
            if to_close is not None:
                self._close_runner(to_close)
                continue
            assert plan is not None
            runner = self._load(info, options, plan)
            with self._lock:
                runner.refs += 1
                self.runners[name] = runner
                self._changed.notify_all()
            return runner

    def _evict_one(self) -> Runner | None:
        """Take the least recently used idle runner out (the caller closes it); None when all are busy."""
        idle = [n for n, r in self.runners.items() if r.refs == 0]
        if not idle:
            return None
        victim = min(idle, key=lambda n: self.runners[n].last_used)
        self._event("evict", model=victim)
        return self._pop(victim, self.runners[victim])

    # -- unloading -----------------------------------------------------------------------------

    def _pop(self, name: str, runner: Runner) -> Runner | None:
        if self.runners.get(name) is runner:
            del self.runners[name]
            self._changed.notify_all()
            return runner
        return None

    def _close_runner(self, runner: Runner) -> None:
        # Ending the process gives back every byte it held, GPU and pinned memory included.
        runner.proc.close()
        log.info("unloaded %s (runner %d)", runner.name, runner.proc.pid)

    def unload(self, name: str, embedding: bool | None = None) -> bool:
        """Unload a model now (after its running requests); True when one was loaded."""
        try:
            display = self.store.resolve(name).name.display
        except Exception:  # noqa: BLE001 - unloading a name we can't resolve unloads nothing
            display = name
        to_close = None
        with self._lock:
            r = self.runners.get(display)
            if r is None:
                return False
            if r.refs:
                r.doomed = True
            else:
                to_close = self._pop(display, r)
        if to_close is not None:
            self._close_runner(to_close)
        return True

    def loaded(self) -> list[Runner]:
        """The loaded models, most recently used first."""
        with self._lock:
            return sorted(self.runners.values(), key=lambda r: r.last_used, reverse=True)

    def _reap_loop(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            expired: list[Runner | None] = []
            with self._lock:
                for name, r in list(self.runners.items()):
                    if r.refs == 0 and r.expires_at <= now:
                        expired.append(self._pop(name, r))
                        self._event("expire", model=name)
            for gone in expired:
                if gone is not None:
                    self._close_runner(gone)

    def keep_spare_runner(self) -> None:
        """Keep one runner process started ahead of the next load (``process._Spares``)."""
        process.keep_spare_runner()

    def close(self) -> None:
        """Unload everything, end the spare runner and stop the reaper."""
        self._stop.set()
        process.close_spare_runner()
        with self._lock:
            runners = list(self.runners.values())
            self.runners.clear()
        for r in runners:
            self._close_runner(r)
