"""What a new user meets on the command line: fast help, clear errors before any model loads,
optional plotting, a results page that stays beside its data, one name for the reference cache."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import heterocache
from heterocache.cli import main

SRC = Path(heterocache.__file__).resolve().parents[1]
REPO = Path(__file__).resolve().parents[2]

# What pip's console script does (`from heterocache.cli import main; sys.exit(main())`), then
# reports which heavy packages the command imported.
PROBE = """
import sys
from heterocache.cli import main
try:
    code = main()
except SystemExit as stop:
    code = stop.code
print("HEAVY=" + ",".join(m for m in ("torch", "transformers") if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def run_console_script(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run the CLI as the installed ``heterocache`` script would; also return the heavy modules."""
    script = tmp_path / "heterocache"
    script.write_text(PROBE)
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=_env(),
                          timeout=300, cwd=tmp_path)
    heavy = re.search(r"HEAVY=(.*)", done.stderr)
    assert heavy, done.stderr
    return done, set(filter(None, heavy.group(1).split(",")))


def _help(capsys, *command: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main([*command, "--help"])
    assert stop.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines; compare words


#: two cells of a results.json: the reference and one compressing method at one budget
CELLS = [
    {"method": m, "budget": b, "task": "niah_single", "length": 1024, "mode": "query_aware", "n": 2, "score": s}
    for m, b, s in [("dynamic", 1.0, 90.0), ("snapkv", 0.25, 60.0)]
]


# ---- 1. fast start, --version, defaults in --help ----------------------------------------------
def test_help_imports_neither_torch_nor_transformers(tmp_path):
    done, heavy = run_console_script(tmp_path, "--help")
    assert done.returncode == 0 and "usage: heterocache" in done.stdout and "bench" in done.stdout
    assert heavy == set()


@pytest.mark.parametrize("command", [["bench", "--help"], ["eval", "--help"], ["profile", "run", "--help"]])
def test_sub_command_help_is_light_too(tmp_path, command):
    done, heavy = run_console_script(tmp_path, *command)
    assert done.returncode == 0 and heavy == set()


def test_version_is_printed_without_torch(tmp_path):
    done, heavy = run_console_script(tmp_path, "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"heterocache {heterocache.__version__}"
    assert heavy == set()


def test_version_matches_the_one_the_build_reads():
    from heterocache._version import __version__

    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'path = "src/heterocache/_version.py"' in pyproject
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", __version__) and heterocache.__version__ == __version__


def test_profile_list_is_light(tmp_path):
    done, heavy = run_console_script(tmp_path, "profile", "list")
    assert done.returncode == 0 and "meta-llama/Llama-3.1-8B-Instruct" in done.stdout
    assert heavy == set()


def test_profile_show_of_a_bundled_profile_does_not_import_transformers(tmp_path):
    # the profile's tensors are torch tensors, so torch is needed; transformers is not
    done, heavy = run_console_script(tmp_path, "profile", "show", "llama-3.1-8b-instruct")
    assert done.returncode == 0 and "anchor          10    3.9%" in done.stdout
    assert heavy == {"torch"}


def test_python_dash_m_heterocache_is_light():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "heterocache", "--version"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == f"heterocache {heterocache.__version__}"
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "encodings" in imported  # the import log is there at all
    assert not imported & {"torch", "transformers"}


def test_importing_the_package_still_registers_the_attention():
    code = ("import heterocache\n"
            "from transformers import AttentionInterface\n"
            "from transformers.masking_utils import AttentionMaskInterface\n"
            "assert 'heterocache' in AttentionInterface._global_mapping\n"
            "assert 'heterocache' in AttentionMaskInterface._global_mapping\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("argv,expected", [
    (["/usr/bin/python3", "/usr/local/bin/heterocache", "--help"], True),
    (["python", r"C:\env\Scripts\heterocache.exe", "bench"], True),
    (["python", "-m", "heterocache", "--version"], True),
    (["python", "-X", "importtime", "-mheterocache.cli"], True),
    (["python", "-m", "pytest", "tests"], False),
    (["python", "-c", "import heterocache"], False),
    (["python", "my_script.py"], False),
    (["python", "heterocache.py"], False),
    (["python"], False),
])
def test_only_the_command_line_skips_the_registration(argv, expected):
    from heterocache._launch import started_as_cli

    assert started_as_cli(argv) is expected


def test_help_shows_the_defaults(capsys):
    bench = _help(capsys, "bench")
    assert "timed decode steps (>= 1) (default: 32)" in bench
    assert "(default: dynamic,fullkv,heterocache,snapkv)" in bench and "(default: 2048,4096)" in bench
    evaluation = _help(capsys, "eval")
    assert "(default: 0.1,0.25,0.5)" in evaluation and "(default: 64)" in evaluation
    assert "(default: dynamic)" in evaluation
    assert "(default: 1024)" in _help(capsys, "profile", "run")
    assert "(default: None)" not in bench + evaluation  # options without a default say nothing


# ---- 2. bench and eval: bad requests rejected while parsing, all-infeasible grids --------------
def test_bench_new_tokens_must_be_at_least_one(exit_2, no_model_loading):
    err = exit_2(["bench", "--new-tokens", "0", "--no-plot"])
    assert "argument --new-tokens: must be >= 1, got 0" in err


@pytest.mark.parametrize("command", ["bench", "eval"])
def test_unknown_method_is_rejected_before_the_model_loads(exit_2, no_model_loading, command):
    err = exit_2([command, "--methods", "dynamic,bogus"])
    assert "argument --methods: unknown method 'bogus'" in err
    assert all(name in err for name in ("dynamic", "fullkv", "snapkv", "heterocache"))  # the valid names


def test_bench_names_are_canonical_after_parsing():
    from heterocache.cli import build_parser

    assert build_parser().parse_args(["bench", "--methods", "SnapKV,dynamic"]).methods == ["snapkv", "dynamic"]


def test_eval_command_accepts_the_old_name_full_with_a_warning():
    from heterocache.cli import build_parser

    with pytest.warns(FutureWarning, match="'full' is deprecated; use 'dynamic'"):
        assert build_parser().parse_args(["eval", "--methods", "full,snapkv"]).methods == ("dynamic", "snapkv")


def test_commands_that_run_models_work_from_the_console_script(toy_config, tmp_path):
    # the console script skips the import-time registration; a ragged cache must still find the
    # "heterocache" attention (its modules import and register it)
    done, heavy = run_console_script(tmp_path, "bench", "--model", f"random:{toy_config}", "--methods",
                                     "fullkv,snapkv", "--budgets", "0.5", "--lengths", "48", "--new-tokens", "1",
                                     "--warmup", "0", "--threads", "1", "--no-plot", "--out", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "b" / "bench.json").read_text())["rows"]
    assert [(r["method"], "error" in r) for r in rows] == [("fullkv", False), ("snapkv", False)]
    assert heavy == {"torch", "transformers"}


def test_bench_where_every_cell_is_infeasible_says_so_and_draws_nothing(toy_config, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as stop:
        # toy profile: 2 of 12 heads volatile, so budget 0.1 is below the floor at any length (0.2 is
        # above it: pivot_offload="auto" compresses the pivots there)
        main(["bench", "--model", f"random:{toy_config}", "--methods", "heterocache", "--budgets", "0.1",
              "--lengths", "64", "--new-tokens", "1", "--warmup", "0", "--threads", "1",
              "--profile", str(toy_config / "toy.safetensors"), "--out", str(out)])
    message = str(stop.value.code)
    assert "no cell could be measured, so there is no plot" in message
    assert "every budget must exceed 0.1667" in message
    assert "raise --budgets above the smallest feasible budget" in message
    assert not (out / "bench.png").exists()
    rows = json.loads((out / "bench.json").read_text())["rows"]  # the record is still written
    assert len(rows) == 1 and rows[0]["error"].startswith("infeasible budget")


def test_plot_bench_refuses_rows_without_measurements(tmp_path):
    from heterocache.bench.cli import plot_bench

    rows = [{"method": "heterocache", "budget": 0.1, "length": 64, "batch": 1, "error": "out of memory"}]
    with pytest.raises(ValueError, match=r"(?s)no cell could be measured.*out of memory.*smaller --batch-sizes"):
        plot_bench({"rows": rows, "machine": {"processor": "x"}}, tmp_path / "b.png")


def test_eval_grid_errors_are_messages_not_tracebacks(exit_2, no_model_loading):
    err = exit_2(["eval", "--tasks", "no_such_task", "--no-plots"])
    assert err.startswith("heterocache eval: error: argument --tasks: unknown task 'no_such_task'")
    assert "must be in (0, 1], got 2" in exit_2(["eval", "--budgets", "0.5,2"])


# ---- 3. plotting without matplotlib --------------------------------------------------------------
@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib cannot be imported (as if not installed), even if this process loaded it before."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_profile_plot_without_matplotlib_names_the_extra(no_matplotlib, tmp_path, capsys):
    from heterocache.profile.testing import toy_profile

    toy_profile().save(tmp_path / "p.safetensors")
    assert main(["profile", "plot", str(tmp_path / "p.safetensors"), "--out", str(tmp_path / "p.png")]) == 1
    err = capsys.readouterr().err
    assert 'pip install "heterocache[plot]"' in err and "Traceback" not in err
    assert not (tmp_path / "p.png").exists()


def test_bench_without_matplotlib_fails_before_measuring(no_model_loading, no_matplotlib):
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--methods", "dynamic"])
    assert 'pip install "heterocache[plot]"' in str(stop.value.code) and "--no-plot" in str(stop.value.code)


def test_eval_without_matplotlib_fails_before_the_grid(no_model_loading, no_matplotlib):
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--methods", "dynamic"])
    assert 'pip install "heterocache[plot]"' in str(stop.value.code) and "--no-plots" in str(stop.value.code)


def test_eval_report_and_plot_functions_without_matplotlib(no_matplotlib, tmp_path):
    from heterocache._optional import MissingExtraError
    from heterocache.eval import plot
    from heterocache.eval.results import write_json

    with pytest.raises(MissingExtraError, match=r'pip install "heterocache\[plot\]"'):
        plot.plot_all(CELLS, tmp_path)
    write_json(tmp_path / "run" / "results.json", CELLS, {}, {"model": "tiny/model"})
    with pytest.raises(SystemExit) as stop:
        main(["eval-report", str(tmp_path / "run" / "results.json")])
    assert 'pip install "heterocache[plot]"' in str(stop.value.code)


def test_the_plot_extra_exists():
    assert re.search(r'^plot = \["matplotlib', (REPO / "pyproject.toml").read_text(), re.M)


# ---- 4. eval-report writes beside its input ------------------------------------------------------
def test_eval_report_defaults_to_the_folder_of_its_input(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from heterocache.eval.results import write_json

    monkeypatch.chdir(tmp_path)
    write_json(tmp_path / "runs" / "a" / "results.json", CELLS, {}, {"model": "tiny/a"})
    write_json(tmp_path / "runs" / "b" / "results.json", CELLS, {}, {"model": "tiny/b"})
    assert main(["eval-report", "runs/a/results.json"]) == 0
    assert "## tiny/a" in (tmp_path / "runs" / "a" / "results.md").read_text()
    assert (tmp_path / "runs" / "a" / "results" / "a" / "score_niah_single.png").exists()
    assert main(["eval-report", "runs/a/results.json", "runs/b/results.json"]) == 0
    assert "## tiny/b" in (tmp_path / "runs" / "results.md").read_text()  # their common folder
    assert not (tmp_path / "docs").exists()
    assert "wrote runs/results.md" in capsys.readouterr().out


def test_eval_report_without_inputs_or_with_a_missing_one_is_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["eval-report"])
    assert "no results.json given" in str(stop.value.code)
    with pytest.raises(SystemExit) as stop:
        main(["eval-report", "nowhere/results.json"])
    assert "no such results file: nowhere/results.json" in str(stop.value.code)
    assert not (tmp_path / "docs").exists()
    assert "results.md beside the inputs" in _help(capsys, "eval-report")


# ---- 5. the eval plot with a single budget ---------------------------------------------------------
def test_single_budget_plot_has_the_reference_line_and_a_title_that_fits(tmp_path):
    pytest.importorskip("matplotlib")
    from heterocache.eval import plot

    title = "HuggingFaceTB/SmolLM2-135M-Instruct, a long model name that one narrow panel cannot hold"
    for fig in (plot.task_figure(CELLS, "niah_single", title),
                plot.fidelity_figure([{**c, "task": "fidelity", "length": 512, "kl": c["score"] / 100,
                                       "top1_agreement": 1.0} for c in CELLS], 512, title)):
        fig.canvas.draw()
        reference = [line for line in fig.axes[0].get_lines() if line.get_label().startswith("dynamic")]
        assert reference, "no reference line"
        # axhline: from the left to the right edge of the axes (x in axes coordinates), so it is
        # visible with one budget
        assert list(reference[0].get_xdata()) == [0, 1] and len(set(reference[0].get_ydata())) == 1
        box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
    assert plot.plot_task(CELLS, "niah_single", tmp_path / "s.png", title).read_bytes()[:4] == b"\x89PNG"


# ---- 6. one name for the reference cache ----------------------------------------------------------
def test_eval_and_bench_call_the_reference_dynamic():
    from heterocache.bench.cli import DEFAULT_METHODS
    from heterocache.cli import build_parser
    from heterocache.eval import EvalConfig

    assert build_parser().parse_args(["eval"]).methods == ("dynamic",)
    assert EvalConfig().methods == ("dynamic",)
    assert DEFAULT_METHODS.split(",")[0] == "dynamic"


def test_full_is_a_deprecated_alias_of_dynamic():
    from heterocache.engine.registry import make_cache
    from heterocache.eval import EvalConfig

    with pytest.warns(FutureWarning, match="'full' is deprecated; use 'dynamic'"):
        assert EvalConfig(methods=("full", "dynamic", "snapkv")).methods == ("dynamic", "snapkv")
    with pytest.warns(FutureWarning, match="'full' is deprecated"):
        assert type(make_cache("full")).__name__ == "DynamicCache"


def test_records_and_results_that_say_full_are_read_as_dynamic(tmp_path):
    from heterocache.eval.results import RecordLog, load_cells, write_json

    record = {"method": "full", "budget": 1.0, "task": "vt", "length": 1024, "mode": "query_aware",
              "sample_idx": 0, "metrics": {"score": 100.0}}
    (tmp_path / "records.jsonl").write_text(json.dumps(record) + "\n")
    write_json(tmp_path / "results.json", [{**CELLS[0], "method": "full"}], {"methods": ["full", "snapkv"]},
               {"skipped": [{"method": "full", "budget": 0.1, "reason": "x"}]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stored names are renamed without a warning
        log = RecordLog(tmp_path / "records.jsonl")
        cells, config, meta = load_cells(tmp_path / "results.json")
    assert [r["method"] for r in log.records.values()] == ["dynamic"]
    assert ("dynamic", 1.0, "vt", 1024, "query_aware", 0) in log
    assert cells[0]["method"] == "dynamic" and config["methods"] == ["dynamic", "snapkv"]
    assert meta["skipped"][0]["method"] == "dynamic"


def test_the_committed_results_load_under_the_new_name(monkeypatch):
    from heterocache.eval import report
    from heterocache.eval.results import load_cells

    results = REPO / "benchmarks" / "results" / "eval_smollm2_cpu" / "results.json"
    if not results.exists():
        pytest.skip("no committed results in this checkout")
    cells, _, _ = load_cells(results)
    methods = {c["method"] for c in cells}
    assert "dynamic" in methods and "full" not in methods
    # the page builds from them, paired intervals included (records.jsonl says "full" too); the
    # plots are left out here
    monkeypatch.setattr(report.plot, "plot_all", lambda cells, img_dir, title="": [])
    text = report.build_report([results], Path("docs") / "results.md")
    assert re.search(r"^\| 4096 \| query_agnostic \| dynamic \|", text, re.M)
    assert re.search(r"^\| 4096 \| query_agnostic \| 0.25 \| [\d.]+ \| [\d.]+ \| [-+][\d.]+ ± [\d.]+ \|", text, re.M)
