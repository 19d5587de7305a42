"""Teacher-forced long answers: labels fed token by token, values generated greedily, every line scored.

A long-answer task (:mod:`.tasks.long_answer`) gives K lines ``<label><value>``. After the prompt
(query-aware: prefilled with the question; query-agnostic: the context prefilled, then the question
read as one multi-token turn) the whole answer is a single decode of one-token steps:

- line ``i``'s label tokens (after a newline from the second line on) are fed one per step,
  whatever the model predicts (teacher forcing: a wrong value does not derail the next line);
- then the model's greedy tokens are fed back as the value, until it predicts a stop token (a
  newline or end of sequence, not fed) or has written ``len(value tokens) + VALUE_SLACK`` tokens.

With an empty label and no stop this is ``generate(do_sample=False)`` token for token (tested), so a
cache sees exactly the decode steps it would see writing the answer itself, with the labels the
truth. A cache's counters (``RaggedCache.counters``; HeteroCache's) are read after the prefill,
after the question turn and after every step: the record keeps, per step, how much each counter
(drift checks, refreshes, tokens moved from host memory, re-selected heads) grew.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..engine.cache import RaggedCache
from .batched_decode import step_rows
from .shared_prefill import PrefillTarget, _step, eos_ids
from .tasks.long_answer import LongAnswerTask

#: Value tokens allowed beyond the expected value's own count before a line is cut.
VALUE_SLACK = 3
#: The cache counters (``RaggedCache.counters``) recorded per decode step (those a cache reports).
STEP_COUNTERS = ("drift_checks", "refreshes", "satellite_refills", "reselected_heads", "tokens_moved")


@dataclass(frozen=True)
class LineTokens:
    """One line as token ids: ``forced`` fed in order, then up to ``max_value`` generated tokens."""

    forced: tuple[int, ...]
    max_value: int


def answer_lines(tokenizer, task: LongAnswerTask, sample) -> list[LineTokens]:
    """The token plan of ``sample``'s answer.

    Each line's text ``separator + label + value`` (no separator before the first) is tokenized
    in one piece and its forced tokens are those lying wholly inside ``separator + label``: a token
    the label shares with the value (a label's final space merged into a word, ``" bold"``) is left
    for the model to write, so the forced tokens are those it would read writing the true line.
    """
    lines = []
    for i, item in enumerate(task.items(sample)):
        head = (task.separator if i else "") + item.label
        text = head + item.value
        if getattr(tokenizer, "is_fast", False):
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, ends = enc["input_ids"], [end for _, end in enc["offset_mapping"]]
            forced = [t for t, end in zip(ids, ends) if end <= len(head)]
            value_tokens = len(ids) - len(forced)
        else:
            forced = tokenizer(head, add_special_tokens=False)["input_ids"]
            value_tokens = len(tokenizer(item.value, add_special_tokens=False)["input_ids"])
        lines.append(LineTokens(tuple(forced), value_tokens + VALUE_SLACK))
    return lines


def newline_stop(tokenizer, model) -> Callable[[int], bool]:
    """``stop(token)``: whether ``token`` ends a value: an end-of-sequence id or a token whose text
    holds a newline (decoded once per id)."""
    eos = eos_ids(model, tokenizer)
    known: dict[int, bool] = {}

    def stop(token: int) -> bool:
        if token not in known:
            known[token] = token in eos or "\n" in tokenizer.decode([token])
        return known[token]

    return stop


class _LineWriter:
    """The answer of one cache as a state machine: given the model's greedy pick after the last fed
    token, :meth:`next` says which token to feed now (None: the answer is complete)."""

    def __init__(self, lines: list[LineTokens], stop: Callable[[int], bool]):
        self.lines, self.stop = lines, stop
        self.line, self.pos = 0, 0  # current line; index into its forced tokens
        self.values: list[list[int]] = [[] for _ in lines]
        self.fed: list[int] = []
        self.line_steps: list[list[int]] = [[0, 0] for _ in lines]  # [first, end) step of each line

    def next(self, pick: int) -> int | None:
        while self.line < len(self.lines):
            line = self.lines[self.line]
            if self.pos < len(line.forced):
                token = line.forced[self.pos]
                self.pos += 1
                return self._feed(token)
            value = self.values[self.line]
            if not self.stop(pick) and len(value) < line.max_value:
                value.append(pick)
                return self._feed(pick)
            self.line_steps[self.line][1] = len(self.fed)
            self.line, self.pos = self.line + 1, 0
            if self.line < len(self.lines):
                self.line_steps[self.line][0] = len(self.fed)
        return None

    def _feed(self, token: int) -> int:
        self.fed.append(token)
        return token


class _Counters:
    """A cache's counters (:data:`STEP_COUNTERS`, ``RaggedCache.counters``), read again on each
    :meth:`growth`; ``known`` is False for a cache that has none (transformers' own)."""

    def __init__(self, cache):
        self.cache = cache
        self.known = isinstance(cache, RaggedCache)
        self.last = self._read()

    def _read(self) -> dict[str, int]:
        if not self.known:
            return {}
        now = self.cache.counters()
        return {k: int(now[k]) for k in STEP_COUNTERS if isinstance(now.get(k), (int, float))}

    def growth(self) -> dict[str, int]:
        """How much each counter grew since the last read."""
        now = self._read()
        grew = {k: v - self.last.get(k, 0) for k, v in now.items()}
        self.last = now
        return grew


@dataclass
class AnswerStart:
    """One cache to answer with (see :class:`~.batched_decode.DecodeStart`): ``logits`` ``[1, vocab]``
    of its last cached position, or ``new_ids`` ``[1, q]`` still to read (the question turn)."""

    cache: object
    lines: list[LineTokens]
    logits: torch.Tensor | None = None
    new_ids: torch.Tensor | None = None


@dataclass
class AnswerOutcome:
    """What one cache answered.

    Attributes:
        values: each line's generated value tokens.
        fed: every token fed during the answer (labels and values), one decode step each.
        line_steps: ``[first, end)`` decode steps of each line (its label and value).
        turn_stats: how much each counter grew while the question turn was read
            (query-agnostic; empty otherwise); None for a cache without counters.
        step_stats: per counter, its growth at each decode step (``len(fed)`` values); None
            without counters.
    """

    values: list[list[int]]
    fed: list[int]
    line_steps: list[list[int]]
    turn_stats: dict | None = None
    step_stats: dict | None = None


@torch.inference_mode()
def write_answers(model, starts: list[AnswerStart], stop: Callable[[int], bool], max_batch: int = 64
                  ) -> list[AnswerOutcome]:
    """Teacher-forced answers of every start (see the module), decoded together: one forward per
    step for up to ``max_batch`` caches (:func:`~.batched_decode.step_rows`); a step with a single
    cache runs it alone (the same forward as ``greedy_continue``).

    Returns:
        one :class:`AnswerOutcome` per start, in order.
    """
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    writers, picks, counters, turns = [], [], [], []
    for s in starts:
        if (s.logits is None) == (s.new_ids is None):
            raise ValueError("give exactly one of logits (prompt fully cached) or new_ids")
        counters.append(_Counters(s.cache))
        logits = s.logits if s.new_ids is None else _step(model, s.cache, s.new_ids)
        turn = counters[-1].growth() if s.new_ids is not None else {}
        turns.append(turn if counters[-1].known else None)
        writers.append(_LineWriter(s.lines, stop))
        picks.append(int(logits.float().argmax(-1)[0]))
    steps = [{k: [] for k in c.last} if c.known else None for c in counters]
    feed = [w.next(p) for w, p in zip(writers, picks)]
    active = [i for i, t in enumerate(feed) if t is not None]
    device = next(model.parameters()).device
    while active:
        for lo in range(0, len(active), max_batch):
            rows = active[lo : lo + max_batch]
            if len(rows) == 1:
                logits = _step(model, starts[rows[0]].cache, torch.tensor([[feed[rows[0]]]], device=device))
                out = [int(logits.float().argmax(-1)[0])]
            else:
                out = step_rows(model, [starts[i].cache for i in rows], [feed[i] for i in rows])
            for i, pick in zip(rows, out):
                if steps[i] is not None:
                    for k, grew in counters[i].growth().items():
                        steps[i][k].append(grew)
                feed[i] = writers[i].next(pick)
        active = [i for i in active if feed[i] is not None]
    return [AnswerOutcome(w.values, w.fed, w.line_steps, t, s) for w, t, s in zip(writers, turns, steps)]


def run_long_answer(grid, task: LongAnswerTask, length: int, sample, prompt, todo: list) -> None:
    """The grid's cells ``todo`` (``(idx, mode, method, budget)``) of one long-answer sample: one
    shared prefill where the caches allow it (else one prefill per cache), the answers written
    together (:func:`write_answers`, ``decode_batch`` rows), one record each (:func:`answer_record`)."""
    from .caches import new_cache
    from .generation import Generation, prefill

    model, cfg = grid.model, grid.config
    device = next(model.parameters()).device
    ids = torch.tensor([prompt.input_ids], dtype=torch.long, device=device)
    question = ids[:, prompt.context_len :]
    lines = answer_lines(grid.tokenizer, task, sample)
    shared, rest = grid.shareable_caches(todo) if cfg.shared_prefill else ([], list(todo))
    starts, items, prefill_seconds, filled_by = [], [], [], []
    if shared:
        aware = [item[1] == "query_aware" for item, _ in shared]
        targets = [PrefillTarget(c, prompt.length if a else prompt.context_len) for (_, c), a in zip(shared, aware)]
        logits, seconds = grid.timed_prefill(ids, targets)
        for (item, cache), a in zip(shared, aware):
            starts.append(AnswerStart(cache, lines, logits=logits if a else None, new_ids=None if a else question))
            items.append(item)
            prefill_seconds.append(seconds)
            filled_by.append(len(shared))
        del shared
    for item in rest:  # caches the shared prefill cannot fill: their own prefill, as generate() runs it
        torch.manual_seed(cfg.seed)
        cache = new_cache(grid.factory, item[2], item[3], model)
        start = time.perf_counter()
        if item[1] == "query_aware":
            starts.append(AnswerStart(cache, lines, logits=_step(model, cache, ids)))
        else:
            prefill(model, ids[:, : prompt.context_len], cache)
            starts.append(AnswerStart(cache, lines, new_ids=question))
        items.append(item)
        prefill_seconds.append(time.perf_counter() - start)
        filled_by.append(0)
    grid.bar.set_postfix_str(f"{task.name} {length} answer x{len(starts)}", refresh=False)
    t0 = time.perf_counter()
    outcomes = write_answers(model, starts, newline_stop(grid.tokenizer, model), max_batch=cfg.decode_batch)
    seconds = time.perf_counter() - t0  # one wall time for the batch
    del starts
    batched = len(outcomes) if cfg.decode_batch > 1 and len(outcomes) > 1 else 0
    for (_, mode, method, budget), outcome, pre, n in zip(items, outcomes, prefill_seconds, filled_by):
        metrics, extra = answer_record(grid.tokenizer, task, sample, outcome)
        gen = Generation(extra.pop("prediction"), len(outcome.fed), pre, seconds + pre)
        grid.log_generation(task, length, sample, prompt, mode, method, budget, gen, shared=n, batched=batched,
                            metrics=metrics, extra=extra)


def answer_record(tokenizer, task: LongAnswerTask, sample, outcome: AnswerOutcome) -> tuple[dict, dict]:
    """``(metrics, extra fields)`` of one answer's record.

    metrics: ``score`` (mean line score), ``item_<i>`` (line ``i``'s score, 0 or 100, from 1), and
    for a cache with counters the answer's totals ``decode_<counter>`` and the question turn's
    ``turn_<counter>`` (query-agnostic). Extra fields: ``prediction`` (labels and generated values,
    one line each), ``values``, ``line_steps``, ``step_stats``, ``turn_stats``.
    """
    values = [tokenizer.decode(v, skip_special_tokens=True) for v in outcome.values]
    per_item = task.score_items(values, sample)
    metrics = {"score": sum(per_item) / len(per_item)}
    metrics.update({f"item_{i + 1}": s for i, s in enumerate(per_item)})
    if outcome.step_stats is not None:
        metrics.update({f"decode_{k}": sum(v) for k, v in outcome.step_stats.items()})
        metrics.update({f"turn_{k}": v for k, v in (outcome.turn_stats or {}).items()})
    labels = [item.label for item in task.items(sample)]
    prediction = task.separator.join(label + value for label, value in zip(labels, values))
    extra = dict(prediction=prediction, values=values, line_steps=outcome.line_steps,
                 step_stats=outcome.step_stats, turn_stats=outcome.turn_stats)
    return metrics, extra
