"""Settings this machine must run with because a runner crashed without them.

Some CPUs advertise features that fault when used (AMX inside some VMs: llama.cpp's check passes,
the first matrix product crashes), and some file systems or drivers break on one way of reading
the model. When a runner dies while loading, the scheduler retries with one safer setting at a
time; what worked is kept in ``runner-safety.json`` next to ``hardware.json``, per machine, so the
next load starts safe, and ``offload ps``, ``/api/ps`` and ``offload plan`` say what is off and why.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from offload.runtime import config

__all__ = ["SAFER_STEPS", "SafeStep", "Safety"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SafeStep:
    """One setting a crashed load can give up."""

    key: str
    what: str  # what is turned off, for sentences


# In the order they are tried: the first touches only CPU kernels; the second the way weights are read.
SAFER_STEPS = (
    SafeStep("extra_bufts", "CPU extra buffer types (repacked weights, AMX)"),
    SafeStep("mmap", "reading the model file into memory (it is memory-mapped instead)"),
)


class Safety:
    """The safe settings remembered for one machine (by hardware fingerprint)."""

    def __init__(self, fingerprint: str, path: Path | None = None) -> None:
        self.fingerprint = fingerprint or "unknown"
        self.path = path or config.data_dir() / "runner-safety.json"

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def settings(self) -> dict[str, dict[str, Any]]:
        """``{key: {"why": ..., "at": ...}}`` for each setting turned off on this machine."""
        machine = self._read().get(self.fingerprint)
        if not isinstance(machine, dict):
            return {}
        return {
            k: v
            for k, v in machine.items()
            if isinstance(v, dict) and k in {s.key for s in SAFER_STEPS}
        }

    def is_off(self, key: str) -> bool:
        """True when ``key`` must stay off here."""
        return key in self.settings()

    def remember(self, key: str, why: str) -> None:
        """Keep ``key`` off on this machine from now on (written atomically under a lock)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock", timeout=10):
            data = self._read()
            machine = data.setdefault(self.fingerprint, {})
            if not isinstance(machine, dict):
                machine = data[self.fingerprint] = {}
            machine[key] = {"why": why, "at": time.strftime("%Y-%m-%d %H:%M:%S")}
            fd, tmp = tempfile.mkstemp(
                prefix=".runner-safety.", suffix=".tmp", dir=self.path.parent
            )
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        log.warning("turned off %s on this machine: %s", key, why)

    def sentences(self) -> list[str]:
        """What is off here and why, for plans and ``ps``."""
        what = {s.key: s.what for s in SAFER_STEPS}
        return [
            f"{what[k]} turned off on this machine since {v.get('at', '?')}: {v.get('why', '')}"
            for k, v in self.settings().items()
        ]
