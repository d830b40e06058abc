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
from offload.planner import anatomy as anatomy_mod
from offload.planner import hardware as hardware_mod
from offload.planner import plan as make_plan
from offload.planner.types import Hardware, Plan
from offload.runtime import config
from offload.runtime.engine import Engine
from offload.runtime.errors import QueueFull
from offload.runtime.options import plan_key, plan_request_from

__all__ = ["Runner", "Scheduler", "current_hardware"]

log = logging.getLogger(__name__)


def current_hardware(refresh: bool = False) -> Hardware:
    """This machine's hardware profile (probed once, cached under the data dir)."""
    current = getattr(hardware_mod, "current", None)
    if current is not None:
        return current(config.data_dir() / "hardware.json", refresh=refresh)
    return hardware_mod.probe()


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
    busy: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        """The model's display name."""
        return self.info.name.display

    def touch(self, keep_alive_s: float) -> None:
        """Mark used now and restart the keep-alive clock."""
        self.keep_alive_s = keep_alive_s
        self.last_used = time.monotonic()
        self.expires_at = self.last_used + keep_alive_s


class Scheduler:
    """Loads, shares and unloads models for the server."""

    def __init__(self, store: Store, hardware: Callable[[], Hardware] | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.store = store
        self.hardware = hardware or current_hardware
        self.runners: dict[tuple[str, bool], Runner] = {}
        self._lock = threading.RLock()
        self._waiting = 0
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="offload-reaper", daemon=True)
        self._reaper.start()

    # -- loading -------------------------------------------------------------------------------

    def resolve(self, name: str) -> ModelInfo:
        """Resolve a model name (importing the embedded default on first use)."""
        from offload.models import embedded

        embedded.ensure(self.store, name)
        return self.store.resolve(name)

    def plan_for(self, info: ModelInfo, options: dict[str, Any]) -> Plan:
        """The plan this model gets here with these options."""
        anatomy = anatomy_mod.read(info.model_path)
        request = plan_request_from(options, gpu_budget_bytes=config.gpu_memory_bytes())
        return make_plan(anatomy, self.hardware(), request)

    def _load(self, info: ModelInfo, options: dict[str, Any], embedding: bool) -> Runner:
        plan = self.plan_for(info, options)
        engine = Engine.load(info.model_path, plan, adapters=info.adapters, embedding=embedding)
        return Runner(info=info, plan=plan, engine=engine, key=plan_key(options), embedding=embedding)

    @contextlib.contextmanager
    def acquire(self, name: str, options: dict[str, Any] | None = None, keep_alive_s: float | None = None,
                embedding: bool = False) -> Iterator[Runner]:
        """Hold a loaded model for one request; it is kept alive ``keep_alive_s`` after."""
        options = options or {}
        keep = config.keep_alive_s() if keep_alive_s is None else keep_alive_s
        with self._lock:
            if self._waiting >= config.max_queue():
                raise QueueFull(f"server busy: {self._waiting} requests are queued; try again shortly")
            self._waiting += 1
        try:
            info = self.resolve(name)
            runner = self._get_or_load(info, options, embedding)
            with runner.lock:
                runner.busy += 1
                try:
                    yield runner
                finally:
                    runner.busy -= 1
                    runner.touch(keep)
            if keep <= 0:
                self.unload(runner.name, embedding=embedding)
        finally:
            with self._lock:
                self._waiting -= 1

    def _get_or_load(self, info: ModelInfo, options: dict[str, Any], embedding: bool) -> Runner:
        slot = (info.name.display, embedding)
        with self._lock:
            runner = self.runners.get(slot)
            if runner is not None and runner.info.digest == info.digest and runner.key == plan_key(options):
                return runner
            if runner is not None:
                self._close(slot)
            while len(self.runners) >= max(1, config.max_loaded_models()):
                idle = [s for s, r in self.runners.items() if r.busy == 0]
                if not idle:
                    break
                self._close(min(idle, key=lambda s: self.runners[s].last_used))
            runner = self._load(info, options, embedding)
            self.runners[slot] = runner
            return runner

    # -- unloading -----------------------------------------------------------------------------

    def _close(self, slot: tuple[str, bool]) -> None:
        runner = self.runners.pop(slot, None)
        if runner is not None:
            with runner.lock:
                runner.engine.close()
            log.info("unloaded %s", runner.name)

    def unload(self, name: str, embedding: bool | None = None) -> bool:
        """Unload a model now; True when one was loaded."""
        try:
            display = self.store.resolve(name).name.display
        except Exception:  # noqa: BLE001 - unloading a name we can't resolve unloads nothing
            display = name
        with self._lock:
            slots = [s for s in self.runners if s[0] == display and (embedding is None or s[1] == embedding)]
            for s in slots:
                self._close(s)
            return bool(slots)

    def loaded(self) -> list[Runner]:
        """The loaded models, most recently used first."""
        with self._lock:
            return sorted(self.runners.values(), key=lambda r: r.last_used, reverse=True)

    def _reap_loop(self) -> None:
        while not self._stop.wait(1.0):
            now = time.monotonic()
            with self._lock:
                for slot, r in list(self.runners.items()):
                    if r.busy == 0 and r.expires_at <= now:
                        self._close(slot)

    def close(self) -> None:
        """Unload everything and stop the reaper."""
        self._stop.set()
        with self._lock:
            for slot in list(self.runners):
                self._close(slot)
