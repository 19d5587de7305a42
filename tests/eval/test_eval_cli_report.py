"""The `heterocache eval` / `eval-report` commands and the generated results page."""

from __future__ import annotations

import argparse
import json

import pytest

from heterocache.eval import cli
from heterocache.eval.report import build_report, write_report
from heterocache.eval.results import write_json
from heterocache.eval.toy import byte_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _parser():
    parser = argparse.ArgumentParser(prog="heterocache")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_register_adds_eval_with_comma_separated_grid_options():
    args = _parser().parse_args(
        [
            "eval",
            "--methods",
            "dynamic,snapkv",
            "--budgets",
            "0.1,0.5",
            "--lengths",
            "1024,2048",
            "--modes",
            "agnostic",
        ]
    )
    assert args.func is cli.run_command
    assert args.methods == ("dynamic", "snapkv") and args.budgets == (0.1, 0.5)
    assert args.lengths == (1024, 2048) and args.modes == ("agnostic",)
    assert _parser().parse_args(["eval-report"]).func is cli.report_command


def test_eval_command_runs_a_local_model_folder(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    args = _parser().parse_args(
        [
            "eval",
            "--model",
            str(model_dir),
            "--attn",
            "sdpa",
            "--device",
            "cpu",
            "--tasks",
            "niah_single",
            "--lengths",
            "600",
            "--num-samples",
            "1",
            "--max-new-tokens",
            "2",
            "--modes",
            "aware",
            "--out",
            str(out),
            "--no-progress",
            "--no-plots",
        ]
    )
    assert args.func(args) == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert [(c["method"], c["task"], c["length"], c["mode"], c["n"]) for c in cells] == [
        ("dynamic", "niah_single", 600, "query_aware", 1)
    ]
    printed = capsys.readouterr().out
    assert "score (0-100)" in printed and "1 new generations" in printed


CELLS = [
    {"method": m, "budget": b, "task": "niah_single", "length": 1024, "mode": mode, "n": 5, "score": s}
    for mode in ("query_aware", "query_agnostic")
    for m, b, s in [("dynamic", 1.0, 100.0), ("snapkv", 0.1, 40.0), ("snapkv", 0.5, 80.0)]
] + [
    {
        "method": "snapkv",
        "budget": 0.1,
        "task": "fidelity",
        "length": 512,
        "mode": "teacher_forced",
        "n": 2,
        "kl": 0.1234,
        "top1_agreement": 0.9,
    },
]


def test_results_page_has_tables_and_plots_from_the_json(tmp_path):
    results = tmp_path / "runs" / "smol" / "results.json"
    write_json(results, CELLS, {"seed": 0, "num_samples": 5, "chat_template": None}, {"model": "tiny/model"})
    page = write_report([results], tmp_path / "docs" / "results.md")
    text = page.read_text()
    assert "## tiny/model" in text
    assert "| length | mode | method | 0.1 | 0.5 | 1 | n |" in text
    assert "| 1024 | query_agnostic | snapkv | 40.0 | 80.0 |  | 5 |" in text
    assert "| 512 | snapkv | 0.1234 | 2 |" in text
    assert "### RULER average (niah_single)" in text
    assert "Seed 0, 5 samples per cell (one sample = 20.0 points)" in text
    assert "HeteroCache against" not in text  # no comparison without HeteroCache cells
    for image in ("results/smol/score_niah_single.png", "results/smol/fidelity_512.png"):
        assert f"]({image})" in text
        assert (tmp_path / "docs" / image).read_bytes()[:4] == b"\x89PNG"


def test_results_page_compares_heterocache_with_full_and_the_best_baseline(tmp_path):
    cells = CELLS + [
        {"method": "heterocache", "budget": b, "task": "niah_single", "length": 1024, "mode": "query_agnostic",
         "n": 4, "score": s}
        for b, s in [(0.1, 55.0), (0.5, 75.0)]
    ]
    results = tmp_path / "results.json"
    meta = {"model": "tiny/model", "skipped": [{"method": "heterocache", "budget": 0.05, "reason": "too small"}]}
    write_json(results, cells, {"seed": 0, "num_samples": 1}, meta)
    text = build_report([results], tmp_path / "results.md")
    assert "| 1024 | query_agnostic | 0.1 | 55.0 | 100.0 | -45.0 | snapkv (40.0) | +15.0 |" in text
    assert "| 1024 | query_agnostic | 0.5 | 75.0 | 100.0 | -25.0 | snapkv (80.0) | -5.0 |" in text
    assert "Seed 0, 4-5 samples per cell" in text  # counted from the cells, not the last run's config
    assert "- heterocache at 0.05: too small" in text


def test_results_page_without_results_explains_how_to_make_them(tmp_path):
    text = build_report([], tmp_path / "results.md")
    assert "No results yet" in text and "heterocache eval" in text


def _cell(method, budget, score, task="niah_single", mode="query_aware", n=2):
    return {"method": method, "budget": budget, "task": task, "length": 1024, "mode": mode, "n": n, "score": score}


def _record(method, budget, task, idx, score, mode="query_aware"):
    return {"method": method, "budget": budget, "task": task, "length": 1024, "mode": mode, "sample_idx": idx,
            "metrics": {"score": score}}


def test_paired_difference_by_hand():
    from heterocache.eval.paired import paired_difference

    records = [_record("heterocache", 0.25, "niah_single", i, s) for i, s in enumerate([100, 0, 100])]
    records += [_record("dynamic", 1.0, "niah_single", i, s) for i, s in enumerate([100, 100, 0])]
    records += [_record("heterocache", 0.25, "vt", i, s) for i, s in enumerate([100, 100, 100])]
    records += [_record("dynamic", 1.0, "vt", i, s) for i, s in enumerate([0, 100, 100])]
    records += [_record("dynamic", 1.0, "vt", 7, 0.0), _record("dynamic", 1.0, "vt", 0, 0.0, mode="query_agnostic")]
    d = paired_difference(records, ("heterocache", 0.25), ("dynamic", 1.0), 1024, "query_aware", {"niah_single", "vt"})
    # niah_single: d = 0, -100, 100 (mean 0, variance of the mean 10000/3); vt: d = 100, 0, 0 (mean 33.3,
    # variance of the mean 1111.1). Mean over tasks 16.67, variance (3333.3 + 1111.1) / 4 = 1111.1.
    assert d.pairs == 6 and d.tasks == 2  # the unpaired vt sample 7 and the other mode are left out
    assert d.mean == pytest.approx(50 / 3)
    assert d.half_width == pytest.approx(1.959964 * (1111.111 ** 0.5), rel=1e-4)
    assert d.format() == "+16.7 ± 65.3"
    # each side over the same pairs: heterocache (66.7 + 100) / 2, dynamic (66.7 + 66.7) / 2 (vt's sample 7 unpaired)
    assert d.a_mean == pytest.approx(250 / 3) and d.b_mean == pytest.approx(200 / 3)
    one = paired_difference(records[:1] + records[3:4], ("heterocache", 0.25), ("dynamic", 1.0), 1024, "query_aware",
                            {"niah_single"})
    assert one.half_width is None and one.format() == "+0.0 (± n/a)"
    assert paired_difference(records, ("snapkv", 0.25), ("dynamic", 1.0), 1024, "query_aware", {"vt"}) is None


def test_results_page_gives_paired_intervals_when_records_are_next_to_the_json(tmp_path):
    cells = [
        _cell(m, b, s) for m, b, s in [("dynamic", 1.0, 50.0), ("heterocache", 0.25, 100.0), ("snapkv", 0.25, 0.0)]
    ]
    results = tmp_path / "run" / "results.json"
    write_json(results, cells, {"seed": 0}, {"model": "tiny/model"})
    rows = [("dynamic", 1.0, [100, 0]), ("heterocache", 0.25, [100, 100]), ("snapkv", 0.25, [0, 0])]
    (tmp_path / "run" / "records.jsonl").write_text(
        "\n".join(json.dumps(_record(m, b, "niah_single", i, s)) for m, b, ss in rows for i, s in enumerate(ss))
        + "\n{cut short"
    )
    text = build_report([results], tmp_path / "results.md")
    # vs full: d = 0, 100 -> mean 50, sd 70.7, half-width 1.96 * 70.7 / sqrt(2) = 98.0; vs snapkv: d = 100, 100.
    assert "| 1024 | query_aware | 0.25 | 100.0 | 50.0 | +50.0 ± 98.0 | snapkv (0.0) | +100.0 ± 0.0 |" in text
    assert "paired over the samples" in text


def test_results_page_compares_a_method_variant_with_its_plain_method_and_the_full_cache(tmp_path):
    variant = "heterocache:turn_reselect=own"
    cells = [
        _cell(m, b, s, mode="query_agnostic")
        for m, b, s in [("dynamic", 1.0, 50.0), ("heterocache", 0.25, 0.0), (variant, 0.25, 100.0),
                        ("snapkv", 0.25, 0.0)]
    ]
    results = tmp_path / "run" / "results.json"
    write_json(results, cells, {"seed": 0}, {"model": "tiny/model"})
    rows = [("dynamic", 1.0, [100, 0]), ("heterocache", 0.25, [0, 0]), (variant, 0.25, [100, 100]),
            ("snapkv", 0.25, [0, 0])]
    (tmp_path / "run" / "records.jsonl").write_text(
        "".join(json.dumps(_record(m, b, "niah_single", i, s, mode="query_agnostic")) + "\n"
                for m, b, ss in rows for i, s in enumerate(ss)))
    text = build_report([results], tmp_path / "results.md")
    assert f"| `{variant}` | 1024 | query_agnostic | 0.25 | 100.0 | 0.0 | +100.0 ± 0.0 | 50.0 | +50.0 ± 98.0 |" in text
    # HeteroCache's own variant is not "the best other method" of the plain comparison
    assert "| 1024 | query_agnostic | 0.25 | 0.0 | 50.0 | -50.0 ± 98.0 | snapkv (0.0) | +0.0 ± 0.0 |" in text


def test_results_page_leaves_a_row_scored_on_fewer_tasks_out_of_the_averages(tmp_path):
    # rows run on one of two tasks: their "average" would be over another task set than their neighbours'
    cells = [
        _cell(m, b, s, task=t)
        for m, b, t, s in [("dynamic", 1.0, "niah_single", 100.0), ("dynamic", 1.0, "vt", 0.0),
                           ("heterocache", 0.25, "niah_single", 50.0), ("heterocache", 0.25, "vt", 0.0),
                           ("snapkv", 0.25, "niah_single", 30.0),
                           ("heterocache:refresh_interval=1", 0.25, "niah_single", 100.0)]
    ]
    results = tmp_path / "results.json"
    write_json(results, cells, {"seed": 0}, {"model": "tiny/model"})
    text = build_report([results], tmp_path / "results.md")
    main, ablations = text.split("## Ablations")
    average = main.split("### RULER average")[1].split("### niah_single")[0]
    assert "| 1024 | query_aware | heterocache | 25.0 |  | 4 |" in average
    assert "| 1024 | query_aware | dynamic |  | 50.0 | 4 |" in average
    assert "| 1024 | query_aware | snapkv |" not in average
    assert "- snapkv at 0.25 (query_aware, 1024): 1 of 2 tasks (niah_single)" in average
    # the per-task table still shows it
    assert "| 1024 | query_aware | snapkv | 30.0 |" in main.split("### niah_single")[1]
    # a method variant is left out of the main tables, and listed likewise under Ablations
    assert "refresh_interval=1" not in main
    assert "- heterocache:refresh_interval=1 at 0.25 (query_aware, 1024): 1 of 2 tasks (niah_single)" in ablations
    assert "| 1024 | query_aware | heterocache:refresh_interval=1 | 100.0 |" in ablations.split("#### niah_single")[1]


def test_results_page_puts_method_variants_and_the_hand_written_notes_under_ablations(tmp_path):
    cells = [_cell(m, b, s) for m, b, s in [("dynamic", 1.0, 90.0), ("heterocache", 0.25, 70.0),
                                            ("heterocache:kernel=5", 0.25, 60.0)]]
    results = tmp_path / "run" / "results.json"
    write_json(results, cells, {"seed": 0}, {"model": "tiny/model"})
    page = tmp_path / "docs" / "results.md"
    assert "## Ablations" in build_report([results], page)  # generated variants, no notes
    notes = tmp_path / "docs" / "results" / "ablations.md"
    notes.parent.mkdir(parents=True, exist_ok=True)  # the plots are there
    notes.write_text("### Removed options\n\n- `pooling`: no better\n")
    text = build_report([results], page)
    main, ablations = text.split("## Ablations")
    assert "[Ablations](#ablations)" in main and "kernel=5" not in main
    assert ablations.index("- `pooling`: no better") < ablations.index("### Method variants on tiny/model")
    assert "| `heterocache:kernel=5` | 1024 | query_aware | 0.25 | 60.0 | 70.0 | -10.0 | 90.0 | -30.0 |" in ablations
    plain = [_cell(m, b, s) for m, b, s in [("dynamic", 1.0, 90.0), ("heterocache", 0.25, 70.0)]]
    write_json(results, plain, {"seed": 0}, {"model": "tiny/model"})
    assert "- `pooling`: no better" in build_report([results], page)  # the notes stay without variants


def test_results_page_compares_heterocache_with_the_best_dynamic_retrieval_method(tmp_path):
    from heterocache.eval.report import selects_per_step

    assert selects_per_step("quest") and selects_per_step("shadowkv") and selects_per_step("omnikv:filter_layers=2")
    assert not selects_per_step("snapkv") and not selects_per_step("heterocache") and not selects_per_step("nope")
    cells = [
        _cell(m, b, s)
        for m, b, s in [("dynamic", 1.0, 90.0), ("heterocache", 0.25, 70.0), ("snapkv", 0.25, 80.0),
                        ("quest", 0.25, 40.0), ("omnikv", 0.25, 60.0)]
    ]
    results = tmp_path / "results.json"
    write_json(results, cells, {"seed": 0}, {"model": "tiny/model"})
    text = build_report([results], tmp_path / "results.md")
    section = text.split("### HeteroCache against the best dynamic-retrieval method")[1].split("###")[0]
    assert "| 1024 | query_aware | 0.25 | 70.0 | 90.0 | -20.0 | omnikv (60.0) | +10.0 |" in section
    # the table of all methods still takes the best of every compressed one
    assert "| 1024 | query_aware | 0.25 | 70.0 | 90.0 | -20.0 | snapkv (80.0) | -10.0 |" in text
    without = [c for c in cells if c["method"] not in ("quest", "omnikv")]
    write_json(results, without, {"seed": 0}, {"model": "tiny/model"})
    assert "dynamic-retrieval" not in build_report([results], tmp_path / "results.md")


def test_quests_budget_is_shown_in_tokens():
    from heterocache.eval.report import quest_budget_table

    def rec(budget, n, **options):
        return {"method": "quest", "budget": budget, "length": 4096, "mode": "query_aware", "prompt_tokens": n,
                "settings": {"options": {"page_size": 16, "min_pages": 3, **options}}}

    table = quest_budget_table([rec(0.25, 4000), rec(0.25, 4000), rec(0.01, 100), rec(0.5, 4000, budget_tokens=512),
                                {"method": "snapkv", "budget": 0.25, "length": 4096, "mode": "query_aware",
                                 "prompt_tokens": 4000}])
    rows = table.splitlines()[2:]
    # ceil(0.25 * 4001) = 1001 tokens -> 63 pages of 16; 0.01 of 101 -> the 3-page minimum; 512 tokens -> 32 pages
    assert rows == ["| quest | 4096 | 0.01 | 100 | 48 | 0.480 |", "| quest | 4096 | 0.25 | 4000 | 1008 | 0.252 |",
                    "| quest | 4096 | 0.5 | 4000 | 512 | 0.128 |"]
    assert quest_budget_table([]) == ""
