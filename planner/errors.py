"""The error family every offload package raises.

Each error carries what failed, why, and what to do about it. The CLI turns them into one-line
messages and exit codes; the server into ``{"error": ...}`` with ``http_status``.
"""

from __future__ import annotations

__all__ = [
    "OffloadError",
    "PlannerError",
    "GGUFError",
    "PlanInfeasible",
    "HardwareProfileError",
    "WorkloadError",
    "GPUBudgetError",
    "BudgetTooSmall",
]


class OffloadError(Exception):
    """Base of every error offload raises on purpose; its message is meant for the user."""

    http_status: int = 500
    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PlannerError(OffloadError):
    """Something the planner could not read or decide."""


class GGUFError(PlannerError):
    """A file is not a readable GGUF model (truncated, wrong magic, absurd header)."""

    http_status = 400

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: not a usable GGUF file: {problem}")
        self.path = str(path)
        self.problem = problem


class PlanInfeasible(PlannerError):
    """No placement satisfies the budgets; ``reason`` says what would be needed."""

    http_status = 507

    def __init__(self, reason: str) -> None:
        super().__init__(f"cannot place the model: {reason}")
        self.reason = reason


class HardwareProfileError(PlannerError):
    """A hardware profile name or file could not be read."""

    http_status = 400


class WorkloadError(PlannerError):
    """A workload (prompt and answer lengths) that no request could have."""

    http_status = 400


class GPUBudgetError(PlannerError):
    """A GPU memory budget the GPUs cannot honour: larger than the card, or one per GPU that
    does not match the GPUs there are."""

    http_status = 400


class BudgetTooSmall(PlanInfeasible):
    """A GPU memory budget below the smallest plan that uses the GPU at all."""
