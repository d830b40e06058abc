"""Where am I, and what do I plan: the model store, this machine's hardware, and a model's plan here.

The server's scheduler, ``offload plan`` and ``offload bench`` all plan through ``plan_model``,
so a model gets the same plan from each: the configuration (``OFFLOAD_GPU_MEMORY``,
``OFFLOAD_KV_CACHE_TYPE``, ``OFFLOAD_NUM_PARALLEL``) fills what the caller left open, the
model's recorded workload stands in for the default one, and the speed model is this machine's
calibrated one when there are runs to learn from.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offload.models import embedded
from offload.models.errors import StoreError
from offload.models.store import ListedModel, Store
from offload.planner import hardware as hardware_mod
from offload.planner import plan as make_plan
from offload.planner.anatomy import read as read_anatomy
from offload.planner.types import Anatomy, Hardware, Plan, PlanRequest
from offload.runtime import config
from offload.runtime.serving import backends, calibration
from offload.runtime.serving.safety import Safety

__all__ = [
    "ModelRef",
    "open_store",
    "list_models",
    "current_hardware",
    "hardware",
    "resolve",
    "request",
    "request_from_options",
    "budgets_left",
    "plan_model",
    "plan_for",
]


def open_store() -> Store:
    """Our model store, with the Ollama store (if any) read-only behind it; what a killed create
    or pull left behind is pruned on the way."""
    ollama = config.ollama_models_dir()
    store = Store(config.models_dir(), read_only_roots=[ollama] if ollama else [])
    store.prune_stale()
    return store


def list_models(store: Store) -> list[ListedModel]:
    """The models a listing shows (``offload list``, ``/api/tags``, ``/v1/models``): the store's,
    with the embedded default offered on a store that never had it."""
    try:
        embedded.offer(store)
    except (StoreError, OSError) as e:
        logging.getLogger(__name__).warning("could not import the embedded model: %s", e)
    return store.list()


def usable_hardware(refresh: bool = False) -> backends.Usable:
    """This machine as llama.cpp can use it (probed once, cached under the data dir), with the
    warning to show when that is less than it has (GPUs this build cannot offload to)."""
    return backends.current(config.hardware_file(), refresh=refresh)


def current_hardware(refresh: bool = False) -> Hardware:
    """This machine's hardware profile, as llama.cpp can use it."""
    return usable_hardware(refresh).hardware


def hardware(profile: str | None = None, *, refresh: bool = False) -> tuple[Hardware, str | None]:
    """A shipped profile or profile JSON by name, else this machine; and the warning to show."""
    if profile:
        return hardware_mod.load_profile(profile), None
    usable = usable_hardware(refresh)
    return usable.hardware, usable.warning


@dataclass(frozen=True)
class ModelRef:
    """A model to plan: its GGUF file and, when it came from the store, its digest and name."""

    path: Path
    digest: str = ""
    name: str = ""


def resolve(name_or_path: str, store: Store | None = None) -> ModelRef:
    """A GGUF path as given, else a model name resolved through the store (the embedded default
    model is imported on first use); ``ModelNotFound`` names what was missing."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return ModelRef(p)
    store = store or open_store()
    embedded.ensure(store, name_or_path)
    info = store.resolve(name_or_path)
    return ModelRef(Path(info.model_path), info.digest, info.name.display)


def _configured_gpu_budget() -> int | tuple[int, ...] | None:
    budgets = config.gpu_memory_budgets()
    if not budgets:
        return None
    return budgets[0] if len(budgets) == 1 else budgets


def request(**given: Any) -> PlanRequest:
    """A ``PlanRequest`` of what the caller gave; what it left ``None`` comes from configuration
    (GPU budgets, KV cache type, parallel sequences; still ``None`` means the planner decides)."""
    fields: dict[str, Any] = {
        "gpu_budget_bytes": _configured_gpu_budget(),
        "kv_type": config.kv_cache_type(),
        "n_parallel": config.num_parallel(),
    }
    fields.update({k: v for k, v in given.items() if v is not None})
    return PlanRequest(**fields)


def request_from_options(options: Mapping[str, Any], **given: Any) -> PlanRequest:
    """The plan request implied by a request's Ollama options (``num_ctx``, ``num_gpu``, ...,
    and ``kv_type``), over the configuration."""
    return request(
        n_ctx=options.get("num_ctx"),
        num_gpu=options.get("num_gpu"),
        n_batch=options.get("num_batch"),
        threads=options.get("num_thread"),
        use_mmap=options.get("use_mmap"),
        use_mlock=bool(options.get("use_mlock", False)) or None,
        kv_type=options.get("kv_type"),
        **given,
    )


def budgets_left(
    hw: Hardware, held: Mapping[tuple[str, int], int]
) -> tuple[int | tuple[int, ...] | None, int | None]:
    """(GPU budgets, RAM budget) that ``held`` (bytes other models hold per ``("CPU", 0)`` /
    ``("GPU", index)``) leaves under the configured budgets; None where nothing limits them."""
    cap = config.gpu_memory_budgets()
    gpu: int | tuple[int, ...] | None = _configured_gpu_budget()
    # (One budget per GPU for another number of GPUs goes to the planner as given: its error says so.)
    if hw.gpus and any(k == "GPU" for k, _ in held) and len(cap) in (0, 1, len(hw.gpus)):
        # Only when other models hold GPU memory; otherwise the planner's own view (free VRAM) stands.
        caps = [
            cap[i] if len(cap) > 1 else (cap[0] if cap else g.vram_bytes)
            for i, g in enumerate(hw.gpus)
        ]
        gpu = tuple(
            max(0, min(c, g.vram_bytes) - held.get(("GPU", g.index), 0))
            for c, g in zip(caps, hw.gpus, strict=True)
        )
    ram = held.get(("CPU", 0), 0)
    return gpu, (max(0, hw.cpu.ram_bytes - ram) if ram else None)


def plan_model(
    anatomy: Anatomy, hw: Hardware, req: PlanRequest, *, digest: str = "", calibrated: bool = True
) -> Plan:
    """The plan for a model here: its recorded workload when the request names none, and this
    machine's calibrated speed model when ``calibrated`` (not for profiles of other machines)."""
    if req.workload is None and digest:
        recorded = calibration.workload_for(digest)
        if recorded is not None:
            req = dataclasses.replace(req, workload=recorded)
    # Settings a runner crashed without on this machine (the server loads with them off).
    safety = Safety(hw.fingerprint) if calibrated else None
    if safety is not None and safety.is_off("mmap") and req.use_mmap is None:
        req = dataclasses.replace(req, use_mmap=True)
    speed, n_runs = calibration.speed_params_for(hw.fingerprint) if calibrated else (None, 0)
    p = make_plan(anatomy, hw, req, speed)
    notes = [f"Speeds calibrated from {n_runs} runs on this machine."] if speed is not None else []
    notes += safety.sentences() if safety is not None else []
    if notes:
        p = dataclasses.replace(p, reasons=(*p.reasons, *notes))
    return p


def plan_for(
    model_path: Path | str,
    options: Mapping[str, Any],
    *,
    digest: str,
    hw: Hardware,
    held: Mapping[tuple[str, int], int] | None = None,
) -> Plan:
    """The plan a served model gets here with these request options, in what ``held`` leaves free."""
    gpu, ram = budgets_left(hw, held or {})
    req = request_from_options(options, gpu_budget_bytes=gpu, ram_budget_bytes=ram)
    return plan_model(read_anatomy(model_path), hw, req, digest=digest)
