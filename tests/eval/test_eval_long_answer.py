"""Long-answer tasks: prompts, per-line scoring, the teacher-forced decode (= generate() when it
forces generate's own tokens), the per-step stats() counters and the per-line report."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import heterocache
from heterocache._compat import cache_kwarg
from heterocache.eval import EvalConfig, run_eval
from heterocache.eval.long_answer import AnswerStart, LineTokens, answer_lines, write_answers
from heterocache.eval.prompting import PromptFormatter
from heterocache.eval.results import position_table, summary
from heterocache.eval.shared_prefill import _step
from heterocache.eval.tasks import expand_task_names, get_task
from heterocache.eval.tasks.long_answer import RecallLinesTask, TraceLinesTask
from heterocache.eval.toy import tiny_llama
from heterocache.profile.clustering import budget_ratios
from heterocache.profile.testing import toy_profile

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTH = 900  # byte tokens


@pytest.fixture(scope="module")
def model():
    # float64: batched and one-row forwards must not flip a near-tied greedy choice
    return heterocache.enable(tiny_llama(dtype=torch.float64))


def _profile():
    """tiny_llama's shape: pivot + satellite in layer 0, volatile + anchor in layer 1."""
    roles = torch.tensor([[3, 4], [2, 1]])
    stability = torch.tensor([[0.3, 0.6], [0.2, 0.8]])
    return toy_profile(roles=roles, stability=stability, budget_ratios=budget_ratios(roles, stability),
                       pivots=torch.tensor([[-1, 0], [-1, -1]]), num_attention_heads=4)


def _hetero(budget=0.75):
    from heterocache.methods.heterocache import HeteroCache

    # full pivots, a drift check at every step and a threshold no overlap passes: refreshes fire
    return HeteroCache(_profile(), budget=budget, pivot_offload=False, refresh_interval=1, drift_threshold=1.0)


@pytest.mark.parametrize("name", ["recall_lines", "trace_lines"])
def test_samples_are_deterministic_and_hold_every_line(tokenizer, name):
    formatter, task = PromptFormatter(tokenizer), get_task(name)
    first, again = (task.samples(formatter, LENGTH, 2, seed=3) for _ in range(2))
    assert [(s, s.meta) for s in first] == [(s, s.meta) for s in again]
    assert first[0].context != task.samples(formatter, LENGTH, 1, seed=4)[0].context
    for s in first:
        assert formatter.count(s) <= LENGTH
        items = task.items(s)
        assert len(items) == task.num_items and list(s.answers) == [i.value for i in items]
        for statement in s.meta["statements"]:  # spread over the context, where meta says
            assert s.context[statement["char"]:].startswith(statement["text"])
        depths = [st["depth"] for st in s.meta["statements"]]
        assert depths == sorted(depths) and depths[-1] - depths[0] > 0.5
    if name == "trace_lines":  # each line's label names the previous line's value
        items = task.items(first[0])
        assert all(b.label == f"Box {a.value} points to box " for a, b in zip(items, items[1:]))
    else:  # the question lists the keys in the answer's order
        q = first[0].question
        keys = [i.label.rstrip(": ") for i in task.items(first[0])]
        assert sorted(keys, key=q.index) == keys


def test_lines_are_scored_one_by_one(tokenizer):
    task = RecallLinesTask(num_items=4)
    (s,) = task.samples(PromptFormatter(tokenizer), LENGTH, 1, seed=0)
    v = [i.value for i in task.items(s)]
    assert task.score_items([v[0], f" {v[1]}. The", v[2] + "0", "x"], s) == [100, 100, 0, 0]
    text = "\n".join(i.label + i.value for i in task.items(s)[:3])
    assert task.score(text, s) == 75.0  # the free-running reading: three lines of four
    assert expand_task_names(["long_answer"]) == ["recall_lines", "trace_lines"]


def test_forced_tokens_stop_where_the_value_starts(tokenizer):
    task = TraceLinesTask(num_items=2)
    (s,) = task.samples(PromptFormatter(tokenizer), LENGTH, 1, seed=0)
    first, second = answer_lines(tokenizer, task, s)
    items = task.items(s)
    assert tokenizer.decode(list(first.forced)) == items[0].label
    assert tokenizer.decode(list(second.forced)) == "\n" + items[1].label
    assert second.max_value == len(items[1].value) + 3  # the digits (one byte each), plus the slack


def _generate(model, ids, n):
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwarg(model, DynamicCache()),
                         max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, ids.shape[1]:].tolist()


def _start(model, ids, context, lines, cache=None):
    """A filled cache: the whole prompt (context None) or the context, the rest left as a turn."""
    cache = DynamicCache() if cache is None else cache
    if context is None:
        return AnswerStart(cache, lines, logits=_step(model, cache, ids))
    _step(model, cache, ids[:, :context])
    return AnswerStart(cache, lines, new_ids=ids[:, context:])


@pytest.mark.parametrize("context", [None, 40])
def test_teacher_forcing_generate_own_tokens_gives_them_back(model, context):
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(0))
    g = _generate(model, ids, 14)
    never = lambda t: False  # noqa: E731
    (free,) = write_answers(model, [_start(model, ids, context, [LineTokens((), 14)])], never)
    assert free.values == [g] and free.fed == g
    lines = [LineTokens(tuple(g[:2]), 3), LineTokens(tuple(g[5:7]), 2), LineTokens(tuple(g[9:10]), 4)]
    (forced,) = write_answers(model, [_start(model, ids, context, lines)], never)
    assert forced.values == [g[2:5], g[7:9], g[10:14]]
    assert forced.fed == g and forced.line_steps == [[0, 5], [5, 9], [9, 14]]
    stop_at = next(i for i in range(3, 14) if g[i] not in g[:i])  # a token first produced at stop_at
    (stopped,) = write_answers(model, [_start(model, ids, context, [LineTokens(tuple(g[:1]), 14)])],
                               lambda t: t == g[stop_at])
    assert stopped.values == [g[1:stop_at]] and stopped.fed == g[:stop_at]


def test_answers_decoded_together_equal_one_at_a_time(model):
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(1))
    g = _generate(model, ids, 10)
    lines = [LineTokens(tuple(g[:3]), 2), LineTokens(tuple(g[5:6]), 5)]
    never = lambda t: False  # noqa: E731
    alone = [write_answers(model, [_start(model, ids, c, lines, _hetero())], never)[0] for c in (None, 30)]
    together = write_answers(model, [_start(model, ids, c, lines, _hetero()) for c in (None, 30)], never)
    assert [o.values for o in together] == [o.values for o in alone]
    assert [o.step_stats for o in together] == [o.step_stats for o in alone]


def test_stats_counters_are_recorded_per_decode_step(model):
    ids = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(2))
    lines = [LineTokens((5, 6, 7), 4), LineTokens((8, 9), 4)]
    never = lambda t: False  # noqa: E731
    aware, agnostic = (write_answers(model, [_start(model, ids, c, lines, _hetero())], never)[0] for c in (None, 60))
    for out in (aware, agnostic):
        assert set(out.step_stats) >= {"drift_checks", "refreshes", "tokens_moved"}
        assert all(len(series) == len(out.fed) == 13 for series in out.step_stats.values())
        assert sum(out.step_stats["drift_checks"]) > 0 and sum(out.step_stats["refreshes"]) > 0
        assert sum(out.step_stats["tokens_moved"]) > 0
    assert aware.turn_stats == {} and set(agnostic.turn_stats) == set(agnostic.step_stats)
    (plain,) = write_answers(model, [_start(model, ids, None, lines)], never)
    assert plain.step_stats is None and plain.turn_stats is None  # DynamicCache has no stats()


def test_the_grid_records_lines_and_reports_them_per_position(model, tokenizer, tmp_path):
    def make(method, budget, model):
        return _hetero(budget) if method == "hetero" else DynamicCache()

    config = EvalConfig(methods=("dynamic", "hetero"), budgets=(0.75,), tasks=("recall_lines",), lengths=(LENGTH,),
                        num_samples=2)
    result = run_eval(model, tokenizer, config, tmp_path, make_cache=make, progress=False, plots=False)
    assert len(result.records) == 2 * 2 * 2
    for r in result.records:
        k = 5
        assert [f"item_{i + 1}" in r["metrics"] for i in range(k)] == [True] * k
        assert r["new_tokens"] == sum(end - start for start, end in r["line_steps"])
        assert len(r["prediction"].split("\n")) == k
        if r["method"] == "hetero":
            assert len(r["step_stats"]["drift_checks"]) == r["new_tokens"]
            assert r["metrics"]["decode_drift_checks"] == sum(r["step_stats"]["drift_checks"])
        else:
            assert r["step_stats"] is None and "decode_drift_checks" not in r["metrics"]
    header, rows = position_table(result.cells)
    assert header[5:11] == ["line 1", "line 2", "line 3", "line 4", "line 5", "mean"]
    assert "decode drift checks" in header and len(rows) == 4 and all(len(r) == len(header) for r in rows)
    assert "accuracy per line" in summary(result.cells)
    # resumed: nothing runs again
    assert run_eval(model, tokenizer, config, tmp_path, make_cache=make, progress=False, plots=False).ran == 0
    # one prefill and one decode per cache: the same answers and counters
    config.shared_prefill, config.decode_batch = False, 1
    alone = run_eval(model, tokenizer, config, tmp_path / "alone", make_cache=make, progress=False, plots=False)

    def answers(records):
        return sorted((r["method"], r["mode"], r["sample_idx"], r["prediction"], str(r["step_stats"])) for r in records)

    assert answers(alone.records) == answers(result.records)
    assert {(r["shared_prefill"], r["batched_decode"]) for r in alone.records} == {(0, 0)}


def test_the_per_line_plot_and_page(tmp_path):
    pytest.importorskip("matplotlib")
    from heterocache.eval import plot
    from heterocache.eval.report import _lines_section

    cells = [dict(task="recall_lines", length=1024, mode=mode, method=m, budget=b, n=2, score=50.0,
                  **{f"item_{i}": 10.0 * i for i in range(1, 5)})
             for mode in ("query_aware", "query_agnostic") for m, b in (("dynamic", 1.0), ("snapkv", 0.25))]
    paths = plot.plot_all(cells, tmp_path)
    assert tmp_path / "lines_recall_lines.png" in paths
    fig = plot.lines_figure(cells, "recall_lines")
    assert len(fig.axes) == 2  # two modes x one (length, budget)
    lines = _lines_section(cells, tmp_path / "lines_recall_lines.png", paths, tmp_path)
    assert lines[2].startswith("| task | length | mode | method | budget | line 1 |")
    assert len(lines) == 2 + 2 + 4 + 1 + 2  # text, table head, 4 rows, blank, image
