"""offload.planner: knows machines and models, decides placements. Imports nothing of ours."""

from offload.planner.errors import GGUFError, OffloadError, PlanInfeasible, PlannerError
from offload.planner.search import plan
from offload.planner.types import (
    Anatomy,
    CPUInfo,
    DevicePlan,
    GPUInfo,
    Hardware,
    Plan,
    PlanRequest,
    Prediction,
    TensorInfo,
)

__all__ = [
    "Anatomy", "CPUInfo", "DevicePlan", "GGUFError", "GPUInfo", "Hardware", "OffloadError",
    "Plan", "PlanInfeasible", "PlanRequest", "PlannerError", "Prediction", "TensorInfo", "plan",
]
