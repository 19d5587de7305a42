"""The HeteroCache method: budget plan, host-resident satellites, drift-triggered refresh."""

from .cache import HeteroCache
from .plan import InfeasibleBudgetError, min_feasible_budget, plan_tokens
from .policy import HeteroCachePolicy, RefreshStats

__all__ = [
    "HeteroCache",
    "HeteroCachePolicy",
    "InfeasibleBudgetError",
    "RefreshStats",
    "min_feasible_budget",
    "plan_tokens",
]
