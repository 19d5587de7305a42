"""The options of HeteroCache (arXiv 2601.13684, https://arxiv.org/abs/2601.13684): their fields,
defaults and validation, and the internal constants that are not options.

``docs/heterocache.md`` describes every option (what it does, its default, when to change it),
the internal constants and the options removed after their ablations (docs/results.md#ablations).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...policy.budget import check_budget_spec
from ...profile import HeadProfile, Role
from .plan import pivot_offload_pays

#: Steps between a decode-time drift check and the host acting on it. The check runs after the
#: layer's attention at step t; its decision reaches the host without a wait and is acted on at
#: the start of step t + 2, when the device has long finished step t (the host runs at most about a
#: step ahead). A synchronous refresh would be visible from step t + 1: satellites see a drift
#: refresh one step later than that. 0 acts at once, as the paper does (the host then waits for the
#: device at every check; docs/results.md#ablations compares the two).
#: A policy reads its own ``_decision_lag`` (this value unless set on the instance, e.g. by a study
#: of long answers).
DECISION_LAG = 2

#: Turn queries that score a re-chosen head's prompt at a new turn: about a whole question and the
#: chat template's tail (fewer lose the question's start; docs/results.md#ablations has the
#: measurement). A policy reads its own ``_turn_window``.
TURN_WINDOW = 32

#: On CUDA, refresh copies run on a side stream, overlapping the layers before the refreshed one
#: (synchronous copies only make decoding slower). A policy reads its own ``_asynchronous``.
ASYNCHRONOUS = True

TURN_RESELECT_MODES = ("own", "pivot")


@dataclass
class HeteroCacheOptions:
    """The user options of HeteroCache (the fields of ``HeteroCachePolicy``).

    Args:
        profile: the model's ``HeadProfile`` (roles, clusters, stability of every KV head).
        budget: fraction of the prompt KV kept on the device, in (0, 1] (default 0.25), over the
            full-attention layers (sliding-window layers keep their window and are not counted;
            the profile still describes every layer). Ignored when ``budget_tokens`` is given.
        budget_tokens: absolute budget: average prompt tokens kept per KV head (the fraction is then
            ``min(1, budget_tokens / prompt_tokens)`` per row). Default None (use ``budget``).
        window: prompt queries whose attention selects the compressed heads' tokens (default 1, the
            last prompt query as in the paper's reference code); these last tokens are always kept.
        kernel: average-pooling kernel of the selection and drift scores: an odd int, or "auto"
            (default): per prompt length, from the prompt tokens the compressed heads keep on average
            (``plan.auto_kernel``: for SmolLM2 at 4096 tokens 15 at budget 0.25, where the pivots are
            compressed by default, 5 there with ``pivot_offload=False``, 15 at 0.5); rows of one
            batch may differ, each pooled with its own.
        refresh_interval: decode steps between drift checks (default 5); also the turn queries a
            new turn's drift check scores.
        drift_threshold: a pivot drifted if the median overlap of its buffered queries' top-k sets
            (k: the per-head base budget) with its reference set falls below this (default 0.5).
        refresh: switch the drift-triggered refresh of satellites (default True). False: satellites
            keep their prefill choice while decoding and at a new turn (unless ``turn_reselect``
            re-chooses them from their own queries).
        offload: keep the full prompt KV of satellites (and of the heads ``turn_reselect`` and
            ``pivot_offload`` re-choose) in host memory (default True). False = no host copies at
            all: satellites fixed after prefill like anchors, no refresh, and ``turn_reselect``
            falls back to "pivot" (``pivot_offload`` is refused).
        inverse_stability: budget shares by the profile's inverse-stability ratios (default True);
            False = every compressed head gets the same share.
        turn_reselect: what a new turn (several tokens at once, e.g. the question after a compressed
            document) re-chooses. "own" (default): before the turn is attended, every compressed
            head with a host copy (satellites and anchors; pivots too with ``pivot_offload``)
            re-chooses its prompt slots from the attention of the turn's last ``TURN_WINDOW``
            queries of that head over its full prompt keys (host copy, brought to the device for
            the turn only), pooled and maxed over the group as the prefill selection scores; the
            chosen tokens, ascending, are copied from host memory into the slots. Anchors keep a
            host copy for it. "pivot" (the paper's single-turn behaviour): anchors keep their prefill
            choice for good and keep no host copy; satellites follow their pivot. Either way, every
            pivot's satellites not re-chosen on their own are refilled at a new turn with what the
            turn's last query of their pivot attends to most, drifted or not (with ``refresh``). A
            single turn (a prompt, then one token per step) never reaches this: its tokens are the
            same with "own" and "pivot".
        pivot_offload: lower the budget floor from (volatile + pivot) / all KV heads to volatile /
            all: pivots are compressed on the device like the other heads (their inverse-stability
            share, chosen at prefill the same way) and keep their full prompt KV in host memory. A
            compressed pivot cannot score the whole prompt on the device, so there are no cluster
            refreshes: every compressed head is re-chosen from its own queries at a new turn (needs
            ``turn_reselect="own"`` and ``offload``). On SmolLM2 at budget 0.25 the compressed heads
            then keep ~950 tokens of 4096 instead of ~89. "auto" (default): on where it multiplies
            the compressed heads' mean share of the prompt by ``plan.PIVOT_OFFLOAD_GAIN`` (2) or
            more, or the budget is under the volatile-and-pivot floor (``plan.pivot_offload_pays``:
            SmolLM2 up to budget 0.36, Llama-3.1-8B up to 0.29), and the options allow it; off with
            ``budget_tokens`` (the fraction is only known per prompt). Resolved at construction to
            True or False.
    """

    profile: HeadProfile = None
    budget: float = 0.25
    budget_tokens: int | None = None
    window: int = 1
    kernel: int | str = "auto"
    refresh_interval: int = 5
    drift_threshold: float = 0.5
    refresh: bool = True
    offload: bool = True
    inverse_stability: bool = True
    turn_reselect: str = "own"
    pivot_offload: bool | str = "auto"

    def _check_options(self) -> None:
        """Validate the options and resolve the ones that depend on others (``turn_reselect``
        without host copies, ``pivot_offload="auto"``).

        Raises:
            TypeError: ``profile`` is not a ``HeadProfile``.
            ValueError: an option out of its range, or ``pivot_offload=True`` with options that rule
                it out.
        """
        if not isinstance(self.profile, HeadProfile):
            raise TypeError(f"profile must be a HeadProfile, got {type(self.profile).__name__}")
        self.budget, self.budget_tokens = check_budget_spec(self.budget, self.budget_tokens)
        if isinstance(self.kernel, str) and self.kernel != "auto":
            raise ValueError(f"kernel must be an odd int or 'auto', got {self.kernel!r}")
        for name in ("window", "kernel", "refresh_interval"):
            value = getattr(self, name)
            if value != "auto" and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.kernel != "auto" and self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd, got {self.kernel}")
        if not 0.0 <= self.drift_threshold <= 1.0:
            raise ValueError(f"drift_threshold must be in [0, 1], got {self.drift_threshold}")
        if self.turn_reselect not in TURN_RESELECT_MODES:
            raise ValueError(f"turn_reselect must be 'pivot' or 'own', got {self.turn_reselect!r}")
        if not self.offload:  # no host copies: nothing a turn could re-choose from
            self.turn_reselect = "pivot"
        roles = self.profile.roles
        # Compressed pivots are re-chosen from their host copies at a new turn, as every head then is.
        pivots_can_offload = self.offload and self.turn_reselect == "own"
        if self.pivot_offload == "auto":  # where it buys the compressed heads far more tokens
            self.pivot_offload = (pivots_can_offload and self.budget_tokens is None
                                  and pivot_offload_pays(roles == Role.VOLATILE, roles == Role.PIVOT, self.budget))
        elif not isinstance(self.pivot_offload, bool):
            raise ValueError(f"pivot_offload must be True, False or 'auto', got {self.pivot_offload!r}")
        if self.pivot_offload and not pivots_can_offload:
            raise ValueError("pivot_offload re-chooses every compressed head from its host copy at a new turn: "
                             "it needs offload=True and turn_reselect='own'")

    @property
    def anchor_host_copy(self) -> bool:
        """Whether anchors keep a host copy of their full prompt KV: exactly when a new turn
        re-chooses them from it (``turn_reselect="own"``, which needs ``offload``)."""
        return self.offload and self.turn_reselect == "own"
