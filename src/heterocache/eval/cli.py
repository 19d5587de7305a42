"""``heterocache eval`` (run or resume a grid) and ``heterocache eval-report`` (write a results page).

Only the standard library at import time (``heterocache --help`` imports this module); torch,
transformers and the harness are imported by the command functions.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

from ..cli._argparse import HelpFormatter, UsageError, bounded, command, csv, device_name, method_name


def _csv(kind):
    return csv(kind, tuple)


def _method(text: str) -> str:
    """argparse type of ``--methods``: a name the default cache factory knows (aliases resolved,
    the old name "full" with a deprecation warning), checked before the model loads."""
    try:
        return method_name(text)
    except ModuleNotFoundError as err:
        if err.name != "heterocache.engine.registry":
            raise
    from .caches import FULL_METHODS, is_full

    if not is_full(text):  # without the registry only the full cache exists
        raise argparse.ArgumentTypeError(
            f"unknown method {text!r}: the method registry (heterocache.engine.registry) is not available, so only "
            f"{', '.join(sorted(FULL_METHODS))} can be evaluated"
        )
    return text.strip().lower()


def register(subparsers) -> None:
    """Add the ``eval`` and ``eval-report`` sub-commands to ``subparsers``."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate cache methods: tasks x budgets x lengths x modes (resumable)",
        formatter_class=HelpFormatter,
        description="Run or resume an evaluation grid; writes records.jsonl, results.json, "
        "results.csv and plots/ under --out, and prints a summary table.",
    )
    p.add_argument(
        "--model", default="smollm2",
        help="'smollm2' (bundled), a local Hugging Face model folder, or a Hub id (org/name)",
    )
    p.add_argument(
        "--attn",
        default="auto",
        help="attention implementation: auto (heterocache when available, else sdpa), sdpa, eager, ...",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the model is loaded in")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--threads", type=bounded(int, 1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--methods",
        type=_csv(_method),
        default=("dynamic",),
        help="comma-separated method registry names; 'dynamic' (transformers' DynamicCache) is the "
        "uncompressed reference (old name: full)",
    )
    p.add_argument("--methods-from", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="a module or .py file that registers methods of your own (@heterocache.register_method); "
                   "repeatable")
    p.add_argument(
        "--budgets",
        type=_csv(bounded(float, 0, 1, low_open=True)),
        default=(0.1, 0.25, 0.5),
        help="kept fractions of the prompt KV, in (0, 1]",
    )
    p.add_argument(
        "--tasks",
        type=_csv(str),
        default=("ruler",),
        help="task or group names: ruler, niah_single, vt, cwe, long_answer (recall_lines, trace_lines: "
        "teacher-forced multi-line answers scored per line), longbench/hotpotqa, longbenchv2, "
        "infinitebench/passkey, ... ('none' for fidelity only; default: ruler)",
    )
    p.add_argument("--lengths", type=_csv(bounded(int, 1)), default=(1024, 2048, 4096), help="prompt lengths in tokens")
    p.add_argument(
        "--modes",
        type=_csv(str),
        default=("query_aware", "query_agnostic"),
        help="query_aware and/or query_agnostic (aware, agnostic)",
    )
    p.add_argument(
        "--num-samples", type=bounded(int, 0), default=5, help="samples per task and length (datasets: 0 = all)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    p.add_argument("--max-new-tokens", type=bounded(int, 1), default=None,
                   help="override every task's generation length")
    p.add_argument("--chat-template", choices=["auto", "on", "off"], default="auto",
                   help="wrap prompts in the tokenizer's chat template (auto: when it has one)")
    p.add_argument(
        "--data-dir", default="data", help="folder holding longbench/, longbenchv2/, infinitebench/"
    )
    p.add_argument("--fidelity", action="store_true", help="also measure teacher-forced KL / top-1 agreement")
    p.add_argument("--fidelity-prefill", type=bounded(int, 1), default=1024, help="fidelity: prompt tokens")
    p.add_argument("--fidelity-decode", type=bounded(int, 1), default=128, help="fidelity: teacher-forced steps")
    p.add_argument("--fidelity-samples", type=bounded(int, 1), default=2, help="fidelity: texts")
    p.add_argument(
        "--fidelity-text", type=Path, default=None, help="text file for fidelity (default: generated essay)"
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/eval/<model>)")
    p.add_argument(
        "--no-shared-prefill",
        action="store_true",
        help="one generate() per cell instead of one prefill forward per sample shared by every cell",
    )
    p.add_argument(
        "--decode-batch",
        type=bounded(int, 1),
        default=64,
        help="after a shared prefill, decode up to this many caches in one batched forward per token "
        "(each row attended by its own cache); 1 = one cache after another",
    )
    p.add_argument(
        "--prefill-chunk-size",
        type=bounded(int, 1),
        default=None,
        help="prefill the prompt (query-aware) or the context (query-agnostic) in pieces of this many tokens, "
        "one generation per cell (docs/prefill.md); default: one piece, shared prefill",
    )
    p.add_argument(
        "--prefill",
        choices=["exact", "bounded"],
        default="exact",
        help="with --prefill-chunk-size: compress the prompt once when it ends (exact, the one-piece cache) or "
        "as its pieces arrive (bounded memory; methods that cannot are skipped)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--no-plots", action="store_true", help="do not draw plots/ (no matplotlib needed)")
    p.add_argument("--list-tasks", action="store_true", help="print the task names and exit")
    command(p, run_command, check_command)

    r = subparsers.add_parser(
        "eval-report",
        help="write a results page (markdown and its plots) from results.json files",
        description=REPORT_DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    add_report_arguments(r)


REPORT_DESCRIPTION = (
    "Write a results page from results.json files of `heterocache eval`. Without --out the page is "
    "results.md in the folder holding the inputs (their common folder when there are several); its "
    "plots go to results/<run>/ beside it. To refresh the repository's page, pass --out docs/results.md."
)


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``eval-report`` (also ``python -m heterocache.eval.report``)."""
    parser.add_argument(
        "results", nargs="*", type=Path, help="results.json files (default: runs/eval/*/results.json)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="page to write (default: results.md beside the inputs)"
    )
    parser.set_defaults(func=report_command)


def default_attention() -> str:
    """``heterocache`` when :mod:`heterocache.engine.integration` exists, else ``sdpa``."""
    return "heterocache" if importlib.util.find_spec("heterocache.engine.integration") else "sdpa"


def load_model(spec: str, attn: str = "auto", dtype: str = "float32", device: str | None = None):
    """``(model, tokenizer, name)`` for ``"smollm2"`` or a local model folder, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from heterocache.models import SMOLLM2_NAME, load_smollm2, short_model_name

    attn = default_attention() if attn == "auto" else attn
    if attn == "heterocache":
        import heterocache.engine.integration  # noqa: F401  (registers the attention function)
    torch_dtype = getattr(torch, dtype)
    if short_model_name(spec) == SMOLLM2_NAME:
        model, tokenizer = load_smollm2(attn_implementation=attn, dtype=torch_dtype)
        name = SMOLLM2_NAME
    else:
        tokenizer = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype, attn_implementation=attn)
        name = getattr(model.config, "name_or_path", None) or spec
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer, name


def default_out(model_name: str) -> Path:
    """``runs/eval/<last part of the model's name>``, where ``--out`` defaults to."""
    return Path("runs/eval") / re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name.split("/")[-1])


def check_command(args: argparse.Namespace) -> None:
    """Everything about the request that can be known without torch: the model (and its config),
    tasks and their data files, modes, the prompt lengths against the model's context, the output
    folder (and, when it holds results, that they are of this setup), the fidelity text, and the
    profile of a heterocache method against the model's shape."""
    from ..cli._preflight import check_heterocache_profiles, check_input_file, check_model, check_out_folder
    from .setup import canonical_mode, context_error, fingerprint, stored_setup
    from .tasks import expand_task_names, get_task

    if args.list_tasks:
        return
    model = check_model(args.model, hub=True)
    for name in expand_task_names(() if args.tasks in (("none",), ()) else args.tasks):
        try:
            task = get_task(name, args.data_dir)
        except ValueError as err:
            raise UsageError(f"argument --tasks: {err}") from None
        path = getattr(task, "path", None)  # dataset tasks: read from a file under --data-dir
        if path is not None and not Path(path).is_file():
            raise UsageError(f"argument --tasks: {name}: data not found: expected {path} (heterocache never "
                             "downloads benchmark data; --data-dir is the folder holding longbench/, ...)")
    for mode in args.modes:
        try:
            canonical_mode(mode)
        except ValueError as err:
            raise UsageError(f"argument --modes: {err}") from None
    if args.prefill == "bounded" and args.prefill_chunk_size is None:
        raise UsageError("argument --prefill: 'bounded' compresses a prompt as its pieces arrive: give "
                         "--prefill-chunk-size")
    if args.fidelity and args.fidelity_text is not None:
        check_input_file(args.fidelity_text, "--fidelity-text")
    fidelity_positions = args.fidelity_prefill + args.fidelity_decode if args.fidelity else None
    limit = (model.config or {}).get("max_position_embeddings")
    error = context_error(limit, args.lengths, args.max_new_tokens, fidelity_positions)
    if error:
        raise UsageError(f"argument {'--lengths' if 'lengths' in error else '--fidelity-prefill'}: {error}")
    out = args.out or default_out(model.name)
    check_out_folder(out)
    setup = fingerprint(
        model.name, seed=args.seed, chat_template={"auto": None, "on": True, "off": False}[args.chat_template],
        max_new_tokens=args.max_new_tokens, fidelity_decode_tokens=args.fidelity_decode if args.fidelity else None,
        fidelity_text=str(args.fidelity_text) if args.fidelity and args.fidelity_text else None,
    )
    try:
        stored_setup(Path(out) / "config.json", setup)
    except (ValueError, OSError) as err:
        raise UsageError(f"argument --out: {err}") from None
    args.profiles = check_heterocache_profiles(args.methods, model, profile_option=None)


def run_command(args: argparse.Namespace) -> int:
    from .tasks import available_tasks

    if args.list_tasks:
        print("\n".join(["ruler", "long_answer", "longbench", "infinitebench", *available_tasks()]))
        return 0
    tasks = () if args.tasks in (("none",), ()) else args.tasks
    if not args.no_plots:
        from .._optional import MissingExtraError, require_matplotlib

        try:
            require_matplotlib("the eval plots")  # fail now, not after the grid ran
        except MissingExtraError as err:
            raise SystemExit(f"heterocache eval: error: {err} (or pass --no-plots)") from None
    from ..cli._preflight import check_method_options, import_method_modules
    from .fidelity import FidelityConfig
    from .runner import run_eval

    import_method_modules(args.methods_from)
    try:
        fidelity = None
        if args.fidelity:
            fidelity = FidelityConfig(
                args.fidelity_prefill, args.fidelity_decode, args.fidelity_samples, args.fidelity_text
            )
        config = _config(args, tasks, fidelity)
    except ValueError as err:  # unknown task or mode, or a grid the harness refuses
        raise UsageError(str(err)) from None
    if _is_method_registry_available():
        check_method_options(config.methods, config.budgets, getattr(args, "profiles", None))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer, name = load_model(args.model, args.attn, args.dtype, args.device)
    out = args.out or default_out(name)
    result = run_eval(
        model, tokenizer, config, out, model_name=name, progress=not args.no_progress, plots=not args.no_plots
    )
    print(result.summary)
    print(f"\n{result.ran} new generations; outputs:")
    for path in result.files:
        print(f"  {path}")
    return 0


def _is_method_registry_available() -> bool:
    return importlib.util.find_spec("heterocache.engine.registry") is not None


def _config(args: argparse.Namespace, tasks, fidelity):
    """The grid of the command; ValueError for unknown tasks or modes (named before the model loads)."""
    from .runner import EvalConfig
    from .tasks import get_task

    config = EvalConfig(
        methods=args.methods,
        budgets=args.budgets,
        tasks=tasks,
        lengths=args.lengths,
        modes=args.modes,
        num_samples=args.num_samples,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        chat_template={"auto": None, "on": True, "off": False}[args.chat_template],
        data_dir=args.data_dir,
        fidelity=fidelity,
        shared_prefill=not args.no_shared_prefill,
        decode_batch=args.decode_batch,
        prefill_chunk_size=args.prefill_chunk_size,
        prefill=args.prefill,
    )
    for name in config.tasks:
        get_task(name, config.data_dir)  # builds a task object only; dataset files are read later
    return config


def report_command(args: argparse.Namespace) -> int:
    from .report import default_report_path, write_report

    paths = args.results or sorted(Path("runs/eval").glob("*/results.json"))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"heterocache eval-report: error: no such results file: {', '.join(missing)}")
    if not paths and args.out is None:
        raise SystemExit(
            "heterocache eval-report: error: no results.json given and none under runs/eval/*/; "
            "pass the files of `heterocache eval` (e.g. runs/eval/smollm2/results.json)"
        )
    out = args.out or default_report_path(paths)
    try:
        path = write_report(paths, out)
    except ImportError as err:  # MissingExtraError: the page's plots need matplotlib
        raise SystemExit(f"heterocache eval-report: error: {err}") from None
    print(f"wrote {path}")
    return 0
