"""``heterocache bench``: decode speed and memory per method, budget, context length and batch size.

::

    heterocache bench --model smollm2 --methods dynamic,fullkv,heterocache,snapkv \\
        --budgets 0.25 --lengths 2048,4096 --out runs/bench
    heterocache bench --model random:meta-llama/Llama-3.1-8B-Instruct --device cuda \\
        --lengths 8192,32768,65536,131072 --budgets 0.1,0.25,0.5 --max-batch 131072 --out runs/bench8b

Writes ``bench.json`` (machine, command, one row per cell) and ``bench.png`` into ``--out`` and
prints a table. Each cell prefills one fresh cache and times greedy decode steps (median step).
Batch sizes above 1 prefill one row and repeat it (``batch_repeat_interleave``): the decode work
and the KV of B rows without B prompts' prefill activations. On CUDA each row also reports peak
memory and its fraction of the bandwidth floor: (weight bytes + device KV bytes read per step) /
measured copy bandwidth, over the measured step time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

# Only the standard library at import time: `heterocache --help` imports this module to list the
# sub-command. torch and the measuring code are imported by the functions that run.
from ..cli._argparse import RawHelpFormatter, UsageError, bounded, command, csv, device_name, method_name

DEFAULT_METHODS = "dynamic,fullkv,heterocache,snapkv"


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="decode ms/token, tokens/s and memory per method and context",
                              description=__doc__, formatter_class=RawHelpFormatter)
    p.add_argument("--model", default="smollm2",
                   help="'smollm2', 'random:<published name or config.json>' (random weights) or a model folder; "
                   "checked (and its config read) before anything loads")
    p.add_argument("--methods", type=csv(method_name), default=DEFAULT_METHODS.split(","),
                   help="method registry names, comma-separated (an unknown name lists the known ones)")
    p.add_argument("--methods-from", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="a module or .py file that registers methods of your own (@heterocache.register_method); "
                   "repeatable")
    p.add_argument("--budgets", type=csv(bounded(float, 0, 1, low_open=True)), default=[0.25],
                   help="kept fractions of the prompt KV, in (0, 1], for the compressing methods")
    p.add_argument("--lengths", type=csv(bounded(int, 1)), default=[2048, 4096], help="prompt tokens")
    p.add_argument("--batch-sizes", type=csv(bounded(int, 1)), default=[1], help="decode batch sizes")
    p.add_argument("--max-batch", type=csv(bounded(int, 1)), default=[], metavar="LENGTHS",
                   help="at these lengths also find the largest batch (doubling) that fits, per method (CUDA)")
    p.add_argument("--max-batch-limit", type=bounded(int, 1), default=256, help="stop doubling here")
    p.add_argument("--new-tokens", type=bounded(int, 1), default=32, help="timed decode steps (>= 1)")
    p.add_argument("--warmup", type=bounded(int, 0), default=3, help="untimed decode steps first")
    p.add_argument("--device", type=device_name, default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--num-layers", type=bounded(int, 1), default=None,
                   help="random: models only: keep this many layers")
    p.add_argument("--profile", default=None,
                   help="HeteroCache profile: file, folder, bundled name or Hub id, checked against the model's "
                   "shape before it loads (default: the model's own)")
    p.add_argument("--threads", type=bounded(int, 1), default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="prompt seed")
    p.add_argument("--out", default="runs/bench", help="output folder (bench.json, bench.png)")
    p.add_argument("--no-plot", action="store_true", help="do not draw bench.png (no matplotlib needed)")
    command(p, _main, _check)


_MAX_BATCH_NEEDS_CUDA = "searches until the GPU runs out of memory; it needs --device cuda"


def _check(args: argparse.Namespace) -> None:
    """Everything about the request that can be known without torch: the model and its config,
    the profile of every heterocache method and whether it fits the model, the output folder."""
    from ..cli._preflight import (
        check_heterocache_profiles,
        check_model,
        check_out_folder,
        check_profile_fits,
        resolve_profile,
    )

    model = check_model(args.model, random=True, num_layers=args.num_layers)
    if args.max_batch and args.device and not args.device.startswith("cuda"):
        raise UsageError(f"argument --max-batch: {_MAX_BATCH_NEEDS_CUDA}")
    check_out_folder(args.out)
    if args.profile is not None:  # checked even where no method uses it
        check_profile_fits(resolve_profile(args.profile), model, "--profile")
    args.profiles = check_heterocache_profiles(args.methods, model, args.profile)


def _main(args: argparse.Namespace) -> int:
    if not args.no_plot:
        from .._optional import MissingExtraError, require_matplotlib

        try:
            require_matplotlib("bench.png")  # fail now, not after the measurements
        except MissingExtraError as err:
            raise SystemExit(f"error: {err} (or pass --no-plot)") from None
    import torch

    from ..cli._preflight import check_method_options, import_method_modules

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.max_batch and device.type != "cuda":
        raise UsageError(f"argument --max-batch: {_MAX_BATCH_NEEDS_CUDA}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"argument --device: {args.device}: torch finds no CUDA device")
    import_method_modules(args.methods_from)
    check_method_options(args.methods, args.budgets, getattr(args, "profiles", None))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    from ..engine import integration as _integration  # noqa: F401  (registers the attention function)
    from ..models import load_model

    model, tokenizer = load_model(args.model, attn_implementation="heterocache", dtype=dtype, device=device,
                                  num_layers=args.num_layers)
    hetero = [m for m in args.methods if m.split(":")[0] == "heterocache"]
    if not args.profile and any("profile=" not in m for m in hetero):  # the profile found for the model
        from ..profile import ProfileError, profile_for_model

        try:
            profile_for_model(model)  # fail now, not after the other methods ran
        except ProfileError as err:
            raise SystemExit(f"error: method heterocache: {err}") from None
    result = run_bench(
        model, tokenizer, methods=args.methods, budgets=args.budgets, lengths=args.lengths,
        batch_sizes=args.batch_sizes, max_batch_lengths=args.max_batch, max_batch_limit=args.max_batch_limit,
        new_tokens=args.new_tokens, warmup=args.warmup, seed=args.seed,
        # every heterocache spec, options or not, takes --profile
        params={m: {"profile": args.profile} for m in hetero} if args.profile else None,
    )
    result["model"] = args.model
    result["command"] = shlex.join(["heterocache", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    print(format_table(result["rows"]))
    print(f"wrote {out / 'bench.json'}")
    failed = nothing_measured(result["rows"])
    if failed:
        raise SystemExit(f"error: {failed}")
    if not args.no_plot:
        plot_bench(result, out / "bench.png")
        print(f"wrote {out / 'bench.png'}")
    return 0


def nothing_measured(rows: list[dict]) -> str | None:
    """When no cell ran (every one infeasible or out of memory): what went wrong and what to change,
    one line per distinct reason; None when at least one cell has measurements."""
    if any("error" not in r for r in rows):
        return None
    reasons = {}
    for r in rows:
        reasons.setdefault(r["error"], []).append(label(r) + f" at {r['length']} tokens")
    lines = [f"no cell could be measured, so there is no plot ({len(rows)} cell{'s' * (len(rows) != 1)}):"]
    lines += [f"  {reason} ({', '.join(cells)})" for reason, cells in reasons.items()]
    if any(reason.startswith("infeasible budget") for reason in reasons):
        lines.append("  raise --budgets above the smallest feasible budget named above")
    if any(reason == "out of memory" for reason in reasons):
        lines.append("  use shorter --lengths or smaller --batch-sizes")
    return "\n".join(lines)


def machine_info(device) -> dict:
    """What the figures were measured on (``device``: a ``torch.device``)."""
    import torch

    info = {
        "device": device.type,
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def run_bench(
    model,
    tokenizer,
    *,
    methods: list[str],
    budgets: list[float],
    lengths: list[int],
    batch_sizes: list[int] = (1,),
    max_batch_lengths: list[int] = (),
    max_batch_limit: int = 256,
    new_tokens: int = 32,
    warmup: int = 3,
    seed: int = 0,
    params: dict[str, dict] | None = None,
    progress: bool = True,
) -> dict:
    """Measure every (length, batch, method, budget) cell on one model.

    Args:
        model: a causal LM loaded with ``attn_implementation="heterocache"`` (switched to "sdpa" for
            the "dynamic" method and back).
        tokenizer: for prose prompts; None for random token ids (random-weight models).
        methods: registry names (``heterocache.list_methods()``).
        budgets: fractions in (0, 1] for the compressing methods (uncompressed ones run once).
        lengths: prompt tokens.
        batch_sizes: decode batch sizes (one prompt row prefilled, then repeated).
        max_batch_lengths: lengths at which the largest batch that fits is also searched (doubling
            from the largest of ``batch_sizes`` up to ``max_batch_limit``; CUDA).
        new_tokens, warmup: timed and untimed decode steps.
        seed: prompt seed.
        params: extra ``make_cache`` parameters per method name.

    Returns:
        ``{"machine", "date", "settings", "rows", "max_batch"}``; each row has the method, budget,
        length, batch, ``measure_decode``'s figures (tokens excepted), KV and peak memory, the
        bandwidth-floor fraction on CUDA, and ``tokens_equal_dynamic`` for "fullkv" when both ran;
        a cell that failed has ``error`` (out of memory, infeasible budget) instead.
    """
    from tqdm.auto import tqdm

    from .measure import copy_bandwidth, prompt_ids, weight_bytes_read_per_step

    device = next(model.parameters()).device
    bandwidth = copy_bandwidth(device)
    weights = weight_bytes_read_per_step(model)
    cells = [(L, B, m, b) for L in lengths for B in batch_sizes for m, b in _method_budgets(methods, budgets)]
    rows, reference = [], {}
    vocab = model.config.get_text_config().vocab_size
    for L, B, method, budget in tqdm(cells, desc="bench", unit="cell", disable=not progress):
        ids = prompt_ids(tokenizer, L, 1, seed, vocab).to(device)
        row = _cell(model, ids, method, budget, B, new_tokens, warmup, (params or {}).get(method, {}))
        if "tokens" in row:
            tokens = row.pop("tokens")
            if method == "dynamic":
                reference[(L, B)] = tokens
            elif method == "fullkv" and (L, B) in reference:
                row["tokens_equal_dynamic"] = tokens == reference[(L, B)]
            if bandwidth:
                floor_s = (weights + row["kv_bytes_end"]) / bandwidth
                row["bandwidth_floor_ms"] = floor_s * 1e3
                row["fraction_of_bandwidth_floor"] = floor_s * 1e3 / row["decode_ms_per_token"]
        rows.append(row)
    _relative_to_dynamic(rows)
    max_batch = []
    for L in max_batch_lengths:
        ids = prompt_ids(tokenizer, L, 1, seed, vocab).to(device)
        for method, budget in _method_budgets(methods, budgets):
            max_batch.append(_largest_batch(model, ids, method, budget, max(batch_sizes), max_batch_limit,
                                            new_tokens, warmup, (params or {}).get(method, {})))
    return {
        "benchmark": "heterocache bench",
        "machine": machine_info(device),
        "date": time.strftime("%Y-%m-%d"),
        "settings": {"new_tokens": new_tokens, "warmup": warmup, "seed": seed, "dtype": str(model.dtype),
                     "weight_bytes_read_per_step": weights, "copy_bandwidth_bytes_per_s": bandwidth,
                     "batches": "one prompt row prefilled, then repeated to the batch size"},
        "rows": rows,
        "max_batch": max_batch,
    }


def _method_budgets(methods, budgets):
    from ..engine.registry import get_method, parse_method_spec

    for method in methods:  # a method may carry options: "heterocache:turn_reselect=pivot"
        if get_method(parse_method_spec(method)[0]).uses_budget:
            yield from ((method, b) for b in budgets)
        else:
            yield method, None


def _cell(model, ids, method, budget, batch, new_tokens, warmup, params) -> dict:
    import torch

    from ..engine.registry import make_cache
    from ..methods.heterocache.plan import InfeasibleBudgetError
    from .measure import measure_decode

    row = {"method": method, "budget": budget, "length": int(ids.shape[1]), "batch": batch}
    model.set_attn_implementation("sdpa" if method == "dynamic" else "heterocache")
    try:
        row.update(measure_decode(model, ids, lambda: make_cache(method, budget, model, **params),
                                  new_tokens=new_tokens, warmup=warmup, replicate=batch))
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except InfeasibleBudgetError as err:
        row["error"] = f"infeasible budget: {err}"
    finally:
        model.set_attn_implementation("heterocache")
        if ids.device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _largest_batch(model, ids, method, budget, start, limit, new_tokens, warmup, params) -> dict:
    """Double the batch until a cell runs out of memory; the largest that fitted and its figures."""
    best, batch = None, max(1, start)
    while batch <= limit:
        row = _cell(model, ids, method, budget, batch, new_tokens, warmup, params)
        if "error" in row:
            break
        row.pop("tokens", None)
        best, batch = row, batch * 2
    return {"method": method, "budget": budget, "length": int(ids.shape[1]),
            "max_batch": None if best is None else best["batch"],
            "hit_limit": batch > limit, "tokens_per_s": None if best is None else best["tokens_per_s"],
            "row": best}


def _relative_to_dynamic(rows: list[dict]) -> None:
    for row in rows:
        base = next((r for r in rows if r["method"] == "dynamic" and r["length"] == row["length"]
                     and r["batch"] == row["batch"] and "error" not in r), None)
        if base is None or "error" in row:
            continue
        row["speedup_vs_dynamic"] = base["decode_ms_per_token"] / row["decode_ms_per_token"]
        row["kv_ratio_vs_dynamic"] = row["kv_bytes_end"] / base["kv_bytes_end"]


def label(row: dict) -> str:
    return row["method"] if row.get("budget") is None else f"{row['method']}@{row['budget']:g}"


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the rows."""
    lines = ["| length | batch | method | ms/token | tokens/s | KV MiB (device) | host MiB | x DynamicCache speed "
             "| x DynamicCache KV | refreshes/step |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['length']} | {r['batch']} | {label(r)} | {r['error'].split(':')[0]} "
                         "|  |  |  |  |  |  |")
            continue

        def ratio(k):
            return f"{r[k]:.2f}" if k in r else ""

        rps = "" if r.get("refreshes_per_step") is None else f"{r['refreshes_per_step']:.2f}"
        lines.append(
            f"| {r['length']} | {r['batch']} | {label(r)} | {r['decode_ms_per_token']:.2f} | {r['tokens_per_s']:.1f} "
            f"| {r['kv_bytes_end'] / 2**20:.1f} | {r['host_bytes_end'] / 2**20:.1f} | {ratio('speedup_vs_dynamic')} "
            f"| {ratio('kv_ratio_vs_dynamic')} | {rps} |"
        )
    return "\n".join(lines)


def plot_bench(result: dict, path) -> None:
    """Decode ms/token and device KV bytes against context length (batch 1 or the smallest batch),
    and tokens/s against batch size at the longest context, one line per method and budget.

    Raises:
        ValueError: no row has measurements (see :func:`nothing_measured`).
        MissingExtraError: matplotlib is not installed.
    """
    failed = nothing_measured(result["rows"])
    if failed:
        raise ValueError(failed)
    from .._optional import require_matplotlib

    require_matplotlib("the bench plot")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    batches = sorted({r["batch"] for r in rows})
    lengths = sorted({r["length"] for r in rows})
    panels = 3 if len(batches) > 1 else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    series = sorted({label(r) for r in rows})
    for name in series:
        mine = [r for r in rows if label(r) == name and r["batch"] == batches[0]]
        mine.sort(key=lambda r: r["length"])
        axes[0].plot([r["length"] for r in mine], [r["decode_ms_per_token"] for r in mine], marker="o", label=name)
        axes[1].plot([r["length"] for r in mine], [r["kv_bytes_end"] / 2**20 for r in mine], marker="o", label=name)
        if panels == 3:
            at = [r for r in rows if label(r) == name and r["length"] == lengths[-1]]
            at.sort(key=lambda r: r["batch"])
            axes[2].plot([r["batch"] for r in at], [r["tokens_per_s"] for r in at], marker="o", label=name)
    axes[0].set(xlabel="prompt tokens", ylabel="decode ms/token", title=f"decode step (batch {batches[0]})")
    axes[1].set(xlabel="prompt tokens", ylabel="KV MiB on device", title="KV memory")
    if panels == 3:
        axes[2].set(xlabel="batch", ylabel="tokens/s", title=f"throughput at {lengths[-1]} tokens")
    if len(lengths) > 1 and lengths[-1] / lengths[0] >= 4:
        for ax in axes[:2]:
            ax.set_xscale("log", base=2)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    machine = result["machine"]
    fig.suptitle(f"{result.get('model', '')} on {machine.get('gpu', machine['processor'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
