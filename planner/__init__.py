"""offload.planner: knows machines and models, decides placements. Imports nothing of ours."""

from offload.planner.cost import SpeedParams, predict
from offload.planner.errors import GGUFError, OffloadError, PlanInfeasible, PlannerError
from offload.planner.evaluate import evaluate, fits
from offload.planner.search import plan
from offload.planner.types import (
    Anatomy,
    CPUInfo,
    DevicePlan,
    GPUInfo,
    Hardware,
    Placement,
    Plan,
    PlanRequest,
    Prediction,
    TensorInfo,
)

__all__ = [
    "Anatomy",
    "CPUInfo",
    "DevicePlan",
    "GGUFError",
    "GPUInfo",
    "Hardware",
    "OffloadError",
    "Placement",
    "Plan",
    "PlanInfeasible",
    "PlanRequest",
    "PlannerError",
    "Prediction",
    "SpeedParams",
    "TensorInfo",
    "evaluate",
    "fits",
    "plan",
    "predict",
]
