"""Quest (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
Inference", arXiv 2406.10774; reference code: mit-han-lab/Quest).

Every token stays on the device. The stored keys of each (row, KV head) are cut into pages of
``page_size`` slots; per page the channel-wise minimum and maximum key are kept. At each decode
step a page's score is an upper bound of its best query-key product, ``sum_d max(q_d min_d,
q_d max_d)``, and attention reads only the top pages up to the token budget (the page holding
the newest token always among them). Quest saves memory bandwidth per step, not memory: the
memory report counts the whole KV plus the summaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.registry import register_method
from ..policy.page_selection import PageSelectionPolicy
from ..policy.pages import page_bounds


@register_method(
    "quest",
    description="every token kept; each decode step reads the top pages by query-aware key bounds "
    "(Tang et al. 2024)",
    paper="https://arxiv.org/abs/2406.10774",
)
@dataclass
class QuestPolicy(PageSelectionPolicy):
    """Query-aware page selection at every decode step over a full KV cache (Quest, Tang et al.
    2024, https://arxiv.org/abs/2406.10774): a page's score is the upper bound of its best
    query-key product, ``sum_d max(q_d min_d, q_d max_d)``.

    Args:
        budget: fraction of each segment's stored tokens attended per step, in (0, 1] (default
            0.25); the page count is ``max(min_pages, ceil(budget * tokens / page_size))`` with
            ``tokens`` the longest segment of the layer at that step.
        budget_tokens: an absolute per-step token budget instead (the paper's ``token_budget``,
            e.g. 512-4096); overrides ``budget``.
        page_size: tokens per page (default 16, the paper's).
        dense_layers: the first layers attend to every token (default 2, as the reference code).
        min_pages: pages attended at least (default 3, as the reference code).
        gqa_reduce: how the query heads of a GQA group choose pages. "none" is the paper's
            behaviour (Tang et al. 2024 select per attention head; the reference code runs MHA
            models, or repeats KV per query head): a page set per query head, G times the page
            reads of a KV-head set. "max" (default) is this library's GQA extension: one page set
            per KV head, ranked by the best of its query heads' bounds, so a group's K/V pages are
            read once; "mean" ranks by their mean.

    When the budget covers every page, the layer attends densely: exactly FullKV's result.
    """

    def page_scores(self, q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
        return page_bounds(q, kmin, kmax)  # sum_d max(q_d min_d, q_d max_d)


QuestCache = QuestPolicy.cache_class
