"""What a run's settings must satisfy before it starts: known modes, prompts that fit the model's
context, and an output folder whose stored setup is this one (so that a resumed grid means one
thing).

Standard library only: ``heterocache eval`` checks these before it imports torch or loads the
model (when the model's config is known without loading it), and :func:`.runner.run_eval`
checks them again with the loaded model.
"""

from __future__ import annotations

import json
from pathlib import Path

MODES = ("query_aware", "query_agnostic")
_ALIASES = {"aware": "query_aware", "agnostic": "query_agnostic", "qa": "query_aware", "qg": "query_agnostic"}


def canonical_mode(mode: str) -> str:
    """``"aware"``/``"agnostic"`` (and the full names) to the full names; errors otherwise."""
    mode = _ALIASES.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)} (or aware, agnostic)")
    return mode


def context_error(limit: int | None, lengths, max_new_tokens: int | None,
                  fidelity_positions: int | None = None) -> str | None:
    """Why prompts of ``lengths`` (plus generated tokens) or the fidelity window do not fit a
    context of ``limit`` positions, or None (also when the limit is unknown)."""
    if not limit:
        return None
    too_long = [n for n in lengths if n + (max_new_tokens or 1) > limit]
    if too_long:
        return f"lengths {too_long} (+ generated tokens) exceed the model's context of {limit}"
    if fidelity_positions and fidelity_positions > limit:
        return f"fidelity needs {fidelity_positions} positions; the model has {limit}"
    return None


def fingerprint(model_name: str, *, seed: int, chat_template: bool | None, max_new_tokens: int | None,
                fidelity_decode_tokens: int | None, fidelity_text: str | None) -> dict:
    """The settings that change what a record means; they must match to resume in a folder."""
    return {
        "model": model_name,
        "seed": seed,
        "chat_template": chat_template,
        "max_new_tokens": max_new_tokens,
        "fidelity_decode_tokens": fidelity_decode_tokens,
        "fidelity_text": fidelity_text,
    }


def stored_setup(path: Path, fingerprint: dict) -> dict:
    """The fingerprint to store at ``path`` (``config.json`` of an output folder): ``fingerprint``
    with the stored fidelity settings kept where this run has none.

    Raises:
        ValueError: the folder holds results of a different setup.
    """
    path = Path(path)
    if not path.exists():
        return fingerprint
    old = json.loads(path.read_text(encoding="utf-8"))
    # Fidelity settings may be added to a folder that had none, and a run without fidelity
    # may extend the tasks of a folder that has it.
    diff = {
        k: (old.get(k), v)
        for k, v in fingerprint.items()
        if old.get(k) != v and not (k.startswith("fidelity") and (old.get(k) is None or v is None))
    }
    if diff:
        raise ValueError(
            f"{path.parent} holds results of a different setup ({diff}, as (stored, now)); "
            "use another output folder"
        )
    return {k: v if v is not None else old.get(k) for k, v in fingerprint.items()}
