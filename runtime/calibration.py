"""The calibration store: measured speeds of every generation, and speed params fitted from them.

``calibration.json`` under the data dir holds, per hardware fingerprint, the machine's profile and
its most recent observations (plan, model digest, measured prompt and decode t/s). It is written
atomically (temp file + ``os.replace``) under a file lock and bounded in size.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from filelock import FileLock

from offload.planner.types import Hardware, Plan
from offload.runtime import config

__all__ = ["record", "record_speeds", "observations", "speed_params_for", "store_path",
           "MAX_PER_MACHINE"]

log = logging.getLogger(__name__)

MAX_PER_MACHINE = 200
MAX_MACHINES = 8
# Shorter runs measure mostly noise and fixed costs.
MIN_PROMPT_TOKENS = 32
MIN_DECODE_TOKENS = 8
_fit_cache: dict[tuple[str, int, float], tuple[Any, int]] = {}


def store_path() -> Path:
    """Where the calibration store lives (``<data dir>/calibration.json``)."""
    return config.data_dir() / "calibration.json"


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"version": 1, "machines": {}}
    if not isinstance(data, dict) or not isinstance(data.get("machines"), dict):
        return {"version": 1, "machines": {}}
    return data


def _write(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".calibration.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _hardware_now() -> Hardware:
    from offload.runtime.scheduler import current_hardware

    return current_hardware()


def record_speeds(plan: Plan, model_digest: str, *, prompt_tokens: int, prompt_tps: float | None,
                  decode_tps: float | None, hardware: Hardware | None = None) -> bool:
    """Store one measured run of ``plan``; False when there was nothing worth keeping."""
    if not prompt_tps and not decode_tps:
        return False
    hw = hardware or _hardware_now()
    fp = plan.hardware_fingerprint or hw.fingerprint
    path = store_path()
    entry = {"at": time.time(), "model_digest": model_digest, "model_path": plan.model_path,
             "plan": plan.to_dict(), "prompt_tokens": int(prompt_tokens),
             "prompt_tps": prompt_tps, "decode_tps": decode_tps}
    with FileLock(str(path) + ".lock", timeout=10):
        data = _read(path)
        machines = data["machines"]
        m = machines.setdefault(fp, {"hardware": hw.to_dict(), "observations": []})
        m["hardware"] = hw.to_dict() if hw.fingerprint == fp else m.get("hardware") or hw.to_dict()
        m["observations"] = (m.get("observations", []) + [entry])[-MAX_PER_MACHINE:]
        m["updated_at"] = entry["at"]
        if len(machines) > MAX_MACHINES:  # forget the machines seen least recently
            keep = sorted(machines, key=lambda k: machines[k].get("updated_at", 0))[-MAX_MACHINES:]
            data["machines"] = {k: machines[k] for k in keep}
        _write(path, data)
    return True


def record(plan: Plan, model_digest: str, stats: Any, hardware: Hardware | None = None) -> bool:
    """Record a finished generation's measured speeds (``stats`` is the engine's ``Stats``)."""
    evaluated = int(stats.prompt_eval_count)  # only what was computed (a reused prefix is not counted)
    prompt_tps = evaluated / stats.prompt_eval_s if evaluated >= MIN_PROMPT_TOKENS and stats.prompt_eval_s > 0 else None
    decode_tps = stats.eval_count / stats.eval_s if stats.eval_count >= MIN_DECODE_TOKENS and stats.eval_s > 0 else None
    try:
        return record_speeds(plan, model_digest, prompt_tokens=max(evaluated, 1), prompt_tps=prompt_tps,
                             decode_tps=decode_tps, hardware=hardware)
    except (OSError, TimeoutError) as e:  # calibration must never fail a request
        log.warning("could not record calibration: %s", e)
        return False


def observations(fingerprint: str) -> tuple[Hardware | None, list[dict[str, Any]]]:
    """This machine's stored profile and raw observations, oldest first."""
    m = _read(store_path())["machines"].get(fingerprint)
    if not m:
        return None, []
    return Hardware.from_dict(m["hardware"]), list(m.get("observations", []))


def _anatomy(path: str, cache: dict[str, Any]) -> Any:
    if path not in cache:
        from offload.planner import anatomy

        cache[path] = anatomy.read(path) if path and Path(path).exists() else None
    return cache[path]


def speed_params_for(fingerprint: str, base: Any = None) -> tuple[Any, int]:
    """(SpeedParams fitted to this machine's runs, number of runs); (None, n) when none can be fitted."""
    hw, raw = observations(fingerprint)
    if hw is None or not raw:
        return None, 0
    try:
        from offload.planner.calibrate import Observation, fit, placement_of
        from offload.planner.cost import SpeedParams  # type: ignore[import-not-found]
    except ImportError:
        log.debug("the planner has no speed model to calibrate yet")
        return None, len(raw)
    key = (fingerprint, len(raw), raw[-1]["at"])
    if key in _fit_cache and base is None:
        return _fit_cache[key]
    if base is None:  # a fit stored by an earlier process for exactly these runs
        stored = _read(store_path())["machines"].get(fingerprint, {}).get("fitted") or {}
        if stored.get("n_raw") == len(raw) and stored.get("last_at") == raw[-1]["at"]:
            try:
                fitted = SpeedParams(**stored["params"])
                _fit_cache[key] = (fitted, stored["n_runs"])
                return fitted, stored["n_runs"]
            except TypeError:
                pass  # the speed model's fields changed: fit again
    anatomies: dict[str, Any] = {}
    obs = []
    for r in raw:
        a = _anatomy(r.get("model_path", ""), anatomies)
        if a is None:
            continue  # the model is gone; its runs can't be re-predicted
        plan = Plan.from_dict(r["plan"])
        obs.append(Observation(a, hw, placement_of(plan), int(r.get("prompt_tokens", 512)),
                               r.get("decode_tps"), r.get("prompt_tps")))
    if not obs:
        return None, len(raw)
    fitted = fit(obs, base or SpeedParams())
    if base is None:
        _fit_cache[key] = (fitted, len(obs))
        _store_fit(fingerprint, fitted, len(raw), raw[-1]["at"], len(obs))
    return fitted, len(obs)


def _store_fit(fingerprint: str, fitted: Any, n_raw: int, last_at: float, n_runs: int) -> None:
    """Keep the fit beside its runs so that the next process need not fit again."""
    import dataclasses

    path = store_path()
    try:
        with FileLock(str(path) + ".lock", timeout=10):
            data = _read(path)
            m = data["machines"].get(fingerprint)
            if m is None:
                return
            m["fitted"] = {"n_raw": n_raw, "last_at": last_at, "n_runs": n_runs,
                           "params": dataclasses.asdict(fitted)}
            _write(path, data)
    except (OSError, TimeoutError) as e:
        log.debug("could not store the fit: %s", e)
