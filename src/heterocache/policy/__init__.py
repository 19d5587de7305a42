"""The policy interface (``Policy``, ``PrefillContext``) and what the methods share: budgets
(``budget``), the budgeted base class (``budgeted``), attention scores (``scoring``), SnapKV's
window-scored selection (``window_selection``) and per-page key summaries (``pages``)."""
