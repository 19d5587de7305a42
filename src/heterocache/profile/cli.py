"""``heterocache profile ...`` sub-commands: run, show, plot, compare, convert, list.

``heterocache profile MODEL --out PATH`` is short for ``heterocache profile run MODEL --out PATH``
(any first word that is not a sub-command is taken as the model of a run).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict
from typing import Any

from .._optional import MissingExtraError
from ..cli._argparse import ArgumentParser, HelpFormatter, UsageError, bounded, command, device_name, dispatch, odd
from .errors import ProfileError

_RUN_FLAGS = (  # (flag, dest, type, default, help); defaults are the paper's
    ("--num-texts", "num_texts", bounded(int, 1), 50, "texts of the built-in calibration set"),
    ("--seed", "seed", int, 0, "seed of the built-in calibration set"),
    ("--prefill-tokens", "prefill_tokens", bounded(int, 1), 5000, "prompt tokens per text"),
    ("--decode-tokens", "decode_tokens", bounded(int, 1), 100, "greedy decode steps per text"),
    ("--topk", "topk", bounded(int, 1), 1024, "size of the top-k position sets"),
    ("--max-topk-fraction", "max_topk_fraction", bounded(float, 0, 1), 0.25,
     "cap on k as a fraction of the prompt length"),
    ("--tau-stable", "tau_stable", bounded(float, 0, 1), 0.5, "anchor if stability >= this, else volatile"),
    ("--tau-sim", "tau_sim", bounded(float, 0, 1), 0.5, "heads are neighbours if their top-k overlap >= this"),
    ("--pool-kernel", "pool_kernel", odd(bounded(int, 1)), 5, "width of the 1-D average pool (odd)"),
)


class _AnyWord:
    """``choices`` of the sub-command action: argparse checks the first word against it before
    the action runs, and :class:`_DefaultToRun` routes unknown words to ``run`` instead."""

    def __init__(self, commands: dict) -> None:
        self.commands = commands

    def __contains__(self, word: object) -> bool:
        return True

    def __iter__(self):
        return iter(self.commands)


class _DefaultToRun(argparse._SubParsersAction):
    """Sub-command action that treats an unknown first word as the MODEL of ``run``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.choices = _AnyWord(self._name_parser_map)

    def __call__(self, parser, namespace, values, option_string=None):
        if values and values[0] not in self._name_parser_map:
            values = ["run", *values]
        super().__call__(parser, namespace, values, option_string)


def register(subparsers: Any) -> None:
    """Add the ``profile`` command group to the top-level ``heterocache`` parser."""
    parser = subparsers.add_parser(
        "profile", help="make, inspect and convert head profiles", formatter_class=HelpFormatter,
        description="Head profiles: which KV heads are anchor, volatile, pivot or satellite. "
                    "`heterocache profile MODEL --out PATH` is short for `heterocache profile run MODEL --out PATH`.",
    )
    commands = parser.add_subparsers(dest="profile_command", required=True, action=_DefaultToRun,
                                     metavar="{run,show,plot,compare,convert,list}")
    _add_run(commands)
    _add_show(commands)
    _add_plot(commands)
    _add_compare(commands)
    _add_convert(commands)
    listing = commands.add_parser("list", help="list the bundled profiles", formatter_class=HelpFormatter)
    command(listing, _list)


def _add_run(commands: Any) -> None:
    p = commands.add_parser("run", help="profile a model (online top-k; works with SDPA models)",
                            description="Profile the KV heads of MODEL and write a profile file.",
                            formatter_class=HelpFormatter)
    p.add_argument("model", metavar="MODEL",
                   help="local Hugging Face model folder, .gguf file, Hub id (cached), or 'smollm2'")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--calibration", metavar="FILE_OR_DIR",
                   help="folder of .txt files, .jsonl/.json file or text file (default: built-in generated texts)")
    for flag, dest, kind, default, text in _RUN_FLAGS:
        p.add_argument(flag, dest=dest, type=kind, default=default, help=text)
    p.add_argument("--model-name", help="name recorded in the profile (default: the model's name_or_path)")
    p.add_argument("--revision", help="model revision recorded in the profile")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype the model is loaded in")
    p.add_argument("--device", type=_device_or_auto, default="cpu", help="torch device, or 'auto'")
    p.add_argument("--threads", type=bounded(int, 1), help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    command(p, _run, _check_run)


def _device_or_auto(text: str) -> str:
    return "auto" if text.strip() == "auto" else device_name(text)


def _add_show(commands: Any) -> None:
    p = commands.add_parser("show", help="print role counts and a per-layer table",
                            formatter_class=HelpFormatter)
    p.add_argument("profile", metavar="PROFILE",
                   help="file, folder, bundled name (or a short model name: smollm2) or Hub repo id")
    p.add_argument("--revision", help="Hub revision")
    p.add_argument("--stability", action="store_true", help="also print each head's stability score")
    command(p, _show, _check_profiles("profile"))


def _add_plot(commands: Any) -> None:
    p = commands.add_parser("plot", help="role map, stability heatmap and cluster sizes in one figure",
                            formatter_class=HelpFormatter)
    p.add_argument("profile", metavar="PROFILE",
                   help="file, folder, bundled name (or a short model name: smollm2) or Hub repo id")
    p.add_argument("--out", required=True, help="image file (.png, .pdf, .svg); needs matplotlib")
    p.add_argument("--revision", help="Hub revision")
    command(p, _plot, _check_plot)


def _add_compare(commands: Any) -> None:
    p = commands.add_parser("compare", help="role agreement and stability correlation of two profiles",
                            formatter_class=HelpFormatter)
    p.add_argument("a", metavar="A", help="first profile (file, folder, bundled or short model name, or Hub repo id)")
    p.add_argument("b", metavar="B", help="second profile")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    command(p, _compare, _check_profiles("a", "b"))


def _add_convert(commands: Any) -> None:
    p = commands.add_parser("convert", help="convert a published reference profile (JSON) to a profile file",
                            formatter_class=HelpFormatter)
    p.add_argument("json_file", metavar="JSON", help="Head_Analysis_*.json of ponytaill/HeteroCache data/clusters")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--model-name", required=True, help="Hub id of the model, e.g. meta-llama/Llama-3.1-8B-Instruct")
    p.add_argument("--num-attention-heads", type=bounded(int, 1), required=True, help="query heads per layer")
    p.add_argument("--head-dim", type=bounded(int, 1), required=True)
    p.add_argument("--num-layers", type=bounded(int, 1), help="checked against the JSON")
    p.add_argument("--num-kv-heads", type=bounded(int, 1), help="checked against the JSON")
    p.add_argument("--revision")
    p.add_argument("--topk", type=bounded(int, 1), help="default: from the file name")
    p.add_argument("--tau-stable", type=bounded(float, 0, 1), help="default: from the file name")
    p.add_argument("--tau-sim", type=bounded(float, 0, 1), help="default: from the file name")
    command(p, _convert, _check_convert)


# ---- checks before any work (torch-free; a UsageError is a one-line error, exit status 2)
def _check_run(args: argparse.Namespace) -> None:
    from ..cli._preflight import check_model, check_out_file

    check_model(args.model, option="MODEL", hub=True, gguf=True)
    if args.calibration is not None:
        from pathlib import Path

        path = Path(args.calibration)
        if not path.exists():
            raise UsageError(f"argument --calibration: no such file or folder: {path}")
        if path.is_dir() and not any(path.glob("*.txt")):
            raise UsageError(f"argument --calibration: folder {path} holds no .txt files")
    check_out_file(args.out)


def _check_profiles(*dests: str):
    """A check that the profiles named by these arguments exist and are profiles (headers only);
    ``smollm2`` and the other short model names are accepted, as by ``--model``."""

    def check(args: argparse.Namespace) -> None:
        from ..cli._preflight import resolve_profile

        for dest in dests:
            option = "PROFILE" if dest == "profile" else dest.upper()
            resolve_profile(getattr(args, dest), option, revision=getattr(args, "revision", None))

    return check


def _check_plot(args: argparse.Namespace) -> None:
    from ..cli._preflight import check_out_file

    _check_profiles("profile")(args)
    check_out_file(args.out)


def _check_convert(args: argparse.Namespace) -> None:
    from ..cli._preflight import check_input_file, check_out_file

    check_input_file(args.json_file, "JSON")
    check_out_file(args.out)


def _errors_to_exit(func):
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args) or 0
        # OSError: missing files, models transformers cannot load; MissingExtraError: no matplotlib
        except (ProfileError, OSError, MissingExtraError) as err:
            print(f"heterocache profile: error: {err}", file=sys.stderr)
            return 1

    wrapper.__name__ = func.__name__
    return wrapper


@_errors_to_exit
def _run(args: argparse.Namespace) -> int:
    import torch

    from .calibration import default_calibration_texts, load_calibration
    from .loading import load_model
    from .profiler import ProfilerSettings, profile_model

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ProfilerSettings(**{dest: getattr(args, dest) for _, dest, *_ in _RUN_FLAGS
                                   if dest not in ("num_texts", "seed")})
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.calibration:
        texts = load_calibration(args.calibration)
        calibration = {"texts": f"user data {args.calibration}"}
    else:
        texts = default_calibration_texts(args.num_texts, settings.prefill_tokens, args.seed, tokenizer)
        calibration = {"texts": "heterocache built-in generator (encyclopedia-like English, Apache-2.0)",
                       "seed": args.seed}
    calibration["command"] = _run_command(args)
    calibration["dtype"] = args.dtype
    profile = profile_model(model, tokenizer, texts, settings, model_name=args.model_name,
                            revision=args.revision, calibration=calibration, progress=not args.no_progress)
    profile.save(args.out)
    print(f"wrote {args.out}: {profile}")
    return 0


def _run_command(args: argparse.Namespace) -> str:
    """The run as one explicit command line (every setting spelled out), for the metadata."""
    words = ["heterocache", "profile", "run", args.model, "--out", args.out]
    if args.calibration:
        words += ["--calibration", args.calibration]
    for flag, dest, *_ in _RUN_FLAGS:
        if not (args.calibration and dest in ("num_texts", "seed")):
            words += [flag, str(getattr(args, dest))]
    for flag, dest in (("--model-name", "model_name"), ("--revision", "revision")):
        if getattr(args, dest):
            words += [flag, getattr(args, dest)]
    if args.dtype != "float32":
        words += ["--dtype", args.dtype]
    if args.threads:
        words += ["--threads", str(args.threads)]
    return shlex.join(words)


def _load(spec: str, revision: str | None = None):
    from .head_profile import HeadProfile

    return HeadProfile.from_pretrained(spec, revision=revision)


@_errors_to_exit
def _show(args: argparse.Namespace) -> int:
    from .show import format_profile

    print(format_profile(_load(args.profile, args.revision), stability=args.stability))
    return 0


@_errors_to_exit
def _plot(args: argparse.Namespace) -> int:
    from .plot import plot_profile

    plot_profile(_load(args.profile, args.revision), args.out)
    print(f"wrote {args.out}")
    return 0


@_errors_to_exit
def _compare(args: argparse.Namespace) -> int:
    from .compare import compare_profiles, format_comparison

    result = compare_profiles(_load(args.a), _load(args.b))
    print(json.dumps(asdict(result), indent=2) if args.json else format_comparison(result, args.a, args.b))
    return 0


@_errors_to_exit
def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_upstream

    profile = convert_upstream(
        args.json_file, model_name=args.model_name, num_attention_heads=args.num_attention_heads,
        head_dim=args.head_dim, num_layers=args.num_layers, num_kv_heads=args.num_kv_heads,
        revision=args.revision, topk=args.topk, tau_stable=args.tau_stable, tau_sim=args.tau_sim,
    )
    profile.save(args.out)
    print(f"wrote {args.out}: {profile}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from .io.bundled import bundled_profiles

    for name, path in bundled_profiles().items():
        print(f"{name:<45} {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m heterocache.profile`` (same commands as ``heterocache profile``)."""
    parser = ArgumentParser(prog="heterocache", formatter_class=HelpFormatter)
    register(parser.add_subparsers(dest="command", required=True))
    return dispatch(parser.parse_args(["profile", *(sys.argv[1:] if argv is None else argv)]))
