"""What an evaluation runs (``EvalConfig``) and what it returns (``EvalResult``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .caches import (
    current_name,
    is_full,
)
from .fidelity import FidelityConfig
from .generation import canonical_mode
from .results import (
    summary,
)
from .tasks import expand_task_names


@dataclass
class EvalConfig:
    """What to evaluate.

    Attributes:
        methods: cache-method names for the factory; full-cache names ("dynamic", "fullkv") run once
            per cell at budget 1.0. The old name "full" is read as "dynamic" (with a FutureWarning).
        budgets: kept fractions of the prompt KV, each in (0, 1].
        tasks: task or group names (see :mod:`heterocache.eval.tasks`); groups are expanded.
        lengths: prompt lengths in tokens (synthetic: filled to; datasets: truncated to).
        modes: ``query_aware`` and/or ``query_agnostic`` (``aware``/``agnostic`` accepted).
        num_samples: samples per (task, length) (datasets: the first ones; 0 = all).
        seed: seeds the synthetic prompts (and torch, for methods that draw random numbers).
        max_new_tokens: overrides every task's own generation length when set.
        chat_template: ``None`` = use the tokenizer's when it has one; True/False force it.
        data_dir: root of ``longbench/``, ``longbenchv2/``, ``infinitebench/``.
        fidelity: also run the teacher-forced fidelity measurement when set.
        shared_prefill: run every (method, budget, mode) of a sample from one prefill forward
            (default True; the same greedy tokens as one ``generate()`` per cache, tested); caches
            it cannot fill (other than ragged or DynamicCache, or a model without the
            ``heterocache`` attention) fall back to ``generate()``. ``seconds`` in a shared
            record is its own decoding plus the whole shared prefill.
        decode_batch: after a shared prefill, decode up to this many of its caches together, one
            batched forward per token with each row attended by its own cache
            (:mod:`.batched_decode`; default 64; 1 = one cache after another). ``seconds`` of a
            batched record is the whole batch's decoding plus the shared prefill.
        prefill_chunk_size: prefill the prompt (query-aware) or the context (query-agnostic) in
            pieces of this many tokens (``generate(prefill_chunk_size=...)``; ``docs/prefill.md``);
            one generation per cell then (no shared prefill). Default None: one piece.
        prefill: how ragged caches compress a prompt in pieces: "exact" (default) or "bounded"
            (``RaggedCache.prefill``; needs ``prefill_chunk_size``). Methods that cannot do
            "bounded" are skipped with a warning.
    """

    methods: tuple[str, ...] = ("dynamic",)
    budgets: tuple[float, ...] = (0.5,)
    tasks: tuple[str, ...] = ("niah_single",)
    lengths: tuple[int, ...] = (1024,)
    modes: tuple[str, ...] = ("query_aware", "query_agnostic")
    num_samples: int = 5
    seed: int = 0
    max_new_tokens: int | None = None
    chat_template: bool | None = None
    data_dir: str = "data"
    fidelity: FidelityConfig | None = None
    shared_prefill: bool = True
    decode_batch: int = 64
    prefill_chunk_size: int | None = None
    prefill: str = "exact"

    def __post_init__(self) -> None:
        self.methods = tuple(dict.fromkeys(current_name(m, warn=True) for m in self.methods))
        self.budgets = tuple(float(b) for b in self.budgets)
        self.tasks = tuple(expand_task_names(self.tasks))
        self.lengths = tuple(int(n) for n in self.lengths)
        self.modes = tuple(dict.fromkeys(canonical_mode(m) for m in self.modes))
        if not all(0 < b <= 1 for b in self.budgets):
            raise ValueError(f"budgets are kept fractions in (0, 1], got {self.budgets}")
        if not all(n > 0 for n in self.lengths):
            raise ValueError(f"lengths must be positive, got {self.lengths}")
        if self.decode_batch < 1:
            raise ValueError("decode_batch must be >= 1")
        if self.num_samples < 0:
            raise ValueError("num_samples must be >= 0")
        if self.prefill_chunk_size is not None and self.prefill_chunk_size < 1:
            raise ValueError("prefill_chunk_size must be >= 1")
        if self.prefill not in ("exact", "bounded"):
            raise ValueError(f"prefill must be 'exact' or 'bounded', got {self.prefill!r}")
        if self.prefill == "bounded" and self.prefill_chunk_size is None:
            raise ValueError("prefill='bounded' compresses a prompt as its pieces arrive: give prefill_chunk_size")
        if isinstance(self.fidelity, dict):
            self.fidelity = FidelityConfig(**self.fidelity)

    def method_budgets(self) -> list[tuple[str, float]]:
        """The (method, budget) pairs to run: full-cache methods once, at 1.0."""
        return [(m, b) for m in self.methods for b in ((1.0,) if is_full(m) else self.budgets)]

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.fidelity is not None and self.fidelity.text_path is not None:
            d["fidelity"]["text_path"] = str(self.fidelity.text_path)
        return d


@dataclass
class EvalResult:
    """What :func:`run_eval` returns: the aggregated cells, all records, where the files went,
    and how many generations this call actually ran (0 when everything was already done)."""

    cells: list[dict]
    records: list[dict]
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    ran: int = 0

    @property
    def summary(self) -> str:
        return summary(self.cells)
