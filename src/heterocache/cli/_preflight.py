"""Checks the commands run on their arguments before they import torch or load a model.

Each raises :class:`~heterocache.cli._argparse.UsageError` naming the argument and the problem, which
the command line prints as one line (``heterocache bench: error: ...``, exit status 2). They read
files and headers only: a model's config (``config.json``, or the shapes this library knows by
name), a profile's safetensors header. :func:`check_method_options` is the exception: the option
values of a method are checked by its own code, so it imports the registry (torch), still before
the model loads.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ._argparse import UsageError

# A Hub model id, "org/name" or a legacy "name" (which must then be in the local cache, so that a
# misspelt model folder is not taken for one).
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class ModelSpec:
    """A model named on the command line, as far as it is known before it loads.

    Attributes:
        spec: as given.
        name: the name the loaded model will carry (``config.name_or_path``), by which its
            profile is looked up.
        config: its config fields (layers, heads, context, ...), or None where they are known only
            once it loads (a Hub id not in the local cache, a GGUF file, a folder without
            ``config.json``).
    """

    spec: str
    name: str
    config: dict | None


def check_model(spec: str, *, option: str = "--model", random: bool = False, hub: bool = False,
                gguf: bool = False, num_layers: int | None = None) -> ModelSpec:
    """What ``spec`` names: the bundled "smollm2" (any case), a local model folder, and where
    allowed a ``random:<name or config>`` model, a Hub id or a ``.gguf`` file.

    Args:
        option: the argument, for messages.
        random, hub, gguf: whether the command takes these forms.
        num_layers: ``--num-layers`` (``random:`` models only).
    """
    from ..models import KNOWN_SHAPES, SMOLLM2_CONFIG, SMOLLM2_NAME, short_model_name, smollm2_path

    if num_layers is not None and not (random and spec.startswith("random:")):
        raise UsageError(f"argument --num-layers: only applies to random: models, not {spec!r}")
    if short_model_name(spec) == SMOLLM2_NAME:
        try:
            smollm2_path()
        except FileNotFoundError as err:
            raise UsageError(f"argument {option}: {err}") from None
        return ModelSpec(spec, SMOLLM2_NAME, dict(SMOLLM2_CONFIG))
    if random and spec.startswith("random:"):
        name = spec[len("random:"):]
        key = {k.lower(): k for k in KNOWN_SHAPES}.get(name.lower())
        if key is not None:
            config, name = dict(KNOWN_SHAPES[key]), key
        elif Path(name).exists():
            config = _read_config(Path(name) / "config.json" if Path(name).is_dir() else Path(name), option)
            if config is None:
                raise UsageError(f"argument {option}: {name} holds no config.json")
        else:
            raise UsageError(f"argument {option}: no known shape for {name!r} and no such config file; "
                             f"known: {', '.join(KNOWN_SHAPES)}")
        if num_layers is not None:
            config["num_hidden_layers"] = int(num_layers)
        return ModelSpec(spec, name, config)
    path = Path(spec)
    if gguf and path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UsageError(f"argument {option}: GGUF file {path} does not exist")
        return ModelSpec(spec, str(path.parent), None)
    if path.is_dir():
        return ModelSpec(spec, spec, _read_config(path / "config.json", option))
    if hub and _HUB_NAME.match(spec):
        config_file = _cached_hub_file(spec, "config.json")
        if config_file is not None or "/" in spec:  # transformers looks it up in its cache or on the Hub
            return ModelSpec(spec, spec, None if config_file is None else _read_config(config_file, option))
    forms = ["'smollm2'", *(["'random:<name or config.json>'"] if random else []), "a local model folder",
             *(["a .gguf file"] if gguf else []), *(["a Hub id (org/name, or a cached name)"] if hub else [])]
    raise UsageError(f"argument {option}: model {spec!r} is not {', '.join(forms[:-1])} or {forms[-1]}"
                     + ("" if hub else " (models are not downloaded here)"))


def _cached_hub_file(repo_id: str, filename: str) -> Path | None:
    """``filename`` of Hub repository ``repo_id`` in the local huggingface_hub cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # noqa: BLE001  (not installed, an id it refuses: nothing cached to read)
        return None
    return Path(found) if isinstance(found, str) else None


def _read_config(path: Path, option: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"argument {option}: cannot read {path} ({err})") from None
    if not isinstance(config, dict):
        raise UsageError(f"argument {option}: {path} is not a JSON object")
    return config


def check_out_folder(path, option: str = "--out") -> None:
    """An output folder: it may exist, but not as a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"argument {option}: {path} exists and is not a folder")
    _check_parents(path, option)


def check_out_file(path, option: str = "--out") -> None:
    """An output file: it may exist, but not as a folder."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"argument {option}: {path} is a folder; give a file name")
    _check_parents(path.parent, option)


def _check_parents(path: Path, option: str) -> None:
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"argument {option}: {parent} is a file, so {path} cannot be made")
            return


def check_input_file(path, option: str) -> None:
    if not Path(path).is_file():
        raise UsageError(f"argument {option}: no such file: {path}")


# --------------------------------------------------------------------------------------- profiles
def resolve_profile(name_or_path, option: str = "--profile", revision: str | None = None) -> Path:
    """The profile file named by a path, a bundled name ("smollm2" too) or a Hub id, checked to be
    a head profile (its header only)."""
    from ..profile.errors import ProfileError
    from ..profile.io.header import read_header
    from ..profile.io.resolve import resolve_profile_file

    try:
        path = resolve_profile_file(name_or_path, revision=revision)
        read_header(path)
    except ProfileError as err:
        raise UsageError(f"argument {option}: {err}") from None
    return path


def default_profile(model: ModelSpec) -> Path | None:
    """The profile ``heterocache.profile.profile_for_model`` finds for the model by its name
    without the Hub: ``heterocache_profile.safetensors`` in the model's folder, else the bundled
    profile of that name; None when neither (the command then looks further once the model has
    loaded: the Hub, a bundled profile of the same shape)."""
    from ..profile.errors import ProfileError
    from ..profile.io.bundled import find_bundled
    from ..profile.io.header import PROFILE_FILENAME

    folder = Path(model.name)
    if folder.is_dir() and (folder / PROFILE_FILENAME).is_file():
        return folder / PROFILE_FILENAME
    try:
        return find_bundled(model.name)
    except ProfileError:  # several bundled profiles match a bare name: left to the full lookup
        return None


def check_profile_fits(path: Path, model: ModelSpec, option: str, hint: str = "") -> None:
    """Refuse a profile whose shape (layers, query and KV heads, head_dim) differs from the
    model's, when the model's config is known before it loads (``hint`` ends the message)."""
    from ..profile.errors import ProfileError
    from ..profile.io.header import read_header
    from ..profile.shape import misfit_message, model_shape, shape_mismatches

    if model.config is None:
        return
    try:
        header = read_header(path)
    except ProfileError as err:
        raise UsageError(f"argument {option}: {err}") from None
    try:
        shape = model_shape({**model.config, "name_or_path": model.name})
    except ProfileError:
        return  # a config without the usual fields: checked once the model has loaded
    mismatches = shape_mismatches(header, shape)
    if mismatches:
        raise UsageError(f"argument {option}: {misfit_message(header.model_name, model.name, mismatches)}{hint}")


def check_heterocache_profiles(methods, model: ModelSpec, profile: str | None = None,
                               profile_option: str | None = "--profile") -> dict[str, Path | None]:
    """The profile file of every "heterocache" method in ``methods``, checked to exist and to
    fit the model: ``profile`` (the command's ``profile_option``, None for a command without
    one) when given, else the method's own ``profile=`` option, else the model's own
    (:func:`default_profile`; None when it is found only after loading).

    Returns:
        method spec -> profile file (or None), for the heterocache methods only.
    """
    from .._method_names import parse_method_spec

    found: dict[str, Path | None] = {}
    for spec in methods:
        if spec.split(":")[0].strip().lower() != "heterocache":
            continue  # (a --methods-from method is not in the built-in table)
        name, params = parse_method_spec(spec)
        hint = ""
        if profile is not None:
            path, option = resolve_profile(profile, profile_option), profile_option
        elif params.get("profile") is not None:
            option = f"--methods ({spec})"
            path = resolve_profile(str(params["profile"]), option)
        else:
            path, option = default_profile(model), f"--methods ({spec})"
            hint = (f" (the profile found for the model by its name: {path}); pass one that fits"
                    + (f" with {profile_option}" if profile_option else " with heterocache:profile=PATH")
                    + ", or make one with `heterocache profile run`")
        if path is not None:
            check_profile_fits(path, model, option, hint)
        found[spec] = path
    return found


# ------------------------------------------------------------------------- after importing torch
def import_method_modules(modules, option: str = "--methods-from") -> None:
    """Import the modules (dotted names) or Python files that register a user's own methods
    (``@heterocache.register_method``), so that ``--methods`` can name them.

    Raises:
        UsageError: a file that does not exist, or a module that cannot be imported.
    """
    import importlib
    import importlib.util

    for name in modules:
        path = Path(name)
        try:
            if name.endswith(".py"):
                if not path.is_file():
                    raise UsageError(f"argument {option}: {name}: no such file")
                spec = importlib.util.spec_from_file_location(f"heterocache_user_methods_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except ImportError as err:
            raise UsageError(f"argument {option}: {name}: {err}") from None


def check_method_options(methods, budgets, profiles: dict[str, Path | None] | None = None,
                         option: str = "--methods") -> None:
    """Refuse option values a method's own code rejects (``snapkv:pooling=median``,
    ``heterocache:turn_reselect=both``), by building its policy at each budget without a model.

    Imports the registry (torch and transformers): called before the model loads, after the
    torch-free checks. A budget a profile cannot serve is not an error here (the command reports
    it per cell). A heterocache method whose profile is found only once the model has loaded
    (``profiles`` says None) is checked when its cache is made.
    """
    from ..engine.registry import get_method, parse_method_spec

    try:
        from ..methods.heterocache.plan import InfeasibleBudgetError
    except ModuleNotFoundError:
        InfeasibleBudgetError = ()  # noqa: N806  (no HeteroCache in this build: nothing to tolerate)
    for spec in methods:
        try:  # a --methods-from method is known only now
            name, params = parse_method_spec(spec)
        except (ValueError, TypeError) as err:
            raise UsageError(f"argument {option}: {err}") from None
        method = get_method(name)
        if method.policy_class is None:
            continue
        kwargs = {k: v for k, v in params.items() if k not in ("block_size", "reserve", "profile")}
        if name == "heterocache":
            path = (profiles or {}).get(spec)
            if path is None:
                continue
            from ..profile import HeadProfile

            kwargs["profile"] = HeadProfile.load(path)
        for budget in (budgets if method.uses_budget else (None,)):
            try:  # the method's factory gives a budget only to the methods that use one
                method.policy_class(**kwargs) if budget is None else method.policy_class(budget=budget, **kwargs)
            except InfeasibleBudgetError:
                pass
            except (ValueError, TypeError) as err:
                raise UsageError(f"argument {option}: {spec}: {err}") from None
