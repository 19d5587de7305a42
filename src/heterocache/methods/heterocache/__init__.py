"""The HeteroCache method: budget plan, host-resident satellites, drift-triggered refresh."""

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


def _register() -> None:
    """Make HeteroCache available as method "heterocache" (``heterocache.make_cache``)."""
    import dataclasses

    from ...engine.registry import register_method

    def factory(budget, model, profile=None, **params):
        if profile is not None:
            return HeteroCache(profile, budget=budget, **params)
        if model is None:
            raise ValueError(
                "method 'heterocache' needs the model (its profile is found by the model's name) or profile=... "
                "(a HeadProfile, a file, or a bundled/Hub profile name)"
            )
        return HeteroCache.for_model(model, budget=budget, **params)

    params = {f.name: f.default for f in dataclasses.fields(HeteroCachePolicy) if f.name not in ("budget",)}
    params.update(block_size=64, reserve=128)
    register_method(
        "heterocache",
        description="per-head roles from an offline profile: anchors compressed, volatile/pivot heads full, "
        "satellites compressed with a host copy refreshed on pivot drift (arXiv 2601.13684)",
        cache_class=HeteroCache,
        policy_class=HeteroCachePolicy,
        factory=factory,
        params=params,
        replace=True,
    )


_register()
