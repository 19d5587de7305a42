"""One evaluation grid run: every (method, budget, mode) of every sample, from one shared prefill
per sample where the caches allow it (``Grid``; :func:`heterocache.eval.runner.run_eval` drives it)."""

from __future__ import annotations

import json
import sys
import time

import torch

from ..engine.cache import RaggedCache
from .batched_decode import DecodeStart, greedy_continue_many
from .caches import (
    CacheFactory,
    cache_settings,
    new_cache,
    option_defaults,
    settings_agree,
    with_prefill_mode,
)
from .config import EvalConfig
from .fidelity import FidelityConfig, compare, fidelity_ids, teacher_forced_logprobs
from .generation import Generation, generate_answer
from .long_answer import run_long_answer
from .prompting import PromptFormatter
from .results import (
    FIDELITY_MODE,
    FIDELITY_TASK,
    RecordLog,
    record_key,
)
from .shared_prefill import (
    PrefillTarget,
    eos_ids,
    greedy_continue,
    model_shares_prefill,
    prefill_many,
    supports_shared_prefill,
)
from .tasks import get_task
from .tasks.long_answer import LongAnswerTask


def _meta_for_record(meta: dict) -> dict:
    small = {k: v for k, v in meta.items() if len(json.dumps(v, default=str)) <= 2000}
    return json.loads(json.dumps(small, default=str))


def _feasible_pairs(pairs, factory: CacheFactory, model, prompt_tokens: int) -> tuple[dict, list]:
    """Drop (method, budget) pairs whose cache says the budget cannot be met (HeteroCache keeps
    whole heads full: a budget below their share is infeasible), with a warning, instead of
    failing in the middle of the grid. Returns ``({kept pair: its cache_settings}, skipped,
    {kept pair: its option defaults})``."""
    kept, skipped, defaults = {}, [], {}
    for method, budget in pairs:
        try:  # a budget below the floor is refused when the cache is made, a short prompt's at plan
            cache = new_cache(factory, method, budget, model)
            if isinstance(cache, RaggedCache):
                cache.policy.check_prompt(prompt_tokens)
        except ValueError as err:
            skipped.append({"method": method, "budget": budget, "reason": str(err)})
            print(f"skipping {method} at budget {budget}: {err}", file=sys.stderr)
            continue
        kept[(method, budget)] = cache_settings(cache)
        defaults[(method, budget)] = option_defaults(cache)
    return kept, skipped, defaults


def _check_settings(log: RecordLog, settings: dict, defaults: dict | None = None) -> None:
    """Refuse to resume over records of a (method, budget) made with other cache settings than the
    current ones (a changed default or option): they would be counted as if made with these.
    Records without settings (written before they were recorded) are not checked; an option a
    record lacks counts as its default (``settings_agree``)."""
    current = {(m, round(float(b), 6)): v for (m, b), v in settings.items()}
    known = {(m, round(float(b), 6)): v for (m, b), v in (defaults or {}).items()}

    def stale_record(r) -> bool:
        key = (r["method"], round(float(r["budget"]), 6))
        return ("settings" in r and key in current
                and not settings_agree(r["settings"], current[key], known.get(key, {})))

    stale = [r for r in log.records.values() if stale_record(r)]
    if stale:
        r = stale[0]
        raise ValueError(
            f"{log.path} holds {len(stale)} records made with other cache settings than now, e.g. "
            f"{r['method']}@{r['budget']:g} with {r['settings']}, "
            f"now {current[(r['method'], round(float(r['budget']), 6))]}. "
            "Delete those records (they are then run again) or write to another folder."
        )


class Grid:
    """One pass over the grid: skips what the log holds, runs and logs the rest."""

    def __init__(self, model, tokenizer, config: EvalConfig, factory: CacheFactory, log: RecordLog) -> None:
        self.model, self.tokenizer, self.config, self.factory, self.log = (
            model,
            tokenizer,
            config,
            factory,
            log,
        )
        self.formatter = PromptFormatter(tokenizer, config.chat_template)
        # A prompt in pieces: one generate() per cell (a shared prefill is one forward).
        self.shared = config.shared_prefill and config.prefill_chunk_size is None
        if config.prefill != "exact":
            self.factory = factory = with_prefill_mode(factory, config.prefill)
        self.settings, self.skipped, defaults = _feasible_pairs(config.method_budgets(), factory, model,
                                                                min(config.lengths))
        if config.prefill_chunk_size is not None:  # records of another prefill are other results
            for settings in self.settings.values():
                settings["prefill"] = {"chunk_size": config.prefill_chunk_size, "mode": config.prefill}
        self.pairs = list(self.settings)
        _check_settings(log, self.settings, defaults)
        self.tasks = [get_task(name, config.data_dir) for name in config.tasks]
        if config.prefill_chunk_size is not None and any(isinstance(t, LongAnswerTask) for t in self.tasks):
            raise ValueError("long-answer tasks prefill in one piece: run them without prefill_chunk_size")
        self.limit = getattr(model.config, "max_position_embeddings", None)
        self.ran = 0
        self.bar = None

    def done(self, method, budget, task, length, mode, idx) -> bool:
        return (
            record_key(
                dict(method=method, budget=budget, task=task, length=length, mode=mode, sample_idx=idx)
            )
            in self.log
        )

    def pending(self, task: str, length: int, modes, indices) -> list[tuple]:
        """``(idx, mode, method, budget)`` not yet in the log."""
        return [
            (i, mode, m, b)
            for i in indices
            for mode in modes
            for m, b in self.pairs
            if not self.done(m, b, task, length, mode, i)
        ]

    def run(self, progress: bool) -> None:
        from tqdm.auto import tqdm

        cfg, fid = self.config, self.config.fidelity
        # Known up front unless a dataset is asked for all its rows (num_samples = 0): those add
        # to the total once loaded.
        total = 0
        if cfg.num_samples:
            total += sum(
                len(self.pending(t.name, n, cfg.modes, range(cfg.num_samples)))
                for t in self.tasks
                for n in cfg.lengths
            )
        if fid:
            total += len(
                self.pending(FIDELITY_TASK, fid.prefill_tokens, [FIDELITY_MODE], range(fid.num_samples))
            )
        with tqdm(total=total, disable=not progress, desc="eval", unit="gen") as self.bar:
            for task in self.tasks:
                for length in cfg.lengths:
                    self.run_task(task, length)
            if fid:
                self.run_fidelity(fid)

    def run_task(self, task, length: int) -> None:
        cfg = self.config
        if cfg.num_samples and not self.pending(task.name, length, cfg.modes, range(cfg.num_samples)):
            return  # finished: do not even build the prompts
        for sample in task.samples(self.formatter, length, cfg.num_samples, cfg.seed):
            todo = self.pending(task.name, length, cfg.modes, [sample.index])
            if not cfg.num_samples:
                self.bar.total += len(todo)
            if not todo:
                continue
            prompt = self.formatter.encode(sample)
            max_new = cfg.max_new_tokens or sample.max_new_tokens
            if self.limit and prompt.length + max_new > self.limit:
                max_new = max(self.limit - prompt.length, 1)
            if isinstance(task, LongAnswerTask):  # teacher-forced lines, each scored (.long_answer)
                run_long_answer(self, task, length, sample, prompt, todo)
                continue
            if self.shared:
                todo = self.run_shared(task, length, sample, prompt, todo, max_new)
            for _, mode, method, budget in todo:
                self.bar.set_postfix_str(f"{task.name} {length} {mode} {method}@{budget:g}", refresh=False)
                torch.manual_seed(cfg.seed)
                cache = new_cache(self.factory, method, budget, self.model)
                gen = generate_answer(self.model, self.tokenizer, prompt, cache, mode, max_new,
                                      prefill_chunk_size=cfg.prefill_chunk_size)
                del cache  # free it before the next one is built
                self.log_generation(task, length, sample, prompt, mode, method, budget, gen)

    def run_shared(self, task, length: int, sample, prompt, todo: list, max_new: int) -> list:
        """Run the ``todo`` generations of one sample from a single prefill forward
        (:mod:`.shared_prefill`), then decode its caches together (:mod:`.batched_decode`, up to
        ``decode_batch`` rows); returns the items whose cache cannot be filled that way."""
        caches, rest = self.shareable_caches(todo)
        if not caches:
            return rest
        device = next(self.model.parameters()).device
        ids = torch.tensor([prompt.input_ids], dtype=torch.long, device=device)
        items = [item for item, _ in caches]
        aware = [item[1] == "query_aware" for item in items]
        self.bar.set_postfix_str(f"{task.name} {length} prefill x{len(items)}", refresh=False)
        last_logits, prefill_seconds = self.timed_prefill(
            ids, [PrefillTarget(c, prompt.length if a else prompt.context_len) for (_, c), a in zip(caches, aware)]
        )
        question = ids[:, prompt.context_len :]
        starts = [
            DecodeStart(c, logits=last_logits, max_new_tokens=max_new)
            if a
            else DecodeStart(c, new_ids=question, max_new_tokens=max_new)
            for (_, c), a in zip(caches, aware)
        ]
        del caches
        stop = eos_ids(self.model, self.tokenizer)
        self.bar.set_postfix_str(f"{task.name} {length} decode x{len(starts)}", refresh=False)
        batch = self.config.decode_batch
        t0 = time.perf_counter()
        if batch > 1:
            outputs = greedy_continue_many(self.model, starts, stop, max_batch=batch)
            decode_seconds = [time.perf_counter() - t0] * len(starts)  # one wall time for the batch
        else:
            outputs, decode_seconds = [], []
            for s in starts:
                t0 = time.perf_counter()
                outputs.append(greedy_continue(self.model, s.cache, s.max_new_tokens, stop, s.logits, s.new_ids))
                s.cache = None  # free it before the next one decodes
                decode_seconds.append(time.perf_counter() - t0)
        shared, rows = len(starts), (len(starts) if batch > 1 else 0)
        del starts
        for (_, mode, method, budget), new, seconds in zip(items, outputs, decode_seconds):
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            gen = Generation(text, len(new), prefill_seconds, seconds + prefill_seconds)
            self.log_generation(
                task, length, sample, prompt, mode, method, budget, gen, shared=shared, batched=rows
            )
        return rest

    def shareable_caches(self, todo: list) -> tuple[list, list]:
        """A fresh cache for every ``(idx, mode, method, budget)`` of ``todo``: returns
        ``([(item, cache)] a shared prefill can fill, [item] it cannot)``; the latter's caches are
        dropped (the per-cell path builds its own)."""
        caches, rest = [], []
        for item in todo:
            torch.manual_seed(self.config.seed)
            cache = new_cache(self.factory, item[2], item[3], self.model)
            if supports_shared_prefill(self.model, cache):
                caches.append((item, cache))
            else:
                rest.append(item)
        return caches, rest

    def timed_prefill(self, ids: torch.Tensor, targets: list) -> tuple[torch.Tensor, float]:
        """:func:`prefill_many` and its wall time."""
        start = time.perf_counter()
        logits = prefill_many(self.model, ids, targets)
        return logits, time.perf_counter() - start

    def log_generation(
        self, task, length, sample, prompt, mode, method, budget, gen, shared: int = 0, batched: int = 0,
        metrics: dict | None = None, extra: dict | None = None,
    ) -> None:
        """Append one generation's record (``shared``: caches filled by its prefill forward, 0 = own;
        ``batched``: rows of the batched greedy decode it was part of, 0 = decoded alone; ``metrics``:
        instead of ``task.score``'s; ``extra``: more fields)."""
        self.log.append(
            {
                "method": method,
                "budget": budget,
                "task": task.name,
                "length": length,
                "mode": mode,
                "sample_idx": sample.index,
                "metrics": metrics or {"score": task.score(gen.text, sample)},
                "prediction": gen.text,
                "answers": list(sample.answers),
                "prompt_tokens": prompt.length,
                "context_tokens": prompt.context_len,
                "new_tokens": gen.new_tokens,
                "seconds": gen.seconds,
                "prefill_seconds": gen.prefill_seconds,
                "shared_prefill": shared,
                "batched_decode": batched,
                "meta": _meta_for_record(sample.meta),
                "settings": self.settings[(method, budget)],
                **(extra or {}),
            }
        )
        self.ran += 1
        self.bar.update(1)

    def shared_fidelity_prefill(self, ids: list[int], fid: FidelityConfig, todo: list) -> tuple[dict, float]:
        """Fill the reference cache and every fan-out-capable cache of ``todo`` from one prefill
        forward; returns ``({(method, budget) or "reference": cache}, seconds)`` (empty: not shared)."""
        from transformers import DynamicCache

        if not self.shared or not model_shares_prefill(self.model):
            return {}, 0.0
        caches: dict = {"reference": DynamicCache()}
        caches.update({item[2:]: cache for item, cache in self.shareable_caches(todo)[0]})
        device = next(self.model.parameters()).device
        ids_t = torch.tensor([ids[: fid.prefill_tokens]], dtype=torch.long, device=device)
        _, seconds = self.timed_prefill(ids_t, [PrefillTarget(c, fid.prefill_tokens) for c in caches.values()])
        return caches, seconds

    def run_fidelity(self, fid: FidelityConfig) -> None:
        from transformers import DynamicCache

        for i in range(fid.num_samples):
            todo = self.pending(FIDELITY_TASK, fid.prefill_tokens, [FIDELITY_MODE], [i])
            if not todo:
                continue
            ids = fidelity_ids(self.tokenizer, fid, i, self.config.seed)
            shared, prefill_seconds = self.shared_fidelity_prefill(ids, fid, todo)
            ref_cache = shared.pop("reference", None)
            chunk = self.config.prefill_chunk_size
            reference = teacher_forced_logprobs(
                self.model, ids, DynamicCache() if ref_cache is None else ref_cache, fid.prefill_tokens,
                prefilled=ref_cache is not None, prefill_chunk_size=chunk,
            )
            del ref_cache
            for _, _, method, budget in todo:
                self.bar.set_postfix_str(f"fidelity {method}@{budget:g}", refresh=False)
                torch.manual_seed(self.config.seed)
                start = time.perf_counter() - prefill_seconds
                cache = shared.pop((method, budget), None)
                prefilled = cache is not None
                if cache is None:
                    cache = new_cache(self.factory, method, budget, self.model)
                logprobs = teacher_forced_logprobs(self.model, ids, cache, fid.prefill_tokens, prefilled,
                                                   prefill_chunk_size=chunk)
                del cache
                self.log.append(
                    {
                        "method": method,
                        "budget": budget,
                        "task": FIDELITY_TASK,
                        "length": fid.prefill_tokens,
                        "mode": FIDELITY_MODE,
                        "sample_idx": i,
                        "metrics": compare(reference, logprobs),
                        "decode_tokens": fid.decode_tokens,
                        "prompt_tokens": len(ids),
                        "seconds": time.perf_counter() - start,
                        "settings": self.settings[(method, budget)],
                    }
                )
                self.ran += 1
                self.bar.update(1)
