"""What the golden test pins and how it is computed: shared by ``make_golden.py`` (which writes
``golden_smollm2.json``) and ``test_golden.py`` (which recomputes and compares). Nothing here
writes files.

Every registered method (``heterocache.list_methods()``) runs on the real
SmolLM2-135M-Instruct (fp32, ``heterocache`` attention) for each fixed prompt, at each of
:data:`BUDGETS` (once when the method ignores the budget), in both evaluation modes:

- ``query_aware``: ``generate()`` prefills the whole prompt;
- ``query_agnostic``: the context alone is prefilled first (one forward pass, last logits only),
  then ``generate()`` gets the whole prompt and the same cache (it feeds the uncached question).

This mirrors ``heterocache.eval.generation.generate_answer`` but uses only the method registry
(``heterocache.engine.registry``: ``make_cache``, what users call) and the cache API (``memory_report()``,
``stored_tokens()``), so it survives internal modules moving. The prompts' token ids are stored in
the golden file (``make_golden.py`` builds them once from the eval harness's RULER-style
generators), so the test does not depend on the prompt generators either.

Recorded per entry ``"<method>@<budget>/<mode>"`` (budget ``"-"`` for methods without one) and
prompt: the generated token ids (and their text); for ragged caches also ``memory_report()``'s
``device_bytes``, ``device_used_bytes`` and ``host_bytes``, ``stored_tokens()`` summed per layer
(over rows and KV heads) and a digest per layer of the positions kept (:func:`kept_positions`), all
as the cache is after generation.
"""

from __future__ import annotations

import hashlib
import json

import torch

from heterocache._compat import cache_kwarg
from heterocache.eval.generation import prefill

#: The fixed prompts: name -> (RULER-style task, target length in tokens); built by make_golden.py
#: with seed PROMPT_SEED and stored (token ids included) in the golden file.
PROMPTS = {"niah_multikey": ("niah_multikey", 1000)}
PROMPT_SEED = 0
#: Budgets every compressing method runs at (fractions of the prompt).
BUDGETS = (0.25, 0.5)
MODES = ("query_aware", "query_agnostic")
#: Parameters given to some methods, name -> {param: value} (the entry's key then names the method
#: as a registry spec, "name:key=value"). None: every method runs with its defaults. (ShadowKV's
#: defaults keep 48 outlier + 4 local chunks of 8 tokens exact, and the whole prompt when the rest
#: has no more chunks than the budget: with prompts much shorter than ~1000 tokens it is FullKV.)
METHOD_PARAMS: dict[str, dict] = {}
#: Greedy tokens generated per entry.
MAX_NEW_TOKENS = 12
#: Torch threads for every golden computation. One: on a machine whose cores other processes share,
#: two OpenMP threads wait for each other and ran 10x slower (measured; on a quiet 2-core machine
#: two were only ~10% faster). The results do not depend on it here: ``make_golden.py --threads 2``
#: wrote the same entries.
THREADS = 1
#: Entry budget label of the methods that ignore the budget.
NO_BUDGET = "-"
MAKE_HINT = "regenerate with `PYTHONPATH=src python tests/golden/make_golden.py` and review the diff"


def config() -> dict:
    """The settings the golden file was made with (the test checks they are still these)."""
    return {
        "budgets": list(BUDGETS),
        "max_new_tokens": MAX_NEW_TOKENS,
        "method_params": {name: dict(params) for name, params in METHOD_PARAMS.items()},
        "modes": list(MODES),
        "prompt_seed": PROMPT_SEED,
        "prompts": {name: list(spec) for name, spec in PROMPTS.items()},
        "threads": THREADS,
    }


def environment() -> dict:
    """Library versions and the CPU's vector capability (information only: exact equality is
    expected on the machine type the file was made on; elsewhere float rounding may differ)."""
    import transformers

    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def dumps(golden: dict) -> str:
    """The golden file's text: sorted keys, one line per list of scalars (token ids, per-layer counts
    and digests), so that a diff shows which entries and fields changed."""

    def render(value, indent: str) -> str:
        if isinstance(value, dict) and value:
            inner = indent + " "
            items = [f"{inner}{json.dumps(k)}: {render(value[k], inner)}" for k in sorted(value)]
            return "{\n" + ",\n".join(items) + "\n" + indent + "}"
        if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
            inner = indent + " "
            return "[\n" + ",\n".join(inner + render(v, inner) for v in value) + "\n" + indent + "]"
        return json.dumps(value)

    return render(golden, "") + "\n"


def budgets_for(method: str) -> list[float | None]:
    """The budgets ``method`` runs at: :data:`BUDGETS`, or ``[None]`` when it ignores the budget."""
    from heterocache.engine.registry import get_method

    return list(BUDGETS) if get_method(method).uses_budget else [None]


def method_spec(method: str) -> str:
    """``method`` with its :data:`METHOD_PARAMS` as a registry spec (``"name:key=value:..."``)."""
    params = METHOD_PARAMS.get(method, {})
    return ":".join([method, *(f"{k}={v}" for k, v in sorted(params.items()))])


def entry_key(spec: str, budget: float | None, mode: str) -> str:
    return f"{spec}@{NO_BUDGET if budget is None else budget}/{mode}"


def entry_method(key: str) -> str:
    """The registry name of an entry key's method."""
    return key.split("@", 1)[0].split(":", 1)[0]


def cases() -> list[tuple[str, str, float | None, str]]:
    """``(key, method spec, budget, mode)`` of every entry, from the built-in methods registered now
    (a user's, such as the example's that the generic tests register, is not pinned here)."""
    from heterocache.engine.registry import get_method, list_methods

    return [
        (entry_key(method_spec(method), budget, mode), method_spec(method), budget, mode)
        for method in list_methods()
        if get_method(method).builtin
        for budget in budgets_for(method)
        for mode in MODES
    ]


@torch.inference_mode()
def run_prompt(model, tokenizer, input_ids: list[int], context_len: int, cache, mode: str) -> list[int]:
    """Greedy new token ids for one prompt with ``cache`` (fresh) in ``mode``."""
    ids = torch.tensor([input_ids], dtype=torch.long, device=next(model.parameters()).device)
    if mode == "query_agnostic":
        prefill(model, ids[:, :context_len], cache)  # the eval harness's context-only prefill
    elif mode != "query_aware":
        raise ValueError(f"unknown mode {mode!r}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        pad_token_id=pad,
        **cache_kwarg(model, cache),
    )
    return out[0, ids.shape[1]:].tolist()


def kept_positions(cache) -> list[str]:
    """Per layer a short digest of which token positions each (row, KV head) keeps, as a set (the
    order of the slots is not pinned): what ``stored_tokens`` alone would not catch, a method
    keeping as many tokens but other ones. Reads the layers' ``store`` (the engine's own field)."""
    out = []
    for layer in cache.layers:
        store = getattr(layer, "store", None)
        if store is None:
            continue
        _, _, valid, pos = store.padded()
        kept = pos.masked_fill(~valid, torch.iinfo(torch.int64).max).sort(-1).values.to(torch.int64)
        digest = hashlib.sha256(repr(tuple(kept.shape)).encode() + kept.cpu().numpy().tobytes())
        out.append(digest.hexdigest()[:12])
    return out


def compute_entry(model, tokenizer, prompts: dict[str, dict], spec: str, budget: float | None, mode: str) -> dict:
    """The golden record of one entry (``spec``: a registry name, options allowed):
    ``{prompt name: {...}}`` for every prompt in ``prompts``
    (``{name: {"input_ids": [...], "context_len": int, ...}}``)."""
    from heterocache.engine.registry import make_cache

    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        out = {}
        for name in sorted(prompts):
            prompt = prompts[name]
            cache = make_cache(spec, budget, model)
            tokens = run_prompt(model, tokenizer, prompt["input_ids"], prompt["context_len"], cache, mode)
            record: dict = {"tokens": tokens, "text": tokenizer.decode(tokens, skip_special_tokens=True)}
            if hasattr(cache, "memory_report"):  # a ragged cache (not transformers' DynamicCache)
                report = cache.memory_report()
                record["device_bytes"] = int(report.device_bytes)
                record["device_used_bytes"] = int(report.device_used_bytes)
                record["host_bytes"] = int(report.host_bytes)
                record["stored_tokens"] = [int(t.sum()) for t in cache.stored_tokens()]
                record["kept_positions"] = kept_positions(cache)
            out[name] = record
        return out
    finally:
        torch.set_num_threads(before)


def compare_entry(key: str, expected: dict, actual: dict) -> list[str]:
    """Human-readable differences between a golden record and a recomputed one (empty: equal)."""
    problems = []
    for name in sorted(set(expected) | set(actual)):
        if name not in actual or name not in expected:
            problems.append(f"{key} [{name}]: prompt only in {'golden' if name in expected else 'recomputed'}")
            continue
        exp, act = expected[name], actual[name]
        for field in sorted(set(exp) | set(act)):
            a, b = exp.get(field), act.get(field)
            if a == b:
                continue
            where = ""
            if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
                where = f" (at index {', '.join(str(i) for i, (x, y) in enumerate(zip(a, b)) if x != y)})"
            problems.append(f"{key} [{name}] {field}{where}: golden {a!r} != now {b!r}")
    return problems
