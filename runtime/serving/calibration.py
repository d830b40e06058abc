"""The calibration store: measured speeds of every generation, and speed params fitted from them;
beside it, the lengths of the requests each model serves (its workload).

``calibration.json`` under the data dir holds, per hardware fingerprint, the machine's profile and
its most recent observations (plan, model digest, measured prompt and decode t/s).
``workloads.json`` beside it holds, per model digest, the prompt and answer lengths of its last
requests; a file of its own because it changes with every request, and rewriting the larger
calibration store that often would cost more than the request. Both are written atomically (temp
file + ``os.replace``) under a file lock and bounded in size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from filelock import FileLock

from offload.planner import anatomy as anatomy_mod
from offload.planner import hardware as hardware_mod
from offload.planner.calibrate import Observation, fit
from offload.planner.cost import SPEED_MODEL_VERSION, SpeedParams
from offload.planner.errors import GGUFError, WorkloadError
from offload.planner.types import Anatomy, Hardware, Plan, Workload
from offload.runtime import config

__all__ = [
    "record",
    "record_speeds",
    "observations",
    "speed_params_for",
    "store_path",
    "record_workload",
    "workload_for",
    "workloads_path",
    "MAX_PER_MACHINE",
    "MAX_WORKLOAD_REQUESTS",
    "MIN_WORKLOAD_REQUESTS",
]

log = logging.getLogger(__name__)

MAX_PER_MACHINE = 200
MAX_MACHINES = 8
# Shorter runs measure mostly noise and fixed costs.
MIN_PROMPT_TOKENS = 32
MIN_DECODE_TOKENS = 8
# Workloads: the last requests of each model, and how many make a median worth planning for.
MAX_WORKLOAD_REQUESTS = 100
MAX_WORKLOAD_MODELS = 64
MIN_WORKLOAD_REQUESTS = 3
_fit_cache: dict[tuple[str, int, float], tuple[SpeedParams, int]] = {}


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _hardware_now() -> Hardware:
    return hardware_mod.current(config.hardware_file())


def record_speeds(
    plan: Plan,
    model_digest: str,
    *,
    prompt_tokens: int,
    prompt_tps: float | None,
    decode_tps: float | None,
    hardware: Hardware | None = None,
) -> bool:
    """Store one measured run of ``plan``; False when there was nothing worth keeping."""
    if not prompt_tps and not decode_tps:
        return False
    hw = hardware or _hardware_now()
    fp = plan.hardware_fingerprint or hw.fingerprint
    path = store_path()
    entry = {
        "at": time.time(),
        "model_digest": model_digest,
        "model_path": plan.model_path,
        "plan": plan.to_dict(),
        "prompt_tokens": int(prompt_tokens),
        "prompt_tps": prompt_tps,
        "decode_tps": decode_tps,
    }
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


class GenerationStats(Protocol):
    """What ``record`` reads of a finished generation (the engine's ``Stats``)."""

    prompt_eval_count: int
    prompt_eval_s: float
    eval_count: int
    eval_s: float


def record(
    plan: Plan, model_digest: str, stats: GenerationStats, hardware: Hardware | None = None
) -> bool:
    """Record a finished generation's measured speeds (``stats`` is the engine's ``Stats``)."""
    evaluated = int(
        stats.prompt_eval_count
    )  # only what was computed (a reused prefix is not counted)
    prompt_tps = (
        evaluated / stats.prompt_eval_s
        if evaluated >= MIN_PROMPT_TOKENS and stats.prompt_eval_s > 0
        else None
    )
    decode_tps = (
        stats.eval_count / stats.eval_s
        if stats.eval_count >= MIN_DECODE_TOKENS and stats.eval_s > 0
        else None
    )
    try:
        return record_speeds(
            plan,
            model_digest,
            prompt_tokens=max(evaluated, 1),
            prompt_tps=prompt_tps,
            decode_tps=decode_tps,
            hardware=hardware,
        )
    except (OSError, TimeoutError) as e:  # calibration must never fail a request
        log.warning("could not record calibration: %s", e)
        return False


def observations(fingerprint: str) -> tuple[Hardware | None, list[dict[str, Any]]]:
    """This machine's stored profile and raw observations, oldest first."""
    m = _read(store_path())["machines"].get(fingerprint)
    if not m:
        return None, []
    return Hardware.from_dict(m["hardware"]), list(m.get("observations", []))


def _anatomy(path: str, cache: dict[str, Anatomy | None]) -> Anatomy | None:
    if path not in cache:
        try:
            cache[path] = anatomy_mod.read(path) if path and Path(path).exists() else None
        except (OSError, GGUFError):
            cache[path] = None
    return cache[path]


def speed_params_for(
    fingerprint: str, base: SpeedParams | None = None
) -> tuple[SpeedParams | None, int]:
    """(SpeedParams fitted to this machine's runs, number of runs); (None, n) when none can be fitted."""
    hw, raw = observations(fingerprint)
    if hw is None or not raw:
        return None, 0
    key = (fingerprint, len(raw), raw[-1]["at"])
    if key in _fit_cache and base is None:
        return _fit_cache[key]
    if base is None:  # a fit stored by an earlier process for exactly these runs
        stored = _read(store_path())["machines"].get(fingerprint, {}).get("fitted") or {}
        if (
            stored.get("n_raw") == len(raw)
            and stored.get("last_at") == raw[-1]["at"]
            and stored.get("model") == SPEED_MODEL_VERSION
        ):
            try:
                fitted = SpeedParams(**stored["params"])
                _fit_cache[key] = (fitted, stored["n_runs"])
                return fitted, stored["n_runs"]
            except TypeError:
                pass  # the speed model's fields changed: fit again
    anatomies: dict[str, Anatomy | None] = {}
    obs = []
    for r in raw:
        a = _anatomy(r.get("model_path", ""), anatomies)
        if a is None:
            continue  # the model is gone; its runs can't be re-predicted
        try:
            plan = Plan.from_dict(r["plan"])
        except (KeyError, TypeError, ValueError):
            continue  # a record this version cannot read (edited by hand, or damaged)
        obs.append(
            Observation(
                a,
                hw,
                plan.placement,
                int(r.get("prompt_tokens", 512)),
                r.get("decode_tps"),
                r.get("prompt_tps"),
            )
        )
    if not obs:
        return None, len(raw)
    fitted = fit(obs, base or SpeedParams())
    if base is None:
        _fit_cache[key] = (fitted, len(obs))
        _store_fit(fingerprint, fitted, len(raw), raw[-1]["at"], len(obs))
    return fitted, len(obs)


def _store_fit(
    fingerprint: str, fitted: SpeedParams, n_raw: int, last_at: float, n_runs: int
) -> None:
    """Keep the fit beside its runs so that the next process need not fit again."""
    path = store_path()
    try:
        with FileLock(str(path) + ".lock", timeout=10):
            data = _read(path)
            m = data["machines"].get(fingerprint)
            if m is None:
                return
            m["fitted"] = {
                "model": SPEED_MODEL_VERSION,
                "n_raw": n_raw,
                "last_at": last_at,
                "n_runs": n_runs,
                "params": dataclasses.asdict(fitted),
            }
            _write(path, data)
    except (OSError, TimeoutError) as e:
        log.debug("could not store the fit: %s", e)


# -- workloads ---------------------------------------------------------------------------------


def workloads_path() -> Path:
    """Where the served request lengths live (``<data dir>/workloads.json``)."""
    return config.data_dir() / "workloads.json"


def _read_workloads(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"version": 1, "models": {}}
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        return {"version": 1, "models": {}}
    return data


def record_workload(model_digest: str, prompt_tokens: int, answer_tokens: int) -> bool:
    """Remember one served request's prompt tokens (those evaluated) and answer tokens for the
    model's next plan; False when there was nothing to keep. Never raises for a full disk or a
    busy lock: a request must not fail for its bookkeeping."""
    if not model_digest or prompt_tokens < 1 or answer_tokens < 1:
        return False
    path = workloads_path()
    try:
        with FileLock(str(path) + ".lock", timeout=10):
            data = _read_workloads(path)
            models = data["models"]
            m = models.setdefault(model_digest, {"requests": []})
            m["requests"] = (m.get("requests", []) + [[int(prompt_tokens), int(answer_tokens)]])[
                -MAX_WORKLOAD_REQUESTS:
            ]
            m["updated_at"] = time.time()
            if len(models) > MAX_WORKLOAD_MODELS:  # forget the models served least recently
                keep = sorted(models, key=lambda k: models[k].get("updated_at", 0))[
                    -MAX_WORKLOAD_MODELS:
                ]
                data["models"] = {k: models[k] for k in keep}
            _write(path, data)
    except (OSError, TimeoutError) as e:
        log.warning("could not record the workload: %s", e)
        return False
    return True


def workload_for(model_digest: str) -> Workload | None:
    """The median prompt and answer lengths of this model's last requests; None until it has
    served ``MIN_WORKLOAD_REQUESTS``."""
    if not model_digest:
        return None
    reqs = _read_workloads(workloads_path())["models"].get(model_digest, {}).get("requests", [])
    pairs = [(p, g) for p, g in (r for r in reqs if isinstance(r, list) and len(r) == 2)]
    if len(pairs) < MIN_WORKLOAD_REQUESTS:
        return None
    try:
        return Workload(
            int(statistics.median_low([p for p, _ in pairs])),
            int(statistics.median_low([g for _, g in pairs])),
            source="recorded",
            requests=len(pairs),
        )
    except (WorkloadError, TypeError):
        return None  # a hand-edited file: plan for the default
