"""Which models are loaded, with which plan, and for how long.

``Scheduler.acquire(name, options)`` resolves the model, plans it against this machine, loads it
(or reuses the loaded one when the plan-changing options match), and hands it out to one request at
a time. Idle models expire after their keep-alive; at most ``max_loaded`` stay loaded, the least
recently used going first.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from offload.models.store import ModelInfo, Store
from offload.planner.errors import PlanInfeasible
from offload.planner.types import Hardware, Plan
from offload.runtime import config, planning
from offload.runtime.engine import Engine
from offload.runtime.errors import QueueFull
from offload.runtime.loader import load_healing
from offload.runtime.options import plan_key
from offload.runtime.planning import current_hardware

__all__ = ["Runner", "Scheduler", "current_hardware"]

log = logging.getLogger(__name__)


@dataclass
class Runner:
    """One loaded model."""

    info: ModelInfo
    plan: Plan
    engine: Engine
    key: tuple[tuple[str, Any], ...]
    embedding: bool = False
    keep_alive_s: float = 300.0
    last_used: float = field(default_factory=time.monotonic)
    expires_at: float = float("inf")
    refs: int = 0  # requests holding or waiting for this runner; only a runner at 0 may be unloaded
    busy: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_stats: Any = None
    doomed: bool = False  # unload asked for while in use: unload when its requests end

    @property
    def name(self) -> str:
        """The model's display name."""
        return self.info.name.display

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
    used first; when none is idle the request waits for one. ``OFFLOAD_MAX_QUEUE`` bounds the
    requests in flight (beyond it: ``QueueFull``, a 503).
    """

    def __init__(
        self,
        store: Store,
        hardware: Callable[[], Hardware] | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.store = store
        self.hardware = hardware or current_hardware
        self.runners: dict[tuple[str, bool], Runner] = {}
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._waiting = 0
        self._stop = threading.Event()
        self._on_event = on_event
        self._reaper = threading.Thread(target=self._reap_loop, name="offload-reaper", daemon=True)
        self._reaper.start()

    def _event(self, kind: str, **data: Any) -> None:
        log.info("%s %s", kind, data)
        if self._on_event is not None:
            self._on_event(kind, data)

    # -- loading -------------------------------------------------------------------------------

    def resolve(self, name: str) -> ModelInfo:
        """Resolve a model name (importing the embedded default on first use)."""
        from offload.models import embedded

        embedded.ensure(self.store, name)
        return self.store.resolve(name)

    def held_bytes(self, exclude: tuple[str, bool] | None = None) -> dict[tuple[str, int], int]:
        """Bytes the loaded models hold, per device (``("CPU", 0)``, ``("GPU", index)``)."""
        held: dict[tuple[str, int], int] = {}
        with self._lock:
            for slot, r in self.runners.items():
                if slot == exclude:
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
        return planning.plan_for(info.model_path, options, digest=info.digest, hw=self.hardware(), held=held)

    def _fitting_plan(
        self, info: ModelInfo, options: dict[str, Any], slot: tuple[str, bool]
    ) -> Plan | None:
        """A plan in the free memory that is not much slower than the best; None: make room first."""
        held = self.held_bytes(exclude=slot)
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

    def _load(
        self, info: ModelInfo, options: dict[str, Any], embedding: bool, plan: Plan
    ) -> Runner:
        # Out of memory at load or first decode: shrink one step and retry, saying what was given up.
        engine, plan, gave_up = load_healing(info, plan, embedding=embedding, verify_decode=not embedding)
        self._event("load", model=info.name.display, embedding=embedding, n_ctx=plan.n_ctx, gave_up=gave_up)
        for sentence in gave_up:
            log.warning("%s: %s", info.name.display, sentence)
        return Runner(
            info=info, plan=plan, engine=engine, key=plan_key(options), embedding=embedding
        )

    @contextlib.contextmanager
    def acquire(
        self,
        name: str,
        options: dict[str, Any] | None = None,
        keep_alive_s: float | None = None,
        embedding: bool = False,
    ) -> Iterator[Runner]:
        """Hold a loaded model for one request; it is kept alive ``keep_alive_s`` after (0: unload now)."""
        options = options or {}
        keep = config.keep_alive_s() if keep_alive_s is None else keep_alive_s
        with self._lock:
            if self._waiting >= max(1, config.max_queue()):
                raise QueueFull(
                    f"server busy: {self._waiting} requests are in flight; try again shortly"
                )
            self._waiting += 1
        try:
            info = self.resolve(name)
            runner = self._get_or_load(info, options, embedding)
            try:
                with runner.lock:
                    runner.busy += 1
                    runner.expires_at = float("inf")
                    try:
                        yield runner
                    finally:
                        runner.busy -= 1
                        runner.touch(keep)
            finally:
                with self._lock:
                    runner.refs -= 1
                    if (keep <= 0 or runner.doomed) and runner.refs == 0:
                        self._close((runner.name, embedding))
                    self._changed.notify_all()
        finally:
            with self._lock:
                self._waiting -= 1

    def _get_or_load(self, info: ModelInfo, options: dict[str, Any], embedding: bool) -> Runner:
        slot = (info.name.display, embedding)
        key = plan_key(options)
        with self._lock:
            while True:
                runner = self.runners.get(slot)
                if runner is not None and runner.info.digest == info.digest and runner.key == key:
                    runner.refs += 1
                    return runner
                if runner is not None:
                    # Another digest or plan-changing options: reload once nobody uses the old one.
                    if runner.refs == 0:
                        self._close(slot)
                        self._event("reload", model=slot[0])
                    else:
                        self._changed.wait(1.0)
                    continue
                if len(self.runners) >= max(1, config.max_loaded_models()):
                    if not self._evict_one():
                        self._changed.wait(1.0)
                    continue
                plan = self._fitting_plan(info, options, slot)
                if plan is None:
                    if not self._evict_one():
                        if not any(r.refs for r in self.runners.values()):
                            plan = self.plan_for(info, options, self.held_bytes(exclude=slot))
                        else:
                            self._changed.wait(1.0)
                            continue
                    else:
                        continue
                runner = self._load(info, options, embedding, plan)
                runner.refs += 1
                self.runners[slot] = runner
                return runner

    def _evict_one(self) -> bool:
        """Unload the least recently used idle model; False when every one is in use."""
        idle = [s for s, r in self.runners.items() if r.refs == 0]
        if not idle:
            return False
        victim = min(idle, key=lambda s: self.runners[s].last_used)
        self._close(victim)
        self._event("evict", model=victim[0])
        return True

    # -- unloading -----------------------------------------------------------------------------

    def _close(self, slot: tuple[str, bool]) -> None:
        runner = self.runners.pop(slot, None)
        if runner is not None:
            with runner.lock:
                runner.engine.close()
            log.info("unloaded %s", runner.name)
            self._changed.notify_all()

    def unload(self, name: str, embedding: bool | None = None) -> bool:
        """Unload a model now (after its running requests); True when one was loaded."""
        try:
            display = self.store.resolve(name).name.display
        except Exception:  # noqa: BLE001 - unloading a name we can't resolve unloads nothing
            display = name
        with self._lock:
            slots = [
                s
                for s in self.runners
                if s[0] == display and (embedding is None or s[1] == embedding)
            ]
            for s in slots:
                r = self.runners[s]
                if r.refs:
                    r.doomed = True
                else:
                    self._close(s)
            return bool(slots)

    def loaded(self) -> list[Runner]:
        """The loaded models, most recently used first."""
        with self._lock:
            return sorted(self.runners.values(), key=lambda r: r.last_used, reverse=True)

    def _reap_loop(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            with self._lock:
                for slot, r in list(self.runners.items()):
                    if r.refs == 0 and r.expires_at <= now:
                        self._close(slot)
                        self._event("expire", model=slot[0])

    def close(self) -> None:
        """Unload everything and stop the reaper."""
        self._stop.set()
        with self._lock:
            for slot in list(self.runners):
                self._close(slot)
