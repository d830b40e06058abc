"""offload.planner: knows machines and models, decides placements. Imports nothing of ours."""

from offload.planner.cost import SpeedParams, predict, predict_aggregate
from offload.planner.errors import (
    BudgetTooSmall,
    GGUFError,
    GPUBudgetError,
    OffloadError,
    PlanInfeasible,
    PlannerError,
    WorkloadError,
)
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
    Workload,
)

__all__ = [
    "Anatomy",
    "BudgetTooSmall",
    "GPUBudgetError",
    "Workload",
    "WorkloadError",
    "predict_aggregate",
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
