"""The HeteroCache method: budget plan, host-resident satellites, drift-triggered refresh."""

from ...engine.registry import register_method
from .cache import HeteroCache
from .plan import InfeasibleBudgetError, budget_floor, min_feasible_budget, plan_tokens
from .policy import HeteroCachePolicy, RefreshStats

__all__ = [
    "HeteroCache",
    "HeteroCachePolicy",
    "InfeasibleBudgetError",
    "RefreshStats",
    "budget_floor",
    "min_feasible_budget",
    "plan_tokens",
]


@register_method(
    "heterocache",
    description="per-head roles from an offline profile: anchors compressed, volatile/pivot heads full, "
    "satellites compressed with a host copy refreshed on pivot drift",
    paper="https://arxiv.org/abs/2601.13684",
    policy_class=HeteroCachePolicy,
    cache_class=HeteroCache,
)
def _make_heterocache(budget, model, profile=None, **params) -> HeteroCache:
    """The registry's factory: the profile given, or the model's (found by its name)."""
    if profile is not None:
        return HeteroCache(profile, budget=budget, **params)
    if model is None:
        raise ValueError(
            "method 'heterocache' needs the model (its profile is found by the model's name) or profile=... "
            "(a HeadProfile, a file, or a bundled/Hub profile name)"
        )
    return HeteroCache.for_model(model, budget=budget, **params)
